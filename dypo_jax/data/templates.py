"""Prompt templates: turn a plain question (plus an optional system text) into the model's prompt.

Templates (`TEMPLATES`):

* "plain": the question and one newline, `f"{prompt}\\n"`; a system text, when given, goes on the
  line before it: `f"{system}\\n{prompt}\\n"`. For the tiny models trained from scratch; the answer
  ends at the tokenizer's eos, so there are no stop strings.
* "qwen_chat": Qwen's ChatML, one system turn and one user turn, then the open assistant turn.
  With `system=None` the system turn holds Qwen2.5-Math's default `QWEN_MATH_SYSTEM`.
* "qwen3_chat": the same ChatML without a default system turn (Qwen3 puts none); `system=None`
  leaves the system turn out. The prompt ends at "<|im_start|>assistant\\n": the model opens its
  own "<think>" block.

(verl / LUFFY chat-message rows are read by `records.record_from_verl`.)
"""
TEMPLATES = ("plain", "qwen_chat", "qwen3_chat")

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

def _check_name(name: str) -> None:
  if name not in TEMPLATES:
    raise ValueError(f"unknown template {name!r}; allowed templates: {TEMPLATES}")


def _chatml(system: str | None, prompt: str) -> str:
  head = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>\n"
  return f"{head}<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def apply_template(name: str, prompt_text: str, *, system: str | None = None) -> str:
  """Returns the prompt string of template `name` for `prompt_text` (see the module docstring)."""
  _check_name(name)
  if not isinstance(prompt_text, str):
    raise ValueError(f"prompt_text must be a str, got {type(prompt_text).__name__}")
  if system is not None and not isinstance(system, str):
    raise ValueError(f"system must be a str or None, got {type(system).__name__}")
  if name == "plain":
    return f"{prompt_text}\n" if system is None else f"{system}\n{prompt_text}\n"
  if name == "qwen_chat":
    return _chatml(QWEN_MATH_SYSTEM if system is None else system, prompt_text)
  return _chatml(system, prompt_text)  # qwen3_chat

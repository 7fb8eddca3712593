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

`messages_to_prompt` reads the chat-message lists of verl / LUFFY parquet files into the
(system, user) pair that `apply_template` takes.
"""
from collections.abc import Mapping, Sequence
from typing import Any

TEMPLATES = ("plain", "qwen_chat", "qwen3_chat")

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."

_CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")


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


def stop_strings(name: str) -> tuple[str, ...]:
  """Strings that end a completion under template `name` (besides the tokenizer's eos)."""
  _check_name(name)
  return () if name == "plain" else _CHATML_STOPS


def messages_to_prompt(messages: Sequence[Mapping[str, Any]]) -> tuple[str | None, str]:
  """Reads a chat-message list into `(system, user)` for `apply_template`.

  Accepts an optional system message first and then exactly one user message, each a mapping
  with string "role" and "content" (a list, tuple or numpy object array, as pyarrow returns).
  Anything else (no user message, a second user turn, an assistant turn, a missing or non-string
  field) raises a ValueError naming the offending message index.
  """
  if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__len__"):
    raise ValueError(
        f"messages must be a list of role/content dicts, got {type(messages).__name__}")
  system, user = None, None
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise ValueError(f"message {i} is a {type(message).__name__}, not a role/content mapping")
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        raise ValueError(f"message {i} has no string {key!r} (got {message.get(key)!r:.80}); "
                         f"keys: {sorted(message)}")
    role = message["role"]
    if role == "system" and i == 0:
      system = message["content"]
    elif role == "user" and user is None:
      user = message["content"]
    else:
      raise ValueError(f"message {i} has role {role!r} where only a leading 'system' and one "
                       f"'user' message are supported")
  if user is None:
    raise ValueError(f"messages hold no 'user' message ({len(messages)} messages)")
  return system, user

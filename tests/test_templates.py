"""Tests for dypo_jax.data.templates: exact prompt strings, stop strings, chat-message parsing."""
import numpy as np
import pytest

from dypo_jax.data import templates

_Q = "What is 12 + 7?"


def test_templates_tuple():
  assert templates.TEMPLATES == ("plain", "qwen_chat", "qwen3_chat")


def test_plain():
  assert templates.apply_template("plain", _Q) == "What is 12 + 7?\n"
  assert templates.apply_template("plain", _Q, system="Be brief.") == "Be brief.\nWhat is 12 + 7?\n"
  assert templates.apply_template("plain", "") == "\n"


def test_qwen_chat_default_system():
  # Qwen2.5-Math's chat template: this default system turn when the messages carry none.
  expected = ("<|im_start|>system\n"
              "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
              "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
              "<|im_start|>assistant\n")
  assert templates.apply_template("qwen_chat", _Q) == expected
  assert "\\boxed{}" in expected and "\\\\" not in expected  # One real backslash.


def test_qwen_chat_given_system():
  assert templates.apply_template("qwen_chat", "2+2?", system="You are a tutor.") == (
      "<|im_start|>system\nYou are a tutor.<|im_end|>\n"
      "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
  # An explicit empty system text is kept as an empty system turn, not replaced by the default.
  assert templates.apply_template("qwen_chat", "2+2?", system="") == (
      "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen3_chat():
  assert templates.apply_template("qwen3_chat", _Q) == (
      "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n<|im_start|>assistant\n")
  assert templates.apply_template("qwen3_chat", _Q, system="S") == (
      "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n"
      "<|im_start|>assistant\n")


def test_multiline_prompt_kept_verbatim():
  q = "Line one.\n\n  Line two  \n"
  assert templates.apply_template("qwen3_chat", q).startswith(f"<|im_start|>user\n{q}<|im_end|>")


def test_unknown_name_and_bad_types():
  with pytest.raises(ValueError, match=r"'chatml'.*\('plain', 'qwen_chat', 'qwen3_chat'\)"):
    templates.apply_template("chatml", _Q)
  with pytest.raises(ValueError, match="'llama'"):
    templates.stop_strings("llama")
  with pytest.raises(ValueError, match="prompt_text must be a str"):
    templates.apply_template("plain", None)
  with pytest.raises(ValueError, match="system must be a str"):
    templates.apply_template("qwen_chat", _Q, system=["x"])


def test_stop_strings():
  assert templates.stop_strings("plain") == ()
  assert templates.stop_strings("qwen_chat") == ("<|im_end|>", "<|endoftext|>")
  assert templates.stop_strings("qwen3_chat") == ("<|im_end|>", "<|endoftext|>")


def test_messages_to_prompt_verl_style():
  # verl / LUFFY parquet rows: an optional system message, then the user question.
  luffy = [{"content": "You are a helpful assistant.", "role": "system"},
           {"content": "Find x if 2x = 6.", "role": "user"}]
  assert templates.messages_to_prompt(luffy) == (
      "You are a helpful assistant.", "Find x if 2x = 6.")
  verl = [{"role": "user", "content": _Q}]
  system, user = templates.messages_to_prompt(verl)
  assert (system, user) == (None, _Q)
  assert templates.apply_template("qwen_chat", user, system=system) == (
      templates.apply_template("qwen_chat", _Q))
  # pyarrow hands list columns back as numpy object arrays.
  assert templates.messages_to_prompt(np.array(luffy, dtype=object))[1] == "Find x if 2x = 6."


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user"}], r"message 0 has no string 'content'"),
    ([{"role": "system", "content": "s"}, {"content": "q"}], r"message 1 has no string 'role'"),
    ([{"role": "user", "content": None}], r"message 0 has no string 'content'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     r"message 1 has role 'assistant'"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"message 1 has role 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     r"message 1 has role 'system'"),
    ([{"role": "user", "content": "a"}, "hello"], r"message 1 is a str"),
    ([{"role": "system", "content": "s"}], r"no 'user' message"),
    ([], r"no 'user' message"),
    ({"role": "user", "content": "a"}, r"list of role/content dicts"),
])
def test_messages_to_prompt_errors(messages, match):
  with pytest.raises(ValueError, match=match):
    templates.messages_to_prompt(messages)

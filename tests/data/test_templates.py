"""Tests for dypo_jax.data.templates: exact prompt strings, names and types refused."""
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
  with pytest.raises(ValueError, match="prompt_text must be a str"):
    templates.apply_template("plain", None)
  with pytest.raises(ValueError, match="system must be a str"):
    templates.apply_template("qwen_chat", _Q, system=["x"])

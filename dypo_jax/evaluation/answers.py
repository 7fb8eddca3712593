"""A response's final answer, and the light normalisation that `exact_match` compares.

Final answer (`extract_answer`): the text after the last "Answer:" up to the end of that line; if
there is none (or it is empty), the content of the last balanced `\\boxed{...}`; else None. A
response without a final answer scores 0 under every reward.

`normalize_answer` only
  * strips the ends and collapses runs of whitespace to one space;
  * unwraps a string that is entirely `$...$` or `\\boxed{...}`, and drops one trailing period;
  * canonicalises plain decimal numbers (`canonical_number`): a leading `$` / `\\$` currency sign
    and `+` go, thousands separators go ("1,000" -> "1000"), trailing fractional zeros and a bare
    trailing point go ("18.0" -> "18", "2.50" -> "2.5"), and "-0" becomes "0".
It is case-sensitive and knows no mathematics ("1/2" != "0.5"); math-verify does that.
"""
import re

from dypo_jax.data.benchmarks import last_boxed

_ANSWER_MARKER = "Answer:"
_NUMBER = re.compile(r"^[+-]?(?:\d+|\d{1,3}(?:,\d{3})+)?(?:\.\d*)?$")


def extract_answer(text: str) -> str | None:
  """The final answer of a response (see module docstring), stripped, or None."""
  idx = text.rfind(_ANSWER_MARKER)
  if idx >= 0:
    line = text[idx + len(_ANSWER_MARKER):].split("\n", 1)[0].strip()
    if line:
      return line
  boxed = last_boxed(text)
  if boxed is not None and boxed.strip():
    return boxed.strip()
  return None


def canonical_number(text: str) -> str | None:
  """Canonical form of a plain decimal number ("1,000.50" -> "1000.5"), or None if not one."""
  s = text
  for currency in ("\\$", "$"):
    if s.startswith(currency) and len(s) > len(currency):
      s = s[len(currency):]
      break
  if not _NUMBER.match(s) or not any(c.isdigit() for c in s):
    return None
  sign = "-" if s.startswith("-") else ""
  s = s.lstrip("+-").replace(",", "")
  if "." in s:
    s = s.rstrip("0").rstrip(".")
  if not s:
    s = "0"
  if s.startswith("."):
    s = "0" + s
  if s.strip("0.") == "":
    return "0"
  return sign + s


def normalize_answer(text: str) -> str:
  """The light normalisation `exact_match` applies to both sides (see module docstring)."""
  s = " ".join(text.split())
  while True:
    before = s
    if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
      s = s.strip("$").strip()
    if s.startswith("\\boxed{") and s.endswith("}") and last_boxed(s) == s[len("\\boxed{"):-1]:
      s = s[len("\\boxed{"):-1].strip()
    if s.endswith(".") and len(s) > 1:
      s = s[:-1].rstrip()
    if s == before:
      break
  number = canonical_number(s)
  return s if number is None else number


"""The procedural arithmetic problems: a family and its integer arguments, with prompt and answer.

Both the task generator (`data.tasks`) and the teachers (`data.teachers`) build on it.
"""
import dataclasses
import hashlib
import math

FAMILIES = ("add", "mul", "gcd", "lineq", "addsub")

ANSWER_PREFIX = "Answer:"

def signed_expr(values: list[int]) -> str:
  """[53, -17, 8] -> "53-17+8"."""
  out = str(values[0])
  for v in values[1:]:
    out += f"+{v}" if v >= 0 else f"-{-v}"
  return out


@dataclasses.dataclass(frozen=True)
class Problem:
  """One arithmetic problem: a family name and its integer arguments.

  args per family: add (t1, ..., tn) with n >= 2, all >= 0; mul (a, b) >= 0; gcd (a, b) >= 1;
  lineq (a, b, c) meaning a*x + b = c with a >= 1 and integer x; addsub (t1, s2, ..., sn) with
  t1 >= 0 and each later term signed (negative = subtracted).
  """
  family: str
  args: tuple[int, ...]

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"Problem: unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
    if not isinstance(self.args, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in self.args):
      raise ValueError(f"Problem {self.family}: args must be a tuple of ints, got {self.args!r}")
    a = self.args
    ok = {
        "add": len(a) >= 2 and min(a, default=0) >= 0,
        "mul": len(a) == 2 and min(a) >= 0,
        "gcd": len(a) == 2 and min(a) >= 1,
        "lineq": len(a) == 3 and a[0] >= 1 and a[1] >= 0 and (a[2] - a[1]) % max(a[0], 1) == 0,
        "addsub": len(a) >= 2 and a[0] >= 0 and 0 not in a[1:],
    }[self.family]
    if not ok:
      raise ValueError(f"Problem {self.family}: invalid args {self.args!r} (see Problem docs)")

  @property
  def prompt(self) -> str:
    a = self.args
    if self.family == "add":
      return "+".join(map(str, a)) + "=?"
    if self.family == "mul":
      return f"{a[0]}*{a[1]}=?"
    if self.family == "gcd":
      return f"gcd({a[0]},{a[1]})=?"
    if self.family == "lineq":
      return f"{a[0]}x+{a[1]}={a[2]}, x=?"
    return signed_expr(list(a)) + "=?"

  @property
  def answer(self) -> int:
    a = self.args
    if self.family in ("add", "addsub"):
      return sum(a)
    if self.family == "mul":
      return a[0] * a[1]
    if self.family == "gcd":
      return math.gcd(a[0], a[1])
    return (a[2] - a[1]) // a[0]

  @property
  def key(self) -> str:
    """Canonical identity: problems that differ only by reordering commuting terms share it."""
    a = self.args
    if self.family in ("add", "mul", "gcd"):
      canon = tuple(sorted(a))
    elif self.family == "addsub":
      canon = (a[0],) + tuple(sorted(a[1:]))
    else:
      canon = a
    return f"{self.family}:" + ",".join(map(str, canon))

  @property
  def digest(self) -> str:
    return hashlib.sha256(self.key.encode()).hexdigest()

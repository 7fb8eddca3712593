"""Teacher solvers for the procedural arithmetic tasks: several step-by-step styles per family.

DYPO trains Hard prompts by SFT on one of m teacher traces (METHOD.md §2). In small (§8) teachers
must differ in style and be imperfect in different ways, so every family has three teachers that
reach the answer by visibly different routes: one terse, one verbose, one in between, and the
default pool makes one of them sloppy (`DEFAULT_ERROR_RATES`).

A sloppy teacher makes one arithmetic slip (off by 1, 2 or 10) at a seeded step and carries the
wrong value through the rest of its trace, so its trace is self-consistent after the slip and its
final answer is wrong. Set `error_rate=0.0` for a perfect teacher.

Every trace is a few lines and ends with "\\nAnswer: <int>"; `dypo_jax.data.tasks.final_answer`
reads it back. The problems themselves (family + integer arguments) are `data.problems.Problem`.

Families and their prompts:
  add     12+7+30=?        multi-term addition
  mul     47*6=?           multiplication
  gcd     gcd(42,18)=?     greatest common divisor
  lineq   3x+5=38, x=?     linear equation a*x + b = c with integer x
  addsub  53-17-8=?        chains of + and - (first term positive, no negative running total)
"""
import dataclasses
import math
import random
from typing import Callable, Mapping

from dypo_jax.data.problems import ANSWER_PREFIX
from dypo_jax.data.problems import FAMILIES
from dypo_jax.data.problems import Problem
from dypo_jax.data.problems import signed_expr

_PLACES = ("ones", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands")


class _Steps:
  """Passes each intermediate result (or judgement) through; the `slip_at`-th one slips.

  Teachers route every computed number through this, so a slip propagates to the end of the
  trace. A number slips by `delta`; a judgement (`decide`) is inverted. A slipped number stays
  >= 0 (a negative result becomes value + |delta|) unless the true value is itself negative.
  """

  def __init__(self, slip_at: int | None = None, delta: int = 0):
    self.count = 0
    self.slip_at = slip_at
    self.delta = delta

  def __call__(self, value: int) -> int:
    i = self.count
    self.count += 1
    if i != self.slip_at:
      return value
    slipped = value + self.delta
    if slipped < 0 <= value:
      slipped = value + abs(self.delta)
    return slipped

  def decide(self, flag: bool) -> bool:
    """A yes/no judgement (e.g. "does 6 divide 42?"); the slip inverts it."""
    i = self.count
    self.count += 1
    return (not flag) if i == self.slip_at else flag


# A teacher body: (problem, steps) -> (trace lines without the answer line, final answer).
_Body = Callable[[Problem, _Steps], tuple[list[str], int]]

_SLIP_DELTAS = (-10, -2, -1, 1, 2, 10)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """A named solver of one family; call it as `teacher(problem, rng, error_rate=0.0) -> str`."""
  name: str
  family: str
  style: str  # One line on how it solves, and its quirk.
  body: _Body

  def __call__(self, problem: Problem, rng: random.Random, *, error_rate: float = 0.0) -> str:
    """The trace for `problem`, ending in "\\nAnswer: <int>".

    Args:
      problem: a Problem of this teacher's family.
      rng: used only when error_rate > 0 (draws whether, where and how to slip).
      error_rate: probability of one arithmetic slip. The slip (which step, by how much) is drawn
        among those that change the final answer, so the trace is wrong with probability
        error_rate (only a problem no slip can change, e.g. none here, would stay right).

    Returns:
      The trace text.
    """
    if problem.family != self.family:
      raise ValueError(f"teacher {self.family}/{self.name}: got a {problem.family!r} problem "
                       f"({problem.prompt!r})")
    if not 0.0 <= error_rate <= 1.0:
      raise ValueError(f"teacher {self.family}/{self.name}: error_rate must be in [0, 1], got "
                       f"{error_rate!r}")
    steps = _Steps()
    lines, answer = self.body(problem, steps)
    if answer != problem.answer:
      raise RuntimeError(f"teacher {self.family}/{self.name} solved {problem.prompt!r} as {answer},"
                         f" expected {problem.answer}")
    if error_rate > 0.0 and rng.random() < error_rate:
      # Try every (step, delta) slip in a seeded order; keep the first that changes the answer.
      slips = [(i, d) for i in range(steps.count) for d in _SLIP_DELTAS]
      rng.shuffle(slips)
      for i, d in slips:
        slipped_lines, slipped_answer = self.body(problem, _Steps(i, d))
        if slipped_answer != answer:
          lines, answer = slipped_lines, slipped_answer
          break
    return "\n".join(lines + [f"{ANSWER_PREFIX} {answer}"])


def _digit(v: int, j: int) -> int:
  return (v // 10**j) % 10


def _ndigits(v: int) -> int:
  return len(str(abs(v)))


def _sum_line(label: str, values: list[int], steps: _Steps) -> tuple[str, int]:
  """"label: 10+30=40" (one step), or "label: 10" for a single value, "label: 0" for none."""
  if not values:
    return f"{label}: 0", 0
  if len(values) == 1:
    return f"{label}: {values[0]}", values[0]
  total = steps(sum(values))
  return f"{label}: {signed_expr(values)}={total}", total


# ---------------------------------------------------------------------------------------- add


def _add_running_total(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  total, lines = p.args[0], []
  for t in p.args[1:]:
    new = steps(total + t)
    lines.append(f"{total}+{t}={new}")
    total = new
  return lines, total


def _add_column_carry(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  width = max(_ndigits(t) for t in p.args)
  carry, answer, lines = 0, 0, []
  for j in range(width):
    parts = [_digit(t, j) for t in p.args if _ndigits(t) > j]
    expr = "+".join(map(str, parts)) + (f"+{carry}" if carry else "")
    s = steps(sum(parts) + carry)
    if j == width - 1:
      lines.append(f"{_PLACES[j]}: {expr}={s}, write {s}")
      answer += s * 10**j
    else:
      lines.append(f"{_PLACES[j]}: {expr}={s}, write {s % 10} carry {s // 10}")
      answer += (s % 10) * 10**j
      carry = s // 10
  return lines, answer


def _place_values(terms: tuple[int, ...], steps: _Steps) -> tuple[list[str], int]:
  """Sums each place separately (highest first), then adds the place sums. Terms may be signed."""
  width = max(_ndigits(t) for t in terms)
  lines, partials = [], []
  for j in reversed(range(width)):
    values = [(1 if t >= 0 else -1) * _digit(abs(t), j) * 10**j for t in terms]
    line, s = _sum_line(_PLACES[j], [v for v in values if v], steps)
    lines.append(line)
    if s:
      partials.append(s)
  if len(partials) > 1:
    total = steps(sum(partials))
    lines.append(f"{signed_expr(partials)}={total}")
  else:
    total = partials[0] if partials else 0
  return lines, total


def _add_place_value(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  return _place_values(p.args, steps)


# ---------------------------------------------------------------------------------------- mul


def _mul_partial_products(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b = p.args
  lines, partials = [], []
  for j in reversed(range(_ndigits(a))):
    d = _digit(a, j)
    if d == 0:
      continue
    v = d * 10**j
    pp = steps(v * b)
    lines.append(f"{v}*{b}={pp}")
    partials.append(pp)
  if not partials:  # a == 0.
    return [f"0*{b}=0"], 0
  if len(partials) == 1:
    return lines, partials[0]
  total = steps(sum(partials))
  lines.append("+".join(map(str, partials)) + f"={total}")
  return lines, total


def _mul_column_carry(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b = p.args
  width = _ndigits(a)
  carry, answer, lines = 0, 0, []
  for j in range(width):
    d = _digit(a, j)
    expr = f"{d}*{b}" + (f"+{carry}" if carry else "")
    s = steps(d * b + carry)
    if j == width - 1:
      lines.append(f"{_PLACES[j]}: {expr}={s}, write {s}")
      answer += s * 10**j
    else:
      lines.append(f"{_PLACES[j]}: {expr}={s}, write {s % 10} carry {s // 10}")
      answer += (s % 10) * 10**j
      carry = s // 10
  return lines, answer


def _mul_doubling(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b = p.args
  if b <= 1:
    return [f"{a}*{b}={a * b}"], a * b
  powers = [1]
  while powers[-1] * 2 <= b:
    powers.append(powers[-1] * 2)
  chosen = [m for m in reversed(powers) if b & m]
  lines = [f"{b}=" + "+".join(map(str, chosen))] if len(chosen) > 1 else []
  multiples = {1: a}
  value = a
  for m in powers[1:]:
    new = steps(value * 2)
    lines.append(f"{value}+{value}={new}")
    multiples[m] = value = new
  picked = [multiples[m] for m in chosen]
  if len(picked) == 1:
    return lines, picked[0]
  total = steps(sum(picked))
  lines.append("+".join(map(str, picked)) + f"={total}")
  return lines, total


# ---------------------------------------------------------------------------------------- gcd


def _gcd_euclid(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  x, y = max(p.args), min(p.args)
  lines = []
  while y:
    r = steps(x % y)
    lines.append(f"{x}={x // y}*{y}+{r}")
    x, y = y, r
  return lines, x


def _prime_factors(n: int) -> list[int]:
  out, f = [], 2
  while f * f <= n:
    while n % f == 0:
      out.append(f)
      n //= f
    f += 1
  if n > 1:
    out.append(n)
  return out


def _gcd_factor(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  lines = []
  rest = None
  common = []
  for v in sorted(p.args, reverse=True):
    fs = _prime_factors(v)
    lines.append(f"{v}=" + ("*".join(map(str, fs)) if fs else "1"))
    if rest is None:
      rest = fs
    else:
      for f in fs:
        if f in rest:
          rest.remove(f)
          common.append(f)
  if not common:
    g = steps(1)
    lines.append(f"common: none, {g}")
  elif len(common) == 1:
    g = steps(common[0])
    lines.append(f"common: {g}")
  else:
    g = steps(math.prod(common))
    lines.append("common: " + "*".join(map(str, common)) + f"={g}")
  return lines, g


def _gcd_divisors(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  lo, hi = min(p.args), max(p.args)
  divisors = [d for d in range(lo, 0, -1) if lo % d == 0]
  checks, g = [], None
  for d in divisors:
    if steps.decide(hi % d == 0):
      checks.append(f"{hi}/{d}={hi // d}")
      g = d
      break
    checks.append(f"{hi}/{d} no")
  lines = [f"divisors of {lo}: " + ",".join(map(str, divisors)), ", ".join(checks)]
  if g is None:  # Only after a slip rejected 1.
    g = 1
    lines.append("so 1")
  return lines, g


# -------------------------------------------------------------------------------------- lineq


def _lineq_isolate(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b, c = p.args
  r = steps(c - b)
  x = steps(r // a)
  return [f"{a}x={c}-{b}={r}", f"x={r}/{a}={x}"], x


def _lineq_check(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b, c = p.args
  r = steps(c - b)
  x = steps(r // a)
  ax = steps(a * x)
  back = steps(ax + b)
  return [f"subtract {b}: {a}x={c}-{b}={r}", f"divide by {a}: x={r}/{a}={x}",
          f"check: {a}*{x}+{b}={ax}+{b}={back}"], x


def _lineq_chunking(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  a, b, c = p.args
  rem = steps(c - b)
  lines = [f"{a}x={c}-{b}={rem}"]
  parts = []
  tens = rem // (a * 10)
  if tens > 0:
    chunk = a * tens * 10
    new = steps(rem - chunk)
    lines.append(f"{a}*{tens * 10}={chunk}, {rem}-{chunk}={new}")
    parts.append(tens * 10)
    rem = new
  ones = rem // a
  if ones > 0 or not parts:
    chunk = a * ones
    new = steps(rem - chunk)
    lines.append(f"{a}*{ones}={chunk}, {rem}-{chunk}={new}")
    parts.append(ones)
  if len(parts) == 1:
    x = parts[0]
    lines.append(f"x={x}")
  else:
    x = steps(sum(parts))
    lines.append(f"x={parts[0]}+{parts[1]}={x}")
  return lines, x


# ------------------------------------------------------------------------------------- addsub


def _addsub_running_total(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  total, lines = p.args[0], []
  for t in p.args[1:]:
    new = steps(total + t)
    lines.append(f"{total}{'+' if t > 0 else '-'}{abs(t)}={new}")
    total = new
  return lines, total


def _addsub_split_signs(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  plus_line, plus = _sum_line("plus", [t for t in p.args if t > 0], steps)
  minus_line, minus = _sum_line("minus", [-t for t in p.args if t < 0], steps)
  total = steps(plus - minus)
  return [plus_line, minus_line, f"{plus}-{minus}={total}"], total


def _addsub_place_value(p: Problem, steps: _Steps) -> tuple[list[str], int]:
  return _place_values(p.args, steps)


# ----------------------------------------------------------------------------------- registry


def _registry(*teachers: Teacher) -> dict[str, dict[str, Teacher]]:
  out: dict[str, dict[str, Teacher]] = {f: {} for f in FAMILIES}
  for t in teachers:
    if t.name in out[t.family]:
      raise ValueError(f"teachers: duplicate teacher name {t.name!r} in family {t.family!r}")
    out[t.family][t.name] = t
  return out


# family -> teacher name -> Teacher. A Teacher is callable as fn(problem, rng) -> trace.
TEACHERS: dict[str, dict[str, Teacher]] = _registry(
    Teacher("running_total", "add", "terse: one running partial sum per line (12+7=19, 19+30=49)",
            _add_running_total),
    Teacher("column_carry", "add",
            "verbose: column by column from the ones, every carry spelled out", _add_column_carry),
    Teacher("place_value", "add", "sums tens and ones separately, then adds them (sloppy)",
            _add_place_value),
    Teacher("partial_products", "mul", "terse: 40*6=240, 7*6=42, 240+42=282",
            _mul_partial_products),
    Teacher("column_carry", "mul", "verbose: digit by digit from the ones, with carries",
            _mul_column_carry),
    Teacher("doubling", "mul",
            "splits the multiplier into powers of two, doubles by self-addition (sloppy)",
            _mul_doubling),
    Teacher("euclid", "gcd", "terse: Euclid's remainders (42=2*18+6, 18=3*6+0)", _gcd_euclid),
    Teacher("factor", "gcd", "prime factorisations, then the common factors (sloppy)",
            _gcd_factor),
    Teacher("divisors", "gcd", "verbose: lists the smaller number's divisors, tests each",
            _gcd_divisors),
    Teacher("isolate", "lineq", "terse: move b, then divide", _lineq_isolate),
    Teacher("check", "lineq", "verbose: names each move and checks by substitution",
            _lineq_check),
    Teacher("chunking", "lineq", "divides by taking off tens of a, then ones (sloppy)",
            _lineq_chunking),
    Teacher("running_total", "addsub", "terse: one running result per line",
            _addsub_running_total),
    Teacher("split_signs", "addsub", "adds what is added, adds what is taken away, subtracts",
            _addsub_split_signs),
    Teacher("place_value", "addsub", "signed tens and ones separately, then combines (sloppy)",
            _addsub_place_value),
)

# The quirk of the default pools (METHOD.md §8): one sloppy teacher per family.
DEFAULT_ERROR_RATES: dict[str, dict[str, float]] = {
    "add": {"place_value": 0.1},
    "mul": {"doubling": 0.1},
    "gcd": {"factor": 0.1},
    "lineq": {"chunking": 0.1},
    "addsub": {"place_value": 0.1},
}


def error_rate_of(error_rates: Mapping[str, Mapping[str, float]], family: str,
                  teacher: str) -> float:
  """The rate for (family, teacher) in a {family: {teacher: rate}} table; absent means 0."""
  return float(error_rates.get(family, {}).get(teacher, 0.0))

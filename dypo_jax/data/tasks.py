"""Procedural arithmetic tasks for tiny character-level models, with multi-teacher traces.

This is the small-scale regime of METHOD.md §8: a fixed, finite prompt pool made from a seed, m
teacher traces per prompt from teachers that differ in style (one sloppy), held-out ID prompts, and
OOD sets that are harder but reachable.

In-distribution (ID_TASKS):
  add          2-4 terms of 1-2 digits            "12+7+30=?"
  mul          two-digit x one-digit (2..9)       "47*6=?"
  gcd          two different numbers in 2..60     "gcd(42,18)=?"
  lineq        a*x+b=c, a 2..9, x 1..15, b 1..30  "3x+5=38, x=?"
Out of distribution (OOD_TASKS), graded by distance from the ID tasks. Near and mid sets shift
one thing the training distribution never drew, on a scale the ID traces already show (the gated
base models of experiments/study.py, 5 seeds, at 33% ID pass@1: add_zero 17%, add_space_eq 27%,
add_5x1 3%, add_100s 0.1%, the far sets under 1%):
  add_zero     near, value: a sum of 3-4 terms of 1-2 digits, one of them 0 (ID terms are >= 1)
  add_space_eq near, format: an ID-shaped sum written "12+7 =?" (no ID prompt has a space)
  add_5x1      mid, composition: exactly 5 terms of 1 digit (ID has at most 4 terms)
  add_100s     mid, value: 2-3 terms of 1-2 digits, one of them in 100..199 (ID terms are < 100;
               ID running sums already pass 100)
Far sets:
  add_long     5-6 terms of 1-2 digits
  add_3digit   2-3 terms of 3 digits
  mul_3x1      three-digit x one-digit
  gcd_large    numbers in 2..99, the larger above 60
  lineq_large  a 2..12, x 16..40, b 10..99
  sub_chain    held-out family: 53-17-8 (2-4 terms, never negative on the way)
  addsub_chain held-out family: 45+12-8-20 (3-4 terms, mixed signs, never negative on the way)
The held-out chains reuse what ID teachers show (running sums, place values, the subtractions in
the lineq and gcd traces), so they are reachable but new.

Train/eval split: a problem belongs to "eval" when the hash of its canonical form (commuting terms
sorted) falls in the lowest EVAL_PERCENT of 100 buckets, else to "train", whatever the seed; so an
eval prompt never appears in any train pool. Within one split and task, problems are de-duplicated
on the canonical form. A record's uid is f"{task}-{hash[:12]}", the same for the same problem in
every seed.

Prompts are at most PROMPT_MAX_CHARS characters; ID teacher traces at most TRACE_MAX_CHARS and OOD
ones at most OOD_TRACE_MAX_CHARS (checked by the tests). Every trace ends in "\\nAnswer: <int>".
"""
import dataclasses
import random
from typing import Callable, Mapping, Sequence

from dypo_jax.data import teachers as teachers_lib
from dypo_jax.data.records import PromptRecord
from dypo_jax.data.records import TeacherSolution
from dypo_jax.data.problems import Problem

__all__ = [
    "EVAL_PERCENT", "ID_TASKS", "OOD_TASKS", "ALL_TASKS", "PROMPT_MAX_CHARS", "TRACE_MAX_CHARS",
    "OOD_TRACE_MAX_CHARS", "TaskSpec", "final_answer", "generate", "make_pools",
    "split_of",
]

EVAL_PERCENT = 25
PROMPT_MAX_CHARS = 40
TRACE_MAX_CHARS = 160
OOD_TRACE_MAX_CHARS = 200

SPLITS = ("train", "eval")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: a family (which teachers solve it) and its difficulty settings.

  `settings` lists the knobs as (name, value) pairs, e.g. (("terms", (2, 4)), ("digits", (1, 2))),
  ranges inclusive; `sample(rng)` draws one Problem with them.
  """
  name: str
  family: str
  ood: bool
  settings: tuple[tuple[str, object], ...]
  sampler: Callable[..., Problem] = dataclasses.field(repr=False)
  # How the prompt is written ("plain" = Problem.prompt; "space_eq" puts a space before "=").
  prompt_format: str = "plain"

  def prompt_of(self, problem: Problem) -> str:
    if self.prompt_format == "space_eq":
      return problem.prompt.replace("=", " =")
    return problem.prompt

  @property
  def params(self) -> dict[str, object]:
    return dict(self.settings)

  def sample(self, rng: random.Random) -> Problem:
    return self.sampler(rng, **self.params)


def _number(rng: random.Random, digits: tuple[int, int]) -> int:
  """A number whose digit count is uniform in `digits`, then uniform among such numbers."""
  k = rng.randint(*digits)
  return rng.randint(10 ** (k - 1) if k > 1 else 1, 10**k - 1)


def _sample_add(rng: random.Random, *, terms: tuple[int, int],
                digits: tuple[int, int]) -> Problem:
  return Problem("add", tuple(_number(rng, digits) for _ in range(rng.randint(*terms))))


def _sample_add_one_from(rng: random.Random, *, terms: tuple[int, int],
                         digits: tuple[int, int], special: tuple[int, int]) -> Problem:
  """`_sample_add` with one term, at a random place, drawn uniformly from `special` instead."""
  values = [_number(rng, digits) for _ in range(rng.randint(*terms))]
  values[rng.randrange(len(values))] = rng.randint(*special)
  return Problem("add", tuple(values))


def _sample_mul(rng: random.Random, *, digits: tuple[int, int],
                multiplier: tuple[int, int]) -> Problem:
  return Problem("mul", (_number(rng, digits), rng.randint(*multiplier)))


def _sample_gcd(rng: random.Random, *, values: tuple[int, int], larger_above: int) -> Problem:
  lo, hi = values
  while True:
    if rng.random() < 0.5:  # Half the pairs share a chosen factor, so answers are not mostly 1.
      g = rng.randint(2, hi // 2)
      a, b = g * rng.randint(1, hi // g), g * rng.randint(1, hi // g)
    else:
      a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if a != b and min(a, b) >= lo and max(a, b) > larger_above:
      return Problem("gcd", (a, b))


def _sample_lineq(rng: random.Random, *, a: tuple[int, int], x: tuple[int, int],
                  b: tuple[int, int]) -> Problem:
  av, xv, bv = rng.randint(*a), rng.randint(*x), rng.randint(*b)
  return Problem("lineq", (av, bv, av * xv + bv))


def _sample_addsub(rng: random.Random, *, terms: tuple[int, int], first: tuple[int, int],
                   digits: tuple[int, int], mixed: bool) -> Problem:
  while True:
    n = rng.randint(*terms)
    rest = [_number(rng, digits) for _ in range(n - 1)]
    signs = [rng.choice((1, -1)) for _ in rest] if mixed else [-1] * len(rest)
    if -1 not in signs:
      continue
    args = [_number(rng, first)] + [s * v for s, v in zip(signs, rest)]
    running, ok = args[0], True
    for v in args[1:]:
      running += v
      ok = ok and running >= 0
    if ok:
      return Problem("addsub", tuple(args))


def _spec(name: str, family: str, ood: bool, sampler: Callable[..., Problem],
          prompt_format: str = "plain", **settings) -> TaskSpec:
  return TaskSpec(name=name, family=family, ood=ood, settings=tuple(settings.items()),
                  sampler=sampler, prompt_format=prompt_format)


ID_TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _spec("add", "add", False, _sample_add, terms=(2, 4), digits=(1, 2)),
    _spec("mul", "mul", False, _sample_mul, digits=(2, 2), multiplier=(2, 9)),
    _spec("gcd", "gcd", False, _sample_gcd, values=(2, 60), larger_above=0),
    _spec("lineq", "lineq", False, _sample_lineq, a=(2, 9), x=(1, 15), b=(1, 30)),
)}

OOD_TASKS: dict[str, TaskSpec] = {s.name: s for s in (
    _spec("add_zero", "add", True, _sample_add_one_from, terms=(3, 4), digits=(1, 2),
          special=(0, 0)),  # Two non-zero terms at least: a sum to do (and to slip on).
    _spec("add_space_eq", "add", True, _sample_add, prompt_format="space_eq", terms=(2, 4),
          digits=(1, 2)),
    _spec("add_5x1", "add", True, _sample_add, terms=(5, 5), digits=(1, 1)),
    _spec("add_100s", "add", True, _sample_add_one_from, terms=(2, 3), digits=(1, 2),
          special=(100, 199)),
    _spec("add_long", "add", True, _sample_add, terms=(5, 6), digits=(1, 2)),
    _spec("add_3digit", "add", True, _sample_add, terms=(2, 3), digits=(3, 3)),
    _spec("mul_3x1", "mul", True, _sample_mul, digits=(3, 3), multiplier=(2, 9)),
    _spec("gcd_large", "gcd", True, _sample_gcd, values=(2, 99), larger_above=60),
    _spec("lineq_large", "lineq", True, _sample_lineq, a=(2, 12), x=(16, 40), b=(10, 99)),
    _spec("sub_chain", "addsub", True, _sample_addsub, terms=(2, 4), first=(2, 2),
          digits=(1, 2), mixed=False),
    _spec("addsub_chain", "addsub", True, _sample_addsub, terms=(3, 4), first=(2, 2),
          digits=(1, 2), mixed=True),
)}

ALL_TASKS: dict[str, TaskSpec] = {**ID_TASKS, **OOD_TASKS}


def split_of(problem: Problem) -> str:
  """"eval" or "train", from the problem's canonical form only (never from a seed)."""
  return "eval" if int(problem.digest[:8], 16) % 100 < EVAL_PERCENT else "train"


def final_answer(text: str) -> str | None:
  """The final answer of a trace: the text after the LAST "Answer:" up to the end of its line.

  Returns None when there is no "Answer:" or nothing but whitespace follows it on that line.
  """
  if not isinstance(text, str):
    return None
  i = text.rfind(teachers_lib.ANSWER_PREFIX)
  if i < 0:
    return None
  rest = text[i + len(teachers_lib.ANSWER_PREFIX):]
  line = rest.split("\n", 1)[0].strip()
  return line or None


def _resolve(task_names: Sequence[str]) -> list[TaskSpec]:
  if isinstance(task_names, str):
    task_names = [task_names]
  specs = []
  for name in task_names:
    if name not in ALL_TASKS:
      raise ValueError(f"generate: unknown task {name!r}; known: {', '.join(ALL_TASKS)}")
    if any(s.name == name for s in specs):
      raise ValueError(f"generate: task {name!r} is listed twice")
    specs.append(ALL_TASKS[name])
  if not specs:
    raise ValueError("generate: no task names given")
  return specs


def _problems(spec: TaskSpec, num: int, seed: int, split: str) -> list[Problem]:
  rng = random.Random(f"dypo-tasks/{seed}/{split}/{spec.name}")
  seen, out = set(), []
  budget = 200 * num + 5000
  for _ in range(budget):
    if len(out) == num:
      break
    p = spec.sample(rng)
    if split_of(p) != split or p.key in seen:
      continue
    seen.add(p.key)
    out.append(p)
  if len(out) < num:
    raise ValueError(f"generate: task {spec.name!r} gave only {len(out)} distinct {split!r} "
                     f"problems of {num} requested after {budget} draws; ask for fewer")
  return out


def generate(task_names: Sequence[str], *, num: int, seed: int, split: str,
             error_rates: Mapping[str, Mapping[str, float]] | None = None) -> list[PromptRecord]:
  """Generates `num` records spread evenly over `task_names` (earlier tasks get the remainder).

  Args:
    task_names: names from ID_TASKS / OOD_TASKS.
    num: total number of records.
    seed: the same seed gives the same records in the same order.
    split: "train" or "eval"; the two are disjoint for all seeds (see `split_of`).
    error_rates: {family: {teacher: rate}} slip rates of the teachers; None means
      teachers.DEFAULT_ERROR_RATES (one sloppy teacher per family), {} means perfect teachers.

  Returns:
    Records with uid f"{task}-{hash}", prompt, answer (str of int), source = task name, and one
    TeacherSolution per teacher of the task's family, in a seeded shuffled order.
  """
  if split not in SPLITS:
    raise ValueError(f"generate: split must be one of {SPLITS}, got {split!r}")
  if not isinstance(num, int) or num < 0:
    raise ValueError(f"generate: num must be an int >= 0, got {num!r}")
  specs = _resolve(task_names)
  rates = teachers_lib.DEFAULT_ERROR_RATES if error_rates is None else error_rates
  records = []
  for i, spec in enumerate(specs):
    share = num // len(specs) + (1 if i < num % len(specs) else 0)
    for p in _problems(spec, share, seed, split):
      uid = f"{spec.name}-{p.digest[:12]}"
      sols = []
      for tname, teacher in teachers_lib.TEACHERS[spec.family].items():
        rng = random.Random(f"dypo-teachers/{seed}/{uid}/{tname}")
        rate = teachers_lib.error_rate_of(rates, spec.family, tname)
        sols.append(TeacherSolution(teacher=tname, response=teacher(p, rng, error_rate=rate)))
      records.append(PromptRecord(uid=uid, prompt=spec.prompt_of(p), answer=str(p.answer),
                                  source=spec.name, teachers=tuple(sols)))
  random.Random(f"dypo-order/{seed}/{split}").shuffle(records)
  return records


def make_pools(*, seed: int, num_train: int, num_eval_id: int, num_eval_ood: int,
               error_rates: Mapping[str, Mapping[str, float]] | None = None
               ) -> dict[str, list[PromptRecord]]:
  """The fixed pools of one experiment: {"train", "eval_id", "eval_ood"}.

  "train" and "eval_id" draw from all ID_TASKS ("train" and "eval" splits), "eval_ood" from all
  OOD_TASKS ("eval" split). `error_rates` as in `generate`.
  """
  return {
      "train": generate(list(ID_TASKS), num=num_train, seed=seed, split="train",
                        error_rates=error_rates),
      "eval_id": generate(list(ID_TASKS), num=num_eval_id, seed=seed, split="eval",
                          error_rates=error_rates),
      "eval_ood": generate(list(OOD_TASKS), num=num_eval_ood, seed=seed, split="eval",
                           error_rates=error_rates),
  }

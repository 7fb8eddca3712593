"""Tests for dypo_jax.data.tasks and dypo_jax.data.teachers (procedural tasks, teacher traces)."""
import collections
import math
import random
import re

import pytest

from dypo_jax.data import tasks
from dypo_jax.data import teachers
from dypo_jax.data.problems import Problem

_FAMILY_TASKS = collections.defaultdict(list)
for _spec in tasks.ALL_TASKS.values():
  _FAMILY_TASKS[_spec.family].append(_spec)


def _answer_from_prompt(prompt: str) -> int:
  """An independent solver that reads only the prompt text."""
  if m := re.fullmatch(r"gcd\((\d+),(\d+)\)=\?", prompt):
    return math.gcd(int(m[1]), int(m[2]))
  if m := re.fullmatch(r"(\d+)x\+(\d+)=(\d+), x=\?", prompt):
    a, b, c = int(m[1]), int(m[2]), int(m[3])
    assert (c - b) % a == 0, prompt
    return (c - b) // a
  if m := re.fullmatch(r"(\d+)\*(\d+)=\?", prompt):
    return int(m[1]) * int(m[2])
  m = re.fullmatch(r"\d+(?:[+-]\d+)+=\?", prompt)
  assert m, prompt
  return sum(int(t) for t in re.findall(r"[+-]?\d+", prompt[:-2]))


def _problems(family: str, n: int, seed: int = 0) -> list[Problem]:
  """n problems of `family`, drawn round-robin from its ID and OOD tasks."""
  rng = random.Random(seed)
  specs = _FAMILY_TASKS[family]
  return [specs[i % len(specs)].sample(rng) for i in range(n)]


# ------------------------------------------------------------------------------------ teachers


@pytest.mark.parametrize("family", teachers.FAMILIES)
def test_every_teacher_is_right_and_short(family):
  rng = random.Random(1)
  assert len(teachers.TEACHERS[family]) >= 3
  for p in _problems(family, 2000):
    gold = str(_answer_from_prompt(p.prompt))
    assert str(p.answer) == gold, p
    assert len(p.prompt) <= tasks.PROMPT_MAX_CHARS, p.prompt
    for name in teachers.TEACHERS[family]:
      trace = teachers.TEACHERS[family][name](p, rng, error_rate=0.0)
      assert tasks.final_answer(trace) == gold, (name, p.prompt, trace)
      assert re.search(r"\nAnswer: -?\d+$", trace), trace


@pytest.mark.parametrize("task", list(tasks.ALL_TASKS))
def test_lengths_within_bounds(task):
  spec = tasks.ALL_TASKS[task]
  bound = tasks.OOD_TRACE_MAX_CHARS if spec.ood else tasks.TRACE_MAX_CHARS
  rng = random.Random(2)
  for _ in range(600):
    p = spec.sample(rng)
    assert len(p.prompt) <= tasks.PROMPT_MAX_CHARS
    for name, teacher in teachers.TEACHERS[spec.family].items():
      trace = teacher(p, rng)
      assert len(trace) <= bound, (name, len(trace), trace)
  assert tasks.TRACE_MAX_CHARS <= 160 and tasks.PROMPT_MAX_CHARS <= 40


def test_styles_of_a_family_differ_on_every_item():
  recs = tasks.generate(list(tasks.ALL_TASKS), num=1100, seed=5, split="train", error_rates={})
  for r in recs:
    family = tasks.ALL_TASKS[r.source].family
    assert [t.teacher for t in r.teachers] == list(teachers.TEACHERS[family])
    assert len({t.response for t in r.teachers}) == len(r.teachers), r
    for t in r.teachers:
      assert tasks.final_answer(t.response) == r.answer, (r.prompt, t)


def test_example_traces():
  rng = random.Random(0)
  p = Problem("add", (12, 7, 30))
  assert p.prompt == "12+7+30=?"
  assert teachers.TEACHERS["add"]["running_total"](p, rng) == "12+7=19\n19+30=49\nAnswer: 49"
  assert teachers.TEACHERS["add"]["column_carry"](Problem("add", (18, 7, 25)), rng) == (
      "ones: 8+7+5=20, write 0 carry 2\ntens: 1+2+2=5, write 5\nAnswer: 50")
  assert teachers.TEACHERS["mul"]["partial_products"](Problem("mul", (47, 6)), rng) == (
      "40*6=240\n7*6=42\n240+42=282\nAnswer: 282")
  assert teachers.TEACHERS["gcd"]["euclid"](Problem("gcd", (42, 18)), rng) == (
      "42=2*18+6\n18=3*6+0\nAnswer: 6")
  assert teachers.TEACHERS["lineq"]["isolate"](Problem("lineq", (3, 5, 38)), rng) == (
      "3x=38-5=33\nx=33/3=11\nAnswer: 11")
  assert Problem("addsub", (53, -17, -8)).prompt == "53-17-8=?"
  with pytest.raises(ValueError, match="got a 'mul' problem"):
    teachers.TEACHERS["add"]["running_total"](Problem("mul", (3, 4)), rng)
  with pytest.raises(ValueError, match="invalid args"):
    Problem("lineq", (3, 5, 37))  # No integer solution.


@pytest.mark.parametrize("family", teachers.FAMILIES)
def test_error_rate_is_the_wrong_rate(family):
  rng = random.Random(3)
  problems = _problems(family, 3000, seed=4)
  for name, teacher in teachers.TEACHERS[family].items():
    wrong = 0
    for p in problems:
      trace = teacher(p, rng, error_rate=0.1)
      assert re.search(r"\nAnswer: -?\d+$", trace), trace
      wrong += tasks.final_answer(trace) != str(p.answer)
    assert 0.07 <= wrong / len(problems) <= 0.13, (name, wrong)
  # error_rate=1: every trace wrong (a slip that would leave the answer right is never chosen).
  sloppy = teachers.TEACHERS[family][next(iter(teachers.DEFAULT_ERROR_RATES[family]))]
  assert all(tasks.final_answer(sloppy(p, rng, error_rate=1.0)) != str(p.answer)
             for p in problems[:300])


def test_default_pools_have_one_sloppy_teacher_per_family():
  recs = tasks.generate(list(tasks.ID_TASKS), num=2000, seed=0, split="train")
  wrong = collections.Counter()
  seen = collections.Counter()
  for r in recs:
    for t in r.teachers:
      family = tasks.ALL_TASKS[r.source].family
      seen[(family, t.teacher)] += 1
      wrong[(family, t.teacher)] += tasks.final_answer(t.response) != r.answer
  for key, n in seen.items():
    rate = teachers.error_rate_of(teachers.DEFAULT_ERROR_RATES, *key)
    if rate == 0:
      assert wrong[key] == 0, key
    else:
      assert abs(wrong[key] / n - rate) < 0.06, (key, wrong[key], n)
  assert sum(1 for k in seen if teachers.error_rate_of(teachers.DEFAULT_ERROR_RATES, *k)) == 4


# --------------------------------------------------------------------------------------- tasks


def test_final_answer():
  assert tasks.final_answer("12+7=19\nAnswer: 19") == "19"
  assert tasks.final_answer("Answer: 3\nno, wait\nAnswer:  49 \r\nthanks") == "49"
  assert tasks.final_answer("Answer: x = 4") == "x = 4"
  assert tasks.final_answer("the answer is 5") is None
  assert tasks.final_answer("Answer:   \n") is None
  assert tasks.final_answer(None) is None


def test_generate_is_deterministic_and_deduplicated():
  a = tasks.generate(["add", "gcd", "sub_chain"], num=301, seed=11, split="train")
  b = tasks.generate(["add", "gcd", "sub_chain"], num=301, seed=11, split="train")
  c = tasks.generate(["add", "gcd", "sub_chain"], num=301, seed=12, split="train")
  assert a == b
  assert a != c
  assert len(a) == 301
  assert collections.Counter(r.source for r in a) == {"add": 101, "gcd": 100, "sub_chain": 100}
  assert len({r.uid for r in a}) == len(a)
  assert len({r.prompt for r in a}) == len(a)
  assert all(r.uid.startswith(r.source + "-") for r in a)


def test_train_and_eval_disjoint_across_seeds():
  train = [tasks.make_pools(seed=s, num_train=1200, num_eval_id=0, num_eval_ood=0)["train"]
           for s in (0, 1)]
  evals = [tasks.make_pools(seed=s, num_train=0, num_eval_id=500, num_eval_ood=700)
           for s in (2, 3)]
  train_prompts = {r.prompt for pool in train for r in pool}
  eval_prompts = {r.prompt for p in evals for r in p["eval_id"] + p["eval_ood"]}
  assert train_prompts and eval_prompts
  assert not train_prompts & eval_prompts
  # Also no eval problem is a reordering of a train problem (canonical keys disjoint).
  for pool in train:
    for r in pool:
      assert tasks.split_of(_problem_of(r)) == "train"
  for p in evals:
    for r in p["eval_id"] + p["eval_ood"]:
      assert tasks.split_of(_problem_of(r)) == "eval"
  # Different seeds give different (overlapping) samples of the same split.
  assert {r.prompt for r in train[0]} != {r.prompt for r in train[1]}


def _problem_of(record) -> Problem:
  """Rebuilds the Problem of a generated record from its prompt text."""
  family = tasks.ALL_TASKS[record.source].family
  nums = [int(t) for t in re.findall(r"[+-]?\d+", record.prompt.replace("gcd(", "("))]
  if family == "gcd":
    return Problem("gcd", (nums[0], abs(nums[1])))
  if family == "lineq":
    return Problem("lineq", (nums[0], nums[1], nums[2]))
  if family == "mul":
    return Problem("mul", (nums[0], nums[1]))
  if family == "add":
    return Problem("add", tuple(abs(n) for n in nums))
  return Problem("addsub", tuple(nums))


def test_make_pools_and_ood_differ_from_id():
  pools = tasks.make_pools(seed=7, num_train=400, num_eval_id=200, num_eval_ood=350)
  assert {k: len(v) for k, v in pools.items()} == {"train": 400, "eval_id": 200, "eval_ood": 350}
  assert {r.source for r in pools["train"]} == set(tasks.ID_TASKS)
  assert {r.source for r in pools["eval_id"]} == set(tasks.ID_TASKS)
  assert {r.source for r in pools["eval_ood"]} == set(tasks.OOD_TASKS)
  assert any(tasks.ALL_TASKS[r.source].family == "addsub" for r in pools["eval_ood"])
  for r in pools["train"]:
    assert _problem_of(r).prompt == r.prompt and len(r.teachers) == 3
  # OOD problems are never ID problems: sample both broadly and compare canonical keys. A format
  # shift asks ID problems (from the eval split only) in a way no ID prompt is written.
  rng = random.Random(9)
  id_keys = {s.sample(rng).key for s in tasks.ID_TASKS.values() for _ in range(3000)}
  ood_keys = {s.sample(rng).key for s in tasks.OOD_TASKS.values() for _ in range(1000)
              if s.prompt_format == "plain"}
  assert not id_keys & ood_keys
  spaced = [r for r in pools["eval_ood"] if r.source == "add_space_eq"]
  assert spaced and all(" " not in r.prompt[:-3] and r.prompt.endswith(" =?") for r in spaced)
  assert all(0 in _problem_of(r).args for r in pools["eval_ood"] if r.source == "add_zero")
  assert all(tasks.split_of(_problem_of(r)) == "eval" for r in spaced)
  assert not {r.prompt for r in pools["eval_ood"]} & {r.prompt for r in pools["eval_id"]}


def test_generate_rejects_bad_requests():
  with pytest.raises(ValueError, match="unknown task 'nope'"):
    tasks.generate(["add", "nope"], num=4, seed=0, split="train")
  with pytest.raises(ValueError, match="split must be"):
    tasks.generate(["add"], num=4, seed=0, split="test")
  with pytest.raises(ValueError, match="listed twice"):
    tasks.generate(["add", "add"], num=4, seed=0, split="train")
  # Only ~180 distinct two-digit x one-digit problems fall in the eval split.
  with pytest.raises(ValueError, match="task 'mul' gave only .* distinct 'eval'"):
    tasks.generate(["mul"], num=300, seed=0, split="eval")

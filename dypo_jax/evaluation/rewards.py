"""Binary correctness rewards and the format penalty.

A reward function is `reward(record, response_text) -> float`, 1.0 for a correct final answer
(`answers.extract_answer`) and 0.0 otherwise; DYPO's difficulty grading (Easy / Mid / Hard) uses
exactly this binary value. Functions live in a registry (`REWARDS`, `register`, `get_reward`); the
trainer calls the front door `reward_batch(name, records, responses, pool=...)`.

`exact_match` compares `answers.normalize_answer` of both sides. `math_verify` checks the answer
with math-verify (`verifier.math_verify_score`); batches of it run in a `verifier.MathVerifyPool`.

`format_penalty` is a shaped term (<= 0) that the trainer may add to the GRPO reward; it is never
part of the binary grading.
"""
import time
from collections.abc import Callable, Sequence

import numpy as np

from dypo_jax.data.records import PromptRecord
from dypo_jax.evaluation import verifier
from dypo_jax.evaluation.answers import extract_answer, normalize_answer

RewardFn = Callable[[PromptRecord, str], float]

REWARDS: dict[str, RewardFn] = {}


def register(name: str) -> Callable[[RewardFn], RewardFn]:
  """Decorator that adds a reward function to `REWARDS` under `name` (names are unique)."""

  def decorator(fn: RewardFn) -> RewardFn:
    if name in REWARDS:
      raise ValueError(f"reward {name!r} is already registered ({REWARDS[name].__qualname__})")
    REWARDS[name] = fn
    return fn

  return decorator


def get_reward(name: str) -> RewardFn:
  """The registered reward `name`; an unknown name raises ValueError listing the allowed ones."""
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}; allowed: {', '.join(sorted(REWARDS))}")
  return REWARDS[name]



@register("exact_match")
def exact_match(record: PromptRecord, response: str) -> float:
  """1.0 if the response's final answer equals `record.answer` after `normalize_answer`."""
  answer = extract_answer(response)
  if answer is None:
    return 0.0
  return float(normalize_answer(answer) == normalize_answer(record.answer))



@register("math_verify")
def math_verify_reward(record: PromptRecord, response: str) -> float:
  """math-verify of the response's final answer against `record.answer`, in this process.

  Main thread only (signal.alarm) and unprotected against hangs: batches should go through
  `reward_batch("math_verify", ..., pool=verifier.MathVerifyPool(...))`.
  """
  answer = extract_answer(response)
  if answer is None:
    return 0.0
  return verifier.math_verify_score(record.answer, answer)


def format_penalty(response_text: str, *, finished: bool, coef: float) -> float:
  """Shaped penalty for the GRPO reward: -coef if truncated or without a final answer, else 0.

  `finished` is False when generation stopped at the length limit rather than at an end token.
  The penalty is applied once (a truncated response without an answer gets -coef, not -2 coef)
  and is never part of the binary correctness used for Easy / Mid / Hard grading.
  """
  if coef < 0:
    raise ValueError(f"format_penalty coef must be >= 0, got {coef}")
  if not finished or extract_answer(response_text) is None:
    return -float(coef)
  return 0.0



def reward_batch(name: str, records: Sequence[PromptRecord], responses: Sequence[str], *,
                 pool: verifier.MathVerifyPool | None = None,
                 timeout: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
  """Scores responses[i] against records[i] with reward `name`; returns (scores [n] f32, stats).

  "math_verify" runs through `pool` (a temporary one if None: hold one in a trainer); responses
  without a final answer score 0 without reaching the pool. Every other reward runs inline.
  stats: reward_mean, reward_timeouts and reward_errors (`verifier.BatchFaults`), no_answer_frac,
  reward_time_s.
  """
  fn = get_reward(name)
  if len(records) != len(responses):
    raise ValueError(f"reward_batch({name!r}): {len(records)} records but {len(responses)} "
                     "responses")
  start = time.perf_counter()
  n = len(records)
  answers = [extract_answer(r) for r in responses]
  scores = np.zeros((n,), np.float32)
  faults = verifier.BatchFaults()
  if name == "math_verify":
    idx = [i for i, a in enumerate(answers) if a is not None]
    if idx:
      own_pool = pool is None
      if own_pool:
        pool = verifier.MathVerifyPool(num_workers=min(verifier.default_workers(), len(idx)))
      try:
        sub_scores, faults = pool.score_batch([records[i].answer for i in idx],
                                              [answers[i] for i in idx], timeout=timeout)
      finally:
        if own_pool:
          pool.close()
      scores[np.asarray(idx)] = sub_scores
  else:
    for i, (record, response) in enumerate(zip(records, responses)):
      scores[i] = float(fn(record, response))
  stats = {
      "reward_mean": float(scores.mean()) if n else 0.0,
      "reward_timeouts": float(faults.timeouts),
      "reward_errors": float(faults.errors),
      "no_answer_frac": float(sum(a is None for a in answers) / n) if n else 0.0,
      "reward_time_s": time.perf_counter() - start,
  }
  return scores, stats

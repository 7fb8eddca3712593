"""Tests for dypo_jax.evaluation.rewards: answer extraction, exact match, the math-verify pool, penalties."""
import os
import threading
import time

import numpy as np
import pytest

from dypo_jax.data.records import PromptRecord
from dypo_jax.evaluation import answers, rewards, verifier
from verifier_faults import fault_injection_score


def _always_crash(gold: str, pred: str) -> float:
  del gold, pred
  os._exit(7)  # pylint: disable=protected-access


def _within(seconds: float, fn, *args, **kwargs):
  """Runs fn in a thread; fails the test (instead of hanging it) if it takes over `seconds`."""
  result = {}
  thread = threading.Thread(target=lambda: result.update(out=fn(*args, **kwargs)), daemon=True)
  thread.start()
  thread.join(seconds)
  if thread.is_alive():
    pytest.fail(f"{fn.__qualname__} stalled for more than {seconds} s")
  if "out" not in result:
    pytest.fail(f"{fn.__qualname__} raised (see the thread's traceback above)")
  return result["out"]


def _rec(answer: str) -> PromptRecord:
  return PromptRecord(uid="t/0", prompt="q", answer=answer, source="test")


@pytest.mark.parametrize("text,want", [
    ("Work...\nAnswer: 42", "42"),
    ("Answer: 1\nmore thinking\nAnswer:  7 \nthe end", "7"),  # Last "Answer:" wins, to line end.
    ("so x = \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # Nested braces.
    ("\\boxed{1} then \\boxed{\\sqrt{\\frac{a}{b}}}", "\\sqrt{\\frac{a}{b}}"),  # Last box.
    ("\\boxed{3} and a truncated \\boxed{\\frac{1}{", "3"),  # Unbalanced last box skipped.
    ("Answer:\nthe box \\boxed{5}", "5"),  # Empty "Answer:" line falls back to the box.
    ("Answer: \\boxed{5}", "\\boxed{5}"),
    ("no final answer here 12", None),
    ("", None),
])
def test_extract_answer(text, want):
  assert answers.extract_answer(text) == want


@pytest.mark.parametrize("gold,response,want", [
    ("42", "Answer: 42", 1.0),
    ("42", "Answer: 43", 0.0),
    ("42", "the answer is 42", 0.0),  # No final answer.
    ("1000", "Answer: 1,000", 1.0),
    ("1,000,000", "Answer: 1000000", 1.0),
    ("18", "Answer: 18.0", 1.0),
    ("2.5", "Answer: 2.50", 1.0),
    ("18", "Answer: $18", 1.0),
    ("18", "Answer: 18.", 1.0),
    ("-3", "Answer: -3", 1.0),
    ("-3", "Answer: 3", 0.0),
    ("0", "Answer: -0", 1.0),
    ("0.5", "Answer: .5", 1.0),
    ("180", "Answer: 18", 0.0),
    ("1/2", "Answer: 0.5", 0.0),  # No mathematics in exact match.
    ("C", "Answer: C", 1.0),
    ("C", "Answer: c", 0.0),  # Case-sensitive.
    ("\\frac{1}{2}", "x = \\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "Answer: $\\boxed{\\frac{1}{2}}$", 1.0),
    ("x + 1", "Answer:  x   +  1 ", 1.0),
    ("Evelyn", "Answer: Evelyn.", 1.0),  # One trailing sentence period dropped.
    ("18", "Answer: 18 dollars", 0.0),
])
def test_exact_match_truth_table(gold, response, want):
  assert rewards.exact_match(_rec(gold), response) == want
  assert rewards.get_reward("exact_match")(_rec(gold), response) == want


def test_registry():
  assert {"exact_match", "math_verify"} <= set(rewards.REWARDS)
  with pytest.raises(ValueError, match="unknown reward 'nope'; allowed: .*exact_match"):
    rewards.get_reward("nope")
  with pytest.raises(ValueError, match="already registered"):
    rewards.register("exact_match")(lambda r, s: 0.0)


def test_format_penalty():
  assert rewards.format_penalty("Answer: 3", finished=True, coef=0.5) == 0.0
  assert rewards.format_penalty("\\boxed{3}", finished=True, coef=0.5) == 0.0
  assert rewards.format_penalty("no answer", finished=True, coef=0.5) == -0.5
  assert rewards.format_penalty("Answer: 3", finished=False, coef=0.5) == -0.5
  assert rewards.format_penalty("no answer", finished=False, coef=0.5) == -0.5  # Once, not twice.
  assert rewards.format_penalty("no answer", finished=False, coef=0.0) == 0.0
  with pytest.raises(ValueError, match="coef must be >= 0, got -1"):
    rewards.format_penalty("x", finished=True, coef=-1.0)


def test_math_verify_score_inline():
  assert verifier.math_verify_score("\\frac{1}{2}", "0.5") == 1.0
  assert verifier.math_verify_score("p-q", "p - q") == 1.0
  assert verifier.math_verify_score("3", "4") == 0.0
  with pytest.raises(ValueError, match="cannot parse the gold"):
    verifier.math_verify_score("", "4")


def test_pool_rejects_unpicklable_score_fn():
  with pytest.raises(ValueError, match="not picklable"):
    verifier.MathVerifyPool(1, score_fn=lambda g, p: 1.0)


@pytest.fixture(scope="module")
def fault_pool():
  with verifier.MathVerifyPool(2, timeout=10.0, score_fn=fault_injection_score) as pool:
    yield pool


def test_pool_scores_equivalent_forms(fault_pool):
  golds = ["\\boxed{\\frac{1}{2}}", "\\boxed{2\\sqrt{2}}", "\\frac{1}{2}", "1000", "p-q", "3",
           "\\left( 3, \\frac{\\pi}{2} \\right)", "[2,5)"]
  preds = ["0.5", "\\sqrt{8}", "\\boxed{0.5}", "1,000", "p - q", "4", "(3,\\frac{\\pi}{2})",
           "[2, 5)"]
  scores, faults = fault_pool.score_batch(golds, preds)
  np.testing.assert_array_equal(scores, [1, 1, 1, 1, 1, 0, 1, 1])
  assert scores.dtype == np.float32 and faults == verifier.BatchFaults(0, 0)


def test_pool_hanging_item_is_killed_and_replaced(fault_pool):
  restarts = fault_pool.restarts
  start = time.monotonic()
  scores, faults = _within(30.0, fault_pool.score_batch, ["1", "2", "3", "4"],
                           ["1", "HANG", "3", "5"], timeout=1.5)
  elapsed = time.monotonic() - start
  np.testing.assert_array_equal(scores, [1, 0, 1, 0])
  assert faults == verifier.BatchFaults(timeouts=1, errors=0)
  assert fault_pool.restarts == restarts + 1
  assert elapsed < 1.5 + 3.0, elapsed  # About one timeout, not a stall.
  # The replacement worker serves the next batch.
  scores, faults = fault_pool.score_batch(["7", "8", "9"], ["7", "8", "10"], timeout=30.0)
  np.testing.assert_array_equal(scores, [1, 1, 0])
  assert faults == verifier.BatchFaults(0, 0)


@pytest.mark.slow
def test_pool_hang_does_not_delay_other_items():
  with verifier.MathVerifyPool(2, timeout=10.0, score_fn=fault_injection_score) as pool:
    pool.score_batch(["1", "1"], ["1", "1"])  # Both workers warm.
    start = time.monotonic()
    scores, faults = _within(30.0, pool.score_batch, ["0"] + [str(i) for i in range(1, 9)],
                             ["HANG"] + [str(i) for i in range(1, 9)], timeout=2.0)
    elapsed = time.monotonic() - start
  np.testing.assert_array_equal(scores, [0] + [1] * 8)
  assert faults == verifier.BatchFaults(timeouts=1, errors=0)
  assert elapsed < 2.0 + 3.0, elapsed


def test_pool_crashing_and_raising_workers(fault_pool):
  restarts = fault_pool.restarts
  scores, faults = _within(60.0, fault_pool.score_batch, ["1", "2", "3", "4"],
                           ["CRASH", "2", "RAISE", "4"], timeout=30.0)
  np.testing.assert_array_equal(scores, [0, 1, 0, 1])
  assert faults == verifier.BatchFaults(timeouts=0, errors=2)
  assert fault_pool.restarts == restarts + 1  # Only the crash costs a worker.
  scores, faults = fault_pool.score_batch(["5", "6"], ["5", "CRASH"], timeout=30.0)
  np.testing.assert_array_equal(scores, [1, 0])
  assert faults == verifier.BatchFaults(timeouts=0, errors=1)
  scores, faults = fault_pool.score_batch(["5", "6"], ["5", "6"], timeout=30.0)
  np.testing.assert_array_equal(scores, [1, 1])
  assert faults == verifier.BatchFaults(0, 0)


def test_pool_counts_the_verifiers_own_timeouts_apart_from_wrong_answers(fault_pool):
  scores, faults = fault_pool.score_batch(["1", "2", "3"], ["1", "GIVE_UP", "4"], timeout=30.0)
  np.testing.assert_array_equal(scores, [1, 0, 0])
  assert faults == verifier.BatchFaults(timeouts=1, errors=0)


def test_pool_bounds_a_whole_batch(fault_pool):
  start = time.monotonic()
  scores, faults = _within(30.0, fault_pool.score_batch, ["1", "2", "3", "4", "5"],
                           ["HANG", "HANG", "3", "4", "5"], timeout=60.0, batch_timeout=1.5)
  elapsed = time.monotonic() - start
  # Both workers hang; the bound ends the batch and counts all five as timeouts.
  np.testing.assert_array_equal(scores, [0, 0, 0, 0, 0])
  assert faults == verifier.BatchFaults(timeouts=5, errors=0)
  assert elapsed < 1.5 + 3.0, elapsed
  scores, faults = fault_pool.score_batch(["3"], ["3"], timeout=30.0)  # Replaced workers serve.
  np.testing.assert_array_equal(scores, [1])


def test_pool_workers_cut_long_log_lines(capfd):
  with verifier.MathVerifyPool(1, score_fn=fault_injection_score) as pool:  # Under capfd.
    pool.score_batch(["1"], ["LOG"], timeout=30.0)
  err = capfd.readouterr().err
  assert "Timeout during parsing" in err and "more characters]" in err
  assert len(err) < 2 * verifier.LOG_LINE_CHARS, len(err)


def test_math_verify_timeout_is_not_a_wrong_answer(monkeypatch):
  import math_verify  # pylint: disable=g-import-not-at-top
  from math_verify.errors import TimeoutException  # pylint: disable=g-import-not-at-top

  def slow_verify(*args, **kwargs):
    raise TimeoutException("Timeout during comparison")

  monkeypatch.setattr(math_verify, "verify", slow_verify)
  with pytest.raises(verifier.VerifierTimeout, match="timed out"):
    verifier.math_verify_score("2", "3")


def test_pool_size_defaults_to_cores_but_one():
  assert verifier.default_workers() == max(1, len(os.sched_getaffinity(0)) - 1)
  with pytest.raises(ValueError, match="num_workers must be >= 0"):
    verifier.MathVerifyPool(-1)


def test_pool_bad_input(fault_pool):
  with pytest.raises(ValueError, match="2 golds but 1 preds"):
    fault_pool.score_batch(["1", "2"], ["1"])
  scores, faults = fault_pool.score_batch([], [])
  assert scores.shape == (0,) and faults == verifier.BatchFaults(0, 0)


def test_reward_batch_math_verify_and_exact_match(fault_pool):
  records = [_rec("\\frac{1}{2}"), _rec("2\\sqrt{2}"), _rec("5"), _rec("7")]
  responses = ["so \\boxed{0.5}", "Answer: $\\sqrt{8}$", "no answer", "Answer: 8"]
  scores, stats = rewards.reward_batch("math_verify", records, responses, pool=fault_pool)
  np.testing.assert_array_equal(scores, [1, 1, 0, 0])
  assert stats["reward_mean"] == pytest.approx(0.5)
  assert stats["no_answer_frac"] == pytest.approx(0.25)
  assert stats["reward_errors"] == 0 and stats["reward_timeouts"] == 0
  scores, stats = rewards.reward_batch("exact_match", records, responses)
  np.testing.assert_array_equal(scores, [0, 0, 0, 0])
  scores, _ = rewards.reward_batch("exact_match", [_rec("8")], ["Answer: 8"])
  np.testing.assert_array_equal(scores, [1])
  with pytest.raises(ValueError, match="2 records but 1 responses"):
    rewards.reward_batch("exact_match", records[:2], responses[:1])
  with pytest.raises(ValueError, match="unknown reward"):
    rewards.reward_batch("bogus", records, responses)


def test_reward_batch_without_pool_uses_a_temporary_one():
  scores, stats = rewards.reward_batch("math_verify", [_rec("3"), _rec("4")],
                                       ["Answer: 3", "Answer: 5"])
  np.testing.assert_array_equal(scores, [1, 0])
  assert stats["reward_errors"] == 0


def test_pool_gives_up_on_workers_that_never_start():
  pool = verifier.MathVerifyPool(1, score_fn=_always_crash, max_start_failures=1)
  try:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="failed to start 2 times in a row .*exit code 7"):
      pool.score_batch(["1"], ["1"], timeout=5.0)
    assert time.monotonic() - start < 30.0
  finally:
    pool.close()

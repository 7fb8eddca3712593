"""Tests for dypo_jax.evaluation.passk against brute-force enumeration of k-subsets."""
import itertools
import math

import numpy as np
import pytest

from dypo_jax.evaluation import passk


def _brute_force(sample_correct: np.ndarray, k: int) -> float:
  """Fraction of k-subsets of the samples that hold at least one correct sample."""
  subsets = list(itertools.combinations(range(len(sample_correct)), k))
  return sum(bool(sample_correct[list(s)].any()) for s in subsets) / len(subsets)


def _pass_at_k(n: int, c: int, k: int) -> float:
  """pass@k of one prompt with `c` of its `n` samples correct."""
  return float(passk.pass_at_k_array(np.arange(n)[None] < c, k)[0])


def test_pass_at_k_matches_brute_force_on_random_data():
  rng = np.random.default_rng(0)
  for _ in range(60):
    n = int(rng.integers(1, 9))
    sample_correct = rng.random(n) < rng.random()
    c = int(sample_correct.sum())
    for k in range(1, n + 1):
      want = _brute_force(sample_correct, k)
      assert _pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12), (n, c, k)
      assert passk.pass_at_k_array(sample_correct[None], k)[0] == pytest.approx(want, abs=1e-12)


def test_pass_at_k_matches_binomial_formula_for_large_n():
  n, c, k = 200, 7, 32
  want = 1 - math.comb(n - c, k) / math.comb(n, k)
  assert _pass_at_k(n, c, k) == pytest.approx(want, rel=1e-12)


def test_edge_cases():
  assert _pass_at_k(8, 0, 1) == 0.0
  assert _pass_at_k(8, 0, 8) == 0.0
  assert _pass_at_k(8, 8, 1) == 1.0
  assert _pass_at_k(8, 8, 8) == 1.0
  assert _pass_at_k(8, 1, 8) == 1.0  # n - c < k: every subset holds the correct sample.
  assert _pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
  arr = passk.pass_at_k_array(np.array([[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0]], bool), 2)
  np.testing.assert_allclose(arr, [0.0, 1.0, 0.5])


@pytest.mark.parametrize("n,c,k", [(4, 0, 5), (4, 2, 0), (0, 0, 1)])
def test_bad_arguments_raise(n, c, k):
  with pytest.raises(ValueError, match=r"pass_at_k_array: k must be in \[1, n="):
    _pass_at_k(n, c, k)


def test_array_rejects_bad_shapes_and_k():
  with pytest.raises(ValueError, match=r"k must be in \[1, n=3\]"):
    passk.pass_at_k_array(np.zeros((2, 3), bool), 4)
  with pytest.raises(ValueError, match="shape"):
    passk.pass_at_k_array(np.zeros((3,), bool), 1)


def test_summarize():
  rng = np.random.default_rng(1)
  correct = rng.random((5, 6)) < 0.3
  out = passk.summarize(correct, ks=(1, 2, 6))
  assert out["pass@1"] == pytest.approx(correct.mean())
  for k in (2, 6):
    want = np.mean([_brute_force(row, k) for row in correct])
    assert out[f"pass@{k}"] == pytest.approx(want)
  assert out["pass@6"] == pytest.approx(correct.any(axis=1).mean())
  assert out["num_prompts"] == 5 and out["num_samples"] == 6
  with pytest.raises(ValueError, match="k must be in"):
    passk.summarize(correct, ks=(7,))


def test_pass_at_1_by_source_averages_each_sets_prompts():
  from dypo_jax.data import records  # pylint: disable=g-import-not-at-top
  from dypo_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  pool = [records.PromptRecord(uid=str(i), prompt="p", answer="1", source=s)
          for i, s in enumerate(["near", "far", "near", "far", "near"])]
  # Three prompts were evaluated (evaluate caps at max_prompts): the first three records count.
  correct = np.array([[1, 1, 0, 0], [0, 0, 0, 1], [1, 1, 1, 1]], bool)
  got = evaluate.pass_at_1_by_source(pool, correct)
  assert got == {"far": 0.25, "near": (0.5 + 1.0) / 2}

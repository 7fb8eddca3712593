"""Tests of dypo_jax.rl.grading: grading truth table, fractions, teacher draw."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.rl import grading


def test_grade_constants():
  assert (grading.EASY, grading.MID, grading.HARD) == (0, 1, 2)
  assert grading.GRADE_NAMES[grading.EASY] == "easy"
  assert grading.GRADE_NAMES[grading.MID] == "mid"
  assert grading.GRADE_NAMES[grading.HARD] == "hard"


@pytest.mark.parametrize("k", [2, 8, 16])
@pytest.mark.parametrize("as_jax", [False, True])
def test_grade_truth_table(k, as_jax):
  one_right = np.zeros(k)
  one_right[k - 1] = 1
  one_wrong = np.ones(k)
  one_wrong[0] = 0
  half = (np.arange(k) % 2).astype(np.float64)
  rewards = np.stack([np.zeros(k), np.ones(k), one_right, one_wrong, half]).astype(np.float32)
  want = [grading.HARD, grading.EASY, grading.MID, grading.MID, grading.MID]
  got = grading.grade(jnp.asarray(rewards) if as_jax else rewards)
  assert isinstance(got, jax.Array) == as_jax
  assert got.dtype == np.int32 and got.shape == (5,)
  np.testing.assert_array_equal(np.asarray(got), want)


def test_grade_int_rewards_and_jit():
  rewards = np.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], np.int32)
  np.testing.assert_array_equal(grading.grade(rewards), [grading.EASY, grading.HARD, grading.MID])
  got = jax.jit(grading.grade)(jnp.asarray(rewards))
  np.testing.assert_array_equal(got, [grading.EASY, grading.HARD, grading.MID])
  with pytest.raises(ValueError, match="rewards"):
    grading.grade(np.zeros(4))


def test_grade_fractions():
  grades = np.array([grading.EASY, grading.HARD, grading.HARD, grading.MID, grading.HARD])
  for g in (grades, jnp.asarray(grades)):
    fr = grading.grade_fractions(g)
    assert set(fr) == {"easy_frac", "mid_frac", "hard_frac"}
    np.testing.assert_allclose([fr["easy_frac"], fr["mid_frac"], fr["hard_frac"]],
                               [0.2, 0.2, 0.6], rtol=1e-6)
  empty = grading.grade_fractions(np.zeros((0,), np.int32))
  assert empty == {"easy_frac": 0.0, "mid_frac": 0.0, "hard_frac": 0.0}


def test_pick_teacher_range_seeded_and_uniform():
  num = jnp.array([3, 0, 1, 5, 2, 0])
  a = grading.pick_teacher(jax.random.key(0), num)
  b = jax.jit(grading.pick_teacher)(jax.random.key(0), num)
  np.testing.assert_array_equal(a, b)  # Same key, same draw (jit or not).
  assert a.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(a)[[1, 5]], [-1, -1])
  assert int(a[2]) == 0
  assert bool(jnp.all((a >= 0) & (a < num) | (num == 0)))
  # Uniformity: 8000 prompts with 4 teachers each -> each index ~2000 (sd ~39).
  draws = grading.pick_teacher(jax.random.key(1), jnp.full((8000,), 4))
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts.shape == (4,) and np.all(np.abs(counts - 2000) < 200), counts
  other = grading.pick_teacher(jax.random.key(2), jnp.full((8000,), 4))
  assert not np.array_equal(np.asarray(draws), np.asarray(other))

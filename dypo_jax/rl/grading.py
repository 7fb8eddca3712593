"""Dynamic difficulty grading (METHOD.md §1), plus the uniform teacher draw.

Legend: B prompts, K samples per prompt.

A prompt's grade is read from the binary correctness of its K samples: all correct → EASY,
none correct → HARD, otherwise MID; where each grade goes under each method is `routing`'s.
`grade` and `grade_fractions` accept numpy arrays (host code; they then return numpy) or jax
arrays (inside jit).
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

EASY = 0
MID = 1
HARD = 2
GRADE_NAMES = ("easy", "mid", "hard")  # Indexed by grade.


def _xp(x: Any):
  """numpy for numpy inputs (and Python scalars/lists), jax.numpy otherwise."""
  return jnp if isinstance(x, jax.Array) else np


def grade(rewards: Any) -> Any:
  """[B] int32 grades from [B, K] binary rewards (a reward > 0.5 counts as correct).

  s = Σ_k correct: s == K → EASY, s == 0 → HARD, else MID.
  """
  xp = _xp(rewards)
  rewards = xp.asarray(rewards)
  if rewards.ndim != 2:
    raise ValueError(f"grade: rewards must be [B, K], got shape {rewards.shape}")
  num_correct = xp.sum(rewards > 0.5, axis=-1)  # [B]
  k = rewards.shape[-1]
  grades = xp.where(num_correct == k, EASY, xp.where(num_correct == 0, HARD, MID))
  return grades.astype(xp.int32)


def grade_fractions(grades: Any) -> dict[str, Any]:
  """{easy_frac, mid_frac, hard_frac} of a [B] array of grades (all 0 when B == 0)."""
  xp = _xp(grades)
  grades = xp.asarray(grades)
  total = max(grades.size, 1)
  return {f"{name}_frac": xp.sum(grades == g) / total for g, name in enumerate(GRADE_NAMES)}


def pick_teacher(rng: jax.Array, num_teachers: jax.Array) -> jax.Array:
  """[B] int32 teacher index, uniform in [0, num_teachers[b]); -1 where num_teachers[b] == 0.

  Args:
    rng: a jax PRNG key.
    num_teachers: [B] int number of teacher traces each prompt carries.
  """
  num_teachers = jnp.asarray(num_teachers, jnp.int32)
  if num_teachers.ndim != 1:
    raise ValueError(f"pick_teacher: num_teachers must be [B], got shape {num_teachers.shape}")
  idx = jax.random.randint(rng, num_teachers.shape, 0, jnp.maximum(num_teachers, 1),
                           dtype=jnp.int32)
  return jnp.where(num_teachers > 0, idx, -1)

"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of which c are correct, the probability that a random k-subset holds at least one
correct sample is

    pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i),

computed in the product form, which never forms the huge binomials. pass@1 reduces to c / n.
"""
from collections.abc import Sequence

import numpy as np


def pass_at_k_array(correct: np.ndarray, k: int) -> np.ndarray:
  """pass@k per prompt: `correct` [P, n] bool (sample j of prompt p correct) -> [P] float64."""
  correct = np.asarray(correct)
  if correct.ndim != 2:
    raise ValueError(f"pass_at_k_array: correct must be [P, n], got shape {correct.shape}")
  n = correct.shape[1]
  if not 1 <= k <= n:
    raise ValueError(f"pass_at_k_array: k must be in [1, n={n}], got k={k}")
  c = correct.astype(bool).sum(axis=1)  # [P]
  # Factor (1 - k / i) for i = n - c + 1 .. n, i.e. the top c of i = 1..n; 1 elsewhere.
  i = np.arange(1, n + 1, dtype=np.float64)  # [n]
  in_range = i[None, :] > (n - c)[:, None]  # [P, n]
  factors = np.where(in_range, 1.0 - k / i[None, :], 1.0)
  return 1.0 - np.prod(factors, axis=1)


def summarize(correct: np.ndarray, ks: Sequence[int] = (1,)) -> dict[str, float]:
  """Mean over prompts of pass@k for each k in `ks`: {"pass@1": ..., "pass@k": ...}.

  `correct` is [P, n] bool; "pass@1" (always included) is the mean correctness over all samples.
  Also returns "num_prompts" and "num_samples" (n per prompt).
  """
  correct = np.asarray(correct)
  if correct.ndim != 2 or correct.shape[0] == 0:
    raise ValueError(f"summarize: correct must be [P, n] with P >= 1, got shape {correct.shape}")
  out = {"pass@1": float(correct.astype(bool).mean())}
  for k in ks:
    out[f"pass@{k}"] = float(pass_at_k_array(correct, int(k)).mean())
  out["num_prompts"] = float(correct.shape[0])
  out["num_samples"] = float(correct.shape[1])
  return out

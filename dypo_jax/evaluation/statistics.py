"""Statistics for studies: bootstrap intervals, paired differences, and the spread of gradient
estimates.

All functions are pure numpy. Intervals are percentile bootstrap intervals: resample the units
(seeds, prompts) with replacement, take the statistic of each resample, and read the interval
off its quantiles. With few units (5 seeds) a percentile interval is too narrow (its coverage
is ~85-90% at n = 5 for a normal population), so studies print the unit count beside it.
"""
import dataclasses

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "GradientSpread", "gradient_spread",
           "spread_from_gram", "resample_rounds", "resampled_relative_variance",
           "percentile_interval"]


@dataclasses.dataclass(frozen=True)
class Interval:
  """A point estimate with a `confidence` interval [low, high] from `n` units."""
  mean: float
  low: float
  high: float
  n: int
  confidence: float

  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0

  def format(self, scale: float = 1.0, digits: int = 1) -> str:
    """"m [lo, hi]" with every figure times `scale` (100 for percentages)."""
    f = lambda v: f"{v * scale:.{digits}f}"
    if self.n < 2:
      return f(self.mean)
    return f"{f(self.mean)} [{f(self.low)}, {f(self.high)}]"


def _as_units(values, name: str) -> np.ndarray:
  x = np.asarray(values, np.float64)
  if x.ndim != 1:
    raise ValueError(f"{name}: want a 1-D array of per-unit values, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: values must be finite, got {x.tolist()}")
  return x


def bootstrap_mean(values, *, confidence: float = 0.95, resamples: int = 10_000,
                   seed: int = 0) -> Interval:
  """The mean of per-unit `values` [n] and its percentile bootstrap interval.

  With one unit the interval is the point itself (nothing to resample).
  """
  x = _as_units(values, "bootstrap_mean")
  if not 0 < confidence < 1:
    raise ValueError(f"bootstrap_mean: confidence={confidence} must be in (0, 1)")
  if x.size == 0:
    raise ValueError("bootstrap_mean: no values")
  mean = float(x.mean())
  if x.size == 1:
    return Interval(mean, mean, mean, 1, confidence)
  rng = np.random.default_rng(seed)
  means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
  return percentile_interval(mean, means, units=x.size, confidence=confidence)


def paired_difference(values, baseline, *, confidence: float = 0.95, resamples: int = 10_000,
                      seed: int = 0) -> Interval:
  """Mean of `values - baseline` over paired units (same seed, same prompts) with its interval.

  Pairing removes what the two share (a seed's base model, its prompt stream), so the interval
  reflects only how the difference itself varies between units.
  """
  a, b = _as_units(values, "paired_difference"), _as_units(baseline, "paired_difference")
  if a.shape != b.shape:
    raise ValueError(f"paired_difference: {a.size} values against {b.size} baseline values; "
                     "pairs need one of each per unit")
  return bootstrap_mean(a - b, confidence=confidence, resamples=resamples, seed=seed)


@dataclasses.dataclass(frozen=True)
class GradientSpread:
  """How R independent estimates g_1..g_R of one gradient E g spread.

  relative_variance = tr(Cov g) / ‖E g‖², with tr(Cov) unbiased (ddof = 1) and ‖E g‖² estimated
  without bias as ‖ḡ‖² - tr(Cov) / R (floored at a tiny positive value: when the estimates are
  all noise the ratio is reported huge, not negative). mean_cosine is the mean cosine between
  distinct estimates; mean_norm the mean ‖g_r‖.
  """
  relative_variance: float
  trace_cov: float
  mean_sq_norm: float  # Unbiased ‖E g‖².
  mean_cosine: float
  mean_norm: float
  num_estimates: int


def gradient_spread(estimates) -> GradientSpread:
  """The spread of R gradient estimates, given as [R, D] or as their Gram matrix via R x R.

  Args:
    estimates: [R, D] array of flattened gradient estimates (R >= 2).
  """
  g = np.asarray(estimates, np.float64)
  if g.ndim != 2 or g.shape[0] < 2:
    raise ValueError(f"gradient_spread: want [R >= 2, D] estimates, got shape {g.shape}")
  return spread_from_gram(g @ g.T)


def _cov_and_mean_sq(grams: np.ndarray, distinct=None) -> tuple[np.ndarray, np.ndarray]:
  """tr(Cov g) and the unbiased ‖E g‖² of each [B, R, R] Gram matrix: two arrays [B].

  E‖g‖² is the mean of the diagonal and ‖E g‖² the mean inner product of two independent
  estimates (off the diagonal, or where `distinct` [B, R, R] marks pairs of distinct estimates:
  a bootstrap resample repeats some, and a repeat paired with itself is not independent).
  """
  r = grams.shape[-1]
  if distinct is None:
    distinct = np.broadcast_to(~np.eye(r, dtype=bool), grams.shape)
  mean_of_sq = np.einsum("brr->b", grams) / r
  # Clamped: with noise far above the signal, the estimate of ‖E g‖² can go below 0.
  pairs = distinct.sum(axis=(1, 2))
  with np.errstate(invalid="ignore", divide="ignore"):  # No distinct pair: NaN, dropped later.
    mean_sq = np.maximum((grams * distinct).sum(axis=(1, 2)) / pairs, 1e-30)
  return mean_of_sq - mean_sq, mean_sq


def resample_rounds(num_estimates: int, *, resamples: int = 2000, seed: int = 0) -> np.ndarray:
  """Bootstrap index sets [resamples, R] over R estimates; share them to pair two terms."""
  return np.random.default_rng(seed).integers(0, num_estimates, (resamples, num_estimates))


def resampled_relative_variance(gram, indices: np.ndarray) -> np.ndarray:
  """The relative variance of every bootstrap resample `indices` [B, R] of the estimates: [B].

  Resampling whole estimates (rounds) keeps what one round's terms share, so two terms measured
  on the same rounds and resampled with the same `indices` give a paired ratio.
  """
  gram = np.asarray(gram, np.float64)
  distinct = indices[:, :, None] != indices[:, None, :]
  trace_cov, mean_sq = _cov_and_mean_sq(gram[indices[:, :, None], indices[:, None, :]], distinct)
  return trace_cov / mean_sq


def percentile_interval(point: float, samples, *, units: int,
                        confidence: float = 0.95) -> Interval:
  """`point` with the percentile interval of its bootstrap `samples` [B], resampled from `units`
  units (seeds, rounds)."""
  samples = np.asarray(samples, np.float64)
  samples = samples[np.isfinite(samples)]  # A resample of one repeated estimate has no spread.
  if samples.size == 0:
    return Interval(float(point), float(point), float(point), 1, confidence)
  tail = (1 - confidence) / 2
  low, high = np.quantile(samples, [tail, 1 - tail])
  return Interval(float(point), float(low), float(high), int(units), confidence)


def spread_from_gram(gram) -> GradientSpread:
  """`gradient_spread` from the Gram matrix G[r, s] = <g_r, g_s> of R estimates (R >= 2).

  Every figure is a function of inner products, so a study can accumulate G over parameter
  chunks instead of holding every estimate at once.
  """
  gram = np.asarray(gram, np.float64)
  r = gram.shape[0]
  if gram.shape != (r, r) or r < 2:
    raise ValueError(f"spread_from_gram: want an R x R Gram matrix with R >= 2, got {gram.shape}")
  sq_norms = np.diag(gram)
  trace_cov, mean_sq = (float(v[0]) for v in _cov_and_mean_sq(gram[None]))
  norms = np.sqrt(np.maximum(sq_norms, 0.0))
  safe = np.where(norms > 0, norms, 1.0)
  cos = gram / safe[:, None] / safe[None, :]
  off_diagonal = ~np.eye(r, dtype=bool)
  return GradientSpread(
      relative_variance=trace_cov / mean_sq, trace_cov=trace_cov, mean_sq_norm=mean_sq,
      mean_cosine=float(cos[off_diagonal].mean()), mean_norm=float(norms.mean()),
      num_estimates=r)

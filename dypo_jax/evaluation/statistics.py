"""Statistics for studies: t intervals, sign tests, detectable differences and verdicts over
seeds; bootstrap intervals; the spread of gradient estimates.

All functions are pure numpy (and `math`). A study calls a difference between two methods from
the Student-t interval of its paired per-seed differences (`t_paired_difference`), which covers
95% at any n for normal differences; the percentile bootstrap (`bootstrap_mean`,
`paired_difference`) resamples the units, and with few of them it is too narrow (on normal data
it covers ~77% at n = 3 and ~82% at n = 5), so it is a second column only. `sign_test` is the
exact two-sided sign test ("5 of 5 seeds" is p = 0.0625), `detectable_difference` the smallest
true paired difference a t test at the observed spread finds with 80% power, and `verdict` reads
one comparison against the direction a paper claims.
"""
import dataclasses
import functools
import math

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "GradientSpread", "gradient_spread",
           "spread_from_gram", "resample_rounds", "resampled_relative_variance",
           "percentile_interval", "t_cdf", "t_quantile", "t_bounds", "t_mean",
           "t_paired_difference", "sign_test", "t_test_power", "detectable_difference",
           "Verdict", "verdict"]


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
  """Mean of `values - baseline` over paired units (same seed, same prompts) with its percentile
  bootstrap interval (too narrow at few units: call differences by `t_paired_difference`).

  Pairing removes what the two share (a seed's base model, its prompt stream), so the interval
  reflects only how the difference itself varies between units.
  """
  return bootstrap_mean(_pairs(values, baseline, "paired_difference"), confidence=confidence,
                        resamples=resamples, seed=seed)


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


# ------------------------------------------------------------------ Student t over few units


def _betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b), by its continued fraction.

  The fraction converges fast for x < (a + 1) / (a + b + 2); above that the symmetry
  I_x(a, b) = 1 - I_{1-x}(b, a) moves x below it. The fraction is evaluated by the modified
  Lentz method (each convergent as a ratio of two running products, kept off 0 by `tiny`).
  """
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  if x > (a + 1) / (a + b + 2):
    return 1.0 - _betainc(b, a, 1.0 - x)
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  tiny, eps = 1e-300, 1e-15
  c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  frac = d
  for m in range(1, 1000):
    for coef in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),  # The even step d_{2m},
                 -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # the odd one.
      d = 1.0 + coef * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + coef / c
      c = c if abs(c) > tiny else tiny
      frac *= c * d
    if abs(c * d - 1.0) < eps:
      break
  return math.exp(log_front) * frac / a


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with `df` degrees of freedom.

  P(|T| > |t|) = I_{df / (df + t²)}(df / 2, 1 / 2), halved for one tail.
  """
  if df <= 0:
    raise ValueError(f"t_cdf: df={df} must be > 0")
  tail = 0.5 * _betainc(df / 2, 0.5, df / (df + t * t))
  return 1.0 - tail if t > 0 else tail


@functools.lru_cache(maxsize=None)
def t_quantile(p: float, df: float) -> float:
  """The t with P(T <= t) = p for Student's t with `df` degrees of freedom (bisection on t_cdf,
  to 1e-12)."""
  if not 0 < p < 1:
    raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
  if df <= 0:
    raise ValueError(f"t_quantile: df={df} must be > 0")
  if p < 0.5:
    return -t_quantile(1 - p, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < p:  # t_{.9995, 1} is 637: a few doublings.
    lo, hi = hi, 2 * hi
  while hi - lo > 1e-12 * max(1.0, hi):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
  return (lo + hi) / 2


def t_bounds(x, *, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean, low, high) of the t interval of each row of `x` [..., n] (n >= 2 units a row).

  mean ± t_{(1 + confidence) / 2, n - 1} · sd / √n with the sample sd (ddof = 1). Vectorised,
  so a simulation of many studies is one call.
  """
  x = np.asarray(x, np.float64)
  n = x.shape[-1]
  if n < 2:
    raise ValueError(f"t_bounds: want n >= 2 units a row, got shape {x.shape}")
  if not 0 < confidence < 1:
    raise ValueError(f"t_bounds: confidence={confidence} must be in (0, 1)")
  mean = x.mean(axis=-1)
  half = t_quantile((1 + confidence) / 2, n - 1) * x.std(axis=-1, ddof=1) / math.sqrt(n)
  return mean, mean - half, mean + half


def t_mean(values, *, confidence: float = 0.95) -> Interval:
  """The mean of per-unit `values` [n] with its Student-t interval (the point itself at n = 1)."""
  x = _as_units(values, "t_mean")
  if x.size == 0:
    raise ValueError("t_mean: no values")
  if x.size == 1:
    return Interval(float(x[0]), float(x[0]), float(x[0]), 1, confidence)
  mean, low, high = (float(v) for v in t_bounds(x, confidence=confidence))
  return Interval(mean, low, high, int(x.size), confidence)


def _pairs(values, baseline, name: str) -> np.ndarray:
  a, b = _as_units(values, name), _as_units(baseline, name)
  if a.shape != b.shape:
    raise ValueError(f"{name}: {a.size} values against {b.size} baseline values; pairs need one "
                     "of each per unit")
  return a - b


def t_paired_difference(values, baseline, *, confidence: float = 0.95) -> Interval:
  """Mean of `values - baseline` over paired units with its Student-t interval: the paired t
  test's interval, which excludes 0 exactly when that test rejects at 1 - confidence."""
  return t_mean(_pairs(values, baseline, "t_paired_difference"), confidence=confidence)


def sign_test(values, baseline=None) -> float:
  """The exact two-sided sign-test p-value of paired differences `values - baseline` (or of
  `values` themselves): 2 P(X <= min(#pos, #neg)), X ~ Binomial(#nonzero, 1/2), at most 1.

  Ties (zero differences) carry no sign and are dropped, the usual convention. 5 of 5 on one
  side gives 2 / 32 = 0.0625: no count of 5 seeds reaches p < 0.05.
  """
  d = _as_units(values, "sign_test") if baseline is None else _pairs(values, baseline,
                                                                     "sign_test")
  pos, neg = int((d > 0).sum()), int((d < 0).sum())
  m = pos + neg
  if m == 0:
    return 1.0
  tail = sum(math.comb(m, i) for i in range(min(pos, neg) + 1)) / 2.0**m
  return min(1.0, 2.0 * tail)


def _normal_cdf(z: np.ndarray) -> np.ndarray:
  return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(z) / math.sqrt(2.0)))


def t_test_power(shift: float, n: int, *, alpha: float = 0.05) -> float:
  """The power of the two-sided one-sample (paired) t test at level `alpha` with `n` units when
  the true mean is `shift` population sds away from 0.

  T = (Z + δ) / √(V / df) with Z normal, V ~ χ²_df, δ = shift·√n: the test rejects when |T| > c,
  so power = E_V[Φ(δ - c√(V/df)) + Φ(-δ - c√(V/df))], integrated over the χ distribution of √V
  (no singularity at 0 for any df) on a fine grid: the exact noncentral-t power to ~1e-6.
  """
  if n < 2:
    raise ValueError(f"t_test_power: n={n}; a t test needs n >= 2 units")
  df = n - 1
  c = t_quantile(1 - alpha / 2, df)
  u = np.linspace(0.0, math.sqrt(df) + 12.0, 6001)[1:]  # u = √V; its density is gone by +12.
  log_density = ((df - 1) * np.log(u) - u * u / 2 - (df / 2 - 1) * math.log(2)
                 - math.lgamma(df / 2))
  density = np.exp(log_density)
  delta, s = shift * math.sqrt(n), c * u / math.sqrt(df)
  reject = _normal_cdf(delta - s) + _normal_cdf(-delta - s)
  return float(np.sum(reject * density) * (u[1] - u[0]))


@functools.lru_cache(maxsize=None)
def _detectable_shift(n: int, alpha: float, power: float) -> float:
  lo, hi = 0.0, 1.0
  while t_test_power(hi, n, alpha=alpha) < power:
    lo, hi = hi, 2 * hi
  for _ in range(60):
    mid = (lo + hi) / 2
    lo, hi = (mid, hi) if t_test_power(mid, n, alpha=alpha) < power else (lo, mid)
  return (lo + hi) / 2


def detectable_difference(values, baseline=None, *, alpha: float = 0.05,
                          power: float = 0.8) -> float:
  """The minimum detectable difference of a paired comparison: the true mean difference that a
  two-sided paired t test at level `alpha` over these many units finds with probability `power`,
  taking the observed sd of the differences as the true one (exact noncentral-t power).

  A comparison that is not decided says how large an effect it could have missed: at the default
  levels 3.26 sds of the paired differences at n = 3, 1.68 at n = 5, 1.16 at n = 8. NaN with
  fewer than 2 pairs.
  """
  d = _as_units(values, "detectable_difference") if baseline is None else _pairs(
      values, baseline, "detectable_difference")
  if d.size < 2:
    return float("nan")
  if not (0 < alpha < 1 and 0 < power < 1):
    raise ValueError(f"detectable_difference: alpha={alpha} and power={power} must be in (0, 1)")
  return _detectable_shift(int(d.size), float(alpha), float(power)) * float(d.std(ddof=1))


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One comparison read against a claim.

  label: "decided" (the t interval excludes 0 on the claimed side, or on either side when
  nothing is claimed), "reversed" (it excludes 0 on the side opposite the claim) or "not
  decided" (it contains 0); effect: the sign of the mean difference when decided or reversed,
  else 0; detectable: the minimum detectable difference (NaN below 2 units).
  """
  label: str
  effect: int
  detectable: float

  def format(self, scale: float = 1.0, digits: int = 1) -> str:
    if self.label == "not decided":
      return (f"not decided (detectable ±{self.detectable * scale:.{digits}f})"
              if math.isfinite(self.detectable) else "not decided (one unit)")
    return f"{self.label} ({'+' if self.effect > 0 else '−'})"


def verdict(difference: Interval, *, claim: int = 0,
            detectable: float = float("nan")) -> Verdict:
  """The verdict on a paired `difference` (a t interval) against `claim`: the sign the paper
  says the difference has (+1, -1), or 0 for no direction claimed."""
  if claim not in (-1, 0, 1):
    raise ValueError(f"verdict: claim={claim} must be -1, 0 or +1")
  if difference.n < 2 or not difference.excludes_zero():
    return Verdict("not decided", 0, detectable)
  effect = 1 if difference.low > 0 else -1
  return Verdict("reversed" if claim and effect != claim else "decided", effect, detectable)

"""The study statistics on synthetic data whose answers are known."""
import numpy as np
import pytest

from dypo_jax.evaluation import statistics


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time():
  rng = np.random.default_rng(0)
  trials, covered = 400, 0
  for t in range(trials):
    x = rng.normal(3.0, 2.0, size=40)
    iv = statistics.bootstrap_mean(x, resamples=2000, seed=t)
    covered += iv.low <= 3.0 <= iv.high
    assert iv.low <= iv.mean <= iv.high and iv.mean == pytest.approx(x.mean())
  # Percentile bootstrap at n = 40: coverage a little under 95%; 400 trials give ±2.2% (2 sd).
  assert 0.90 <= covered / trials <= 0.98


def test_interval_width_shrinks_like_one_over_root_n():
  rng = np.random.default_rng(1)
  small = statistics.bootstrap_mean(rng.normal(0, 1, 25))
  large = statistics.bootstrap_mean(rng.normal(0, 1, 2500))
  # Half-width ~ 1.96 / sqrt(n): 0.39 and 0.039.
  assert (small.high - small.low) / 2 == pytest.approx(1.96 / 5, rel=0.3)
  assert (large.high - large.low) / 2 == pytest.approx(1.96 / 50, rel=0.1)


def test_one_unit_is_its_own_interval_and_bad_input_is_named():
  iv = statistics.bootstrap_mean([0.25])
  assert (iv.mean, iv.low, iv.high, iv.n) == (0.25, 0.25, 0.25, 1)
  assert iv.format(100) == "25.0"
  with pytest.raises(ValueError, match="finite"):
    statistics.bootstrap_mean([0.1, float("nan")])
  with pytest.raises(ValueError, match="no values"):
    statistics.bootstrap_mean([])
  with pytest.raises(ValueError, match="3 values against 2"):
    statistics.paired_difference([1, 2, 3], [1, 2])


def test_pairing_removes_the_shared_seed_effect():
  """Methods A and B differ by exactly 0.02 on every seed, and seeds differ by ~0.1: the paired
  interval is tight around 0.02 and excludes 0; the unpaired intervals overlap."""
  rng = np.random.default_rng(2)
  seed_effect = rng.normal(0.5, 0.1, size=6)
  b = seed_effect + rng.normal(0, 0.002, size=6)
  a = b + 0.02
  diff = statistics.paired_difference(a, b)
  assert diff.mean == pytest.approx(0.02)
  assert diff.excludes_zero() and diff.high - diff.low < 1e-9
  ia, ib = statistics.bootstrap_mean(a), statistics.bootstrap_mean(b)
  assert ia.low < ib.high  # Unpaired, the difference would not be resolved.
  noisy = statistics.paired_difference(b + rng.normal(0, 0.05, 6), b)
  assert not noisy.excludes_zero()


def test_relative_variance_of_a_known_distribution():
  """g = mu + sigma * eps in D dims: tr(Cov) = D sigma², ‖E g‖² = ‖mu‖², and for large D the
  cosine of two independent draws is ‖mu‖² / (‖mu‖² + D sigma²)."""
  rng = np.random.default_rng(3)
  d, r, sigma = 4000, 64, 0.05
  mu = rng.normal(0, 1, d) / np.sqrt(d)  # ‖mu‖ ~ 1.
  g = mu + sigma * rng.normal(size=(r, d))
  s = statistics.gradient_spread(g)
  want_trace, want_sq = d * sigma**2, float(mu @ mu)
  assert s.trace_cov == pytest.approx(want_trace, rel=0.05)
  assert s.mean_sq_norm == pytest.approx(want_sq, rel=0.05)
  assert s.relative_variance == pytest.approx(want_trace / want_sq, rel=0.08)
  assert s.mean_cosine == pytest.approx(want_sq / (want_sq + want_trace), abs=0.02)
  assert s.mean_norm == pytest.approx(np.sqrt(want_sq + want_trace), rel=0.02)
  assert s.num_estimates == r


def test_relative_variance_is_scale_free_and_the_gram_form_agrees():
  rng = np.random.default_rng(4)
  g = rng.normal(1.0, 3.0, size=(32, 50))
  a, b = statistics.gradient_spread(g), statistics.gradient_spread(1000 * g)
  assert b.relative_variance == pytest.approx(a.relative_variance)
  assert b.mean_cosine == pytest.approx(a.mean_cosine)
  chunked = statistics.spread_from_gram(g[:, :20] @ g[:, :20].T + g[:, 20:] @ g[:, 20:].T)
  assert chunked.relative_variance == pytest.approx(a.relative_variance)


def test_pure_noise_has_huge_relative_variance_and_cosine_near_zero():
  g = np.random.default_rng(5).normal(size=(40, 2000))
  s = statistics.gradient_spread(g)
  assert s.relative_variance > 50 and abs(s.mean_cosine) < 0.01
  with pytest.raises(ValueError, match="R >= 2"):
    statistics.gradient_spread(g[:1])


def test_bootstrap_over_rounds_covers_the_true_relative_variance():
  """Resampling whole rounds (repeats never paired with themselves) covers tr(Cov)/‖E g‖² of a
  known distribution in about 95% of studies of R = 32 rounds."""
  rng = np.random.default_rng(6)
  d, r, trials, hits = 300, 32, 100, 0
  for t in range(trials):
    mu = rng.normal(size=d) / np.sqrt(d)
    g = mu + np.sqrt(3.0 / d) * rng.normal(size=(r, d))  # relative variance ~3, like real terms.
    truth = 3.0 / float(mu @ mu)
    gram = g @ g.T
    samples = statistics.resampled_relative_variance(
        gram, statistics.resample_rounds(r, resamples=500, seed=t))
    iv = statistics.percentile_interval(statistics.spread_from_gram(gram).relative_variance,
                                        samples, units=r)
    hits += iv.low <= truth <= iv.high
  assert 0.88 <= hits / trials <= 1.0


def test_paired_ratio_over_shared_rounds():
  """A term and a scaled copy have relative-variance ratio exactly 1 in every resample; a term
  with extra independent noise has a ratio whose interval lies above 1."""
  rng = np.random.default_rng(7)
  g = rng.normal(size=200) / 14 + 0.1 * rng.normal(size=(32, 200))
  noisier = g + 0.2 * rng.normal(size=g.shape)
  idx = statistics.resample_rounds(32, resamples=500)
  base = statistics.resampled_relative_variance(g @ g.T, idx)
  same = statistics.resampled_relative_variance((5 * g) @ (5 * g).T, idx)
  np.testing.assert_allclose(same / base, 1.0, rtol=1e-9)
  more = statistics.resampled_relative_variance(noisier @ noisier.T, idx)
  assert statistics.percentile_interval(1.0, more / base, units=32).low > 1.5

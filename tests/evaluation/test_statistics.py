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


# ------------------------------------------------------------------ Student t, sign test, power


@pytest.mark.parametrize("df,want", [(1, 12.706), (2, 4.303), (4, 2.776), (7, 2.365),
                                     (30, 2.042)])
def test_t_quantile_matches_the_printed_table(df, want):
  """t_{0.975, df} as printed in every t table (to 3 decimals)."""
  assert statistics.t_quantile(0.975, df) == pytest.approx(want, abs=5e-4)
  assert statistics.t_quantile(0.025, df) == pytest.approx(-want, abs=5e-4)
  assert statistics.t_cdf(statistics.t_quantile(0.9, df), df) == pytest.approx(0.9, abs=1e-10)


def test_t_cdf_closed_forms():
  """df = 1 is the Cauchy: F(t) = 1/2 + atan(t)/π; df = 2: F(t) = 1/2 + t / (2√(2 + t²))."""
  for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
    assert statistics.t_cdf(t, 1) == pytest.approx(0.5 + np.arctan(t) / np.pi, abs=1e-12)
    assert statistics.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * np.sqrt(2 + t * t)), abs=1e-12)


@pytest.mark.parametrize("n", [3, 5, 8])
def test_paired_t_interval_covers_95_percent_on_normal_data(n):
  """20,000 simulated studies of n paired seeds (seed effect shared by both methods, true
  difference 0.03): the t interval of the paired differences covers 0.03 in 95% ± 2 of them.
  The binomial sd of the coverage is 0.15%, so ±2 points is a real check: the interval with the
  normal quantile 1.96 in place of t's covers ~82% at n = 3 and fails it (asserted), as does
  the percentile bootstrap (82% at n = 5, 77% at n = 3)."""
  rng = np.random.default_rng(10 + n)
  sims, truth = 20_000, 0.03
  seed_effect = rng.normal(0.5, 0.1, size=(sims, n))
  baseline = seed_effect + rng.normal(0, 0.02, size=(sims, n))
  values = seed_effect + truth + rng.normal(0, 0.02, size=(sims, n))
  _, low, high = statistics.t_bounds(values - baseline)
  coverage = np.mean((low <= truth) & (truth <= high))
  assert 0.93 <= coverage <= 0.97, coverage
  # The vectorised bounds are the per-study interval.
  one = statistics.t_paired_difference(values[0], baseline[0])
  assert (one.low, one.high, one.n) == (pytest.approx(low[0]), pytest.approx(high[0]), n)
  if n == 3:
    d = values - baseline
    half = 1.96 * d.std(axis=1, ddof=1) / np.sqrt(n)
    z_coverage = np.mean(np.abs(d.mean(axis=1) - truth) <= half)
    assert z_coverage < 0.90, z_coverage


@pytest.mark.parametrize("pos,neg,want", [(5, 0, 0.0625), (0, 5, 0.0625), (4, 1, 0.375),
                                          (8, 0, 2 / 256), (7, 1, 18 / 256), (3, 3, 1.0),
                                          (1, 0, 1.0)])
def test_sign_test_exact_values(pos, neg, want):
  """2 P(X <= min) for X ~ Binomial(pos + neg, 1/2): 5 of 5 is 2/32, 7 of 8 is 2·9/256."""
  d = [0.01] * pos + [-0.02] * neg + [0.0, 0.0]  # Ties carry no sign and are dropped.
  assert statistics.sign_test(d) == pytest.approx(want)
  assert statistics.sign_test(np.array(d) + 1, np.ones(len(d))) == pytest.approx(want)
  assert statistics.sign_test([0.0, 0.0]) == 1.0


def test_detectable_difference_has_the_stated_power():
  """Take one study's paired differences; simulate 20,000 studies whose differences are normal
  with that study's sd: at a true mean of its detectable difference the paired t test rejects in
  80% of them, at 0 in 5% (±1.2 points, 2 sd at 20,000). n = 8's is the textbook noncentral-t
  figure δ√n / sd = 3.27."""
  rng = np.random.default_rng(20)
  for n in (3, 5, 8):
    observed = rng.normal(0.02, 0.04, n)
    sd, mdd = observed.std(ddof=1), statistics.detectable_difference(observed)
    assert mdd == pytest.approx(statistics.detectable_difference(observed + 5, np.full(n, 5.0)))
    for true_mean, want in ((0.0, 0.05), (mdd, 0.80)):
      _, low, high = statistics.t_bounds(rng.normal(true_mean, sd, size=(20_000, n)))
      assert np.mean((low > 0) | (high < 0)) == pytest.approx(want, abs=0.012), (n, true_mean)
  x = np.arange(8.0)
  assert statistics.detectable_difference(x) == pytest.approx(3.27 * x.std(ddof=1) / np.sqrt(8),
                                                              rel=0.01)
  assert np.isnan(statistics.detectable_difference([0.1]))


def test_verdicts_against_the_claimed_direction():
  up = statistics.t_paired_difference([0.52, 0.61, 0.55, 0.58], [0.50, 0.57, 0.52, 0.55])
  down = statistics.t_paired_difference([0.50, 0.57, 0.52, 0.55], [0.52, 0.61, 0.55, 0.58])
  noisy = statistics.t_paired_difference([0.52, 0.50, 0.60, 0.49], [0.50, 0.57, 0.52, 0.55])
  assert up.excludes_zero() and down.excludes_zero() and not noisy.excludes_zero()
  assert statistics.verdict(up, claim=1).label == "decided"
  assert statistics.verdict(up, claim=0).format() == "decided (+)"
  assert statistics.verdict(down, claim=1).format() == "reversed (−)"
  v = statistics.verdict(noisy, claim=1, detectable=0.0712)
  assert (v.label, v.effect) == ("not decided", 0)
  assert v.format(100) == "not decided (detectable ±7.1)"
  assert statistics.verdict(statistics.t_mean([0.3]), claim=-1).label == "not decided"
  with pytest.raises(ValueError, match="claim=2"):
    statistics.verdict(up, claim=2)


def test_t_interval_bad_input_is_named():
  with pytest.raises(ValueError, match="t_mean: no values"):
    statistics.t_mean([])
  with pytest.raises(ValueError, match="3 values against 2"):
    statistics.t_paired_difference([1, 2, 3], [1, 2])
  with pytest.raises(ValueError, match="finite"):
    statistics.sign_test([0.1, float("inf")])
  assert statistics.t_mean([0.25]).format(100) == "25.0"

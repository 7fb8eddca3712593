"""Numeric tests of dypo_jax.rl.losses.

Golden values are derived by hand in the comments, or recomputed here with plain numpy from the
formula in METHOD.md §2 -- never by calling the function under test.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.rl import losses

AGG_MODES = losses.AGG_MODES


def _softplus(x):
  return math.log1p(math.exp(x))


def _sigmoid(x):
  return 1.0 / (1.0 + math.exp(-x))


# ------------------------------------------------------------------------------------------------
# Advantages and KL.


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_grpo_advantages_match_numpy(scale_by_std):
  rewards = np.array([[1, 0, 0, 1, 1, 0, 0, 0],
                      [1, 1, 1, 1, 1, 1, 1, 1],  # All equal: centred 0, std 0 -> advantage 0.
                      [0.5, 0, 1, 0, 0, 0, 0, 0.2]], np.float32)
  centred = rewards - rewards.mean(axis=1, keepdims=True)
  want = centred / (rewards.std(axis=1, ddof=1, keepdims=True) + 1e-6) if scale_by_std else centred
  got = losses.grpo_advantages(jnp.asarray(rewards), scale_by_std=scale_by_std)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_grpo_advantages_hand_value():
  # R = [1, 0]: mean 0.5, unbiased std = sqrt((0.25 + 0.25) / 1) = 0.70711 -> ±0.5 / 0.70711.
  got = losses.grpo_advantages(jnp.array([[1.0, 0.0]]), scale_by_std=True, eps=0.0)
  np.testing.assert_allclose(got, [[0.70710678, -0.70710678]], rtol=1e-6)
  with pytest.raises(ValueError, match="rewards"):
    losses.grpo_advantages(jnp.ones((4,)), scale_by_std=True)


def test_kl_estimators_golden():
  logp = jnp.array([0.0, -1.0, -2.0])
  ref = jnp.array([0.0, -0.5, -3.0])
  # d = [0, -0.5, 1.0]
  np.testing.assert_allclose(losses.kl_penalty(logp=logp, ref_logp=ref, estimator="k1"),
                             [0.0, -0.5, 1.0], atol=1e-7)
  # d²/2 = [0, 0.125, 0.5]
  np.testing.assert_allclose(losses.kl_penalty(logp=logp, ref_logp=ref, estimator="k2"),
                             [0.0, 0.125, 0.5], atol=1e-7)
  # exp(-d) + d - 1 = [0, e^0.5 - 1.5 = 0.1487213, e^-1 = 0.3678794]
  np.testing.assert_allclose(losses.kl_penalty(logp=logp, ref_logp=ref, estimator="k3"),
                             [0.0, 0.1487213, 0.3678794], rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="k4"):
    losses.kl_penalty(logp=logp, ref_logp=ref, estimator="k4")


def test_k3_nonnegative_and_zero_at_equality():
  d = jnp.linspace(-15.0, 15.0, 3001)
  ref = jnp.full_like(d, -2.0)
  k3 = losses.kl_penalty(logp=ref + d, ref_logp=ref, estimator="k3")
  assert bool(jnp.all(k3 >= 0.0))
  same = losses.kl_penalty(logp=ref, ref_logp=ref, estimator="k3")
  np.testing.assert_array_equal(same, np.zeros(d.shape))
  # Near 0, k3 ~ d²/2 (expm1 keeps the small values accurate instead of rounding to 0).
  small = losses.kl_penalty(logp=jnp.array([1e-3]), ref_logp=jnp.array([0.0]), estimator="k3")
  np.testing.assert_allclose(small, [0.5e-6 - 1e-9 / 6], rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# GRPO.

# Hand-built batch: N = 2 sequences, T = 3.
_LOGP = np.array([[-1.0, -0.5, -2.0], [-0.3, -1.2, -0.7]], np.float32)
_OLD = np.array([[-1.0, -0.8, -1.5], [-0.5, -1.2, -0.2]], np.float32)
_REF = np.array([[-1.2, -0.5, -9.0], [-0.3, -1.0, -0.9]], np.float32)
_MASK = np.array([[1, 1, 0], [1, 1, 1]], np.float32)
_ADV = np.array([1.0, -0.5], np.float32)
# ratio ρ = exp(logp - old): row 0 [1, e^0.3 = 1.34986, (masked)]; row 1 [e^0.2 = 1.22140, 1,
# e^-0.5 = 0.60653]. With ε_low = 0.2, ε_high = 0.28 the clip range is [0.8, 1.28]:
#   row 0 (A = 1):    t0 -min(1, 1) = -1;  t1 -min(1.34986, 1.28) = -1.28 (clipped)
#   row 1 (A = -0.5): t0 -min(-0.61070, -0.61070) = 0.61070;  t1 0.5;
#                     t2 -min(-0.30327, 0.8 * -0.5 = -0.4) = 0.4 (clipped)
_PG_TOKEN = np.array([[-1.0, -1.28, 0.0], [0.5 * math.exp(0.2), 0.5, 0.4]])
# d = logp - ref: row 0 [0.2, 0, (masked)]; row 1 [0, -0.2, 0.2].
_D = np.array([[0.2, 0.0, 0.0], [0.0, -0.2, 0.2]])
_KL_TOKEN = {"k1": _D, "k2": _D**2 / 2, "k3": np.exp(-_D) + _D - 1}


def _np_aggregate(per_token, agg_mode, max_len):
  per_token = per_token * _MASK
  if agg_mode == "token-mean":
    return per_token.sum() / _MASK.sum()
  if agg_mode == "seq-mean-token-mean":
    return np.mean(per_token.sum(1) / _MASK.sum(1))
  return per_token.sum() / (2 * max_len)


def _grpo(agg_mode, estimator="k3", kl_coef=0.0, max_len=None, **kwargs):
  return losses.grpo_loss(
      logp=jnp.asarray(_LOGP), old_logp=jnp.asarray(_OLD), ref_logp=jnp.asarray(_REF),
      advantages=jnp.asarray(_ADV), mask=jnp.asarray(_MASK), clip_low=0.2, clip_high=0.28,
      kl_coef=kl_coef, kl_estimator=estimator, agg_mode=agg_mode, max_len=max_len, **kwargs)


def test_grpo_loss_hand_golden_token_mean():
  # Σ pg = -1 - 1.28 + 0.61070 + 0.5 + 0.4 = -0.76930 over 5 tokens -> -0.153860.
  loss, metrics = _grpo("token-mean")
  np.testing.assert_allclose(loss, -0.153860, atol=1e-6)
  # seq-mean-token-mean: row means -2.28 / 2 = -1.14 and 1.51070 / 3 = 0.50357 -> -0.318216.
  loss, _ = _grpo("seq-mean-token-mean")
  np.testing.assert_allclose(loss, -0.318216, atol=1e-6)
  # seq-mean-token-sum-norm with L_max = 4: -0.76930 / (2 * 4) = -0.0961625.
  loss, _ = _grpo("seq-mean-token-sum-norm", max_len=4)
  np.testing.assert_allclose(loss, -0.0961625, atol=1e-6)
  # Two of the five tokens take the clipped branch; adv mean (1 - 0.5) / 2.
  np.testing.assert_allclose(metrics["clip_fraction"], 0.4, atol=1e-7)
  ratio_mean = (1 + math.exp(0.3) + math.exp(0.2) + 1 + math.exp(-0.5)) / 5
  np.testing.assert_allclose(metrics["ratio_mean"], ratio_mean, rtol=1e-6)
  np.testing.assert_allclose(metrics["adv_mean"], 0.25, atol=1e-7)
  assert float(metrics["num_tokens"]) == 5.0 and float(metrics["num_seqs"]) == 2.0


@pytest.mark.parametrize("agg_mode", AGG_MODES)
@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_grpo_loss_golden_every_mode_and_estimator(agg_mode, estimator):
  kl_coef = 0.1
  want_pg = _np_aggregate(_PG_TOKEN, agg_mode, max_len=5)
  want_kl = kl_coef * _np_aggregate(_KL_TOKEN[estimator], agg_mode, max_len=5)
  loss, metrics = _grpo(agg_mode, estimator, kl_coef=kl_coef, max_len=5)
  np.testing.assert_allclose(metrics["pg_loss"], want_pg, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["kl_loss"], want_kl, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(loss, want_pg + want_kl, rtol=1e-5, atol=1e-7)
  want_kl_mean = (_KL_TOKEN[estimator] * _MASK).sum() / 5
  np.testing.assert_allclose(metrics["kl"], want_kl_mean, rtol=1e-5, atol=1e-7)


def test_grpo_loss_gradient_zero_on_clipped_tokens():
  # d loss / d logp = -A ρ / 5 on unclipped tokens, 0 on clipped ones and masked ones.
  def f(logp):
    return losses.grpo_loss(
        logp=logp, old_logp=jnp.asarray(_OLD), ref_logp=None, advantages=jnp.asarray(_ADV),
        mask=jnp.asarray(_MASK), clip_low=0.2, clip_high=0.28, kl_coef=0.0, kl_estimator="k3",
        agg_mode="token-mean")[0]
  grad = jax.grad(f)(jnp.asarray(_LOGP))
  want = np.array([[-1.0, 0.0, 0.0], [0.5 * math.exp(0.2), 0.5, 0.0]]) / 5
  np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)


def test_grpo_loss_bad_inputs():
  with pytest.raises(ValueError, match="agg_mode='seq-mean'"):
    _grpo("seq-mean")
  with pytest.raises(ValueError, match="ref_logp is None"):
    losses.grpo_loss(
        logp=jnp.asarray(_LOGP), old_logp=jnp.asarray(_OLD), ref_logp=None,
        advantages=jnp.asarray(_ADV), mask=jnp.asarray(_MASK), clip_low=0.2, clip_high=0.2,
        kl_coef=0.1, kl_estimator="k3", agg_mode="token-mean")


# ------------------------------------------------------------------------------------------------
# GAL.


def _gal_batch():
  """B = 3 prompts, K = 3, T = 2; ref_logp = 0 so Δ = Σ logp·m."""
  logp = np.array([
      [[-1.5, -1.5], [-0.5, -2.0], [-0.2, -0.3]],  # Δ = -3, -2.5, -0.5; R = 1, 0, 1
      [[-1.0, -1.0], [-2.0, -2.0], [-3.0, -3.0]],  # R = 0, 0, 0: no pair
      [[-0.1, -0.1], [-3.0, -3.0], [-5.0, -5.0]],  # Δ = -0.2, -3 (1 token), empty; R = 1, 0, 0
  ], np.float32)
  mask = np.ones_like(logp)
  mask[2, 1, 1] = 0.0
  mask[2, 2, :] = 0.0
  rewards = np.array([[1, 0, 1], [0, 0, 0], [1, 0, 0]], np.float32)
  return logp, np.zeros_like(logp), rewards, mask


def test_gal_loss_golden_sum():
  logp, ref, rewards, mask = _gal_batch()
  # Prompt 0 pairs (s, f): (0, 1) d = -3 + 2.5 = -0.5; (2, 1) d = -0.5 + 2.5 = 2.0.
  # Prompt 2: only (0, 1), d = -0.2 + 3 = 2.8 (sample 2 is empty, so never a failure).
  # β = 1: L0 = (softplus(0.5) + softplus(-2)) / 2 = (0.974077 + 0.126928) / 2 = 0.550502;
  # L2 = softplus(-2.8) = 0.059033; loss = (L0 + L2) / 2 prompts = 0.304768.
  loss, m = losses.gal_loss(logp=jnp.asarray(logp), ref_logp=jnp.asarray(ref),
                            rewards=jnp.asarray(rewards), mask=jnp.asarray(mask), beta=1.0,
                            length_norm="sum")
  want = ((_softplus(0.5) + _softplus(-2.0)) / 2 + _softplus(-2.8)) / 2
  np.testing.assert_allclose(want, 0.304768, atol=1e-6)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(m["gal_pairs"]) == 3.0 and float(m["gal_prompts"]) == 2.0
  np.testing.assert_allclose(m["pair_accuracy"], 2 / 3, rtol=1e-6)  # d = -0.5 is the miss.
  np.testing.assert_allclose(m["margin"], (-0.5 + 2.0 + 2.8) / 3, rtol=1e-6)
  # Successes of pair prompts: -3, -0.5, -0.2; failures: -2.5, -3 (prompt 1 has no pair).
  np.testing.assert_allclose(m["delta_success_mean"], -3.7 / 3, rtol=1e-6)
  np.testing.assert_allclose(m["delta_failure_mean"], -2.75, rtol=1e-6)


def test_gal_eta_is_the_mean_squared_pair_weight():
  logp, ref, rewards, mask = _gal_batch()
  # The pairs' d of test_gal_loss_golden_sum: -0.5, 2.0, 2.8. β = 2: pair weight 1 - σ(2d).
  _, m = losses.gal_loss(logp=jnp.asarray(logp), ref_logp=jnp.asarray(ref),
                         rewards=jnp.asarray(rewards), mask=jnp.asarray(mask), beta=2.0,
                         length_norm="sum")
  weights = [1.0 - _sigmoid(2.0 * d) for d in (-0.5, 2.0, 2.8)]
  np.testing.assert_allclose(m["eta"], np.mean(np.square(weights)), rtol=1e-6)
  np.testing.assert_allclose(m["eta_sum"], np.sum(np.square(weights)), rtol=1e-6)
  # At policy == reference every d is 0: η = σ(0)² = 1/4 and no pair is ranked (d > 0).
  _, m0 = losses.gal_loss(logp=jnp.asarray(ref), ref_logp=jnp.asarray(ref),
                          rewards=jnp.asarray(rewards), mask=jnp.asarray(mask), beta=2.0)
  np.testing.assert_allclose(m0["eta"], 0.25, rtol=1e-6)
  assert float(m0["pair_accuracy"]) == 0.0
  # No pair: η is 0 (its sum over no pairs), never a division by zero.
  none = np.ones_like(rewards)
  _, m1 = losses.gal_loss(logp=jnp.asarray(logp), ref_logp=jnp.asarray(ref),
                          rewards=jnp.asarray(none), mask=jnp.asarray(mask), beta=1.0)
  assert float(m1["eta"]) == 0.0 and float(m1["eta_sum"]) == 0.0


def test_gal_loss_golden_mean_and_beta():
  logp, ref, rewards, mask = _gal_batch()
  ref = ref + 0.25 * mask  # Δ_i = Σ (logp - 0.25)·m; the mean norm divides by the length.
  # Per-token mean Δ: prompt 0 [-1.75, -1.5, -0.5]; prompt 2 [-0.35, -3.25].
  # d: prompt 0 (0,1) -0.25, (2,1) 1.0; prompt 2 2.9. β = 2.
  loss, _ = losses.gal_loss(logp=jnp.asarray(logp), ref_logp=jnp.asarray(ref),
                            rewards=jnp.asarray(rewards), mask=jnp.asarray(mask), beta=2.0,
                            length_norm="mean")
  want = ((_softplus(0.5) + _softplus(-2.0)) / 2 + _softplus(-5.8)) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)


def test_gal_no_pairs_is_zero():
  logp, ref, _, mask = _gal_batch()
  rewards = np.array([[1, 1, 1], [0, 0, 0], [1, 1, 1]], np.float32)
  loss, m = losses.gal_loss(logp=jnp.asarray(logp), ref_logp=jnp.asarray(ref),
                            rewards=jnp.asarray(rewards), mask=jnp.asarray(mask), beta=1.0,
                            length_norm="sum")
  assert float(loss) == 0.0 and float(m["gal_pairs"]) == 0.0
  assert float(losses.gal_denominator(rewards=jnp.asarray(rewards), mask=jnp.asarray(mask))) == 1


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_gal_gradient_matches_dpo_weight(beta):
  # One pair, one token each, logp = (-0.7, -1.5), ref = (-1.0, -1.1):
  # Δ_s = -0.7 + 1.0 = 0.3, Δ_f = -1.5 + 1.1 = -0.4, d = 0.7.
  # d/dΔ_s softplus(-β d) = -β (1 - σ(β d)); d/dΔ_f = +β (1 - σ(β d)).
  ref = jnp.array([[[-1.0], [-1.1]]])
  rewards = jnp.array([[1.0, 0.0]])
  mask = jnp.ones((1, 2, 1))

  def f(logp):
    return losses.gal_loss(logp=logp, ref_logp=ref, rewards=rewards, mask=mask, beta=beta,
                           length_norm="sum")[0]
  grad = jax.grad(f)(jnp.array([[[-0.7], [-1.5]]]))
  w = beta * (1.0 - _sigmoid(beta * 0.7))
  np.testing.assert_allclose(grad[0, :, 0], [-w, w], rtol=1e-5)
  assert 0.0 < w < beta


# ------------------------------------------------------------------------------------------------
# SFT and off-policy.


def test_sft_loss_golden():
  logp = jnp.array([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]])
  mask = jnp.array([[1, 1, 1], [1, 0, 0]])
  # (1 + 2 + 3 + 0.5) / 4 tokens = 1.625
  loss, m = losses.sft_loss(logp=logp, mask=mask)
  np.testing.assert_allclose(loss, 1.625, rtol=1e-7)
  np.testing.assert_allclose(m["sft_nll"], 1.625, rtol=1e-7)
  assert float(m["num_tokens"]) == 4.0


_P = np.array([[0.5, 0.1], [0.9, 0.2]])
_P_MASK = np.array([[1.0, 1.0], [1.0, 0.0]])
_P_ADV = np.array([2.0, -1.0])


def test_offpolicy_loss_golden():
  # f(p) = p / (p + 0.1): f(0.5) = 0.833333, f(0.1) = 0.5, f(0.9) = 0.9.
  # Tokens -f·A: row 0 (A=2) [-1.666667, -1.0]; row 1 (A=-1) [0.9, (masked)].
  # token-mean: (-2.666667 + 0.9) / 3 = -0.588889.
  # seq-mean-token-mean: (-1.333333 + 0.9) / 2 = -0.216667.
  # sum-norm (L_max = 2): -1.766667 / 4 = -0.441667.
  want = {"token-mean": -0.588889, "seq-mean-token-mean": -0.216667,
          "seq-mean-token-sum-norm": -0.441667}
  for agg_mode, value in want.items():
    loss, _ = losses.offpolicy_loss(logp=jnp.log(jnp.asarray(_P)), advantages=jnp.asarray(_P_ADV),
                                    mask=jnp.asarray(_P_MASK), agg_mode=agg_mode)
    np.testing.assert_allclose(loss, value, atol=1e-6, err_msg=agg_mode)


def test_offpolicy_loss_gradient():
  def f(logp):
    return losses.offpolicy_loss(logp=logp, advantages=jnp.asarray(_P_ADV),
                                 mask=jnp.asarray(_P_MASK), agg_mode="token-mean", shaping=0.1)[0]
  grad = jax.grad(f)(jnp.log(jnp.asarray(_P, jnp.float32)))
  # d(-f(p)A)/d logp = -A · f'(p) · p = -A · 0.1 · p / (p + 0.1)², over the 3 tokens.
  want = -_P_ADV[:, None] * 0.1 * _P / (_P + 0.1)**2 / 3 * _P_MASK
  np.testing.assert_allclose(grad, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Micro-batch exactness: Σ micro-batch losses with the global denominator == big-batch loss.


def _random_rl_batch(seed, n=6, t=5):
  rng = np.random.default_rng(seed)
  logp = -rng.uniform(0.05, 3.0, (n, t)).astype(np.float32)
  old = logp + rng.normal(0, 0.3, (n, t)).astype(np.float32)
  ref = logp + rng.normal(0, 0.3, (n, t)).astype(np.float32)
  lengths = np.array([5, 1, 3, 0, 4, 2])[:n]  # Row 3 is an empty (padding) row.
  mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
  adv = rng.normal(0, 1, (n,)).astype(np.float32)
  return [jnp.asarray(x) for x in (logp, old, ref, mask, adv)]


@pytest.mark.parametrize("agg_mode", AGG_MODES)
def test_grpo_and_offpolicy_microbatch_exact(agg_mode):
  logp, old, ref, mask, adv = _random_rl_batch(0)
  common = dict(clip_low=0.2, clip_high=0.28, kl_coef=0.05, kl_estimator="k3", agg_mode=agg_mode,
                max_len=8)

  grpo_loss = jax.jit(functools.partial(losses.grpo_loss, **common))
  offpolicy_loss = jax.jit(functools.partial(losses.offpolicy_loss, agg_mode=agg_mode, max_len=8))

  def grpo(sl, denom=None):
    return grpo_loss(logp=logp[sl], old_logp=old[sl], ref_logp=ref[sl],
                            advantages=adv[sl], mask=mask[sl], denom=denom)[0]

  def offp(sl, denom=None):
    return offpolicy_loss(logp=logp[sl], advantages=adv[sl], mask=mask[sl], denom=denom)[0]

  denom = losses.grpo_denominator(mask=mask, agg_mode=agg_mode, max_len=8)
  parts = (slice(0, 3), slice(3, 6))  # 9 + 6 tokens, 3 + 2 non-empty rows.
  for fn in (grpo, offp):
    whole = fn(slice(None))
    summed = sum(fn(sl, denom) for sl in parts)
    np.testing.assert_allclose(summed, whole, rtol=1e-6, atol=1e-7)
    naive = sum(fn(sl) for sl in parts) / 2  # Mean of local means differs: the test has teeth.
    assert abs(float(naive) - float(whole)) > 1e-3
  # Denominators: 15 tokens; 5 non-empty rows; 5 rows * L_max 8.
  want_denom = {"token-mean": 15, "seq-mean-token-mean": 5, "seq-mean-token-sum-norm": 40}
  assert float(denom) == want_denom[agg_mode]


def test_sft_microbatch_exact():
  logp, _, _, mask, _ = _random_rl_batch(1)
  whole, _ = losses.sft_loss(logp=logp, mask=mask)
  denom = losses.sft_denominator(mask=mask)
  summed = sum(losses.sft_loss(logp=logp[sl], mask=mask[sl], denom=denom)[0]
               for sl in (slice(0, 1), slice(1, 6)))
  np.testing.assert_allclose(summed, whole, rtol=1e-6)


@pytest.mark.parametrize("length_norm", ["sum", "mean"])
def test_gal_microbatch_exact(length_norm):
  rng = np.random.default_rng(2)
  b, k, t = 5, 4, 6
  logp = jnp.asarray(-rng.uniform(0.05, 2.0, (b, k, t)).astype(np.float32))
  ref = jnp.asarray(-rng.uniform(0.05, 2.0, (b, k, t)).astype(np.float32))
  lengths = rng.integers(1, t + 1, (b, k))
  mask = jnp.asarray((np.arange(t) < lengths[..., None]).astype(np.float32))
  # Prompt pair counts: 4 (2/2), 3 (1/3), 0 (all 1), 0 (all 0), 3 (3/1).
  rewards = jnp.asarray(np.array(
      [[1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], np.float32))
  gal_loss = jax.jit(functools.partial(losses.gal_loss, beta=1.0, length_norm=length_norm))
  whole, m = gal_loss(logp=logp, ref_logp=ref, rewards=rewards, mask=mask)
  assert float(m["gal_pairs"]) == 10.0 and float(m["gal_prompts"]) == 3.0
  denom = losses.gal_denominator(rewards=rewards, mask=mask)
  summed = sum(gal_loss(logp=logp[sl], ref_logp=ref[sl], rewards=rewards[sl], mask=mask[sl],
                        denom=denom)[0]
               for sl in (slice(0, 1), slice(1, 5)))
  np.testing.assert_allclose(summed, whole, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# One scale for the three terms (METHOD.md §2).


def _scale_batch():
  # Two prompts, K = 2, T = 4. Prompt 0: lengths 2 and 4, rewards 1/0 (one pair); prompt 1:
  # lengths 3 and 3, rewards 1/1 (no pair). Rollout rows: 4, tokens 12, mean length 3.
  lengths = np.array([[2, 4], [3, 3]])
  roll = (np.arange(4) < lengths[..., None]).astype(np.float32)  # [2, 2, 4]
  rewards = np.array([[1.0, 0.0], [1.0, 1.0]], np.float32)
  sft = np.zeros((3, 4), np.float32)
  sft[0, :1] = 1  # Two teacher traces of lengths 1 and 4, one padding row.
  sft[1, :] = 1
  return jnp.asarray(roll), jnp.asarray(rewards), jnp.asarray(sft)


@pytest.mark.parametrize("loss_scale,agg_mode,want", [
    # token: SFT 5 tokens, GRPO 12 tokens, GAL 1 prompt x mean rollout length 3.
    ("token", "token-mean", dict(sft=5.0, grpo=12.0, gal=3.0)),
    # sequence, L_max = 8: SFT 2 traces x 8, GRPO 4 rows x 8, GAL 1 prompt x 8.
    ("sequence", "seq-mean-token-sum-norm", dict(sft=16.0, grpo=32.0, gal=8.0)),
    # legacy: GAL by its prompt count alone.
    ("legacy", "token-mean", dict(sft=5.0, grpo=12.0, gal=1.0)),
])
def test_term_denominators_by_hand(loss_scale, agg_mode, want):
  roll, rewards, sft = _scale_batch()
  got = losses.term_denominators(rl_mask=roll.reshape(4, 4), sft_mask=sft, rollout_mask=roll,
                                 rewards=rewards, loss_scale=loss_scale, agg_mode=agg_mode,
                                 max_len=8)
  assert {k: float(v) for k, v in got.items()} == want


def test_gal_length_scale_mean_delta_and_bad_values():
  roll, _, _ = _scale_batch()
  # Δ already over |τ| inside σ: no second length division, whatever the scale.
  for scale in losses.LOSS_SCALES:
    assert float(losses.gal_length_scale(mask=roll, loss_scale=scale, max_len=8,
                                         length_norm="mean")) == 1.0
  with pytest.raises(ValueError, match="loss_scale='tokens'"):
    losses.gal_length_scale(mask=roll, loss_scale="tokens", max_len=8)
  with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
    losses.term_denominators(rl_mask=roll.reshape(4, 4), sft_mask=roll.reshape(4, 4),
                             rollout_mask=roll, rewards=jnp.ones((2, 2)), loss_scale="sequence",
                             agg_mode="token-mean", max_len=8)


@pytest.mark.parametrize("loss_scale", ["token", "sequence"])
def test_scaled_terms_microbatch_exact(loss_scale):
  # The batch-wide denominators make two micro-batches of prompts sum to the whole batch.
  rng = np.random.default_rng(3)
  b, k, t = 4, 4, 6
  logp = jnp.asarray(-rng.uniform(0.05, 2.0, (b, k, t)).astype(np.float32))
  ref = jnp.asarray(-rng.uniform(0.05, 2.0, (b, k, t)).astype(np.float32))
  mask = jnp.asarray((np.arange(t) < rng.integers(1, t + 1, (b, k))[..., None]).astype(
      np.float32))
  rewards = jnp.asarray(np.array([[1, 0, 1, 0], [0, 0, 1, 0], [1, 1, 1, 1], [1, 1, 0, 1]],
                                 np.float32))
  agg = "seq-mean-token-sum-norm" if loss_scale == "sequence" else "token-mean"
  d = losses.term_denominators(rl_mask=mask.reshape(b * k, t), sft_mask=mask.reshape(b * k, t),
                               rollout_mask=mask, rewards=rewards, loss_scale=loss_scale,
                               agg_mode=agg, max_len=t)

  def terms(sl, **denoms):
    gal = losses.gal_loss(logp=logp[sl], ref_logp=ref[sl], rewards=rewards[sl], mask=mask[sl],
                          beta=1.0, denom=denoms.get("gal"))[0]
    sft = losses.sft_loss(logp=logp[sl].reshape(-1, t), mask=mask[sl].reshape(-1, t),
                          denom=denoms.get("sft"))[0]
    return np.array([gal, sft])

  summed = terms(slice(0, 1), **d) + terms(slice(1, 4), **d)
  # The whole batch by hand: GAL's mean over prompts with pairs, over its length scale.
  whole_gal = losses.gal_loss(logp=logp, ref_logp=ref, rewards=rewards, mask=mask, beta=1.0)[0]
  scale = float(jnp.sum(mask)) / (b * k) if loss_scale == "token" else t
  np.testing.assert_allclose(summed[0], float(whole_gal) / scale, rtol=1e-6)
  sft_denom = float(jnp.sum(mask)) if loss_scale == "token" else b * k * t
  np.testing.assert_allclose(summed[1], float(jnp.sum(-logp * mask)) / sft_denom, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# SRFT and CHORD (METHOD.md §5).


def test_srft_sft_loss_by_hand():
  logp = jnp.array([[-1.0, -2.0], [-0.5, -9.0]])
  entropy = jnp.array([[0.0, 1.0], [2.0, 5.0]])
  mask = jnp.array([[1, 1], [1, 0]])
  # exp(-H): 1, e^-1, e^-2 (masked 4th). Σ w·nll = 1 + 2/e + 0.5/e² = 1.803426; / 3 tokens.
  want = (1.0 + 2.0 * math.exp(-1) + 0.5 * math.exp(-2)) / 3
  loss, m = losses.srft_sft_loss(logp=logp, entropy=entropy, mask=mask)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["weight_mean"], (1 + math.exp(-1) + math.exp(-2)) / 3, rtol=1e-6)
  # The weight is a constant: d loss / d logp = -exp(-H) / denom (denom 4 here).
  g = jax.grad(lambda lp: losses.srft_sft_loss(logp=lp, entropy=entropy, mask=mask,
                                               denom=4.0)[0])(logp)
  np.testing.assert_allclose(g, -np.exp(-np.asarray(entropy)) * np.asarray(mask) / 4, rtol=1e-6)


def test_srft_positive_loss_by_hand():
  logp = jnp.array([[-1.0, -2.0], [-0.5, -0.25], [-3.0, -3.0]])
  entropy = jnp.array([[0.0, 1.0], [2.0, 0.5], [1.0, 1.0]])
  mask = jnp.array([[1, 0], [1, 1], [1, 1]])
  rewards = jnp.array([1.0, 1.0, 0.0])  # Row 2 failed: not in the term.
  # exp(H) weights on the correct rows' tokens: 1·1 + e²·0.5 + e^0.5·0.25, over denom 10.
  want = (1.0 + math.exp(2.0) * 0.5 + math.exp(0.5) * 0.25) / 10
  loss, m = losses.srft_positive_loss(logp=logp, entropy=entropy, rewards=rewards, mask=mask,
                                      denom=10.0)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(m["num_tokens"]) == 3.0
  with pytest.raises(ValueError, match="rewards shape"):
    losses.srft_positive_loss(logp=logp, entropy=entropy, rewards=rewards[:2], mask=mask)


def test_chord_sft_loss_by_hand():
  p = np.array([[0.5, 0.9], [0.2, 0.7]])
  logp = jnp.asarray(np.log(p))
  mask = jnp.array([[1, 1], [1, 0]])
  # φ = p(1-p): 0.25, 0.09, 0.16. Σ φ·(-log p) / 3 tokens.
  want = (0.25 * -math.log(0.5) + 0.09 * -math.log(0.9) + 0.16 * -math.log(0.2)) / 3
  loss, m = losses.chord_sft_loss(logp=logp, mask=mask)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  np.testing.assert_allclose(m["weight_mean"], 0.5 / 3, rtol=1e-6)
  # φ is stop-gradient: d loss / d logp = -φ / 3 (not φ's own derivative too).
  g = jax.grad(lambda lp: losses.chord_sft_loss(logp=lp, mask=mask)[0])(logp)
  np.testing.assert_allclose(g, -(p * (1 - p)) * np.asarray(mask) / 3, rtol=1e-5)

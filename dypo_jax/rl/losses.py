"""DYPO losses: SFT, GRPO, the Group Alignment Loss (GAL), LUFFY-style off-policy, and the
token-weighted SFT terms of the SRFT and CHORD baselines.

Legend: B prompts, K group size, N sequences, T response tokens.

All functions are pure and keyword-only; each loss returns `(loss, metrics)` with `metrics` a flat
dict of float32 scalars. Every loss is `(local sum) / denom`. With `denom=None` the denominator is
computed from the call's own inputs; a train step that splits a batch into micro-batches instead
computes it once over the whole batch with the matching `*_denominator` function and passes it to
every micro-batch, so the micro-batch losses sum exactly to the big-batch loss. Metrics that are
means come with the sums/counts needed to recombine them exactly (`*_sum`, `num_*`).

Token log-probabilities come from `dypo_jax.models.logprobs`; the weights that mix these terms
from `routing.loss_weights`.
"""
import numbers
from typing import Literal

import jax
import jax.numpy as jnp


AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_ESTIMATORS = ("k1", "k2", "k3")
LENGTH_NORMS = ("sum", "mean")
# The scale the three terms share (METHOD.md §2, "One scale"): "sequence" the paper's per-trajectory
# sums over one constant, "token" verl's token means with GAL's loss over the mean rollout length,
# "legacy" token-mean SFT and GRPO beside GAL's unnormalised per-prompt loss (the old figures).
LOSS_SCALES = ("sequence", "token", "legacy")
SFT_TOKEN_WEIGHTS = ("none", "exp_neg_entropy", "p_one_minus_p")  # plain, SRFT, CHORD-φ.

_F32 = jnp.float32


def _masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(jnp.where(mask, x, 0.0)).astype(_F32)


def _masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  return _masked_sum(x, mask) / jnp.maximum(jnp.sum(mask), 1).astype(_F32)


def _check_agg_mode(agg_mode: str, where: str) -> None:
  if agg_mode not in AGG_MODES:
    raise ValueError(f"{where}: agg_mode={agg_mode!r} is not one of {AGG_MODES}")


def _check_same_shape(where: str, **arrays) -> None:
  shapes = {k: tuple(v.shape) for k, v in arrays.items() if v is not None}
  if len(set(shapes.values())) > 1:
    raise ValueError(f"{where}: shapes differ: {shapes}")


# ---------------------------------------------------------------------------------------------
# Advantages and KL.


def grpo_advantages(rewards: jax.Array, *, scale_by_std: bool, eps: float = 1e-6) -> jax.Array:
  """Group-normalised advantages (R - mean_G) / (std_G + eps), or R - mean_G.

  Args:
    rewards: [B, K] rewards of the K samples of each prompt.
    scale_by_std: divide by the unbiased (ddof=1) group standard deviation plus `eps`.
    eps: the xi of METHOD.md §2.

  Returns:
    [B, K] float32 advantages. For K = 1 the centred reward is 0 and so is the advantage.
  """
  if rewards.ndim != 2:
    raise ValueError(f"grpo_advantages: rewards must be [B, K], got shape {rewards.shape}")
  rewards = rewards.astype(_F32)
  centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
  if not scale_by_std:
    return centred
  k = rewards.shape[-1]
  std = jnp.sqrt(jnp.sum(centred**2, axis=-1, keepdims=True) / max(k - 1, 1))
  return centred / (std + eps)


def kl_penalty(*, logp: jax.Array, ref_logp: jax.Array, estimator: str) -> jax.Array:
  """Per-token KL estimate with d = logp - ref_logp: k1 = d, k2 = d²/2, k3 = exp(-d) + d - 1."""
  if estimator not in KL_ESTIMATORS:
    raise ValueError(f"kl_penalty: estimator={estimator!r} is not one of {KL_ESTIMATORS}")
  d = logp.astype(_F32) - ref_logp.astype(_F32)
  if estimator == "k1":
    return d
  if estimator == "k2":
    return 0.5 * d**2
  return jnp.expm1(-d) + d  # k3, written with expm1 for accuracy near d = 0.


# ---------------------------------------------------------------------------------------------
# Token aggregation shared by the policy-gradient losses.


def _nonempty_rows(mask: jax.Array) -> jax.Array:
  """[N] bool: sequences with at least one response token (padding rows have none)."""
  return jnp.any(mask, axis=-1)


def grpo_denominator(
    *, mask: jax.Array, agg_mode: AggMode, max_len: int | None = None
) -> jax.Array:
  """Denominator of `agg_mode` for a batch with response mask [N, T] (float32 scalar).

  token-mean: number of tokens; seq-mean-token-mean: number of non-empty sequences;
  seq-mean-token-sum-norm: number of non-empty sequences * max_len (max_len defaults to T).
  Each is at least 1. Empty (all-masked) rows are padding and never counted.
  """
  _check_agg_mode(agg_mode, "grpo_denominator")
  mask = mask.astype(bool)
  if agg_mode == "token-mean":
    count = jnp.sum(mask)
  else:
    count = jnp.sum(_nonempty_rows(mask))
    if agg_mode == "seq-mean-token-sum-norm":
      count = count * (mask.shape[-1] if max_len is None else max_len)
  return jnp.maximum(count, 1).astype(_F32)


def _aggregate(per_token: jax.Array, mask: jax.Array, agg_mode: AggMode,
               denom: jax.Array) -> jax.Array:
  """Local sum of `agg_mode` over [N, T] per-token values, divided by `denom`."""
  if agg_mode == "seq-mean-token-mean":
    seq_sum = jnp.sum(jnp.where(mask, per_token, 0.0), axis=-1)  # [N]
    seq_len = jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(_F32)  # [N]
    local = jnp.sum(seq_sum / seq_len)
  else:  # token-mean and seq-mean-token-sum-norm share the numerator.
    local = _masked_sum(per_token, mask)
  return local / denom


def _resolve_denom(denom, mask, agg_mode, max_len):
  if denom is None:
    return grpo_denominator(mask=mask, agg_mode=agg_mode, max_len=max_len)
  return jnp.asarray(denom, _F32)


# ---------------------------------------------------------------------------------------------
# Losses.


def grpo_loss(
    *,
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array | None,
    advantages: jax.Array,
    mask: jax.Array,
    clip_low: float,
    clip_high: float,
    kl_coef: float,
    kl_estimator: str,
    agg_mode: AggMode,
    max_len: int | None = None,
    denom: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Clipped-surrogate GRPO loss with a KL penalty to the reference policy.

  Per token: -min(ρA, clip(ρ, 1 - clip_low, 1 + clip_high) A) + kl_coef * kl, ρ = exp(logp -
  old_logp), aggregated by `agg_mode` (see `grpo_denominator`).

  Args:
    logp: [N, T] current-policy log-probs (the only differentiated input).
    old_logp: [N, T] behaviour-policy log-probs (from sampling).
    ref_logp: [N, T] frozen-reference log-probs, or None when kl_coef == 0.
    advantages: [N] per-sequence advantages.
    mask: [N, T] response-token mask.
    clip_low, clip_high: ε_low, ε_high.
    kl_coef: β_KL.
    kl_estimator: "k1", "k2" or "k3".
    agg_mode: "token-mean", "seq-mean-token-mean" or "seq-mean-token-sum-norm".
    max_len: L_max for seq-mean-token-sum-norm (default T).
    denom: global denominator (from `grpo_denominator`) for micro-batching; None = local.

  Returns:
    (loss, metrics) with metrics pg_loss, kl_loss (pg_loss + kl_loss = loss), clip_fraction,
    kl, ratio_mean (masked token means), adv_mean (over non-empty sequences), num_tokens,
    num_seqs and the sums clip_sum, kl_sum, ratio_sum, adv_sum for exact recombination.
  """
  _check_agg_mode(agg_mode, "grpo_loss")
  _check_same_shape("grpo_loss", logp=logp, old_logp=old_logp, ref_logp=ref_logp, mask=mask)
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"grpo_loss: advantages shape {advantages.shape} != [N] = {logp.shape[:1]}")
  if ref_logp is None and not (isinstance(kl_coef, numbers.Real) and kl_coef == 0):
    raise ValueError(f"grpo_loss: ref_logp is None but kl_coef={kl_coef!r} (must be 0)")
  mask = mask.astype(bool)
  logp = logp.astype(_F32)
  adv = advantages.astype(_F32)[:, None]  # [N, 1]
  ratio = jnp.exp(logp - old_logp.astype(_F32))  # [N, T]
  unclipped = ratio * adv
  clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
  pg_token = -jnp.minimum(unclipped, clipped)
  if ref_logp is None:
    kl_token = jnp.zeros_like(logp)
  else:
    kl_token = kl_penalty(logp=logp, ref_logp=ref_logp, estimator=kl_estimator)
  denom = _resolve_denom(denom, mask, agg_mode, max_len)
  pg_loss = _aggregate(pg_token, mask, agg_mode, denom)
  kl_loss = kl_coef * _aggregate(kl_token, mask, agg_mode, denom)

  rows = _nonempty_rows(mask)
  clip_hit = clipped < unclipped  # The clipped branch is the min: no gradient through ρ.
  metrics = {
      "pg_loss": pg_loss,
      "kl_loss": kl_loss,
      "clip_fraction": _masked_mean(clip_hit.astype(_F32), mask),
      "kl": _masked_mean(kl_token, mask),
      "ratio_mean": _masked_mean(ratio, mask),
      "adv_mean": _masked_mean(advantages.astype(_F32), rows),
      "num_tokens": jnp.sum(mask).astype(_F32),
      "num_seqs": jnp.sum(rows).astype(_F32),
      "clip_sum": _masked_sum(clip_hit.astype(_F32), mask),
      "kl_sum": _masked_sum(kl_token, mask),
      "ratio_sum": _masked_sum(ratio, mask),
      "adv_sum": _masked_sum(advantages.astype(_F32), rows),
  }
  return pg_loss + kl_loss, jax.lax.stop_gradient(metrics)


def offpolicy_loss(
    *,
    logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    agg_mode: AggMode,
    shaping: float = 0.1,
    max_len: int | None = None,
    denom: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LUFFY-style loss on off-policy (teacher) traces: per token -f(p)·A, f(p) = p / (p + shaping).

  p = exp(logp) under the current policy; no ratio to an old policy, no clipping. The gradient
  w.r.t. logp is -A · shaping · p / (p + shaping)² per token (divided by the denominator).
  Aggregation and `denom` as in `grpo_loss`.

  Args:
    logp: [N, T] current-policy log-probs of the teacher tokens.
    advantages: [N] advantages of the teacher traces (from the group that includes them).
    mask: [N, T] response-token mask.
    agg_mode, max_len, denom: as in `grpo_loss`.
    shaping: the 0.1 of f(p).

  Returns:
    (loss, metrics) with offpolicy_loss, prob_mean (masked mean p), prob_sum, num_tokens.
  """
  _check_agg_mode(agg_mode, "offpolicy_loss")
  _check_same_shape("offpolicy_loss", logp=logp, mask=mask)
  if advantages.shape != logp.shape[:1]:
    raise ValueError(f"offpolicy_loss: advantages shape {advantages.shape} != [N] = "
                     f"{logp.shape[:1]}")
  mask = mask.astype(bool)
  prob = jnp.exp(logp.astype(_F32))
  per_token = -(prob / (prob + shaping)) * advantages.astype(_F32)[:, None]
  denom = _resolve_denom(denom, mask, agg_mode, max_len)
  loss = _aggregate(per_token, mask, agg_mode, denom)
  metrics = {
      "offpolicy_loss": loss,
      "prob_mean": _masked_mean(prob, mask),
      "prob_sum": _masked_sum(prob, mask),
      "num_tokens": jnp.sum(mask).astype(_F32),
  }
  return loss, jax.lax.stop_gradient(metrics)


def sft_denominator(*, mask: jax.Array) -> jax.Array:
  """Token count of the mask, at least 1 (float32 scalar)."""
  return jnp.maximum(jnp.sum(mask.astype(bool)), 1).astype(_F32)


def sft_loss(
    *, logp: jax.Array, mask: jax.Array, denom: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-mean negative log-likelihood Σ -logp·m / Σ m (or / denom).

  Args:
    logp: [N, T] log-probs of the teacher tokens.
    mask: [N, T] mask of the tokens trained on (the teacher response).
    denom: global token count (from `sft_denominator`) for micro-batching; None = local.

  Returns:
    (loss, metrics) with sft_nll (this call's token-mean NLL), nll_sum, num_tokens.
  """
  _check_same_shape("sft_loss", logp=logp, mask=mask)
  mask = mask.astype(bool)
  nll_sum = _masked_sum(-logp.astype(_F32), mask)
  denom = sft_denominator(mask=mask) if denom is None else jnp.asarray(denom, _F32)
  metrics = {
      "sft_nll": nll_sum / sft_denominator(mask=mask),
      "nll_sum": nll_sum,
      "num_tokens": jnp.sum(mask).astype(_F32),
  }
  return nll_sum / denom, jax.lax.stop_gradient(metrics)


def _gal_pairs(rewards: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(success [B, K], failure [B, K], pair [B, K, K]) over non-empty responses.

  pair[b, s, f] is True where sample s of prompt b succeeded and sample f failed.
  """
  present = jnp.any(mask.astype(bool), axis=-1)  # [B, K]
  success = present & (rewards > 0.5)
  failure = present & (rewards <= 0.5)
  return success, failure, success[:, :, None] & failure[:, None, :]


def gal_denominator(*, rewards: jax.Array, mask: jax.Array) -> jax.Array:
  """Number of prompts with at least one (success, failure) pair, at least 1 (float32 scalar)."""
  _, _, pair = _gal_pairs(rewards, mask)
  return jnp.maximum(jnp.sum(jnp.any(pair, axis=(1, 2))), 1).astype(_F32)


def gal_loss(
    *,
    logp: jax.Array,
    ref_logp: jax.Array,
    rewards: jax.Array,
    mask: jax.Array,
    beta: float,
    length_norm: Literal["sum", "mean"] = "sum",
    denom: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Group Alignment Loss: a DPO-shaped loss over every (success, failure) pair of each group.

  Δ_i = Σ_t (logp - ref_logp)·m over sample i's response ("sum"), or that over its length
  ("mean"). L(q) = mean over q's pairs of softplus(-β (Δ_s - Δ_f)); loss = Σ_q L(q) / number of
  prompts with at least one pair (or / denom). Prompts without a pair (all-0 or all-1 groups,
  padding prompts) and empty responses contribute nothing.

  Args:
    logp: [B, K, T] current-policy log-probs.
    ref_logp: [B, K, T] frozen-reference log-probs.
    rewards: [B, K] binary correctness (> 0.5 counts as success).
    mask: [B, K, T] response-token mask.
    beta: β_GAL (> 0).
    length_norm: "sum" (DPO) or "mean".
    denom: global prompt count (from `gal_denominator`) for micro-batching; None = local.

  Returns:
    (loss, metrics) with gal_loss, gal_pairs, gal_prompts, pair_accuracy (fraction of pairs with
    σ(βd) > 0.5), margin (mean d = Δ_s - Δ_f over pairs), eta (mean over pairs of (1 - σ(βd))²,
    the squared pair weight of GAL's gradient: 1/4 at d = 0, falling as the pairs are ranked),
    delta_success_mean and delta_failure_mean (over samples of prompts with a pair), and the sums
    pair_correct, margin_sum, eta_sum.
  """
  if length_norm not in LENGTH_NORMS:
    raise ValueError(f"gal_loss: length_norm={length_norm!r} is not one of {LENGTH_NORMS}")
  _check_same_shape("gal_loss", logp=logp, ref_logp=ref_logp, mask=mask)
  if logp.ndim != 3 or rewards.shape != logp.shape[:2]:
    raise ValueError(f"gal_loss: want logp [B, K, T] and rewards [B, K]; got {logp.shape} and "
                     f"{rewards.shape}")
  mask = mask.astype(bool)
  diff = jnp.where(mask, logp.astype(_F32) - ref_logp.astype(_F32), 0.0)
  delta = jnp.sum(diff, axis=-1)  # [B, K]
  if length_norm == "mean":
    delta = delta / jnp.maximum(jnp.sum(mask, axis=-1), 1).astype(_F32)
  success, failure, pair = _gal_pairs(rewards, mask)
  d = delta[:, :, None] - delta[:, None, :]  # [B, K(s), K(f)]
  pair_loss = jnp.where(pair, jax.nn.softplus(-beta * d), 0.0)
  pairs_per_prompt = jnp.sum(pair, axis=(1, 2))  # [B]
  has_pair = pairs_per_prompt > 0  # [B]
  prompt_loss = jnp.sum(pair_loss, axis=(1, 2)) / jnp.maximum(pairs_per_prompt, 1)  # [B]
  denom = gal_denominator(rewards=rewards, mask=mask) if denom is None else jnp.asarray(
      denom, _F32)
  loss = jnp.sum(prompt_loss) / denom

  num_pairs = jnp.sum(pairs_per_prompt).astype(_F32)
  pair_correct = _masked_sum((beta * d > 0).astype(_F32), pair)
  margin_sum = _masked_sum(d, pair)
  # A pair's gradient is β(1 - σ(βd)) times its members' score difference; η is the mean square
  # of that weight over pairs (the factor the paper's variance bound, eq. 19, carries).
  eta_sum = _masked_sum(jax.nn.sigmoid(-beta * d) ** 2, pair)
  in_pair_prompt = has_pair[:, None]
  metrics = {
      "gal_loss": loss,
      "gal_pairs": num_pairs,
      "gal_prompts": jnp.sum(has_pair).astype(_F32),
      "pair_accuracy": pair_correct / jnp.maximum(num_pairs, 1.0),
      "margin": margin_sum / jnp.maximum(num_pairs, 1.0),
      "eta": eta_sum / jnp.maximum(num_pairs, 1.0),
      "delta_success_mean": _masked_mean(delta, success & in_pair_prompt),
      "delta_failure_mean": _masked_mean(delta, failure & in_pair_prompt),
      "pair_correct": pair_correct,
      "margin_sum": margin_sum,
      "eta_sum": eta_sum,
  }
  return loss, jax.lax.stop_gradient(metrics)


# ---------------------------------------------------------------------------------------------
# One scale for the three terms.


def gal_length_scale(*, mask: jax.Array, loss_scale: str, max_len: int,
                     length_norm: str = "sum") -> jax.Array:
  """What GAL's per-prompt loss is divided by, beside its prompt count (float32 scalar).

  "sequence": max_len, the constant every term's per-trajectory sum is divided by; "token": the
  mean length of the non-empty responses in `mask` (the batch's rollouts, so GAL's per-token
  gradient is on GRPO's token-mean scale; a constant of the batch, so no gradient flows through
  it); "legacy": 1. Computed over the whole batch, like every denominator, for exact micro-batches.
  With length_norm="mean" it is 1 whatever the scale: Δ is then already over |τ| inside σ, so
  the gradient already carries a per-token 1/|τ| (and β means a per-token margin).
  """
  if loss_scale not in LOSS_SCALES:
    raise ValueError(f"gal_length_scale: loss_scale={loss_scale!r} is not one of {LOSS_SCALES}")
  if length_norm not in LENGTH_NORMS:
    raise ValueError(f"gal_length_scale: length_norm={length_norm!r} is not one of "
                     f"{LENGTH_NORMS}")
  if loss_scale == "legacy" or length_norm == "mean":
    return jnp.ones((), _F32)
  if loss_scale == "sequence":
    return jnp.asarray(float(max_len), _F32)
  mask = mask.astype(bool)
  rows = jnp.maximum(jnp.sum(jnp.any(mask, axis=-1)), 1).astype(_F32)
  return jnp.maximum(jnp.sum(mask).astype(_F32) / rows, 1.0)


def term_denominators(*, rl_mask: jax.Array, sft_mask: jax.Array, rollout_mask: jax.Array,
                      rewards: jax.Array, loss_scale: str, agg_mode: AggMode,
                      max_len: int, length_norm: str = "sum") -> dict[str, jax.Array]:
  """The SFT, GRPO and GAL denominators of a whole update batch under `loss_scale`.

  Args:
    rl_mask: [N, T] tokens of the GRPO term (rollouts and off-policy teacher rows).
    sft_mask: [N, T] SFT teacher tokens.
    rollout_mask: [B, K, T] rollout tokens (GAL's members).
    rewards: [B, K] binary rewards (GAL's pairs).
    loss_scale: one of LOSS_SCALES.
    agg_mode: GRPO's aggregation under "token" and "legacy"; "sequence" needs
      "seq-mean-token-sum-norm" (each trajectory's sum over max_len).
    max_len: L_max = sampler.max_new_tokens, the shared constant of "sequence".
    length_norm: GAL's Δ ("sum" or "mean", see `gal_length_scale`).

  Returns:
    {"sft", "grpo", "gal"}: float32 scalars to pass as each loss's `denom`.
  """
  if loss_scale not in LOSS_SCALES:
    raise ValueError(f"term_denominators: loss_scale={loss_scale!r} is not one of {LOSS_SCALES}")
  if loss_scale == "sequence" and agg_mode != "seq-mean-token-sum-norm":
    raise ValueError(f"term_denominators: loss_scale='sequence' sums each trajectory's tokens, "
                     f"which is agg_mode='seq-mean-token-sum-norm', not {agg_mode!r}")
  if loss_scale == "sequence":  # Σ over a trajectory's tokens / (trajectories · L_max).
    sft = grpo_denominator(mask=sft_mask, agg_mode="seq-mean-token-sum-norm", max_len=max_len)
  else:
    sft = sft_denominator(mask=sft_mask)
  gal = gal_denominator(rewards=rewards, mask=rollout_mask) * gal_length_scale(
      mask=rollout_mask, loss_scale=loss_scale, max_len=max_len, length_norm=length_norm)
  return dict(sft=sft, gal=gal,
              grpo=grpo_denominator(mask=rl_mask, agg_mode=agg_mode, max_len=max_len))


# ---------------------------------------------------------------------------------------------
# Token-weighted NLL: SRFT's and CHORD's SFT terms and SRFT's term on correct rollouts.


def _weighted_nll(logp, mask, weight, denom, where):
  _check_same_shape(where, logp=logp, mask=mask, weight=weight)
  mask = mask.astype(bool)
  weight = jax.lax.stop_gradient(weight.astype(_F32))  # A weight, never a path for the gradient.
  loss_sum = _masked_sum(-weight * logp.astype(_F32), mask)
  denom = sft_denominator(mask=mask) if denom is None else jnp.asarray(denom, _F32)
  metrics = {
      "weighted_nll": loss_sum / denom,
      "weight_sum": _masked_sum(weight, mask),
      "weight_mean": _masked_mean(weight, mask),
      "nll_sum": _masked_sum(-logp.astype(_F32), mask),
      "num_tokens": jnp.sum(mask).astype(_F32),
  }
  return loss_sum / denom, jax.lax.stop_gradient(metrics)


def srft_sft_loss(
    *, logp: jax.Array, entropy: jax.Array, mask: jax.Array, denom: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SRFT's entropy-aware SFT on demonstrations: Σ exp(-H_t)·(-logp_t)·m / denom.

  H_t is the policy's entropy at the token's position, stop-gradient: a token where the policy
  is unsure (large H) is imitated less, the shift SFT would cause there being largest.

  Args:
    logp: [N, T] log-probs of the demonstration tokens.
    entropy: [N, T] the policy's entropy at each position (nats).
    mask: [N, T] demonstration tokens.
    denom: the SFT denominator of the whole batch (`term_denominators`); None = token count.

  Returns:
    (loss, metrics) with weighted_nll, weight_sum, weight_mean, nll_sum, num_tokens.
  """
  return _weighted_nll(logp, mask, jnp.exp(-entropy.astype(_F32)), denom, "srft_sft_loss")


def srft_positive_loss(
    *, logp: jax.Array, entropy: jax.Array, rewards: jax.Array, mask: jax.Array,
    denom: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """SRFT's extra term on correct rollouts: Σ exp(H_t)·(-logp_t) over tokens of rollouts with
  reward > 0.5, / denom (the GRPO term's, whose rows these are).

  Args:
    logp: [N, T] log-probs of the rollout tokens.
    entropy: [N, T] the policy's entropy at each position (stop-gradient in the weight).
    rewards: [N] binary rewards of the rows.
    mask: [N, T] rollout tokens (rows of other kinds all zero).
    denom: the GRPO denominator of the whole batch; None = the correct rows' token count.

  Returns:
    (loss, metrics) as `srft_sft_loss`, over the correct rows.
  """
  if rewards.shape != logp.shape[:1]:
    raise ValueError(f"srft_positive_loss: rewards shape {rewards.shape} != [N] = "
                     f"{logp.shape[:1]}")
  positive = mask.astype(bool) & (rewards > 0.5)[:, None]
  return _weighted_nll(logp, positive, jnp.exp(entropy.astype(_F32)), denom,
                       "srft_positive_loss")


def chord_sft_loss(
    *, logp: jax.Array, mask: jax.Array, denom: jax.Array | None = None
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CHORD-φ's SFT: Σ φ_t·(-logp_t)·m / denom, φ_t = p_t(1 - p_t), p_t = π_θ(a_t) stop-gradient.

  φ is largest at p = 1/2 and vanishes for tokens the policy already predicts (p → 1) and for
  tokens far from it (p → 0), which SFT would otherwise pull hardest.

  Args:
    logp: [N, T] log-probs of the expert tokens.
    mask: [N, T] expert tokens.
    denom: the SFT denominator of the whole batch; None = token count.

  Returns:
    (loss, metrics) as `srft_sft_loss`.
  """
  p = jnp.exp(logp.astype(_F32))
  return _weighted_nll(logp, mask, p * (1.0 - p), denom, "chord_sft_loss")

"""The DYPO update: a pure `(state, ref_params, batch, rng) -> (state, metrics)` step.

The batch is `update_batch`'s fixed layout ([U, K, L] rows of Hard teacher traces, Mid groups and
LUFFY-style teacher rows) with its loss weights (w_sft, w_grpo, w_gal) from `routing`; the step
computes the three normalised loss terms and descends their weighted sum. A batch of groups alone
compiles with `StepConfig.shared_prompt`: each slot's prompt runs once into a KV cache and its K
responses run against copies of it (`_shared_prompt_hidden`), the same maths at 1/K of the
prompt's cost; a batch with packed Hard slots runs every row whole. A packed batch
(`StepConfig.packed`, `update_batch.pack`) runs the model on rows holding several sequences each
(block-diagonal causal attention, positions restarting per sequence) and gathers the response
log-probs back to [U * K, T], so the losses below see the same values either way.

Micro-batches are a `lax.scan` over strided slices of U; every loss divides by a denominator
computed over the whole batch first, so the summed micro-batch losses and gradients equal the big
batch's. The model runs on a micro-batch's rows flattened to [U/M * K, L] and split over the batch
shards (`Transformer.activation_sharding`), so a micro-batch may hold fewer items than there are
shards as long as its rows divide evenly (`update_batch.micro_batch_error`): one item of K = 8
rows on 8 chips is one row a chip, not one chip holding all 8 rows.
"""
import dataclasses
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from dypo_jax import models
from dypo_jax.models import logprobs as logprobs_lib
from dypo_jax.rl import losses
from dypo_jax.rl import update_batch

ROW_ROLLOUT, ROW_TEACHER_SFT, ROW_TEACHER_OFFPOLICY = (
    update_batch.ROW_ROLLOUT, update_batch.ROW_TEACHER_SFT, update_batch.ROW_TEACHER_OFFPOLICY)
TERMS = update_batch.TERMS
SCHEDULES = ("constant", "cosine", "linear")  # optim.schedule


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # [] int32, update attempts so far.
  params: Any  # nnx.State of the policy's Params.
  opt_state: Any
  nonfinite_skipped: jax.Array  # [] int32


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The plain values the step needs; the trainer builds it from the config once."""
  prompt_len: int  # P
  temperature: float  # Sampling temperature of the rollouts (the behaviour policy's).
  clip_low: float
  clip_high: float
  kl_coef: float
  kl_estimator: str
  agg_mode: str
  max_len: int  # T, for seq-mean-token-sum-norm.
  scale_adv_by_std: bool
  adv_eps: float
  beta_gal: float
  gal_length_norm: str
  offpolicy_shaping: float
  micro_batches: int
  num_teachers: int  # For per-teacher SFT metrics.
  logprob_impl: str
  vocab_chunk: int
  pallas_interpret: bool
  use_gal: bool  # Static: skip GAL's work in methods that never weight it.
  per_term_grad_norms: bool  # One backward per term (3x backward cost) for the §5 metrics.
  # Static: every slot's K rows share their prompt (no packed Hard slot in the batch), so each
  # prompt runs once per slot and its K responses read its KV cache (`_shared_prompt_hidden`).
  shared_prompt: bool = False
  # The scale the three terms share (`losses.LOSS_SCALES`, METHOD.md §2 "One scale").
  loss_scale: str = "token"
  # Static, from `routing`: the SFT term's token weight (`losses.SFT_TOKEN_WEIGHTS`: SRFT's
  # exp(-H), CHORD's p(1-p)) and SRFT's coefficient of its NLL on correct rollouts (0: off).
  sft_token_weight: str = "none"
  positive_nll_coef: float = 0.0
  # Static: the batch carries `update_batch.pack`'s arrays and the model runs on its packed rows
  # (several responses a row; `shared_prompt` is then the packer's choice per slot, not this).
  packed: bool = False
  # Packed rows' attention: query blocks of this many tokens over the keys each sees (0: dense).
  pack_attention_block: int = 0


def make_optimizer(*, learning_rate: float, schedule: str, warmup_steps: int, total_steps: int,
                   min_lr_ratio: float, weight_decay: float, b1: float, b2: float, eps: float,
                   grad_clip: float) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping and a warm-up + (constant | cosine | linear) schedule."""
  decay_steps = max(total_steps - warmup_steps, 1)
  if schedule == "constant":
    main = optax.constant_schedule(learning_rate)
  elif schedule == "cosine":
    main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=min_lr_ratio)
  elif schedule == "linear":
    main = optax.linear_schedule(learning_rate, learning_rate * min_lr_ratio, decay_steps)
  else:
    raise ValueError(f"optim.schedule={schedule!r}; allowed: constant, cosine, linear")
  if warmup_steps:
    sched = optax.join_schedules(
        [optax.linear_schedule(0.0, learning_rate, warmup_steps), main], [warmup_steps])
  else:
    sched = main
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts), sched


def _response_logprobs(graphdef, params, tokens, input_mask, row_temperature, cfg: StepConfig):
  """Per-token log-probs and entropy [U * K, T] of the response tokens of [U, K, L] rows."""
  model = nnx.merge(graphdef, params)
  u, k, l = tokens.shape
  if cfg.shared_prompt:
    hidden = _shared_prompt_hidden(model, tokens, input_mask, cfg.prompt_len)
  else:
    inputs = tokens.reshape(u * k, l)[:, :-1]
    in_mask = input_mask.reshape(u * k, l)[:, :-1]
    hidden, _ = model.forward(inputs, positions=models.positions_from_mask(in_mask),
                              attention_mask=models.causal_mask(in_mask), return_hidden=True)
    # Position P-1+t predicts response token t.
    hidden = hidden[:, cfg.prompt_len - 1:]  # [N, T, D]
  # A per-row temperature is a per-row scale of the hidden state, since the LM head is linear.
  hidden = hidden / row_temperature[:, None, None].astype(hidden.dtype)
  return logprobs_lib.token_logprobs(hidden=hidden, lm_head=model.lm_head_kernel(),
                               targets=tokens.reshape(u * k, l)[:, cfg.prompt_len:],
                               vocab_chunk=cfg.vocab_chunk, impl=cfg.logprob_impl,
                               pallas_interpret=cfg.pallas_interpret)


def _micro_batch_logprobs(graphdef, params, mb, row_temperature, cfg: StepConfig):
  """`_response_logprobs` of a micro-batch, packed (`cfg.packed`) or row by row."""
  if cfg.packed:
    return _packed_logprobs(nnx.merge(graphdef, params), mb, row_temperature, cfg)
  return _response_logprobs(graphdef, params, mb["tokens"], mb["input_mask"], row_temperature,
                            cfg)


def _packed_logprobs(model, mb, row_temperature, cfg: StepConfig):
  """`_response_logprobs` of a packed micro-batch (`update_batch.pack`): the model and the LM head
  run on its [R, L] packed rows, and each response token's log-prob and entropy are gathered
  back to [U * K, T] (zero where the response has no token)."""
  packed_rows = mb["pack_row"]  # [R, L]
  segments = mb["pack_segments"]
  hidden, _ = model.forward(mb["pack_tokens"], positions=mb["pack_positions"],
                            attention_mask=models.segment_mask(segments, mb["pack_prefix"]),
                            return_hidden=True,
                            attention_windows=cfg.pack_attention_block)  # [R, L, D]
  temp = jnp.where(packed_rows >= 0, row_temperature[jnp.maximum(packed_rows, 0)], 1.0)
  hidden = hidden / temp[..., None].astype(hidden.dtype)
  logp, entropy = logprobs_lib.token_logprobs(
      hidden=hidden, lm_head=model.lm_head_kernel(), targets=mb["pack_targets"],
      vocab_chunk=cfg.vocab_chunk, impl=cfg.logprob_impl, pallas_interpret=cfg.pallas_interpret)
  u, k, t = mb["pack_index"].shape
  index = mb["pack_index"].reshape(u * k, t)
  valid = mb["resp_mask"].reshape(u * k, t) > 0
  unpack = lambda x: jnp.where(valid, x.reshape(-1)[index], 0.0)
  return unpack(logp), unpack(entropy)


def _shared_prompt_hidden(model, tokens, input_mask, p: int) -> jax.Array:
  """The hidden states [U * K, T, D] that predict the response tokens, one prompt pass per slot.

  Every slot's K rows hold the same left-padded prompt (a Mid group and its LUFFY row). The
  prompt runs once into a KV cache; the K responses run against K copies of it, so the prompt's
  forward and backward cost 1/K of the row-by-row path's. Same maths as that path: position
  P-1 (the prompt's last token) predicts response token 0, and position P-1+t token t.
  """
  u, k, l = tokens.shape
  n, s = u * k, l - 1  # Rows; keys: every input position (the last token predicts nothing).
  in_mask = input_mask[:, :, :s].reshape(n, s)
  positions = models.positions_from_mask(in_mask)  # [N, S]
  prompt_keys = jnp.pad(input_mask[:, 0, :p], ((0, 0), (0, s - p)))  # [U, S]
  prompt_causal = jnp.tril(jnp.ones((p, s), jnp.bool_))  # Query i sees keys j <= i.
  cache = models.KVCache.zeros(model.config, u, s)
  prompt_hidden, cache = model.forward(
      tokens[:, 0, :p], positions=positions.reshape(u, k, s)[:, 0, :p],
      attention_mask=prompt_causal[None] & prompt_keys[:, None, :], cache=cache,
      return_hidden=True)
  response_causal = jnp.arange(s)[None, :] <= jnp.arange(p, s)[:, None]  # [T-1, S]
  response_hidden, _ = model.forward(
      tokens[:, :, p:s].reshape(n, s - p), positions=positions[:, p:],
      attention_mask=response_causal[None] & in_mask[:, None, :], cache=cache.repeat(k),
      return_hidden=True)
  last_prompt = jnp.repeat(prompt_hidden[:, -1:], k, axis=0)  # [N, 1, D]
  return jnp.concatenate([last_prompt, response_hidden], axis=1)


def _masks(batch):
  row_kind = batch["row_kind"]
  resp = batch["resp_mask"]
  is_rollout = (row_kind == ROW_ROLLOUT)[..., None]
  is_sft = (row_kind == ROW_TEACHER_SFT)[..., None]
  is_off = (row_kind == ROW_TEACHER_OFFPOLICY)[..., None]
  return resp * is_rollout, resp * is_sft, resp * is_off


def _denominators(batch, cfg: StepConfig) -> dict[str, jax.Array]:
  """Global denominators over the whole update batch (before micro-batching)."""
  m_roll, m_sft, m_off = _masks(batch)
  u, k, t = m_roll.shape
  rl_mask = (m_roll + m_off).reshape(u * k, t)
  return dict(
      **losses.term_denominators(rl_mask=rl_mask, sft_mask=m_sft.reshape(u * k, t),
                                 rollout_mask=m_roll, rewards=batch["rewards"],
                                 loss_scale=cfg.loss_scale, agg_mode=cfg.agg_mode,
                                 max_len=cfg.max_len, length_norm=cfg.gal_length_norm),
      tokens=jnp.maximum(batch["resp_mask"].sum(), 1.0),
      sft_tokens=jnp.maximum(m_sft.sum(), 1.0),
  )


def _loss_terms(params, ref_params, graphdef, mb, denoms, cfg: StepConfig):
  """The three normalised loss terms [3] of one micro-batch, and metric sums."""
  u, k, l = mb["tokens"].shape
  t = l - cfg.prompt_len
  n = u * k
  row_kind = mb["row_kind"].reshape(n)
  temp = jnp.where(row_kind == ROW_TEACHER_SFT, 1.0, cfg.temperature).astype(jnp.float32)
  logp, entropy = _micro_batch_logprobs(graphdef, params, mb, temp, cfg)
  needs_ref = cfg.kl_coef > 0 or cfg.use_gal
  if needs_ref:
    ref_logp, _ = _micro_batch_logprobs(graphdef, jax.lax.stop_gradient(ref_params), mb, temp,
                                        cfg)
    ref_logp = jax.lax.stop_gradient(ref_logp)
  else:
    ref_logp = None

  m_roll, m_sft, m_off = (m.reshape(n, t) for m in _masks(mb))
  advantages = losses.grpo_advantages(mb["adv_rewards"], scale_by_std=cfg.scale_adv_by_std,
                                      eps=cfg.adv_eps).reshape(n)
  old_logp = mb["old_logp"].reshape(n, t)
  grpo, grpo_m = losses.grpo_loss(
      logp=logp, old_logp=old_logp, ref_logp=ref_logp, advantages=advantages, mask=m_roll,
      clip_low=cfg.clip_low, clip_high=cfg.clip_high, kl_coef=cfg.kl_coef,
      kl_estimator=cfg.kl_estimator, agg_mode=cfg.agg_mode, max_len=cfg.max_len,
      denom=denoms["grpo"])
  off, _ = losses.offpolicy_loss(logp=logp, advantages=advantages, mask=m_off,
                                 agg_mode=cfg.agg_mode, shaping=cfg.offpolicy_shaping,
                                 max_len=cfg.max_len, denom=denoms["grpo"])
  metrics = {}
  if cfg.sft_token_weight == "exp_neg_entropy":
    sft, sft_m = losses.srft_sft_loss(logp=logp, entropy=entropy, mask=m_sft, denom=denoms["sft"])
    metrics["sft/token_weight_sum"] = sft_m["weight_sum"]
  elif cfg.sft_token_weight == "p_one_minus_p":
    sft, sft_m = losses.chord_sft_loss(logp=logp, mask=m_sft, denom=denoms["sft"])
    metrics["sft/token_weight_sum"] = sft_m["weight_sum"]
  elif cfg.sft_token_weight == "none":
    sft, _ = losses.sft_loss(logp=logp, mask=m_sft, denom=denoms["sft"])
  else:
    raise ValueError(f"StepConfig.sft_token_weight={cfg.sft_token_weight!r} is not one of "
                     f"{losses.SFT_TOKEN_WEIGHTS}")
  rl_term = grpo + off
  if cfg.positive_nll_coef:  # SRFT: inside the RL term, under its denominator, like off-policy.
    pos, pos_m = losses.srft_positive_loss(logp=logp, entropy=entropy,
                                           rewards=mb["rewards"].reshape(n), mask=m_roll,
                                           denom=denoms["grpo"])
    rl_term = rl_term + cfg.positive_nll_coef * pos
    metrics.update({"srft/positive_tokens": pos_m["num_tokens"],
                    "srft/positive_weight_sum": pos_m["weight_sum"]})
  if cfg.use_gal:
    gal, gal_m = losses.gal_loss(
        logp=logp.reshape(u, k, t), ref_logp=ref_logp.reshape(u, k, t), rewards=mb["rewards"],
        mask=m_roll.reshape(u, k, t), beta=cfg.beta_gal, length_norm=cfg.gal_length_norm,
        denom=denoms["gal"])
    metrics.update({"gal/pairs": gal_m["gal_pairs"], "gal/pair_acc_sum": gal_m["pair_correct"],
                    "gal/margin_sum": gal_m["margin_sum"], "gal/eta_sum": gal_m["eta_sum"]})
  else:
    gal = jnp.zeros((), jnp.float32)
  terms = jnp.stack([sft, rl_term, gal])

  # Metric sums, divided by their global counts after the scan. Ratio, clip fraction and KL are
  # the GRPO loss's own (over rollout tokens, METHOD.md §6), never recomputed here.
  resp = mb["resp_mask"].reshape(n, t)
  metrics.update({
      "policy/entropy_sum": (entropy * resp).sum(),
      "policy/clip_frac_sum": grpo_m["clip_sum"],
      "policy/ratio_sum": grpo_m["ratio_sum"],
      "policy/rollout_tokens": grpo_m["num_tokens"],
  })
  if ref_logp is not None:
    metrics["policy/kl_sum"] = grpo_m["kl_sum"]
  # Per-teacher SFT: the sum over each trace's tokens of -logp, by teacher.
  row_nll = -(logp * m_sft).sum(-1)  # [n]
  onehot = jax.nn.one_hot(mb["teacher_id"].reshape(n), cfg.num_teachers,
                          dtype=jnp.float32)  # [n, teachers]; -1 rows are all zero.
  metrics["sft/teacher_nll_sum"] = onehot.T @ row_nll
  metrics["sft/teacher_tokens"] = onehot.T @ m_sft.sum(-1)
  return terms, metrics


def _per_term_grads(vjp_fn, dtype):
  """The gradient of each loss term, stacked on a leading [3] axis, from the terms' VJP.

  One VJP per term, not `jax.vmap(vjp_fn)(eye)`: under jit (jax 0.10.2, XLA:CPU) the vmapped VJP
  of the transformer returned wrong gradients for rows > 0 once the batch had ~128 rows (a zero
  cotangent gave a non-zero gradient; BUILD_NOTES.md, traps).
  """
  unit = jnp.eye(len(TERMS), dtype=dtype)
  per_term = [vjp_fn(unit[i])[0] for i in range(len(TERMS))]
  return jax.tree.map(lambda *g: jnp.stack(g), *per_term)


def build_term_gradients(graphdef, cfg: StepConfig, *, with_metrics: bool = False):
  """Returns the pure `(params, ref_params, batch) -> (terms [3], grads)`: each normalised loss
  term of a whole update batch (one micro-batch) and its gradient, stacked [3, ...] per parameter
  in `TERMS` order. The update descends `weights @ grads`; studies of the gradient estimator
  (experiments/variance.py) read the terms apart. With `with_metrics`, `(terms, grads,
  metric sums)`: the per-batch sums the step divides by their counts (e.g. `gal/pairs`,
  `gal/pair_acc_sum`, `gal/eta_sum`), from the same forward pass."""

  def term_gradients(params, ref_params, batch):
    denoms = _denominators(batch, cfg)
    mb = {k: v for k, v in batch.items() if k != "weights"}
    terms, vjp_fn, metrics = jax.vjp(
        lambda p: _loss_terms(p, ref_params, graphdef, mb, denoms, cfg), params, has_aux=True)
    grads = _per_term_grads(vjp_fn, terms.dtype)
    return (terms, grads, metrics) if with_metrics else (terms, grads)

  return term_gradients


def build_train_step(graphdef, cfg: StepConfig, tx: optax.GradientTransformation,
                     schedule: optax.Schedule):
  """Returns the pure step `(state, ref_params, batch, rng) -> (state, metrics)` (not jitted).

  The reference parameters sit beside the state (frozen, never donated).
  """

  def step_fn(state: TrainState, ref_params, batch, rng):
    del rng  # The update is deterministic; kept for the (state, batch, rng) signature.
    denoms = _denominators(batch, cfg)
    weights = batch["weights"].astype(jnp.float32)
    # Micro-batch j holds items j, j + M, j + 2M, ... (M = micro_batches): a strided split keeps
    # each micro-batch spread over the batch shards like U itself when it holds at least one item
    # per shard (a contiguous split would put it on one shard). With fewer, its flattened rows
    # are split over the shards inside the model (`_loss_terms`, activation_sharding).
    mbs = jax.tree.map(
        lambda x: jnp.swapaxes(
            x.reshape((x.shape[0] // cfg.micro_batches, cfg.micro_batches) + x.shape[1:]), 0, 1),
        {k: v for k, v in batch.items() if k != "weights"})

    def micro_step(carry, mb):
      def terms_fn(p):
        return _loss_terms(p, ref_params, graphdef, mb, denoms, cfg)
      terms, vjp_fn, metrics = jax.vjp(terms_fn, state.params, has_aux=True)
      if cfg.per_term_grad_norms:
        per_term = _per_term_grads(vjp_fn, terms.dtype)
        grads = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), per_term)
      else:
        per_term = None
        grads = vjp_fn(weights)[0]
      acc_grads, acc_terms, acc_term_grads, acc_metrics = carry
      acc_grads = jax.tree.map(jnp.add, acc_grads, grads)
      if per_term is not None:
        acc_term_grads = jax.tree.map(jnp.add, acc_term_grads, per_term)
      acc_metrics = jax.tree.map(jnp.add, acc_metrics, metrics)
      return (acc_grads, acc_terms + terms, acc_term_grads, acc_metrics), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    term_zeros = (jax.tree.map(lambda x: jnp.zeros((len(TERMS),) + x.shape, x.dtype),
                               state.params) if cfg.per_term_grad_norms else None)
    first_mb = jax.tree.map(lambda x: x[0], mbs)
    metric_zeros = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(lambda: _loss_terms(state.params, ref_params, graphdef, first_mb,
                                           denoms, cfg)[1]))
    init = (zeros, jnp.zeros((len(TERMS),), jnp.float32), term_zeros, metric_zeros)
    if cfg.micro_batches == 1:  # A one-iteration scan costs XLA:CPU ~3 s more compile time.
      (grads, terms, term_grads, sums), _ = micro_step(init, first_mb)
    else:
      (grads, terms, term_grads, sums), _ = jax.lax.scan(micro_step, init, mbs)

    loss = jnp.dot(weights, terms)
    grad_norm = optax.global_norm(grads)
    updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    # Finite loss and gradient are not enough (a nan learning rate, an overflowing moment): the
    # parameters the update would write must be finite too, or the update is skipped.
    params_finite = jax.tree.reduce(jnp.logical_and,
                                    jax.tree.map(lambda p: jnp.isfinite(p).all(), new_params))
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & params_finite
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    new_state = TrainState(
        step=state.step + 1, params=keep(new_params, state.params),
        opt_state=keep(new_opt_state, state.opt_state),
        nonfinite_skipped=state.nonfinite_skipped + (~ok).astype(jnp.int32))

    rollout_tokens = jnp.maximum(sums["policy/rollout_tokens"], 1.0)
    metrics = {
        "loss/total": loss, "loss/sft": terms[0], "loss/grpo": terms[1], "loss/gal": terms[2],
        "grad/norm": grad_norm, "train/update_skipped": (~ok).astype(jnp.int32),
        "train/nonfinite_skipped": new_state.nonfinite_skipped, "lr": schedule(state.step),
        "policy/entropy": sums["policy/entropy_sum"] / denoms["tokens"],
        "policy/clip_frac": sums["policy/clip_frac_sum"] / rollout_tokens,
        "policy/ratio_mean": sums["policy/ratio_sum"] / rollout_tokens,
        "sft/teacher_nll_sum": sums["sft/teacher_nll_sum"],
        "sft/teacher_tokens": sums["sft/teacher_tokens"],
        "batch/tokens": batch["resp_mask"].sum(),
    }
    if "policy/kl_sum" in sums:
      metrics["policy/kl"] = sums["policy/kl_sum"] / rollout_tokens
    if "sft/token_weight_sum" in sums:
      metrics["sft/token_weight_mean"] = sums["sft/token_weight_sum"] / denoms["sft_tokens"]
    if "srft/positive_tokens" in sums:
      metrics["srft/positive_tokens"] = sums["srft/positive_tokens"]
      metrics["srft/positive_weight_mean"] = (sums["srft/positive_weight_sum"]
                                              / jnp.maximum(sums["srft/positive_tokens"], 1.0))
    if cfg.use_gal:
      pairs = sums["gal/pairs"]
      metrics["gal/pairs"] = pairs
      metrics["gal/pair_acc"] = sums["gal/pair_acc_sum"] / jnp.maximum(pairs, 1.0)
      metrics["gal/margin"] = sums["gal/margin_sum"] / jnp.maximum(pairs, 1.0)
      metrics["gal/eta"] = sums["gal/eta_sum"] / jnp.maximum(pairs, 1.0)
    if term_grads is not None:
      for i, name in enumerate(TERMS):
        metrics[f"grad/norm_{name}"] = optax.global_norm(jax.tree.map(lambda g: g[i], term_grads))
    return new_state, metrics

  return step_fn

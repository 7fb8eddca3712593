"""Per-token log-probabilities and entropies of a causal LM head, without holding [N, T, V].

Legend: N sequences, T tokens, M = N * T flattened tokens, D embed, V vocab, C vocabulary chunk.

`token_logprobs` maps final hidden states and the output projection to, for every position, the
log-probability of its target token and the entropy of the (temperature-scaled) next-token
distribution. Three implementations share one signature:

- "full": the plain reference; materialises the [M, V] float32 logits.
- "chunked": a `lax.scan` over vocabulary chunks with a streaming logsumexp. A `jax.custom_vjp`
  recomputes each chunk's logits in the backward pass, so neither pass holds more than [M, C]
  logits. A vocabulary of at most C columns is one chunk: it takes the "full" computation. The last chunk is shifted left to end exactly at V and the columns it shares with the
  previous chunk are masked to -inf, so V need not divide by C and lm_head is never padded/copied.
- "pallas": a fused Pallas kernel, imported lazily: on a GPU backend the Triton one
  (`dypo_jax.kernels.logprob_gpu`), otherwise the Mosaic one (`dypo_jax.kernels.logprob`,
  compiled on TPU, interpreted on CPU). Both want hidden and lm_head in the same dtype.

Streaming identities, per token, over the chunks seen so far (z the scaled logits, m the running
max): s = sum exp(z - m), u = sum exp(z - m) (z - m). Then logZ = m + log s, E_p[z] = m + u / s,
entropy = logZ - E_p[z] = log s - u / s. When the max moves from m to m' both rescale by
exp(m - m'), and u also gains (m - m') s.

Backward (g_logp, g_ent the output cotangents, p = softmax(z), y the target):
  d logp / d z_j = 1[j = y] - p_j,      d entropy / d z_j = -p_j (z_j - E_p[z]),
and z = (hidden @ lm_head) / temperature, so both matmul gradients pick up 1 / temperature.
"""
import functools
from typing import Literal

import jax
import jax.numpy as jnp

Impl = Literal["chunked", "full", "pallas"]
IMPLS = ("chunked", "full", "pallas")


def logprobs_from_logits(*, logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Log-probability of `targets` and entropy under softmax(logits), in float32.

  Args:
    logits: [..., V] logits (any float dtype; already temperature-scaled if wanted).
    targets: [...] int token ids in [0, V).

  Returns:
    (logp [...] float32, entropy [...] float32).
  """
  logits = logits.astype(jnp.float32)
  logp_all = jax.nn.log_softmax(logits, axis=-1)  # [..., V]
  logp = jnp.take_along_axis(logp_all, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy


def _chunk_layout(vocab: int, vocab_chunk: int) -> tuple[int, int]:
  """(chunk width C, number of chunks) for a vocabulary of `vocab` columns."""
  chunk = min(vocab_chunk, vocab)
  return chunk, -(-vocab // chunk)


def _chunk(lm_head: jax.Array, i: jax.Array, chunk: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Chunk i of the vocabulary: (kernel [D, C], column ids [C], valid [C]).

  Chunk i nominally covers [i*C, (i+1)*C); its start is clamped to V - C so it stays in bounds,
  and the columns below i*C (already seen by chunk i-1) are marked invalid.
  """
  vocab = lm_head.shape[1]
  start = jnp.minimum(i * chunk, vocab - chunk)
  cols = start + jnp.arange(chunk)  # [C]
  valid = cols >= i * chunk  # [C]
  return jax.lax.dynamic_slice_in_dim(lm_head, start, chunk, axis=1), cols, valid


def _chunk_logits(hidden, w_chunk, inv_temp):
  """[M, C] float32 scaled logits of one chunk."""
  z = jnp.einsum("MD,DC->MC", hidden, w_chunk, preferred_element_type=jnp.float32)
  return z * inv_temp


def _chunked_forward(hidden, lm_head, targets, inv_temp, vocab_chunk):
  """Streaming pass: (logp [M], entropy [M], logZ [M], mean_z [M])."""
  m_tokens = hidden.shape[0]
  chunk, num_chunks = _chunk_layout(lm_head.shape[1], vocab_chunk)

  def body(carry, i):
    run_max, s, u, z_target = carry
    w_chunk, cols, valid = _chunk(lm_head, i, chunk)
    z = _chunk_logits(hidden, w_chunk, inv_temp)  # [M, C]
    z_valid = jnp.where(valid[None, :], z, -jnp.inf)
    new_max = jnp.maximum(run_max, jnp.max(z_valid, axis=-1))  # finite: every chunk has a column
    shift = jnp.where(jnp.isfinite(run_max), run_max - new_max, 0.0)  # <= 0
    scale = jnp.exp(shift)
    zc = z - new_max[:, None]
    e = jnp.where(valid[None, :], jnp.exp(jnp.minimum(zc, 0.0)), 0.0)  # [M, C]
    s_new = s * scale + jnp.sum(e, axis=-1)
    u_new = (u + shift * s) * scale + jnp.sum(e * jnp.where(valid[None, :], zc, 0.0), axis=-1)
    hit = valid[None, :] & (cols[None, :] == targets[:, None])  # [M, C]
    z_target = z_target + jnp.sum(jnp.where(hit, z, 0.0), axis=-1)
    return (new_max, s_new, u_new, z_target), None

  init = (jnp.full((m_tokens,), -jnp.inf, jnp.float32),) + tuple(
      jnp.zeros((m_tokens,), jnp.float32) for _ in range(3))
  (run_max, s, u, z_target), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  log_z = run_max + jnp.log(s)
  logp = z_target - log_z
  entropy = jnp.log(s) - u / s
  mean_z = run_max + u / s
  return logp, entropy, log_z, mean_z


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunked(hidden, lm_head, targets, inv_temp, vocab_chunk):
  logp, entropy, _, _ = _chunked_forward(hidden, lm_head, targets, inv_temp, vocab_chunk)
  return logp, entropy


def _chunked_fwd(hidden, lm_head, targets, inv_temp, vocab_chunk):
  logp, entropy, log_z, mean_z = _chunked_forward(hidden, lm_head, targets, inv_temp, vocab_chunk)
  # Residuals are O(M*D + D*V + M): the [M, C] logits are recomputed in the backward pass.
  return (logp, entropy), (hidden, lm_head, targets, inv_temp, log_z, mean_z)


def _chunked_bwd(vocab_chunk, res, cotangents):
  hidden, lm_head, targets, inv_temp, log_z, mean_z = res
  g_logp, g_ent = (g.astype(jnp.float32) for g in cotangents)
  chunk, num_chunks = _chunk_layout(lm_head.shape[1], vocab_chunk)

  def body(carry, i):
    d_hidden, d_lm_head = carry
    w_chunk, cols, valid = _chunk(lm_head, i, chunk)
    z = _chunk_logits(hidden, w_chunk, inv_temp)  # [M, C]
    p = jnp.where(valid[None, :], jnp.exp(jnp.minimum(z - log_z[:, None], 0.0)), 0.0)
    hit = valid[None, :] & (cols[None, :] == targets[:, None])
    dz = (g_logp[:, None] * (hit.astype(jnp.float32) - p)
          - g_ent[:, None] * p * (z - mean_z[:, None]))  # [M, C], zero on invalid columns
    dz = dz * inv_temp
    d_hidden = d_hidden + jnp.einsum(
        "MC,DC->MD", dz, w_chunk.astype(jnp.float32), preferred_element_type=jnp.float32)
    dw = jnp.einsum("MD,MC->DC", hidden.astype(jnp.float32), dz,
                    preferred_element_type=jnp.float32)
    start = jnp.minimum(i * chunk, lm_head.shape[1] - chunk)
    # Add, not overwrite: a shifted last chunk overlaps columns the previous chunk wrote.
    old = jax.lax.dynamic_slice_in_dim(d_lm_head, start, chunk, axis=1)
    d_lm_head = jax.lax.dynamic_update_slice_in_dim(d_lm_head, old + dw, start, axis=1)
    return (d_hidden, d_lm_head), None

  init = (jnp.zeros(hidden.shape, jnp.float32), jnp.zeros(lm_head.shape, jnp.float32))
  (d_hidden, d_lm_head), _ = jax.lax.scan(body, init, jnp.arange(num_chunks))
  # Integer targets take a float0 cotangent; temperature is not differentiated.
  d_targets = jnp.zeros(targets.shape, jax.dtypes.float0)
  return (d_hidden.astype(hidden.dtype), d_lm_head.astype(lm_head.dtype), d_targets,
          jnp.zeros_like(inv_temp))


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def fused_kernel(backend: str):
  """The Pallas kernel module for a JAX backend: Triton on "gpu", Mosaic otherwise (compiled on
  "tpu", interpreted on "cpu"). Imported lazily: Pallas is not needed by the other impls."""
  # pylint: disable-next=g-import-not-at-top
  from dypo_jax.kernels import logprob, logprob_gpu
  return logprob_gpu if backend == "gpu" else logprob


def token_logprobs(
    *,
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    temperature: float | jax.Array = 1.0,
    vocab_chunk: int = 4096,
    impl: Impl = "chunked",
    pallas_interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Target log-probabilities and entropies of softmax((hidden @ lm_head) / temperature).

  Args:
    hidden: [N, T, D] final hidden states, any float dtype.
    lm_head: [D, V] output projection kernel.
    targets: [N, T] int token ids in [0, V).
    temperature: softmax temperature (> 0); a Python float or a traced scalar.
    vocab_chunk: vocabulary chunk width C for impl="chunked" (need not divide V).
    impl: "chunked" (default, O(M*C) memory forward and backward), "full" (reference) or
      "pallas" (dypo_jax.kernels.logprob.fused_token_logprobs).
    pallas_interpret: for impl="pallas": run the Pallas interpreter (True), compile the kernel
      for the backend (False: Mosaic on TPU, Triton on GPU) or decide by backend (None:
      interpreter on CPU only).

  Returns:
    (logp [N, T] float32, entropy [N, T] float32); both differentiable w.r.t. hidden and lm_head.
  """
  if impl not in IMPLS:
    raise ValueError(f"token_logprobs: impl={impl!r} is not one of {IMPLS}")
  if hidden.ndim != 3 or lm_head.ndim != 2 or targets.shape != hidden.shape[:2]:
    raise ValueError(
        f"token_logprobs: want hidden [N,T,D], lm_head [D,V], targets [N,T]; got hidden "
        f"{hidden.shape}, lm_head {lm_head.shape}, targets {targets.shape}")
  if hidden.shape[2] != lm_head.shape[0]:
    raise ValueError(f"token_logprobs: hidden D={hidden.shape[2]} != lm_head D={lm_head.shape[0]}")
  if vocab_chunk < 1:
    raise ValueError(f"token_logprobs: vocab_chunk={vocab_chunk} must be >= 1")
  n, t, d = hidden.shape
  hidden2d = hidden.reshape(n * t, d)  # [M, D]
  targets1d = targets.reshape(n * t).astype(jnp.int32)  # [M]
  # A vocabulary within one chunk holds the same [M, V] logits either way; computed directly,
  # autodiff also drops the entropy's backward when the loss does not use it (the custom_vjp
  # would compute it against a zero cotangent).
  if impl == "full" or (impl == "chunked" and lm_head.shape[1] <= vocab_chunk):
    logits = jnp.einsum("MD,DV->MV", hidden2d, lm_head, preferred_element_type=jnp.float32)
    logp, entropy = logprobs_from_logits(logits=logits / temperature, targets=targets1d)
  elif impl == "chunked":
    inv_temp = 1.0 / jnp.asarray(temperature, jnp.float32)
    logp, entropy = _chunked(hidden2d, lm_head, targets1d, inv_temp, int(vocab_chunk))
  else:
    # The kernel takes one dtype for both operands (the compute dtype of the hidden state).
    logp, entropy = fused_kernel(jax.default_backend()).fused_token_logprobs(
        hidden2d, lm_head.astype(hidden2d.dtype), targets1d, temperature=temperature,
        interpret=pallas_interpret)
  return logp.reshape(n, t), entropy.reshape(n, t)

"""Fused LM head + log-softmax: target log-probs and entropies without the [M, V] logits.

Legend: M tokens, D embed, V vocab; bm / bv the block sizes along M / V.

`fused_token_logprobs(hidden [M, D], lm_head [D, V], targets [M])` returns, per token, the
log-probability of its target and the entropy of softmax(z), z = (hidden @ lm_head) / temperature
(float32 accumulation). Neither z nor softmax(z) is ever held for more than one [bm, bv] block.

Forward: one Pallas kernel, grid (M blocks "parallel", V blocks "arbitrary", innermost). Each row
keeps four running statistics in VMEM scratch across the V axis (online softmax):
  m  running max of z      l  sum exp(z - m)      u  sum exp(z - m) (z - m)      z_t  target logit
(the target lies in exactly one V block). When a block raises the max from m to m', the sums
seen so far become l <- a l and u <- a (u + (m - m') l) with a = exp(m - m'). After the last
block: lse = m + log l, E_p[z] = m + u / l, logp = z_t - lse, entropy = log l - u / l. Keeping u
relative to m avoids the cancellation of entropy = lse - E_p[z] when logits are large.

Backward (`jax.custom_vjp`; g_logp, g_ent the output cotangents, p = softmax(z), t the target):
  d logp / d z_j = 1[j = t] - p_j,     d entropy / d z_j = -p_j (z_j - E_p[z]),
  dz_j = g_logp (1[j = t] - p_j) - g_ent p_j (z_j - E_p[z]),   d logits_j = dz_j / temperature,
with lse and E_p[z] = lse - entropy saved from the forward. Two Pallas kernels recompute each
block's logits: one accumulates d_hidden = dlogits @ lm_head^T over the V axis (grid M x V), the
other d_lm_head = hidden^T @ dlogits over the M axis (grid V x M). Each output block is revisited
only on consecutive grid steps, as TPU output accumulation requires. Cost: 5 matmuls of
hidden @ lm_head size in total (forward 1, backward 2 recomputes + 2 gradients) against 3 for the
unfused path; memory is O(bm * bv + (M + V) * D).

Targets: no gradient; ids must lie in [0, V) (an id outside it matches no column, so its logp is
-lse instead of an error). M and V need not divide by the blocks: the grids round up and the edge
blocks are ragged (Pallas leaves their out-of-range part undefined; the interpreter fills it with
NaN). Columns >= V are masked out of the softmax, and undefined lm_head columns / hidden rows are
zeroed wherever a matmul would mix them into valid results. Nothing is padded, so lm_head [D, V]
and its gradient are never copied (padding V=151,936 to 512-column blocks would copy D x V twice).

Backends: the kernels are written for TPU (Mosaic): BlockSpecs with index maps, a sequential
("arbitrary") grid axis with VMEM scratch accumulators, blocks of (8k, 128k). With
`interpret=True` they run anywhere (CPU, GPU) through the Pallas interpreter: exact but slow.
Compiled GPU (Triton) is not supported by this kernel (its grid axes are not sequential):
`logprob_gpu` is the GPU version, with the same signature.
`interpret=None` picks True when `jax.default_backend() == "cpu"`, else False; callers that read a
config should pass it explicitly.

`reference_token_logprobs` has the same signature and computes the same with a full
`jax.nn.log_softmax` over [M, V] float32 logits (the test oracle and CPU-safe fallback).
"""
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp

_SUBLANES = 8  # TPU block second-to-last dims must be multiples of this ...
_LANES = 128  # ... and last dims multiples of this.
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _round_up(x: int, k: int) -> int:
  return -(-x // k) * k


def _resolve_interpret(interpret: bool | None) -> bool:
  """None -> interpret on CPU only.

  Compiled mode (False) is not checked against the backend, so the kernels can also be compiled
  ahead of time for a TPU topology from a CPU host; on a backend without Mosaic it fails to lower.
  """
  if interpret is None:
    return jax.default_backend() == "cpu"
  return interpret


def check_operands(name, hidden, lm_head, targets, temperature):
  """Raises ValueError naming the offending tensor (shared by the TPU and GPU kernels)."""
  if hidden.ndim != 2 or lm_head.ndim != 2 or targets.ndim != 1:
    raise ValueError(
        f"{name}: want hidden [M, D], lm_head [D, V], targets [M]; got hidden {hidden.shape}, "
        f"lm_head {lm_head.shape}, targets {targets.shape}")
  if hidden.shape[1] != lm_head.shape[0]:
    raise ValueError(f"{name}: hidden D={hidden.shape[1]} != lm_head D={lm_head.shape[0]}")
  if targets.shape[0] != hidden.shape[0]:
    raise ValueError(f"{name}: targets M={targets.shape[0]} != hidden M={hidden.shape[0]}")
  if hidden.dtype != lm_head.dtype or jnp.dtype(hidden.dtype) not in _DTYPES:
    raise ValueError(
        f"{name}: hidden ({hidden.dtype}) and lm_head ({lm_head.dtype}) must share one dtype, "
        "float32 or bfloat16")
  if not jnp.issubdtype(targets.dtype, jnp.integer):
    raise ValueError(f"{name}: targets must be integer, got {targets.dtype}")
  if isinstance(temperature, (int, float)) and not temperature > 0:
    raise ValueError(f"{name}: temperature={temperature} must be > 0")


def _check_inputs(hidden, lm_head, targets, temperature, block_m, block_v):
  """Raises ValueError naming the offending tensor / argument."""
  check_operands("fused_token_logprobs", hidden, lm_head, targets, temperature)
  if block_m < 1 or block_m % _SUBLANES or block_v < 1 or block_v % _LANES:
    raise ValueError(
        f"fused_token_logprobs: block_m={block_m} must be a positive multiple of {_SUBLANES} and "
        f"block_v={block_v} a positive multiple of {_LANES}")


def _block_logits(inv_temp_ref, h, w, j, block_v, vocab):
  """Scaled logits of block j: (z [bm, bv] float32, column ids [bm, bv], valid columns [bm, bv]).

  Columns >= V (the ragged edge of the last block: undefined values) are set to z = 0 here and
  must be masked out of every sum by `valid`.
  """
  z = jnp.dot(h, w, preferred_element_type=jnp.float32) * inv_temp_ref[0]
  cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, z.shape, 1)
  valid = cols < vocab
  return jnp.where(valid, z, 0.0), cols, valid


def _forward_kernel(inv_temp_ref, h_ref, w_ref, t_ref,  # inputs
                    logp_ref, ent_ref, lse_ref,  # outputs, [bm, 1] each
                    m_sc, l_sc, u_sc, zt_sc,  # scratch, [bm, 1] each
                    *, block_v, vocab):
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    m_sc[...] = jnp.full_like(m_sc, -jnp.inf)
    l_sc[...] = jnp.zeros_like(l_sc)
    u_sc[...] = jnp.zeros_like(u_sc)
    zt_sc[...] = jnp.zeros_like(zt_sc)

  z, cols, valid = _block_logits(inv_temp_ref, h_ref[...], w_ref[...], j, block_v, vocab)
  # Online softmax: m' = max(m, max_j z_j); old sums are rescaled by a = exp(m - m') and u also
  # gains (m - m') l. Every block holds a valid column, so m' is finite; at j = 0, l = u = 0 and
  # the shift is taken as 0 to avoid -inf * 0.
  m_prev, l_prev = m_sc[...], l_sc[...]  # [bm, 1]
  m_new = jnp.maximum(m_prev, jnp.max(jnp.where(valid, z, -jnp.inf), axis=1, keepdims=True))
  shift = jnp.where(j == 0, 0.0, m_prev - m_new)  # [bm, 1], <= 0
  rescale = jnp.exp(shift)
  zc = z - m_new  # [bm, bv], <= 0 on valid columns
  e = jnp.where(valid, jnp.exp(zc), 0.0)  # columns >= V count for nothing
  l_sc[...] = rescale * l_prev + jnp.sum(e, axis=1, keepdims=True)
  u_sc[...] = rescale * (u_sc[...] + shift * l_prev) + jnp.sum(e * zc, axis=1, keepdims=True)
  zt_sc[...] += jnp.sum(jnp.where(cols == t_ref[...], z, 0.0), axis=1, keepdims=True)
  m_sc[...] = m_new

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    log_l = jnp.log(l_sc[...])
    lse = m_sc[...] + log_l
    lse_ref[...] = lse
    logp_ref[...] = zt_sc[...] - lse
    ent_ref[...] = log_l - u_sc[...] / l_sc[...]


def _block_dlogits(inv_temp_ref, h, w, t_ref, rows_ref, j, block_v, vocab):
  """d loss / d (hidden @ lm_head) for block j, [bm, bv] float32; zero on columns >= V.

  rows_ref [bm, 4] holds per-token (lse, E_p[z], g_logp, g_ent).
  """
  z, cols, valid = _block_logits(inv_temp_ref, h, w, j, block_v, vocab)
  rows = rows_ref[...]
  lse, mean_z, g_logp, g_ent = (rows[:, k:k + 1] for k in range(4))  # [bm, 1] each
  p = jnp.where(valid, jnp.exp(z - lse), 0.0)
  onehot = (cols == t_ref[...]).astype(jnp.float32)
  dz = g_logp * (onehot - p) - g_ent * p * (z - mean_z)
  return dz * inv_temp_ref[0]


def _dhidden_kernel(inv_temp_ref, h_ref, w_ref, t_ref, rows_ref, dh_ref, acc_sc, *, block_v,
                    vocab):
  """Grid (M blocks, V blocks): d_hidden[i] = sum_j dlogits[i, j] @ lm_head[:, j]^T."""
  j = pl.program_id(1)

  @pl.when(j == 0)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)

  w = w_ref[...]  # [D, bv]
  if vocab % block_v:  # Zero the undefined columns >= V of the edge block (NaN * 0 = NaN).
    w_cols = j * block_v + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
    w = jnp.where(w_cols < vocab, w, jnp.zeros_like(w))
  dlogits = _block_dlogits(inv_temp_ref, h_ref[...], w, t_ref, rows_ref, j, block_v, vocab)
  acc_sc[...] += jax.lax.dot_general(  # 'MV,DV->MD'
      dlogits.astype(w.dtype), w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(j == pl.num_programs(1) - 1)
  def _finish():
    dh_ref[...] = acc_sc[...].astype(dh_ref.dtype)


def _dlm_head_kernel(inv_temp_ref, h_ref, w_ref, t_ref, rows_ref, dw_ref, acc_sc, *, block_m,
                     block_v, tokens, vocab):
  """Grid (V blocks, M blocks): d_lm_head[:, j] = sum_i hidden[i]^T @ dlogits[i, j]."""
  j, i = pl.program_id(0), pl.program_id(1)

  @pl.when(i == 0)
  def _init():
    acc_sc[...] = jnp.zeros_like(acc_sc)

  h = h_ref[...]  # [bm, D]
  dlogits = _block_dlogits(inv_temp_ref, h, w_ref[...], t_ref, rows_ref, j, block_v, vocab)
  if tokens % block_m:  # Rows >= M of the edge block are undefined: keep them out of the sum.
    rows_valid = i * block_m + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0) < tokens
    h = jnp.where(rows_valid, h, jnp.zeros_like(h))
    dlogits = jnp.where(rows_valid, dlogits, 0.0)
  acc_sc[...] += jax.lax.dot_general(  # 'MD,MV->DV'
      h, dlogits.astype(h.dtype), (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

  @pl.when(i == pl.num_programs(1) - 1)
  def _finish():
    dw_ref[...] = acc_sc[...].astype(dw_ref.dtype)


def _smem_spec():
  return pl.BlockSpec(memory_space=pltpu.SMEM)


def _forward(hidden, lm_head, targets, inv_temp, block_m, block_v, interpret):
  """(logp, entropy, lse), [M, 1] float32 each. Grids round up: edge blocks are ragged."""
  (m, d), vocab = hidden.shape, lm_head.shape[1]
  row = pl.BlockSpec((block_m, 1), lambda i, j: (i, 0))
  return pl.pallas_call(
      functools.partial(_forward_kernel, block_v=block_v, vocab=vocab),
      out_shape=[jax.ShapeDtypeStruct((m, 1), jnp.float32)] * 3,
      grid=(pl.cdiv(m, block_m), pl.cdiv(vocab, block_v)),
      in_specs=[_smem_spec(),
                pl.BlockSpec((block_m, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, block_v), lambda i, j: (0, j)),
                row],
      out_specs=[row] * 3,
      scratch_shapes=[pltpu.VMEM((block_m, 1), jnp.float32)] * 4,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * d * vocab, transcendentals=m * vocab,
          bytes_accessed=(hidden.nbytes * pl.cdiv(vocab, block_v)
                          + lm_head.nbytes * pl.cdiv(m, block_m))),
      interpret=interpret,
      name="fused_logprob_fwd",
  )(inv_temp, hidden, lm_head, targets)


def _backward(hidden, lm_head, targets, inv_temp, rows, block_m, block_v, interpret):
  """rows [M, 4] = (lse, E_p[z], g_logp, g_ent) -> (d_hidden [M, D], d_lm_head [D, V])."""
  (m, d), vocab = hidden.shape, lm_head.shape[1]
  nm, nv = pl.cdiv(m, block_m), pl.cdiv(vocab, block_v)
  # d_hidden: grid (i over M, j over V), j innermost and sequential.
  d_hidden = pl.pallas_call(
      functools.partial(_dhidden_kernel, block_v=block_v, vocab=vocab),
      out_shape=jax.ShapeDtypeStruct((m, d), hidden.dtype),
      grid=(nm, nv),
      in_specs=[_smem_spec(),
                pl.BlockSpec((block_m, d), lambda i, j: (i, 0)),
                pl.BlockSpec((d, block_v), lambda i, j: (0, j)),
                pl.BlockSpec((block_m, 1), lambda i, j: (i, 0)),
                pl.BlockSpec((block_m, 4), lambda i, j: (i, 0))],
      out_specs=pl.BlockSpec((block_m, d), lambda i, j: (i, 0)),
      scratch_shapes=[pltpu.VMEM((block_m, d), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="fused_logprob_bwd_hidden",
  )(inv_temp, hidden, lm_head, targets, rows)
  # d_lm_head: grid (j over V, i over M), i innermost and sequential.
  d_lm_head = pl.pallas_call(
      functools.partial(_dlm_head_kernel, block_m=block_m, block_v=block_v, tokens=m,
                        vocab=vocab),
      out_shape=jax.ShapeDtypeStruct((d, vocab), lm_head.dtype),
      grid=(nv, nm),
      in_specs=[_smem_spec(),
                pl.BlockSpec((block_m, d), lambda j, i: (i, 0)),
                pl.BlockSpec((d, block_v), lambda j, i: (0, j)),
                pl.BlockSpec((block_m, 1), lambda j, i: (i, 0)),
                pl.BlockSpec((block_m, 4), lambda j, i: (i, 0))],
      out_specs=pl.BlockSpec((d, block_v), lambda j, i: (0, j)),
      scratch_shapes=[pltpu.VMEM((d, block_v), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
      interpret=interpret,
      name="fused_logprob_bwd_lm_head",
  )(inv_temp, hidden, lm_head, targets, rows)
  return d_hidden, d_lm_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused(hidden, lm_head, targets, inv_temp, block_m, block_v, interpret):
  logp, entropy, _ = _forward(hidden, lm_head, targets, inv_temp, block_m, block_v, interpret)
  return logp, entropy


def _fused_fwd(hidden, lm_head, targets, inv_temp, block_m, block_v, interpret):
  logp, entropy, lse = _forward(hidden, lm_head, targets, inv_temp, block_m, block_v, interpret)
  return (logp, entropy), (hidden, lm_head, targets, inv_temp, lse, entropy)


def _fused_bwd(block_m, block_v, interpret, res, cotangents):
  hidden, lm_head, targets, inv_temp, lse, entropy = res
  g_logp, g_ent = cotangents  # [M, 1] float32 each
  rows = jnp.concatenate([lse, lse - entropy, g_logp, g_ent], axis=1)  # [M, 4]
  d_hidden, d_lm_head = _backward(hidden, lm_head, targets, inv_temp, rows, block_m, block_v,
                                  interpret)
  # Integer targets get no cotangent (None); temperature is not differentiated.
  return d_hidden, d_lm_head, None, jnp.zeros_like(inv_temp)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    block_m: int = 256,
    block_v: int = 512,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Log-prob of `targets` and entropy under softmax((hidden @ lm_head) / temperature), fused.

  Args:
    hidden: [M, D] float32 or bfloat16 final hidden states.
    lm_head: [D, V] output projection, same dtype as `hidden`.
    targets: [M] integer token ids in [0, V); not differentiated.
    temperature: softmax temperature > 0 (Python float or traced scalar; not differentiated).
    block_m: rows per block, a multiple of 8 (clamped to M rounded up to 8). On TPU prefer
      multiples of 16 for bfloat16 and >= 128 for MXU efficiency.
    block_v: vocab columns per block, a multiple of 128 (clamped to V rounded up to 128).
    interpret: run the Pallas interpreter. None -> True iff jax.default_backend() == "cpu";
      compiled mode (False) needs TPU.

  Returns:
    (logp [M] float32, entropy [M] float32), differentiable w.r.t. hidden and lm_head.
  """
  _check_inputs(hidden, lm_head, targets, temperature, block_m, block_v)
  interpret = _resolve_interpret(interpret)
  m, vocab = hidden.shape[0], lm_head.shape[1]
  bm, bv = min(block_m, _round_up(m, _SUBLANES)), min(block_v, _round_up(vocab, _LANES))
  inv_temp = jnp.reshape(1.0 / jnp.asarray(temperature, jnp.float32), (1,))  # SMEM scalar
  logp, entropy = _fused(hidden, lm_head, targets.astype(jnp.int32)[:, None], inv_temp, bm, bv,
                         interpret)
  return logp[:, 0], entropy[:, 0]


def reference_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    block_m: int | None = None,
    block_v: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Plain-jnp `fused_token_logprobs`: full [M, V] float32 logits and jax.nn.log_softmax.

  Same signature; block_m, block_v and interpret are accepted and ignored.
  """
  del block_m, block_v, interpret
  logits = jnp.dot(hidden, lm_head, preferred_element_type=jnp.float32) / temperature  # [M, V]
  logp_all = jax.nn.log_softmax(logits, axis=-1)  # [M, V]
  logp = jnp.take_along_axis(logp_all, targets.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  entropy = -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
  return logp, entropy

"""Fused LM head + log-softmax for GPUs (Pallas Triton): log-probs and entropies without [M, V].

Legend: M tokens, D embed, V vocab, S vocab splits; bm / bv / bd the block sizes along M / V / D.

Same maths and signature as `logprob.fused_token_logprobs` (the TPU/Mosaic kernel; its docstring
derives the online-softmax statistics and the backward), laid out for Triton, whose grid programs
run in parallel with no ordering, so nothing may accumulate across grid steps in an output block:

Forward, grid (M blocks, S splits). Program (i, s) walks its share of the V blocks in a loop,
building each [bm, bv] logits tile from D chunks (a [bm, D] row block does not fit a GPU's
registers at D in the thousands) and keeping per row the running max m, l = sum exp(z - m),
u = sum exp(z - m)(z - m) and the target logit. The S partial statistics are merged outside the
kernel (a few [S, M] arrays). S spreads the vocabulary over more programs than M / bm alone gives.

Backward, grid (M blocks, V blocks). Program (i, j) recomputes its logits tile, forms dlogits
from the saved lse and E_p[z], and adds its two products, dlogits @ lm_head[:, j]^T into
d_hidden[i] and hidden[i]^T @ dlogits into d_lm_head[:, j], D chunk by D chunk, with atomic adds
into float32 accumulators. The backward runs as one call per slab of vocabulary columns in a
loop, so the d_lm_head accumulator is [D, slab] float32, cast into d_lm_head as each slab
completes. Cost: 4 matmuls of hidden @ lm_head size (forward 1, backward 1 recompute + 2
gradients). Memory
beyond the inputs and gradients: an [M, D] and a [D, slab] float32 accumulator and O(S M)
statistics. Atomic adds make the gradients' float32 summation order vary from run to run
(values agree to rounding). float32 inputs follow JAX's default matmul precision, as XLA's dots
do (TF32 on recent NVIDIA GPUs; `jax.default_matmul_precision("float32")` for full float32).

Ragged edges: loads outside [M, D, V] are masked to 0, columns >= V are kept out of the softmax
and the accumulators are allocated at whole blocks (sliced after). Blocks are powers of two >= 16
(Triton's tensor and dot constraints).

`interpret=True` runs it in the Pallas interpreter on any backend (how the CPU tests run it);
`interpret=None` means True on CPU and compiled (Triton) otherwise; compiled needs a GPU (checked
on an NVIDIA H100; BUILD_NOTES.md "GPU"). The TPU kernel is `logprob.fused_token_logprobs`; `dypo_jax.models.logprobs` picks by backend.
"""
import dataclasses
import functools

import jax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import jax.numpy as jnp

from dypo_jax.kernels import logprob

# The plain-jnp oracle: same signature (block arguments accepted and ignored).
reference_token_logprobs = logprob.reference_token_logprobs

_MIN_BLOCK = 16  # Triton's dot wants every dimension >= 16.
# (block_m, block_v, block_d, num_warps, vocab_splits) by input dtype, from
# benchmarks/logprob_gpu_blocks.py on an H100 at M=4096, D=896, V=151,936. float32 tiles are
# twice the bytes: at the bfloat16 setting they ask for 240-288 KiB of shared memory, over an
# H100's 227 KiB.
_DEFAULTS = {
    jnp.dtype(jnp.bfloat16): (128, 256, 64, 8, 4),
    jnp.dtype(jnp.float32): (64, 128, 64, 4, 8),
}


def _pow2_at_least(x: int, floor: int = _MIN_BLOCK) -> int:
  return max(floor, pl.next_power_of_2(x))


def _round_up(x: int, k: int) -> int:
  return -(-x // k) * k


def _check_inputs(hidden, lm_head, targets, temperature, blocks):
  """Raises ValueError naming the offending tensor / argument."""
  name = "fused_token_logprobs (gpu)"
  logprob.check_operands(name, hidden, lm_head, targets, temperature)
  for key, value in blocks.items():
    if value < _MIN_BLOCK or value & (value - 1):
      raise ValueError(f"{name}: {key}={value} must be a power of two >= {_MIN_BLOCK}")


@dataclasses.dataclass(frozen=True)
class _Dims:
  """Static sizes shared by the kernels (hashable: it is a nondiff argument of the custom_vjp)."""
  tokens: int  # M
  embed: int  # D
  vocab: int  # V (of one backward slab, in `_backward_slab`)
  bm: int
  bv: int
  bd: int
  splits_wanted: int
  num_warps: int
  slab_wanted: int

  @property
  def nm(self):
    return pl.cdiv(self.tokens, self.bm)

  @property
  def nv(self):
    return pl.cdiv(self.vocab, self.bv)

  @property
  def nd(self):
    return pl.cdiv(self.embed, self.bd)

  @property
  def blocks_per_split(self):
    return pl.cdiv(self.nv, self.splits_wanted)

  @property
  def splits(self):  # No split without a block.
    return pl.cdiv(self.nv, self.blocks_per_split)

  @property
  def slab_cols(self):  # Whole vocab blocks.
    return max(1, self.slab_wanted // self.bv) * self.bv


def _rows(i, dims):
  """Row ids of block i and which of them lie in [0, M), [bm] each."""
  rows = i * dims.bm + jnp.arange(dims.bm)
  return rows, rows < dims.tokens


def _cols(j, dims):
  """Column ids of vocab block j and which of them lie in [0, V), [bv] each."""
  cols = j * dims.bv + jnp.arange(dims.bv)  # j counts from column 0 of the vocabulary.
  return cols, cols < dims.vocab


def _load_hidden(h_ref, i, k, row_ok, dims):
  """hidden[i-th row block, k-th D chunk], [bm, bd], zero outside [M, D]."""
  k_ok = k * dims.bd + jnp.arange(dims.bd) < dims.embed
  return plgpu.load(h_ref.at[pl.ds(i * dims.bm, dims.bm), pl.ds(k * dims.bd, dims.bd)],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)


def _load_lm_head(w_ref, k, j, col_ok, dims):
  """lm_head[k-th D chunk, j-th vocab block], [bd, bv], zero outside [D, V]."""
  k_ok = k * dims.bd + jnp.arange(dims.bd) < dims.embed
  return plgpu.load(w_ref.at[pl.ds(k * dims.bd, dims.bd), pl.ds(j * dims.bv, dims.bv)],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)


def _dot_general(a, b, contract):
  """float32-accumulated a . b. float32 inputs follow JAX's default matmul precision, as XLA's
  dots do: TF32 on recent NVIDIA GPUs unless `jax.default_matmul_precision("float32")`."""
  return jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)


def _logits_tile(inv_temp_ref, h_ref, w_ref, i, j, row_ok, col_ok, dims):
  """z = (hidden @ lm_head)[block i, block j] / temperature, [bm, bv] float32 (0 off range)."""

  def add_chunk(k, acc):
    h = _load_hidden(h_ref, i, k, row_ok, dims)
    w = _load_lm_head(w_ref, k, j, col_ok, dims)
    return acc + _dot_general(h, w, ((1,), (0,)))  # 'MD,DV->MV'

  acc = jax.lax.fori_loop(0, dims.nd, add_chunk, jnp.zeros((dims.bm, dims.bv), jnp.float32))
  return acc * inv_temp_ref[...]  # [1, 1] broadcasts


def _forward_kernel(inv_temp_ref, h_ref, w_ref, t_ref,  # inputs
                    max_ref, sum_ref, moment_ref, target_ref,  # outputs, [S, M] each
                    *, dims):
  i, s = pl.program_id(0), pl.program_id(1)
  _, row_ok = _rows(i, dims)
  row_block = pl.ds(i * dims.bm, dims.bm)
  targets = plgpu.load(t_ref.at[row_block], mask=row_ok, other=0)  # [bm]
  first = s * dims.blocks_per_split
  last = jnp.minimum(first + dims.blocks_per_split, dims.nv)

  def vocab_block(j, carry):
    m_prev, l_prev, u_prev, z_target = carry  # [bm] each
    cols, col_ok = _cols(j, dims)
    z = _logits_tile(inv_temp_ref, h_ref, w_ref, i, j, row_ok, col_ok, dims)
    m_new = jnp.maximum(m_prev, jnp.max(jnp.where(col_ok[None, :], z, -jnp.inf), axis=1))
    # The first block has no sums to rescale: shift 0 avoids -inf * 0.
    shift = jnp.where(j == first, 0.0, m_prev - m_new)  # <= 0
    rescale = jnp.exp(shift)
    zc = z - m_new[:, None]
    e = jnp.where(col_ok[None, :], jnp.exp(zc), 0.0)
    l_new = rescale * l_prev + jnp.sum(e, axis=1)
    u_new = rescale * (u_prev + shift * l_prev) + jnp.sum(e * zc, axis=1)
    z_target = z_target + jnp.sum(jnp.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    return m_new, l_new, u_new, z_target

  zeros = jnp.zeros((dims.bm,), jnp.float32)
  stats = jax.lax.fori_loop(first, last, vocab_block,
                            (jnp.full((dims.bm,), -jnp.inf, jnp.float32), zeros, zeros, zeros))
  for ref, value in zip((max_ref, sum_ref, moment_ref, target_ref), stats):
    plgpu.store(ref.at[s, row_block], value, mask=row_ok)


def _merge_splits(m, l, u, z_target):
  """[S, M] partial statistics -> (logp, entropy, lse), [M] each.

  Each split saw at least one valid column, so every m is finite and l >= 1.
  """
  m_all = jnp.max(m, axis=0)
  scale = jnp.exp(m - m_all)  # [S, M]
  l_all = jnp.sum(scale * l, axis=0)
  u_all = jnp.sum(scale * (u + (m - m_all) * l), axis=0)
  log_l = jnp.log(l_all)
  lse = m_all + log_l
  return jnp.sum(z_target, axis=0) - lse, log_l - u_all / l_all, lse


def _forward(hidden, lm_head, targets, inv_temp, dims, interpret):
  """(logp, entropy, lse), [M] float32 each."""
  m, d, v = dims.tokens, dims.embed, dims.vocab
  stat = jax.ShapeDtypeStruct((dims.splits, m), jnp.float32)
  stats = pl.pallas_call(
      functools.partial(_forward_kernel, dims=dims),
      out_shape=[stat] * 4,
      grid=(dims.nm, dims.splits),
      compiler_params=plgpu.CompilerParams(num_warps=dims.num_warps, num_stages=2),
      cost_estimate=pl.CostEstimate(
          flops=2 * m * d * v, transcendentals=m * v,
          bytes_accessed=hidden.nbytes + lm_head.nbytes * dims.nm),
      interpret=interpret,
      name="fused_logprob_fwd_gpu",
  )(inv_temp, hidden, lm_head, targets)
  return _merge_splits(*stats)


def _backward_kernel(inv_temp_ref, h_ref, w_ref, t_ref,  # inputs
                     lse_ref, mean_z_ref, g_logp_ref, g_ent_ref,  # inputs, [M] each
                     dh_in_ref, dw_in_ref,  # aliased to the outputs
                     dh_ref, dw_ref,  # float32 accumulators: [M, D] and [D, V] (whole blocks)
                     *, dims):
  del dh_in_ref, dw_in_ref
  i, j = pl.program_id(0), pl.program_id(1)
  _, row_ok = _rows(i, dims)
  cols, col_ok = _cols(j, dims)
  row_block = pl.ds(i * dims.bm, dims.bm)
  z = _logits_tile(inv_temp_ref, h_ref, w_ref, i, j, row_ok, col_ok, dims)
  # Rows past M load g = 0, so their dlogits are 0.
  lse, mean_z, g_logp, g_ent = (
      plgpu.load(ref.at[row_block], mask=row_ok, other=0.0)[:, None]
      for ref in (lse_ref, mean_z_ref, g_logp_ref, g_ent_ref))
  targets = plgpu.load(t_ref.at[row_block], mask=row_ok, other=0)
  p = jnp.where(col_ok[None, :], jnp.exp(z - lse), 0.0)
  onehot = (cols[None, :] == targets[:, None]).astype(jnp.float32)
  dz = (g_logp * (onehot - p) - g_ent * p * (z - mean_z)) * inv_temp_ref[...]
  dz = dz.astype(h_ref.dtype)  # [bm, bv], the matmuls' input dtype

  def add_chunk(k, carry):
    w = _load_lm_head(w_ref, k, j, col_ok, dims)  # [bd, bv]
    d_h = _dot_general(dz, w, ((1,), (1,)))  # 'MV,DV->MD'
    plgpu.atomic_add(dh_ref, (row_block, pl.ds(k * dims.bd, dims.bd)), d_h)
    h = _load_hidden(h_ref, i, k, row_ok, dims)  # [bm, bd]
    d_w = _dot_general(h, dz, ((0,), (0,)))  # 'MD,MV->DV'
    plgpu.atomic_add(dw_ref, (pl.ds(k * dims.bd, dims.bd), pl.ds(j * dims.bv, dims.bv)), d_w)
    return carry

  jax.lax.fori_loop(0, dims.nd, add_chunk, 0)


def _backward_slab(hidden, lm_head, targets, inv_temp, rows, dh_acc, dims, interpret):
  """One backward call over lm_head's columns ([D, V'], targets relative to them).

  Returns (dh_acc + its d_hidden contribution, d_lm_head [D, V'] in lm_head's dtype).
  """
  dims = dataclasses.replace(dims, vocab=lm_head.shape[1])
  dp, vp = dh_acc.shape[1], _round_up(dims.vocab, dims.bv)
  dh_acc, dw_acc = pl.pallas_call(
      functools.partial(_backward_kernel, dims=dims),
      out_shape=[jax.ShapeDtypeStruct(dh_acc.shape, jnp.float32),
                 jax.ShapeDtypeStruct((dp, vp), jnp.float32)],
      grid=(dims.nm, dims.nv),
      input_output_aliases={8: 0, 9: 1},
      compiler_params=plgpu.CompilerParams(num_warps=dims.num_warps, num_stages=2),
      interpret=interpret,
      name="fused_logprob_bwd_gpu",
  )(inv_temp, hidden, lm_head, targets, *rows, dh_acc, jnp.zeros((dp, vp), jnp.float32))
  if (dp, vp) != lm_head.shape:
    dw_acc = dw_acc[:lm_head.shape[0], :lm_head.shape[1]]
  return dh_acc, dw_acc.astype(lm_head.dtype)


def _backward(hidden, lm_head, targets, inv_temp, rows, dims, interpret):
  """rows = (lse, E_p[z], g_logp, g_ent), [M] each -> (d_hidden [M, D], d_lm_head [D, V]).

  The vocabulary goes through the kernel in slabs of `dims.slab_cols` columns, in a loop (one
  set of buffers for all slabs), so that the float32 d_lm_head accumulator is [D, slab] rather
  than [D, V] (at V = 151,936 in bfloat16 that would add half a GiB); each slab is cast into
  d_lm_head as it completes, and d_hidden accumulates across slabs. A slab's targets are taken
  relative to its first column (a target elsewhere matches none of its columns).
  """
  (m, d), v = hidden.shape, dims.vocab
  dh_acc = jnp.zeros((_round_up(m, dims.bm), _round_up(d, dims.bd)), jnp.float32)
  d_lm_head = jnp.zeros((d, v), lm_head.dtype)
  slab = dims.slab_cols
  full_slabs, tail = divmod(v, slab)

  def one_slab(k, carry):
    dh_acc, d_lm_head = carry
    start = k * slab
    dh_acc, dw = _backward_slab(hidden, jax.lax.dynamic_slice_in_dim(lm_head, start, slab, 1),
                                targets - start, inv_temp, rows, dh_acc, dims, interpret)
    return dh_acc, jax.lax.dynamic_update_slice_in_dim(d_lm_head, dw, start, 1)

  if full_slabs:
    dh_acc, d_lm_head = jax.lax.fori_loop(0, full_slabs, one_slab, (dh_acc, d_lm_head))
  if tail:
    start = full_slabs * slab
    dh_acc, dw = _backward_slab(hidden, lm_head[:, start:], targets - start, inv_temp, rows,
                                dh_acc, dims, interpret)
    d_lm_head = jax.lax.dynamic_update_slice_in_dim(d_lm_head, dw, start, 1)
  return dh_acc[:m, :d].astype(hidden.dtype), d_lm_head


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _fused(hidden, lm_head, targets, inv_temp, dims, interpret):
  logp, entropy, _ = _forward(hidden, lm_head, targets, inv_temp, dims, interpret)
  return logp, entropy


def _fused_fwd(hidden, lm_head, targets, inv_temp, dims, interpret):
  logp, entropy, lse = _forward(hidden, lm_head, targets, inv_temp, dims, interpret)
  return (logp, entropy), (hidden, lm_head, targets, inv_temp, lse, entropy)


def _fused_bwd(dims, interpret, res, cotangents):
  hidden, lm_head, targets, inv_temp, lse, entropy = res
  g_logp, g_ent = cotangents  # [M] float32 each
  rows = (lse, lse - entropy, g_logp, g_ent)  # [M] each
  d_hidden, d_lm_head = _backward(hidden, lm_head, targets, inv_temp, rows, dims, interpret)
  # Integer targets get no cotangent (None); temperature is not differentiated.
  return d_hidden, d_lm_head, None, jnp.zeros_like(inv_temp)


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_token_logprobs(
    hidden: jax.Array,
    lm_head: jax.Array,
    targets: jax.Array,
    *,
    temperature: float | jax.Array = 1.0,
    block_m: int | None = None,
    block_v: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    vocab_splits: int | None = None,
    backward_slab: int = 16384,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Log-prob of `targets` and entropy under softmax((hidden @ lm_head) / temperature), fused.

  Args:
    hidden: [M, D] float32 or bfloat16 final hidden states.
    lm_head: [D, V] output projection, same dtype as `hidden`.
    targets: [M] integer token ids in [0, V); not differentiated.
    temperature: softmax temperature > 0 (Python float or traced scalar; not differentiated).
    block_m, block_v, block_d: block sizes along M, V and D, powers of two >= 16 (each clamped
      to its dimension rounded up to a power of two).
    num_warps: Triton warps per program.
    vocab_splits: S, programs per row block in the forward, each over 1/S of the vocabulary.
    (None for any of these five: the tuned default for the input dtype, `_DEFAULTS`.)
    backward_slab: vocab columns per backward kernel call (rounded down to whole blocks): the
      size of its float32 d_lm_head accumulator, [D, backward_slab].
    interpret: run the Pallas interpreter. None -> True iff jax.default_backend() == "cpu".

  Returns:
    (logp [M] float32, entropy [M] float32), differentiable w.r.t. hidden and lm_head.
  """
  dtype = jnp.dtype(hidden.dtype)
  given = (block_m, block_v, block_d, num_warps, vocab_splits)
  block_m, block_v, block_d, num_warps, vocab_splits = (
      default if value is None else value
      for value, default in zip(given, _DEFAULTS.get(dtype, _DEFAULTS[jnp.dtype(jnp.float32)])))
  _check_inputs(hidden, lm_head, targets, temperature,
                dict(block_m=block_m, block_v=block_v, block_d=block_d))
  for key, value in (("vocab_splits", vocab_splits), ("num_warps", num_warps),
                     ("backward_slab", backward_slab)):
    if value < 1:
      raise ValueError(f"fused_token_logprobs (gpu): {key}={value} must be >= 1")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  (m, d), v = hidden.shape, lm_head.shape[1]
  dims = _Dims(m, d, v, min(block_m, _pow2_at_least(m)), min(block_v, _pow2_at_least(v)),
               min(block_d, _pow2_at_least(d)), vocab_splits, num_warps, backward_slab)
  inv_temp = jnp.reshape(1.0 / jnp.asarray(temperature, jnp.float32), (1, 1))
  return _fused(hidden, lm_head, targets.astype(jnp.int32), inv_temp, dims, interpret)

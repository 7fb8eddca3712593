"""Decode attention (one query token per row) that visits only the KV blocks each row has filled.

Legend: B rows, KV key/value heads, G query heads per KV head, H head dim, S cache slots, bs the
block along S.

`decode_attention(q [B, KV, G, H], k [B, KV, S, H], v, starts [B], ends [B])` returns, per row b,
softmax(q k^T / sqrt(H)) v over the slots [starts[b], ends[b]) only: [B, KV, G, H]. One grid
program per (row, KV head) loops over the blocks floor(starts / bs) .. ceil(ends / bs) - 1 with an
online softmax (running max m, sum l, accumulator acc, float32; a block that raises the max from m
to m' rescales l and acc by exp(m - m')). The loop's trip count is the row's own, so a step's cost
follows each row's position, not S. Slots outside [start, end) within a visited block are masked.

S must be a multiple of bs (the sampler allocates its cache so). Backends: written against the
generic Pallas API (whole-row refs sliced with `pl.ds`, no TPU-only features), so it lowers
through Triton on GPU and Mosaic on TPU; with `interpret=True` it runs anywhere (CPU) through the
Pallas interpreter, exact but slow. `interpret=None` picks True on CPU. It was tested here only
in interpret mode (no accelerator was at hand): the compiled lowerings are unverified.

`tests/kernels/test_kernels_decode_attention.py` checks it against a full masked softmax over S (in
float64), and against `dypo_jax.models.decode_attention.bounded_attention`.
"""
import functools

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp


def _kernel(starts_ref, ends_ref, q_ref, k_ref, v_ref, o_ref, *, block: int):
  b = pl.program_id(0)
  start, end = starts_ref[b], ends_ref[b]
  q = q_ref[...].astype(jnp.float32) * (q_ref.shape[-1] ** -0.5)  # [G, H]
  g, h = q.shape

  def visit(i, carry):
    m, l, acc = carry  # [G, 1], [G, 1], [G, H]
    kb = k_ref[pl.ds(i * block, block), :].astype(jnp.float32)  # [bs, H]
    vb = v_ref[pl.ds(i * block, block), :].astype(jnp.float32)
    s = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())),
                            preferred_element_type=jnp.float32)  # [G, bs]
    slots = i * block + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    s = jnp.where((slots >= start) & (slots < end), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # A block (so far) without a visible slot.
    p = jnp.exp(s - m_safe)
    rescale = jnp.exp(m - m_safe)
    l = rescale * l + jnp.sum(p, axis=1, keepdims=True)
    acc = rescale * acc + jnp.dot(p, vb, preferred_element_type=jnp.float32)
    return m_new, l, acc

  init = (jnp.full((g, 1), -jnp.inf, jnp.float32), jnp.zeros((g, 1), jnp.float32),
          jnp.zeros((g, h), jnp.float32))
  first = start // block
  last = (end + block - 1) // block
  _, l, acc = jax.lax.fori_loop(first, last, visit, init)
  o_ref[...] = (acc / jnp.maximum(l, 1e-30)).astype(o_ref.dtype)  # l = 0 only if nothing visible.


@functools.partial(jax.jit, static_argnames=("block", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, starts: jax.Array,
                     ends: jax.Array, *, block: int = 64,
                     interpret: bool | None = None) -> jax.Array:
  """Per-row bounded decode attention; see the module docstring. Returns [B, KV, G, H]."""
  bsz, kv, g, h = q.shape
  s = k.shape[2]
  if k.shape != (bsz, kv, s, h) or v.shape != k.shape:
    raise ValueError(f"decode_attention: want q [B, KV, G, H] and k, v [B, KV, S, H]; got q "
                     f"{q.shape}, k {k.shape}, v {v.shape}")
  if starts.shape != (bsz,) or ends.shape != (bsz,):
    raise ValueError(f"decode_attention: starts {starts.shape} and ends {ends.shape} must be "
                     f"[B={bsz}]")
  if block < 1 or s % block:
    raise ValueError(f"decode_attention: S={s} slots must be a multiple of block={block}")
  if interpret is None:
    interpret = jax.default_backend() == "cpu"
  rows = pl.BlockSpec((bsz,), lambda b, j: (0,))
  return pl.pallas_call(
      functools.partial(_kernel, block=block),
      grid=(bsz, kv),
      in_specs=[rows, rows,
                pl.BlockSpec((None, None, g, h), lambda b, j: (b, j, 0, 0)),
                pl.BlockSpec((None, None, s, h), lambda b, j: (b, j, 0, 0)),
                pl.BlockSpec((None, None, s, h), lambda b, j: (b, j, 0, 0))],
      out_specs=pl.BlockSpec((None, None, g, h), lambda b, j: (b, j, 0, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      interpret=interpret,
  )(starts.astype(jnp.int32), ends.astype(jnp.int32), q, k, v)

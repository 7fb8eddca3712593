"""A decode step's attention whose cost follows the rows' positions, not the cache's allocation.

Letters as in transformer.py: B rows, KV key/value heads, G query heads per KV head, H head dim,
S cache slots, L layers.

Row b of a decode step sees the slots [starts[b], ends[b]) of its cache (its left-padded prompt,
then its response up to the token fed now). `bounded_attention` reads only the first
`bucket_length(max(ends))` slots of the cache: the smallest length of a fixed ladder
(`length_ladder`: block * 1, 1.5, 2, 3, 4, 6, ... capped at S) that covers the longest row in
flight, chosen at run time by `lax.switch` (each branch a plain masked attention over a static
slice). So a step at position t reads at most 1.5 * t + block slots whatever S, and only one
branch runs. On XLA:CPU this beat a `fori_loop` over blocks with an online softmax: the loop's
per-block bookkeeping (running max, rescaling) costs more than the at most 1.5x over-read, and a
plain attention over a static slice keeps the decode-form products BUILD_NOTES describes.

The row bound is the maximum over the rows in flight (finished rows are given ends = 1 by the
sampler); rows with fewer slots are masked within the visited length. The Pallas kernel
(`dypo_jax.kernels.decode_attention`) bounds each row by its own end instead. Both are tested
against a full masked softmax over all S slots (tests/kernels/test_kernels_decode_attention.py).
"""
import jax
import jax.numpy as jnp

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
DEFAULT_BLOCK = 64


def length_ladder(slots: int, block: int) -> tuple[int, ...]:
  """The static lengths a step may read: block * (1, 1.5, 2, 3, 4, 6, ...) rounded to blocks,
  capped at `slots` (the last is always `slots`)."""
  if block < 1:
    raise ValueError(f"decode attention block={block} must be >= 1")
  out, n = [], 1
  while n * block < slots:
    out.append(n * block)
    half = n + n // 2  # 1 -> 1 (skipped), 2 -> 3, 4 -> 6, ...
    if half > n and half * block < slots:
      out.append(half * block)
    n *= 2
  out.append(slots)
  return tuple(sorted(set(out)))


def _masked_attention(q, k, v, starts, ends):
  """q [B, KV, G, H], k/v [B, KV, S', H], row b sees slots [starts[b], ends[b]) -> [B, KV, G, H].

  The decode form of transformer._attention: [G, S'] x [S', H] per (B, KV), no transpose.
  """
  slots = jnp.arange(k.shape[2], dtype=jnp.int32)
  visible = (slots[None, :] >= starts[:, None]) & (slots[None, :] < ends[:, None])  # [B, S']
  logits = jnp.einsum("BKGH,BKSH->BKGS", q, k, preferred_element_type=jnp.float32)
  logits = logits * (q.shape[-1] ** -0.5)
  logits = jnp.where(visible[:, None, None, :], logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  return jnp.einsum("BKGS,BKSH->BKGH", probs, v)


def bounded_attention(q, k, v, starts, ends, *, layer=None, block: int = DEFAULT_BLOCK):
  """Attention of one decode token per row over the first bucket_length(max(ends)) slots.

  Args:
    q: [B, KV, G, H] queries.
    k, v: one layer's cache [B, KV, S, H] (layer None), or the stacked cache [L, B, KV, S, H]
      and `layer` the traced index of the layer to read (only its visited slots are sliced out:
      the whole layer is never copied).
    starts, ends: [B] int32: row b attends slots [starts[b], ends[b]); max(ends) bounds the read.
    block: the ladder's unit (`length_ladder`).

  Returns:
    [B, KV, G, H] in q's dtype.
  """
  slots = k.shape[-2]
  ladder = length_ladder(slots, block)

  def read(cache, n):
    if layer is None:
      return cache[:, :, :n].astype(q.dtype)
    b, kv, h = cache.shape[1], cache.shape[2], cache.shape[4]
    part = jax.lax.dynamic_slice(cache, (layer, 0, 0, 0, 0), (1, b, kv, n, h))
    return part[0].astype(q.dtype)

  branches = [lambda q, k, v, s, e, n=n: _masked_attention(q, read(k, n), read(v, n), s, e)
              for n in ladder]
  if len(branches) == 1:
    return branches[0](q, k, v, starts, ends)
  bound = jnp.max(ends)
  index = jnp.sum(jnp.asarray(ladder[:-1], jnp.int32) < bound).astype(jnp.int32)
  return jax.lax.switch(index, branches, q, k, v, starts, ends)

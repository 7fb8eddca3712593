"""Decode attention bounded by position: the Pallas kernel (interpret mode) and the jnp length
ladder against the full masked softmax over all S slots (`_reference`, in numpy float64).

Rows start and end at different slots (left padding, responses of different lengths), one row
sees a single slot, and S = 96 with blocks of 32 so a row's range crosses block edges.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.kernels import decode_attention as kernel
from dypo_jax.models import decode_attention

B, KV, G, H, S, L = 5, 2, 3, 16, 96, 3
STARTS = np.array([0, 7, 31, 40, 95], np.int32)
ENDS = np.array([96, 20, 33, 90, 96], np.int32)  # Row 4 sees slot 95 only.


def _reference(q, k, v, starts, ends):
  """All S slots, masked, in float64: q [B, KV, G, H], k/v [B, KV, S, H] -> [B, KV, G, H]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bkgh,bksh->bkgs", q, k) / np.sqrt(q.shape[-1])
  slots = np.arange(k.shape[2])
  visible = (slots[None, :] >= np.asarray(starts)[:, None]) & (
      slots[None, :] < np.asarray(ends)[:, None])  # [B, S]
  logits = np.where(visible[:, None, None, :], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bkgs,bksh->bkgh", probs / probs.sum(-1, keepdims=True), v)


def _inputs(dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (B, KV, G, H), jnp.float32).astype(dtype)
  k = jax.random.normal(kk, (L, B, KV, S, H), jnp.float32).astype(dtype)
  v = jax.random.normal(kv, (L, B, KV, S, H), jnp.float32).astype(dtype)
  return q, k, v


def test_length_ladder_covers_every_bound_within_one_and_a_half():
  ladder = decode_attention.length_ladder(2080, 64)
  assert ladder[0] == 64 and ladder[-1] == 2080 and list(ladder) == sorted(set(ladder))
  for bound in range(1, 2081):
    read = next(n for n in ladder if n >= bound)
    assert read <= max(64, 1.5 * bound + 64), (bound, read)
  assert decode_attention.length_ladder(64, 64) == (64,)
  with pytest.raises(ValueError, match="block=0"):
    decode_attention.length_ladder(64, 0)


@pytest.mark.parametrize("bound", [None, 33])
def test_bounded_matches_reference_per_layer_and_stacked(bound):
  q, k, v = _inputs()
  ends = ENDS if bound is None else np.minimum(ENDS, bound)
  starts = np.minimum(STARTS, ends - 1)
  want = _reference(q, k[1], v[1], starts, ends)
  got = jax.jit(lambda *a: decode_attention.bounded_attention(*a, block=32))(
      q, k[1], v[1], starts, ends)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  stacked = jax.jit(lambda q, k, v, s, e, i: decode_attention.bounded_attention(
      q, k, v, s, e, layer=i, block=32))(q, k, v, starts, ends, jnp.int32(1))
  np.testing.assert_allclose(stacked, want, atol=1e-5, rtol=1e-5)


def test_bounded_reads_nothing_past_the_bound():
  # Slots past max(ends) hold NaN: a read of them would poison every row.
  q, k, v = _inputs()
  ends = np.minimum(ENDS, 40)
  starts = np.minimum(STARTS, ends - 1)
  poison = lambda x: x[1].at[:, :, 64:].set(jnp.nan)
  got = decode_attention.bounded_attention(q, poison(k), poison(v), starts, ends, block=32)
  assert np.isfinite(np.asarray(got)).all()
  want = _reference(q, k[1], v[1], starts, ends)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pallas_kernel_matches_reference(dtype, tol):
  q, k, v = _inputs(dtype)
  got = kernel.decode_attention(q, k[0], v[0], STARTS, ENDS, block=32, interpret=True)
  want = _reference(
      q.astype(jnp.float32), k[0].astype(jnp.float32), v[0].astype(jnp.float32), STARTS, ENDS)
  assert got.dtype == dtype and got.shape == (B, KV, G, H)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=tol, rtol=tol)
  # Blocks past a row's end are never visited: NaN there changes nothing.
  poison = lambda x: x[0].at[1, :, 32:].set(jnp.nan)
  again = kernel.decode_attention(q, poison(k), poison(v), STARTS, ENDS, block=32,
                                  interpret=True)
  np.testing.assert_array_equal(np.asarray(again[1], np.float32), np.asarray(got[1], np.float32))


def test_pallas_kernel_refuses_ragged_slots():
  q, k, v = _inputs()
  with pytest.raises(ValueError, match="multiple of block"):
    kernel.decode_attention(q, k[0], v[0], STARTS, ENDS, block=40, interpret=True)

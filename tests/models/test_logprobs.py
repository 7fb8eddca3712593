"""Numeric tests of dypo_jax.models.logprobs: per-token log-probs and entropies of an LM head,
full, chunked over the vocabulary and fused (Pallas, interpreted on CPU), against numpy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.models import logprobs


# ------------------------------------------------------------------------------------------------
# Token log-probabilities.


def _lm_inputs(seed, n=2, t=5, d=16, v=37, dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  hidden = jax.random.normal(k1, (n, t, d), jnp.float32).astype(dtype)
  lm_head = jax.random.normal(k2, (d, v), jnp.float32) / math.sqrt(d) * 3.0
  targets = jax.random.randint(k3, (n, t), 0, v)
  return hidden, lm_head, targets


def test_full_logprobs_match_numpy():
  hidden, lm_head, targets = _lm_inputs(0)
  logp, ent = logprobs.token_logprobs(hidden=hidden, lm_head=lm_head, targets=targets,
                                    temperature=0.7, impl="full")
  z = np.einsum("ntd,dv->ntv", np.asarray(hidden, np.float64), np.asarray(lm_head, np.float64))
  z = z / 0.7
  z = z - z.max(-1, keepdims=True)
  lp_all = z - np.log(np.exp(z).sum(-1, keepdims=True))
  want_logp = np.take_along_axis(lp_all, np.asarray(targets)[..., None], -1)[..., 0]
  want_ent = -(np.exp(lp_all) * lp_all).sum(-1)
  np.testing.assert_allclose(logp, want_logp, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-5)
  assert logp.dtype == jnp.float32 and ent.dtype == jnp.float32


@pytest.mark.parametrize("vocab_chunk", [8, 37, 64])  # 37 = 4·8 + 5: last chunk is shifted.
def test_chunked_matches_full_values_and_grads(vocab_chunk):
  hidden, lm_head, _ = _lm_inputs(1)
  # With C = 8 the last chunk is read from column 29 and masks 29..31 (chunk 3 owns them):
  # targets on both sides of every chunk edge and in the overlap must each count once.
  targets = jnp.array([[29, 30, 31, 32, 36], [0, 7, 8, 24, 35]])
  w_lp = jax.random.normal(jax.random.key(7), targets.shape)
  w_ent = jax.random.normal(jax.random.key(8), targets.shape)

  def run(impl):
    def loss(h, w):
      lp, ent = logprobs.token_logprobs(hidden=h, lm_head=w, targets=targets, temperature=0.7,
                                      vocab_chunk=vocab_chunk, impl=impl)
      return jnp.sum(w_lp * lp) + jnp.sum(w_ent * ent), (lp, ent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(hidden, lm_head)

  (_, (lp_c, ent_c)), (gh_c, gw_c) = run("chunked")
  (_, (lp_f, ent_f)), (gh_f, gw_f) = run("full")
  np.testing.assert_allclose(lp_c, lp_f, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(ent_c, ent_f, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gh_c, gh_f, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(gw_c, gw_f, atol=1e-5, rtol=1e-5)


def test_chunked_bfloat16_hidden():
  hidden, lm_head, targets = _lm_inputs(2, dtype=jnp.bfloat16)

  def loss(h, impl):
    lp, ent = logprobs.token_logprobs(hidden=h, lm_head=lm_head, targets=targets, vocab_chunk=8,
                                    impl=impl)
    return jnp.sum(lp) + 0.5 * jnp.sum(ent), (lp, ent)

  grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
  (_, (lp_c, ent_c)), g_c = grad_fn(hidden, "chunked")
  (_, (lp_f, ent_f)), g_f = grad_fn(hidden, "full")
  assert lp_c.dtype == jnp.float32 and g_c.dtype == jnp.bfloat16
  np.testing.assert_allclose(lp_c, lp_f, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ent_c, ent_f, atol=1e-4, rtol=1e-4)
  # Gradients come back in bfloat16 (8 mantissa bits): compare at that precision.
  np.testing.assert_allclose(np.asarray(g_c, np.float32), np.asarray(g_f, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_chunked_temp_memory_below_full():
  n, t, d, v = 4, 64, 64, 32768  # 256 tokens; full [256, 32768] f32 logits = 32 MiB.
  shapes = (jax.ShapeDtypeStruct((n, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n, t), jnp.int32))

  def temp_bytes(impl):
    def loss(h, w, y):
      lp, ent = logprobs.token_logprobs(hidden=h, lm_head=w, targets=y, vocab_chunk=2048, impl=impl)
      return jnp.sum(lp) + jnp.sum(ent)
    out = {}
    for name, fn in (("fwd", lambda h, w, y: loss(h, w, y)),
                     ("grad", jax.grad(loss, argnums=(0, 1)))):
      analysis = jax.jit(fn).lower(*shapes).compile().memory_analysis()
      if analysis is None:
        pytest.skip("compiled.memory_analysis() is unavailable on this backend")
      out[name] = analysis.temp_size_in_bytes
    return out

  full, chunked = temp_bytes("full"), temp_bytes("chunked")
  logits_bytes = n * t * v * 4
  assert full["fwd"] >= logits_bytes and full["grad"] >= logits_bytes  # The check can fail.
  for name in ("fwd", "grad"):
    assert chunked[name] < full[name] / 8, (name, chunked, full)
    assert chunked[name] < logits_bytes / 4, (name, chunked)


def test_token_logprobs_bad_impl_and_shapes():
  hidden, lm_head, targets = _lm_inputs(3)
  with pytest.raises(ValueError, match="impl='fast'.*chunked"):
    logprobs.token_logprobs(hidden=hidden, lm_head=lm_head, targets=targets, impl="fast")
  with pytest.raises(ValueError, match="lm_head"):
    logprobs.token_logprobs(hidden=hidden, lm_head=lm_head.T, targets=targets)


def test_logprobs_from_logits_golden():
  # logits [0, ln 3]: p = [1/4, 3/4]; logp(target 1) = ln 0.75;
  # entropy = -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.562335.
  logp, ent = logprobs.logprobs_from_logits(logits=jnp.array([[0.0, math.log(3.0)]]),
                                          targets=jnp.array([1]))
  np.testing.assert_allclose(logp, [math.log(0.75)], rtol=1e-6)
  np.testing.assert_allclose(ent, [0.562335], rtol=1e-5)


@jax.default_matmul_precision("float32")  # On a GPU both would otherwise differ by TF32 rounding.
def test_pallas_impl_matches_full():
  pytest.importorskip("dypo_jax.kernels.logprob", reason="Pallas kernel module not present")
  hidden, lm_head, targets = _lm_inputs(4, v=256)
  lp_p, ent_p = logprobs.token_logprobs(hidden=hidden, lm_head=lm_head, targets=targets,
                                      impl="pallas")
  lp_f, ent_f = logprobs.token_logprobs(hidden=hidden, lm_head=lm_head, targets=targets,
                                      impl="full")
  np.testing.assert_allclose(lp_p, lp_f, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(ent_p, ent_f, atol=1e-4, rtol=1e-4)

"""Fused LM-head log-prob / entropy Pallas kernel (interpret mode) vs its plain-jnp reference.

Shapes are tiny (interpret mode is slow): M=21 tokens, D=32, V=300, blocks 8 x 128, so neither M
nor V divides by its block. The interpreter fills the out-of-range part of ragged edge blocks with
NaN, so any missing mask in the kernels shows up as NaN here.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.kernels import logprob

M, D, V = 21, 32, 300
BLOCKS = dict(block_m=8, block_v=128)

# float32: both sides accumulate in f32 and differ only in summation order (blockwise online
# softmax vs one log_softmax), ~1e-6 here, so 1e-5 absolute and relative.
F32_TOL = dict(atol=1e-5, rtol=1e-5)
# bfloat16 inputs: logits still accumulate in f32, but the kernel rounds dlogits to bf16 before
# the gradient matmuls (bf16 MXU inputs) and both sides round the gradients to bf16 (8-bit
# mantissa, ~4e-3 relative), so 2e-2.
BF16_TOL = dict(atol=2e-2, rtol=2e-2)
# float32 with logits up to ~85 (std 20 / temperature 0.7): their f32 spacing is ~8e-6, and both
# the kernel and the reference differ from a float64 evaluation by up to ~1.2e-4 in d_hidden
# (values up to ~57) and ~3e-5 in logp (values up to ~164) -- measured, the kernel is no worse
# than the reference. So the absolute tolerance scales with each array's largest magnitude.
LARGE_LOGIT_TOL = dict(atol=0.0, rtol=1e-5, atol_per_max=2e-5)


def _inputs(dtype, logit_scale=1.0, seed=0):
  k_h, k_w, k_t, k_g = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k_h, (M, D), jnp.float32)
  # Scaled so that logits have standard deviation ~ logit_scale.
  lm_head = jax.random.normal(k_w, (D, V), jnp.float32) * (logit_scale / math.sqrt(D))
  targets = jax.random.randint(k_t, (M,), 0, V, jnp.int32)
  w_logp, w_ent = jax.random.normal(k_g, (2, M), jnp.float32)
  return hidden.astype(dtype), lm_head.astype(dtype), targets, w_logp, w_ent


def _value_and_grads(fn, hidden, lm_head, targets, w_logp, w_ent, **kwargs):
  """(logp, entropy, d_hidden, d_lm_head) of loss = sum(w_logp * logp) + sum(w_ent * entropy)."""

  def loss(h, w):
    logp, entropy = fn(h, w, targets, **kwargs)
    return jnp.sum(w_logp * logp) + jnp.sum(w_ent * entropy), (logp, entropy)

  grad_fn = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  (d_hidden, d_lm_head), (logp, entropy) = grad_fn(hidden, lm_head)
  return tuple(np.asarray(x, np.float32) for x in (logp, entropy, d_hidden, d_lm_head))


@pytest.mark.slow
@pytest.mark.parametrize("dtype,temperature,logit_scale,tol", [
    (jnp.float32, 1.0, 1.0, F32_TOL),
    (jnp.float32, 0.7, 1.0, F32_TOL),
    # Logits of std ~20: the running max moves between blocks (the rescaling path).
    (jnp.float32, 0.7, 20.0, LARGE_LOGIT_TOL),
    (jnp.bfloat16, 1.0, 1.0, BF16_TOL),
    (jnp.bfloat16, 0.7, 1.0, BF16_TOL),
])
def test_kernel_matches_reference(dtype, temperature, logit_scale, tol):
  args = _inputs(dtype, logit_scale)
  kwargs = dict(temperature=temperature, **BLOCKS)
  got = _value_and_grads(
      functools.partial(logprob.fused_token_logprobs, interpret=True), *args, **kwargs)
  want = _value_and_grads(logprob.reference_token_logprobs, *args, **kwargs)
  for name, g, w in zip(("logp", "entropy", "d_hidden", "d_lm_head"), got, want):
    assert np.all(np.isfinite(g)), name
    atol = tol["atol"] + tol.get("atol_per_max", 0.0) * np.abs(w).max()
    np.testing.assert_allclose(g, w, atol=atol, rtol=tol["rtol"], err_msg=name)
  assert got[0].shape == got[1].shape == (M,)
  assert got[2].shape == (M, D) and got[3].shape == (D, V)


def test_uniform_logits_golden():
  """lm_head = 0 makes every logit 0: p is uniform, so logp = -log V and entropy = log V exactly;
  d_hidden = dlogits @ lm_head^T = 0, and d_lm_head = hidden^T @ dlogits with, for the loss
  sum(logp), dlogits[m, j] = 1[j = t_m] - 1/V."""
  hidden, _, targets, _, _ = _inputs(jnp.float32)
  lm_head = jnp.zeros((D, V), jnp.float32)
  logp, entropy = logprob.fused_token_logprobs(hidden, lm_head, targets, interpret=True, **BLOCKS)
  np.testing.assert_allclose(logp, -math.log(V) * np.ones(M), atol=1e-5, rtol=1e-6)
  np.testing.assert_allclose(entropy, math.log(V) * np.ones(M), atol=1e-5, rtol=1e-6)

  def loss(h, w):
    return jnp.sum(logprob.fused_token_logprobs(h, w, targets, interpret=True, **BLOCKS)[0])

  d_hidden, d_lm_head = jax.grad(loss, argnums=(0, 1))(hidden, lm_head)
  np.testing.assert_array_equal(d_hidden, np.zeros((M, D)))
  dlogits = np.eye(V)[np.asarray(targets)] - 1.0 / V  # [M, V]
  np.testing.assert_allclose(d_lm_head, np.asarray(hidden).T @ dlogits, atol=1e-5, rtol=1e-5)


def test_default_blocks_interpret_none_and_traced_temperature():
  """Default blocks clamp to one (24 x 384) block; interpret=None means interpret on CPU; a
  temperature traced under jit works."""
  assert jax.default_backend() == "cpu"
  hidden, lm_head, targets, _, _ = _inputs(jnp.float32, seed=1)

  @jax.jit
  def both(temperature):
    return (logprob.fused_token_logprobs(hidden, lm_head, targets, temperature=temperature),
            logprob.reference_token_logprobs(hidden, lm_head, targets, temperature=temperature))

  (logp, entropy), (logp_ref, entropy_ref) = both(jnp.float32(1.3))
  np.testing.assert_allclose(logp, logp_ref, **F32_TOL)
  np.testing.assert_allclose(entropy, entropy_ref, **F32_TOL)


@pytest.mark.parametrize("change,match", [
    (dict(lm_head=jnp.zeros((D + 1, V))), "D="),
    (dict(targets=jnp.zeros((M + 1,), jnp.int32)), "targets M="),
    (dict(lm_head=jnp.zeros((D, V), jnp.bfloat16)), "dtype"),
    (dict(targets=jnp.zeros((M,), jnp.float32)), "integer"),
    (dict(block_v=100), "block_v=100"),
    (dict(block_m=12), "block_m=12"),
    (dict(temperature=0.0), "temperature=0.0"),
])
def test_bad_input_raises(change, match):
  hidden, lm_head, targets, _, _ = _inputs(jnp.float32)
  kwargs = dict(hidden=hidden, lm_head=lm_head, targets=targets, interpret=True)
  kwargs.update(change)
  with pytest.raises(ValueError, match=match):
    logprob.fused_token_logprobs(kwargs.pop("hidden"), kwargs.pop("lm_head"),
                                 kwargs.pop("targets"), **kwargs)

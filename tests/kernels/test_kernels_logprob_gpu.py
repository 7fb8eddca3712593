"""GPU (Pallas Triton) fused log-prob kernel vs the plain-jnp reference.

On CPU the kernel runs in the Pallas interpreter; on a GPU the same tests compile it with Triton
(`pytest tests/kernels/test_kernels_logprob_gpu.py` on a GPU machine; the GPU-only case is larger).
Small case: M=21 tokens, D=40, V=300 at blocks 16 x 64 x 16, so no dimension divides by its
block and every mask is exercised; 2 forward vocab splits of 3 and 2 blocks, 3 backward slabs
of 2, 2 and 1 blocks.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax.kernels import logprob
from dypo_jax.kernels import logprob_gpu
from test_kernels_logprob import _value_and_grads  # pylint: disable=g-bad-import-order

ON_CPU = jax.default_backend() == "cpu"
SMALL = dict(shape=(21, 40, 300),
             blocks=dict(block_m=16, block_v=64, block_d=16, vocab_splits=2, backward_slab=128))
# Qwen2.5-0.5B's D at the default blocks, V = 9,496 ragged; compiled only (the
# interpreter would run the ~600 grid programs one by one).
GPU_ONLY = dict(shape=(512, 896, 151936 // 16), blocks={})

# float32: both sides accumulate in f32 and differ in summation order (and, on a GPU, in the
# atomic adds' order). bfloat16: the kernel rounds dlogits to bf16 before the gradient matmuls
# and both sides round the gradients to bf16 (8-bit mantissa), so 2e-2 of each array's scale.
F32_TOL = dict(rtol=1e-5, atol_per_max=1e-5)
BF16_TOL = dict(rtol=2e-2, atol_per_max=2e-2)


def _inputs(shape, dtype, logit_scale=1.0, seed=0):
  m, d, v = shape
  k_h, k_w, k_t, k_g = jax.random.split(jax.random.key(seed), 4)
  hidden = jax.random.normal(k_h, (m, d), jnp.float32)
  lm_head = jax.random.normal(k_w, (d, v), jnp.float32) * (logit_scale / math.sqrt(d))
  targets = jax.random.randint(k_t, (m,), 0, v, jnp.int32)
  w_logp, w_ent = jax.random.normal(k_g, (2, m), jnp.float32)
  return hidden.astype(dtype), lm_head.astype(dtype), targets, w_logp, w_ent


def _assert_close(got, want, tol):
  for name, g, w in zip(("logp", "entropy", "d_hidden", "d_lm_head"), got, want):
    assert g.shape == w.shape, name
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, w, rtol=tol["rtol"], atol=tol["atol_per_max"] * np.abs(w).max(),
                               err_msg=name)


CASES = [
    (SMALL, jnp.float32, 1.0, 1.0, F32_TOL),
    (SMALL, jnp.float32, 0.7, 1.0, F32_TOL),
    # Logits of std ~20: the running max moves between blocks and splits (the rescaling paths).
    (SMALL, jnp.float32, 0.7, 20.0, F32_TOL),
    (SMALL, jnp.bfloat16, 1.0, 1.0, BF16_TOL),
    (SMALL, jnp.bfloat16, 0.7, 1.0, BF16_TOL),
    pytest.param(GPU_ONLY, jnp.float32, 1.0, 1.0, F32_TOL,
                 marks=pytest.mark.skipif(ON_CPU, reason="compiled (GPU) only")),
    pytest.param(GPU_ONLY, jnp.bfloat16, 0.7, 1.0, BF16_TOL,
                 marks=pytest.mark.skipif(ON_CPU, reason="compiled (GPU) only")),
]


@pytest.mark.slow
@pytest.mark.parametrize("case,dtype,temperature,logit_scale,tol", CASES)
def test_kernel_matches_reference(case, dtype, temperature, logit_scale, tol):
  args = _inputs(case["shape"], dtype, logit_scale)
  kernel = functools.partial(logprob_gpu.fused_token_logprobs, **case["blocks"])
  # Full float32 dots on both sides: on a GPU, JAX's default for float32 is TF32.
  with jax.default_matmul_precision("float32"):
    got = _value_and_grads(kernel, *args, temperature=temperature)
    want = _value_and_grads(logprob.reference_token_logprobs, *args, temperature=temperature)
  _assert_close(got, want, tol)


@pytest.mark.slow
@jax.default_matmul_precision("float32")  # Compared with float64 numpy.
def test_uniform_logits_golden():
  """lm_head = 0: every logit is 0, so logp = -log V and entropy = log V exactly; for the loss
  sum(logp), d_hidden = 0 and d_lm_head = hidden^T @ (onehot(targets) - 1/V)."""
  (m, d, v), blocks = SMALL["shape"], SMALL["blocks"]
  hidden, _, targets, _, _ = _inputs(SMALL["shape"], jnp.float32)
  lm_head = jnp.zeros((d, v), jnp.float32)
  kernel = functools.partial(logprob_gpu.fused_token_logprobs, **blocks)
  logp, entropy = kernel(hidden, lm_head, targets)
  np.testing.assert_allclose(logp, -math.log(v) * np.ones(m), rtol=1e-6)
  np.testing.assert_allclose(entropy, math.log(v) * np.ones(m), rtol=1e-6)
  d_hidden, d_lm_head = jax.grad(lambda h, w: jnp.sum(kernel(h, w, targets)[0]),
                                 argnums=(0, 1))(hidden, lm_head)
  np.testing.assert_array_equal(d_hidden, np.zeros((m, d)))
  dlogits = np.eye(v)[np.asarray(targets)] - 1.0 / v  # [M, V]
  np.testing.assert_allclose(d_lm_head, np.asarray(hidden).T @ dlogits, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_one_split_equals_several():
  """The split merge is exact up to summation order: 1 split (one pass over V) == 5 splits."""
  args = _inputs(SMALL["shape"], jnp.float32, logit_scale=5.0, seed=2)[:3]
  blocks = dict(SMALL["blocks"], vocab_splits=1)
  one = logprob_gpu.fused_token_logprobs(*args, **blocks)
  many = logprob_gpu.fused_token_logprobs(*args, **dict(blocks, vocab_splits=5))
  for a, b in zip(one, many):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("change,match", [
    (dict(lm_head=jnp.zeros((41, 300))), "D=41"),
    (dict(targets=jnp.zeros((22,), jnp.int32)), "targets M=22"),
    (dict(lm_head=jnp.zeros((40, 300), jnp.bfloat16)), "dtype"),
    (dict(targets=jnp.zeros((21,), jnp.float32)), "integer"),
    (dict(block_v=96), "block_v=96"),
    (dict(block_d=8), "block_d=8"),
    (dict(vocab_splits=0), "vocab_splits=0"),
    (dict(backward_slab=0), "backward_slab=0"),
    (dict(temperature=0.0), "temperature=0.0"),
])
def test_bad_input_raises(change, match):
  hidden, lm_head, targets, _, _ = _inputs(SMALL["shape"], jnp.float32)
  kwargs = dict(hidden=hidden, lm_head=lm_head, targets=targets, interpret=True)
  kwargs.update(change)
  with pytest.raises(ValueError, match=match):
    logprob_gpu.fused_token_logprobs(kwargs.pop("hidden"), kwargs.pop("lm_head"),
                                     kwargs.pop("targets"), **kwargs)

"""The NNX transformer: the KV-cache forward equals the full forward; padding and dtypes behave."""
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax import models

_VARIANTS = {
    "qwen2": dict(arch="qwen2", qkv_bias=True, qk_norm=False, tie_embeddings=False),
    "qwen3": dict(arch="qwen3", qkv_bias=False, qk_norm=True, tie_embeddings=True),
    "llama": dict(arch="llama", qkv_bias=False, qk_norm=False, tie_embeddings=False),
}


def tiny(**kw):
  base = dict(vocab_size=61, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, rope_theta=5000.0, max_seq_len=64)
  base.update(kw)
  return models.ModelConfig(**base)


@pytest.mark.slow
@pytest.mark.parametrize("variant", sorted(_VARIANTS))
def test_cached_token_by_token_equals_full_forward(variant):
  config = tiny(**_VARIANTS[variant])
  model = models.Transformer(config, rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 9), 0, config.vocab_size)
  full = model(tokens)
  assert full.shape == (3, 9, config.vocab_size) and full.dtype == jnp.float32
  cache = models.KVCache.zeros(config, 3, 12)
  # Prefill the first 4 tokens in one call, then decode the rest one at a time.
  slots = jnp.arange(12)
  mask = (slots[None, :] <= jnp.arange(4)[:, None])[None].repeat(3, 0)
  out, cache = model.forward(tokens[:, :4], positions=jnp.arange(4)[None].repeat(3, 0),
                             attention_mask=mask, cache=cache)
  outs = [out]
  for t in range(4, 9):
    mask = (slots <= t)[None, None, :].repeat(3, 0)
    out, cache = model.forward(tokens[:, t:t + 1], positions=jnp.full((3, 1), t),
                               attention_mask=mask, cache=cache)
    outs.append(out)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)
  assert int(cache.end_index) == 9


@pytest.mark.slow
def test_left_and_right_padding_leave_real_tokens_unchanged():
  config = tiny()
  model = models.Transformer(config, rngs=nnx.Rngs(0))
  seq = jax.random.randint(jax.random.key(2), (1, 5), 1, config.vocab_size)
  alone = model(seq)
  pad = jnp.zeros((1, 3), jnp.int32)
  left = model(jnp.concatenate([pad, seq], 1),
               input_mask=jnp.concatenate([jnp.zeros((1, 3), bool), jnp.ones((1, 5), bool)], 1))
  right = model(jnp.concatenate([seq, pad], 1),
                input_mask=jnp.concatenate([jnp.ones((1, 5), bool), jnp.zeros((1, 3), bool)], 1))
  np.testing.assert_allclose(left[:, 3:], alone, atol=1e-5)
  np.testing.assert_allclose(right[:, :5], alone, atol=1e-5)


@pytest.mark.slow
def test_hidden_and_lm_head_give_the_logits():
  for tied in (True, False):
    model = models.Transformer(tiny(tie_embeddings=tied), rngs=nnx.Rngs(0))
    tokens = jnp.arange(6)[None] % 61
    mask = jnp.ones((1, 6), bool)
    hidden, _ = model.forward(tokens, positions=models.positions_from_mask(mask),
                              attention_mask=models.causal_mask(mask), return_hidden=True)
    np.testing.assert_allclose(hidden @ model.lm_head_kernel(), model(tokens), atol=1e-5)


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_logits_and_remat_matches():
  config = tiny(dtype="bfloat16", param_dtype="float32")
  model = models.Transformer(config, rngs=nnx.Rngs(0))
  tokens = jnp.arange(8)[None]
  logits = model(tokens)
  assert logits.dtype == jnp.float32
  ref = models.Transformer(tiny(), rngs=nnx.Rngs(0))(tokens)
  assert float(jnp.abs(logits - ref).max()) < 0.1
  remat = models.Transformer(tiny(remat="full"), rngs=nnx.Rngs(0))
  grads = lambda m: jax.grad(lambda st: nnx.merge(nnx.graphdef(m), st)(tokens).sum())(
      nnx.state(m))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               grads(remat), grads(models.Transformer(tiny(), rngs=nnx.Rngs(0))))


def test_param_count_matches_config_and_axes_are_named():
  for variant in _VARIANTS.values():
    config = tiny(**variant)
    model = models.Transformer(config, rngs=nnx.Rngs(0))
    assert models.param_count(model) == config.num_params
  state = nnx.state(models.Transformer(tiny(), rngs=nnx.Rngs(0)))
  axes = {a for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
          for a in v.get_metadata()["axes"]}
  assert axes == {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "layers"}


def test_layer_parameters_are_stacked_on_a_leading_layers_axis():
  model = models.Transformer(tiny(num_layers=3), rngs=nnx.Rngs(0))
  for path, var in jax.tree_util.tree_flatten_with_path(
      nnx.state(model.blocks), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    assert var.get_metadata()["axes"][0] == "layers", path
    assert var.get_value().shape[0] == 3, path
  q = model.blocks.attn.q_proj.get_value()
  assert not np.allclose(q[0], q[1]) and not np.allclose(q[1], q[2])  # Each layer its own draw.


def _prefill_then_decode(model, tokens, prefill: int):
  """Logits of tokens [B, T] from a cached prefill of `prefill` tokens, then one at a time."""
  b, t = tokens.shape
  cache = models.KVCache.zeros(model.config, b, t + 2)
  slots = jnp.arange(t + 2)
  mask = (slots[None, :] <= jnp.arange(prefill)[:, None])[None].repeat(b, 0)
  out, cache = model.forward(tokens[:, :prefill], positions=jnp.arange(prefill)[None].repeat(b, 0),
                             attention_mask=mask, cache=cache)
  outs = [out]
  for i in range(prefill, t):
    out, cache = model.forward(tokens[:, i:i + 1], positions=jnp.full((b, 1), i),
                               attention_mask=(slots <= i)[None, None, :].repeat(b, 0),
                               cache=cache)
    outs.append(out)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("remat", ["none", "full", "dots", "dots_no_batch"])
def test_the_scan_over_layers_equals_a_loop_over_them_for_every_remat_policy(remat):
  # model.scan_layers=False: a Python loop over the same stacked parameters, a per-layer KV cache.
  scanned = models.Transformer(tiny(num_layers=3, remat=remat), rngs=nnx.Rngs(0))
  looped = models.Transformer(tiny(num_layers=3, remat=remat, scan_layers=False),
                              rngs=nnx.Rngs(0))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(scanned), nnx.state(looped))
  tokens = jax.random.randint(jax.random.key(2), (2, 7), 0, 61)
  np.testing.assert_allclose(looped(tokens), scanned(tokens), atol=1e-5)
  grads = lambda m: jax.grad(lambda st: nnx.merge(nnx.graphdef(m), st)(tokens).sum())(
      nnx.state(m))
  # Gradients here reach ~7; the two programs sum in different orders (float32 noise ~1e-6).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads(looped), grads(scanned))
  if remat != "none":
    return  # The cached forward is not rematerialised: one policy checks it.
  out_loop, cache_loop = _prefill_then_decode(looped, tokens, prefill=3)
  out_scan, cache_scan = _prefill_then_decode(scanned, tokens, prefill=3)
  np.testing.assert_allclose(out_loop, out_scan, atol=1e-5)
  np.testing.assert_allclose(out_loop, scanned(tokens), atol=1e-5)
  assert not cache_loop.stacked and len(cache_loop.k) == 3 and cache_loop.k[0].shape == (2, 2, 9, 8)
  assert cache_scan.stacked and cache_scan.k.shape == (3, 2, 2, 9, 8)
  np.testing.assert_allclose(jnp.stack(cache_loop.v), cache_scan.v, atol=1e-5)
  assert cache_loop.repeat(2).k[0].shape == (4, 2, 9, 8) == cache_scan.repeat(2).k.shape[1:]


def test_a_cache_of_the_other_layout_is_refused_by_name():
  looped = models.Transformer(tiny(scan_layers=False), rngs=nnx.Rngs(0))
  stacked_cache = models.KVCache.zeros(tiny(), 1, 4)
  with pytest.raises(ValueError, match="stacked KVCache for scan_layers=False"):
    looped.forward(jnp.zeros((1, 1), jnp.int32), positions=jnp.zeros((1, 1), jnp.int32),
                   attention_mask=jnp.ones((1, 1, 4), bool), cache=stacked_cache)


def test_init_and_forward_programs_do_not_grow_with_depth():
  # The compile-time property: one layer's program, scanned (or vmapped), at any depth.
  def sizes(num_layers):
    config = tiny(num_layers=num_layers, remat="full")
    init = jax.make_jaxpr(lambda: nnx.state(models.Transformer(config, rngs=nnx.Rngs(0))))()
    model = models.Transformer(config, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.zeros((1, 5), jnp.int32)
    loss = lambda st: nnx.merge(graphdef, st)(tokens).sum()
    backward = jax.make_jaxpr(jax.grad(loss))(state)
    return len(init.jaxpr.eqns), len(backward.jaxpr.eqns)
  assert sizes(2) == sizes(12)


def test_an_unknown_remat_policy_is_named():
  with pytest.raises(ValueError, match="model.remat='some'; allowed: .'none', 'full'"):
    tiny(remat="some")


def test_bad_architecture_values_are_named():
  with pytest.raises(ValueError, match="model.arch='gpt2'"):
    tiny(arch="gpt2")
  with pytest.raises(ValueError, match="num_heads=6 must be a multiple of model.num_kv_heads=4"):
    tiny(num_heads=6, num_kv_heads=4)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [3, 4, 16])
def test_query_chunked_attention_and_mlp_equal_plain_forward_and_gradients(chunk):
  # 9 and 11 tokens do not divide by 3 or 4 (padded blocks); 16 exceeds T (the plain path).
  plain = models.Transformer(tiny(), rngs=nnx.Rngs(0))
  chunked = models.Transformer(tiny(attention_chunk=chunk, mlp_chunk=chunk + 1, remat="full"),
                               rngs=nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 11), 0, 61)
  mask = jnp.arange(11)[None, :] >= jnp.array([[0], [2]])  # Row 1 left-padded by 2.
  # Jitted: eager, each chunk's ops dispatch one by one (30 s instead of 3 at chunk 3).
  logits = lambda m: jax.jit(lambda st: nnx.merge(nnx.graphdef(m), st)(
      tokens, input_mask=mask))(nnx.state(m))
  np.testing.assert_allclose(logits(chunked), logits(plain), atol=1e-5)
  grads = lambda m: jax.jit(jax.grad(lambda st: (nnx.merge(nnx.graphdef(m), st)(
      tokens, input_mask=mask) * mask[..., None]).sum()))(nnx.state(m))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads(chunked), grads(plain))
  # The cached path (a prefill longer than the chunk, then one decode step) agrees too.
  cache = models.KVCache.zeros(chunked.config, 2, 12)
  slots = jnp.arange(12)
  pre = (slots[None, :] <= jnp.arange(9)[:, None])[None].repeat(2, 0)
  out, cache = chunked.forward(tokens[:, :9], positions=jnp.arange(9)[None].repeat(2, 0),
                               attention_mask=pre, cache=cache)
  full = plain(tokens[:, :10])
  np.testing.assert_allclose(out, full[:, :9], atol=1e-5)
  step, _ = chunked.forward(tokens[:, 9:10], positions=jnp.full((2, 1), 9),
                            attention_mask=(slots <= 9)[None, None, :].repeat(2, 0), cache=cache)
  np.testing.assert_allclose(step[:, 0], full[:, 9], atol=1e-5)


@pytest.mark.slow
def test_remat_works_when_params_come_from_an_outer_trace():
  # The train step evaluates its loss under jax.eval_shape and the sampler decodes inside a
  # while_loop, both with Params merged from the enclosing jit: remat must not write them back.
  model = models.Transformer(tiny(remat="full", attention_chunk=4, mlp_chunk=4), rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  tokens = jnp.arange(9)[None] % 61

  shapes = []

  @jax.jit
  def grads_and_loop(st):
    loss = lambda s: nnx.merge(graphdef, s)(tokens).sum()
    shapes.append(jax.eval_shape(lambda: loss(st)).shape)
    body = lambda i, acc: acc + loss(st)
    return jax.grad(loss)(st), jax.lax.fori_loop(0, 2, body, 0.0)

  grads, looped = grads_and_loop(state)
  assert shapes == [()] and np.isfinite(float(looped))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

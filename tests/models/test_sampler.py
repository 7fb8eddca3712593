"""Tests for dypo_jax.models.sampler on a tiny model (vocab 64, hidden 32, 2 layers), CPU.

Equivalences: greedy decode with the cache == argmax of a teacher-forced full forward; returned
log-probs == teacher-forced log-softmax; sharded == one device. Distributions: chi-square tests of
the sampling rule on fixed logits (golden values derived by hand in the comments) and of the whole
sampler's first token against the model's own teacher-forced logits.
"""
import dataclasses

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dypo_jax.models import ModelConfig
from dypo_jax.models import sampler as sampler_lib
from dypo_jax.models import Transformer

PAD = 0
CONFIG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=64, max_seq_len=64)
BUCKETS = (8, 16)
PROMPTS = [[5, 9, 11], [7, 3, 22, 40, 41, 42, 43, 44, 45, 46, 47], [63]]  # 3, 11, 1 tokens.
# One compiled program per (shape, mode), shared by the direct tests of the sampling rule.
_sample_token = jax.jit(sampler_lib.sample_token, static_argnames="mode")


def _response_mask(out: sampler_lib.SampleOutput) -> np.ndarray:
  """[B, K, T] bool: True on the tokens that count (up to and including the stop token)."""
  return np.arange(out.tokens.shape[-1])[None, None, :] < out.lengths[..., None]


def _model(scale_head: float = 30.0) -> Transformer:
  """The tiny model, with a scaled LM head so that next-token distributions are far from flat."""
  model = Transformer(CONFIG, rngs=nnx.Rngs(0))
  model.lm_head[...] = model.lm_head[...] * scale_head
  return model


@pytest.fixture(scope="module")
def setup():
  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  # The Sampler that the functional `sample(model, ...)` builds and caches: both share programs.
  sampler = sampler_lib._cached_sampler(  # pylint: disable=protected-access
      graphdef, CONFIG, PAD, BUCKETS)
  return model, params, sampler


def _teacher_forced(model, out: sampler_lib.SampleOutput) -> np.ndarray:
  """[B, K, T, V] float32 logits that predict each response token, from one full forward."""
  b, k, t = out.tokens.shape
  p = out.prompt_tokens.shape[1]
  n = p + t
  # Prompt and response side by side: [B, K, P + T] tokens and the mask of those that count.
  tokens = np.concatenate([np.broadcast_to(out.prompt_tokens[:, None], (b, k, p)), out.tokens], -1)
  prompt_mask = np.broadcast_to(
      (np.arange(p)[None, :] >= p - out.prompt_lengths[:, None])[:, None], (b, k, p))
  response_mask = _response_mask(out)
  input_mask = np.concatenate([prompt_mask, response_mask], -1)
  logits = model(jnp.asarray(tokens.reshape(b * k, n)),
                 input_mask=jnp.asarray(input_mask.reshape(b * k, n)))
  # Column p - 1 + i predicts response token i.
  return np.asarray(logits).reshape(b, k, n, -1)[:, :, p - 1:n - 1, :]


def _log_softmax(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _take(x: np.ndarray, idx: np.ndarray) -> np.ndarray:
  return np.take_along_axis(x, idx[..., None], axis=-1)[..., 0]


def _reference_probs(logits, *, temperature, top_p=1.0, top_k=0) -> np.ndarray:
  """Sort-based numpy reference: softmax(logits / T), top-k, then top-p on the renormalised mass."""
  p = np.exp(_log_softmax(np.asarray(logits) / temperature))
  v = p.shape[-1]
  order = np.argsort(-p, kind="stable")
  keep = np.zeros(v, bool)
  keep[order[:top_k if 0 < top_k < v else v]] = True
  q = np.where(keep, p, 0.0)
  q /= q.sum()
  if top_p < 1.0:
    before = np.cumsum(q[order]) - q[order]
    keep_p = np.zeros(v, bool)
    keep_p[order[before < top_p]] = True
    keep &= keep_p
  r = np.where(keep, p, 0.0)
  return r / r.sum()


def _chi_square_pvalue(samples: np.ndarray, probs: np.ndarray) -> float:
  """Goodness of fit; zero-probability tokens must never appear; small bins are merged."""
  counts = np.bincount(samples, minlength=probs.size)
  assert counts[probs == 0].sum() == 0, "sampled a token the filter removes"
  expected = probs * samples.size
  order = np.argsort(expected)
  obs, exp = [], []
  acc_o = acc_e = 0.0
  for i in order[probs[order] > 0]:
    acc_o, acc_e = acc_o + counts[i], acc_e + expected[i]
    if acc_e >= 5:
      obs.append(acc_o)
      exp.append(acc_e)
      acc_o = acc_e = 0.0
  if acc_e:
    obs[-1] += acc_o
    exp[-1] += acc_e
  if len(obs) < 2:
    return 1.0
  return float(stats.chisquare(obs, exp).pvalue)


# --------------------------------------------------------------------------- the sampling rule

# Hand-derived golden distributions for logits = log([0.4, 0.3, 0.2, 0.1]):
#   T=1 unfiltered -> [0.4, 0.3, 0.2, 0.1];  T=0.5 -> p^2 / sum p^2 = [16, 9, 4, 1] / 30;
#   top_k=3 -> [4, 3, 2, 0] / 9;  top_p=0.65 -> mass before 0.3 is 0.4 < 0.65, before 0.2 is
#   0.7 >= 0.65, so {0.4, 0.3} -> [4, 3, 0, 0] / 7;  top_k=3 then top_p=0.6 -> on [4, 3, 2] / 9,
#   mass before the second is 4/9 < 0.6, before the third 7/9 >= 0.6 -> [4, 3, 0, 0] / 7.
GOLDEN = [
    (dict(temperature=1.0), [0.4, 0.3, 0.2, 0.1]),
    (dict(temperature=0.5), np.array([16, 9, 4, 1]) / 30),
    (dict(temperature=1.0, top_k=3), np.array([4, 3, 2, 0]) / 9),
    (dict(temperature=1.0, top_p=0.65), np.array([4, 3, 0, 0]) / 7),
    (dict(temperature=1.0, top_k=3, top_p=0.6), np.array([4, 3, 0, 0]) / 7),
]


@pytest.mark.parametrize("kwargs,golden", GOLDEN)
def test_sample_token_matches_golden_distribution(kwargs, golden):
  n = 20000
  logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32)).repeat(n, 0)
  uniform = np.random.default_rng(0).random(n, np.float32)
  full = dict(temperature=1.0, top_p=1.0, top_k=0) | kwargs
  mode = sampler_lib.sampling_mode(**full, vocab_size=4)
  assert mode == ("sample" if set(kwargs) == {"temperature"} else "filter")
  tok, lp = _sample_token(
      logits=jnp.asarray(logits), uniform=jnp.asarray(uniform), mode=mode,
      temperature=jnp.float32(full["temperature"]), top_p=jnp.float32(full["top_p"]),
      top_k=jnp.int32(full["top_k"]))
  tok = np.asarray(tok)
  np.testing.assert_allclose(golden, _reference_probs(logits[0], **full), atol=1e-6)
  assert _chi_square_pvalue(tok, np.asarray(golden, np.float64)) > 1e-3
  # Log-probs are those of the tempered, unfiltered softmax.
  want = _take(_log_softmax(logits / full["temperature"]), tok)
  np.testing.assert_allclose(np.asarray(lp), want, atol=1e-5)


@pytest.mark.parametrize("temperature,top_p,top_k", [(0.7, 1.0, 0), (1.3, 0.8, 0),
                                                     (0.9, 1.0, 5), (0.6, 0.9, 12)])
def test_sample_token_matches_reference_on_random_logits(temperature, top_p, top_k):
  n, v = 30000, 32
  logits = np.random.default_rng(1).normal(0, 2, (1, v)).astype(np.float32)
  uniform = np.random.default_rng(2).random(n, np.float32)
  mode = sampler_lib.sampling_mode(temperature=temperature, top_p=top_p, top_k=top_k,
                                   vocab_size=v)
  tok, _ = _sample_token(
      logits=jnp.asarray(logits.repeat(n, 0)), uniform=jnp.asarray(uniform),
      temperature=jnp.float32(temperature), top_p=jnp.float32(top_p), top_k=jnp.int32(top_k),
      mode=mode)
  probs = _reference_probs(logits[0], temperature=temperature, top_p=top_p, top_k=top_k)
  assert _chi_square_pvalue(np.asarray(tok), probs) > 1e-3


def test_greedy_sample_token_is_argmax():
  logits = np.random.default_rng(3).normal(size=(50, 16)).astype(np.float32)
  tok, lp = sampler_lib.sample_token(
      logits=jnp.asarray(logits), uniform=jnp.zeros(50), temperature=jnp.float32(1.0),
      top_p=jnp.float32(1.0), top_k=jnp.int32(0), mode="greedy")
  np.testing.assert_array_equal(np.asarray(tok), logits.argmax(-1))
  np.testing.assert_allclose(np.asarray(lp), _log_softmax(logits).max(-1), atol=1e-5)


def test_extreme_uniforms_never_pick_a_filtered_token():
  # Weights 1, 0.5, 0.25, ... : top_k=2 keeps tokens 0 and 1 only. u = 0 must give token 0 and
  # u = the largest float32 below 1 must give token 1, never a filtered token after it.
  logits = np.log(0.5 ** np.arange(8, dtype=np.float32))[None].repeat(2, 0)
  uniform = np.array([0.0, np.nextafter(np.float32(1), np.float32(0))], np.float32)
  tok, _ = sampler_lib.sample_token(
      logits=jnp.asarray(logits), uniform=jnp.asarray(uniform), temperature=jnp.float32(1.0),
      top_p=jnp.float32(1.0), top_k=jnp.int32(2), mode="filter")
  np.testing.assert_array_equal(np.asarray(tok), [0, 1])


# ------------------------------------------------------------------------------- the sampler


@pytest.mark.slow
def test_greedy_matches_teacher_forced_argmax(setup):
  model, params, sampler = setup
  out = sampler.sample(params, PROMPTS, num_samples=3, max_new_tokens=10, temperature=0.0,
                       rng=jax.random.key(0))
  assert out.tokens.shape == (3, 3, 10) and out.prompt_tokens.shape == (3, 16)
  np.testing.assert_array_equal(out.lengths, 10)
  np.testing.assert_array_equal(out.stop_reason, sampler_lib.STOP_LENGTH)
  np.testing.assert_array_equal(out.prompt_lengths, [3, 11, 1])
  np.testing.assert_array_equal(out.tokens[:, 0], out.tokens[:, 2])  # Greedy: samples agree.
  logits = _teacher_forced(model, out)  # [B, K, T, V]
  np.testing.assert_array_equal(out.tokens, logits.argmax(-1))
  want = _take(_log_softmax(logits), out.tokens)
  np.testing.assert_allclose(out.logprobs, want, atol=1e-4)
  # The functional convenience finds the same cached Sampler: same answer, no new compile.
  again = sampler_lib.sample(model, PROMPTS, pad_id=PAD, prompt_buckets=BUCKETS, num_samples=3,
                             max_new_tokens=10, temperature=0.0, rng=jax.random.key(1))
  np.testing.assert_array_equal(again.tokens, out.tokens)
  assert again.num_compiles == out.num_compiles


@pytest.mark.slow
@pytest.mark.parametrize("top_p,top_k", [(1.0, 0), (0.9, 20)])
def test_logprobs_match_teacher_forced(setup, top_p, top_k):
  model, params, sampler = setup
  temperature = 0.7
  out = sampler.sample(params, PROMPTS, num_samples=3, max_new_tokens=10,
                       temperature=temperature, top_p=top_p, top_k=top_k,
                       rng=jax.random.key(42))
  logits = _teacher_forced(model, out)
  mask = _response_mask(out)
  want = _take(_log_softmax(logits / temperature), out.tokens)
  assert np.max(np.abs(np.where(mask, out.logprobs - want, 0.0))) < 1e-4
  for b in range(3):  # The k samples of one prompt differ.
    rows = {tuple(r) for r in out.tokens[b]}
    assert len(rows) == 3, out.tokens[b]


def test_stop_ids_end_sequences_and_nothing_after_counts(setup):
  _, params, sampler = setup
  kw = dict(num_samples=3, max_new_tokens=10, temperature=1.5, rng=jax.random.key(7))
  free = sampler.sample(params, PROMPTS, **kw)
  # Two stop ids taken from the free run: row (0, 0) stops by step 4, row (1, 1) by step 7.
  stop_ids = (int(free.tokens[0, 0, 3]), int(free.tokens[1, 1, 6]))
  out = sampler.sample(params, PROMPTS, stop_ids=stop_ids, **kw)
  stopped = out.stop_reason == sampler_lib.STOP_TOKEN
  assert stopped[0, 0] and stopped[1, 1] and not stopped.all(), out.lengths
  assert out.lengths[0, 0] <= 4 and out.lengths[1, 1] <= 7
  for b in range(3):
    for k in range(3):
      n = out.lengths[b, k]
      row = out.tokens[b, k]
      # Same rng, same draws: up to the stop the run equals the free run.
      np.testing.assert_array_equal(row[:n], free.tokens[b, k, :n])
      np.testing.assert_allclose(out.logprobs[b, k, :n], free.logprobs[b, k, :n], atol=1e-6)
      assert np.all(row[n:] == PAD) and np.all(out.logprobs[b, k, n:] == 0)
      hits = np.isin(free.tokens[b, k], stop_ids)
      if stopped[b, k]:
        assert row[n - 1] in stop_ids and not hits[:n - 1].any()
      else:
        assert n == 10 and not hits.any()


@pytest.mark.slow
def test_first_token_distribution_end_to_end(setup):
  """4000 samples of one prompt: the first token follows the model's own filtered softmax."""
  model, params, sampler = setup
  prompt = PROMPTS[1]
  temperature, top_p, top_k = 1.2, 0.9, 16
  out = sampler.sample(params, [prompt], num_samples=4000, max_new_tokens=1,
                       temperature=temperature, top_p=top_p, top_k=top_k, rng=jax.random.key(3))
  logits = np.asarray(model(jnp.asarray([prompt])))[0, -1]
  probs = _reference_probs(logits, temperature=temperature, top_p=top_p, top_k=top_k)
  assert 4 <= (probs > 0).sum() <= 16  # The filters bite: the test is not vacuous.
  assert _chi_square_pvalue(out.tokens[0, :, 0], probs) > 1e-3


@pytest.mark.slow
def test_trace_count_is_bounded_and_new_params_do_not_retrace():
  model = _model()
  graphdef, params = nnx.split(model, nnx.Param)
  sampler = sampler_lib.Sampler(graphdef, model_config=CONFIG, pad_id=PAD, prompt_buckets=BUCKETS)
  rng = jax.random.key(0)
  kw = dict(num_samples=2, max_new_tokens=2, rng=rng)
  lengths = [(3, 5), (9, 2), (1, 7), (16, 4), (8, 8), (12, 13), (2, 2)]  # Buckets 8 and 16.
  for i, (a, b) in enumerate(lengths):
    prompts = [np.arange(1, a + 1), np.arange(2, b + 2)]
    temperature = 0.6 if i % 2 else 1.0  # Eval and training temperatures share a program.
    out = sampler.sample(params, prompts, temperature=temperature, **kw)
    params = jax.tree.map(lambda x: x * 1.01, params)  # A trainer step: new values.
  assert sampler.trace_count == 2 and out.num_compiles == 2
  sampler.sample(params, [[1, 2]], temperature=1.0, top_p=0.5, **kw)  # New mode: one more.
  sampler.sample(params, [[1, 2, 3]], temperature=0.9, top_p=0.9, top_k=3, stop_ids=(1, 2), **kw)
  assert sampler.trace_count == 3


@pytest.mark.parametrize("prompts,kwargs,match", [
    ([], {}, "prompts is empty"),
    ([[1, 2], []], {}, "prompt 1 is empty"),
    ([list(range(1, 65)) + [1]], {}, "longer than the model's context"),
    ([[1] * 20], {}, "above the largest prompt bucket"),
    ([[1] * 10], dict(max_new_tokens=60), "does not fit the model's context"),
    ([[1, 64]], {}, "outside the vocabulary"),
    ([[1, 2]], dict(top_p=0.0), "top_p"),
    ([[1, 2]], dict(temperature=-1.0), "temperature"),
    ([[1, 2]], dict(stop_ids=tuple(range(9))), "at most 8 stop ids"),
])
def test_bad_input_raises_before_compiling(prompts, kwargs, match):
  graphdef, params = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
  sampler = sampler_lib.Sampler(graphdef, model_config=CONFIG, pad_id=PAD, prompt_buckets=BUCKETS)
  kw = dict(num_samples=2, max_new_tokens=4, temperature=1.0, rng=jax.random.key(0)) | kwargs
  with pytest.raises(ValueError, match=match):
    sampler.sample(params, prompts, **kw)
  assert sampler.trace_count == 0


def test_bucket_is_capped_by_the_context(setup):
  _, _, sampler = setup
  assert sampler.bucket_for(3, 10) == 8
  assert sampler.bucket_for(9, 10) == 16
  assert sampler.bucket_for(9, 52) == 12  # 16 + 52 > 64: the cache is capped at the context.


@pytest.mark.slow
def test_sharded_matches_single_device(fake_devices):
  code = """
  import dataclasses
  import jax, numpy as np
  from flax import nnx
  from dypo_jax.models import ModelConfig, Transformer
  from dypo_jax.models import builder
  from dypo_jax.models import sampler as S
  from dypo_jax.parallel import sharding
  cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=64, max_seq_len=64)
  make = lambda: Transformer(cfg, rngs=nnx.Rngs(0))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  sharded = builder.build(builder.ModelOptions(cfg), mesh)
  g8, p8 = nnx.split(sharded, nnx.Param)
  # The one-device reference holds the very same values (a jitted init may round differently).
  g1, p1 = nnx.split(make(), nnx.Param)
  p1 = jax.tree.map(lambda x: jax.device_put(np.asarray(x), jax.devices()[0]), p8)
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(p8))
  prompts = [[5, 9, 11], [7, 3, 22, 40, 41, 42, 43, 44, 45, 46, 47], [63]]  # B=3 -> padded to 4.
  kw = dict(num_samples=2, max_new_tokens=5, temperature=1.0, stop_ids=(3,),
            rng=jax.random.key(5))
  one = S.Sampler(g1, model_config=cfg, pad_id=0, prompt_buckets=(8, 16)).sample(p1, prompts, **kw)
  s8 = S.Sampler(g8, model_config=cfg, pad_id=0, prompt_buckets=(8, 16), mesh=mesh)
  assert s8.batch_shards == 4
  out = s8.sample(p8, prompts, **kw)
  assert out.tokens.shape == (3, 2, 5)
  np.testing.assert_array_equal(out.tokens, one.tokens)
  np.testing.assert_array_equal(out.lengths, one.lengths)
  np.testing.assert_array_equal(out.stop_reason, one.stop_reason)
  np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
  # The loop over layers (one cache array per layer, each pinned to the mesh) samples the same.
  loop_cfg = dataclasses.replace(cfg, scan_layers=False)
  looped = builder.build(builder.ModelOptions(loop_cfg), mesh)
  gl, _ = nnx.split(looped, nnx.Param)
  out = S.Sampler(gl, model_config=loop_cfg, pad_id=0, prompt_buckets=(8, 16),
                  mesh=mesh).sample(p8, prompts, **kw)
  np.testing.assert_array_equal(out.tokens, one.tokens)
  np.testing.assert_allclose(out.logprobs, one.logprobs, atol=1e-5)
  print("OK", jax.device_count())
  """
  assert "OK 8" in fake_devices(code)


@pytest.mark.slow
def test_bfloat16_compute_reads_weights_cast_once_with_the_models_own_values():
  # float32 master weights cast by the sampler once a call must sample exactly what weights
  # stored in bfloat16 sample: the same values reach every matmul.
  config = dataclasses.replace(CONFIG, dtype="bfloat16")
  model = Transformer(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  as_bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  sampler = sampler_lib.Sampler(graphdef, model_config=config, pad_id=PAD, prompt_buckets=BUCKETS)
  kw = dict(num_samples=2, max_new_tokens=6, temperature=0.8, rng=jax.random.key(5))
  master, stored = sampler.sample(params, PROMPTS, **kw), sampler.sample(as_bf16, PROMPTS, **kw)
  np.testing.assert_array_equal(master.tokens, stored.tokens)
  np.testing.assert_array_equal(master.logprobs, stored.logprobs)


# ------------------------------------------------------------- continuous batching, positions


@pytest.mark.slow
@pytest.mark.parametrize("scan_layers", [True, False])
def test_tokens_depend_on_the_sample_not_on_the_rows_in_flight(scan_layers):
  """Rows refilled as samples end (rows < samples), finished rows compacted (rows = samples):
  each sample's tokens are the same token for token whatever the row count."""
  config = dataclasses.replace(CONFIG, scan_layers=scan_layers)
  model = Transformer(config, rngs=nnx.Rngs(0))
  model.lm_head[...] = model.lm_head[...] * 30.0
  graphdef, params = nnx.split(model, nnx.Param)
  # Stops that end samples at many different lengths (found in a free run of the same draws).
  kw = dict(num_samples=4, max_new_tokens=12, temperature=1.5, rng=jax.random.key(11))
  free = sampler_lib.Sampler(graphdef, model_config=config, pad_id=PAD,
                             prompt_buckets=BUCKETS).sample(params, PROMPTS, **kw)
  stop_ids = tuple(int(x) for x in np.unique(free.tokens[:, :, 2:5])[:6])
  outs = {}
  for rows in (0, 2, 5):  # 0: all 12 at once, compacted; 2 and 5: refilled.
    sampler = sampler_lib.Sampler(graphdef, model_config=config, pad_id=PAD,
                                  prompt_buckets=BUCKETS, rows=rows)
    outs[rows] = sampler.sample(params, PROMPTS, stop_ids=stop_ids, **kw)
  ref = outs[0]
  assert len(set(ref.lengths.ravel())) >= 4, ref.lengths  # Long-tailed enough to matter.
  assert (ref.stop_reason == sampler_lib.STOP_TOKEN).any()
  for rows, out in outs.items():
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=f"rows={rows}")
    # Log-probs to float32 rounding: a matmul's summation order may follow the batch size.
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, err_msg=f"rows={rows}")
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.stop_reason, ref.stop_reason)
  # Up to its stop, every sample is the free run's (the same keys): nothing after counts.
  mask = _response_mask(ref)
  np.testing.assert_array_equal(np.where(mask, ref.tokens, PAD), np.where(mask, free.tokens, PAD))
  assert np.all(ref.tokens[~mask] == PAD) and np.all(ref.logprobs[~mask] == 0)


@pytest.mark.slow
def test_chunked_prefill_and_the_pallas_decode_sample_the_same(setup):
  _, params, sampler = setup
  graphdef = sampler._graphdef  # pylint: disable=protected-access
  kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, stop_ids=(3,),
            rng=jax.random.key(2))
  ref = sampler.sample(params, PROMPTS, **kw)  # P = 16: one prefill pass (chunk 512).
  for extra in (dict(prefill_chunk=4), dict(decode_impl="pallas", decode_block=8)):
    other = sampler_lib.Sampler(graphdef, model_config=CONFIG, pad_id=PAD,
                                prompt_buckets=BUCKETS, **extra)
    out = other.sample(params, PROMPTS, **kw)
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=str(extra))
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, err_msg=str(extra))


@pytest.mark.parametrize("kwargs,match", [
    (dict(rows=-1), "sampler.rows=-1"), (dict(decode_impl="triton"), "decode_impl"),
    (dict(decode_block=0), "decode_block=0")])
def test_bad_sampler_settings_are_refused(kwargs, match):
  graphdef, _ = nnx.split(Transformer(CONFIG, rngs=nnx.Rngs(0)), nnx.Param)
  with pytest.raises(ValueError, match=match):
    sampler_lib.Sampler(graphdef, model_config=CONFIG, pad_id=PAD, **kwargs)

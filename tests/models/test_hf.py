"""Hugging Face import/export: logits parity with transformers (torch, CPU) on tiny random models.

transformers and torch are imported inside the tests only; the runtime code never imports torch.
"""
import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
import safetensors.numpy

from dypo_jax.models import hf
from dypo_jax.models import hf_config
from dypo_jax.models import ModelConfig
from dypo_jax.models import Transformer

TOL = 1e-4  # Max-abs logit difference allowed in float32.
VOCAB = 96

# Tiny configs: Qwen2 untied with q/k/v biases; Qwen3 tied with qk-norm and head_dim != D / N;
# Llama untied with GQA (6 query heads over 2 KV heads). Each has a non-default rope_theta.
FAMILIES = {
    "qwen2": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=False, rope_theta=5000.0),
    "qwen3": dict(hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  tie_word_embeddings=True, rope_theta=20000.0),
    "llama": dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                  tie_word_embeddings=False, rope_theta=3000.0),
}


def _hf_model(arch: str, seed: int = 0, **overrides):
  """A transformers model with every parameter random (norm scales around 1, biases non-zero)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config_cls = {"qwen2": transformers.Qwen2Config, "qwen3": transformers.Qwen3Config,
                "llama": transformers.LlamaConfig}[arch]
  kwargs = dict(vocab_size=VOCAB, intermediate_size=80, num_hidden_layers=2,
                max_position_embeddings=64, rms_norm_eps=1e-5, **FAMILIES[arch])
  kwargs.update(overrides)
  config = config_cls(**kwargs)
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def _batch(seed: int = 0):
  """Right-padded tokens [3, 9] with lengths 9, 5, 1 and their mask."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, VOCAB, size=(3, 9)).astype(np.int32)
  mask = np.arange(9)[None, :] < np.array([9, 5, 1])[:, None]
  return np.where(mask, tokens, 0), mask


def _torch_logits(model, tokens, mask):
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


def _our_logits(model, tokens, mask):
  """One jitted forward (faster on CPU than dozens of eagerly compiled ops)."""
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda s, t, m: nnx.merge(graphdef, s)(t, input_mask=m))
  return np.asarray(forward(state, jnp.asarray(tokens), jnp.asarray(mask)))


def _max_diff(a, b, mask):
  return float(np.max(np.abs(a[mask] - b[mask])))


def _hf_load(path):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.AutoModelForCausalLM.from_pretrained(
      path, attn_implementation="eager").eval()


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_from_pretrained_matches_transformers(arch, tmp_path):
  hf_model = _hf_model(arch)
  hf_model.save_pretrained(tmp_path / "ckpt")
  model = hf.from_pretrained(str(tmp_path / "ckpt"))
  c = model.config
  assert c.arch == arch and c.rope_theta == FAMILIES[arch]["rope_theta"]
  assert c.tie_embeddings == FAMILIES[arch]["tie_word_embeddings"]
  assert c.qk_norm == (arch == "qwen3") and c.qkv_bias == (arch == "qwen2")
  assert c.max_seq_len == 64 and c.rms_norm_eps == 1e-5
  tokens, mask = _batch()
  diff = _max_diff(_our_logits(model, tokens, mask), _torch_logits(hf_model, tokens, mask), mask)
  print(f"{arch}: max-abs logit diff {diff:.2e}")
  assert diff < TOL


def test_sharded_checkpoint_from_transformers(tmp_path):
  hf_model = _hf_model("llama", seed=1)
  hf_model.save_pretrained(tmp_path / "ckpt", max_shard_size="20KB")
  files = os.listdir(tmp_path / "ckpt")
  assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
  model = hf.from_pretrained(str(tmp_path / "ckpt"))
  tokens, mask = _batch(1)
  diff = _max_diff(_our_logits(model, tokens, mask), _torch_logits(hf_model, tokens, mask), mask)
  assert diff < TOL


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_round_trip_through_transformers(arch, tmp_path):
  hf_model = _hf_model(arch, seed=2)
  hf_model.save_pretrained(tmp_path / "a")
  model = hf.from_pretrained(str(tmp_path / "a"))
  hf.save_pretrained(model, str(tmp_path / "b"))
  config = json.loads((tmp_path / "b" / "config.json").read_text())
  assert config["model_type"] == arch and config["architectures"] == [hf_config._ARCHITECTURE[arch]]
  assert config["rope_parameters"]["rope_theta"] == FAMILIES[arch]["rope_theta"]
  with safe_open(str(tmp_path / "b" / hf.SINGLE_FILE), framework="numpy") as f:
    assert ("lm_head.weight" in f.keys()) == (not FAMILIES[arch]["tie_word_embeddings"])
  reloaded = _hf_load(str(tmp_path / "b"))
  assert reloaded.config.rope_parameters["rope_theta"] == FAMILIES[arch]["rope_theta"]
  tokens, mask = _batch(2)
  want = _torch_logits(hf_model, tokens, mask)
  assert _max_diff(_torch_logits(reloaded, tokens, mask), want, mask) < TOL
  # Our state dict equals transformers' tensors exactly (pure re-layout, no arithmetic).
  ours = hf.hf_state_dict(model)
  theirs = {k: v.numpy() for k, v in hf_model.state_dict().items()}
  if hf_model.config.tie_word_embeddings:
    theirs.pop("lm_head.weight", None)
  assert sorted(ours) == sorted(theirs)
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)


def _random_transformer(config: ModelConfig, seed: int) -> Transformer:
  """Our model with every parameter random (numpy), norm scales around 1 and biases non-zero."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  new = []
  for path, var in leaves:
    shape = var.get_value().shape
    is_norm = any("norm" in str(getattr(p, "key", "")) for p in path)
    x = 1.0 + 0.3 * rng.standard_normal(shape) if is_norm else 0.15 * rng.standard_normal(shape)
    new.append(var.replace(value=jnp.asarray(x, config.param_dtype)))
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


# qwen2 without biases exports zero biases; qwen2 with head_dim != D / N; a sharded write.
OWN_CONFIGS = {
    "qwen2_nobias_headdim": (ModelConfig(arch="qwen2", vocab_size=VOCAB, embed_dim=40,
                                         num_heads=4, num_kv_heads=1, head_dim=12, mlp_dim=72,
                                         rope_theta=7000.0, qkv_bias=False, max_seq_len=64),
                             None),
    "qwen3_tied_sharded": (ModelConfig(arch="qwen3", vocab_size=VOCAB, embed_dim=32, num_heads=4,
                                       num_kv_heads=2, head_dim=16, mlp_dim=64, qkv_bias=False,
                                       qk_norm=True, tie_embeddings=True, rope_theta=1e6,
                                       rms_norm_eps=1e-5), 30_000),
    "llama": (ModelConfig(arch="llama", vocab_size=VOCAB, embed_dim=48, num_heads=6,
                          num_kv_heads=2, head_dim=8, mlp_dim=64, qkv_bias=False,
                          rope_theta=3000.0), None),
}


@pytest.mark.parametrize("name", sorted(OWN_CONFIGS))
def test_our_random_model_through_transformers(name, tmp_path):
  config, max_shard_bytes = OWN_CONFIGS[name]
  model = _random_transformer(config, seed=3)
  hf.save_pretrained(model, str(tmp_path / "out"), max_shard_bytes=max_shard_bytes)
  files = sorted(os.listdir(tmp_path / "out"))
  assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # No temp dirs left.
  if max_shard_bytes:
    assert hf.INDEX_FILE in files and hf.SINGLE_FILE not in files
    for f in files:
      if f.endswith(".safetensors"):
        with safe_open(str(tmp_path / "out" / f), framework="numpy") as fh:
          keys = list(fh.keys())
          size = sum(fh.get_tensor(k).nbytes for k in keys)
        assert size <= max_shard_bytes or len(keys) == 1
  else:
    assert files == ["config.json", hf.SINGLE_FILE]
  tokens, mask = _batch(3)
  ours = _our_logits(model, tokens, mask)
  diff = _max_diff(ours, _torch_logits(_hf_load(str(tmp_path / "out")), tokens, mask), mask)
  assert diff < TOL
  # And back: our loader reproduces the model exactly.
  again = hf.from_pretrained(str(tmp_path / "out"), max_seq_len=config.max_seq_len)
  np.testing.assert_array_equal(_our_logits(again, tokens, mask), ours)


def test_save_overwrites_atomically_and_keeps_other_files(tmp_path, monkeypatch):
  config = OWN_CONFIGS["llama"][0]
  out = tmp_path / "out"
  hf.save_pretrained(_random_transformer(config, seed=4), str(out), max_shard_bytes=20_000)
  (out / "tokenizer.json").write_text("{}")
  model = _random_transformer(config, seed=5)
  hf.save_pretrained(model, str(out))  # Unsharded now: the old shards and index must go.
  assert sorted(os.listdir(out)) == ["config.json", hf.SINGLE_FILE, "tokenizer.json"]
  assert sorted(os.listdir(tmp_path)) == ["out"]
  tokens, mask = _batch(4)
  np.testing.assert_array_equal(_our_logits(hf.from_pretrained(str(out)), tokens, mask),
                                _our_logits(model, tokens, mask))
  # A write that fails midway leaves the previous checkpoint intact and no temp directory.
  bad = _random_transformer(config, seed=6)
  with pytest.raises(ValueError, match="max_shard_bytes=-1"):
    hf.save_pretrained(bad, str(out), max_shard_bytes=-1)
  orig_save = safetensors.numpy.save_file

  def failing_save(*args, **kwargs):
    orig_save(*args, **kwargs)
    raise OSError("disk full")
  monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
  with pytest.raises(OSError, match="disk full"):
    hf.save_pretrained(bad, str(out))
  monkeypatch.undo()
  assert sorted(os.listdir(tmp_path)) == ["out"]
  np.testing.assert_array_equal(_our_logits(hf.from_pretrained(str(out)), tokens, mask),
                                _our_logits(model, tokens, mask))


def test_bf16_checkpoint(tmp_path):
  import torch  # pylint: disable=g-import-not-at-top
  hf_model = _hf_model("qwen2", seed=7).to(torch.bfloat16)
  hf_model.save_pretrained(tmp_path / "bf16")
  with safe_open(str(tmp_path / "bf16" / hf.SINGLE_FILE), framework="numpy") as f:
    assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
  theirs = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
  # Default: float32 parameters holding exactly the bf16 values.
  model = hf.from_pretrained(str(tmp_path / "bf16"))
  ours = hf.hf_state_dict(model)
  assert all(v.dtype == np.float32 for v in ours.values())
  for k, v in theirs.items():
    np.testing.assert_array_equal(ours[k], v, err_msg=k)
  # bf16 parameters and compute.
  model16 = hf.from_pretrained(str(tmp_path / "bf16"), dtype="bfloat16")
  assert model16.embedding.get_value().dtype == jnp.bfloat16
  ours16 = hf.hf_state_dict(model16)
  for k, v in theirs.items():
    assert ours16[k].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(ours16[k].astype(np.float32), v, err_msg=k)
  # Saving as bf16 from float32 parameters: BF16 tensors, dtype in config, transformers agrees.
  hf.save_pretrained(model, str(tmp_path / "out"), dtype="bfloat16")
  config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert config["dtype"] == config["torch_dtype"] == "bfloat16"
  reloaded = _hf_load(str(tmp_path / "out"))
  assert reloaded.dtype == torch.bfloat16
  for k, v in reloaded.state_dict().items():
    np.testing.assert_array_equal(v.float().numpy(), theirs[k], err_msg=k)


def _tiny_hf_config(**overrides):
  base = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=32,
              num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=64, vocab_size=50, rope_theta=500.0)
  base.update(overrides)
  return base


def test_model_config_from_hf_defaults_and_layouts():
  c = hf_config.model_config_from_hf(_tiny_hf_config(), dtype="bfloat16", max_seq_len=77)
  assert (c.head_dim, c.num_kv_heads, c.rope_theta, c.max_seq_len) == (8, 2, 500.0, 77)
  assert (c.dtype, c.param_dtype, c.qkv_bias, c.qk_norm) == ("bfloat16", "bfloat16", False, False)
  # transformers-5 layout: rope_theta only inside rope_parameters; absent keys take defaults.
  d = _tiny_hf_config(model_type="qwen3", architectures=["Qwen3ForCausalLM"],
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6})
  del d["rope_theta"], d["num_key_value_heads"]
  c = hf_config.model_config_from_hf(d, param_dtype="float32")
  assert (c.rope_theta, c.num_kv_heads, c.head_dim, c.qk_norm) == (1e6, 4, 128, True)
  assert (c.max_seq_len, c.tie_embeddings, c.param_dtype) == (32768, False, "float32")
  d = _tiny_hf_config(model_type="qwen2", architectures=None, rope_scaling=None)
  del d["rope_theta"]
  c = hf_config.model_config_from_hf(d)
  assert (c.rope_theta, c.qkv_bias, c.max_seq_len) == (10000.0, True, 32768)


@pytest.mark.parametrize("overrides, match", [
    (dict(model_type="gpt2"), "model_type='gpt2' is unsupported"),
    (dict(architectures=["MistralForCausalLM"]), "architectures=.*MistralForCausalLM"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}),
     r"rope_parameters.rope_type='llama3' is unsupported"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0}),
     r"rope_scaling.rope_type='yarn' is unsupported"),
    (dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], use_sliding_window=True),
     "use_sliding_window=True is unsupported"),
    (dict(attention_bias=True), "attention_bias=True is unsupported.*o_proj"),
    (dict(mlp_bias=True), "mlp_bias=True is unsupported"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is unsupported"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": 9.0}), "disagrees"),
    (dict(vocab_size=None), "'vocab_size'"),
    (dict(num_attention_heads="two"), "num_attention_heads='two' must be a positive integer"),
    (dict(max_position_embeddings=0), "max_position_embeddings=0 must be a positive integer"),
    (dict(rms_norm_eps=-1e-6), r"rms_norm_eps=-1e-06 must be a positive number"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers=2.5 must be a positive integer"),
])
def test_model_config_from_hf_rejects(overrides, match):
  with pytest.raises(ValueError, match=match):
    hf_config.model_config_from_hf(_tiny_hf_config(**overrides))


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
  with open(tmp_path / "config.json", "w") as fh:
    json.dump([{"model_type": "qwen2"}], fh)
  with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}: .*JSON object.*got a list"):
    hf.from_pretrained(str(tmp_path))


def _write_checkpoint(path, config: ModelConfig, tensors):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as fh:
    json.dump(hf_config.hf_config_from_model_config(config, dtype="float32"), fh)
  safetensors.numpy.save_file(tensors, os.path.join(path, hf.SINGLE_FILE))


def test_tensor_errors_name_the_tensor(tmp_path):
  config = OWN_CONFIGS["llama"][0]
  tensors = hf.hf_state_dict(_random_transformer(config, seed=8))
  name = "model.layers.1.self_attn.k_proj.weight"
  # Missing.
  partial = {k: v for k, v in tensors.items() if k != name}
  with pytest.raises(ValueError, match=f"tensor '{name}' missing"):
    hf.load_state_dict(config, partial)
  _write_checkpoint(tmp_path / "missing", config, partial)
  with pytest.raises(ValueError, match=f"tensor '{name}' missing from checkpoint .*missing"):
    hf.from_pretrained(str(tmp_path / "missing"))
  # Wrong shape: both shapes and the file are named.
  bad = dict(tensors, **{name: np.zeros((8, 48), np.float32)})
  _write_checkpoint(tmp_path / "shape", config, bad)
  with pytest.raises(ValueError, match=(rf"tensor '{name}' in file \S+{hf.SINGLE_FILE} "
                                        r"has shape \(8, 48\), expected \(16, 48\)")):
    hf.from_pretrained(str(tmp_path / "shape"))
  # Unexpected (an o_proj bias this config lacks); rotary inv_freq buffers are ignored.
  extra = dict(tensors, **{"model.layers.0.self_attn.o_proj.bias": np.zeros(48, np.float32),
                           "model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)})
  with pytest.raises(ValueError, match="unexpected tensor 'model.layers.0.self_attn.o_proj.bias'"):
    hf.load_state_dict(config, extra)
  del extra["model.layers.0.self_attn.o_proj.bias"]
  hf.load_state_dict(config, extra)
  # Integer tensors are not parameters.
  with pytest.raises(ValueError, match="'model.norm.weight' has dtype int32"):
    hf.load_state_dict(config, dict(tensors, **{"model.norm.weight": np.ones(48, np.int32)}))
  # A tied checkpoint may repeat the head only if it equals the embedding.
  tied = OWN_CONFIGS["qwen3_tied_sharded"][0]
  t = hf.hf_state_dict(_random_transformer(tied, seed=9))
  hf.load_state_dict(tied, dict(t, **{"lm_head.weight": t["model.embed_tokens.weight"]}))
  with pytest.raises(ValueError, match="'lm_head.weight' differs"):
    hf.load_state_dict(tied, dict(t, **{"lm_head.weight": t["model.embed_tokens.weight"] + 1}))
  # No weights at all.
  os.makedirs(tmp_path / "empty")
  (tmp_path / "empty" / "config.json").write_text(json.dumps(
      hf_config.hf_config_from_model_config(config, dtype="float32")))
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    hf.from_pretrained(str(tmp_path / "empty"))


def test_export_refuses_inexpressible_configs(tmp_path):
  model = _random_transformer(ModelConfig(arch="llama", vocab_size=VOCAB, embed_dim=32,
                                          qkv_bias=True), seed=0)
  with pytest.raises(ValueError, match="model.qkv_bias=True cannot be exported as.*llama"):
    hf.save_pretrained(model, str(tmp_path / "x"))
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_from_pretrained_onto_a_mesh(tmp_path, fake_devices):
  """Parameters land sharded by the logical-axis rules (4 fake devices: fsdp=2, tensor=2)."""
  config = OWN_CONFIGS["llama"][0]
  model = _random_transformer(config, seed=10)
  hf.save_pretrained(model, str(tmp_path / "ckpt"))
  tokens, mask = _batch(5)
  np.save(tmp_path / "want.npy", _our_logits(model, tokens, mask))
  out = fake_devices(f"""
      import numpy as np, jax, jax.numpy as jnp
      from jax.sharding import PartitionSpec as P
      from dypo_jax.models import hf
      from dypo_jax.parallel import sharding
      mesh = sharding.make_mesh({{"fsdp": 2, "tensor": 2}})
      model = hf.from_pretrained({str(tmp_path / "ckpt")!r}, mesh=mesh)
      emb = model.embedding.get_value()
      q = model.blocks.attn.q_proj.get_value()
      assert emb.sharding.spec == P("tensor", "fsdp"), emb.sharding
      assert q.sharding.spec == P(None, "fsdp", "tensor", None), q.sharding
      assert len(emb.addressable_shards) == 4 and emb.addressable_shards[0].data.shape == (48, 24)
      tokens = np.array({tokens.tolist()}); mask = np.array({mask.tolist()})
      got = np.asarray(model(jnp.asarray(tokens), input_mask=jnp.asarray(mask)))
      want = np.load({str(tmp_path / "want.npy")!r})
      print("DIFF", float(np.max(np.abs(got[mask] - want[mask]))))
  """, num_devices=4)
  diff = float(out.split("DIFF")[1])
  assert diff < 1e-5


def test_compute_options_reach_the_model_and_unknown_ones_are_refused(tmp_path):
  from dypo_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  config = models_lib.ModelConfig(vocab_size=32, embed_dim=16, num_layers=1, num_heads=2,
                                  num_kv_heads=1, head_dim=8, mlp_dim=32)
  models_lib.save_pretrained(models_lib.Transformer(config, rngs=nnx.Rngs(0)), str(tmp_path))
  model = models_lib.from_pretrained(str(tmp_path), compute_options=dict(
      remat="full", attention_chunk=4, mlp_chunk=4))
  assert model.config.remat == "full" and model.config.attention_chunk == 4 and model.config.mlp_chunk == 4
  with pytest.raises(ValueError, match="compute_options \\['vocab_size'\\]"):
    models_lib.from_pretrained(str(tmp_path), compute_options=dict(vocab_size=64))

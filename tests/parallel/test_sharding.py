"""Mesh and logical-axis rules: parameters are born sharded as the rules say; results unchanged."""
import os
import subprocess
import sys

import pytest

from dypo_jax.parallel import sharding
import tiny_runs

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_logical_to_spec_follows_rules_and_replicates_indivisible_dims():
  rules = sharding.DEFAULT_RULES
  spec = sharding.logical_to_spec(("embed", "heads", "head_dim"), rules)
  assert tuple(spec) == ("fsdp", "tensor", None)
  with pytest.raises(ValueError, match="logical axis 'nope' has no rule"):
    sharding.logical_to_spec(("nope",), rules)


def test_make_mesh_errors_name_the_shape():
  with pytest.raises(ValueError, match="needs 4 devices"):
    sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(ValueError, match="mesh axes \\['pipe'\\] unknown"):
    sharding.make_mesh({"pipe": 1})


@pytest.mark.slow
def test_sharded_forward_equals_single_device_and_specs_follow_rules(fake_devices):
  out = fake_devices("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from dypo_jax import models
    from dypo_jax.models import builder
    from dypo_jax.parallel import sharding
    config = models.ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, head_dim=8, mlp_dim=64)
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = sharding.DEFAULT_RULES
    model = builder.build(builder.ModelOptions(config, rules), mesh)
    single = models.Transformer(config, rngs=nnx.Rngs(0))
    q = model.blocks.attn.q_proj.value  # [L, D, N, H]: the layer axis is never split.
    assert tuple(q.sharding.spec) == (None, "fsdp", "tensor", None), q.sharding.spec
    assert len(q.addressable_shards) == 8
    assert q.addressable_shards[0].data.shape == (config.num_layers, 16, 2, 8)
    emb = model.embedding.value
    assert tuple(emb.sharding.spec) == ("tensor", "fsdp")
    tokens = jax.random.randint(jax.random.key(1), (4, 7), 0, 64)
    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, t: nnx.merge(graphdef, st)(t))
    out = fwd(state, jax.device_put(tokens, sharding.batch_sharding(mesh, rules, 2)))
    np.testing.assert_allclose(out, single(tokens), atol=1e-5)
    print("OK", len(sharding.sharding_report(model)))
  """)
  assert "OK" in out


def test_activation_sharding_follows_the_batch_rule_and_is_off_on_one_device():
  rules = sharding.DEFAULT_RULES
  assert sharding.activation_axes(rules) == (("data", "fsdp"), ())
  one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  assert sharding.activation_sharding(one, sharding.activation_axes(rules)) is None
  assert sharding.activation_sharding(one, None) is None


@pytest.mark.slow
def test_build_model_sets_the_activation_sharding_aot_compiles(fake_devices):
  out = fake_devices("""
    from dypo_jax import build
    from dypo_jax import config as config_lib
    from dypo_jax.models import builder
    from dypo_jax.parallel import sharding
    from dypo_jax.tools import aot
    c = config_lib.load_experiment("experiments/cpu_tiny.py", "quick")
    c.mesh.update(dict(data=2, fsdp=2, tensor=2))
    mesh = sharding.build_mesh(c.mesh)
    model = build.build_model(c, mesh)
    rules = sharding.mesh_rules(c)
    expected = builder.abstract_params(aot.model_options(c), mesh)[0]
    assert model.activation_sharding is not None
    assert tuple(model.activation_sharding.spec) == (("data", "fsdp"), None, None)
    abstract = sharding.activation_sharding(mesh, sharding.activation_axes(rules))
    assert model.activation_sharding == abstract
    # The graph a run jits carries the same sharding as the one dypo_jax.tools.aot compiles.
    from flax import nnx
    assert nnx.split(model, nnx.Param)[0] == expected, "graphdefs differ"
    one = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, mesh.devices.flat[:1])
    assert build.build_model(c, one).activation_sharding is None
    print("OK")
  """)
  assert "OK" in out


@pytest.mark.slow
def test_main_summary_builds_mesh_tokenizer_model_and_exits(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "dypo_jax.main", "--config=experiments/cpu_tiny.py:quick",
       f"--workdir={tmp_path}", "--mode=summary", "--config.mesh.fsdp=2"],
      capture_output=True, text=True, cwd=_REPO, timeout=300,
      env=dict(os.environ, XLA_FLAGS=tiny_runs.xla_flags(2)))
  assert proc.returncode == 0, proc.stderr
  assert "params=" in proc.stdout and "fsdp=2" in proc.stdout
  assert "P('fsdp'" in proc.stdout  # The parameter table shows the shardings held.
  assert os.path.exists(tmp_path / "tokenizer" / "spm.model")

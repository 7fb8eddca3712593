"""models.builder: one builder for a model, concrete or abstract, and the base model a restarted
run reuses (rl.pretrain), built with the run's own options."""
import dataclasses
import os

from flax import nnx
import jax
import numpy as np
import pytest

from dypo_jax import build
from dypo_jax import errors
from dypo_jax import models
from dypo_jax.models import builder
from dypo_jax.parallel import sharding
from dypo_jax.rl import pretrain
import tiny_runs


def assert_same_model(a, b):
  """Same graph (config, pin, structure) and, leaf by leaf, shape, dtype and sharding."""
  graph_a, params_a = nnx.split(a, nnx.Param)
  graph_b, params_b = nnx.split(b, nnx.Param)
  assert a.config == b.config
  assert a.activation_sharding == b.activation_sharding
  assert graph_a == graph_b, "graphdefs differ"
  flat_a = jax.tree_util.tree_flatten_with_path(params_a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(params_b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    where = jax.tree_util.keystr(path)
    assert (x.shape, x.dtype) == (y.shape, y.dtype), where
    assert x.sharding.is_equivalent_to(y.sharding, len(x.shape)), (where, x.sharding, y.sharding)


def _config(**fields):
  return models.ModelConfig(vocab_size=64, embed_dim=32, num_layers=3, num_heads=2,
                            num_kv_heads=1, head_dim=16, mlp_dim=64, **fields)


@pytest.mark.parametrize("fields", [dict(scan_layers=True),
                                    dict(scan_layers=False, remat="full",
                                         param_dtype="bfloat16", tie_embeddings=True)])
def test_concrete_and_abstract_builds_agree_in_shapes_dtypes_and_shardings(fields):
  options = builder.ModelOptions.for_run(_config(**fields), sharding.DEFAULT_RULES)
  mesh = builder.one_device_mesh()
  concrete = builder.build(options, mesh, seed=3)
  abstract = builder.build(options, mesh, abstract=True)
  assert_same_model(concrete, abstract)
  assert all(isinstance(x, jax.ShapeDtypeStruct)
             for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(concrete, nnx.Param)))
  # Layers are stacked [L, ...] whether or not the forward scans them (one init program).
  assert concrete.blocks.attn.q_proj.get_value().shape[0] == 3
  graphdef, params = builder.abstract_params(options, mesh)
  assert graphdef == nnx.split(concrete, nnx.Param)[0]
  assert jax.tree.structure(params) == jax.tree.structure(nnx.state(concrete, nnx.Param))


def test_load_pretrained_fills_the_options_model_and_refuses_another_architecture(tmp_path):
  mesh = builder.one_device_mesh()
  # A qwen2 model without q/k/v biases is exported with zero ones; loading it back into the same
  # options drops them again.
  options = builder.ModelOptions.for_run(_config(scan_layers=False, qkv_bias=False),
                                         sharding.DEFAULT_RULES)
  model = builder.build(options, mesh, seed=1)
  models.save_pretrained(model, str(tmp_path / "m"))
  loaded = models.load_pretrained(str(tmp_path / "m"), options, mesh)
  assert_same_model(model, loaded)
  np.testing.assert_array_equal(loaded.blocks.mlp.up_proj.get_value(),
                                model.blocks.mlp.up_proj.get_value())
  other = dataclasses.replace(options, config=dataclasses.replace(options.config,
                                                                  rope_theta=5e5))
  with pytest.raises(errors.BadInput, match=r"config.json: rope_theta=10000.0, but the model to "
                                            r"load it into has rope_theta=500000.0"):
    models.load_pretrained(str(tmp_path / "m"), other, mesh)


def _run_parts(config):
  """What main hands `pretrain.ensure_base`: mesh, the run's options and its built model."""
  mesh = sharding.build_mesh(config.mesh)
  return mesh, build.model_options(config), build.build_model(config, mesh)


def test_pretrain_reuse_builds_the_model_of_the_first_run(tmp_path):
  # cpu_tiny's loop over layers (scan_layers=False) and a remat policy: a restart that reuses
  # workdir/base_model must build exactly this model, not the defaults of the checkpoint.
  config = tiny_runs.tiny_config(**{"pretrain.enabled": True, "model.scan_layers": False,
                                    "model.remat": "full", "train.shared_prompt": False})
  mesh, options, model = _run_parts(config)
  workdir = str(tmp_path)
  # What the first run leaves: its base (the trained `model`'s graph, Trainer.graphdef) saved.
  models.save_pretrained(model, pretrain.base_dir(workdir))
  restarts = [pretrain.ensure_base(config, workdir=workdir, mesh=mesh, tokenizer=None,
                                   model=model, pools=None, options=options) for _ in range(2)]
  for base in restarts:
    assert not base.config.scan_layers and base.config.remat == "full"
    assert_same_model(model, base)
    np.testing.assert_array_equal(base.embedding.get_value(), model.embedding.get_value())
  assert os.path.isdir(pretrain.base_dir(workdir))


def test_a_run_from_a_hugging_face_checkpoint_builds_with_the_runs_options(tmp_path):
  config = tiny_runs.tiny_config(**{"model.scan_layers": False})
  _, _, model = _run_parts(config)
  models.save_pretrained(model, str(tmp_path / "hf"))
  config = tiny_runs.tiny_config(**{"model.scan_layers": False, "model.init": "hf",
                                    "model.hf_path": str(tmp_path / "hf")})
  loaded = build.build_model(config, sharding.build_mesh(config.mesh))
  assert_same_model(model, loaded)
  np.testing.assert_array_equal(loaded.blocks.attn.o_proj.get_value(),
                                model.blocks.attn.o_proj.get_value())


@pytest.mark.slow
def test_builds_agree_and_the_reused_base_keeps_the_pin_on_a_mesh():
  out = tiny_runs.run_python("""
    import tempfile
    from dypo_jax import build, models
    from dypo_jax.models import builder
    from dypo_jax.parallel import sharding
    from dypo_jax.rl import pretrain
    from tests.models import test_builder
    import tiny_runs
    config = tiny_runs.tiny_config(**{"pretrain.enabled": True, "model.scan_layers": False,
                                      "mesh.fsdp": 2})
    mesh = sharding.build_mesh(config.mesh)
    options = build.model_options(config)
    model = build.build_model(config, mesh)
    assert model.activation_sharding is not None  # Two devices: the residual stream is pinned.
    assert tuple(model.embedding.get_value().sharding.spec) == ("tensor", "fsdp")
    test_builder.assert_same_model(model, builder.build(options, mesh, abstract=True))
    workdir = tempfile.mkdtemp()
    models.save_pretrained(model, pretrain.base_dir(workdir))
    base = pretrain.ensure_base(config, workdir=workdir, mesh=mesh, tokenizer=None, model=model,
                                pools=None, options=options)
    test_builder.assert_same_model(model, base)
    print("OK")
  """, num_devices=2)
  assert "OK" in out

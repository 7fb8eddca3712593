"""The one builder of a model: its options -> a sharded Transformer, concrete or abstract.

Training (`build.build_model`), the Hugging Face import (`hf.load_pretrained`), the pretrained
base a restarted run reuses (`rl.pretrain`), the AOT check (`tools.aot`) and the policy reads of
export and eval (`rl.run_checkpoint`) all build here, so each gets the same graph: the same
ModelConfig (scan_layers, remat, chunks, dtypes), parameter shardings and residual-stream pin.

Shapes come from `nnx.eval_shape` (nothing is allocated); a concrete model is made by one jitted
initialisation with `out_shardings`, so every parameter is born on its shards and no host holds
the full weights. The layers' initialisation is vmapped (`transformer._stacked_blocks`): one
layer's program whatever the depth.
"""
import dataclasses

from flax import nnx
import jax

from dypo_jax.models.transformer import ModelConfig
from dypo_jax.models.transformer import Transformer
from dypo_jax.parallel import sharding


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Everything that decides the model built on a mesh.

  config: the architecture and its compute choices (dtypes, scan_layers, remat, chunks).
  rules: the logical-axis rules that place each parameter (`sharding.Rules`).
  activation_axes: (row axes, sequence axes) of the residual stream [B, T, D] between blocks
    (`Transformer.activation_sharding`), or None to leave activations to XLA.
  """
  config: ModelConfig
  rules: sharding.Rules = sharding.DEFAULT_RULES
  activation_axes: sharding.ActivationAxes | None = None

  @classmethod
  def for_run(cls, config: ModelConfig, rules: sharding.Rules) -> "ModelOptions":
    """A training run's options: the residual stream's rows pinned to the batch sharding."""
    rules = tuple(rules)
    return cls(config=config, rules=rules, activation_axes=sharding.activation_axes(rules))


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _make(config: ModelConfig, seed: int) -> Transformer:
  return Transformer(config, rngs=nnx.Rngs(seed))


def _shaped(options: ModelOptions, mesh: jax.sharding.Mesh, seed: int):
  """(graphdef, state of abstract Variables, their NamedShardings): nothing allocated."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _make(options.config, seed)))
  return graphdef, state, sharding.param_shardings(state, mesh, options.rules)


def _init(options: ModelOptions, seed: int, shardings):
  return jax.jit(lambda: nnx.split(_make(options.config, seed))[1], out_shardings=shardings)


def initializer(options: ModelOptions, mesh: jax.sharding.Mesh, *, seed: int = 0):
  """The jitted `() -> state` that `build` runs: fresh weights, each born in its sharding."""
  return _init(options, seed, _shaped(options, mesh, seed)[2])


def build(options: ModelOptions, mesh: jax.sharding.Mesh, *, seed: int = 0,
          abstract: bool = False) -> Transformer:
  """The model `options` describe on `mesh`, its residual stream pinned as they say.

  abstract=False: fresh weights from `seed`, every parameter created on its shards.
  abstract=True: every parameter a `jax.ShapeDtypeStruct` carrying its NamedSharding (the
  target of a restore, the input of an AOT compile); no array is made.
  """
  graphdef, state, shardings = _shaped(options, mesh, seed)
  if abstract:
    state = jax.tree.map(
        lambda var, s: var.replace(value=jax.ShapeDtypeStruct(var.value.shape, var.value.dtype,
                                                              sharding=s)),
        state, shardings, is_leaf=_is_variable)
  else:
    state = _init(options, seed, shardings)()
  model = nnx.merge(graphdef, state)
  model.activation_sharding = sharding.activation_sharding(mesh, options.activation_axes)
  return model


def abstract_params(options: ModelOptions, mesh: jax.sharding.Mesh):
  """(graphdef, Param state of sharded ShapeDtypeStructs) of `build(..., abstract=True)`."""
  return nnx.split(build(options, mesh, abstract=True), nnx.Param)


def one_device_mesh() -> jax.sharding.Mesh:
  """A mesh of the default device alone: a model placed there is an ordinary local model."""
  return sharding.make_mesh({}, jax.devices()[:1])

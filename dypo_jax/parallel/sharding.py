"""Device mesh, logical-axis rules and the shardings they give.

Model code names logical axes only (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`,
`layers`, and `batch` for activations); the rules in the config map each to a mesh axis (or a tuple of them, or
None for replicated). `models.builder` places a model's parameters by these rules.
"""
from collections.abc import Sequence
import math

from flax import nnx
import jax
import ml_collections
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. FSDP shards the embed dimension of every matrix; tensor parallelism
# shards heads, mlp and vocab; the batch of activations is split over data and fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),  # The stacked layer axis that the forward scans over: never split.
)

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]


def make_mesh(shape: dict[str, int], devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, tensor); at most one size may be -1 ("all remaining devices").

  Axis types are Auto (classic GSPMD: shardings propagate, `with_sharding_constraint` works).
  """
  devices = list(devices if devices is not None else jax.devices())
  unknown = set(shape) - set(MESH_AXES)
  if unknown:
    raise ValueError(f"mesh axes {sorted(unknown)} unknown; allowed: {MESH_AXES}")
  sizes = [int(shape.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: at most one axis may be -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
      raise ValueError(
          f"mesh shape {dict(zip(MESH_AXES, sizes))} does not divide {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(
        f"mesh shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
        f"but {len(devices)} are available")
  if any(s < 1 for s in sizes):
    raise ValueError(f"mesh shape {dict(zip(MESH_AXES, sizes))}: sizes must be >= 1 or -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes: Sequence[str | None], rules: Rules, *,
                    shape: Sequence[int] | None = None,
                    mesh: jax.sharding.Mesh | None = None) -> P:
  """Logical axis names -> PartitionSpec by the rules.

  With `shape` and `mesh`, a dimension whose size the mesh axes do not divide is replicated
  instead (e.g. 2 KV heads on tensor=4); `sharding_report` lists such fallbacks.
  """
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    # A mesh axis may shard only one dimension of an array.
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if shape is not None and mesh is not None and mesh_axes:
      size = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[i] % size:
        mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def param_specs(state: nnx.State, rules: Rules, mesh: jax.sharding.Mesh | None = None):
  """PartitionSpecs for an (abstract) NNX state, from each Variable's `axes` metadata."""
  def spec(var):
    axes = var.get_metadata().get("axes")
    if axes is None:
      return P()
    return logical_to_spec(axes, rules, shape=var.value.shape, mesh=mesh)
  return jax.tree.map(spec, state, is_leaf=_is_variable)


def param_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules: Rules):
  """NamedShardings with the same tree structure as `state`'s arrays."""
  specs = param_specs(state, rules, mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Every device holds the whole array (scalars, counters, RNG keys, small tables)."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Leading dimension over the `batch` rule's mesh axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


ActivationAxes = tuple[tuple[str, ...], tuple[str, ...]]


def batch_axes(rules: Rules) -> tuple[str, ...]:
  """The mesh axes the `batch` rule splits a batch over, e.g. ("data", "fsdp")."""
  spec = logical_to_spec(("batch",), rules)[0]
  return (spec,) if isinstance(spec, str) else tuple(spec or ())


def activation_axes(rules: Rules) -> ActivationAxes:
  """(row axes, sequence axes) of the residual stream [B, T, D] between blocks, by default.

  Rows go over the `batch` rule's mesh axes (the update batch's rows, flattened from [U, K], and
  the sampler's prompts are split the same way); the sequence stays whole.
  """
  return batch_axes(rules), ()


def activation_sharding(mesh: jax.sharding.Mesh,
                        axes: ActivationAxes | None) -> NamedSharding | None:
  """NamedSharding of a [B, T, D] activation: B over axes[0], T over axes[1] (mesh axes).

  This is `Transformer.activation_sharding`: the model pins its residual stream (and its token,
  position and mask inputs) to it, so every chip computes on its own rows only. Without it XLA
  may shard activations like the FSDP parameters (on D) and hold every row on every chip. None
  (nothing pinned) for `axes=None` and on a single device, where a pin would change nothing.
  """
  if axes is None or mesh.devices.size == 1:
    return None
  unknown = [a for part in axes for a in part if a not in mesh.shape]
  if unknown:
    raise ValueError(f"activation axes {unknown} are not mesh axes; mesh axes: "
                     f"{tuple(mesh.shape)}")
  keep = lambda names: tuple(a for a in names if mesh.shape[a] > 1) or None
  rows, seq = axes
  return NamedSharding(mesh, P(keep(rows), keep(seq), None))


def sharding_report(model: nnx.Module) -> list[str]:
  """One line per parameter: path, shape, dtype, logical axes, PartitionSpec actually held."""
  lines = []
  state = nnx.state(model)
  flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
  for path, var in flat:
    name = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
    value = var.value
    spec = getattr(getattr(value, "sharding", None), "spec", None)
    axes = var.get_metadata().get("axes")
    lines.append(f"{name:48s} {str(tuple(value.shape)):22s} {str(value.dtype):9s} "
                 f"{str(axes):34s} {spec}")
  return lines


def devices_summary(mesh: jax.sharding.Mesh) -> str:
  return (f"{mesh.devices.size} x {mesh.devices.flat[0].platform} devices, mesh "
          + ", ".join(f"{k}={v}" for k, v in mesh.shape.items()))


def batch_shards(mesh: jax.sharding.Mesh, rules: Rules) -> int:
  """How many ways the logical "batch" axis splits on `mesh` under `rules`."""
  return int(math.prod(mesh.shape[a] for a in batch_axes(rules)))


def build_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh:
  """The training mesh: all devices, or with `mesh.rollout_data` set, the first ones its sizes
  name (the others may serve the rollout mesh alone)."""
  shape = {a: cfg[a] for a in MESH_AXES}
  devices = jax.devices()
  if cfg.rollout_data and -1 not in shape.values():
    devices = devices[:math.prod(shape.values())]
  return make_mesh(shape, devices)


def build_rollout_mesh(cfg: ml_collections.ConfigDict) -> jax.sharding.Mesh | None:
  """The sampler's own data-parallel mesh (`mesh.rollout_data` devices), or None: the training
  mesh samples."""
  n = cfg.rollout_data
  if not n:
    return None
  if jax.process_count() > 1:
    raise ValueError(f"mesh.rollout_data={n} is for one process; with {jax.process_count()} "
                     "processes the sampler runs on the training mesh (set mesh.rollout_data=0)")
  devices = jax.devices()
  if n > len(devices):
    raise ValueError(f"mesh.rollout_data={n}, but only {len(devices)} device(s) are here "
                     "(on CPU, mesh.host_devices splits the host into more)")
  return make_mesh({"data": n}, devices[:n])


def mesh_rules(config: ml_collections.ConfigDict) -> Rules:
  """`mesh.rules` as a tuple of (logical axis, mesh axes) (lists from a saved config: tuples)."""
  return tuple((name, tuple(t) if isinstance(t, list) else t) for name, t in config.mesh.rules)

r"""Ahead-of-time compilation for a TPU topology, on any machine: does a config fit a pod slice?

  python -m dypo_jax.tools.aot --config=experiments/tpu_v4.py [--topology=v4:2x4x4] \
      [--what=train,generate] [--config.train.micro_batches=16 ...]

Needs `pip install -e ".[tpu]"` (libtpu; no TPU is needed: its compiler runs on the CPU). The
topology's chips are compile-only devices (`jax.experimental.topologies`); a mesh over them and
abstract inputs (`jax.ShapeDtypeStruct`s with `NamedSharding`s, parameters from the run's own
builder, `models.builder.abstract_params`: no weights anywhere) go through the real TPU
compiler, which reports per-device memory and flops.

Programs (`--what`):
  train     the DYPO update exactly as the Trainer jits it: `train_step.build_train_step` with the
            config's StepConfig, the TrainState donated, the optimizer state sharded as
            `jit(tx.init)` propagates it, the reference parameters beside it, and the fixed
            update batch [U, K, P + T]; the row path, which any batch may take (with
            train.shared_prompt, batches of groups alone take the cached-prompt variant);
  generate  the sampler's jitted `_generate` (prefill of B prompts, then the `while_loop` decode of
            B * K rows over a [B * K, P + T] KV cache), B = train.rollout_prompts.
P is the worst case the Trainer can pick: the largest prompt bucket, capped by model.max_seq_len
minus sampler.max_new_tokens (--prompt_len overrides).

Output: one row per program with the per-device argument, output, aliased (donated), temporary and
generated-code bytes, their total against the chip's usable HBM (asked of the compiler itself), and
the per-device flops of the compiled program (XLA counts a loop body once: `train` flops are one
micro-batch's, `generate` flops are the prefill plus one decode step). The exit status is 1 when a
program does not fit, with the compiler's RESOURCE_EXHAUSTED message.

A config with model.init = "hf" is compiled with the architecture of its hf_path's config.json
when that file is readable here, else with the config's own architecture fields.
"""
from collections.abc import Sequence
import dataclasses
import os
import re
import sys
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dypo_jax import config as config_lib

_PROGRAMS = ("train", "generate")
_GIB = 1024 ** 3
# Teachers per prompt for the per-teacher SFT metrics (paper: DeepSeek-R1 and Qwen3-235B); it only
# sizes two [num_teachers] metric vectors.
NUM_TEACHERS = 2

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. experiments/tpu_v4.py[:variant].",
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology, e.g. v4:2x4x4 (v4-64), v4:2x2x2, v5e:4x4, v6e:2x4. Default: "
    "the experiment file's TOPOLOGY.")
_CHIPS_PER_HOST = flags.DEFINE_string(
    "chips_per_host", "2,2,1", "Chips per host as x,y,z (2,2,1: 4 chips a host, as on v4/v5p).")
_WHAT = flags.DEFINE_list("what", list(_PROGRAMS), f"Programs to compile, from {_PROGRAMS}.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 0, "P; 0: the worst case (largest bucket).")
_ACTIVATION_AXES = flags.DEFINE_string(
    "activation_axes", "", "Mesh axes of the residual stream's rows / sequence between blocks "
    "(Transformer.activation_sharding), e.g. 'data,fsdp/tensor' to split the sequence over "
    "tensor too; 'none' leaves activations to XLA. Default: what build.build_model sets (rows "
    "over the `batch` rule's axes, sequence whole), so the check compiles a run's program.")


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-device needs of one compiled program (bytes), or why it did not compile."""
  name: str
  shapes: str  # The program's defining shapes, for the table.
  argument: int = 0
  output: int = 0
  alias: int = 0  # Output bytes that reuse donated argument buffers.
  temp: int = 0
  code: int = 0
  flops: float = 0.0
  compile_s: float = 0.0
  error: str = ""  # The compiler's message when it did not compile (RESOURCE_EXHAUSTED, ...).

  @property
  def total(self) -> int:
    return self.argument + self.output - self.alias + self.temp + self.code

  def fits(self, hbm_bytes: int) -> bool:
    return not self.error and self.total <= hbm_bytes


# ------------------------------------------------------------------------------------------------
# Topology and chip memory.


def topology_devices(topology: str, chips_per_host: Sequence[int] = (2, 2, 1)) -> list[Any]:
  """The compile-only devices of a TPU topology such as "v4:2x4x4" (needs libtpu)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kind = topology.split(":", 1)[0]
  kwargs = {}
  if kind in ("v4", "v5p"):  # Two TensorCores a chip, used as one device.
    kwargs["chip_config_name"] = "megacore"
  try:
    desc = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", chips_per_host_bounds=tuple(chips_per_host),
        num_slices=1, wrap=(False,) * 3, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot describe TPU topology {topology!r} with chips_per_host="
                     f"{tuple(chips_per_host)} (is libtpu installed? pip install -e '.[tpu]'): "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from e
  return list(desc.devices)


_HBM_RE = re.compile(r"available HBM \(([\d.]+)([KMGT])\)")


def usable_hbm_bytes(device) -> int:
  """The chip's usable HBM, from the compiler's own out-of-memory message for a 1 TiB program."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  mesh = jax.sharding.Mesh([device], ("x",))
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  huge = jax.ShapeDtypeStruct((1 << 38,), jnp.float32, sharding=sharding.replicated(mesh))
  try:
    jax.jit(lambda x: x * 2 + 1).lower(huge).compile()
  except Exception as e:  # pylint: disable=broad-except
    match = _HBM_RE.search(str(e))
    if match:
      return int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2)))
  raise RuntimeError(f"could not read the usable HBM of {device.device_kind} from the compiler")


# ------------------------------------------------------------------------------------------------
# Abstract inputs.

# How the residual stream [B, T, D] is split between blocks (`Transformer.activation_sharding`):
# (row axes, sequence axes), or None to leave activations to XLA. RUN_AXES: what
# `build.model_options` sets, `sharding.activation_axes(rules)` (rows over the `batch` rule's mesh
# axes, the sequence whole). Splitting the sequence over `tensor` too ("data,fsdp/tensor") made
# XLA's partitioner need more than this 23 GB host to compile the 7B step.
RUN_AXES = "run"


def model_options(config, activation_axes=RUN_AXES):
  """The run's model options (`build.model_options`), with the residual stream split over
  `activation_axes` instead unless that is RUN_AXES (None: left to XLA)."""
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  options = build.model_options(config)
  if activation_axes != RUN_AXES:
    options = dataclasses.replace(options, activation_axes=activation_axes)
  return options


def _sds(shape, dtype, sharding):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding)


def _key_sds(mesh):
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  key = jax.eval_shape(lambda: jax.random.key(0))
  return _sds(key.shape, key.dtype, sharding.replicated(mesh))


def worst_prompt_len(config, mc) -> int:
  """The P the Trainer picks for the longest prompt its buckets allow (Sampler.bucket_for)."""
  return min(max(config.sampler.prompt_buckets), mc.max_seq_len - config.sampler.max_new_tokens)


# ------------------------------------------------------------------------------------------------
# Compiling.


def _compile(name: str, shapes: str, lower) -> Report:
  """Runs `lower().compile()` and reads its memory and cost analyses; compiler errors -> error."""
  start = time.perf_counter()
  try:
    compiled = lower().compile()
  except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError and friends.
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return Report(name=name, shapes=shapes, compile_s=time.perf_counter() - start, error=message)
  seconds = time.perf_counter() - start
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per module.
    cost = cost[0] if cost else {}
  return Report(
      name=name, shapes=shapes, argument=int(mem.argument_size_in_bytes),
      output=int(mem.output_size_in_bytes), alias=int(mem.alias_size_in_bytes),
      temp=int(mem.temp_size_in_bytes), code=int(mem.generated_code_size_in_bytes),
      flops=float((cost or {}).get("flops", 0.0)), compile_s=seconds)


def compile_train_step(config, mesh, *, prompt_len: int | None = None,
                       activation_axes=RUN_AXES) -> Report:
  """AOT-compiles the DYPO update as the Trainer builds it (`rl.program.UpdateProgram`)."""
  from dypo_jax.models import builder  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import program as program_lib  # pylint: disable=g-import-not-at-top

  options = model_options(config, activation_axes)
  rules, mc = options.rules, options.config
  p = prompt_len or worst_prompt_len(config, mc)
  tr = config.train
  u, k, t = tr.update_prompts, config.rl.num_samples, config.sampler.max_new_tokens
  shapes = f"U={u} K={k} L={p}+{t} micro={tr.micro_batches}"
  graphdef, params = builder.abstract_params(options, mesh)
  try:
    prog = program_lib.UpdateProgram.build(config, graphdef=graphdef, params=params, mesh=mesh,
                                           rules=rules, prompt_len=p, num_teachers=NUM_TEACHERS)
  except ValueError as e:  # A batch the mesh cannot split, refused as the Trainer refuses it.
    return Report(name="train", shapes=shapes, error=str(e))
  # The largest batch the run can take: U slots, or more where a prompt queues two items.
  slots = prog.slot_buckets[-1]
  if slots != u:
    shapes = f"U={u} ({slots} slots) K={k} L={p}+{t} micro={tr.micro_batches}"
  # The row path, which any batch may take (batches of groups alone may take the shared one).
  jitted = prog.jit(shared_prompt=False, term_norms=False)
  return _compile("train", shapes, lambda: jitted.lower(
      prog.abstract_state(params), params, prog.abstract_batch(slots), prog.abstract_key()))


def compile_generate(config, mesh, *, prompt_len: int | None = None,
                     activation_axes=RUN_AXES) -> Report:
  """AOT-compiles the sampler's jitted generate (prefill + decode loop) for one rollout round."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dypo_jax.models import builder  # pylint: disable=g-import-not-at-top
  from dypo_jax.models import sampler as sampler_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  options = model_options(config, activation_axes)
  rules, mc = options.rules, options.config
  sp = config.sampler
  p = prompt_len or worst_prompt_len(config, mc)
  k, t = config.rl.num_samples, sp.max_new_tokens
  graphdef, params = builder.abstract_params(options, mesh)
  sampler = sampler_lib.Sampler(graphdef, model_config=mc, pad_id=0,
                                prompt_buckets=tuple(sp.prompt_buckets), mesh=mesh, rules=rules,
                                rows=sp.rows)
  b = -(-config.train.rollout_prompts // sampler.batch_shards) * sampler.batch_shards
  rows = sampler.rows_in_flight(b * k)
  shapes = f"B={b} K={k} S={p}+{t} rows={rows}"
  replicated = sharding.replicated(mesh)
  args = (params,
          _sds((b, p), jnp.int32, sharding.batch_sharding(mesh, rules, 2)),
          _sds((b,), jnp.int32, sharding.batch_sharding(mesh, rules, 1)),
          _sds((), jnp.int32, replicated), _key_sds(mesh),
          _sds((), jnp.float32, replicated), _sds((), jnp.float32, replicated),
          _sds((), jnp.int32, replicated),
          _sds((sampler_lib.MAX_STOP_IDS,), jnp.int32, replicated))
  mode = sampler_lib.sampling_mode(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k,
                                   vocab_size=mc.vocab_size)
  return _compile("generate", shapes, lambda: sampler._generate_jit.lower(  # pylint: disable=protected-access
      *args, num_samples=k, max_new_tokens=t, mode=mode, rows=rows))


_COMPILERS = {"train": compile_train_step, "generate": compile_generate}


def compile_programs(config, mesh, what: Sequence[str] = _PROGRAMS, *,
                     prompt_len: int | None = None,
                     activation_axes=RUN_AXES) -> list[Report]:
  unknown = [w for w in what if w not in _COMPILERS]
  if unknown:
    raise ValueError(f"--what: unknown programs {unknown}; allowed: {_PROGRAMS}")
  return [_COMPILERS[w](config, mesh, prompt_len=prompt_len, activation_axes=activation_axes)
          for w in what]


# ------------------------------------------------------------------------------------------------
# Report.


def _gib(n: int) -> str:
  return f"{n / _GIB:8.2f}"


def format_table(reports: Sequence[Report], *, hbm_bytes: int, header: str = "") -> str:
  """The per-device table; a program that does not fit gets a NO FIT line with the reason."""
  cols = ("program", "argument", "output", "alias", "temp", "code", "total", "of HBM", "TFLOP",
          "compile")
  lines = [header] if header else []
  lines.append(f"{cols[0]:9s} " + " ".join(f"{c:>8s}" for c in cols[1:]) + "   shapes")
  for r in reports:
    if r.error:
      lines.append(f"{r.name:9s} {'does not compile':>62s}   {r.shapes}")
      continue
    verdict = "" if r.fits(hbm_bytes) else "  NO FIT"
    lines.append(
        f"{r.name:9s} {_gib(r.argument)} {_gib(r.output)} {_gib(r.alias)} {_gib(r.temp)} "
        f"{_gib(r.code)} {_gib(r.total)} {100 * r.total / hbm_bytes:7.1f}% "
        f"{r.flops / 1e12:8.2f} {r.compile_s:7.1f}s   {r.shapes}{verdict}")
  lines.append(f"(GiB per device; usable HBM {hbm_bytes / _GIB:.2f} GiB; total = argument + "
               "output - alias + temp + code; TFLOP per device, loop bodies counted once)")
  for r in reports:
    if not r.fits(hbm_bytes):
      why = r.error or (f"needs {r.total / _GIB:.2f} GiB per device, above the usable "
                        f"{hbm_bytes / _GIB:.2f} GiB")
      lines.append(f"NO FIT: {r.name} ({r.shapes}): {why}")
  return "\n".join(lines)


def _experiment_topology(path: str) -> str | None:
  """The TOPOLOGY constant of an experiment file, if it declares one."""
  file = path.split(":", 1)[0]
  return getattr(config_lib.load_module(file), "TOPOLOGY", None) if os.path.exists(file) else None


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=experiments/tpu_v4.py")
  config_lib.validate(config)
  topology = _TOPOLOGY.value or _experiment_topology(flags.FLAGS["config"].config_filename)
  if not topology:
    raise app.UsageError("--topology is required (the experiment file sets no TOPOLOGY)")
  chips_per_host = tuple(int(x) for x in _CHIPS_PER_HOST.value.split(","))

  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  devices = topology_devices(topology, chips_per_host)
  mesh = sharding.make_mesh({a: config.mesh[a] for a in sharding.MESH_AXES}, devices)
  hbm = usable_hbm_bytes(devices[0])
  options = model_options(config)
  mc, axes = options.config, options.activation_axes
  if _ACTIVATION_AXES.value == "none":
    axes = None
  elif _ACTIVATION_AXES.value:
    rows, _, seq = _ACTIVATION_AXES.value.partition("/")
    axes = tuple(tuple(a for a in part.split(",") if a) for part in (rows, seq))
  header = (f"{topology}: {len(devices)} x {devices[0].device_kind}, mesh "
            + ", ".join(f"{a}={n}" for a, n in mesh.shape.items())
            + f"; {mc.arch} {mc.num_layers}x{mc.embed_dim} params={mc.num_params / 1e9:.2f}B "
            f"{mc.param_dtype}/{mc.dtype} remat={mc.remat} attention_chunk={mc.attention_chunk} "
            f"activation (rows, sequence) over {axes}; rules {sharding.mesh_rules(config)}")
  reports = compile_programs(config, mesh, _WHAT.value, prompt_len=_PROMPT_LEN.value or None,
                             activation_axes=axes)
  print(format_table(reports, hbm_bytes=hbm, header=header), flush=True)
  if not all(r.fits(hbm) for r in reports):
    sys.exit(1)


def run():
  # Compile-only TPU devices need no TPU backend: keep JAX on the CPU unless told otherwise, and
  # let libtpu load beside another process that holds its lockfile (a run on the same machine).
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    config_lib.check_override_keys(sys.argv[1:])
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  try:
    app.run(main, flags_parser=config_lib.parse_flags)
  except (config_lib.ConfigError, ValueError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  run()

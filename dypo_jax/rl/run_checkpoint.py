"""A run's checkpoint: its layout, its format version and the choice of step, in one place.

`<workdir>/checkpoints/<step>/` (an `io.checkpoint.Checkpointer` step) holds a `RunState`:
  * arrays (`state`): `{"train": TrainState, "ref": reference params}`, global arrays restored
    onto any mesh;
  * JSON (`extras`): `format` (CHECKPOINT_FORMAT), the process count, every process's data
    position, the rollout round, the empty-update count, the rng, the eval history, the teacher
    counts, the run's config and the model config;
  * bytes (`queues`): the Hard and Mid queues (`QueueSet.to_bytes`).

Resume (`save` / `restore`), `tools.export` and `tools.eval_checkpoint` (`read_policy`,
`read_config`) all open a step through `_open_step`, so each checks the format the same way: a
checkpoint of another format is `FormatError` (exit 2) before any array is read. Step choice:
`--step=N` or, by default, the newest listed step; resume falls back past steps whose damage is
certain (set aside once a good one is found) and stops with `errors.CheckpointsUnreadable` when
none reads, so a workdir with checkpoints never restarts from step 0. A store that fails (not the
bytes) is retried for `train.storage_retry_s`, then `errors.StorageUnavailable`.
"""
import dataclasses
import json
import sys
import traceback
from typing import Any

import jax
import ml_collections
import numpy as np

from dypo_jax import config as config_lib
from dypo_jax import errors
from dypo_jax.io import checkpoint as checkpoint_lib
from dypo_jax.io import metrics as metrics_lib
from dypo_jax.io import paths
from dypo_jax.io import storage
from dypo_jax.parallel import multihost
from dypo_jax.rl import queues as queues_lib
from dypo_jax.rl import run_state as run_state_lib

# 2: the model's layer parameters stacked, [L, ...] under `blocks` (1 held one subtree per layer).
CHECKPOINT_FORMAT = 2
CHECKPOINTS_DIRNAME = "checkpoints"
# A tool's default wait for a failing store (a run's is train.storage_retry_s).
TOOL_STORAGE_RETRY_S = 60.0

# Keys a resumed run may change without changing what the run computes: its length and
# bookkeeping, evaluation, where and how it runs (mesh, compute options with the same maths).
FREE_ON_RESUME = ("workdir", "train.num_steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.eval_every", "train.max_nonfinite_updates",
                  "train.max_empty_updates", "train.micro_batches", "train.per_term_grad_norms",
                  "train.pack_updates", "train.pack_attention_block",
                  "train.storage_retry_s", "train.workdir_lock_stale_s",
                  "model.remat", "model.scan_layers",
                  "model.attention_chunk", "model.mlp_chunk", "model.logprob_impl",
                  "model.vocab_chunk", "model.pallas_interpret", "eval.", "mesh.",
                  "distributed.", "verifier.", "pretrain.", "compile_cache.")


class CheckpointReadError(errors.BadInput):
  """A checkpoint that is missing, incomplete or unreadable (the message names it)."""


class FormatError(CheckpointReadError):
  """A checkpoint written in another format than CHECKPOINT_FORMAT."""


def checkpoint_dir(workdir: str) -> str:
  return paths.join(paths.absolute(workdir), CHECKPOINTS_DIRNAME)


# ------------------------------------------------------------------------------ config diff


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> list[tuple]:
  """[(key, saved value, new value)] of every leaf key whose value differs."""
  old = _flat(config_lib.from_dict(saved).to_dict())
  new = _flat(json.loads(config.to_json()))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)]


def check_config(saved: dict[str, Any], config: ml_collections.ConfigDict, *, where: str,
                 allowed: tuple[str, ...] = ()) -> list[str]:
  """The lines of the saved-vs-new config diff; raises ConfigError when a key that changes the
  run's meaning changed and is not in `allowed` (`--allow_config_change`)."""
  changes = config_changes(saved, config)
  lines = [f"  {k}: {a!r} -> {b!r}" for k, a, b in changes]
  refused = [k for k, _, _ in changes
             if not k.startswith(FREE_ON_RESUME) and k not in allowed]
  if refused:
    raise config_lib.ConfigError(
        f"{where} was written with another config, and these keys change what the run computes: "
        f"{refused}. Resume with the saved values, or name the keys to change with "
        f"--allow_config_change={','.join(refused)}. Changes:\n" + "\n".join(lines))
  return lines


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v))  # Tuples and lists compare alike.
  return out


# ------------------------------------------------------------------------ steps and format


def _open_step(ckpt: checkpoint_lib.Checkpointer, step: int) -> dict[str, Any]:
  """The extras of `step`, its format checked: FormatError before any array is read."""
  extras = ckpt.restore_extras(step)
  found = extras.get("format")
  if found != CHECKPOINT_FORMAT:
    raise FormatError(
        f"checkpoint {ckpt.step_dir(step)} has format {found!r}; this version reads format "
        f"{CHECKPOINT_FORMAT} (2 stacks the layer parameters). Export it with the version that "
        "wrote it (python -m dypo_jax.tools.export) and start from that directory "
        "(model.init=hf), or use a new --workdir.")
  return extras


def choose_step(ckpt: checkpoint_lib.Checkpointer, step: int | None) -> int:
  """`step` if it is a listed step, else the newest (CheckpointReadError when there is none)."""
  steps = ckpt.all_steps()
  if not steps:
    raise CheckpointReadError(f"{ckpt.directory} holds no complete checkpoint")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointReadError(f"checkpoint step {step} not found in {ckpt.directory} (complete "
                              f"steps: {steps})")
  return step


def _as_read_failure(where: str, e: Exception) -> Exception:
  """Any error of a step's read as CheckpointCorrupt or StorageError (ours pass through)."""
  if isinstance(e, (storage.CheckpointUnreadable, errors.StorageError, errors.BadInput)):
    return e
  return storage.read_failure(where, e)


def _warn(line: str, exc: BaseException | None = None) -> None:
  """One line on stderr; the traceback too when asked for (`--verbose`)."""
  if exc is not None and errors.verbose():
    traceback.print_exception(exc)
  print(line, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ run resume


def save(ckpt: checkpoint_lib.Checkpointer, run: run_state_lib.RunState, *,
         config: ml_collections.ConfigDict, model_config: Any,
         writer: metrics_lib.MetricsWriter, fence=None) -> bool:
  """Saves `run` at its step (collective; asynchronous; never rewrites one).

  `fence()` first (the trainer's workdir-lock check: `errors.LockLost` once another run holds
  the workdir, so a run that lost it writes nothing more). A bucket workdir's logs are uploaded
  next (`writer.sync()`): a save that commits before a later upload, then a kill -9, would leave
  the checkpoint without its steps' log lines.
  """
  if fence is not None:
    fence()
  try:
    writer.sync()
  except Exception as e:  # pylint: disable=broad-except
    if storage.store_failed(e) and not errors.disk_full(e):
      raise errors.StorageUnavailable(f"uploading the logs beside {ckpt.directory} before "
                                      f"saving step {run.step}: {storage.first_line(e)}") from e
    raise
  extras = {"format": CHECKPOINT_FORMAT, "process_count": jax.process_count(),
            "streams": multihost.gather_json(run.stream.state()),  # Collective.
            "rollout_round": run.rollout_round,
            "empty_updates_in_a_row": run.empty_updates_in_a_row,
            "rng": np.asarray(jax.random.key_data(run.rng)).tolist(),
            "eval_history": run.eval_history, "teacher_counts": run.teacher_counts.tolist(),
            "config": config.to_json(), "model_config": dataclasses.asdict(model_config)}
  return ckpt.save(run.step, state=run.arrays(), extras=extras, queues=run.queues.to_bytes())


def _read_run_step(ckpt, step: int, abstract) -> tuple[Any, dict[str, Any], bytes | None]:
  where = f"checkpoint {ckpt.step_dir(step)}"
  try:
    _open_step(ckpt, step)
    arrays, extras = ckpt.restore(step, abstract_state=abstract)
    return arrays, extras, ckpt.restore_queues(step)
  except Exception as e:  # pylint: disable=broad-except
    raise _as_read_failure(where, e) from e


def restore(ckpt: checkpoint_lib.Checkpointer, like: run_state_lib.RunState, *,
            config: ml_collections.ConfigDict, allow_config_change: tuple[str, ...] = (),
            storage_retry_s: float) -> run_state_lib.RunState | None:
  """The RunState of the newest step that reads back as saved, resharded like `like` (whose
  stream object is reused), or None when the directory lists no step.

  Steps that do not read are passed over; those whose damage is certain are set aside
  (`corrupt-<step>`) once an older step has read: when none reads, nothing is moved and
  `errors.CheckpointsUnreadable` says so. A failing store is retried for `storage_retry_s`. A
  config that differs from the saved one is printed, and refused where it changes the run's
  meaning (`check_config`).
  """
  steps = storage.retrying(ckpt.all_steps, what=f"listing {ckpt.directory}",
                           retry_s=storage_retry_s, prefix="resume")
  abstract = checkpoint_lib.abstract_like(like.arrays())
  damaged = []
  for step in reversed(steps):
    try:
      arrays, saved, queue_bytes = storage.retrying(
          lambda step=step: _read_run_step(ckpt, step, abstract),
          what=f"reading checkpoint {ckpt.step_dir(step)}", retry_s=storage_retry_s,
          prefix="resume")
    except storage.CheckpointUnreadable as e:
      _warn(f"resume: WARNING checkpoint step {step} does not read back as saved ({e}); "
            "trying the step before it", e)
      if isinstance(e, storage.CheckpointCorrupt):  # Only certain damage is set aside.
        damaged.append(step)
      continue
    for bad in damaged:
      moved = ckpt.quarantine(bad, reason="does not read back as saved")
      _warn(f"resume: WARNING checkpoint step {bad} is corrupt and was moved to {moved}")
    return _restored(ckpt, step, like, arrays, saved, queue_bytes, config=config,
                     allow_config_change=allow_config_change)
  if steps:
    raise errors.CheckpointsUnreadable(
        f"none of the {len(steps)} checkpoints in {ckpt.directory} (steps {steps}) reads back "
        "as saved; nothing was moved aside and the run did not start over: check the storage "
        "and the version that wrote them, or pass a new --workdir")
  return None


def _restored(ckpt, step, like, arrays, saved, queue_bytes, *, config,
              allow_config_change) -> run_state_lib.RunState:
  where = f"checkpoint {ckpt.step_dir(step)}"
  changed = check_config(json.loads(saved["config"]), config, where=where,
                         allowed=allow_config_change)
  if changed and jax.process_index() == 0:
    print(f"resume: the config differs from {where}'s:\n" + "\n".join(changed), flush=True)
  streams, processes = saved["streams"], saved["process_count"]
  if processes != jax.process_count() or len(streams) != jax.process_count():
    raise ValueError(
        f"{where} was written by {processes} processes and this run has {jax.process_count()}: "
        f"each process's position in its own data shard cannot be carried over; resume with "
        f"{processes} processes (the mesh shape may differ)")
  if queue_bytes is None:
    raise ValueError(f"{where} has no 'queues' item")
  like.stream.restore(streams[jax.process_index()])
  return run_state_lib.RunState(
      train=arrays["train"], ref_params=arrays["ref"],
      queues=queues_lib.QueueSet.from_bytes(queue_bytes, source=f"{where} item 'queues'"),
      stream=like.stream, rng=jax.random.wrap_key_data(np.asarray(saved["rng"], np.uint32)),
      teacher_counts=np.asarray(saved["teacher_counts"], np.int64),
      step=int(arrays["train"].step), rollout_round=int(saved["rollout_round"]),
      empty_updates_in_a_row=int(saved.get("empty_updates_in_a_row", 0)),
      eval_history=list(saved["eval_history"]))


# ------------------------------------------------------------------------- export and eval


@dataclasses.dataclass(frozen=True)
class RestoredPolicy:
  """A checkpoint's policy as a model on this host's devices, with the run's config (as saved)."""
  model: Any  # models.Transformer
  config: dict[str, Any]
  step: int


def _model_config(extras: dict[str, Any], where: str):
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  if "model_config" in extras:
    return models.ModelConfig(**extras["model_config"])
  if "config" in extras:  # Written before model_config was saved: the config's model section.
    return models.model_config_from_dict(json.loads(extras["config"])["model"])
  raise CheckpointReadError(f"{where}: extras hold neither 'model_config' nor 'config' "
                            f"(keys: {sorted(extras)})")


def _abstract_policy(model_config, config: dict[str, Any], mesh):
  """(graphdef, abstract params with this host's shardings) of the policy: nothing allocated.
  The run's rules place it; its residual stream is not pinned (a tool's batches are its own)."""
  from dypo_jax.models import builder  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  options = builder.ModelOptions(model_config,
                                 rules=sharding.mesh_rules(config_lib.from_dict(config)))
  return builder.abstract_params(options, mesh)


def _check_shapes(ckpt, step: int, target: Any, where: str) -> None:
  """CheckpointReadError naming the first parameter whose saved shape differs from the model
  config's (before anything is read). Unreadable metadata is left to the restore, which then
  says what is damaged."""
  try:
    saved = ckpt.item_shapes(step)
  except storage.CheckpointUnreadable:
    return
  flat = jax.tree_util.tree_flatten_with_path({"train": {"params": target}})[0]
  for path, leaf in flat:
    key = checkpoint_lib.plain_path(jax.tree_util.keystr(path))
    if key in saved and tuple(saved[key]) != tuple(leaf.shape):
      raise CheckpointReadError(
          f"{where}: parameter {key} has shape {tuple(saved[key])} in the checkpoint but "
          f"{tuple(leaf.shape)} in its model config; the checkpoint and the model config "
          "disagree")


def _warn_nonfinite(params: Any, where: str) -> None:
  """One warning line naming the first parameter with a NaN or infinity, if any."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  finite = jax.device_get([jax.numpy.isfinite(x).all() for _, x in flat])
  bad = [jax.tree_util.keystr(p) for (p, _), ok in zip(flat, finite) if not ok]
  if bad:
    _warn(f"WARNING: {where}: {len(bad)} parameter(s) hold NaN or infinite values, first "
          f"{bad[0]}; its outputs mean nothing")


def _read(workdir: str, step: int | None, read, *, retry_s: float):
  """`read(ckpt, step, extras)` of the chosen step of `workdir`, with the one-sentence errors of
  the tools: a damaged step names the step before it (`--step=N`)."""
  ckpt_dir = checkpoint_dir(workdir)
  if not storage.retrying(lambda: _probe(ckpt_dir), what=ckpt_dir, retry_s=retry_s):
    raise CheckpointReadError(f"no checkpoint directory {ckpt_dir} (is --workdir the training "
                              "run's?)")
  with checkpoint_lib.Checkpointer(ckpt_dir, keep=None, read_only=True) as ckpt:
    step = choose_step(ckpt, step)
    where = f"checkpoint {ckpt.step_dir(step)}"

    def attempt():
      try:
        return read(ckpt, step, _open_step(ckpt, step), where)
      except Exception as e:  # pylint: disable=broad-except
        raise _as_read_failure(where, e) from e

    try:
      return storage.retrying(attempt, what=where, retry_s=retry_s, prefix="checkpoint")
    except storage.CheckpointUnreadable as e:
      older = [s for s in ckpt.all_steps() if s < step]
      hint = (f"; --step={older[-1]} reads the one before it" if older
              else "; no older step is left")
      raise CheckpointReadError(f"{e}{hint}") from e


def _probe(ckpt_dir: str) -> bool:
  try:
    return paths.isdir(ckpt_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise storage.read_failure(ckpt_dir, e) from e


def read_policy(workdir: str, *, step: int | None = None,
                retry_s: float = TOOL_STORAGE_RETRY_S) -> RestoredPolicy:
  """The policy of checkpoint `step` (default: the newest) of `workdir`, restored alone (only
  `state/train/params`) onto this host's devices; warns on non-finite weights.

  Raises CheckpointReadError (BadInput) naming the checkpoint when it is missing, of another
  format (FormatError), of other shapes than its model config, or damaged (then naming the step
  before it).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  def read(ckpt, step, extras, where):
    config = json.loads(extras["config"]) if "config" in extras else {}
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    graphdef, target = _abstract_policy(_model_config(extras, where), config, mesh)
    _check_shapes(ckpt, step, target, where)
    params = ckpt.restore_subtree(step, abstract_subtree={"train": {"params": target}})
    return RestoredPolicy(model=nnx.merge(graphdef, params["train"]["params"]), config=config,
                          step=step)

  policy = _read(workdir, step, read, retry_s=retry_s)
  _warn_nonfinite(nnx.state(policy.model, nnx.Param),
                  f"checkpoint {checkpoint_dir(workdir)}/{policy.step}")
  return policy


def read_config(workdir: str, *, step: int | None = None,
                retry_s: float = TOOL_STORAGE_RETRY_S) -> dict[str, Any]:
  """The config (as saved, a dict) of checkpoint `step` (default: the newest) of `workdir`."""

  def read(ckpt, step, extras, where):
    del ckpt, step
    if "config" not in extras:
      raise CheckpointReadError(f"{where}: no saved config in its extras")
    return json.loads(extras["config"])

  return _read(workdir, step, read, retry_s=retry_s)

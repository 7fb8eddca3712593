"""A run's checkpoint: what the Trainer saves so that a restart continues it exactly.

Arrays: the train state (policy params, optimizer state, step, skip counter) and the frozen
reference params, as global arrays (restored onto any mesh). JSON extras: the format version, every
process's data position, the rollout round, the rng, the eval history, the teacher counts, the
config and the model config. Item 'queues': the Hard and Mid queues (`QueueSet.to_bytes`).
"""
import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np

from dypo_jax import config as config_lib
from dypo_jax import errors
from dypo_jax.io import checkpoint as checkpoint_lib
from dypo_jax.io import metrics as metrics_lib
from dypo_jax.parallel import multihost
from dypo_jax.rl import queues as queues_lib

# Version of a run's checkpoint (read by `io.restore` and `tools.export`). 2: the model's layer
# parameters stacked, [L, ...] under `blocks` (1 held one subtree per layer).
CHECKPOINT_FORMAT = 2


# Keys a resumed run may change without changing what the run computes: its length and
# bookkeeping, evaluation, where and how it runs (mesh, compute options with the same maths).
FREE_ON_RESUME = ("workdir", "train.num_steps", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.eval_every", "train.max_nonfinite_updates",
                  "train.max_empty_updates", "train.micro_batches", "train.per_term_grad_norms",
                  "model.remat", "model.scan_layers", "model.attention_chunk", "model.mlp_chunk",
                  "model.logprob_impl", "model.vocab_chunk", "model.pallas_interpret", "eval.",
                  "mesh.", "distributed.", "verifier.", "pretrain.", "compile_cache.")


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


def _newest_good_step(ckpt: checkpoint_lib.Checkpointer, abstract: Any):
  """(step, arrays, extras, queue bytes) of the newest step that reads back as it was saved, or
  None when there is none. A corrupt step (truncated, missing or altered data) is moved aside to
  `checkpoints/corrupt-<step>`, never deleted, and the one before it is tried."""
  for step in reversed(ckpt.all_steps()):
    _check_format(ckpt, step)  # Before reading arrays laid out another way.
    try:
      state, saved = ckpt.restore(step, abstract_state=abstract)
      return step, state, saved, ckpt.restore_queues(step)
    except checkpoint_lib.CheckpointCorrupt as e:
      moved = ckpt.quarantine(step)
      print(f"resume: WARNING checkpoint step {step} is corrupt and was moved to {moved}; "
            f"trying the step before it. ({e})", flush=True)
  return None


def _check_format(ckpt: checkpoint_lib.Checkpointer, step: int) -> None:
  try:
    found = ckpt.restore_extras(step).get("format")
  except ValueError:
    return  # Unreadable extras: the restore finds the step corrupt and moves it aside.
  if found != CHECKPOINT_FORMAT:
    raise errors.BadInput(
        f"checkpoint {ckpt.step_dir(step)} has format {found!r}; this version reads format "
        f"{CHECKPOINT_FORMAT} (2 stacks the layer parameters). Export it with the version that "
        "wrote it (python -m dypo_jax.tools.export) and start from that directory "
        "(model.init=hf), or use a new --workdir.")


def arrays(trainer) -> dict[str, Any]:
  return {"train": trainer.state, "ref": trainer.ref_params}


def extras(trainer) -> dict[str, Any]:
  """The JSON part. Collective: each process's position in its own data shard is gathered."""
  return {"format": CHECKPOINT_FORMAT, "process_count": jax.process_count(),
          "streams": multihost.gather_json(trainer.stream.state()),
          "rollout_round": trainer.rollout_round,
          "empty_updates_in_a_row": trainer.empty_updates_in_a_row,
          "rng": np.asarray(jax.random.key_data(trainer.rng)).tolist(),
          "eval_history": trainer.eval_history,
          "teacher_counts": trainer.rollouts.teacher_counts.tolist(),
          "config": trainer.config.to_json(),
          "model_config": dataclasses.asdict(trainer.sampler.config)}


def save(trainer, ckpt: checkpoint_lib.Checkpointer, writer: metrics_lib.MetricsWriter) -> bool:
  """Saves the trainer's step with the queues (collective; asynchronous; never rewrites one).

  A bucket workdir's logs are uploaded first (`writer.sync()`): a save that commits before a
  later upload, then a kill -9, would leave the checkpoint without its steps' log lines.
  """
  writer.sync()
  return ckpt.save(trainer.step_count, state=arrays(trainer), extras=extras(trainer),
                   queues=trainer.queues.to_bytes())


def restore(trainer, ckpt: checkpoint_lib.Checkpointer, *,
            allow_config_change: tuple[str, ...] = ()) -> bool:
  """Restores the latest finalised checkpoint into `trainer`, if there is one, resharded onto
  its mesh. Returns whether it did. A config that differs from the saved one is printed, and
  refused where it changes the run's meaning (`check_config`)."""
  loaded = _newest_good_step(ckpt, checkpoint_lib.abstract_like(arrays(trainer)))
  if loaded is None:
    return False
  step, state, saved, queue_bytes = loaded
  where = f"checkpoint {ckpt.step_dir(step)}"
  changed = check_config(json.loads(saved["config"]), trainer.config, where=where,
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
  trainer.state, trainer.ref_params = state["train"], state["ref"]
  trainer.step_count = int(trainer.state.step)
  trainer.rng = jax.random.wrap_key_data(np.asarray(saved["rng"], np.uint32))
  trainer.stream.restore(streams[jax.process_index()])
  trainer.rollout_round = int(saved["rollout_round"])
  trainer.empty_updates_in_a_row = int(saved.get("empty_updates_in_a_row", 0))
  trainer.queues = queues_lib.QueueSet.from_bytes(queue_bytes, source=f"{where} item 'queues'")
  trainer.eval_history = list(saved["eval_history"])
  trainer.rollouts.teacher_counts = np.asarray(saved["teacher_counts"], np.int64)
  return True

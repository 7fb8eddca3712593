"""Reads a training checkpoint's policy (parameters only) and config, for export and evaluation.

Only `state/train/params` is restored (neither the optimizer state nor the reference), onto this
host's devices, with the model built abstractly from the configuration saved in the checkpoint's
extras. Errors name the checkpoint directory and step.
"""
import dataclasses
import json
from typing import Any

from dypo_jax import errors
from dypo_jax.io import paths

CHECKPOINTS_DIRNAME = "checkpoints"


class CheckpointReadError(errors.BadInput):
  """A checkpoint that is missing, incomplete or unreadable (the message names it)."""


def _model_config(extras: dict[str, Any], where: str):
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  if "model_config" in extras:
    return models.ModelConfig(**extras["model_config"])
  if "config" in extras:  # Written before model_config was saved: the config's model section.
    return models.model_config_from_dict(json.loads(extras["config"])["model"])
  raise CheckpointReadError(f"{where}: extras hold neither 'model_config' nor 'config' "
                    f"(keys: {sorted(extras)})")


def _checkpoint_dir(workdir: str) -> str:
  ckpt_dir = paths.join(paths.absolute(workdir), CHECKPOINTS_DIRNAME)
  if not paths.isdir(ckpt_dir):
    raise CheckpointReadError(f"no checkpoint directory {ckpt_dir} (is --workdir the training "
                              "run's?)")
  return ckpt_dir


def _pick_step(ckpt, ckpt_dir: str, step: int | None) -> int:
  steps = ckpt.all_steps()
  if not steps:
    raise CheckpointReadError(f"{ckpt_dir} holds no complete checkpoint")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointReadError(f"checkpoint step {step} not found in {ckpt_dir} (complete steps: "
                      f"{steps})")
  return step


@dataclasses.dataclass(frozen=True)
class RestoredPolicy:
  """A checkpoint's policy as a model on this host's devices, with the run's config (as saved)."""
  model: Any  # models.Transformer
  config: dict[str, Any]
  step: int


def restore_policy(workdir: str, *, step: int | None = None) -> RestoredPolicy:
  """The policy of checkpoint `step` (default: the latest) of `workdir`, restored alone.

  Raises CheckpointReadError (a ValueError) naming the checkpoint directory when it is missing,
  has no such step, or cannot be read (a corrupt array fails its saved checksum).
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  from dypo_jax.io import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top

  ckpt_dir = _checkpoint_dir(workdir)
  with checkpoint_lib.Checkpointer(ckpt_dir, keep=None, read_only=True) as ckpt:
    step = _pick_step(ckpt, ckpt_dir, step)
    where = f"checkpoint {ckpt.step_dir(step)}"
    try:
      extras = ckpt.restore_extras(step)
    except ValueError as e:
      raise CheckpointReadError(str(e)) from e
    model_config = _model_config(extras, where)
    config = json.loads(extras["config"]) if "config" in extras else {}
    rules = sharding.mesh_rules(config_lib.from_dict(config))
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    abstract = nnx.eval_shape(lambda: models.Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract, nnx.Param)
    shardings = jax.tree.leaves(sharding.param_shardings(abstract_params, mesh, rules),
                                is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    leaves, treedef = jax.tree.flatten(abstract_params)  # Same key paths, same order.
    target = treedef.unflatten([jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
                                for a, s in zip(leaves, shardings, strict=True)])
    try:
      restored = ckpt.restore_subtree(step, abstract_subtree={"train": {"params": target}})
    except ValueError as e:
      older = [s for s in ckpt.all_steps() if s < step]
      hint = f"; --step={older[-1]} reads the one before it" if older else ""
      raise CheckpointReadError(f"{e}{hint}") from e
  return RestoredPolicy(model=nnx.merge(graphdef, restored["train"]["params"]), config=config,
                        step=step)


def restore_config(workdir: str, *, step: int | None = None) -> dict[str, Any]:
  """The config (as saved, a dict) of checkpoint `step` (default: the latest) of `workdir`."""
  from dypo_jax.io import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  ckpt_dir = _checkpoint_dir(workdir)
  with checkpoint_lib.Checkpointer(ckpt_dir, keep=None, read_only=True) as ckpt:
    step = _pick_step(ckpt, ckpt_dir, step)
    try:
      extras = ckpt.restore_extras(step)
    except ValueError as e:
      raise CheckpointReadError(str(e)) from e
  if "config" not in extras:
    raise CheckpointReadError(f"checkpoint {ckpt_dir} step {step}: no saved config in its extras")
  return json.loads(extras["config"])



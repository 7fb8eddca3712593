r"""Exports the policy of a training checkpoint as a Hugging Face directory.

  python -m dypo_jax.export --workdir=/tmp/dypo_tiny --out=/tmp/dypo_tiny/hf
  python -m dypo_jax.export --workdir=/tmp/dypo_tiny --step=100 --out=/tmp/hf100 --dtype=bfloat16

Reads the model configuration saved with the checkpoint (its extras), builds the model abstractly
(shapes only, nothing initialised), restores only the policy parameters (`state/train/params`:
neither the optimizer state nor the reference is read) onto this host's devices, and writes them
with `dypo_jax.models.save_pretrained` (config.json + safetensors, which transformers loads). The
run's tokenizer files are copied beside them. A missing or unreadable checkpoint stops with an
error naming it. Run it as a single process.
"""
import json
import os
import shutil
import sys
from typing import Any

from absl import app
from absl import flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
_DTYPE = flags.DEFINE_string("dtype", None, "dtype of the stored tensors (default: as trained).")

CHECKPOINTS_DIRNAME = "checkpoints"


class ExportError(ValueError):
  """The checkpoint to export is missing, incomplete or unreadable (the message names it)."""


def _model_config(extras: dict[str, Any], where: str):
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  if "model_config" in extras:
    return models.ModelConfig(**extras["model_config"])
  if "config" in extras:  # Written before model_config was saved: the config's model section.
    return models.model_config_from_dict(json.loads(extras["config"])["model"])
  raise ExportError(f"{where}: extras hold neither 'model_config' nor 'config' "
                    f"(keys: {sorted(extras)})")


def _copy_tokenizer(config: dict[str, Any], workdir: str, out: str) -> list[str]:
  """Copies the run's tokenizer files into `out`; returns their names."""
  tok = config.get("tokenizer", {})
  files = []
  if tok.get("path"):
    path = tok["path"]
    if os.path.isdir(path):
      files = [os.path.join(path, n) for n in ("tokenizer.json", "tokenizer_config.json",
                                               "special_tokens_map.json", "tokenizer.model")]
    else:
      files = [path]
  else:  # A SentencePiece model trained in the workdir (runtime.build_tokenizer).
    files = [os.path.join(workdir, "tokenizer", "spm.model")]
  copied = []
  for f in files:
    if os.path.isfile(f):
      shutil.copy2(f, os.path.join(out, os.path.basename(f)))
      copied.append(os.path.basename(f))
  return copied


def export(workdir: str, out: str, *, step: int | None = None,
           dtype: str | None = None) -> int:
  """Writes the policy of checkpoint `step` (default: the latest) of `workdir` to `out`.

  Returns the exported step. Raises ExportError (a ValueError) naming the checkpoint directory
  when it is missing, has no such step, or cannot be read.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from dypo_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  from dypo_jax import sharding  # pylint: disable=g-import-not-at-top

  ckpt_dir = os.path.join(os.path.abspath(workdir), CHECKPOINTS_DIRNAME)
  if not os.path.isdir(ckpt_dir):
    raise ExportError(f"no checkpoint directory {ckpt_dir} (is --workdir the training run's?)")
  with checkpoint_lib.Checkpointer(ckpt_dir, keep=None, read_only=True) as ckpt:
    steps = ckpt.all_steps()
    if not steps:
      raise ExportError(f"{ckpt_dir} holds no complete checkpoint")
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise ExportError(f"checkpoint step {step} not found in {ckpt_dir} (complete steps: "
                        f"{steps})")
    where = f"checkpoint {ckpt.step_dir(step)}"
    try:
      extras = ckpt.restore_extras(step)
    except ValueError as e:
      raise ExportError(str(e)) from e
    model_config = _model_config(extras, where)
    config = json.loads(extras["config"]) if "config" in extras else {}
    rules = tuple((name, tuple(t) if isinstance(t, list) else t)
                  for name, t in config.get("mesh", {}).get("rules", sharding.DEFAULT_RULES))
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
      raise ExportError(str(e)) from e
  model = nnx.merge(graphdef, restored["train"]["params"])
  models.save_pretrained(model, out, dtype=dtype)
  _copy_tokenizer(config, workdir, out)
  return step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  try:
    step = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
  except (ExportError, FileNotFoundError) as e:
    sys.exit(f"export error: {e}")
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  app.run(main)

r"""Exports the policy of a training checkpoint as a Hugging Face directory.

  python -m dypo_jax.tools.export --workdir=/tmp/dypo_tiny --out=/tmp/dypo_tiny/hf
  python -m dypo_jax.tools.export --workdir=/tmp/dypo_tiny --step=100 --out=/tmp/hf100 --dtype=bfloat16

Reads the model configuration saved with the checkpoint (its extras), builds the model abstractly
(shapes only, nothing initialised), restores only the policy parameters (`state/train/params`:
neither the optimizer state nor the reference is read) onto this host's devices, and writes them
with `dypo_jax.models.save_pretrained` (config.json + safetensors, which transformers loads). The
run's tokenizer files are copied beside them. A missing or unreadable checkpoint stops with an
error naming it. Run it as a single process.
"""
import os
import shutil
from typing import Any

from absl import app
from absl import flags
from absl import logging

from dypo_jax import errors
from dypo_jax.rl import run_checkpoint

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir (holds checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to export (default: the latest).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face directory to write.")
_DTYPE = flags.DEFINE_string("dtype", None, "dtype of the stored tensors (default: as trained).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "On an input error, print the traceback too.")

ExportError = run_checkpoint.CheckpointReadError  # The checkpoint is missing or unreadable.



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
  else:  # A SentencePiece model trained in the workdir (build.build_tokenizer).
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

  Returns the exported step; raises `run_checkpoint.CheckpointReadError` (a BadInput) as
  `read_policy` does.
  """
  from dypo_jax import models  # pylint: disable=g-import-not-at-top
  policy = run_checkpoint.read_policy(workdir, step=step)
  models.save_pretrained(policy.model, out, dtype=dtype)
  _copy_tokenizer(policy.config, workdir, out)
  return policy.step


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value or not _OUT.value:
    raise app.UsageError("--workdir and --out are required")
  errors.set_verbose(_VERBOSE.value)
  errors.quiet_background_errors()
  if _VERBOSE.value:
    logging.set_verbosity(logging.INFO)
  try:
    step = export(_WORKDIR.value, _OUT.value, step=_STEP.value, dtype=_DTYPE.value)
  except (errors.BadInput, FileNotFoundError, PermissionError) as e:
    errors.exit_with("export error", e, errors.EXIT_BAD_INPUT, verbose=_VERBOSE.value)
  except errors.StorageUnavailable as e:
    errors.exit_with("export error", e, errors.EXIT_STORAGE_UNAVAILABLE, verbose=_VERBOSE.value)
  print(f"exported step {step} of {_WORKDIR.value} to {_OUT.value}", flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.ERROR)  # Orbax logs every restore step (INFO, WARNING).
  from dypo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  try:
    app.run(main, flags_parser=config_lib.parse_flags)
  except config_lib.ConfigError as e:  # A flag that does not parse: one sentence, exit 2.
    errors.exit_with("export error", e, errors.EXIT_BAD_INPUT)

"""`python -m dypo_jax.export`: a checkpoint's policy as a Hugging Face directory."""
import glob
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dypo_jax import checkpoint as checkpoint_lib
from dypo_jax import export as export_lib
from dypo_jax import models
import tiny_runs


def _checkpointed_model(workdir: str, step: int, like: models.Transformer) -> models.Transformer:
  """The policy params of checkpoint `step`, read straight from Orbax, in `like`'s structure."""
  graphdef, params = nnx.split(like, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        params)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                   read_only=True) as ckpt:
    restored = ckpt.restore_subtree(step, abstract_subtree={"train": {"params": target}})
  return nnx.merge(graphdef, restored["train"]["params"])


def _logits(model, tokens):
  return np.asarray(model(jnp.asarray(tokens)))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny run of 2 steps with a checkpoint after each."""
  workdir = str(tmp_path_factory.mktemp("export") / "run")
  tiny_runs.run_python("""
      import sys
      import tiny_runs
      tiny_runs.build_trainer(tiny_runs.tiny_config(**{
          "train.num_steps": 2, "train.checkpoint_every": 1}), sys.argv[1]).run()
      """, workdir)
  return workdir


def test_exported_logits_equal_the_checkpointed_params_logits(trained_workdir, tmp_path):
  out = str(tmp_path / "hf")
  proc = subprocess.run([sys.executable, "-m", "dypo_jax.export", f"--workdir={trained_workdir}",
                         "--step=1", f"--out={out}"], capture_output=True, text=True,
                        env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported step 1 of {trained_workdir}" in proc.stdout
  assert os.path.exists(os.path.join(out, "config.json"))
  assert os.path.exists(os.path.join(out, "spm.model"))  # The run's tokenizer travels along.

  exported = models.from_pretrained(out)
  assert exported.config.vocab_size == tiny_runs.OVERRIDES["model.vocab_size"]
  tokens = np.random.default_rng(0).integers(0, exported.config.vocab_size, (2, 9))
  step1 = _checkpointed_model(trained_workdir, 1, exported)
  step2 = _checkpointed_model(trained_workdir, 2, exported)
  np.testing.assert_array_equal(_logits(exported, tokens), _logits(step1, tokens))
  # The export is the requested step's policy, not another's (one update apart).
  assert np.abs(_logits(exported, tokens) - _logits(step2, tokens)).max() > 1e-6


def test_missing_or_corrupt_checkpoint_is_a_clear_error(trained_workdir, tmp_path):
  out = str(tmp_path / "hf")
  with pytest.raises(export_lib.ExportError, match="no checkpoint directory .*nowhere"):
    export_lib.export(str(tmp_path / "nowhere"), out)
  with pytest.raises(export_lib.ExportError, match=r"step 7 not found .*\[1, 2\]"):
    export_lib.export(trained_workdir, out, step=7)
  # A damaged copy of the run: the arrays of step 2 lost.
  damaged = str(tmp_path / "damaged")
  shutil.copytree(trained_workdir, damaged)
  for path in glob.glob(os.path.join(damaged, "checkpoints", "2", "state", "*")):
    if os.path.basename(path) not in ("_METADATA", "commit_success.txt"):
      (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
  step_dir = os.path.join(damaged, "checkpoints", "2")
  with pytest.raises(export_lib.ExportError, match=f"checkpoint {step_dir} is corrupt"):
    export_lib.export(damaged, out)
  assert not os.path.exists(out)  # Nothing half-written.
  # The command line says the same in one line, with a non-zero exit status.
  proc = subprocess.run([sys.executable, "-m", "dypo_jax.export", f"--workdir={damaged}",
                         f"--out={out}"], capture_output=True, text=True,
                        env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO, timeout=300)
  assert proc.returncode != 0
  assert f"export error: checkpoint {step_dir} is corrupt" in proc.stderr

"""A run's checkpoints under faults: every step unreadable, a store that fails (not the bytes), a
bad step met by export / eval, an old format, other shapes, non-finite weights. Each says one
sentence (a line per bad step at most), moves nothing it is not sure of, and never starts a run
with checkpoints over from step 0."""
import errno
import json
import os
import shutil
import subprocess
import sys

from flax import nnx
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dypo_jax import errors
from dypo_jax.io import checkpoint as checkpoint_lib
from dypo_jax.rl import run_checkpoint
from dypo_jax.tools import export as export_lib
import tiny_runs

_RUN = {"train.num_steps": 3, "train.checkpoint_every": 1, "train.keep_checkpoints": 3}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> str:
  """A `python -m dypo_jax.main` run of 3 steps with a checkpoint after each."""
  workdir = str(tmp_path_factory.mktemp("ckpt_faults") / "run")
  proc = _main(workdir, **_RUN)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _main(workdir: str, **overrides) -> subprocess.CompletedProcess:
  return subprocess.run(tiny_runs.main_command(workdir, **overrides), capture_output=True,
                        text=True, env=tiny_runs.subprocess_env(), cwd=tiny_runs.REPO,
                        timeout=300)


def _tool(name: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", f"dypo_jax.tools.{name}", *flags],
                        capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                        cwd=tiny_runs.REPO, timeout=300)


def _copy(source: str, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  return workdir


def _truncate_step(workdir: str, step: int) -> None:
  """Halves every array data file of `step` (OCDBT's `d/` files)."""
  state = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(state) for f in names
           if os.path.basename(d) == "d"]
  assert files
  for path in files:
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 2])


def _edit_extras(workdir: str, step: int, edit) -> None:
  path = os.path.join(workdir, "checkpoints", str(step), "extras", "metadata")
  with open(path) as f:
    extras = json.load(f)
  edit(extras)
  with open(path, "w") as f:
    json.dump(extras, f)


def _lines(text: str) -> list[str]:
  return [line for line in text.splitlines() if line.strip()]


@pytest.mark.slow
def test_every_step_unreadable_stops_with_its_own_status_and_moves_nothing(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  for step in (1, 2, 3):
    _truncate_step(workdir, step)
  checkpoints = os.path.join(workdir, "checkpoints")
  before = sorted(os.listdir(checkpoints))
  metrics = open(os.path.join(workdir, "metrics.jsonl"), "rb").read()
  proc = _main(workdir, **{**_RUN, "train.num_steps": 5})
  assert proc.returncode == errors.EXIT_CHECKPOINTS_UNREADABLE, proc.stderr[-3000:]
  err = _lines(proc.stderr)
  assert len(err) <= 4, proc.stderr  # One line per bad step, then one sentence.
  assert err[-1].startswith("resume: none of the 3 checkpoints in") and "did not start over" in \
      err[-1], err[-1]
  assert "Traceback" not in proc.stderr
  assert sorted(os.listdir(checkpoints)) == before  # Nothing moved aside.
  assert open(os.path.join(workdir, "metrics.jsonl"), "rb").read() == metrics  # No restart.
  assert "from scratch" not in proc.stdout


@pytest.mark.slow
def test_a_bad_latest_step_falls_back_in_two_lines(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate_step(workdir, 3)
  proc = _main(workdir, **{**_RUN, "train.num_steps": 4})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed at step 2" in proc.stdout
  err = [line for line in _lines(proc.stderr) if "checkpoint" in line or "Traceback" in line]
  assert len(err) == 2, proc.stderr  # The step that failed to read, and where it went.
  assert "checkpoint step 3 is corrupt and was moved to" in err[1]
  assert len(_lines(proc.stderr)) <= 3, proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3", "4",
                                                                      "corrupt-3"]


@pytest.mark.slow
def test_export_and_eval_on_a_bad_step_say_one_sentence_with_the_step_hint(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _truncate_step(workdir, 3)
  for proc in (_tool("export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"),
               _tool("eval_checkpoint", f"--workdir={workdir}", f"--out={tmp_path / 'e.json'}")):
    assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-3000:]
    err = _lines(proc.stderr)
    assert len(err) <= 3, proc.stderr
    assert "checkpoints/3 is corrupt" in err[-1], err[-1]
    assert err[-1].endswith("--step=2 reads the one before it"), err[-1]
  assert not os.path.exists(tmp_path / "hf") and not os.path.exists(tmp_path / "e.json")


@pytest.mark.slow
def test_an_old_format_is_named_by_export_and_eval(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _edit_extras(workdir, 3, lambda extras: extras.update(format=1))
  with pytest.raises(run_checkpoint.FormatError, match=r"checkpoints/3 has format 1; this "
                     r"version reads format 2"):
    export_lib.export(workdir, str(tmp_path / "hf"))
  proc = _tool("eval_checkpoint", f"--workdir={workdir}", f"--out={tmp_path / 'e.json'}")
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-3000:]
  assert _lines(proc.stderr)[-1].startswith("eval_checkpoint error: checkpoint ")
  assert "has format 1; this version reads format 2" in proc.stderr
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2", "3"]


@pytest.mark.slow
def test_eval_on_a_model_config_of_other_shapes_names_the_parameter(trained, tmp_path):
  workdir = _copy(trained, tmp_path)
  _edit_extras(workdir, 3, lambda extras: extras["model_config"].update(mlp_dim=96))
  proc = _tool("eval_checkpoint", f"--workdir={workdir}", f"--out={tmp_path / 'e.json'}")
  assert proc.returncode == errors.EXIT_BAD_INPUT, proc.stderr[-3000:]
  err = _lines(proc.stderr)
  assert len(err) == 1, proc.stderr
  assert "parameter ['train']['params']['blocks']['mlp']['down_proj']['value'] has shape " \
         "(1, 64, 32) in the checkpoint but (1, 96, 32) in its model config" in err[0], err[0]


@pytest.mark.slow
def test_non_finite_weights_are_named_on_export(trained, tmp_path, capsys):
  policy = run_checkpoint.read_policy(trained)
  assert "NaN" not in capsys.readouterr().err
  params = nnx.state(policy.model, nnx.Param)
  params["embedding"].value = params["embedding"].value.at[0, 0].set(np.nan)
  workdir = str(tmp_path / "nan")
  with checkpoint_lib.Checkpointer(os.path.join(trained, "checkpoints"), keep=None,
                                   read_only=True) as ckpt:
    extras = ckpt.restore_extras(3)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                   async_save=False) as ckpt:
    ckpt.save(3, state={"train": {"params": params}}, extras=extras)
  export_lib.export(workdir, str(tmp_path / "hf"))
  err = _lines(capsys.readouterr().err)
  assert len(err) == 1 and "1 parameter(s) hold NaN or infinite values, first ['embedding']" \
      in err[0], err


@pytest.mark.slow
@pytest.mark.parametrize("error", [PermissionError(errno.EACCES, "Permission denied"),
                                   OSError(errno.EIO, "Input/output error")])
def test_a_failing_store_is_retried_then_stops_and_never_moves_a_step(trained, tmp_path,
                                                                     monkeypatch, capsys,
                                                                     error):
  workdir = _copy(trained, tmp_path)
  config = tiny_runs.tiny_config(**_RUN, **{"train.storage_retry_s": 1.0})
  trainer = tiny_runs.build_trainer(config, workdir)
  real, calls = ocp.CheckpointManager.restore, []

  def failing(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) <= 2:  # A transient failure: the third read goes through.
      raise error
    return real(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "restore", failing)
  checkpoints = os.path.join(workdir, "checkpoints")
  with checkpoint_lib.Checkpointer(checkpoints, keep=None) as ckpt:
    assert tiny_runs.resume(trainer, ckpt)
  assert trainer.run_state.step == 3 and set(calls) == {3}  # The same step, read again.
  assert len(_lines(capsys.readouterr().err)) == 2  # One line per retry.

  monkeypatch.setattr(ocp.CheckpointManager, "restore",
                      lambda self, step, *args, **kwargs: (_ for _ in ()).throw(error))
  with checkpoint_lib.Checkpointer(checkpoints, keep=None) as ckpt:
    with pytest.raises(errors.StorageUnavailable, match=r"checkpoints/3: the storage kept "
                       r"failing for 1 s \(train.storage_retry_s\)"):
      tiny_runs.resume(trainer, ckpt)
  assert sorted(os.listdir(checkpoints)) == ["1", "2", "3"]  # Nothing set aside.
  assert 1 <= len(_lines(capsys.readouterr().err)) <= 5


def test_damage_is_told_from_a_failing_store():
  from dypo_jax.io import storage  # pylint: disable=g-import-not-at-top
  truncated = ValueError('OUT_OF_RANGE: Error reading "w/0" in OCDBT database: Requested byte '
                         'range [0, 10356) is not valid for value of size 5317')
  wrapped = Exception("Encountered error while reading array index")
  wrapped.__cause__ = truncated
  assert storage.damage_is_certain(wrapped)
  assert storage.damage_is_certain(FileNotFoundError("gone"))
  assert storage.damage_is_certain(storage.CheckpointCorrupt("fails its checksum"))
  for failure in (PermissionError("denied"), TimeoutError("slow"), ConnectionError("reset"),
                  ValueError("PERMISSION_DENIED: HTTP 403 reading gs://b/c"),
                  ValueError("UNAVAILABLE: Connection refused"), RuntimeError("who knows")):
    assert not storage.damage_is_certain(failure), failure
  assert isinstance(storage.read_failure("x", wrapped), storage.CheckpointCorrupt)
  assert isinstance(storage.read_failure("x", PermissionError("denied")), errors.StorageError)


def test_a_quarantine_cut_short_is_never_listed_and_is_finished_later(tmp_path, monkeypatch):
  state = {"w": jax.numpy.arange(8.0)}
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, async_save=False) as ckpt:
    for step in (1, 2):
      ckpt.save(step, state=state, extras={})
    from dypo_jax.io import paths  # pylint: disable=g-import-not-at-top
    monkeypatch.setattr(paths, "move_tree", lambda src, dst: (_ for _ in ()).throw(
        OSError(errno.EIO, "copy failed half-way")))
    ckpt.quarantine(2, reason="test")
    assert ckpt.all_steps() == [1]  # The marker alone takes it out of the listing.
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "quarantine-2.json"]
  monkeypatch.undo()
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, async_save=False) as ckpt:
    assert ckpt.all_steps() == [1]
    assert sorted(os.listdir(tmp_path)) == ["1", "corrupt-2"]  # Finished on open.
    assert ckpt.save(2, state=state, extras={})  # The number is free again.
    assert ckpt.all_steps() == [1, 2]

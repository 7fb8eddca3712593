"""A corrupt latest checkpoint never blocks a run nor restores silently: it is moved aside to
checkpoints/corrupt-<step> (never deleted) and the run resumes from the newest good step."""
import json
import os
import shutil

import flax
import jax
import numpy as np
import pytest

from dypo_jax.io import checkpoint as checkpoint_lib
import tiny_runs

_CONFIG = {"train.num_steps": 2, "train.checkpoint_every": 1}


@flax.struct.dataclass
class _TrainLike:  # Saved states are dataclasses (TrainState): attribute steps in key paths.
  params: dict
  opt: jax.Array


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny run with complete checkpoints at steps 1 and 2, and step 1's arrays."""
  workdir = str(tmp_path_factory.mktemp("corrupt") / "run")
  trainer = tiny_runs.build_trainer(tiny_runs.tiny_config(**_CONFIG), workdir)
  trainer.run()
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None) as ckpt:
    state, _ = ckpt.restore(1, abstract_state=checkpoint_lib.abstract_like(
        trainer.run_state.arrays()))
  return workdir, jax.device_get(state)


def _largest_file(folder: str) -> str:
  files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _damage(path: str, how: str) -> None:
  data = open(path, "rb").read()
  if how == "truncate":
    data = data[:len(data) // 2]
  elif how == "flip":  # 64 bytes in the middle of the array data.
    mid = len(data) // 2
    data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
  if how == "delete":
    os.remove(path)
  else:
    with open(path, "wb") as f:
      f.write(data)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "delete", "flip"])
def test_a_corrupt_latest_step_is_moved_aside_and_the_run_resumes_from_the_one_before(
    trained, tmp_path, how, capsys):
  source, step1 = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  _damage(_largest_file(os.path.join(checkpoints, "2", "state")), how)

  trainer = tiny_runs.build_trainer(tiny_runs.tiny_config(**_CONFIG), workdir)
  with checkpoint_lib.Checkpointer(checkpoints, keep=None) as ckpt:
    assert tiny_runs.resume(trainer, ckpt)
    assert ckpt.all_steps() == [1]
  assert trainer.run_state.step == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.run_state.arrays()), step1)
  assert sorted(os.listdir(checkpoints)) == ["1", "corrupt-2"]  # Kept, not deleted.
  err = capsys.readouterr().err
  assert "checkpoint step 2 is corrupt and was moved to" in err
  assert len(err.strip().splitlines()) == 2, err  # One line on reading it, one on moving it.


def test_altered_extras_fail_their_checksum(tmp_path):
  state = {"w": jax.numpy.arange(8.0)}
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, async_save=False) as ckpt:
    ckpt.save(1, state=state, extras={"lr": 1e-3})
  extras_dir = tmp_path / "1" / "extras"
  for name in os.listdir(extras_dir):
    path = extras_dir / name
    path.write_text(path.read_text().replace("0.001", "0.002"))
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None) as ckpt:
    with pytest.raises(checkpoint_lib.CheckpointCorrupt, match="'extras' fails its sha256"):
      ckpt.restore(1, abstract_state=checkpoint_lib.abstract_like(state))


def test_a_partial_restore_checks_the_arrays_it_reads(tmp_path):
  """restore_subtree (export, eval_checkpoint) reads part of a state saved as a dataclass; each
  array it reads is checked against the checksum saved for it, and only those."""
  state = {"train": _TrainLike(params={"w": jax.numpy.arange(8.0)}, opt=jax.numpy.ones(3)),
           "ref": {"w": jax.numpy.zeros(8)}}
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, async_save=False) as ckpt:
    ckpt.save(1, state=state, extras={})
  subtree = {"train": {"params": checkpoint_lib.abstract_like(state["train"].params)}}
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, read_only=True) as ckpt:
    got = ckpt.restore_subtree(1, abstract_subtree=subtree)
  np.testing.assert_array_equal(got["train"]["params"]["w"], np.arange(8.0))

  verify_file = next((tmp_path / "1" / "verify").iterdir())
  saved = verify_file.read_text()
  for key, read in (("['train'].opt", False), ("['train'].params['w']", True)):
    entry = f'"{key}": '
    assert entry in saved, (entry, saved)
    start = saved.index(entry) + len(entry)
    end = start + len(saved[start:].split(",")[0].split("}")[0])
    verify_file.write_text(saved[:start] + str(int(saved[start:end]) ^ 1) + saved[end:])
    with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, read_only=True) as ckpt:
      if read:
        with pytest.raises(checkpoint_lib.CheckpointCorrupt,
                           match=r"1 array\(s\) fail their checksum, "
                                 r"first \['train'\]\['params'\]"):
          ckpt.restore_subtree(1, abstract_subtree=subtree)
      else:  # An array the partial restore does not read is not checked.
        ckpt.restore_subtree(1, abstract_subtree=subtree)
    verify_file.write_text(saved)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_export_and_eval_refuse_a_corrupt_policy(trained, tmp_path, how):
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top
  source, _ = trained
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  state_dir = os.path.join(workdir, "checkpoints", "2", "state")
  data_files = [os.path.join(d, f) for d, _, names in os.walk(state_dir) for f in names
                if os.path.basename(d) == "d"]  # OCDBT's data files: the policy is in one.
  assert data_files
  for path in data_files:
    _damage(path, how)
  with pytest.raises(run_checkpoint.CheckpointReadError,
                     match="checkpoints/2.*--step=1 reads the one"):
    run_checkpoint.read_policy(workdir)
  assert run_checkpoint.read_policy(workdir, step=1).step == 1


def test_a_sign_flip_at_any_index_changes_the_fingerprint():
  x = jax.numpy.arange(1.0, 9.0)
  for i in range(8):
    flipped = x.at[i].multiply(-1.0)  # Word i changes by 2**31.
    assert (checkpoint_lib.state_fingerprints(flipped)
            != checkpoint_lib.state_fingerprints(x)), i
  # Version 1's multiplier was even at odd indices: the flip at index 1 went unseen.
  assert (checkpoint_lib.state_fingerprints(x.at[1].multiply(-1.0), version=1)
          == checkpoint_lib.state_fingerprints(x, version=1))


def test_a_step_saved_with_version_1_fingerprints_still_restores(tmp_path):
  state = {"w": jax.numpy.arange(8.0)}
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None, async_save=False) as ckpt:
    ckpt.save(1, state=state, extras={})
  verify_file = next((tmp_path / "1" / "verify").iterdir())
  saved = json.loads(verify_file.read_text())
  del saved["version"]  # As written before versions existed.
  saved["arrays"] = checkpoint_lib.state_fingerprints(state, version=1)
  verify_file.write_text(json.dumps(saved))
  with checkpoint_lib.Checkpointer(str(tmp_path), keep=None) as ckpt:
    got, _ = ckpt.restore(1, abstract_state=checkpoint_lib.abstract_like(state))
  np.testing.assert_array_equal(got["w"], np.arange(8.0))

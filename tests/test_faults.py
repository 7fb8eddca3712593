"""Faults: kill -9 (also mid-save), SIGTERM, non-finite updates; nothing lost, nothing half-read."""
import pytest
import json
import os
import random
import signal
import subprocess
import time

from flax import nnx
import jax
import numpy as np

from dypo_jax import errors
from dypo_jax import models
from dypo_jax.io import checkpoint as checkpoint_lib
import tiny_runs

_TMP_MARK = ".orbax-checkpoint-tmp"


def _start(workdir: str, **overrides) -> subprocess.Popen:
  return subprocess.Popen(tiny_runs.main_command(workdir, **overrides), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=tiny_runs.subprocess_env(),
                          cwd=tiny_runs.REPO)


def _finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def _ckpt_entries(workdir: str) -> list[str]:
  try:
    return os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []


def _complete_steps(workdir: str) -> list[int]:
  return sorted(int(name) for name in _ckpt_entries(workdir) if name.isdigit())


def _saved(workdir: str, step: int) -> tuple[bytes, dict]:
  """(queue bytes, extras) of a finalised checkpoint, read as a restart would."""
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                   read_only=True) as ckpt:
    assert step in ckpt.all_steps()
    return ckpt.restore_queues(step), ckpt.restore_extras(step)


def _new_steps(path: str, offset: int) -> list[int]:
  """Steps of the complete metric lines written after byte `offset` of metrics.jsonl."""
  try:
    with open(path, "rb") as f:
      f.seek(offset)
      data = f.read()
  except FileNotFoundError:
    return []
  return [json.loads(line)["step"] for line in data.split(b"\n")[:-1] if line.strip()]


@pytest.mark.slow
def test_kill_9_mid_save_then_sigterm_then_finish_equals_an_uninterrupted_run(tmp_path,
                                                                           reference_run):
  ref, work = reference_run, str(tmp_path / "killed")  # The reference: every checkpoint kept.
  num_steps = tiny_runs.REFERENCE_RUN["train.num_steps"]
  run = {"train.num_steps": num_steps, "train.checkpoint_every": 1}
  rng = random.Random()
  seed = rng.randrange(1 << 30)
  rng.seed(seed)
  print("random seed of this test:", seed)

  # Run 1: kill -9 while the checkpoint of a random step >= target is being written.
  target = rng.randrange(2, num_steps - 6)
  proc = _start(work, **run)
  seen_tmp = None
  while proc.poll() is None and seen_tmp is None:
    for name in _ckpt_entries(work):
      step = name.split(".")[0]
      if _TMP_MARK in name and step.isdigit() and int(step) >= target:
        proc.kill()  # SIGKILL.
        seen_tmp = name
        break
    else:
      time.sleep(0.0005)
  rc, out, err = _finish(proc)
  assert seen_tmp is not None, f"run ended (rc={rc}) before a save of step >= {target} was seen"
  assert rc == -signal.SIGKILL
  complete = _complete_steps(work)
  assert any(_TMP_MARK in name for name in _ckpt_entries(work)), "killed after the save ended"
  assert complete, "no complete checkpoint before the kill"
  last = complete[-1]
  assert last < int(seen_tmp.split(".")[0])  # The half-written step is not listed ...
  queue_bytes, extras = _saved(work, last)  # ... and the last complete one reads whole,
  ref_bytes, ref_extras = _saved(ref, last)  # holding exactly the reference's queue there.
  assert queue_bytes == ref_bytes
  for key in ("streams", "rollout_round", "teacher_counts", "rng"):
    assert extras[key] == ref_extras[key], key

  # Run 2: resumes from `last`; SIGTERM as soon as it has logged a new step: it saves and exits.
  metrics_path = os.path.join(work, "metrics.jsonl")
  offset = os.path.getsize(metrics_path)
  proc = _start(work, **run)
  while proc.poll() is None and not _new_steps(metrics_path, offset):
    time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  rc, out, err = _finish(proc)
  assert rc == errors.EXIT_PREEMPTED, err[-3000:]  # Not success: a scheduler must restart it.
  assert f"resumed at step {last}" in out
  assert "SIGTERM/SIGINT: stopped at step" in err, err[-2000:]
  assert "Traceback" not in err
  stopped = int(err.split("SIGTERM/SIGINT: stopped at step ")[1].split(";")[0])
  assert last < stopped < num_steps
  assert not os.path.exists(os.path.join(work, "final_table.md"))  # No report of a partial run.
  assert _complete_steps(work)[-1] == stopped
  assert not any(_TMP_MARK in name for name in _ckpt_entries(work))  # Cleaned on open.

  # Run 3: resumes from the SIGTERM checkpoint and finishes.
  rc, out, err = _finish(_start(work, **run))
  assert rc == 0, err[-3000:]
  assert f"resumed at step {stopped}" in out

  # Steps logged twice (after the kill) keep their last line: every step equals the reference.
  tiny_runs.assert_same_metrics(tiny_runs.comparable_metrics(work),
                                tiny_runs.comparable_metrics(ref))
  assert _saved(work, num_steps)[0] == _saved(ref, num_steps)[0]


@pytest.mark.slow
def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path):
  workdir = str(tmp_path)
  out = tiny_runs.run_python("""
      import sys
      import numpy as np
      import tiny_runs
      t = tiny_runs.build_trainer(tiny_runs.tiny_config(**{
          "train.num_steps": 8, "train.checkpoint_every": 1, "train.max_nonfinite_updates": 2}),
          sys.argv[1])
      build_batch = t.build_batch
      def poisoned(hard, mid):  # From the second update on, the loss weights are NaN.
        batch, info = build_batch(hard, mid)
        if t.run_state.step >= 1:
          batch["weights"][:] = np.nan
        return batch, info
      t.build_batch = poisoned
      try:
        t.run()
      except FloatingPointError as e:
        print("FloatingPointError:", e)
      """, workdir)
  assert "FloatingPointError: 3 updates had a non-finite loss" in out
  assert "train.max_nonfinite_updates=2" in out and "stopping at step 4" in out
  assert f"kept in {os.path.join(workdir, 'checkpoints')} (step 3)" in out
  records = tiny_runs.comparable_metrics(workdir)
  assert sorted(records) == [1, 2, 3, 4]  # The failing step is logged.
  assert records[1]["train/update_skipped"] == 0 and np.isfinite(records[1]["loss/total"])
  for step in (2, 3, 4):
    assert records[step]["train/update_skipped"] == 1
    assert records[step]["train/nonfinite_skipped"] == step - 1
    assert np.isnan(records[step]["loss/total"])
  assert _complete_steps(workdir) == [1, 2, 3]  # Step 4 (over the limit) is not saved.

  # Skipped updates left the policy as step 1 made it, finite.
  like = models.Transformer(tiny_runs.model_config(), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(like, nnx.Param)
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        params)
  with checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                   read_only=True) as ckpt:
    p1, p3 = (ckpt.restore_subtree(s, abstract_subtree={"train": {"params": target}})
              for s in (1, 3))
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p3)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isfinite(np.asarray(b)).all()


def _safetensors_arrays(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  return load_file(path)


@pytest.mark.slow
def test_sigterm_during_pretraining_exits_75_and_the_resumed_base_equals_an_uninterrupted_one(
    tmp_path):
  # A gate never reached: pretraining runs its max_steps, then one DYPO update.
  run = {"pretrain.enabled": True, "pretrain.max_steps": 12, "pretrain.eval_every": 4,
         "pretrain.eval_prompts": 4, "pretrain.update_prompts": 4,
         "pretrain.target_accuracy": 1.0, "pretrain.max_minutes": 60.0, "train.num_steps": 1}
  ref, work = str(tmp_path / "reference"), str(tmp_path / "preempted")
  rc, _, err = _finish(_start(ref, **run))
  assert rc == 0, err[-3000:]

  proc = _start(work, **run)
  for line in proc.stdout:  # SIGTERM at pretraining's first gate (step 4 of 12).
    if line.startswith("pretrain: step 4 "):
      proc.send_signal(signal.SIGTERM)
      break
  rc, out, err = _finish(proc)
  assert rc == errors.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM/SIGINT: stopped at step" in err and "Traceback" not in err
  base = os.path.join(work, "base_model")
  assert not os.path.exists(os.path.join(base, "config.json"))  # No half-trained base is kept.

  rc, out, err = _finish(_start(work, **run))
  assert rc == 0, err[-3000:]
  assert "resumed at step" in out  # Pretraining's own checkpoint, not a fresh start.
  got = _safetensors_arrays(os.path.join(base, "model.safetensors"))
  want = _safetensors_arrays(os.path.join(ref, "base_model", "model.safetensors"))
  assert sorted(got) == sorted(want)
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)

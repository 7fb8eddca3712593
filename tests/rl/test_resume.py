"""Resuming from a checkpoint continues the run exactly, and onto another mesh it reshards."""
import pytest
import os

from dypo_jax.io import metrics as metrics_lib
import tiny_runs


@pytest.mark.slow
def test_resumed_run_logs_the_uninterrupted_runs_metrics(tmp_path):
  # DYPO with LUFFY-style Hard items (the teacher trace joins the sampled group): every update
  # trains on rollouts (old log-probs, advantages, GAL) and the queue carries items (6 prompts
  # per round, 4 per update) across the checkpoint at step 3. Eval every 2 steps.
  whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
  tiny_runs.run_python("""
      import sys
      import tiny_runs
      whole, split = sys.argv[1:]
      over = {"rl.offline_loss_type": "rl", "train.eval_every": 2}
      tiny_runs.build_trainer(tiny_runs.tiny_config(**over), whole).run()
      # Stopped after 3 steps (the final save, at a step that is not a multiple of 2) ...
      tiny_runs.build_trainer(tiny_runs.tiny_config(**over, **{"train.num_steps": 3}), split).run()
      # ... and restarted on the same workdir (fresh trainer, as after a new process).
      tiny_runs.build_trainer(tiny_runs.tiny_config(**over), split).run()
      """, whole, split)
  want = tiny_runs.comparable_metrics(whole)
  got = tiny_runs.comparable_metrics(split)
  assert sorted(want) == [0, 1, 2, 3, 4, 5]  # Step 0 is the first eval.
  assert any(want[s]["queue/mid"] > 0 for s in (3, 4)), want  # Items waited across step 3.
  assert any(want[s]["route/hard_frac"] > 0 for s in (4, 5)), want
  assert "eval/id/pass@1" in want[4]
  tiny_runs.assert_same_metrics(got, want)
  evals = [metrics_lib.read_jsonl(os.path.join(w, "eval.jsonl")) for w in (whole, split)]
  assert [r["step"] for r in evals[0]] == [0, 2, 4] and evals[1] == evals[0]
  # Nothing re-logged: the first part ended at its checkpoint (one train line per step, plus
  # the eval lines of steps 0, 2 and 4).
  for workdir in (whole, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      assert len([line for line in f if line.strip()]) == 5 + 3


@pytest.mark.slow
def test_restore_onto_another_mesh_reshards(tmp_path):
  """Saved with fsdp=2 on 2 devices, restored with tensor=2: same values, new shardings.

  (SFT: no sampler to compile; the update, optimizer state and queue are what is resharded.)
  """
  out = tiny_runs.run_python("""
      import sys
      import jax
      import numpy as np
      import tiny_runs
      from dypo_jax.io import checkpoint as checkpoint_lib
      workdir = sys.argv[1]
      over = {"rl.method": "sft", "train.num_steps": 1}
      first = tiny_runs.build_trainer(tiny_runs.tiny_config(
          **over, **{"mesh.fsdp": 2, "mesh.tensor": 1}), workdir)
      first.run()
      saved = jax.device_get(first.run_state.arrays())
      assert len(first.run_state.queues) > 0
      saved_queue = first.run_state.queues.to_bytes()
      second = tiny_runs.build_trainer(tiny_runs.tiny_config(
          **over, **{"mesh.fsdp": 1, "mesh.tensor": 2}), workdir)
      with checkpoint_lib.Checkpointer(workdir + "/checkpoints", keep=3) as ckpt:
        assert tiny_runs.resume(second, ckpt)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(second.run_state.arrays()),
                   saved)
      assert second.run_state.queues.to_bytes() == saved_queue
      assert second.run_state.stream.state() == first.run_state.stream.state()
      for name, t in (("first", first), ("second", second)):
        mesh = dict(t.run_state.train.params["embedding"].value.sharding.mesh.shape)
        # The embedding [V=64, D=32]: its shard on one device, and its first Adam moment's.
        shard = t.run_state.train.params["embedding"].value.addressable_shards[0].data.shape
        mu = t.run_state.train.opt_state[1][0].mu["embedding"].value.addressable_shards[0].data.shape
        print(name, mesh["fsdp"], mesh["tensor"], shard, mu)
      """, str(tmp_path), num_devices=2)
  lines = {line.split()[0]: line.split(" ", 1)[1] for line in out.splitlines()
           if line.startswith(("first", "second"))}
  assert lines["first"] == "2 1 (64, 16) (64, 16)"  # fsdp shards the embed dimension.
  assert lines["second"] == "1 2 (32, 32) (32, 32)"  # tensor shards the vocabulary.

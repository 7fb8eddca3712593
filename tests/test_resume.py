"""Resuming from a checkpoint continues the run exactly, and onto another mesh it reshards."""
import os

import tiny_runs


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
      t = tiny_runs.build_trainer(tiny_runs.tiny_config(**over), split)
      t.run()
      print("resumed_compiles", t.step_trace_count)
      """, whole, split)
  want = tiny_runs.comparable_metrics(whole)
  got = tiny_runs.comparable_metrics(split)
  assert sorted(want) == [0, 1, 2, 3, 4, 5]  # Step 0 is the first eval.
  assert any(want[s]["queue/mid"] > 0 for s in (3, 4)), want  # Items waited across step 3.
  assert any(want[s]["route/hard_frac"] > 0 for s in (4, 5)), want
  assert "eval/id/pass@1" in want[4]
  tiny_runs.assert_same_metrics(got, want)
  # Nothing re-logged: the first part ended at its checkpoint (one train line per step, plus
  # the eval lines of steps 0, 2 and 4).
  for workdir in (whole, split):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      assert len([line for line in f if line.strip()]) == 5 + 3


def test_restore_onto_another_mesh_reshards_and_continues(tmp_path):
  """Saved with fsdp=2 on 2 devices, restored with tensor=2: same values, new shardings."""
  out = tiny_runs.run_python("""
      import sys
      import jax
      import numpy as np
      import tiny_runs
      from dypo_jax import checkpoint as checkpoint_lib
      workdir = sys.argv[1]
      first = tiny_runs.build_trainer(tiny_runs.tiny_config(
          **{"mesh.fsdp": 2, "mesh.tensor": 1, "train.num_steps": 1}), workdir)
      first.run()
      saved = jax.device_get((first.state, first.ref_params))
      saved_queue = first.queues.to_bytes()
      second = tiny_runs.build_trainer(tiny_runs.tiny_config(
          **{"mesh.fsdp": 1, "mesh.tensor": 2, "train.num_steps": 1}), workdir)
      with checkpoint_lib.Checkpointer(workdir + "/checkpoints", keep=3) as ckpt:
        assert second.restore(ckpt)
      jax.tree.map(np.testing.assert_array_equal, jax.device_get(
          (second.state, second.ref_params)), saved)
      assert second.queues.to_bytes() == saved_queue
      assert second.stream.state() == first.stream.state()
      specs = lambda tree: {str(x.sharding.spec) for x in jax.tree.leaves(tree)}
      print("first", sorted(specs(first.state.params)))
      print("second", sorted(specs(second.state.params)))
      assert all(x.sharding.mesh.shape["tensor"] == 2 for x in jax.tree.leaves(second.state))
      """, str(tmp_path), num_devices=2)
  first = [line for line in out.splitlines() if line.startswith("first")][0]
  second = [line for line in out.splitlines() if line.startswith("second")][0]
  assert "'fsdp'" in first and "'tensor'" not in first
  assert "'tensor'" in second and "'fsdp'" not in second

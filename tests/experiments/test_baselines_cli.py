"""The SRFT and CHORD baselines run end to end from the CLI (METHOD.md §5), on the tiny config."""
import subprocess

import numpy as np
import pytest

from dypo_jax.io import metrics as metrics_lib
import tiny_runs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["srft", "chord"])
def test_baseline_runs_two_updates_from_the_cli(method, tmp_path):
  workdir = tmp_path / method
  # baselines.py ends CHORD's μ schedule at its own num_steps; this run has 2 updates.
  cmd = tiny_runs.main_command(str(workdir), **{"train.num_steps": 2,
                                                "train.checkpoint_every": 0,
                                                "rl.chord_mu_steps": 2})
  cmd[cmd.index("--config=experiments/cpu_tiny.py:quick")] = (
      f"--config=experiments/baselines.py:{method},quick")
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tiny_runs.REPO, timeout=600,
                        env=tiny_runs.subprocess_env())
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  records = [r for r in metrics_lib.read_jsonl(str(workdir / metrics_lib.METRICS_FILENAME))
             if "loss/total" in r]
  assert [r["step"] for r in records] == [1, 2]
  for r in records:
    assert np.isfinite(r["loss/total"]) and r["batch/weight_gal"] == 0.0, r
    # Each prompt gives its teacher trace (SFT, token-weighted) and its group (GRPO).
    assert r["batch/hard_items"] > 0 and r["batch/mid_items"] > 0, r
    assert 0.0 < r["sft/token_weight_mean"] <= (1.0 if method == "srft" else 0.25), r
  if method == "srft":
    assert all(r["batch/weight_sft"] == 0.5 and r["batch/weight_grpo"] == 1.0 for r in records)
  else:  # μ from 0.9 to 0.05 over the run's 2 updates: 0.9 at update 0, 0.475 at update 1.
    assert [r["batch/weight_sft"] for r in records] == pytest.approx([0.9, 0.475])
    assert [r["batch/weight_grpo"] for r in records] == pytest.approx([0.1, 0.525])

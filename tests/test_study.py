"""experiments/study.py: cells, their overrides, and the report read from cells on disk."""
import json
import os

import numpy as np
import pytest

from dypo_jax import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
study_lib = config_lib.load_module(os.path.join(_REPO, "experiments", "study.py"))


def _write_cell(study, cell, evals, wall_s=60.0):
  os.makedirs(study.dir(cell), exist_ok=True)
  with open(os.path.join(study.dir(cell), "eval.jsonl"), "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in evals)
  with open(os.path.join(study.dir(cell), "cell.json"), "w") as f:
    json.dump({"cell": cell.name, "wall_s": wall_s, "command": []}, f)


def _eval(step, id_acc, ood_acc):
  rec = {"step": step, "id/pass@1": id_acc}
  for s in study_lib.NEAR_OOD + study_lib.FAR_OOD:
    rec[f"ood/{s}/pass@1"] = ood_acc
  return rec


def test_cells_share_a_base_and_the_default_grid_cell_is_the_compare_cell():
  compare = study_lib.cells_of("compare", [0, 1], ["dypo", "grpo"])
  grid = study_lib.cells_of("grid", [0], [])
  assert [c.name for c in compare] == ["seed0/base", "seed0/dypo", "seed0/grpo", "seed1/base",
                                       "seed1/dypo", "seed1/grpo"]
  assert study_lib.Cell("dypo", 0) in grid  # α = 0.5, β = 1, Δ sum.
  assert len(grid) == 1 + 9 + 1 and len(set(grid)) == len(grid)
  assert "seed0/dypo_a0.2_b0.1" in {c.name for c in grid}
  assert "seed0/dypo_a0.5_b1.0_gal_mean" in {c.name for c in grid}


def test_a_cell_starts_from_its_seeds_base_with_the_same_rollout_budget(tmp_path):
  study = study_lib.Study(str(tmp_path), size="", steps=100)
  o = study.overrides(study_lib.Cell("sft_then_rl", 3, (("rl.alpha", 0.2),)))
  assert o["model.hf_path"] == os.path.join(str(tmp_path), "seed3", "base", "base_model")
  assert o["train.max_rollouts_per_update"] == 1 and o["train.num_steps"] == 100
  assert o["rl.sft_then_rl_switch"] == 50 and o["rl.alpha"] == 0.2 and o["seed"] == 3
  cmd = study.command(study_lib.Cell("base", 3))
  assert "--config=experiments/cpu_tiny.py" in cmd and "--config.train.num_steps=0" in cmd
  # Every override is a key of the config schema (checked as main checks them).
  config_lib.check_override_keys([a for a in study.command(study_lib.Cell("dypo", 0))
                                  if a.startswith("--config.")])


def test_report_gives_intervals_and_paired_differences(tmp_path):
  """GRPO beats DYPO by exactly 5 points on every seed while seeds differ by ~10: the paired
  difference is resolved (*), with an interval at 5.0."""
  study = study_lib.Study(str(tmp_path), size="", steps=100)
  rng = np.random.default_rng(0)
  seeds = [0, 1, 2, 3, 4]
  for s in seeds:
    level = 0.4 + rng.normal(0, 0.1)
    _write_cell(study, study_lib.Cell("base", s), [_eval(0, level - 0.2, 0.1)])
    _write_cell(study, study_lib.Cell("dypo", s), [_eval(0, level - 0.2, 0.1),
                                                   _eval(100, level, 0.2)])
    _write_cell(study, study_lib.Cell("grpo", s), [_eval(0, level - 0.2, 0.1),
                                                   _eval(100, level + 0.05, 0.3)])
  text = study_lib.report(study, seeds, ["dypo", "grpo"])
  grpo_row = next(line for line in text.splitlines() if line.startswith("| RL (GRPO)"))
  assert "5.0 [5.0, 5.0] *" in grpo_row
  assert "30.0 [30.0, 30.0]" in grpo_row  # Pooled near OOD (every set at 0.3).
  assert "Cost on this machine: 15 cells done, 15.0 min in all" in text
  study_lib.curves_plot(study, seeds, ["dypo", "grpo"], str(tmp_path / "curves.png"))
  assert os.path.getsize(tmp_path / "curves.png") > 0


def test_unfinished_cells_are_not_reported(tmp_path):
  study = study_lib.Study(str(tmp_path), size="", steps=100)
  cell = study_lib.Cell("dypo", 0)
  _write_cell(study, cell, [_eval(0, 0.3, 0.1)])
  os.remove(os.path.join(study.dir(cell), "cell.json"))  # Interrupted: no cell.json yet.
  assert study.final(cell) is None and not study.done(cell)


@pytest.mark.slow
def test_study_and_variance_run_end_to_end(tmp_path):
  import subprocess
  import sys
  work = str(tmp_path / "study")
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=_REPO, capture_output=True,
                                  text=True, timeout=600)
  p = run("experiments/study.py", f"--workdir={work}", "--size=quick", "--seeds=0", "--steps=1",
          "--part=compare", "--methods=dypo")
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "seed0/dypo: " in p.stdout and "Table 1 (in small)" in p.stdout
  again = run("experiments/study.py", f"--workdir={work}", "--size=quick", "--seeds=0",
              "--steps=1", "--part=compare", "--methods=dypo")
  assert "seed0/dypo: done, skipped" in again.stdout  # A done cell is not run again.
  v = run("experiments/variance.py", f"--study={work}", "--size=quick", "--repeats=2",
          "--prompts=2", "--betas=1")  # One β: two compiled programs a point, not six.
  assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
  assert "| GRPO |" in v.stdout and "After 1 DYPO updates" in v.stdout
  for name in ("variance.md", "variance.json", "variance.png"):
    assert os.path.exists(os.path.join(work, "variance", name))

"""experiments/study.py: cells, their overrides, and the report read from cells on disk."""
import json
import os

import numpy as np
import pytest

from dypo_jax import config as config_lib

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
study_lib = config_lib.load_module(os.path.join(_REPO, "experiments", "study.py"))


def _write_cell(study, cell, evals, wall_s=60.0, *, rounds=1, groups=16, tokens=900,
                commit="abc123", dirty=False, steps=4, out=None, loss=1.0):
  """A done cell as Study.run leaves it in `out` (default its directory): eval.jsonl,
  metrics.jsonl (one record an update) and cell.json; `rounds` rollout rounds an update of
  `groups` groups, `tokens` update tokens."""
  out = out or study.dir(cell)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "eval.jsonl"), "w") as f:
    f.writelines(json.dumps(e) + "\n" for e in evals)
  with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "eval/id/pass@1": 0.1}) + "\n")  # Evaluations log here too.
    for step in range(1, steps + 1):
      f.write(json.dumps({"step": step, "rollout/rounds": rounds, "rollout/groups": groups * rounds,
                          "rollout/tokens": 10 * groups * rounds, "batch/tokens": tokens,
                          "grad/norm": 0.5, "loss/total": loss + 0.1 * step}) + "\n")
    f.write(json.dumps({"step": steps, "eval/id/pass@1": 0.2}) + "\n")
  with open(os.path.join(out, "cell.json"), "w") as f:
    json.dump({"cell": cell.name, "wall_s": wall_s, "command": [], "commit": commit,
               "dirty": dirty, "size": "", "steps": steps,
               "config": {"rl": {"num_samples": 8}, "train": {"num_steps": steps}}}, f)


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
  cell = study_lib.Cell("sft_then_rl", 3, (("rl.alpha", 0.2),))
  o = study.overrides(cell)
  assert o["model.hf_path"] == os.path.join(str(tmp_path), "seed3", "base", "base_model")
  assert o["train.max_rollouts_per_update"] == 1 and o["train.num_steps"] == 100
  assert o["train.log_every"] == 1  # Every update logged: the report sums the budget.
  assert o["rl.sft_then_rl_switch"] == 50 and o["rl.alpha"] == 0.2 and o["seed"] == 3
  cmd = study.command(study_lib.Cell("base", 3))
  assert "--config=experiments/cpu_tiny.py" in cmd and "--config.train.num_steps=0" in cmd
  assert f"--config.data.ood_tasks={study_lib.OOD_SETS!r}" in cmd
  assert study.overrides(study_lib.Cell("chord", 0))["rl.chord_mu_steps"] == 100
  # Every override is a key of the config schema (checked as main checks them).
  for method in ("dypo", "chord", "sft_then_rl"):
    config_lib.check_override_keys([a for a in study.command(study_lib.Cell(method, 0))
                                    if a.startswith("--config.")])
  # The resolved config that cell.json records: the file's, then the overrides.
  c = study.config(cell)
  assert c["rl"]["method"] == "sft_then_rl" and c["rl"]["alpha"] == 0.2 and c["seed"] == 3
  assert c["rl"]["sft_then_rl_switch"] == 50 and c["model"]["scan_layers"] is True
  assert tuple(c["data"]["ood_tasks"]) == study_lib.OOD_SETS


def test_the_old_scale_dypo_and_the_gamma_control_are_compare_cells(tmp_path):
  names = [c.name for c in study_lib.cells_of("compare", [0], study_lib.COMPARE)]
  assert names[-2:] == ["seed0/dypo_ls_legacy", "seed0/ladder_grading_g0.0583"]
  assert len(set(names)) == len(names) == 1 + len(study_lib.METHODS) + 2
  study = study_lib.Study(str(tmp_path), size="", steps=100)
  legacy = study.config(study_lib.cell_of(study_lib.LEGACY_DYPO, 0))
  assert legacy["rl"]["method"] == "dypo" and legacy["rl"]["loss_scale"] == "legacy"
  control = study.config(study_lib.cell_of(study_lib.CONTROL, 0))
  assert control["rl"]["alpha"] == 1.0 and control["rl"]["sft_loss_coef"] == 0.0583
  # Every grid cell, and the compare part's DYPO, runs at the default scale, never the old one.
  default_scale = config_lib.base_config().rl.loss_scale
  assert default_scale != "legacy"
  for cell in study_lib.cells_of("grid", [0], [])[1:] + [study_lib.Cell("dypo", 0)]:
    assert study.config(cell)["rl"]["loss_scale"] == default_scale, cell.name
  # Checkpoints after 25, 50, 75 and 100 updates, all kept, for experiments/variance.py.
  o = study.overrides(study_lib.Cell("dypo", 0))
  assert o["train.checkpoint_every"] == 25 and o["train.keep_checkpoints"] == 100 // 25
  for key in (study_lib.LEGACY_DYPO, study_lib.CONTROL):
    config_lib.check_override_keys([a for a in study.command(study_lib.cell_of(key, 0))
                                    if a.startswith("--config.")])


def test_the_control_gamma_gives_sft_the_old_dypos_share_of_the_rl_weight():
  # SFT at 6% of GAL's weight with α = 0.5, γ = 1: (1 − α)·L̄ = 1/0.06, L̄ = 33.3 tokens; the RL
  # terms then weighed α + (1 − α)·L̄ = 17.17 token means, so γ' = 1/17.17 = 0.0583.
  assert study_lib.CONTROL_GAMMA == study_lib.control_sft_coef() == 0.0583
  for alpha, gamma, share in ((0.5, 1.0, 0.06), (0.2, 1.0, 0.06), (0.5, 0.5, 0.1)):
    mean_len = gamma / (share * (1 - alpha))  # GAL's old per-token weight over the default's.
    old_sft_share_of_rl = gamma / (alpha + (1 - alpha) * mean_len)
    new = study_lib.control_sft_coef(alpha, gamma, share)
    assert new / 1.0 == pytest.approx(old_sft_share_of_rl, rel=2e-3)  # α = 1: RL weight 1.
  with pytest.raises(ValueError, match="alpha=1"):
    study_lib.control_sft_coef(alpha=1.0)
  with pytest.raises(ValueError, match="sft_share_of_gal=0"):
    study_lib.control_sft_coef(sft_share_of_gal=0)


def test_report_sets_the_old_scale_and_the_control_against_their_rows(tmp_path):
  """The old-scale DYPO 3 points below DYPO on every seed: decided (−), not reversed (no claim);
  the γ control 2 points above `ladder_grading`, and the old-scale DYPO 1 point above it."""
  study = study_lib.Study(str(tmp_path), size="", steps=4)
  seeds = [0, 1, 2]
  for s in seeds:
    level = 0.4 + 0.05 * s
    _write_cell(study, study_lib.Cell("base", s), [_eval(0, level - 0.2, 0.1)], rounds=0, steps=0)
    for key, lift in (("dypo", 0.0), (study_lib.LEGACY_DYPO, -0.03), ("ladder_grading", -0.06),
                      (study_lib.CONTROL, -0.04)):
      _write_cell(study, study_lib.cell_of(key, s), [_eval(4, level + lift, 0.2)])
  results = study_lib.collect(study, seeds, study_lib.COMPARE)
  assert set(results) >= {"seed0/dypo_ls_legacy", "seed2/ladder_grading_g0.0583"}
  text = study_lib.report(results, seeds)
  assert _row(text, "| DYPO, old scale (loss_scale=legacy) − DYPO | 3 | −3.0 [−3.0, −3.0]"
              ).endswith("| decided (−) |")
  assert _row(text, "| γ = 0.0583 − γ = 1 (+ dynamic grading) | 3 | +2.0 [+2.0, +2.0]"
              ).endswith("| decided (+) |")
  assert _row(text, "| + GAL at the old scale − the γ control | 3 | +1.0 [+1.0, +1.0]"
              ).endswith("| decided (+) |")
  table3 = text.split("Table 3 ladder (in small)")[1]
  assert _row(table3, "| + dynamic grading, γ = 0.0583 (old DYPO's SFT share) | 3 | 41.0 [")
  assert _row(text, "| ladder_grading_g0.0583 | 3 | 4/4 | 4 | 512 |")  # Its budget row.
  per_seed = text.split("Per-seed ID pass@1")[1]
  assert _row(per_seed, "| dypo_ls_legacy | ") == "| dypo_ls_legacy | 37.0 | 42.0 | 47.0 |"


def _synthetic_study(tmp_path, seeds=(0, 1, 2, 3, 4)):
  """GRPO beats DYPO by exactly 5 points on every seed while seeds differ by ~10; SFT is DYPO
  plus noise; ladder_rl runs half the rollout rounds."""
  study = study_lib.Study(str(tmp_path), size="", steps=4)
  rng = np.random.default_rng(0)
  for s in seeds:
    level = 0.4 + rng.normal(0, 0.1)
    _write_cell(study, study_lib.Cell("base", s), [_eval(0, level - 0.2, 0.1)], rounds=0, steps=0)
    _write_cell(study, study_lib.Cell("dypo", s), [_eval(0, level - 0.2, 0.1),
                                                   _eval(4, level, 0.2)])
    _write_cell(study, study_lib.Cell("grpo", s), [_eval(0, level - 0.2, 0.1),
                                                   _eval(4, level + 0.05, 0.3)])
    _write_cell(study, study_lib.Cell("sft", s), [_eval(4, level + rng.normal(0, 0.05), 0.2)],
                rounds=0)
    _write_cell(study, study_lib.Cell("ladder_rl", s), [_eval(4, level, 0.2)], rounds=1,
                steps=2)
  return study


def _row(text, start):
  return next(line for line in text.splitlines() if line.startswith(start))


def test_report_calls_differences_by_t_intervals_with_verdicts(tmp_path):
  study = _synthetic_study(tmp_path)
  seeds = [0, 1, 2, 3, 4]
  results = study_lib.collect(study, seeds, study_lib.METHODS)
  text = study_lib.report(results, seeds, ["dypo", "grpo", "sft", "ladder_rl"])
  # GRPO − DYPO = +5 on all 5 seeds: decided against the paper's claim; the sign test cannot
  # go below 2/32 with 5 seeds.
  grpo = _row(text, "| RL (GRPO) − DYPO")
  assert "| 5 | +5.0 [+5.0, +5.0] | +5.0 [+5.0, +5.0] | 0.0625 (5 of 5 higher) |" in grpo
  assert grpo.endswith("| reversed (+) |")
  # SFT is DYPO plus noise of sd 5 points: not decided, and the detectable difference is the
  # noncentral-t figure at n = 5 (1.68 sds of the paired differences).
  sft = _row(text, "| SFT − DYPO")
  d = [results[f"seed{s}/sft"]["final"]["id/pass@1"] - results[f"seed{s}/dypo"]["final"][
      "id/pass@1"] for s in seeds]
  assert f"±{100 * 1.682 * np.std(d, ddof=1):.1f}" in sft and "| not decided (detectable ±" in sft
  assert _row(text, "| base − DYPO").endswith("| decided (−) |")  # DYPO above its base.
  means = _row(text, "| RL (GRPO) | 5 |")
  assert "30.0 [30.0, 30.0]" in means  # Pooled near OOD (every set at 0.3).
  assert "Commits: abc123 (clean): 25 cells." in text
  assert "Cost on the machines that ran the cells: 25 cells done, 25.0 min in all" in text
  # Budget: 4 updates of one round of 16 groups x k = 8 each; ladder_rl logged 2 of its updates.
  assert _row(text, "| grpo | 5 |") == "| grpo | 5 | 4/4 | 4 | 512 | 640 | 3,600 |"
  assert _row(text, "| ladder_rl | 5 |").startswith("| ladder_rl | 5 | 2/2 | 2 | 256 |")
  assert _row(text, "| sft | 5 |").startswith("| sft | 5 | 4/4 | 0 | 0 |")
  per_seed = _row(text.split("Per-seed ID pass@1")[1], "| grpo | ")
  want = [100 * results[f"seed{s}/grpo"]["final"]["id/pass@1"] for s in seeds]
  assert per_seed == "| grpo | " + " | ".join(f"{v:.1f}" for v in want) + " |"


def test_results_file_regenerates_the_report_and_the_document(tmp_path):
  study = _synthetic_study(tmp_path / "work", seeds=(0, 1, 2))
  results = study_lib.collect(study, [0, 1, 2], study_lib.METHODS)
  path = str(tmp_path / "study.json")
  study_lib.save_results(path, results, "python experiments/study.py --report")
  again = study_lib.load_results(path)
  assert again == json.loads(json.dumps(results))
  assert again["seed1/grpo"]["commit"] == "abc123" and again["seed1/grpo"]["dirty"] is False
  assert again["seed1/grpo"]["config"]["rl"]["num_samples"] == 8
  assert study_lib.report(again) == study_lib.report(results, [0, 1, 2])
  doc = tmp_path / "STUDY.md"
  doc.write_text(f"# Study\n\nProse before.\n\n{study_lib.DOC_BEGIN}\nold tables\n"
                 f"{study_lib.DOC_END}\n\nProse after.\n")
  study_lib.write_doc(str(doc), study_lib.report(again))
  text = doc.read_text()
  assert text.startswith("# Study\n\nProse before.\n\n" + study_lib.DOC_BEGIN + "\nCommits:")
  assert text.endswith(study_lib.DOC_END + "\n\nProse after.\n")
  assert "old tables" not in text and "| RL (GRPO) − DYPO | 3 | +5.0 [+5.0, +5.0]" in text
  study_lib.write_doc(str(doc), study_lib.report(again))
  assert doc.read_text() == text  # Regenerating is idempotent.
  (tmp_path / "bad.json").write_text(json.dumps({"cells": {}}))
  with pytest.raises(SystemExit, match="format None"):
    study_lib.load_results(str(tmp_path / "bad.json"))
  (tmp_path / "plain.md").write_text("no markers\n")
  with pytest.raises(SystemExit, match="markers"):
    study_lib.write_doc(str(tmp_path / "plain.md"), "x")
  study_lib.curves_plot(again, [0, 1, 2], ["dypo", "grpo"], str(tmp_path / "curves.png"))
  assert os.path.getsize(tmp_path / "curves.png") > 0


def test_grid_compares_each_setting_with_the_default_without_a_claimed_direction(tmp_path):
  """β = 0.1 adds exactly 3 points at α = 0.2 on every seed: decided (+), not reversed, since
  the paper claims no direction for the grid; every other setting equals the default."""
  study = study_lib.Study(str(tmp_path), size="", steps=4)
  seeds = [0, 1, 2]
  for s in seeds:
    for cell in study_lib.cells_of("grid", [s], []):
      lift = 0.03 if cell.setting == study_lib.grid_setting(0.2, 0.1) else 0.0
      _write_cell(study, cell, [_eval(4, 0.4 + 0.05 * s + lift, 0.2)])
  text = study_lib.report(study_lib.collect(study, seeds, []), seeds, [])
  grid = text.split("Sensitivity grid (paper Table 5), ID pass@1, seeds [0, 1, 2]")[1]
  assert _row(grid, "| 0.2 |").startswith("| 0.2 | 48.0 [")
  assert _row(grid, "| α = 0.2, β = 0.1 − default | 3 | +3.0 [+3.0, +3.0]").endswith(
      "| decided (+) |")
  assert _row(grid, "| α = 0.8, β = 2.0 − default | 3 | +0.0 [+0.0, +0.0]").endswith(
      "| not decided (detectable ±0.0) |")
  assert "| Δ length-averaged − Δ summed (default α, β) | 3 |" in grid


def test_the_report_command_from_a_results_file_alone(tmp_path, monkeypatch, capsys):
  """`study.py --results=FILE --doc=DOC` (main, in process): the tables from the file, no
  workdir; bad combinations are refused in one sentence."""
  study = _synthetic_study(tmp_path / "work", seeds=(0, 1))
  results = study_lib.collect(study, [0, 1], study_lib.METHODS)
  path, doc = str(tmp_path / "study.json"), str(tmp_path / "STUDY.md")
  study_lib.save_results(path, results, "test")
  monkeypatch.setattr("sys.argv", ["study.py", f"--results={path}", f"--doc={doc}"])
  study_lib.main()
  assert study_lib.report(results) in capsys.readouterr().out
  with open(doc) as f:
    assert f.read() == f"{study_lib.DOC_BEGIN}\n{study_lib.report(results)}{study_lib.DOC_END}\n"
  for argv, error in (([f"--results={path}", "--part=compare", "--workdir=/tmp/x"],
                       "running cells"),
                      (["--report"], "--workdir is required"),
                      (["--results=/nonexistent/study.json"], "cannot read")):
    monkeypatch.setattr("sys.argv", ["study.py"] + argv)
    with pytest.raises(SystemExit, match=error):
      study_lib.main()


def test_a_dirty_or_mixed_tree_is_flagged(tmp_path):
  study = study_lib.Study(str(tmp_path), size="", steps=4)
  _write_cell(study, study_lib.Cell("dypo", 0), [_eval(4, 0.5, 0.2)], commit="aaa")
  _write_cell(study, study_lib.Cell("dypo", 1), [_eval(4, 0.5, 0.2)], commit="bbb", dirty=True)
  text = study_lib.report(study_lib.collect(study, [0, 1], ["dypo"]))
  assert "aaa (clean): 1 cells; bbb (dirty tree): 1 cells" in text
  assert "Not one clean commit" in text
  assert study.seeds_found() == [0, 1]


def test_verify_compares_pass_rates_within_tolerance_and_budgets_exactly():
  recorded = {"final": {"id/pass@1": 0.500, "ood/add_zero/pass@1": 0.2},
              "budget": {"rounds": 4, "rollouts": 512, "update_tokens": 3600}}
  same = json.loads(json.dumps(recorded))
  assert study_lib.verify_differences(recorded, same, 0.005) == []
  near = json.loads(json.dumps(recorded))
  near["final"]["id/pass@1"] = 0.504
  assert study_lib.verify_differences(recorded, near, 0.005) == []
  far = json.loads(json.dumps(recorded))
  far["final"]["id/pass@1"], far["budget"]["rounds"] = 0.51, 2
  bad = study_lib.verify_differences(recorded, far, 0.005)
  assert len(bad) == 2 and bad[0].startswith("id/pass@1: recorded 0.5000, rerun 0.5100")
  assert bad[1] == "budget rounds: recorded 4, rerun 2"
  recorded["loss"] = [[1, 2.0], [2, 1.5], [3, 1.2]]
  same["loss"] = [[1, 2.0], [2, 1.5000001], [3, 1.2]]
  assert study_lib.verify_differences(recorded, same, 0.005) == []
  near["loss"] = [[1, 2.0], [2, 1.51], [3, 1.3]]  # Only the first update that differs.
  assert study_lib.verify_differences(recorded, near, 0.005) == [
      "loss/total at update 2: recorded 1.5, rerun 1.51"]
  cheapest = study_lib.cheapest_cell({"seed0/base": {"method": "base", "wall_s": 1.0},
                                      "seed0/dypo": {"method": "dypo", "wall_s": 90.0},
                                      "seed0/sft": {"method": "sft", "wall_s": 40.0}})
  assert cheapest == "seed0/sft"


def test_verify_reruns_the_cheapest_cell_from_its_base_and_reports(tmp_path, monkeypatch, capsys):
  """--verify's plumbing in process: the rerun (here a stand-in for main that logs chosen
  figures) goes to <workdir>/verify/<cell>, from the recorded cell's steps and size, and its
  figures are compared with the record."""
  study = _synthetic_study(tmp_path, seeds=(0,))
  results = study_lib.collect(study, [0], study_lib.METHODS)
  results["seed0/sft"]["wall_s"] = 10.0  # The cheapest method cell.
  rerun_id = {"value": results["seed0/sft"]["final"]["id/pass@1"], "loss": 1.0}
  runs = []

  def fake_run(self, cell, workdir=None):
    runs.append((cell, workdir, self.steps, self.size))
    assert "--config.train.num_steps=4" in self.command(cell, workdir)
    _write_cell(self, cell, [_eval(4, rerun_id["value"], 0.2)], rounds=0, out=workdir,
                loss=rerun_id["loss"])
    return 1.0

  monkeypatch.setattr(study_lib.Study, "run", fake_run)
  monkeypatch.setattr(study_lib, "git_state", lambda: {"commit": "def456", "dirty": False})
  name = study_lib.cheapest_cell(results)
  assert name == "seed0/sft"
  assert study_lib.verify(study, results, name, 0.005) == 0
  assert runs[0][1] == os.path.join(str(tmp_path), "verify", "seed0", "sft")
  assert "verify: seed0/sft reproduces" in capsys.readouterr().out
  rerun_id["value"] += 0.02
  assert study_lib.verify(study, results, name, 0.005) == 1
  assert "does NOT reproduce" in capsys.readouterr().out
  rerun_id["value"], rerun_id["loss"] = results["seed0/sft"]["final"]["id/pass@1"], 1.01
  assert study_lib.verify(study, results, name, 0.005) == 1
  assert "loss/total at update 1: recorded 1.1, rerun 1.11" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="a base is not a cheap cell"):
    study_lib.verify(study, results, "seed0/base", 0.005)
  with pytest.raises(SystemExit, match="no such recorded cell"):
    study_lib.verify(study, results, "seed9/dypo", 0.005)


def test_done_cells_are_skipped_and_the_report_rewritten(tmp_path, monkeypatch, capsys):
  """`--part` over cells that are done runs none of them (main, in process) and writes the
  results file, the report and the plots."""
  study = _synthetic_study(tmp_path, seeds=(0,))

  def refuse(self, cell, workdir=None):
    raise AssertionError(f"{cell.name} is done and was run again")

  monkeypatch.setattr(study_lib.Study, "run", refuse)
  monkeypatch.setattr("sys.argv", ["study.py", f"--workdir={tmp_path}", "--seeds=0", "--steps=4",
                                   "--part=compare", "--methods=dypo,grpo"])
  study_lib.main()
  out = capsys.readouterr().out
  assert "[2/3] seed0/dypo: done, skipped" in out and "[3/3] seed0/grpo: done, skipped" in out
  for name in ("study.json", "study.md", "curves.png", "grad_norm.png"):
    assert os.path.exists(tmp_path / name)
  assert set(study_lib.load_results(str(tmp_path / "study.json"))) == {
      "seed0/base", "seed0/dypo", "seed0/grpo"}


def test_unfinished_cells_are_not_reported(tmp_path):
  study = study_lib.Study(str(tmp_path), size="", steps=100)
  cell = study_lib.Cell("dypo", 0)
  _write_cell(study, cell, [_eval(0, 0.3, 0.1)])
  os.remove(os.path.join(study.dir(cell), "cell.json"))  # Interrupted: no cell.json yet.
  assert study.final(cell) is None and not study.done(cell)
  assert study_lib.collect(study, [0], ["dypo"]) == {}


def test_variance_points_after_25_50_100_updates_and_gal_pair_statistics():
  variance = config_lib.load_module(os.path.join(_REPO, "experiments", "variance.py"))
  assert variance.AFTER == (25, 50, 100)
  assert variance.points_after([25, 50, 75, 100], (25, 50, 100)) == [25, 50, 100]
  assert variance.points_after([50, 100], (25, 50, 100)) == [50, 100]
  assert variance.points_after([1], (25, 50, 100)) == [1]  # A smoke cell: its newest.
  assert variance.points_after([], (25,)) == []
  # Pooled over rounds: Σ over pairs / pairs; a round without a pair counts in neither.
  rounds = [{"pairs": 4, "eta_sum": 1.0, "correct_sum": 0.0},
            {"pairs": 0, "eta_sum": 0.0, "correct_sum": 0.0},
            {"pairs": 2, "eta_sum": 0.2, "correct_sum": 2.0}]
  g = variance.gal_pair_stats(rounds)
  assert g["pairs"] == 6 and g["rounds_with_pairs"] == 2
  assert g["eta"] == pytest.approx(1.2 / 6) and g["pair_accuracy"] == pytest.approx(2 / 6)
  assert g["eta_sd"] == pytest.approx(np.std([0.25, 0.1], ddof=1))
  assert g["pair_accuracy_sd"] == pytest.approx(np.std([0.0, 1.0], ddof=1))
  note = variance.gal_note(g)
  assert "6 pairs in 2 rounds" in note and "= 0.2000" in note and "(d > 0) = 0.333" in note
  none = variance.gal_pair_stats(rounds[1:2])
  assert none["eta"] is None and variance.gal_note(none).endswith("no (success, failure) pair "
                                                                  "in any round")


@pytest.mark.slow
def test_study_and_variance_run_end_to_end(tmp_path):
  import subprocess
  import sys
  work = str(tmp_path / "study")
  run = lambda *a: subprocess.run([sys.executable, *a], cwd=_REPO, capture_output=True,
                                  text=True, timeout=600)
  doc = str(tmp_path / "STUDY.md")
  p = run("experiments/study.py", f"--workdir={work}", "--size=quick", "--seeds=0", "--steps=1",
          "--part=compare", "--methods=dypo", f"--doc={doc}")
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  assert "seed0/dypo: " in p.stdout and "Table 1 (in small)" in p.stdout
  with open(os.path.join(work, "study.json")) as f:
    dypo = json.load(f)["cells"]["seed0/dypo"]
  assert len(dypo["commit"]) == 40 and isinstance(dypo["dirty"], bool)
  assert dypo["config"]["rl"]["method"] == "dypo" and dypo["config"]["train"]["num_steps"] == 1
  assert dypo["budget"]["updates"] == 1 and dypo["budget"]["rounds"] == 1  # One round an update.
  c = dypo["config"]
  assert dypo["budget"]["rollouts"] == c["train"]["rollout_prompts"] * c["rl"]["num_samples"]
  assert dypo["final"]["step"] == 1 and "id/pass@1" in dypo["final"]
  # The results file alone regenerates the document's tables (no workdir).
  with open(doc) as f:
    tables = f.read()
  from_file = run("experiments/study.py", f"--results={work}/study.json", f"--doc={doc}")
  assert from_file.returncode == 0, from_file.stdout[-3000:] + from_file.stderr[-3000:]
  with open(doc) as f:
    assert f.read() == tables and study_lib.DOC_BEGIN in tables
  v = run("experiments/variance.py", f"--study={work}", "--size=quick", "--repeats=2",
          "--prompts=2", "--betas=1")  # One β: two compiled programs a point, not six.
  assert v.returncode == 0, v.stdout[-3000:] + v.stderr[-3000:]
  assert "| GRPO |" in v.stdout and "After 1 DYPO updates" in v.stdout
  assert "no checkpoint after [25, 50, 100] updates (it holds [1]); measuring after [1]" in v.stdout
  with open(os.path.join(work, "variance", "variance.json")) as f:
    points = json.load(f)
  assert set(points) == {"base", "DYPO_1"}
  assert all("eta" in by_seed["0"]["gal"] for by_seed in points.values())
  for name in ("variance.md", "variance.json", "variance.png"):
    assert os.path.exists(os.path.join(work, "variance", name))

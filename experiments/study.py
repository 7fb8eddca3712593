r"""The paper's claims in small, with power: paired seeds, t intervals and verdicts, the α/β grid.

  python experiments/study.py --workdir=/tmp/study --part=compare --seeds=0,1,2,3,4,5,6,7
  python experiments/study.py --workdir=/tmp/study --part=grid --seeds=0,1,2
  python experiments/study.py --workdir=/tmp/study --report          # tables and plots only
  python experiments/study.py --workdir=/tmp/study --part=compare --shard=1/2   # machine 1 of 2
  python experiments/study.py --workdir=/tmp/sq --size=quick --seeds=0 --steps=2   # a smoke run
  python experiments/study.py --results=experiments/results/study.json --doc=experiments/STUDY.md
  python experiments/study.py --workdir=/tmp/study --verify       # rerun the cheapest cell

The study runs cell by cell. A cell is one `python -m dypo_jax.main` run (method x seed x
setting) in its own directory under --workdir; it is done when it wrote `cell.json` (its command,
wall time, the commit it ran at and whether the tree was dirty, and its resolved config), skipped
then, and resumed from its last checkpoint when it was interrupted. Per seed: one base model
(teacher SFT to the accuracy gate of experiments/cpu_tiny.py), then every cell of that seed
starts from it: same tokenizer, training pool, teacher traces and prompt stream. Every method
gets at most one rollout round of 16 prompts x 8 samples per update
(`train.max_rollouts_per_update=1`), so round r of every method samples the same prompts, and the
same number of updates; every update is logged (`train.log_every=1`), so the report counts each
cell's rollout rounds, rollouts and update tokens from `metrics.jsonl` rather than stating them.
`--shard=i/n` takes the seeds whose position in --seeds is i mod n, so machines never share a
base; copy the cell directories into one workdir to report.

Parts:
  compare  the methods of experiments/baselines.py (Table 1 and the Table 3 ladder), DYPO at the
           old scale (`dypo_ls_legacy`: rl.loss_scale="legacy") and the ladder's control
           (`ladder_grading_g0.0583`: γ cut to the old DYPO's SFT share, CONTROL_GAMMA);
  grid     DYPO over α in {0.2, 0.5, 0.8} x β_GAL in {0.1, 1, 2} (the paper's Table 5), and GAL
           with Δ length-averaged at the default (α = 0.5, β = 1; DYPO.md §2 chose the sum),
           every grid cell at the default rl.loss_scale (one scale for the three terms).
Evaluation: 500 held-out ID prompts x 8 samples, and 100 prompts x 8 of each OOD set (near, mid
and far from training: data/tasks.py), every 50 updates.

Report (`--report`, and every run's end): `study.json` (the results file: every done cell's
provenance, config, final and intermediate evaluations, budget and gradient norms, per seed),
`study.md`, `curves.png` and `grad_norm.png`. Means carry 95% Student-t intervals over seeds; a
comparison is the paired difference over seeds (same seed, same base, same prompt stream) with
its t interval, the percentile bootstrap beside it (too narrow at few seeds), the exact sign-test
p, the minimum detectable difference at the observed paired spread (two-sided α = 0.05, power
0.8) and a verdict against the paper's claim: decided (the t interval excludes 0), not decided,
or reversed (it excludes 0 on the other side). `--results=FILE` reports from a results file
alone (no workdir needed); `--doc=FILE` writes the tables between the markers of that document
(or a new one), so the document's figures regenerate with one command. `--verify[=CELL]` reruns
one recorded cell (default: the cheapest method cell) from its seed's base into
`<workdir>/verify/` and compares its final pass@1 figures with the recorded ones within
--verify_tol (default 0.005, half a point: the same code on the same kind of machine reproduces
a cell exactly, while a run that samples differently moves pass@1 on 500 x 8 samples by about a
point), its budget exactly, and its training loss at every logged update to a relative 1e-3.
"""
import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _REPO)
from dypo_jax.evaluation import statistics  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = ("sft", "grpo", "sft_then_rl", "luffy", "srft", "chord", "ladder_rl", "ladder_grading",
           "dypo")

# The ladder's control cuts γ to the SFT share of the old DYPO. Under rl.loss_scale="legacy" SFT
# and GRPO are token means while GAL's loss is per prompt, so GAL's weight on each token is L̄
# (the mean Mid response length) times what the default "token" scale gives it: the default
# divides GAL's loss by exactly that L̄ (losses.gal_length_scale). In token-mean units the old
# update weighted (SFT, GRPO, GAL) as (γ·N_H, α·N_M, (1 − α)·L̄·N_M)/N, so SFT's weight relative
# to the RL terms together was γ/(α + (1 − α)·L̄) (times N_H/N_M). The control,
# `ladder_grading` (α = 1: GRPO alone on Mid, (γ'·N_H, N_M, 0)/N, the same under every scale),
# matches it with γ' = γ/(α + (1 − α)·L̄). Issue 26 measured SFT at ~6% of GAL's weight under the
# old mix, γ/((1 − α)·L̄) = 0.06, so (1 − α)·L̄ = γ/0.06 and at the defaults α = 0.5, γ = 1:
# γ' = 1/(0.5 + 16.67) = 0.0583.
OLD_SFT_SHARE_OF_GAL = 0.06


def control_sft_coef(alpha: float = 0.5, gamma: float = 1.0,
                     sft_share_of_gal: float = OLD_SFT_SHARE_OF_GAL) -> float:
  """γ' for `ladder_grading` (α = 1) that gives SFT the share of the RL terms' weight it had in
  the old-scale DYPO at (α, γ), where SFT's weight was `sft_share_of_gal` of GAL's (3 digits)."""
  if not (0 < sft_share_of_gal and 0 <= alpha < 1 and gamma > 0):
    raise ValueError(f"control_sft_coef: want 0 <= alpha < 1, gamma > 0, share > 0; got "
                     f"alpha={alpha}, gamma={gamma}, sft_share_of_gal={sft_share_of_gal}")
  gal_over_token = gamma / sft_share_of_gal  # (1 − α)·L̄, GAL's old weight in token units.
  return float(f"{gamma / (alpha + gal_over_token):.3g}")


CONTROL_GAMMA = control_sft_coef()
LEGACY_SCALE = (("rl.loss_scale", "legacy"),)
# Cells of the compare part beyond one per method: {key (the cell name's tail): (method, setting)}.
VARIANTS = {
    "dypo_ls_legacy": ("dypo", LEGACY_SCALE),  # The old scale, to set the old figures beside.
    f"ladder_grading_g{CONTROL_GAMMA}": ("ladder_grading", (("rl.sft_loss_coef", CONTROL_GAMMA),)),
}
COMPARE = METHODS + tuple(VARIANTS)
LEGACY_DYPO, CONTROL = tuple(VARIANTS)
TABLE1 = (("SFT", "sft"), ("RL (GRPO)", "grpo"), ("SFT → RL", "sft_then_rl"),
          ("LUFFY-style", "luffy"), ("SRFT", "srft"), ("CHORD", "chord"), ("DYPO", "dypo"),
          ("DYPO, old scale (loss_scale=legacy)", LEGACY_DYPO))
TABLE3 = (("multi-teacher SFT", "sft"), ("+ RL", "ladder_rl"),
          ("+ dynamic grading", "ladder_grading"), ("+ GAL (= DYPO)", "dypo"))
TABLE3_CONTROL = ((f"+ dynamic grading, γ = {CONTROL_GAMMA} (old DYPO's SFT share)", CONTROL),
                  ("+ GAL at the old scale (old DYPO)", LEGACY_DYPO))
ALPHAS, BETAS = (0.2, 0.5, 0.8), (0.1, 1.0, 2.0)
DEFAULT_ALPHA, DEFAULT_BETA = 0.5, 1.0
# OOD sets by distance from training (data/tasks.py); the study's bases (5 seeds) solve the near
# ones at 17% and 27%, the mid ones at 3% and 0.1%, the far ones at under 1%.
NEAR_OOD, MID_OOD, FAR_OOD = (("add_zero", "add_space_eq"), ("add_5x1", "add_100s"),
                              ("add_long", "add_3digit"))
OOD_SETS = NEAR_OOD + MID_OOD + FAR_OOD
UPDATES = 100
DEFAULT_SEEDS = (0, 1, 2, 3, 4, 5, 6, 7)
RESULTS_FORMAT = "dypo-study/1"
DOC_BEGIN, DOC_END = "<!-- study.py tables: begin -->", "<!-- study.py tables: end -->"
# The paper's claim for (row - DYPO): DYPO beats every baseline and every rung below it.
CLAIM_BELOW_DYPO = -1
# Rows of Table 1 the paper makes no claim about, set against DYPO without a direction: the old
# scale is not the paper's method (eqs. 3, 5, 15 put the terms on one scale), so a decided
# difference either way says how much the scale alone moved the old figures.
CLAIMS_VS_DYPO = {LEGACY_DYPO: 0}

# What every cell of the study shares beyond experiments/cpu_tiny.py (its base included).
STUDY_OVERRIDES = {
    "data.num_eval_id": 500, "data.num_eval_ood": 100 * len(OOD_SETS),
    "data.ood_tasks": OOD_SETS,
    "eval.num_samples": 8, "eval.max_prompts": 100 * len(OOD_SETS),
    "train.max_rollouts_per_update": 1,  # The same rollout budget for every method.
    "train.max_empty_updates": UPDATES,  # A round that queues nothing is one empty update.
    "train.log_every": 1,  # Every update's rollout rounds, rollouts and tokens, for the budget.
    # Checkpoints after 25, 50, 75 and 100 updates, all kept: experiments/variance.py measures
    # the DYPO cell's policy after 25, 50 and 100 updates (where it has moved from the reference).
    "train.checkpoint_every": 25, "train.keep_checkpoints": 4,
    # The README's tables ran with the scanned stack; experiments/cpu_tiny.py now loops over its
    # 2 layers (faster on a CPU, the same maths, other rounding), so the study pins the scan to
    # reproduce them.
    "model.scan_layers": True,
}
QUICK_OVERRIDES = {"data.num_eval_id": 32, "data.num_eval_ood": 8 * len(OOD_SETS),
                   "eval.num_samples": 2, "eval.max_prompts": 8 * len(OOD_SETS)}


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the study: a method from its seed's base, with config `setting` overrides."""
  method: str  # A variant of experiments/baselines.py, or "base".
  seed: int
  setting: tuple[tuple[str, object], ...] = ()

  @property
  def name(self) -> str:
    short = {"rl.alpha": "a", "rl.beta_gal": "b", "rl.gal_length_norm": "gal_",
             "rl.loss_scale": "ls_", "rl.sft_loss_coef": "g"}
    tags = "".join(f"_{short[k]}{v}" for k, v in self.setting)
    return f"seed{self.seed}/{self.method}{tags}"


def grid_setting(alpha: float, beta: float, norm: str = "sum") -> tuple:
  """The overrides of a grid cell; the default (α, β, sum) is the compare part's DYPO cell."""
  if (alpha, beta, norm) == (DEFAULT_ALPHA, DEFAULT_BETA, "sum"):
    return ()
  setting = (("rl.alpha", alpha), ("rl.beta_gal", beta))
  return setting + ((("rl.gal_length_norm", norm),) if norm != "sum" else ())


def cell_of(key: str, seed: int) -> Cell:
  """The cell of a compare key (a method, "base", or a key of VARIANTS) at `seed`."""
  if key in VARIANTS:
    method, setting = VARIANTS[key]
    return Cell(method, seed, setting)
  return Cell(key, seed)


def cells_of(part: str, seeds, methods) -> list[Cell]:
  """The cells of `part` at `seeds`; `methods`: the compare keys (COMPARE) to run."""
  out = []
  for seed in seeds:
    out.append(Cell("base", seed))
    if part == "compare":
      out += [cell_of(m, seed) for m in methods]
    elif part == "grid":
      out += [Cell("dypo", seed, grid_setting(a, b)) for a in ALPHAS for b in BETAS]
      out.append(Cell("dypo", seed, grid_setting(DEFAULT_ALPHA, DEFAULT_BETA, "mean")))
  return out


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def git_state(repo: str = _REPO) -> dict:
  """{"commit": HEAD's hash, "dirty": whether tracked or new files differ from it}; "unknown"
  and None outside a git checkout."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True,
                            text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return {"commit": "unknown", "dirty": None}
  return {"commit": commit, "dirty": bool(status.strip())}


def _cli_value(v) -> str:
  return repr(v) if isinstance(v, tuple) else str(v)


class Study:
  """Runs and reads the cells under one workdir."""

  def __init__(self, workdir: str, *, size: str, steps: int):
    self.workdir, self.size, self.steps = workdir, size, steps

  def dir(self, cell: Cell) -> str:
    return os.path.join(self.workdir, cell.name)

  def seeds_found(self) -> list[int]:
    """The seeds with a directory under the workdir."""
    if not os.path.isdir(self.workdir):
      return []
    return sorted(int(d[4:]) for d in os.listdir(self.workdir)
                  if d.startswith("seed") and d[4:].isdigit())

  def done(self, cell: Cell) -> bool:
    return os.path.exists(os.path.join(self.dir(cell), "cell.json"))

  def overrides(self, cell: Cell) -> dict:
    base_dir = self.dir(Cell("base", cell.seed))
    o = {"seed": cell.seed, **STUDY_OVERRIDES, **(QUICK_OVERRIDES if self.size else {})}
    if cell.method == "base":
      return {**o, "train.num_steps": 0, "train.eval_every": 1}
    o.update({"model.init": "hf", "model.hf_path": os.path.join(base_dir, "base_model"),
              "tokenizer.path": os.path.join(base_dir, "tokenizer", "spm.model"),
              "pretrain.enabled": False, "train.num_steps": self.steps,
              "train.eval_every": max(self.steps // 2, 1)})
    if cell.method == "sft_then_rl":  # The switch at half the budget, as in baselines.py.
      o["rl.sft_then_rl_switch"] = self.steps // 2
    if cell.method == "chord":  # μ reaches its end value at the last update, as in baselines.py.
      o["rl.chord_mu_steps"] = self.steps
    o.update(dict(cell.setting))
    return o

  def config_file(self, cell: Cell) -> str:
    if cell.method == "base":
      return f"experiments/cpu_tiny.py{':' + self.size if self.size else ''}"
    return f"experiments/baselines.py:{cell.method}{',' + self.size if self.size else ''}"

  def command(self, cell: Cell, workdir: str | None = None) -> list[str]:
    return ([sys.executable, "-m", "dypo_jax.main", f"--config={self.config_file(cell)}",
             f"--workdir={workdir or self.dir(cell)}"]
            + [f"--config.{k}={_cli_value(v)}" for k, v in self.overrides(cell).items()])

  def config(self, cell: Cell) -> dict:
    """The cell's resolved config as main builds it (the file's config, then the overrides)."""
    from dypo_jax import config as config_lib  # pylint: disable=g-import-not-at-top
    path, _, variant = self.config_file(cell).partition(":")
    c = config_lib.load_experiment(os.path.join(_REPO, path), variant)
    for key, value in self.overrides(cell).items():
      section, _, name = key.rpartition(".")
      (c[section] if section else c)[name] = value
    config_lib.validate(c)
    return json.loads(c.to_json())

  def run(self, cell: Cell, workdir: str | None = None) -> float:
    """Runs (or resumes) a cell into `workdir` (default its own directory); returns its wall
    time. Raises naming the log on failure. `cell.json` records how it ran."""
    out = workdir or self.dir(cell)
    os.makedirs(out, exist_ok=True)
    cmd, provenance = self.command(cell, out), git_state()
    config = self.config(cell)  # Checked before the run starts.
    log_path = os.path.join(out, "log.txt")
    start = time.perf_counter()
    with open(log_path, "a") as log:
      rc = subprocess.run(cmd, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc:
      raise RuntimeError(f"cell {cell.name} failed (exit status {rc}); its log: {log_path}")
    with open(os.path.join(out, "cell.json"), "w") as f:
      json.dump({"cell": cell.name, "method": cell.method, "seed": cell.seed,
                 "setting": [list(kv) for kv in cell.setting], "size": self.size,
                 "steps": self.steps, "wall_s": wall, **provenance,
                 "config_file": self.config_file(cell),
                 "overrides": {k: _cli_value(v) for k, v in self.overrides(cell).items()},
                 "command": cmd, "config": config}, f, indent=1)
    return wall

  def evals(self, cell: Cell, workdir: str | None = None) -> list[dict]:
    """The cell's evaluations, each with the OOD sets of a distance pooled (equal-sized sets)."""
    out = workdir or self.dir(cell)
    path = os.path.join(out, "eval.jsonl")
    done = os.path.exists(os.path.join(out, "cell.json"))
    records = _read_jsonl(path) if done and os.path.exists(path) else []
    for rec in records:
      for pool, sets in (("ood_near", NEAR_OOD), ("ood_mid", MID_OOD), ("ood_far", FAR_OOD)):
        values = [rec[f"ood/{s}/pass@1"] for s in sets if f"ood/{s}/pass@1" in rec]
        if len(values) == len(sets):
          rec[f"{pool}/pass@1"] = float(np.mean(values))
    return records

  def final(self, cell: Cell) -> dict | None:
    evals = self.evals(cell)
    return evals[-1] if evals else None

  def wall_s(self, cell: Cell) -> float | None:
    if not self.done(cell):
      return None
    with open(os.path.join(self.dir(cell), "cell.json")) as f:
      return json.load(f)["wall_s"]

  def record(self, cell: Cell, workdir: str | None = None) -> dict | None:
    """Everything the report reads of a done cell, as the results file stores it."""
    out = workdir or self.dir(cell)
    if not os.path.exists(os.path.join(out, "cell.json")):
      return None
    with open(os.path.join(out, "cell.json")) as f:
      info = json.load(f)
    evals = self.evals(cell, out)
    metrics_path = os.path.join(out, "metrics.jsonl")
    # One record a step: an evaluation logs its figures at the step of the update before it,
    # and a resumed run logs again from its checkpoint's step (the later value of a key wins).
    by_step = {}
    for rec in _read_jsonl(metrics_path) if os.path.exists(metrics_path) else []:
      if "step" in rec:
        by_step.setdefault(rec["step"], {}).update(rec)
    updates = [r for _, r in sorted(by_step.items()) if "rollout/rounds" in r]  # Every update
    config = info.get("config")  # logs its rounds, an empty one too.
    return {
        "cell": cell.name, "method": cell.method, "seed": cell.seed,
        "setting": [list(kv) for kv in cell.setting],
        "commit": info.get("commit", "unknown"), "dirty": info.get("dirty"),
        "wall_s": info.get("wall_s"), "size": info.get("size"), "steps": info.get("steps"),
        "config_file": info.get("config_file"), "overrides": info.get("overrides"),
        "config": config, "final": evals[-1] if evals else None, "evals": evals,
        "budget": budget_of(updates, config),
        "grad_norm": [[r["step"], r["grad/norm"]] for r in updates if "grad/norm" in r],
        "loss": [[r["step"], r["loss/total"]] for r in updates if "loss/total" in r],
    }


def budget_of(records: list[dict], config: dict | None) -> dict:
  """A cell's sampling and training budget summed over its logged updates: rollout rounds,
  rollouts (sampled groups x k), sampled tokens, and update tokens (the response tokens the
  updates trained on, `batch/tokens`). `updates` is how many updates were logged: below the
  cell's `train.num_steps` the sums are partial (a cell run with log_every > 1)."""
  k = (config or {}).get("rl", {}).get("num_samples")
  total = lambda key: float(sum(r.get(key, 0) for r in records))
  return {"updates": len(records),
          "num_steps": (config or {}).get("train", {}).get("num_steps"),
          "rounds": int(total("rollout/rounds")),
          "rollouts": int(total("rollout/groups") * k) if k else None,
          "rollout_tokens": int(total("rollout/tokens")),
          "update_tokens": int(total("batch/tokens")),
          "empty_updates": int(total("train/empty_update"))}


def collect(study: Study, seeds, methods) -> dict[str, dict]:
  """{cell name: record} of every done cell of either part."""
  out = {}
  for part in ("compare", "grid"):
    for c in cells_of(part, seeds, methods):
      if c.name not in out and study.done(c):
        out[c.name] = study.record(c)
  return out


def save_results(path: str, records: dict[str, dict], command: str) -> None:
  with open(path, "w") as f:
    json.dump({"format": RESULTS_FORMAT, "command": command, "cells": records}, f, indent=1)


def load_results(path: str) -> dict[str, dict]:
  """The cell records of a results file written by `save_results`; a clear error otherwise."""
  try:
    with open(path) as f:
      data = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise SystemExit(f"--results={path}: cannot read a results file ({e})") from None
  if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
    got = data.get("format") if isinstance(data, dict) else type(data).__name__
    raise SystemExit(f"--results={path}: format {got!r}, want {RESULTS_FORMAT!r} (a study.json "
                     "written by experiments/study.py --report)")
  return data["cells"]


# ------------------------------------------------------------------------------------ report


def _values(results: dict, cells: list[Cell], key: str) -> dict[int, float]:
  """{seed: final value of `key`} over the cells that are done and logged it."""
  out = {}
  for c in cells:
    rec = (results.get(c.name) or {}).get("final")
    if rec is not None and key in rec:
      out[c.seed] = rec[key]
  return out


def _mean(values: dict[int, float]) -> str:
  if not values:
    return "—"
  return statistics.t_mean(list(values.values())).format(100)


def _signed(iv: statistics.Interval) -> str:
  f = lambda v: f"{100 * v:+.1f}".replace("-", "−")
  return f"{f(iv.mean)} [{f(iv.low)}, {f(iv.high)}]"


@dataclasses.dataclass(frozen=True)
class Comparison:
  """A paired comparison over the seeds both sides have: (values - baseline) per seed."""
  n: int
  t: statistics.Interval | None
  bootstrap: statistics.Interval | None
  sign_p: float
  wins: int  # Seeds where values > baseline.
  detectable: float
  verdict: statistics.Verdict


def compare(values: dict[int, float], baseline: dict[int, float], claim: int) -> Comparison:
  seeds = sorted(set(values) & set(baseline))
  a, b = [values[s] for s in seeds], [baseline[s] for s in seeds]
  if len(seeds) < 2:
    v = statistics.Verdict("not decided", 0, float("nan"))
    return Comparison(len(seeds), None, None, 1.0, 0, float("nan"), v)
  t = statistics.t_paired_difference(a, b)
  detectable = statistics.detectable_difference(a, b)
  return Comparison(len(seeds), t, statistics.paired_difference(a, b), statistics.sign_test(a, b),
                    int(sum(x > y for x, y in zip(a, b))), detectable,
                    statistics.verdict(t, claim=claim, detectable=detectable))


COMPARISON_HEAD = ["comparison", "seeds", "Δ [95% t]", "Δ [95% bootstrap]", "sign test p",
                   "detectable Δ", "verdict"]


def comparison_row(label: str, c: Comparison) -> str:
  if c.t is None:
    cells = [label, str(c.n), "—", "—", "—", "—", "not decided (< 2 seeds)"]
  else:
    cells = [label, str(c.n), _signed(c.t), _signed(c.bootstrap),
             f"{c.sign_p:.3g} ({c.wins} of {c.n} higher)", f"±{100 * c.detectable:.1f}",
             c.verdict.format(100)]
  return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[str]) -> str:
  return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + rows)


def method_table(results: dict, seeds, rows, keys) -> str:
  """Rows of (label, method): the mean [95% t interval] over seeds of each pass@1 key."""
  out = []
  for label, method in (("base", "base"),) + tuple(rows):
    cells = [cell_of(method, s) for s in seeds]
    means = [_mean(_values(results, cells, f"{k}/pass@1")) for k in keys]
    n = len(_values(results, cells, f"{keys[0]}/pass@1"))
    if n:
      out.append("| " + " | ".join([label, str(n)] + means) + " |")
  return _table(["method", "seeds"] + [f"{k} pass@1" for k in keys], out)


def comparison_table(results: dict, seeds, pairs, key: str) -> str:
  """pairs: (label, cell of a seed, baseline cell of a seed, claimed sign of the difference)."""
  out = []
  for label, cell, baseline, claim in pairs:
    values = _values(results, [cell(s) for s in seeds], key)
    if values:
      out.append(comparison_row(label, compare(
          values, _values(results, [baseline(s) for s in seeds], key), claim)))
  return _table(COMPARISON_HEAD, out)


def vs_dypo(rows) -> list[tuple]:
  """Each row against DYPO, with the paper's claim that DYPO is higher (CLAIMS_VS_DYPO: rows
  the paper says nothing about)."""
  return [(f"{label} − DYPO", lambda s, m=m: cell_of(m, s), lambda s: Cell("dypo", s),
           CLAIMS_VS_DYPO.get(m, CLAIM_BELOW_DYPO))
          for label, m in (("base", "base"),) + tuple(rows) if m != "dypo"]


def ladder_steps() -> list[tuple]:
  """Each rung of Table 3 against the rung below, with the paper's claim that it adds; then the
  control: cutting γ alone (no direction claimed), and GAL at the old scale against the control,
  the old "+ GAL" step at an equal SFT share (the paper's claim: GAL adds)."""
  steps = [(f"{label} − {prev_label}", lambda s, m=m: cell_of(m, s),
            lambda s, p=p: cell_of(p, s), 1)
           for (prev_label, p), (label, m) in zip(TABLE3, TABLE3[1:])]
  grading, control, legacy = "ladder_grading", CONTROL, LEGACY_DYPO
  return steps + [
      (f"γ = {CONTROL_GAMMA} − γ = 1 (+ dynamic grading)", lambda s: cell_of(control, s),
       lambda s: cell_of(grading, s), 0),
      ("+ GAL at the old scale − the γ control", lambda s: cell_of(legacy, s),
       lambda s: cell_of(control, s), 1)]


def budget_table(results: dict, seeds, methods) -> str:
  """Per method, per cell (mean over seeds, min–max when seeds differ): updates logged of the
  run's updates, rollout rounds, rollouts, sampled tokens, update tokens."""
  keys = ("rounds", "rollouts", "rollout_tokens", "update_tokens")
  out = []
  for method in methods:
    budgets = [results[c.name]["budget"] for c in (cell_of(method, s) for s in seeds)
               if c.name in results and results[c.name].get("budget")]
    if not budgets:
      continue
    def cell(key):
      v = [b[key] for b in budgets]
      if any(x is None for x in v):
        return "—"
      lo, hi = min(v), max(v)
      return f"{lo:,}" if lo == hi else f"{np.mean(v):,.0f} ({lo:,}–{hi:,})"
    logged = [f"{b['updates']}/{b['num_steps']}" for b in budgets]
    out.append("| " + " | ".join([method, str(len(budgets)), ", ".join(sorted(set(logged)))]
                                 + [cell(k) for k in keys]) + " |")
  return _table(["method", "cells", "updates logged", "rollout rounds", "rollouts",
                 "sampled tokens", "update tokens"], out)


def per_seed_table(results: dict, seeds, methods, key: str) -> str:
  out = []
  for method in ("base",) + tuple(methods):
    values = _values(results, [cell_of(method, s) for s in seeds], key)
    if values:
      out.append("| " + " | ".join([method] + [f"{100 * values[s]:.1f}" if s in values else "—"
                                               for s in seeds]) + " |")
  return _table(["method"] + [f"seed {s}" for s in seeds], out)


def ood_table(results: dict, seeds, methods) -> str:
  """Every OOD set apart, base and each method: mean [95% t] over seeds."""
  distance = {**{s: "near" for s in NEAR_OOD}, **{s: "mid" for s in MID_OOD},
              **{s: "far" for s in FAR_OOD}}
  out = []
  for method in ("base",) + tuple(methods):
    cells = [cell_of(method, s) for s in seeds]
    row = [_mean(_values(results, cells, f"ood/{s}/pass@1")) for s in OOD_SETS]
    if any(v != "—" for v in row):
      out.append("| " + " | ".join([method] + row) + " |")
  return _table(["method"] + [f"{s} ({distance[s]})" for s in OOD_SETS], out)


def grid_table(results: dict, seeds, key: str) -> str:
  """α rows x β columns of `key`: mean [95% t]; then each cell's paired comparison to the
  default (α = 0.5, β = 1), and the length-averaged GAL's. The paper claims no direction here
  (the method is robust to α and β), so a decided difference is one either way."""
  lines = ["| α \\ β_GAL | " + " | ".join(str(b) for b in BETAS) + " |", "|---|" + "---|" * 3]
  for a in ALPHAS:
    row = [_mean(_values(results, [Cell("dypo", s, grid_setting(a, b)) for s in seeds], key))
           for b in BETAS]
    lines.append(f"| {a} | " + " | ".join(row) + " |")
  default = lambda s: Cell("dypo", s)
  pairs = [(f"α = {a}, β = {b} − default", lambda s, a=a, b=b: Cell("dypo", s, grid_setting(a, b)),
            default, 0) for a in ALPHAS for b in BETAS
           if (a, b) != (DEFAULT_ALPHA, DEFAULT_BETA)]
  pairs.append(("Δ length-averaged − Δ summed (default α, β)", lambda s: Cell(
      "dypo", s, grid_setting(DEFAULT_ALPHA, DEFAULT_BETA, "mean")), default, 0))
  return "\n".join(lines) + "\n\n" + comparison_table(results, seeds, pairs, key)


def _evals_by_method(results: dict, seeds, method: str) -> list[list[dict]]:
  runs = [(results.get(cell_of(method, s).name) or {}).get("evals") for s in seeds]
  return [r for r in runs if r]


def curves_plot(results: dict, seeds, methods, out: str) -> None:
  """ID accuracy against updates: the mean over seeds and the band of seed minimum to maximum."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("id/pass@1", "ood_near/pass@1")):
    for method in methods:
      runs = _evals_by_method(results, seeds, method)
      if not runs:
        continue
      steps = sorted(set.intersection(*[{e["step"] for e in r} for r in runs]))
      ys = np.array([[next(e[key] for e in r if e["step"] == st) for st in steps] for r in runs])
      line, = ax.plot(steps, 100 * ys.mean(0), marker="o", label=f"{method} (n={len(runs)})")
      ax.fill_between(steps, 100 * ys.min(0), 100 * ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel("update")
    ax.set_ylabel(f"{key} (%)")
    ax.set_title(f"{key}: mean over seeds, band = seed min..max")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def grad_norm_plot(results: dict, seeds, out: str) -> None:
  """The paper's Figure 5 in small: GRPO's gradient norm against DYPO's over training."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, color in (("grpo", "tab:red"), ("dypo", "tab:blue")):
    for i, seed in enumerate(seeds):
      series = (results.get(Cell(method, seed).name) or {}).get("grad_norm")
      if not series:
        continue
      ax.plot([p[0] for p in series], [p[1] for p in series], color=color, alpha=0.7,
              label=method.upper() if i == 0 else None)
  ax.set(xlabel="update", ylabel="gradient norm (before clipping)", yscale="log",
         title="Gradient norm over training (paper Fig. 5, in small)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def provenance(results: dict) -> str:
  """Which commits the cells ran at, and how many from a dirty tree."""
  by_commit = {}
  for rec in results.values():
    key = (rec.get("commit") or "unknown", rec.get("dirty"))
    by_commit[key] = by_commit.get(key, 0) + 1
  parts = [f"{commit[:12]} ({'dirty tree' if dirty else 'clean' if dirty is False else 'tree ?'}"
           f"): {n} cells" for (commit, dirty), n in sorted(by_commit.items(), key=str)]
  mixed = len({c for c, _ in by_commit}) > 1 or any(d is not False for _, d in by_commit)
  return ("Commits: " + "; ".join(parts)
          + (". **Not one clean commit: the cells do not come from one code.**" if mixed else "."))


def _seeds_of(results: dict) -> list[int]:
  return sorted({rec["seed"] for rec in results.values()})


def report(results: dict, seeds=None, methods=COMPARE) -> str:
  """The study's tables (markdown) from cell records: {cell name: record}."""
  seeds = _seeds_of(results) if seeds is None else list(seeds)
  ood = ("ood_near", "ood_mid", "ood_far")
  walls = {name: rec["wall_s"] for name, rec in results.items() if rec.get("wall_s") is not None}
  bases = [w for name, w in walls.items() if results[name]["method"] == "base"]
  runs = [w for name, w in walls.items() if results[name]["method"] != "base"]
  cost = f"{len(walls)} cells done, {sum(walls.values()) / 60:.1f} min in all" + (
      f"; a base {np.mean(bases):.0f} s" if bases else "") + (
      f"; a method cell {np.mean(runs):.0f} s (mean)" if runs else "")
  done = lambda c: c.name in results
  # Each part over the seeds it completed, so the grid (3 seeds) never mixes with compare's 8.
  compare_seeds = [s for s in seeds if done(Cell("dypo", s))]
  grid_seeds = [s for s in seeds if all(done(c) for c in cells_of("grid", [s], methods))]
  steps = sorted({rec.get("steps") for rec in results.values()
                  if rec["method"] != "base" and rec.get("steps") is not None})
  text = [
      provenance(results),
      "",
      f"Seeds: {seeds}; {', '.join(map(str, steps)) or '?'} updates per cell. pass@1 in %, mean "
      "over seeds [95% Student-t interval over seeds]. A comparison is the paired difference "
      "over seeds (same seed, same base, same prompt stream) with its 95% t interval, the "
      "percentile bootstrap beside it (narrower than it should be at few seeds: a second "
      "column, never the call), the exact two-sided sign-test p (ties dropped), the minimum "
      "detectable difference at the observed paired spread (two-sided α = 0.05, power 0.8), and "
      "the verdict against the paper's claim: decided (the t interval excludes 0, with the sign "
      "of the effect), not decided, or reversed (it excludes 0 on the side opposite the claim). "
      "ood_near / ood_mid / ood_far: the OOD sets of each distance pooled (near: "
      f"{', '.join(NEAR_OOD)}; mid: {', '.join(MID_OOD)}; far: {', '.join(FAR_OOD)}).",
      "", f"Table 1 (in small), seeds {compare_seeds}", "",
      method_table(results, compare_seeds, TABLE1, ("id",) + ood),
      "", "Table 1 claims, ID pass@1 (the paper: DYPO above every baseline)", "",
      comparison_table(results, compare_seeds, vs_dypo(TABLE1), "id/pass@1"),
      "", "Table 1 claims, near-OOD pass@1", "",
      comparison_table(results, compare_seeds, vs_dypo(TABLE1), "ood_near/pass@1"),
      "", f"Table 3 ladder (in small), seeds {compare_seeds}", "",
      method_table(results, compare_seeds, TABLE3 + TABLE3_CONTROL, ("id",) + ood),
      "", "Table 3 claims, ID pass@1 (the paper: each rung adds to the one below; the control "
      f"is `ladder_grading` with γ = {CONTROL_GAMMA}, the SFT share of the RL terms' weight "
      "in the old-scale DYPO)", "",
      comparison_table(results, compare_seeds, ladder_steps(), "id/pass@1"),
      "", "Table 3 claims, near-OOD pass@1", "",
      comparison_table(results, compare_seeds, ladder_steps(), "ood_near/pass@1"),
      "", "Budget per cell: rollout rounds, rollouts (groups x k), sampled tokens and update "
      "tokens, summed over the logged updates (from each cell's metrics.jsonl)", "",
      budget_table(results, compare_seeds, COMPARE),
      "", f"OOD sets, one by one, seeds {compare_seeds}", "",
      ood_table(results, compare_seeds, [m for _, m in TABLE1]),
      "", "Per-seed ID pass@1 (the values every interval above is computed from)", "",
      per_seed_table(results, compare_seeds, [m for m in COMPARE if m in methods], "id/pass@1"),
  ]
  if grid_seeds:
    text += [
        "", f"Sensitivity grid (paper Table 5), ID pass@1, seeds {grid_seeds}", "",
        grid_table(results, grid_seeds, "id/pass@1"),
        "", f"Sensitivity grid, near-OOD pass@1, seeds {grid_seeds}", "",
        grid_table(results, grid_seeds, "ood_near/pass@1")]
  text += [
      "", f"Cost on the machines that ran the cells: {cost}.",
  ]
  return "\n".join(text) + "\n"


def write_doc(path: str, tables: str) -> None:
  """Puts `tables` between the DOC_BEGIN and DOC_END markers of `path` (the prose around them
  stays), or writes a new document of the tables alone."""
  block = f"{DOC_BEGIN}\n{tables}{DOC_END}"
  if not os.path.exists(path):
    with open(path, "w") as f:
      f.write(block + "\n")
    return
  with open(path) as f:
    text = f.read()
  begin, end = text.find(DOC_BEGIN), text.find(DOC_END)
  if begin < 0 or end < begin:
    raise SystemExit(f"--doc={path}: no '{DOC_BEGIN}' ... '{DOC_END}' markers; add them where "
                     "the tables go, or name a new file")
  with open(path, "w") as f:
    f.write(text[:begin] + block + text[end + len(DOC_END):])


# ------------------------------------------------------------------------------------ verify

PASS_KEYS = ("id/pass@1",) + tuple(f"ood/{s}/pass@1" for s in OOD_SETS)


def cheapest_cell(results: dict) -> str:
  runs = {n: r["wall_s"] for n, r in results.items()
          if r["method"] != "base" and r.get("wall_s") is not None}
  if not runs:
    raise SystemExit("--verify: no recorded method cell to rerun")
  return min(runs, key=runs.get)


def verify_differences(recorded: dict, rerun: dict, tol: float) -> list[str]:
  """What of `rerun` is outside `tol` of `recorded` (final pass@1 figures), differs from its
  budget at all, or logged another training loss; empty when it reproduces."""
  bad = []
  want, got = recorded.get("final") or {}, rerun.get("final") or {}
  for key in PASS_KEYS:
    if key not in want:
      continue
    if key not in got:
      bad.append(f"{key}: recorded {want[key]:.4f}, the rerun logged none")
    elif not abs(got[key] - want[key]) <= tol:
      bad.append(f"{key}: recorded {want[key]:.4f}, rerun {got[key]:.4f} "
                 f"(|Δ| {abs(got[key] - want[key]):.4f} > {tol})")
  for key in ("rounds", "rollouts", "update_tokens"):
    a, b = (recorded.get("budget") or {}).get(key), (rerun.get("budget") or {}).get(key)
    if a is not None and a != b:
      bad.append(f"budget {key}: recorded {a}, rerun {b}")
  # The training loss of every logged update: a cell whose pass@1 is 0 everywhere still shows
  # whether the rerun computed the same updates (relative 1e-3: rounding, not another run).
  got_loss = dict((step, v) for step, v in rerun.get("loss") or [])
  for step, want_v in recorded.get("loss") or []:
    if step not in got_loss or not math.isclose(got_loss[step], want_v, rel_tol=1e-3,
                                                 abs_tol=1e-6):
      bad.append(f"loss/total at update {step}: recorded {want_v:.6g}, rerun "
                 f"{got_loss.get(step, math.nan):.6g}")
      break  # The first update that differs; the later ones follow from it.
  return bad


def verify(study: Study, results: dict, name: str, tol: float) -> int:
  """Reruns recorded cell `name` from its seed's base in `<workdir>/verify/`; 0 when it
  reproduces, 1 when not (each difference printed)."""
  if name not in results:
    raise SystemExit(f"--verify={name}: no such recorded cell; recorded: {sorted(results)}")
  rec = results[name]
  cell = Cell(rec["method"], rec["seed"], tuple(tuple(kv) for kv in rec["setting"]))
  if cell.method == "base":
    raise SystemExit(f"--verify={name}: a base is not a cheap cell; name a method cell")
  # A cell recorded before cell.json named its size and steps: this command's --size, --steps.
  rerun = Study(study.workdir, size=study.size if rec.get("size") is None else rec["size"],
                steps=study.steps if rec.get("steps") is None else rec["steps"])
  if not rerun.done(Cell("base", cell.seed)):
    raise SystemExit(f"--verify={name}: no base model of seed {cell.seed} in {study.workdir}; "
                     "run the seed's base there first")
  recorded_o, now_o = rec.get("overrides") or {}, {
      k: _cli_value(v) for k, v in rerun.overrides(cell).items()}
  paths = ("model.hf_path", "tokenizer.path")
  changed = sorted(k for k in set(recorded_o) | set(now_o)
                   if k not in paths and recorded_o.get(k) != now_o.get(k))
  if recorded_o and changed:
    print(f"verify: the study's overrides changed since the cell ran: {changed}")
  out = os.path.join(study.workdir, "verify", cell.name)
  shutil.rmtree(out, ignore_errors=True)  # A fresh run, never a resume of an older verify.
  state = git_state()
  print(f"verify: rerunning {name} (recorded at {str(rec.get('commit'))[:12]}, now at "
        f"{state['commit'][:12]}{' dirty' if state['dirty'] else ''}) into {out}", flush=True)
  wall = rerun.run(cell, out)
  bad = verify_differences(rec, rerun.record(cell, out), tol)
  for key in PASS_KEYS:
    if key in (rec.get("final") or {}):
      got = (rerun.record(cell, out)["final"] or {}).get(key, math.nan)
      print(f"  {key}: recorded {rec['final'][key]:.4f}, rerun {got:.4f}")
  print(f"verify: {name} {'reproduces' if not bad else 'does NOT reproduce'} "
        f"(tolerance {tol} on pass@1, budget exact; {wall:.0f} s)")
  for line in bad:
    print("  " + line)
  return 1 if bad else 0


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", default=None, help="the cells' directory (not with --results)")
  ap.add_argument("--part", choices=("compare", "grid"), action="append", default=None,
                  help="what to run (repeatable); none with --report")
  ap.add_argument("--seeds", default=None,
                  help=f"comma-separated (default {DEFAULT_SEEDS} to run; to report, every seed "
                  "found)")
  ap.add_argument("--methods", default=",".join(COMPARE),
                  help="for --part=compare: methods and VARIANTS keys (the old-scale DYPO, the "
                  "ladder's γ control)")
  ap.add_argument("--size", default="", choices=("", "quick"))
  ap.add_argument("--steps", type=int, default=UPDATES, help="updates per cell")
  ap.add_argument("--shard", default="0/1", help="i/n: this machine runs seed positions i mod n")
  ap.add_argument("--report", action="store_true", help="only write the report")
  ap.add_argument("--results", default=None,
                  help="report from this results file (a study.json) instead of a workdir")
  ap.add_argument("--doc", default=None,
                  help="also write the tables between the markers of this document")
  ap.add_argument("--verify", nargs="?", const="", default=None, metavar="CELL",
                  help="rerun one recorded cell (default: the cheapest) and compare")
  ap.add_argument("--verify_tol", type=float, default=0.005,
                  help="--verify: the largest |Δ| of a final pass@1 figure that reproduces")
  ap.add_argument("--list", action="store_true", help="list the cells and whether each is done")
  args = ap.parse_args()
  seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",") if s]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in COMPARE:
      raise SystemExit(f"--methods: unknown method {m!r}; allowed: {COMPARE}")
  if args.results and not (args.verify is not None or args.report or args.doc):
    args.report = True
  if args.workdir is None and (args.results is None or args.verify is not None or args.part):
    raise SystemExit("--workdir is required (only a report from --results=FILE goes without)")
  if args.results and args.part:
    raise SystemExit("--results reports from a file; running cells (--part) needs a workdir")
  command = "python experiments/study.py " + " ".join(sys.argv[1:])
  if args.results and args.verify is None:  # The tables from a results file, nothing else.
    results = load_results(args.results)
    text = report(results, seeds, methods)
    if args.doc:
      write_doc(args.doc, text)
    print(text)
    return
  try:
    shard, shards = (int(v) for v in args.shard.split("/"))
    assert 0 <= shard < shards
  except (ValueError, AssertionError):
    raise SystemExit(f"--shard={args.shard!r}: want i/n with 0 <= i < n") from None
  study = Study(args.workdir, size=args.size, steps=args.steps)
  if seeds is None:
    seeds = list(DEFAULT_SEEDS) if args.part else study.seeds_found()
  if args.verify is not None:
    results = load_results(args.results) if args.results else collect(study, seeds, methods)
    sys.exit(verify(study, results, args.verify or cheapest_cell(results), args.verify_tol))
  mine = [s for i, s in enumerate(seeds) if i % shards == shard]
  todo = []
  for part in args.part or ():
    for cell in cells_of(part, mine, methods):
      if cell not in todo:
        todo.append(cell)
  if args.list:
    for cell in todo or cells_of("compare", seeds, methods) + cells_of("grid", seeds, methods):
      print(f"{cell.name:40s} {'done' if study.done(cell) else '-'}")
    return
  if not args.report:
    for i, cell in enumerate(todo):
      if study.done(cell):
        print(f"[{i + 1}/{len(todo)}] {cell.name}: done, skipped", flush=True)
        continue
      wall = study.run(cell)
      print(f"[{i + 1}/{len(todo)}] {cell.name}: {wall:.0f} s on this machine", flush=True)
  os.makedirs(args.workdir, exist_ok=True)
  results = collect(study, seeds, methods)
  save_results(os.path.join(args.workdir, "study.json"), results, command)
  text = report(results, seeds, methods)
  with open(os.path.join(args.workdir, "study.md"), "w") as f:
    f.write(f"Command: {command}\n\n" + text)
  if args.doc:
    write_doc(args.doc, text)
  curves_plot(results, seeds, [m for m in COMPARE if m in methods],
              os.path.join(args.workdir, "curves.png"))
  grad_norm_plot(results, seeds, os.path.join(args.workdir, "grad_norm.png"))
  print(text)


if __name__ == "__main__":
  main()

r"""The paper's claims in small, with power: paired seeds, bootstrap intervals, the α/β grid.

  python experiments/study.py --workdir=/tmp/study --part=compare --seeds=0,1,2,3,4
  python experiments/study.py --workdir=/tmp/study --part=grid --seeds=0,1,2
  python experiments/study.py --workdir=/tmp/study --report          # tables and plots only
  python experiments/study.py --workdir=/tmp/study --part=compare --shard=1/2   # machine 1 of 2
  python experiments/study.py --workdir=/tmp/sq --size=quick --seeds=0 --steps=2   # a smoke run

The study runs cell by cell. A cell is one `python -m dypo_jax.main` run (method x seed x
setting) in its own directory under --workdir; it is done when it wrote `cell.json` (its command
and wall time), skipped then, and resumed from its last checkpoint when it was interrupted. Per
seed: one base model (teacher SFT to the accuracy gate of experiments/cpu_tiny.py), then every
cell of that seed starts from it: same tokenizer, training pool, teacher traces and prompt
stream. Every method gets the same rollout budget: one rollout round of 16 prompts x 8 samples per
update (`train.max_rollouts_per_update=1`), so round r of every method samples the same prompts,
and the same number of updates. `--shard=i/n` takes the seeds whose position in --seeds is i mod
n, so machines never share a base; copy the cell directories into one workdir to report.

Parts:
  compare  the methods of experiments/baselines.py (Table 1 and the Table 3 ladder);
  grid     DYPO over α in {0.2, 0.5, 0.8} x β_GAL in {0.1, 1, 2} (the paper's Table 5), and GAL
           with Δ length-averaged at the default (α = 0.5, β = 1; DYPO.md §2 chose the sum).
Evaluation: 500 held-out ID prompts x 8 samples, and 100 prompts x 8 of each OOD set (near, mid
and far from training: data/tasks.py), every 50 updates. `--report` (and every run's end) writes `study.md`,
`study.json`, `curves.png` and `grad_norm.png` from the cells that are done: per cell the mean
over seeds with a 95% bootstrap interval, per method its paired difference to DYPO.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _REPO)
from dypo_jax.evaluation import statistics  # noqa: E402  pylint: disable=g-import-not-at-top

METHODS = ("sft", "grpo", "sft_then_rl", "luffy", "ladder_rl", "ladder_grading", "dypo")
TABLE1 = (("SFT", "sft"), ("RL (GRPO)", "grpo"), ("SFT → RL", "sft_then_rl"),
          ("LUFFY-style", "luffy"), ("DYPO", "dypo"))
TABLE3 = (("multi-teacher SFT", "sft"), ("+ RL", "ladder_rl"),
          ("+ dynamic grading", "ladder_grading"), ("+ GAL (= DYPO)", "dypo"))
ALPHAS, BETAS = (0.2, 0.5, 0.8), (0.1, 1.0, 2.0)
DEFAULT_ALPHA, DEFAULT_BETA = 0.5, 1.0
# OOD sets by distance from training (data/tasks.py); the study's bases (5 seeds) solve the near
# ones at 17% and 27%, the mid ones at 3% and 0.1%, the far ones at under 1%.
NEAR_OOD, MID_OOD, FAR_OOD = (("add_zero", "add_space_eq"), ("add_5x1", "add_100s"),
                              ("add_long", "add_3digit"))
OOD_SETS = NEAR_OOD + MID_OOD + FAR_OOD
UPDATES = 100

# What every cell of the study shares beyond experiments/cpu_tiny.py (its base included).
STUDY_OVERRIDES = {
    "data.num_eval_id": 500, "data.num_eval_ood": 100 * len(OOD_SETS),
    "data.ood_tasks": repr(OOD_SETS),
    "eval.num_samples": 8, "eval.max_prompts": 100 * len(OOD_SETS),
    "train.max_rollouts_per_update": 1,  # The same rollout budget for every method.
    "train.max_empty_updates": UPDATES,  # A round that queues nothing is one empty update.
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
    short = {"rl.alpha": "a", "rl.beta_gal": "b", "rl.gal_length_norm": "gal_"}
    tags = "".join(f"_{short[k]}{v}" for k, v in self.setting)
    return f"seed{self.seed}/{self.method}{tags}"


def grid_setting(alpha: float, beta: float, norm: str = "sum") -> tuple:
  """The overrides of a grid cell; the default (α, β, sum) is the compare part's DYPO cell."""
  if (alpha, beta, norm) == (DEFAULT_ALPHA, DEFAULT_BETA, "sum"):
    return ()
  setting = (("rl.alpha", alpha), ("rl.beta_gal", beta))
  return setting + ((("rl.gal_length_norm", norm),) if norm != "sum" else ())


def cells_of(part: str, seeds, methods) -> list[Cell]:
  out = []
  for seed in seeds:
    out.append(Cell("base", seed))
    if part == "compare":
      out += [Cell(m, seed) for m in methods]
    elif part == "grid":
      out += [Cell("dypo", seed, grid_setting(a, b)) for a in ALPHAS for b in BETAS]
      out.append(Cell("dypo", seed, grid_setting(DEFAULT_ALPHA, DEFAULT_BETA, "mean")))
  return out


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Study:
  """Runs and reads the cells under one workdir."""

  def __init__(self, workdir: str, *, size: str, steps: int):
    self.workdir, self.size, self.steps = workdir, size, steps

  def dir(self, cell: Cell) -> str:
    return os.path.join(self.workdir, cell.name)

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
    o.update(dict(cell.setting))
    return o

  def command(self, cell: Cell) -> list[str]:
    size = f",{self.size}" if self.size else ""
    config = (f"experiments/cpu_tiny.py{':' + self.size if self.size else ''}"
              if cell.method == "base" else f"experiments/baselines.py:{cell.method}{size}")
    return ([sys.executable, "-m", "dypo_jax.main", f"--config={config}",
             f"--workdir={self.dir(cell)}"]
            + [f"--config.{k}={v}" for k, v in self.overrides(cell).items()])

  def run(self, cell: Cell) -> float:
    """Runs (or resumes) a cell; returns its wall time. Raises naming the log on failure."""
    os.makedirs(self.dir(cell), exist_ok=True)
    cmd = self.command(cell)
    log_path = os.path.join(self.dir(cell), "log.txt")
    start = time.perf_counter()
    with open(log_path, "a") as log:
      rc = subprocess.run(cmd, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - start
    if rc:
      raise RuntimeError(f"cell {cell.name} failed (exit status {rc}); its log: {log_path}")
    with open(os.path.join(self.dir(cell), "cell.json"), "w") as f:
      json.dump({"cell": cell.name, "wall_s": wall, "command": cmd}, f, indent=1)
    return wall

  def evals(self, cell: Cell) -> list[dict]:
    """The cell's evaluations, each with the near and far OOD sets pooled (equal-sized sets)."""
    path = os.path.join(self.dir(cell), "eval.jsonl")
    records = _read_jsonl(path) if self.done(cell) and os.path.exists(path) else []
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


# ------------------------------------------------------------------------------------ report


def _values(study: Study, cells: list[Cell], key: str) -> dict[int, float]:
  """{seed: final value of `key`} over the cells that are done and logged it."""
  out = {}
  for c in cells:
    rec = study.final(c)
    if rec is not None and key in rec:
      out[c.seed] = rec[key]
  return out


def _interval(values: dict[int, float]) -> str:
  if not values:
    return "—"
  return statistics.bootstrap_mean(list(values.values())).format(100)


def _paired(values: dict[int, float], baseline: dict[int, float]) -> str:
  seeds = sorted(set(values) & set(baseline))
  if len(seeds) < 2:
    return "—"
  iv = statistics.paired_difference([values[s] for s in seeds], [baseline[s] for s in seeds])
  return iv.format(100) + (" *" if iv.excludes_zero() else "")


def method_table(study: Study, seeds, rows, ood_keys) -> str:
  """Rows of (label, method): ID and OOD mean [95% CI] and the paired difference to DYPO."""
  head = ["method", "ID pass@1", "Δ ID vs DYPO (paired)"] + [f"{k} pass@1" for k in ood_keys]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  dypo = _values(study, [Cell("dypo", s) for s in seeds], "id/pass@1")
  for label, method in (("base", "base"),) + tuple(rows):
    cells = [Cell(method, s) for s in seeds]
    ids = _values(study, cells, "id/pass@1")
    if not ids:
      continue
    diff = "" if method == "dypo" else _paired(ids, dypo)
    oods = [_interval(_values(study, cells, f"{k}/pass@1")) for k in ood_keys]
    lines.append("| " + " | ".join([label, _interval(ids), diff] + oods) + " |")
  return "\n".join(lines)


def ood_table(study: Study, seeds, methods) -> str:
  """Every OOD set apart, base and each method: mean [95% CI] over seeds."""
  sets = [f"ood/{s}" for s in OOD_SETS]
  distance = {**{s: "near" for s in NEAR_OOD}, **{s: "mid" for s in MID_OOD},
              **{s: "far" for s in FAR_OOD}}
  head = ["method"] + [f"{s.split('/')[1]} ({distance[s.split('/')[1]]})" for s in sets]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method in ("base",) + tuple(methods):
    cells = [Cell(method, s) for s in seeds]
    row = [_interval(_values(study, cells, f"{s}/pass@1")) for s in sets]
    if any(v != "—" for v in row):
      lines.append("| " + " | ".join([method] + row) + " |")
  return "\n".join(lines)


def grid_table(study: Study, seeds, key: str) -> str:
  """α rows x β columns of `key`: mean [95% CI], then each cell's paired difference to the
  default (α = 0.5, β = 1), and the length-averaged GAL at the default."""
  default = _values(study, [Cell("dypo", s) for s in seeds], key)
  lines = []
  for title, cell_text in (("mean [95% CI]", _interval),
                           ("paired difference to the default cell", lambda v: _paired(v, default))):
    lines += ([title, "", "| α \\ β_GAL | " + " | ".join(str(b) for b in BETAS) + " |",
               "|---|" + "---|" * 3])
    for a in ALPHAS:
      row = [cell_text(_values(study, [Cell("dypo", s, grid_setting(a, b)) for s in seeds], key))
             if (a, b) != (DEFAULT_ALPHA, DEFAULT_BETA) or cell_text is _interval else "(default)"
             for b in BETAS]
      lines.append(f"| {a} | " + " | ".join(row) + " |")
    lines.append("")
  mean = _values(study, [Cell("dypo", s, grid_setting(DEFAULT_ALPHA, DEFAULT_BETA, "mean"))
                         for s in seeds], key)
  lines.append(f"GAL with Δ length-averaged at α = {DEFAULT_ALPHA}, β = {DEFAULT_BETA}: "
               f"{_interval(mean)}; paired difference to Δ summed: {_paired(mean, default)}")
  return "\n".join(lines)


def curves_plot(study: Study, seeds, methods, out: str) -> None:
  """ID accuracy against updates: the mean over seeds and the band of seed minimum to maximum."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ("id/pass@1", "ood_near/pass@1")):
    for method in methods:
      runs = [study.evals(Cell(method, s)) for s in seeds]
      runs = [r for r in runs if r]
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


def grad_norm_plot(study: Study, seeds, out: str) -> None:
  """The paper's Figure 5 in small: GRPO's gradient norm against DYPO's over training."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, color in (("grpo", "tab:red"), ("dypo", "tab:blue")):
    for i, seed in enumerate(seeds):
      path = os.path.join(study.dir(Cell(method, seed)), "metrics.jsonl")
      if not os.path.exists(path):
        continue
      recs = [r for r in _read_jsonl(path) if "grad/norm" in r]
      ax.plot([r["step"] for r in recs], [r["grad/norm"] for r in recs], color=color, alpha=0.7,
              label=method.upper() if i == 0 else None)
  ax.set(xlabel="update", ylabel="gradient norm (before clipping)", yscale="log",
         title="Gradient norm over training (paper Fig. 5, in small)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def report(study: Study, seeds, methods) -> str:
  ood = ("ood_near", "ood_mid", "ood_far")
  every = {c for part in ("compare", "grid") for c in cells_of(part, seeds, methods)}
  walls = {c: study.wall_s(c) for c in every if study.done(c)}
  bases = [w for c, w in walls.items() if c.method == "base"]
  runs = [w for c, w in walls.items() if c.method != "base"]
  cost = f"{len(walls)} cells done, {sum(walls.values()) / 60:.1f} min in all" + (
      f"; a base {np.mean(bases):.0f} s" if bases else "") + (
      f"; a method cell {np.mean(runs):.0f} s (mean)" if runs else "")
  # Each part over the seeds it completed, so the grid (3 seeds) never mixes with compare's 5.
  compare_seeds = [s for s in seeds if study.done(Cell("dypo", s))]
  grid_seeds = [s for s in seeds
                if all(study.done(c) for c in cells_of("grid", [s], methods))]
  text = [
      f"Seeds asked: {list(seeds)}; {study.steps} updates per cell. pass@1 in %, mean over seeds "
      "[95% percentile-bootstrap interval over seeds; with 5 seeds such an interval is narrower "
      "than a t interval]. Δ vs DYPO: the paired difference (same seed, same base, same prompt "
      "stream), * where its interval excludes 0. ood_near / ood_mid / ood_far: the OOD sets of "
      f"each distance pooled (near: {', '.join(NEAR_OOD)}; mid: {', '.join(MID_OOD)}; far: "
      f"{', '.join(FAR_OOD)}).",
      "", f"Table 1 (in small), seeds {compare_seeds}", "",
      method_table(study, compare_seeds, TABLE1, ood),
      "", f"Table 3 ladder (in small), seeds {compare_seeds}", "",
      method_table(study, compare_seeds, TABLE3, ood),
      "", f"OOD sets, one by one, seeds {compare_seeds}", "",
      ood_table(study, compare_seeds, [m for _, m in TABLE1]),
      "", f"Sensitivity grid (paper Table 5), ID pass@1, seeds {grid_seeds}", "",
      grid_table(study, grid_seeds, "id/pass@1"),
      "", f"Sensitivity grid, near-OOD pass@1, seeds {grid_seeds}", "",
      grid_table(study, grid_seeds, "ood_near/pass@1"),
      "", f"Cost on this machine: {cost}.",
  ]
  return "\n".join(text) + "\n"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--part", choices=("compare", "grid"), action="append", default=None,
                  help="what to run (repeatable); none with --report")
  ap.add_argument("--seeds", default="0,1,2,3,4")
  ap.add_argument("--methods", default=",".join(METHODS), help="for --part=compare")
  ap.add_argument("--size", default="", choices=("", "quick"))
  ap.add_argument("--steps", type=int, default=UPDATES, help="updates per cell")
  ap.add_argument("--shard", default="0/1", help="i/n: this machine runs seed positions i mod n")
  ap.add_argument("--report", action="store_true", help="only write the report")
  ap.add_argument("--list", action="store_true", help="list the cells and whether each is done")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",") if s]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"--methods: unknown method {m!r}; allowed: {METHODS}")
  try:
    shard, shards = (int(v) for v in args.shard.split("/"))
    assert 0 <= shard < shards
  except (ValueError, AssertionError):
    raise SystemExit(f"--shard={args.shard!r}: want i/n with 0 <= i < n") from None
  study = Study(args.workdir, size=args.size, steps=args.steps)
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
  text = ("Command: python experiments/study.py " + " ".join(sys.argv[1:]) + "\n\n"
          + report(study, seeds, methods))
  with open(os.path.join(args.workdir, "study.md"), "w") as f:
    f.write(text)
  results = {c.name: study.final(c) for part in ("compare", "grid")
             for c in cells_of(part, seeds, methods) if study.done(c)}
  with open(os.path.join(args.workdir, "study.json"), "w") as f:
    json.dump(results, f, indent=1)
  curves_plot(study, seeds, [m for m in METHODS if m in methods],
              os.path.join(args.workdir, "curves.png"))
  grad_norm_plot(study, seeds, os.path.join(args.workdir, "grad_norm.png"))
  print(text)


if __name__ == "__main__":
  main()

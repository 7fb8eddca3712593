r"""The paper's comparison in small (METHOD.md §5, §8): every method from the same base, several seeds.

  python experiments/compare.py --workdir=/tmp/compare                      # 3 seeds, all methods
  python experiments/compare.py --workdir=/tmp/cq --size=quick --seeds=0    # a smoke run

Per seed: one base model (teacher SFT to the accuracy gate of experiments/cpu_tiny.py), then each
method of experiments/baselines.py starts from that base with the same tokenizer, the same fixed
training pool and teacher traces, and the same number of updates; it is evaluated at the end on
the held-out ID and OOD sets. Writes `compare.md` (Tables 1 and 3 of the paper in form: mean ±
spread over seeds), `compare.json`, and `grad_norm.png` (the paper's Figure 5: gradient norm of
GRPO against DYPO over training).
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
METHODS = ("sft", "grpo", "sft_then_rl", "luffy", "ladder_rl", "ladder_grading", "dypo")
TABLE1 = (("SFT", "sft"), ("RL (GRPO)", "grpo"), ("SFT → RL", "sft_then_rl"),
          ("LUFFY-style", "luffy"), ("DYPO", "dypo"))
TABLE3 = (("multi-teacher SFT", "sft"), ("+ RL", "ladder_rl"),
          ("+ dynamic grading", "ladder_grading"), ("+ GAL (= DYPO)", "dypo"))


def _main_cmd(config: str, workdir: str, overrides: dict) -> list[str]:
  cmd = [sys.executable, "-m", "dypo_jax.main", f"--config={config}", f"--workdir={workdir}"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  return cmd


def _run(cmd: list[str], log_path: str) -> None:
  print("+", " ".join(cmd), flush=True)
  with open(log_path, "w") as log:
    proc = subprocess.run(cmd, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT)
  if proc.returncode:
    raise RuntimeError(f"command failed (rc={proc.returncode}); see {log_path}")


def _read_jsonl(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_seed(seed: int, *, workdir: str, size: str, steps: int | None, methods) -> dict:
  """Base model then every method for one seed; returns {method: final eval record}."""
  seed_dir = os.path.join(workdir, f"seed{seed}")
  base_dir = os.path.join(seed_dir, "base")
  variant = f":{size}" if size else ""
  if not os.path.exists(os.path.join(base_dir, "base_model", "config.json")):
    os.makedirs(base_dir, exist_ok=True)
    _run(_main_cmd(f"experiments/cpu_tiny.py{variant}", base_dir,
                   {"seed": seed, "train.num_steps": 0, "train.eval_every": 1}),
         os.path.join(base_dir, "log.txt"))
  results = {"base": _read_jsonl(os.path.join(base_dir, "eval.jsonl"))[-1]}
  for method in methods:
    run_dir = os.path.join(seed_dir, method)
    eval_path = os.path.join(run_dir, "eval.jsonl")
    if not os.path.exists(os.path.join(run_dir, "final_table.json")):
      os.makedirs(run_dir, exist_ok=True)
      overrides = {
          "seed": seed, "model.init": "hf",
          "model.hf_path": os.path.join(base_dir, "base_model"),
          "tokenizer.path": os.path.join(base_dir, "tokenizer", "spm.model"),
          "pretrain.enabled": False,
      }
      if steps is not None:
        overrides["train.num_steps"] = steps
        overrides["train.eval_every"] = steps
        if method == "sft_then_rl":  # Keep the switch at half the (overridden) budget.
          overrides["rl.sft_then_rl_switch"] = steps // 2
      _run(_main_cmd(f"experiments/baselines.py:{method}{',' + size if size else ''}", run_dir,
                     overrides), os.path.join(run_dir, "log.txt"))
    results[method] = _read_jsonl(eval_path)[-1]
    results[method]["rollout_rounds"] = _rollout_rounds(run_dir)
  return results


def _rollout_rounds(run_dir: str) -> int:
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  return sum(1 for r in _read_jsonl(path) if "reward/binary" in r)


def _cell(values: list[float]) -> str:
  values = [100 * v for v in values]
  if len(values) == 1:
    return f"{values[0]:.1f}"
  return f"{np.mean(values):.1f} ± {np.std(values):.1f}"


def table(results: dict[int, dict], rows) -> str:
  lines = ["| method | ID pass@1 | OOD pass@1 |", "|---|---|---|"]
  base = [(r["base"].get("id/pass@1", 0), r["base"].get("ood/pass@1", 0)) for r in
          results.values()]
  lines.append(f"| base | {_cell([b[0] for b in base])} | {_cell([b[1] for b in base])} |")
  for label, method in rows:
    if not all(method in r for r in results.values()):
      continue
    ids = [r[method].get("id/pass@1", 0) for r in results.values()]
    oods = [r[method].get("ood/pass@1", 0) for r in results.values()]
    lines.append(f"| {label} | {_cell(ids)} | {_cell(oods)} |")
  return "\n".join(lines)


def grad_norm_plot(workdir: str, seeds, out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  for method, color in (("grpo", "tab:red"), ("dypo", "tab:blue")):
    for i, seed in enumerate(seeds):
      path = os.path.join(workdir, f"seed{seed}", method, "metrics.jsonl")
      if not os.path.exists(path):
        continue
      recs = [r for r in _read_jsonl(path) if "grad/norm" in r]
      ax.plot([r["step"] for r in recs], [r["grad/norm"] for r in recs], color=color,
              alpha=0.8, label=method.upper() if i == 0 else None)
  ax.set_xlabel("update step")
  ax.set_ylabel("gradient norm (before clipping)")
  ax.set_yscale("log")
  ax.set_title("Gradient norm over training (paper Fig. 5, in small)")
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--methods", default=",".join(METHODS))
  ap.add_argument("--size", default="", choices=("", "quick"))
  ap.add_argument("--steps", type=int, default=None, help="updates per method (default: config)")
  args = ap.parse_args()
  seeds = [int(s) for s in args.seeds.split(",")]
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"--methods: unknown method {m!r}; allowed: {METHODS}")
  os.makedirs(args.workdir, exist_ok=True)
  results = {s: run_seed(s, workdir=args.workdir, size=args.size, steps=args.steps,
                         methods=methods) for s in seeds}
  text = ("Command: python experiments/compare.py " + " ".join(sys.argv[1:]) + "\n\n"
          f"Seeds: {seeds}. pass@1 in %, mean ± std over seeds, at the eval temperature.\n\n"
          "Table 1 (in small)\n\n" + table(results, TABLE1) + "\n\nTable 3 ladder (in small)\n\n"
          + table(results, TABLE3) + "\n")
  with open(os.path.join(args.workdir, "compare.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.workdir, "compare.json"), "w") as f:
    json.dump({str(k): v for k, v in results.items()}, f, indent=1)
  grad_norm_plot(args.workdir, seeds, os.path.join(args.workdir, "grad_norm.png"))
  print(text)


if __name__ == "__main__":
  main()

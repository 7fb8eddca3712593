"""End-of-run report: PNG plots of the run and a table of base vs trained accuracy."""
import json
import os

from dypo_jax.io import metrics as metrics_lib


def final_table(eval_records: list[dict]) -> tuple[str, dict]:
  """Markdown table of the first eval (the starting model) against the last (the trained one)."""
  if not eval_records:
    return "no evaluation was run (train.eval_every = 0)", {}
  first, last = eval_records[0], eval_records[-1]
  keys = sorted(k for k in last if "/pass@" in k)
  rows = ["| metric | base (step %d) | trained (step %d) | change |" % (first["step"],
                                                                       last["step"]),
          "|---|---|---|---|"]
  table = {"base_step": first["step"], "trained_step": last["step"], "metrics": {}}
  for k in keys:
    base, trained = first.get(k), last[k]
    if base is None:
      continue
    rows.append(f"| {k} | {100 * base:.1f}% | {100 * trained:.1f}% | "
                f"{100 * (trained - base):+.1f} |")
    table["metrics"][k] = {"base": base, "trained": trained}
  return "\n".join(rows), table


def write_report(workdir: str) -> str:
  """Writes plots/ and final_table.{md,json} into workdir; returns the table as text."""
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  eval_path = os.path.join(workdir, "eval.jsonl")
  plots = []
  if os.path.exists(metrics_path):
    plots = metrics_lib.plot_run(metrics_path, os.path.join(workdir, "plots"),
                                 eval_path=eval_path if os.path.exists(eval_path) else None)
  evals = metrics_lib.read_jsonl(eval_path) if os.path.exists(eval_path) else []
  text, table = final_table(evals)
  with open(os.path.join(workdir, "final_table.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(workdir, "final_table.json"), "w") as f:
    json.dump(table, f, indent=1)
  return (f"report: {len(plots)} plots in {os.path.join(workdir, 'plots')}\n"
          f"final table (pass@k at the eval temperature; ID = held-out prompts of the training "
          f"tasks, OOD = harder settings and held-out families):\n{text}")

"""End-of-run report: PNG plots of the run and a table of base vs trained accuracy."""
import json

from dypo_jax.io import metrics as metrics_lib
from dypo_jax.io import paths


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
  """Writes plots/ and final_table.{md,json} into workdir; returns the table as text. A damaged
  log line is skipped with a warning naming it: the run's work is done by now."""
  metrics_path = paths.join(workdir, "metrics.jsonl")
  eval_path = paths.join(workdir, "eval.jsonl")
  plots = []
  if paths.exists(metrics_path):
    plots = metrics_lib.plot_run(metrics_path, paths.join(workdir, "plots"),
                                 eval_path=eval_path if paths.exists(eval_path) else None,
                                 skip_malformed=True)
  evals = (metrics_lib.read_jsonl(eval_path, skip_malformed=True) if paths.exists(eval_path)
           else [])
  text, table = final_table(evals)
  paths.write_text(paths.join(workdir, "final_table.md"), text + "\n")
  paths.write_text(paths.join(workdir, "final_table.json"), json.dumps(table, indent=1))
  return (f"report: {len(plots)} plots in {paths.join(workdir, 'plots')}\n"
          f"final table (pass@k at the eval temperature; ID = held-out prompts of the training "
          f"tasks, OOD = harder settings and held-out families):\n{text}")

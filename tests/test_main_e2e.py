"""The default run, quick variant, end to end from the CLI: data, tokenizer, base, DYPO, report."""
import json
import os
import subprocess
import sys

import pytest

from dypo_jax.io import report

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_final_table_compares_first_and_last_eval():
  text, table = report.final_table([
      {"step": 0, "id/pass@1": 0.25, "ood/pass@1": 0.1, "id/response_len": 30.0},
      {"step": 50, "id/pass@1": 0.5, "ood/pass@1": 0.15}])
  assert "| id/pass@1 | 25.0% | 50.0% | +25.0 |" in text
  assert "| ood/pass@1 | 10.0% | 15.0% | +5.0 |" in text
  assert table["metrics"]["id/pass@1"] == {"base": 0.25, "trained": 0.5}
  assert "no evaluation" in report.final_table([])[0]


@pytest.mark.slow
def test_quick_default_run_end_to_end(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "dypo_jax.main", "--config=experiments/cpu_tiny.py:quick",
       f"--workdir={workdir}"], capture_output=True, text=True, cwd=_REPO, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  for name in ("metrics.jsonl", "eval.jsonl", "final_table.md", "final_table.json",
               "tokenizer/spm.model", "base_model/config.json", "base_model/model.safetensors",
               "pretrain/gate.json"):
    assert (workdir / name).exists(), name
  assert list((workdir / "tb").iterdir()), "no TensorBoard events"
  plots = {p.name for p in (workdir / "plots").iterdir()}
  for name in ("reward.png", "offline_ratio.png", "routing.png", "entropy.png", "grad_norm.png",
               "eval.png"):
    assert name in plots, (name, plots)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines if "loss/total" in l] == [1, 2, 3, 4, 5, 6]
  assert "final table" in proc.stdout and "id/pass@1" in proc.stdout
  assert len(list((workdir / "checkpoints").iterdir())) >= 1

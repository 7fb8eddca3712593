"""Smoke tests: every benchmark script runs end to end at toy sizes and prints its figures.

Nothing here checks a timing. Each script compiles a sampler and/or an update step in a
subprocess, so every case is marked slow. w1_step.py runs inside the run_all.sh case.
"""
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(args: list[str], timeout: int = 600, env_extra: dict | None = None) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                        cwd=_REPO)
  assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.mark.slow
def test_profile_step_tiny():
  out = _run([sys.executable, "benchmarks/profile_step.py", "--tiny", "--steps", "1",
              "--warmup", "1", "--reps", "1", "--thunks", "3",
              "--variants", "full,no GAL,no ref"])
  for needle in ("Phase shares", "reference log-probs ~", "no ref", "XLA:CPU thunks of the update",
                 "% in dot fusions", "Compiles: step traced", "OK (1 per program)"):
    assert needle in out, needle


@pytest.mark.slow
def test_gpu_step_tiny():  # G1's script at toy sizes on the CPU.
  out = _run([sys.executable, "benchmarks/gpu_step.py", "--tiny", "--steps", "1"])
  for needle in ("RESULT dypo_jax_grpo steps/s", "decode roofline", "MFU",
                 "first step (compiles)"):
    assert needle in out, needle


@pytest.mark.slow
def test_compile_time_one_case(tmp_path):
  png = tmp_path / "compile.png"
  out = _run([sys.executable, "benchmarks/compile_time.py", "--cases", "w1:1", "--plot",
              str(png)])
  assert "RESULT w1:1: init" in out and "| w1:1 |" in out and png.stat().st_size > 1000


@pytest.mark.slow
def test_scaling_quick(tmp_path):
  png = tmp_path / "scaling.png"
  out = _run([sys.executable, "benchmarks/scaling.py", "--quick", "--axes", "T", "--reps", "1",
              "--out", str(png)])
  assert "XLA total MB" in out and png.exists() and png.stat().st_size > 1000


@pytest.mark.slow
def test_mfu_tiny():  # ~13 s.
  out = _run([sys.executable, "benchmarks/mfu.py", "--tiny", "--reps", "1", "--peak-reps", "2"])
  assert "RESULT mfu achieved" in out and "utilisation = " in out


@pytest.mark.slow
def test_run_all_ours_only(tmp_path):
  """run_all.sh runs w1_step.py for GRPO and DYPO (--tiny) and prints the medians table."""
  log = tmp_path / "log.txt"
  out = _run(["bash", "benchmarks/run_all.sh", "1", "1"],
             env_extra={"SKIP_PEERS": "1", "SKIP_SAMPLER": "1", "OURS_ARGS": "--tiny --warmup 1",
                        "LOG": str(log)})
  assert "Medians over rounds" in out
  results = log.read_text()
  for method in ("grpo", "dypo"):
    for figure in ("median-based: steps/s", "rollout-only tokens/s", "first step (compile) s",
                   "peak RSS MB", "process CPU s/step"):
      assert f"RESULT dypo_jax_{method} " in results and figure in results, (method, figure)
  # GRPO batches are groups only (one program); DYPO's may also hold a packed Hard slot, which
  # takes the row-path variant (a second program, compiled once).
  assert "dypo_jax_grpo first step (compile) s" in results
  lines = {m: next(l for l in results.splitlines() if f"RESULT dypo_jax_{m} first step" in l)
           for m in ("grpo", "dypo")}
  assert "compiles: step 1, sampler 1" in lines["grpo"], lines["grpo"]
  assert any(f"compiles: step {n}, sampler 1" in lines["dypo"] for n in (1, 2)), lines["dypo"]


@pytest.mark.slow
def test_logprob_gpu_blocks_interpreted():  # ~10 s: on CPU the kernel runs interpreted.
  out = _run([sys.executable, "benchmarks/logprob_gpu_blocks.py", "--tokens", "32", "--embed",
              "32", "--vocab", "512", "--iters", "1", "--settings", "2"])
  assert "Pallas interpreter: a smoke test" in out
  rows = [line for line in out.splitlines() if line.startswith(("xla ", "128x", "64x"))]
  assert len(rows) == 4 and not any("failed" in r for r in rows), out

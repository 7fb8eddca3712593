"""Smoke tests: every benchmark script runs end to end at toy sizes and prints its figures.

Nothing here checks a timing. Each script compiles a sampler and/or an update step, which takes
10-30 s on 2 shared cores, so every case but the MFU one is marked slow.
"""
import os
import subprocess
import sys

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args: list[str], timeout: int = 600, env_extra: dict | None = None) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **(env_extra or {}))
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout,
                        cwd=_REPO)
  assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc.stdout


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "dypo"])
def test_w1_step_tiny(method):
  out = _run([sys.executable, "benchmarks/w1_step.py", "--tiny", "--steps", "1", "--warmup", "1",
              "--method", method])
  assert out.startswith("command: ")
  for figure in ("median-based: steps/s", "rollout-only tokens/s", "first step (compile) s",
                 "peak RSS MB", "process CPU s/step"):
    assert f"RESULT dypo_jax_{method} " in out and figure in out, figure
  # GRPO batches are groups only (one program); DYPO's may also hold a packed Hard slot, which
  # takes the row-path variant (a second program, compiled once).
  allowed = ("compiles: step 1, sampler 1",) + (
      ("compiles: step 2, sampler 1",) if method == "dypo" else ())
  assert any(a in out for a in allowed), out[-500:]


@pytest.mark.slow
def test_profile_step_tiny():
  out = _run([sys.executable, "benchmarks/profile_step.py", "--tiny", "--steps", "1",
              "--warmup", "1", "--reps", "1", "--thunks", "3"])
  for needle in ("Phase shares", "reference log-probs ~", "no ref", "XLA:CPU thunks of the update",
                 "% in dot fusions", "Compiles: step traced", "OK (1 per program)"):
    assert needle in out, needle


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
  out = _run(["bash", "benchmarks/run_all.sh", "1", "1"],
             env_extra={"SKIP_PEERS": "1", "SKIP_SAMPLER": "1", "OURS_ARGS": "--tiny --warmup 1",
                        "LOG": str(tmp_path / "log.txt")})
  assert "Medians over rounds" in out
  assert "dypo_jax_grpo" in out and "dypo_jax_dypo" in out


@pytest.mark.slow
def test_logprob_gpu_blocks_interpreted():  # ~10 s: on CPU the kernel runs interpreted.
  out = _run([sys.executable, "benchmarks/logprob_gpu_blocks.py", "--tokens", "32", "--embed",
              "32", "--vocab", "512", "--iters", "1", "--settings", "2"])
  assert "Pallas interpreter: a smoke test" in out
  rows = [line for line in out.splitlines() if line.startswith(("xla ", "128x", "64x"))]
  assert len(rows) == 4 and not any("failed" in r for r in rows), out

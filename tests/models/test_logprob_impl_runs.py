"""`model.logprob_impl="pallas"` from the CLI: a run through the fused kernel is the chunked run.

On CPU the Mosaic kernel runs in the Pallas interpreter (`model.pallas_interpret=True`). On a GPU
machine, `JAX_PLATFORMS=cuda pytest tests/models/test_logprob_impl_runs.py` compiles the Triton kernel
(`dypo_jax.models.logprobs` picks it by backend), with float32 matmuls everywhere so that the only
difference between the runs is the log-prob path.
"""
import os
import subprocess

import jax
import pytest

import tiny_runs


@pytest.mark.slow
def test_pallas_run_matches_chunked_run(tmp_path):
  on_cpu = jax.default_backend() == "cpu"
  env = tiny_runs.subprocess_env(1, platforms=os.environ.get("JAX_PLATFORMS", "cpu"))
  env["JAX_DEFAULT_MATMUL_PRECISION"] = "float32"  # No TF32 on a GPU: the kernels are f32.
  runs = {}
  for impl in ("chunked", "pallas"):
    workdir = str(tmp_path / impl)
    overrides = {"train.num_steps": 1, "model.logprob_impl": impl,
                 "model.pallas_interpret": impl == "pallas" and on_cpu}
    proc = subprocess.run(tiny_runs.main_command(workdir, **overrides), capture_output=True,
                          text=True, env=env, cwd=tiny_runs.REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs[impl] = tiny_runs.comparable_metrics(workdir)
  assert sorted(runs["pallas"]) == sorted(runs["chunked"]) == [1]
  # Step 1 samples from the same parameters, so its rollouts are the same and its losses, log-prob
  # statistics and gradient norms differ only by the log-prob paths' summation order. (Later
  # steps start from parameters that differ by rounding, which can flip a sampled token: one
  # step is the comparison.)
  tiny_runs.assert_same_metrics({1: runs["pallas"][1]}, {1: runs["chunked"][1]}, rtol=1e-4,
                                atol=1e-6)

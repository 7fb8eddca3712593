"""dypo_jax.tools.aot: the real TPU compiler, run on this CPU machine, sizes the train step and sampler.

Needs libtpu (`pip install -e ".[tpu]"`); without it every test here is skipped. Each test runs in
a fresh Python (JAX on the CPU, TPU chips compile-only) on a tiny config and a v4:2x2x1 topology
(4 chips); the 7B configs are compiled by `python -m dypo_jax.tools.aot` (minutes, BUILD_NOTES.md).
"""
import importlib.util
import os
import re
import subprocess
import sys
import textwrap

import pytest

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'): no TPU compiler to run")


def _run(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1",
             PYTHONPATH=_REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable] + args, capture_output=True, text=True, env=env,
                        cwd=_REPO, timeout=timeout)


@pytest.mark.slow
def test_tiny_train_step_and_sampler_compile_for_v4_with_positive_memory():
  code = textwrap.dedent("""
    import pytest
    from dypo_jax import config as config_lib
    from dypo_jax.parallel import sharding
    from dypo_jax.tools import aot
    c = config_lib.load_experiment("experiments/cpu_tiny.py", "quick")
    c.model.update(dict(remat="full", attention_chunk=32, dtype="bfloat16"))
    c.mesh.update(dict(data=1, fsdp=2, tensor=2))
    c.train.update(dict(update_prompts=8, micro_batches=2, per_term_grad_norms=False,
                        shared_prompt=False))
    config_lib.validate(c)
    devices = aot.topology_devices("v4:2x2x1")
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4", devices
    hbm = aot.usable_hbm_bytes(devices[0])
    assert hbm == int(30.75 * 2 ** 30), hbm
    mesh = sharding.make_mesh({"data": 1, "fsdp": 2, "tensor": 2}, devices)
    train, generate = aot.compile_programs(c, mesh, ("train", "generate"))
    for r in (train, generate):
      assert not r.error, r.error
      assert min(r.argument, r.output, r.code, r.total) > 0 and r.flops > 0, r
      assert r.fits(hbm), r
    assert train.temp > 0 and train.alias > 0, train  # The TrainState is donated.
    assert train.shapes.startswith("U=8 K=8 L=") and train.shapes.endswith(" micro=2"), train
    print(aot.format_table([train, generate], hbm_bytes=hbm))
    with pytest.raises(ValueError, match="cannot describe TPU topology 'v9:1x1'"):
      aot.topology_devices("v9:1x1")
    print("OK")
  """)
  proc = _run(["-c", code])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert "OK" in proc.stdout and "train " in proc.stdout and "generate" in proc.stdout


@pytest.mark.slow
def test_an_oversized_program_is_reported_as_not_fitting():
  proc = _run(["-m", "dypo_jax.tools.aot", "--config=experiments/cpu_tiny.py:quick",
               "--topology=v4:2x2x1", "--what=train", "--config.train.update_prompts=65536",
               "--config.train.per_term_grad_norms=False"])
  assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
  assert "v4:2x2x1: 4 x TPU v4" in proc.stdout
  assert re.search(r"NO FIT: train \(U=65536 K=8 L=\d+\+\d+ micro=1\)", proc.stdout), proc.stdout
  assert "RESOURCE_EXHAUSTED" in proc.stdout and "30.75G" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_unknown_config_key_is_named_before_compiling():
  proc = _run(["-m", "dypo_jax.tools.aot", "--config=experiments/cpu_tiny.py:quick",
               "--topology=v4:2x2x1", "--config.train.micro_batchez=2"])
  assert proc.returncode != 0
  assert "unknown config key 'train.micro_batchez'" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
def test_micro_batches_of_fewer_items_than_batch_shards_compile():
  # One item (K = 8 rows) per micro-batch on 2 batch shards: its rows are split, 4 a chip.
  tiny_train_on_v4 = ["-m", "dypo_jax.tools.aot", "--config=experiments/cpu_tiny.py:quick",
                      "--topology=v4:2x2x1", "--what=train", "--config.train.update_prompts=4",
                      "--config.train.micro_batches=4"]
  proc = _run(tiny_train_on_v4 + ["--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                                  "--config.train.per_term_grad_norms=False"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert "activation (rows, sequence) over (('data', 'fsdp'), ())" in proc.stdout, proc.stdout
  assert re.search(r"train .* U=4 K=8 L=\d+\+\d+ micro=4\n", proc.stdout), proc.stdout
  # Rows that do not divide over the batch shards are refused, as the Trainer refuses them.
  proc = _run(tiny_train_on_v4 + ["--config.mesh.fsdp=4", "--config.mesh.tensor=1",
                                  "--config.rl.num_samples=2"])
  assert proc.returncode == 1, proc.stdout + proc.stderr[-4000:]
  assert "2 rows, which must be a multiple of the 4 batch shards" in proc.stdout, proc.stdout

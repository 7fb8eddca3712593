"""Helpers for the resume / fault / multi-host / export tests: one tiny run config, subprocesses.

The same overrides serve in-process trainers (`tiny_config`) and `python -m dypo_jax.main`
command lines (`main_command`), so both compile the same programs; subprocesses inherit the test
run's persistent compilation cache (conftest.py).
"""
import gzip
import json
import math
import os
import subprocess
import sys
import textwrap

from dypo_jax import config as config_lib
from dypo_jax.data import records as records_lib
from dypo_jax.io import metrics as metrics_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")

# A model and run small enough that a subprocess compiles and runs a few steps in seconds.
OVERRIDES = {
    "model.vocab_size": 64, "model.embed_dim": 32, "model.num_layers": 1, "model.num_heads": 2,
    "model.num_kv_heads": 1, "model.head_dim": 16, "model.mlp_dim": 64, "model.max_seq_len": 128,
    "tokenizer.train_vocab_size": 64,
    "data.num_train": 64, "data.num_eval_id": 4, "data.num_eval_ood": 4,
    "sampler.max_new_tokens": 32, "eval.max_new_tokens": 32, "eval.num_samples": 2,
    "eval.max_prompts": 4, "rl.num_samples": 4,
    "train.num_steps": 5, "train.rollout_prompts": 6, "train.update_prompts": 4,
    "train.max_rollouts_per_update": 2, "train.log_every": 1, "train.checkpoint_every": 2,
    "train.keep_checkpoints": 3, "train.eval_every": 0, "train.per_term_grad_norms": False,
    "pretrain.enabled": False,  # main would first train a base model to an accuracy gate.
}

# The shared reference run (conftest.reference_run): uninterrupted, a checkpoint at every step,
# every one kept, so a test can compare what it saved at any step.
REFERENCE_RUN = {"train.num_steps": 16, "train.checkpoint_every": 1, "train.keep_checkpoints": 16}

# Keys that describe the process rather than the run: wall-clock measurements, and the count of
# update programs this process compiled (a restarted process compiles again).
_PROCESS_KEYS = ("time/", "perf/", "train/compiles")


def tiny_config(method: str = "dypo", **overrides):
  """experiments/baselines.py:`method`,quick (for "dypo" the same config as
  experiments/cpu_tiny.py:quick, which `main_command` runs) with OVERRIDES, then `overrides`
  ("section.key": value). The one tiny config of the tests."""
  c = config_lib.load_experiment(os.path.join(REPO, "experiments", "baselines.py"),
                                 f"{method},quick")
  for key, value in {**OVERRIDES, **overrides}.items():
    section, name = key.split(".")
    c[section][name] = value
  config_lib.validate(c)
  return c


def model_config():
  """The tiny config's ModelConfig."""
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  return build.model_config(tiny_config())


def build_trainer(config, workdir: str):
  """main's phases (mesh, data, tokenizer, model) and a Trainer, in this process."""
  from dypo_jax import build  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import sharding  # pylint: disable=g-import-not-at-top
  from dypo_jax.rl import trainer as trainer_lib  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.build_mesh(config.mesh)
  pools = build.build_data(config, workdir)
  tok = build.build_tokenizer(config, workdir, pools)
  model = build.build_model(config, mesh, tok)
  return trainer_lib.Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tok, model=model,
                             pools=pools)


def resume(trainer, ckpt, *, allow_config_change: tuple[str, ...] = ()) -> bool:
  """Restores the newest good step of `ckpt` into `trainer.run_state`, as `Trainer.run` does;
  returns whether there was one."""
  from dypo_jax.rl import run_checkpoint  # pylint: disable=g-import-not-at-top
  restored = run_checkpoint.restore(ckpt, trainer.run_state, config=trainer.config,
                                    allow_config_change=allow_config_change,
                                    storage_retry_s=trainer.config.train.storage_retry_s)
  if restored is not None:
    trainer.run_state = restored
  return restored is not None


def xla_flags(num_devices: int) -> str:
  """XLA_FLAGS of a subprocess: the test run's (conftest.py) and `num_devices` CPU devices."""
  own = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count"))
  return f"{own} --xla_force_host_platform_device_count={num_devices}".strip()


def subprocess_env(num_devices: int = 1, platforms: str = "cpu") -> dict[str, str]:
  """Environment of a subprocess run: `num_devices` CPU devices, JAX on `platforms`."""
  env = dict(os.environ)
  env.update({
      "JAX_PLATFORMS": platforms,
      "XLA_FLAGS": xla_flags(num_devices),
      "PYTHONPATH": os.pathsep.join([REPO, TESTS, env.get("PYTHONPATH", "")]),
  })
  return env


def run_python(code: str, *args: str, num_devices: int = 1, timeout: int = 300) -> str:
  """Runs `code` in a fresh Python (tests/ importable) with `num_devices` CPU devices."""
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                        capture_output=True, text=True, env=subprocess_env(num_devices),
                        timeout=timeout, cwd=REPO)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed (rc={proc.returncode}):\nSTDOUT:\n{proc.stdout}\n"
                         f"STDERR:\n{proc.stderr[-6000:]}")
  return proc.stdout


def main_command(workdir: str, **overrides) -> list[str]:
  """`python -m dypo_jax.main` on the tiny config, with `overrides` ("section.key": value)."""
  cmd = [sys.executable, "-m", "dypo_jax.main", "--config=experiments/cpu_tiny.py:quick",
         f"--workdir={workdir}"]
  for key, value in {**OVERRIDES, **overrides}.items():
    cmd.append(f"--config.{key}={value}")
  return cmd


def comparable_metrics(workdir: str) -> dict[int, dict]:
  """{step: metrics} of a run (the last line of a re-logged step wins), timings left out."""
  records = metrics_lib.merge_by_step(
      metrics_lib.read_jsonl(os.path.join(workdir, metrics_lib.METRICS_FILENAME)))
  return {r["step"]: {k: v for k, v in r.items()
                      if k != "step" and not k.startswith(_PROCESS_KEYS)} for r in records}


def assert_same_metrics(got: dict[int, dict], want: dict[int, dict], *,
                        rtol: float = 0.0, atol: float = 0.0) -> None:
  """Every value of every step equal (floats within `rtol` / `atol` if given, else exactly); a
  failure names the first differing key."""
  for step in sorted(want):
    assert step in got, f"step {step} missing (logged steps: {sorted(got)})"
    assert set(got[step]) == set(want[step]), (step, set(got[step]) ^ set(want[step]))
    for key in sorted(want[step]):
      a, b = got[step][key], want[step][key]
      same = a == b or ((rtol > 0 or atol > 0) and isinstance(a, float)
                        and isinstance(b, float) and math.isclose(a, b, rel_tol=rtol,
                                                                  abs_tol=atol))
      assert same, f"step {step} {key}: {a!r} != {b!r}"


def write_jsonl(records, path: str) -> int:
  """Writes records as a JSONL file (gzip when the name ends in .gz) for a test to read back;
  returns how many."""
  lines = "".join(json.dumps(records_lib.record_to_dict(r), ensure_ascii=False) + "\n"
                  for r in records).encode("utf-8")
  with open(path, "wb") as f:
    f.write(gzip.compress(lines, mtime=0) if path.endswith(".gz") else lines)
  return len(records)

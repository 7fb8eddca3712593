"""Shared test fixtures: CPU JAX, a helper to run code on fake devices in a subprocess."""
import os
import subprocess
import sys
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # pylint: disable=g-import-not-at-top

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_with_fake_devices(code: str, num_devices: int = 8, timeout: int = 600) -> str:
  """Runs `code` in a fresh Python with `num_devices` fake CPU devices; returns its stdout.

  XLA_FLAGS must be set before jax is imported, hence the subprocess.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = _REPO + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run(
      [sys.executable, "-c", textwrap.dedent(code)],
      capture_output=True, text=True, env=env, timeout=timeout, cwd=_REPO)
  if proc.returncode != 0:
    raise AssertionError(
        f"subprocess failed (rc={proc.returncode}):\nSTDOUT:\n{proc.stdout}\nSTDERR:\n{proc.stderr}")
  return proc.stdout


@pytest.fixture
def fake_devices():
  return run_with_fake_devices

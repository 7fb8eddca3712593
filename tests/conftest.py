"""Shared test set-up: CPU JAX, one persistent compilation cache for the whole test run (this
process and every subprocess it starts), and a helper to run code on fake devices.

Compiling dominates these tests on CPU, and many of them compile the same programs (the tiny
run's update, sampler and evaluation, in-process and in `python -m dypo_jax.main`
subprocesses): with one cache each program is compiled once per test run.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dypo_test_jit_cache_")
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_CACHE = None  # Given by the caller (e.g. kept between runs): left in place.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# XLA:CPU without LLVM's optimisation passes: the tests' programs are tiny, so compiling is most of
# their time and a third of it goes (measured: 43 -> 32 s on two train-step tests). Both sides of
# every comparison run under the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} {os.environ.get('XLA_FLAGS', '')}".strip()

import pytest  # pylint: disable=g-import-not-at-top
# matplotlib builds its font cache on first use by running `fc-list`; a fresh install would do it
# inside whichever quick test plots first, where subprocesses are refused (below). Build it here.
import matplotlib.font_manager  # pylint: disable=g-import-not-at-top,unused-import

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_collection_modifyitems(config, items):
  """Slow tests first: the two workers (pytest.ini: -n 2 --dist worksteal) then share the long
  ones, and the quick ones fill the gaps at the end instead of one long test running alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # Stable otherwise.


@pytest.fixture(autouse=True)
def _subprocesses_only_in_slow_tests(request, monkeypatch):
  """A test that starts a process (a run, fake devices) is marked slow, so that
  `pytest -m "not slow"` stays the quick inner loop; this makes an unmarked one fail."""
  if request.node.get_closest_marker("slow") is None:
    def refuse(*args, **kwargs):
      del args, kwargs
      raise AssertionError(f"{request.node.nodeid} starts a subprocess: mark it "
                           "@pytest.mark.slow")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def reference_run(request, tmp_path_factory) -> str:
  """The workdir of one uninterrupted `python -m dypo_jax.main` run (tiny_runs.REFERENCE_RUN),
  made once per test run and shared by every xdist worker: the kill -9 tests on local disk and on
  gs:// compare their resumed runs with it. Its users only read it."""
  import filelock  # pylint: disable=g-import-not-at-top
  import tiny_runs  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):  # An xdist worker: share the run's base folder.
    root = root.parent
  workdir = root / "reference_run"
  with filelock.FileLock(str(root / "reference_run.lock")):
    if not (workdir / "final_table.json").exists():
      shutil.rmtree(workdir, ignore_errors=True)  # A failed attempt is not resumed.
      proc = subprocess.run(tiny_runs.main_command(str(workdir), **tiny_runs.REFERENCE_RUN),
                            capture_output=True, text=True, env=tiny_runs.subprocess_env(),
                            cwd=_REPO, timeout=600)
      assert proc.returncode == 0, proc.stderr[-3000:]
  return str(workdir)


def run_with_fake_devices(code: str, num_devices: int = 8, timeout: int = 600) -> str:
  """Runs `code` in a fresh Python with `num_devices` fake CPU devices; returns its stdout.

  XLA_FLAGS must be set before jax is imported, hence the subprocess.
  """
  env = dict(os.environ)
  import tiny_runs  # pylint: disable=g-import-not-at-top
  env["XLA_FLAGS"] = tiny_runs.xla_flags(num_devices)
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

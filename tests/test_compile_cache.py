"""The persistent compilation cache: on by default in the workdir, so a second start compiles
nothing that the first one compiled; a shared folder serves other runs; "off" leaves it off."""
import os
import subprocess

import pytest

import tiny_runs


def _run(workdir, **overrides) -> str:
  env = tiny_runs.subprocess_env()
  for name in ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
    env.pop(name, None)  # The test run's own cache (conftest) would win over the config.
  proc = subprocess.run(tiny_runs.main_command(str(workdir), **overrides), capture_output=True,
                        text=True, env=env, cwd=tiny_runs.REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_a_second_start_reads_every_program_from_the_cache(tmp_path):
  first = tmp_path / "first"
  out = _run(first, **{"compile_cache.min_compile_time_s": 0})  # Every program gets an entry.
  cache = first / "compile_cache"
  assert f"compile cache: {cache}" in out
  entries = set(os.listdir(cache))
  assert entries

  # The same run in another workdir, reading the first one's cache: every program is a hit, so
  # nothing new is written.
  out = _run(tmp_path / "second", **{"compile_cache.dir": str(cache),
                                     "compile_cache.min_compile_time_s": 0})
  assert f"compile cache: {cache}" in out
  assert set(os.listdir(cache)) == entries
  assert not (tmp_path / "second" / "compile_cache").exists()


def test_off_turns_nothing_on_and_the_environment_wins(tmp_path, monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  from dypo_jax.parallel import host  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_compilation_cache_dir
  cfg = ml_collections.ConfigDict(dict(dir="off", min_compile_time_s=1.0))
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/shared/cache")
  assert host.configure_compilation_cache(cfg, str(tmp_path)) == "/shared/cache"
  monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
  assert host.configure_compilation_cache(cfg, str(tmp_path)) is None
  assert jax.config.jax_compilation_cache_dir == before
  assert not (tmp_path / "compile_cache").exists()

"""The host before JAX starts: a CPU split into devices, synchronous dispatch with a heap that keeps
XLA's temporaries resident, the persistent compilation cache, and `jax.distributed` for multi-host
jobs. main's platform phase."""
import ctypes
import ctypes.util
import os
import platform

import jax
import ml_collections


def maybe_initialize_distributed(cfg: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize` when asked, or when the environment is a multi-host job.

  On a TPU pod slice JAX finds the coordinator itself, so no arguments are needed there.
  """
  mode = cfg.initialize
  env_says = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or (
      os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0)
  if mode == "never" or (mode == "auto" and not env_says and not cfg.coordinator_address):
    return
  kwargs = {}
  if cfg.coordinator_address:
    kwargs = dict(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
  jax.distributed.initialize(**kwargs)


def configure_host_devices(count: int) -> None:
  """Splits a CPU host into `count` XLA devices (`mesh.host_devices`; 0 leaves XLA's default).

  JAX reads the count once, when its CPU backend starts, so this runs before anything asks JAX
  for devices; a backend already started with another count is an error, not a silent no-op.
  """
  if not count:
    return
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # The backend has started: fine if it has the count asked for.
    have = len(jax.devices("cpu"))
    if have != count:
      raise ValueError(f"mesh.host_devices={count}, but JAX already started with {have} CPU "
                       "device(s); set it before the first JAX call") from None


def configure_compilation_cache(cfg: ml_collections.ConfigDict, workdir: str) -> str | None:
  """Turns on JAX's persistent compilation cache where `compile_cache.dir` says; returns it.

  Before the first compile. JAX_COMPILATION_CACHE_DIR in the environment wins (JAX reads it, and
  its own JAX_PERSISTENT_CACHE_* settings, itself); "off" leaves the cache off.
  """
  from_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if from_env:
    return from_env
  if cfg.dir == "off":
    return None
  path = cfg.dir
  if path == "workdir":
    from dypo_jax.io import paths  # pylint: disable=g-import-not-at-top
    path = paths.join(workdir, "compile_cache")
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", cfg.min_compile_time_s)
  return path


# Whether `configure_host` set synchronous CPU dispatch before JAX started its backends.
_sync_dispatch = False


def _backends_started() -> bool:
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  (no public API says it)
  return xla_bridge.backends_are_initialized()


def configure_host(cfg: ml_collections.ConfigDict) -> None:
  """Before the first JAX call: the CPU host as `mesh.host_devices` devices, and with
  `mesh.host_reuse_memory` XLA:CPU programs run on the calling thread (see `keep_host_heap`).

  JAX reads the dispatch mode once, when its CPU backend starts: asking for it later is an
  error, not a silent no-op. Calling again once it is set does nothing.
  """
  global _sync_dispatch
  configure_host_devices(cfg.host_devices)
  if not cfg.host_reuse_memory or _sync_dispatch:
    return
  if _backends_started():
    raise ValueError("mesh.host_reuse_memory=True, but JAX already started its backend with "
                     "asynchronous CPU dispatch; call parallel.host.configure_host before the "
                     "first JAX call, or set mesh.host_reuse_memory=False")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  _sync_dispatch = True


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_host_heap(cfg: ml_collections.ConfigDict) -> bool:
  """With `mesh.host_reuse_memory` on a CPU backend: glibc serves large blocks from the heap and
  keeps up to 2 GiB of freed memory instead of returning it to the OS (`mallopt` takes an int;
  a program with more temporaries than that is trimmed and regrown each call, slower than
  without: BUILD_NOTES). Returns whether it was applied.

  XLA:CPU allocates each execution's temporaries as one block and frees it after. glibc maps
  such a block afresh (mmap) and unmaps it on free, so every step faulted in and zeroed ~100 MB
  of new pages (27k faults a W1 step; the update's first writes ran at a third of their speed).
  From the heap, the freed block is reused by the next step as it is. The heap is per thread
  arena and only the main one can grow past 64 MB, hence the synchronous dispatch
  (`configure_host`): programs then allocate on the main thread. Peak memory is unchanged; what
  the process freed is kept for reuse rather than returned.
  """
  if not (cfg.host_reuse_memory and _sync_dispatch) or jax.default_backend() != "cpu":
    return False  # Without synchronous dispatch the block is a pool thread's: mmap regardless.
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False  # mallopt is glibc's (macOS, musl: nothing to set).
  libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))



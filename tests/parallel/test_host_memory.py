"""`mesh.host_reuse_memory`: on CPU, XLA's per-execution temporaries reuse resident pages.

Without it glibc maps each execution's temporary block afresh and unmaps it after, so every call
faults in (and the kernel zeroes) all of its pages again.
"""
import pytest
import re

import tiny_runs

# A [2048, 8192] float32 intermediate (64 MB) that a dot must read whole: it is materialised in
# the execution's temporaries on every call. 64 MB is above glibc's largest mmap threshold.
_PROGRAM = """
import resource, sys
import ml_collections
from dypo_jax.parallel import host

cfg = ml_collections.ConfigDict(dict(host_devices=0, host_reuse_memory=sys.argv[1] == "1"))
host.configure_host(cfg)
import jax
import jax.numpy as jnp
applied = host.keep_host_heap(cfg)

@jax.jit
def f(a, b, w):
  return jnp.outer(a, b) @ w

a, b, w = jnp.ones((2048,)), jnp.ones((8192,)), jnp.ones((8192, 8))
jax.block_until_ready(f(a, b, w))
per_call = []
for _ in range(40):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  jax.block_until_ready(f(a, b, w))
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# The median: the heap may take a few calls to settle (a first block below later small ones),
# more on a loaded machine (a CI run beside other tests took 7 of 12 calls), so 40 calls.
faults = sorted(per_call)[len(per_call) // 2]
print("ASYNC", jax.config.values["jax_cpu_enable_async_dispatch"], "APPLIED", applied, "FAULTS",
      faults, per_call)
"""


def _run(reuse: bool) -> tuple[str, int]:
  out = tiny_runs.run_python(_PROGRAM, "1" if reuse else "0")
  match = re.search(r"ASYNC (\w+) APPLIED (\w+) FAULTS (\d+)", out)
  assert match, out
  return f"{match.group(1)} {match.group(2)}", int(match.group(3))


@pytest.mark.slow
def test_reused_heap_keeps_the_temporaries_resident():
  settings, faults = _run(reuse=True)
  assert settings == "False True"  # Synchronous dispatch; glibc told to keep its heap.
  # A call maps 16,384 fresh pages of 4 KiB without it; a resident block faults (almost) none.
  assert faults < 1_000, faults


@pytest.mark.slow
def test_without_it_dispatch_and_heap_are_left_alone():
  settings, faults = _run(reuse=False)
  assert settings == "True False"
  # Default glibc maps the block afresh per call (unless the kernel backs it with transparent
  # huge pages).
  with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
    thp_always = "[always]" in f.read()
  if not thp_always:
    assert faults > 8_000, faults


@pytest.mark.slow
def test_asked_for_after_jax_started_is_an_error_not_a_no_op():
  out = tiny_runs.run_python("""
    import ml_collections
    import jax
    from dypo_jax.parallel import host
    jax.devices()  # The CPU backend starts, with asynchronous dispatch.
    cfg = ml_collections.ConfigDict(dict(host_devices=0, host_reuse_memory=True))
    try:
      host.configure_host(cfg)
    except ValueError as e:
      print("ERR", e)
    print("HEAP", host.keep_host_heap(cfg))  # Nothing to keep: the block is not the main's.
    cfg.host_reuse_memory = False
    host.configure_host(cfg)  # Off: nothing to set, nothing to refuse.
    print("OFF OK")
  """)
  assert "ERR mesh.host_reuse_memory=True, but JAX already started its backend" in out
  assert "HEAP False" in out and "OFF OK" in out

"""Memory and time of token log-probs + entropies, forward and backward: full vocab vs fused kernel.

Legend: M tokens (T tokens, batch 1), D embed, V vocab.

For loss = sum(w_logp * logp) + sum(w_ent * entropy) and its gradient w.r.t. hidden [M, D] and
lm_head [D, V], prints the compiled memory (`jax.jit(f).lower(...).compile().memory_analysis()`:
argument + output + temp bytes) and the wall time of:
  full     jax.nn.log_softmax over the [M, V] float32 logits (reference_token_logprobs);
  fused    the Pallas kernel: dypo_jax.kernels.logprob_gpu (Triton) on a GPU,
           dypo_jax.kernels.logprob (Mosaic) otherwise, in interpret mode on CPU;
  chunked  (--chunked) token_logprobs(..., impl="chunked") from dypo_jax.rl.losses or
           dypo_jax.models.logprobs, whichever exists.
Memory is compiled at the full size without running it. On CPU the full path at M = 4096 needs
~10 GiB, so wall time is measured at --time_tokens (default 256) tokens. The Pallas kernel runs
there in interpret mode: its memory is the interpreter's (which NaN-pads and copies operands, not
the kernel's own), and it is far too slow to time (~5 minutes for M=64 at V=151,936 on 2 busy
cores, whatever M: the cost is per grid step), so on CPU it is timed only with --time_fused.

With --tpu_topology (needs libtpu importable, e.g. `pip install "jax[tpu]==0.10.2"`) memory is
compiled for one chip of that TPU topology instead, the fused kernel through Mosaic; wall time is
then skipped (compile-only devices cannot run).

Usage (Qwen2.5-0.5B head; ~1 minute on 2 CPU cores):
  python benchmarks/logprob_memory.py
  python benchmarks/logprob_memory.py --tokens 8192 --chunked --time_tokens 0
  python benchmarks/logprob_memory.py --tpu_topology v4:2x2x1
"""
import argparse
import importlib
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dypo_jax.kernels import logprob
from dypo_jax.models import logprobs

_MIB = 2**20


def _parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokens", type=int, default=4096, help="M = T tokens (batch 1)")
  parser.add_argument("--vocab", type=int, default=151936, help="V")
  parser.add_argument("--embed", type=int, default=896, help="D")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--temperature", type=float, default=1.0)
  parser.add_argument("--block_m", type=int, default=None, help="default: the kernel's")
  parser.add_argument("--block_v", type=int, default=None, help="default: the kernel's")
  parser.add_argument("--time_tokens", type=int, default=None,
                      help="tokens for the wall-time runs; 0 skips timing; default: --tokens on "
                           "an accelerator, 256 on CPU")
  parser.add_argument("--iters", type=int, default=3, help="timed runs after one warm-up")
  parser.add_argument("--time_fused", action="store_true",
                      help="time the fused kernel even in (slow) interpret mode on CPU")
  parser.add_argument("--chunked", action="store_true", help="also the jnp chunked path")
  parser.add_argument("--vocab_chunk", type=int, default=4096, help="C for --chunked")
  parser.add_argument("--tpu_topology", default=None,
                      help="compile memory for one chip of this TPU topology (compile-only), "
                           "e.g. v4:2x2x1")
  return parser.parse_args(argv)


def _chunked_fn():
  """token_logprobs(..., impl="chunked") adapted to [M, D] inputs, or None if not available."""
  for name in ("dypo_jax.rl.losses", "dypo_jax.models.logprobs"):
    try:
      module = importlib.import_module(name)
    except ImportError:
      continue
    if hasattr(module, "token_logprobs"):
      break
  else:
    return None

  def fn(hidden, lm_head, targets, *, temperature, vocab_chunk, **unused):
    del unused
    logp, entropy = module.token_logprobs(
        hidden=hidden[None], lm_head=lm_head, targets=targets[None], temperature=temperature,
        vocab_chunk=vocab_chunk, impl="chunked")
    return logp[0], entropy[0]

  fn.source = module.__name__
  return fn


def _loss_and_grads(fn, **kwargs):
  """(hidden, lm_head, targets, w_logp, w_ent) -> (loss, (d_hidden, d_lm_head))."""

  def loss(hidden, lm_head, targets, w_logp, w_ent):
    logp, entropy = fn(hidden, lm_head, targets, **kwargs)
    return jnp.sum(w_logp * logp) + jnp.sum(w_ent * entropy)

  return jax.value_and_grad(loss, argnums=(0, 1))


def _abstract_args(m, d, v, dtype, sharding=None):
  s = dict(sharding=sharding) if sharding is not None else {}
  return (jax.ShapeDtypeStruct((m, d), dtype, **s), jax.ShapeDtypeStruct((d, v), dtype, **s),
          jax.ShapeDtypeStruct((m,), jnp.int32, **s), jax.ShapeDtypeStruct((m,), jnp.float32, **s),
          jax.ShapeDtypeStruct((m,), jnp.float32, **s))


def _concrete_args(m, d, v, dtype):
  k_h, k_w, k_t, k_g = jax.random.split(jax.random.key(0), 4)
  hidden = jax.random.normal(k_h, (m, d), jnp.float32).astype(dtype)
  lm_head = (jax.random.normal(k_w, (d, v), jnp.float32) / math.sqrt(d)).astype(dtype)
  targets = jax.random.randint(k_t, (m,), 0, v, jnp.int32)
  w_logp, w_ent = jax.random.normal(k_g, (2, m), jnp.float32)
  return hidden, lm_head, targets, w_logp, w_ent


def _memory(step, abstract_args):
  """Compiled memory in MiB: (argument, output, temp, peak = argument + output + temp - alias)."""
  analysis = jax.jit(step).lower(*abstract_args).compile().memory_analysis()
  arg, out = analysis.argument_size_in_bytes, analysis.output_size_in_bytes
  temp, alias = analysis.temp_size_in_bytes, analysis.alias_size_in_bytes
  return tuple(x / _MIB for x in (arg, out, temp, arg + out + temp - alias))


def _wall_time(step, args, iters):
  """Median seconds per call after one warm-up (compile) call."""
  jitted = jax.jit(step)
  jax.block_until_ready(jitted(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(jitted(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _tpu_sharding(topology):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(
      topology_name=topology, platform="tpu", chip_config_name="megacore",
      chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False,) * 3).devices
  mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()), devices[0]


def main(argv):
  args = _parse_args(argv)
  print("$ python " + " ".join([sys.argv[0]] + argv))
  backend = jax.default_backend()
  on_tpu_target = args.tpu_topology is not None
  dtype = jnp.dtype(args.dtype)
  m, d, v = args.tokens, args.embed, args.vocab
  time_tokens = args.time_tokens
  if time_tokens is None:
    time_tokens = m if backend != "cpu" else 256
  if on_tpu_target:
    time_tokens = 0
  interpret = backend == "cpu" and not on_tpu_target

  kernel = logprobs.fused_kernel("tpu" if on_tpu_target else backend)
  blocks = {k: v for k, v in (("block_m", args.block_m), ("block_v", args.block_v)) if v}
  common = dict(temperature=args.temperature)
  paths = {
      "full": _loss_and_grads(logprob.reference_token_logprobs, **common),
      "fused": _loss_and_grads(kernel.fused_token_logprobs, interpret=interpret, **common,
                               **blocks),
  }
  notes = {"full": "jax.nn.log_softmax on [M, V] f32 logits",
           "fused": f"Pallas {kernel.__name__.rsplit('.', 1)[-1]} "
                    + ("interpret mode (CPU emulation)" if interpret else "compiled")}
  if args.chunked:
    chunked = _chunked_fn()
    if chunked is None:
      print("--chunked: no dypo_jax.rl.losses / dypo_jax.models.logprobs token_logprobs; skipped")
    else:
      paths["chunked"] = _loss_and_grads(chunked, vocab_chunk=args.vocab_chunk, **common)
      notes["chunked"] = f"{chunked.source}.token_logprobs impl=chunked C={args.vocab_chunk}"

  sharding, target = None, f"{backend} ({jax.devices()[0].device_kind})"
  if on_tpu_target:
    sharding, device = _tpu_sharding(args.tpu_topology)
    target = f"compile-only {device.device_kind} of {args.tpu_topology}"
  print(f"jax {jax.__version__}; memory compiled for {target}")
  print(f"M={m} D={d} V={v} dtype={args.dtype} temperature={args.temperature} "
        f"blocks={blocks or 'kernel defaults'}; forward + backward w.r.t. hidden and lm_head")
  if time_tokens:
    print(f"wall time: median of {args.iters} runs after a warm-up, at M={time_tokens}"
          + (f" (reduced from M={m})" if time_tokens != m else ""))

  abstract = _abstract_args(m, d, v, dtype, sharding)
  concrete = _concrete_args(time_tokens, d, v, dtype) if time_tokens else None
  header = (f"{'path':<8} {'args MiB':>9} {'out MiB':>9} {'temp MiB':>9} {'peak MiB':>9} "
            f"{'time s':>8}")
  rows, peaks = [], {}
  for name, step in paths.items():
    arg, out, temp, peak = _memory(step, abstract)
    peaks[name] = peak
    timed = concrete is not None and (name != "fused" or not interpret or args.time_fused)
    seconds = f"{_wall_time(step, concrete, args.iters):.3f}" if timed else "-"
    rows.append(f"{name:<8} {arg:>9.1f} {out:>9.1f} {temp:>9.1f} {peak:>9.1f} {seconds:>8}"
                f"  {notes[name]}")
  print(header)
  print("\n".join(rows))
  print(f"peak memory full / fused: {peaks['full'] / peaks['fused']:.1f}x "
        f"(one [M, V] f32 logits array alone is {m * v * 4 / _MIB:.0f} MiB)")
  if "chunked" in peaks:
    print(f"peak memory full / chunked: {peaks['full'] / peaks['chunked']:.1f}x")
  if interpret:
    print("note: fused memory above is the Pallas interpreter's on CPU (it NaN-pads and copies "
          "operands); --tpu_topology v4:2x2x1 compiles the real kernel for a TPU chip."
          + ("" if args.time_fused else " Fused not timed on CPU (interpret mode; --time_fused)."))


if __name__ == "__main__":
  main(sys.argv[1:])

"""Block sizes of the GPU (Triton) log-prob kernel: time and memory per setting, on one GPU.

For loss = sum(w_logp * logp) + sum(w_ent * entropy) at M tokens, D embed, V vocab, prints per
setting of (block_m, block_v, block_d, num_warps, vocab_splits) the forward time, the forward +
backward time and the compiled peak memory, beside XLA's full-vocabulary and chunked paths. The
first setting is the kernel's bfloat16 default, the second its float32 one (`_DEFAULTS` in
kernels/logprob_gpu.py); pick new ones from the table.

  python benchmarks/logprob_gpu_blocks.py                  # M=4096 D=896 V=151,936 bfloat16
  python benchmarks/logprob_gpu_blocks.py --dtype float32

On CPU it runs the kernel in the Pallas interpreter at the size given (a smoke test only: use
e.g. --tokens 32 --embed 32 --vocab 512 --iters 1).
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import logprob_memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from dypo_jax.kernels import logprob_gpu  # pylint: disable=g-import-not-at-top,wrong-import-position
from dypo_jax.models import logprobs  # pylint: disable=g-import-not-at-top,wrong-import-position

# (block_m, block_v, block_d, num_warps, vocab_splits).
SETTINGS = [
    (128, 256, 64, 8, 4),
    (64, 128, 64, 4, 8),
    (128, 256, 64, 8, 8),
    (128, 256, 32, 8, 4),
    (128, 256, 64, 4, 4),
    (64, 256, 64, 8, 4),
    (256, 128, 64, 8, 4),
    (128, 128, 64, 8, 4),
]


def main(argv):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--embed", type=int, default=896)
  ap.add_argument("--vocab", type=int, default=151936)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--iters", type=int, default=5)
  ap.add_argument("--settings", type=int, default=len(SETTINGS), help="first N settings only")
  args = ap.parse_args(argv)
  print("$ python " + " ".join([sys.argv[0]] + argv))
  interpret = jax.default_backend() == "cpu"
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}"
        + (" (Pallas interpreter: a smoke test, not a measurement)" if interpret else ""))
  m, d, v, dtype = args.tokens, args.embed, args.vocab, jnp.dtype(args.dtype)
  print(f"M={m} D={d} V={v} {args.dtype}; median of {args.iters} after a warm-up")
  concrete = logprob_memory._concrete_args(m, d, v, dtype)  # pylint: disable=protected-access
  abstract = logprob_memory._abstract_args(m, d, v, dtype)  # pylint: disable=protected-access

  def xla(impl):
    def fn(hidden, lm_head, targets, **unused):
      del unused
      lp, en = logprobs.token_logprobs(hidden=hidden[None], lm_head=lm_head,
                                       targets=targets[None], impl=impl)
      return lp[0], en[0]
    return fn

  paths = [("xla full", xla("full")), ("xla chunked", xla("chunked"))]
  for bm, bv, bd, warps, splits in SETTINGS[:args.settings]:
    kw = dict(block_m=bm, block_v=bv, block_d=bd, num_warps=warps, vocab_splits=splits,
              interpret=interpret)
    paths.append((f"{bm}x{bv}x{bd} w{warps} s{splits}",
                  lambda h, w, t, kw=kw, **unused: logprob_gpu.fused_token_logprobs(h, w, t, **kw)))
  print(f"{'path':<24} {'fwd s':>8} {'fwd+bwd s':>10} {'peak MiB':>9}")
  for name, fn in paths:
    both = logprob_memory._loss_and_grads(fn)  # pylint: disable=protected-access
    try:
      fwd_s = logprob_memory._wall_time(  # pylint: disable=protected-access
          lambda h, w, t, fn=fn: fn(h, w, t), concrete[:3], args.iters)
      both_s = logprob_memory._wall_time(both, concrete, args.iters)  # pylint: disable=protected-access
      peak = logprob_memory._memory(both, abstract)[3]  # pylint: disable=protected-access
      print(f"{name:<24} {fwd_s:>8.4f} {both_s:>10.4f} {peak:>9.1f}", flush=True)
    except Exception as e:  # pylint: disable=broad-except
      print(f"{name:<24} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])

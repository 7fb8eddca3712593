r"""Model FLOP utilisation of the update step on this machine's CPU.

1. Peak: the median FLOP/s of a jitted `jnp.dot` of two [n, n] float32 matrices (2·n^3 FLOPs),
   measured in the same run (the machine is shared, so a figure from elsewhere would not do).
2. Step: the trainer's real jitted update (`Trainer.update`, the same program W1 runs) on a model
   big enough to be matmul-bound (default hidden 512, 4 layers, 4 heads of 128 / 2 KV heads,
   MLP 2048, vocab 512: 16 M parameters) and a synthetic batch of full-length Mid groups
   (`w1_step.synthetic_batch`): the policy forward + backward and the reference forward (beta_KL
   0.04), AdamW.
3. Model FLOPs per step as counted by `w1_step.update_flops` (matmuls, 2 per MAC: 3x the policy
   forward + the reference forward; attention over all key slots as executed; LM head only at
   response positions; each prompt counted once per group on the shared-prompt path); the usual 6·N·tokens is printed beside it.

MFU = model FLOPs per step / step seconds / peak FLOP/s. Nothing is asserted.

Run (from the repository root):
  python benchmarks/mfu.py
  python benchmarks/mfu.py --tiny --reps 1     # seconds: a smoke run
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import w1_step  # noqa: E402


def matmul_peak(n: int, reps: int) -> tuple[float, list[float]]:
  """Median FLOP/s of an [n, n] @ [n, n] float32 jnp.dot (after a compile call), all rates."""
  ka, kb = jax.random.split(jax.random.key(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  rates = []
  for _ in range(reps):
    t0 = time.perf_counter()
    dot(a, b).block_until_ready()
    rates.append(2 * n ** 3 / (time.perf_counter() - t0))
  return float(np.median(rates)), rates


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, default=2048, help="matmul size for the peak")
  ap.add_argument("--peak-reps", type=int, default=7)
  ap.add_argument("--reps", type=int, default=3, help="timed update steps (after the compile)")
  ap.add_argument("--hidden", type=int, default=512)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--prompts", type=int, default=2, help="U, groups per update")
  ap.add_argument("--gens", type=int, default=8, help="K, rows per group")
  ap.add_argument("--new-tokens", type=int, default=32, help="T (the prompt is 32 tokens)")
  ap.add_argument("--method", choices=("grpo", "dypo"), default="grpo")
  ap.add_argument("--tiny", action="store_true", help="n 256, hidden 64, 1 layer: a smoke run")
  args = ap.parse_args()
  if args.tiny:
    args.n, args.hidden, args.layers, args.prompts, args.gens, args.new_tokens = (
        256, 64, 1, 2, 2, 8)
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  config = w1_step.w1_config(args.method, hidden=args.hidden, layers=args.layers,
                             prompts=args.prompts, k=args.gens, new_tokens=args.new_tokens)
  w1_step.host.configure_host(config.mesh)  # Before JAX starts.
  print(f"jax {jax.__version__} devices={jax.devices()} cpu count {os.cpu_count()}", flush=True)

  peak, rates = matmul_peak(args.n, args.peak_reps)
  print(f"matmul peak: [{args.n}x{args.n}] f32 jnp.dot median {peak / 1e9:.1f} GFLOP/s "
        f"(min {min(rates) / 1e9:.1f}, max {max(rates) / 1e9:.1f}; {len(rates)} reps)", flush=True)

  trainer = w1_step.build_trainer(config, num_records=args.prompts)
  mc = trainer.sampler.config
  batch = w1_step.synthetic_batch(trainer)
  rows = args.prompts * args.gens
  with_ref = trainer.program.step_cfg.kl_coef > 0 or trainer.program.step_cfg.use_gal
  # The synthetic batch holds groups only, so the trainer takes the shared-prompt path if on.
  group = args.gens if trainer.config.train.shared_prompt else 1
  flops = w1_step.update_flops(mc=mc, rows=rows, prompt_len=trainer.prompt_len,
                               resp_len=trainer.max_len, with_ref=with_ref, group=group)
  print(f"model: {mc.num_layers}L d={mc.embed_dim} heads={mc.num_heads}/{mc.num_kv_heads}x"
        f"{mc.head_dim} mlp={mc.mlp_dim} vocab={mc.vocab_size} params={mc.num_params / 1e6:.2f}M;"
        f" batch {rows} rows x {trainer.prompt_len + trainer.max_len} tokens; method "
        f"{args.method} (reference forward: {with_ref})", flush=True)

  t0 = time.perf_counter()
  jax.block_until_ready(trainer.update(batch))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.reps):
    t0 = time.perf_counter()
    jax.block_until_ready(trainer.update(batch))
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  achieved = flops["total"] / step_s
  print(f"update step: first call (compile) {compile_s:.2f}s; median {step_s:.3f}s of "
        f"{[round(t, 3) for t in times]}")
  print(f"model FLOPs per step: {flops['total'] / 1e9:.2f} GFLOP (policy forward "
        f"{flops['policy_fwd'] / 1e9:.2f} x {4 if with_ref else 3}; attention "
        f"{100 * flops['attention_share']:.0f}% of the forward); 6·N·tokens would say "
        f"{flops['six_n'] / 1e9:.2f} GFLOP (policy only)")
  print(f"RESULT mfu achieved = {achieved / 1e9:.1f} GFLOP/s; peak = {peak / 1e9:.1f} GFLOP/s; "
        f"utilisation = {achieved / peak:.3f}")


if __name__ == "__main__":
  main()

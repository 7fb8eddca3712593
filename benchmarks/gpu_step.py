r"""Workload G1 (an accelerator's workload) through the real `dypo_jax.rl.trainer.Trainer`.

G1 (as the TRL peer `../shared/bench/gpu/trl_grpo_gpu.py` runs it): the Qwen2.5-0.5B shape with
random weights (hidden 896, 24 layers, 14 / 2 heads of 64, MLP 4,864, vocab 151,936, tied),
float32 master weights with bfloat16 compute, 32 prompts x 8 samples, prompts of exactly 128
tokens, 512 new tokens, temperature 0.9, beta_KL 0.04 (k3), lr 1e-6, grad clip 1.0,
seq-mean-token-mean, 8 micro-batches, one update a step. `--layers 4` is the quick variant.
Prompts, tokenizer and toy reward are W1's (`w1_step.py`); a random model almost never samples
EOS, so responses run to 512 tokens.

  python benchmarks/gpu_step.py --layers 4 --steps 3          # On a GPU.
  python benchmarks/gpu_step.py --tiny --steps 1              # A CPU smoke run at toy sizes.

Figures, beside the peer's: steps/s and the whole step, rollout tokens/s and its share of the
step, first step (compiles), peak device memory; and the chip's use: the update's model TFLOP/s
(`w1_step.update_flops`) against `--peak-tflops` (MFU), and rollout tokens/s against the HBM
roofline of decoding (every step reads the compute-dtype weights once and the KV cache of every
row, at `--hbm-tbps`). Defaults are one H200's measured limits (790 TFLOP/s bf16, 4.3 TB/s).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import w1_step  # noqa: E402  (sets up the path and the W1 pieces)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.parallel import host  # noqa: E402

G1_MODEL = dict(embed_dim=896, num_layers=24, num_heads=14, num_kv_heads=2, head_dim=64,
                mlp_dim=4864, vocab_size=151936, tie_embeddings=True, rope_theta=1000000.0,
                param_dtype="float32", dtype="bfloat16")


def g1_config(args):
  """W1's config reshaped to G1 (see module docstring)."""
  c = w1_step.w1_config(args.method, prompts=args.prompts, k=args.gens,
                        new_tokens=args.new_tokens, kl_coef=0.04,
                        num_steps=args.warmup + args.steps, micro_batches=args.micro_batches)
  model = dict(G1_MODEL, num_layers=args.layers)
  if args.tiny:
    model.update(embed_dim=64, num_heads=4, num_kv_heads=2, head_dim=16, mlp_dim=128,
                 vocab_size=512, dtype="float32")
  c.model.update(model)
  c.model.max_seq_len = args.prompt_tokens + args.new_tokens + 1
  c.sampler.prompt_buckets = (args.prompt_tokens,)
  c.optim.learning_rate = 1e-6
  return c


def decode_roofline_tokens_s(mc, *, rows: int, prompt_len: int, new_tokens: int,
                             hbm_bytes_s: float) -> float:
  """Tokens/s if each decode step only read, at `hbm_bytes_s`, the weights in the compute dtype
  and the KV cache of every row (on average half the responses written)."""
  itemsize = np.dtype(jax.numpy.dtype(mc.dtype)).itemsize
  weights = mc.num_params * itemsize
  slots = prompt_len + new_tokens / 2
  cache = 2 * mc.num_layers * rows * mc.num_kv_heads * slots * mc.head_dim * itemsize
  return rows / ((weights + cache) / hbm_bytes_s)


def peak_device_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--method", choices=("grpo", "dypo"), default="grpo")
  ap.add_argument("--layers", type=int, default=24)
  ap.add_argument("--prompts", type=int, default=32)
  ap.add_argument("--gens", type=int, default=8, help="k, samples per prompt")
  ap.add_argument("--prompt-tokens", type=int, default=128)
  ap.add_argument("--new-tokens", type=int, default=512)
  ap.add_argument("--micro-batches", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup)")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps (the first compiles)")
  ap.add_argument("--peak-tflops", type=float, default=790.0, help="the chip's bf16 peak")
  ap.add_argument("--hbm-tbps", type=float, default=4.3, help="the chip's HBM bandwidth")
  ap.add_argument("--tiny", action="store_true", help="toy sizes: a CPU smoke run")
  args = ap.parse_args()
  if args.tiny:
    args.layers, args.prompts, args.gens = min(args.layers, 2), 2, 2
    args.prompt_tokens, args.new_tokens, args.micro_batches = 32, 8, 1
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  config = g1_config(args)
  host.configure_host(config.mesh)
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  trainer = w1_step.build_trainer(config, num_records=args.prompts * (args.warmup + args.steps) * 2,
                                  prompt_words=args.prompt_tokens - 1)
  mc = trainer.sampler.config
  print(f"model: {mc.num_layers}L d={mc.embed_dim} vocab={mc.vocab_size} "
        f"params={mc.num_params / 1e6:.1f}M {mc.param_dtype}/{mc.dtype}; P={trainer.prompt_len} "
        f"T={trainer.max_len}; method={args.method}", flush=True)

  steps = []
  for i in range(args.warmup + args.steps):
    start = time.perf_counter()
    s = w1_step.run_step(trainer)
    s["wall_s"] = time.perf_counter() - start
    steps.append(s)
    print(f"step {i}{' (warm-up)' if i < args.warmup else ''}: {s['step_s']:.3f}s = sample "
          f"{s['sample_s']:.3f} + update {s['update_s']:.3f} + other "
          f"{s['step_s'] - s['sample_s'] - s['update_s']:.3f}; {s['tokens']} tokens", flush=True)

  timed = steps[args.warmup:]
  step_s = float(np.median([s["step_s"] for s in timed]))
  update_s = float(np.median([s["update_s"] for s in timed]))
  tokens = sum(s["tokens"] for s in timed)
  sample_s = sum(s["sample_s"] for s in timed)
  rows = args.prompts * args.gens
  group = args.gens if config.train.shared_prompt else 1
  flops = w1_step.update_flops(mc=mc, rows=rows, prompt_len=trainer.prompt_len,
                               resp_len=trainer.max_len, with_ref=True, group=group)
  update_tflops = flops["total"] / update_s / 1e12
  roofline = decode_roofline_tokens_s(mc, rows=rows, prompt_len=trainer.prompt_len,
                                      new_tokens=args.new_tokens,
                                      hbm_bytes_s=args.hbm_tbps * 1e12)
  rollout_tok_s = tokens / sample_s
  name = f"dypo_jax_{args.method}"
  peak = peak_device_memory_gib()
  print(f"RESULT {name} steps/s = {1 / step_s:.3f} (median step {step_s:.3f}s, {rows} seqs/step)")
  rollout_share = sample_s / sum(s["step_s"] for s in timed)
  print(f"RESULT {name} rollout tokens/s = {rollout_tok_s:.1f} ({100 * rollout_share:.0f}% of "
        f"the step); decode roofline {roofline:.0f} tokens/s "
        f"({args.hbm_tbps} TB/s) -> {100 * rollout_tok_s / roofline:.1f}% of it")
  print(f"RESULT {name} update {update_s:.3f}s = {update_tflops:.1f} model TFLOP/s -> MFU "
        f"{100 * update_tflops / args.peak_tflops:.1f}% of {args.peak_tflops} TFLOP/s")
  print(f"RESULT {name} first step (compiles) s = {steps[0]['step_s']:.2f}; peak device memory "
        f"GiB = {'n/a' if peak is None else f'{peak:.1f}'}; peak host RSS MB = "
        f"{w1_step.peak_rss_mb():.0f}")


if __name__ == "__main__":
  main()

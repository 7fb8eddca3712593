"""Workload W1, sampler alone: 64 sequences x 32 new tokens on the tiny Qwen2 (KV cache on).

8 prompts x 8 samples (one prefill per prompt, shared by its 8 samples), prompts of 32 tokens,
temperature 0.9, top-p 1.0, stop at EOS like the peers. Tokens counted as the peers count them:
the generated tokens that are kept (`SampleOutput.lengths`). Figures: median tokens/s over the
timed repeats (after warm-up), first-call seconds (includes the compile), peak RSS, and the
process CPU time per call (all threads; steadier than wall time when other jobs load the CPUs).

Run (from the repository root):
  python benchmarks/sampler.py                 # peers' protocol: 6 reps, median of reps 2-5
  python benchmarks/sampler.py --reps 30       # more timed repeats, steadier median
  python benchmarks/sampler.py --distinct      # 64 distinct prompts x 1 sample (as the peers)
  python benchmarks/sampler.py --devices 2     # 2 host devices, batch split over data=2
"""
import argparse
import dataclasses
import os
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--devices" in sys.argv:  # XLA reads the device count once, before jax is imported.
  _n = sys.argv[sys.argv.index("--devices") + 1]
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + f" --xla_force_host_platform_device_count={_n}")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
from flax import nnx  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.models import builder  # noqa: E402
from dypo_jax.models import sampler as sampler_lib  # noqa: E402
from dypo_jax.parallel import sharding  # noqa: E402
import w1  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--reps", type=int, default=6, help="calls in all, the first --warmup untimed")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--distinct", action="store_true", help="64 prompts x 1 sample")
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--cache-dtype", default=None)
  ap.add_argument("--dtype", default="float32",
                  help="the model's compute dtype (parameters stay float32)")
  ap.add_argument("--scan-layers", type=int, choices=(0, 1), default=0,
                  help="model.scan_layers: 0 (default) a loop over W1's 2 layers, what a CPU run "
                  "at this depth uses; 1 the scanned stack")
  ap.add_argument("--devices", type=int, default=1,
                  help="host CPU devices; > 1 splits the batch over a data-parallel mesh")
  args = ap.parse_args()

  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  config = dataclasses.replace(w1.model_config(hidden=args.hidden, layers=args.layers),
                               dtype=args.dtype, scan_layers=bool(args.scan_layers))
  mesh = None
  if args.devices > 1:
    mesh = sharding.make_mesh({"data": args.devices})
    model = builder.build(builder.ModelOptions(config), mesh)
  else:
    model = w1.make_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  n_prompts, k = w1.NUM_PROMPTS, w1.NUM_SAMPLES
  if args.distinct:
    n_prompts, k = n_prompts * k, 1
  prompts, source = w1.make_prompts(n_prompts)
  print(f"model: dypo_jax Transformer {config.num_layers}L d={config.embed_dim} "
        f"heads={config.num_heads}/{config.num_kv_heads} vocab={config.vocab_size} "
        f"params={config.num_params / 1e6:.3f}M; prompts from {source}", flush=True)
  sampler = sampler_lib.Sampler(graphdef, model_config=config, pad_id=w1.PAD_ID,
                                cache_dtype=args.cache_dtype, mesh=mesh)

  rates, cpu_ms, first = [], [], None
  for rep in range(args.reps):
    ts, cs = time.perf_counter(), time.process_time()
    out = sampler.sample(params, prompts, num_samples=k, max_new_tokens=w1.NEW_TOKENS,
                         temperature=w1.TEMPERATURE, top_p=w1.TOP_P, stop_ids=(w1.EOS_ID,),
                         rng=jax.random.key(rep))
    te, ce = time.perf_counter(), time.process_time()
    ntok = int(out.lengths.sum())
    if rep == 0:
      first = te - ts
    if rep >= args.warmup:
      rates.append(ntok / (te - ts))
      cpu_ms.append(1e3 * (ce - cs))
    print(f"sampler rep{rep}: {n_prompts * k} seqs, {ntok} new tokens, {te - ts:.4f}s -> "
          f"{ntok / (te - ts):.1f} tok/s" + (" (includes compile)" if rep == 0 else ""),
          flush=True)
  peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"RESULT dypo_sampler tokens/s = {np.median(rates):.1f} (median of reps "
        f"{args.warmup}-{args.reps - 1}; {n_prompts * k} seqs x {w1.NEW_TOKENS} new tokens, "
        f"prompt {len(prompts[0])}, {n_prompts} prompts x {k} samples, {args.devices} device(s); "
        f"min {np.min(rates):.1f} "
        f"max {np.max(rates):.1f}; process CPU {np.median(cpu_ms):.1f} ms/call)")
  print(f"RESULT dypo_sampler first call (compile) s = {first:.2f}; compiles = "
        f"{sampler.trace_count}; peak RSS MB = {peak_mb:.0f}")


if __name__ == "__main__":
  main()

r"""Time and memory of one DYPO update step as response length, group size and width grow.

One axis at a time from a small base (hidden 64, 2 layers, U = 2 groups of k = 4, T = 128
response tokens after a 32-token prompt, vocab 512, DYPO: alpha 0.5 so GAL and the reference
forward run, beta_KL 0.04):

  response length T   128, 256, 512, 1024, 2048
  group size k        2, 4, 8, 16
  model width D       64, 128, 256, 512 (4 heads of D/4, 2 KV heads, MLP 4·D)

Each point builds a W1-style Trainer (`w1_step.build_trainer`) and compiles its real jitted
update (`Trainer.update_fn(...)`, ahead of time with the trainer's shardings and donation) on a
synthetic batch of full-length Mid groups (`w1_step.synthetic_batch`: the worst case, every
response token real). Figures per point: compile seconds, median step seconds (after one
untimed call), XLA's memory analysis of the compiled step (temporaries, and temporaries +
arguments + outputs - aliased), and the process's peak RSS so far (monotone, so only a bound).
The sampler is not part of it (see w1_step.py / sampler.py for rollouts).

Output: a table on stdout and a PNG (matplotlib, Agg) at --out.

Run (from the repository root):
  python benchmarks/scaling.py                         # a few minutes on 2 cores
  python benchmarks/scaling.py --quick                 # seconds: toy axes
"""
import argparse
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.rl import update_batch  # noqa: E402
import w1_step  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))
AXES_FULL = {"T": (128, 256, 512, 1024, 2048), "k": (2, 4, 8, 16), "D": (64, 128, 256, 512)}
AXES_QUICK = {"T": (16, 32), "k": (2, 4), "D": (32, 64)}
BASE_FULL = {"T": 128, "k": 4, "D": 64}
BASE_QUICK = {"T": 16, "k": 2, "D": 32}


def measure(point: dict[str, int], *, prompts: int, layers: int, reps: int, tok,
            attention_chunk: int = 0, host_reuse_memory: bool = True) -> dict[str, float]:
  """Compile and time the DYPO update at one (T, k, D) point."""
  config = w1_step.w1_config("dypo", hidden=point["D"], layers=layers, prompts=prompts,
                             k=point["k"], new_tokens=point["T"], attention_chunk=attention_chunk,
                             host_reuse_memory=host_reuse_memory)
  trainer = w1_step.build_trainer(config, num_records=prompts, tokenizer=tok)
  batch = w1_step.synthetic_batch(trainer)
  device_batch = {name: jax.device_put(value, trainer.program.batch_shardings[name])
                  for name, value in batch.items()}
  key = jax.random.key(0)
  t0 = time.perf_counter()
  step = trainer.update_fn(shared_prompt=update_batch.slots_share_prompts(
      batch, trainer.prompt_len), term_norms=False)
  compiled = step.lower(trainer.run_state.train, trainer.run_state.ref_params, device_batch,
                                      key).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  temp = getattr(mem, "temp_size_in_bytes", 0) if mem is not None else 0
  total = temp + (getattr(mem, "argument_size_in_bytes", 0) + getattr(
      mem, "output_size_in_bytes", 0) - getattr(mem, "alias_size_in_bytes", 0)
                  if mem is not None else 0)
  state = trainer.run_state.train
  t0 = time.perf_counter()
  state, metrics = compiled(state, trainer.run_state.ref_params, device_batch, key)
  jax.block_until_ready((state, metrics))
  first = time.perf_counter() - t0
  times = []
  for _ in range(reps if first < 2.0 else 1):  # Long steps: one timed call is enough.
    t0 = time.perf_counter()
    state, metrics = compiled(state, trainer.run_state.ref_params, device_batch, key)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - t0)
  trainer.run_state.train = state
  rows = prompts * point["k"]
  return {"compile_s": compile_s, "step_s": float(np.median(times)), "temp_mb": temp / 2**20,
          "xla_mb": total / 2**20, "rss_mb": w1_step.peak_rss_mb(),
          "tokens": rows * (trainer.prompt_len + trainer.max_len),
          "params_m": trainer.sampler.config.num_params / 1e6,
          "loss": float(metrics["loss/total"])}


def plot(results: dict[str, list], out: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  labels = {"T": "response length T (tokens)", "k": "group size k", "D": "model width D"}
  fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 4))
  for ax, (axis, rows) in zip(np.atleast_1d(axes), results.items()):
    xs = [r[0] for r in rows]
    ax.plot(xs, [r[1]["step_s"] for r in rows], "o-", color="tab:blue", label="step s")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(labels[axis])
    ax.set_ylabel("update step (s)", color="tab:blue")
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs])
    mem_ax = ax.twinx()
    mem_ax.plot(xs, [r[1]["xla_mb"] for r in rows], "s--", color="tab:red", label="XLA MB")
    mem_ax.set_yscale("log")
    mem_ax.set_ylabel("compiled step memory (MB)", color="tab:red")
    ax.set_title(f"DYPO update vs {axis}")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=100)
  plt.close(fig)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="toy axes, seconds")
  ap.add_argument("--axes", default="T,k,D", help="comma-separated subset of T,k,D")
  ap.add_argument("--prompts", type=int, default=2, help="U, groups per update")
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--reps", type=int, default=2,
                  help="timed calls per point (after one untimed; 1 when a call takes > 2 s)")
  ap.add_argument("--attention-chunk", type=int, default=0,
                  help="model.attention_chunk (query blocks; 0 = whole [T, S] at once)")
  w1_step.add_host_memory_arg(ap)
  ap.add_argument("--out", default=os.path.join(_HERE, "out", "scaling.png"))
  args = ap.parse_args()
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  w1_step.host.configure_host(  # Before JAX starts.
      w1_step.w1_config("dypo", host_reuse_memory=args.host_reuse_memory).mesh)
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  axes = AXES_QUICK if args.quick else AXES_FULL
  base = BASE_QUICK if args.quick else BASE_FULL
  layers = 1 if args.quick else args.layers
  print(f"base point {base}, U={args.prompts} groups, {layers} layers, DYPO alpha 0.5, "
        f"beta_KL 0.04, attention_chunk {args.attention_chunk}; {args.reps} timed reps per point",
        flush=True)
  tok = w1_step.make_tokenizer()
  cache: dict[tuple, dict] = {}
  results: dict[str, list] = {}
  print(f"{'axis':<4} {'value':>6} {'params M':>9} {'tokens':>7} {'compile s':>10} "
        f"{'step s':>8} {'tok/s':>8} {'XLA temp MB':>12} {'XLA total MB':>13} "
        f"{'peak RSS MB':>12}", flush=True)
  for axis in [a.strip() for a in args.axes.split(",") if a.strip()]:
    if axis not in axes:
      raise ValueError(f"--axes: unknown axis {axis!r}; allowed: T, k, D")
    results[axis] = []
    for value in axes[axis]:
      point = dict(base, **{axis: value})
      key = tuple(sorted(point.items()))
      if key not in cache:
        cache[key] = measure(point, prompts=args.prompts, layers=layers, reps=args.reps,
                             tok=tok, attention_chunk=args.attention_chunk,
                             host_reuse_memory=args.host_reuse_memory)
      r = cache[key]
      results[axis].append((value, r))
      print(f"{axis:<4} {value:>6} {r['params_m']:>9.3f} {r['tokens']:>7} "
            f"{r['compile_s']:>10.2f} {r['step_s']:>8.3f} {r['tokens'] / r['step_s']:>8.0f} "
            f"{r['temp_mb']:>12.1f} {r['xla_mb']:>13.1f} {r['rss_mb']:>12.0f}", flush=True)
  plot(results, args.out)
  print(f"plot written to {args.out}")


if __name__ == "__main__":
  main()

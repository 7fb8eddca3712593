r"""Where one DYPO step on W1 spends its time, and whether anything recompiles.

Builds the W1 DYPO trainer of `w1_step.py` (alpha 0.5, beta_KL 0.04), runs --warmup untimed
steps, then --steps timed steps, each split by `w1_step.run_step` into

  sample   Sampler.sample (prefill + decode + device_get), inside Trainer.run_rollout_round
  reward   decode the responses, toy reward, format penalty (host)
  route    grading, teacher draw, MidItem/HardItem construction, queue pushes (host)
  build    QueueSet.pop_batch + Trainer.build_batch (host numpy)
  update   Trainer.update: device_put of the batch + the jitted step + device_get of the metrics
  host     Trainer._host_metrics + RoundStats.metrics

with wall and CPU seconds (process time, all threads: steadier than wall on a shared machine).

The reference log-probs are computed inside the jitted update, so their share is estimated by
timing variants of the same jitted step on the same batch (a real DYPO batch from the last step):
  full        the trainer's StepConfig (kl 0.04, GAL on): policy fwd+bwd, reference fwd, GAL
  no GAL      kl 0.04, GAL off: the reference forward still runs (for the KL term)
  no ref      kl 0, GAL off: no reference forward at all
  ref share ~ (no GAL - no ref) / full,   GAL share ~ (full - no GAL) / full
plus, for context: per-term gradient norms on (base_config's default), logprob_impl="full",
and the policy forward alone (no backward).

Finally the compile counts: the step's and the sampler's trace counters and their jit caches (one
per program: W1's batches always fill the largest slot bucket, and the step has a variant for
batches of groups (shared prompt) and one for a batch with a packed Hard slot (row path)).

With --thunks N: a jax.profiler trace of --reps calls of the trainer's own update on that batch,
and its N costliest XLA:CPU thunks per call (the HLO instruction, its shape and JAX op name), with
the share of dot fusions (`ynn_fusion`, `dot`) against everything else.

Run (from the repository root):
  python benchmarks/profile_step.py --steps 5 --devices 2 --thunks 25
  python benchmarks/profile_step.py --tiny --steps 1 --reps 1
"""
import argparse
import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.rl import rollout  # noqa: E402
from dypo_jax.rl import train_step as step_lib  # noqa: E402
from dypo_jax.rl import update_batch  # noqa: E402
import w1_step  # noqa: E402

PHASES = ("sample_s", "reward_s", "route_s", "build_s", "update_s", "host_metrics_s")


def _cache_size(fn) -> int | None:
  size = getattr(fn, "_cache_size", None)
  return size() if callable(size) else None


def _time_fn(fn, reps: int) -> tuple[float, float]:
  """(median wall s, median cpu s) of fn() over reps calls (after one untimed call)."""
  fn()
  walls, cpus = [], []
  for _ in range(reps):
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    walls.append(time.perf_counter() - w0)
    cpus.append(time.process_time() - c0)
  return float(np.median(walls)), float(np.median(cpus))


def step_variants(trainer, batch: dict[str, np.ndarray], reps: int,
                  only: tuple[str, ...] = ()) -> dict[str, tuple]:
  """Median (wall, cpu) of variants of the jitted update on one batch (see module docstring);
  `only` keeps those named (each variant is one more compile)."""
  base = trainer.program.step_cfg
  variants = {
      "full": base,
      "no GAL": dataclasses.replace(base, use_gal=False),
      "no ref": dataclasses.replace(base, use_gal=False, kl_coef=0.0),
      "per-term grad norms": dataclasses.replace(base, per_term_grad_norms=True),
      "logprob_impl=full": dataclasses.replace(base, logprob_impl="full"),
      f"shared_prompt={not base.shared_prompt}": dataclasses.replace(
          base, shared_prompt=not base.shared_prompt),
      f"shared_prompt={not base.shared_prompt}, logprob_impl=full": dataclasses.replace(
          base, shared_prompt=not base.shared_prompt, logprob_impl="full"),
  }
  if only:
    variants = {name: cfg for name, cfg in variants.items() if name in only}
  device_batch = {name: jax.device_put(value, trainer.program.batch_shardings[name])
                  for name, value in batch.items()}
  key = jax.random.key(0)
  out = {}
  for name, cfg in variants.items():
    step = jax.jit(step_lib.build_train_step(trainer.graphdef, cfg, trainer.program.tx,
                                             trainer.program.schedule))
    state = jax.tree.map(jnp.copy, trainer.run_state.train)

    def call(step=step, state=state):
      jax.block_until_ready(step(state, trainer.run_state.ref_params, device_batch, key))

    out[name] = _time_fn(call, reps)

  # The policy forward alone (log-probs of every row at the sampling temperature), no backward.
  n = batch["tokens"].shape[0] * batch["tokens"].shape[1]
  temp = jnp.full((n,), base.temperature, jnp.float32)
  fwd = jax.jit(lambda p: step_lib._response_logprobs(  # pylint: disable=protected-access
      trainer.graphdef, p, device_batch["tokens"], device_batch["input_mask"], temp, base))
  out["policy forward only"] = _time_fn(
      lambda: jax.block_until_ready(fwd(trainer.run_state.train.params)), reps)
  return out


_HLO_LINE = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def thunk_profile(trainer, batch: dict[str, np.ndarray], reps: int, top: int) -> None:
  """Prints the `top` costliest XLA:CPU thunks of the trainer's update (one call's share).

  Runs after the compile counts: lowering the update again traces it once more.
  """
  key = jax.random.key(0)
  device_batch = {name: jax.device_put(value, trainer.program.batch_shardings[name])
                  for name, value in batch.items()}
  fn = trainer.update_fn(shared_prompt=update_batch.slots_share_prompts(batch, trainer.prompt_len),
                        term_norms=False)
  instructions = {}  # HLO instruction -> (shape, JAX op name)
  rs = trainer.run_state
  hlo = fn.lower(rs.train, rs.ref_params, device_batch, key).compile().as_text()
  for line in hlo.splitlines():
    match = _HLO_LINE.match(line)
    if match and match.group(1) not in instructions:
      op = _OP_NAME.search(line)
      instructions[match.group(1)] = (match.group(2), op.group(1) if op else "")

  def call():
    rs.train, metrics = fn(rs.train, rs.ref_params, device_batch, key)
    jax.block_until_ready(metrics)

  call()
  with tempfile.TemporaryDirectory() as where:
    with jax.profiler.trace(where, create_perfetto_trace=True):
      start = time.perf_counter()
      for _ in range(reps):
        call()
      wall = (time.perf_counter() - start) / reps
    with gzip.open(glob.glob(os.path.join(where, "**", "*.trace.json.gz"), recursive=True)[0]) as f:
      events = json.load(f)["traceEvents"]
  per_call = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in instructions:
      per_call[e["name"]] += e["dur"] / 1e3 / reps  # ms
  total = sum(per_call.values())
  dots = sum(v for k, v in per_call.items() if k.startswith(("ynn_fusion", "dot")))
  print(f"\nXLA:CPU thunks of the update ({len(per_call)} ran; {reps} traced calls, {1e3 * wall:.1f}"
        f" ms a call with the profiler on): {total:.1f} ms of thunk time a call (both cores), "
        f"{100 * dots / max(total, 1e-9):.0f}% in dot fusions")
  for name, ms in per_call.most_common(top):
    shape, op = instructions[name]
    print(f"  {ms:7.2f} ms  {name:<34} {shape:<28} {op.replace('jit(counted_step)/', '')[-70:]}")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--reps", type=int, default=5, help="timed calls per update variant")
  ap.add_argument("--method", choices=("grpo", "dypo"), default="dypo")
  ap.add_argument("--variants", default="",
                  help="comma-separated update variants to time (default: all; each compiles)")
  ap.add_argument("--thunks", type=int, default=0,
                  help="also trace the update and list its N costliest XLA:CPU thunks")
  w1_step.add_size_args(ap)
  args = ap.parse_args()
  w1_step.apply_tiny(args)
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  total = args.warmup + args.steps
  config = w1_step.w1_config(args.method, hidden=args.hidden, layers=args.layers,
                             prompts=args.prompts, k=args.gens, new_tokens=args.new_tokens,
                             kl_coef=args.beta, alpha=args.alpha,
                             per_term_grad_norms=args.per_term_grad_norms, num_steps=total,
                             host_devices=args.devices, host_reuse_memory=args.host_reuse_memory,
                             scan_layers=bool(args.scan_layers))
  w1_step.host.configure_host(config.mesh)
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  trainer = w1_step.build_trainer(config, num_records=args.prompts * total * 2)
  print(f"W1 {args.method}: params {trainer.sampler.config.num_params / 1e6:.3f}M, "
        f"{args.prompts} prompts x {args.gens}, T={args.new_tokens}, use_gal="
        f"{trainer.program.step_cfg.use_gal}, kl={trainer.program.step_cfg.kl_coef}", flush=True)

  for i in range(args.warmup):
    s = w1_step.run_step(trainer)
    print(f"warm-up step {i}: {s['step_s']:.2f}s (update {s['update_s']:.2f}s, sample "
          f"{s['sample_s']:.2f}s)", flush=True)
  compiles_after_warmup = (trainer.update_trace_count, trainer.sampler.trace_count)
  segments_after_warmup = trainer.sampler.segment_trace_count

  timed = []
  for i in range(args.steps):
    timed.append(w1_step.run_step(trainer))
    s = timed[-1]
    print(f"step {i}: wall {s['step_s']:.3f}s cpu {s['cpu_s']:.3f}s; " + ", ".join(
        f"{p[:-2]} {s[p]:.4f}" for p in PHASES), flush=True)

  wall = np.median([s["step_s"] for s in timed])
  print(f"\nPhase shares of the median step ({wall:.3f}s wall; medians per phase):")
  total_med = 0.0
  for p in PHASES:
    med = float(np.median([s[p] for s in timed]))
    total_med += med
    print(f"  {p[:-2]:<8} {med:8.4f}s  {100 * med / wall:5.1f}%")
  print(f"  {'other':<8} {max(wall - total_med, 0):8.4f}s  "
        f"{100 * max(wall - total_med, 0) / wall:5.1f}%  (loop, pops, unaccounted)")

  # A real batch from the queue for the update variants: roll out once more and build it.
  stats = rollout.RoundStats()
  while not trainer.run_state.queues.ready(config.train.update_prompts):
    trainer.run_rollout_round(stats)
  hard, mid, _ = trainer.run_state.queues.pop_batch(config.train.update_prompts)
  batch, _ = trainer.build_batch(hard, mid)
  put = _time_fn(lambda: jax.block_until_ready(
      {n: jax.device_put(v, trainer.program.batch_shardings[n]) for n, v in batch.items()}), 10)
  real = batch["input_mask"].sum()
  print(f"Update batch: {len(hard)} hard / {len(mid)} mid items; tokens [U, K, L] = "
        f"{batch['tokens'].shape}; real tokens {int(real)} of {batch['tokens'].size} "
        f"({100 * real / batch['tokens'].size:.0f}%); response tokens "
        f"{int(batch['resp_mask'].sum())} of {batch['resp_mask'].size}; device_put of the batch "
        f"{1e3 * put[0]:.2f} ms")

  print(f"\nJitted update variants on that batch (median of {args.reps}; wall s / cpu s):")
  var = step_variants(trainer, batch, args.reps,
                      only=tuple(v for v in args.variants.split(",") if v))
  full_w, full_c = var["full"]
  for name, (w, c) in var.items():
    print(f"  {name:<22} {w:8.4f} / {c:8.4f}   {100 * w / full_w:6.1f}% of full (wall), "
          f"{100 * c / full_c:6.1f}% (cpu)")
  ref_w = (var["no GAL"][0] - var["no ref"][0]) / full_w
  ref_c = (var["no GAL"][1] - var["no ref"][1]) / full_c
  gal_w = (full_w - var["no GAL"][0]) / full_w
  upd = float(np.median([s["update_s"] for s in timed]))
  print(f"  reference log-probs ~ {100 * ref_w:.0f}% of the update (wall), {100 * ref_c:.0f}% "
        f"(cpu) = ~{100 * ref_w * upd / wall:.0f}% of the step; GAL loss ~ {100 * gal_w:.0f}% "
        f"of the update")

  # One program per update variant used (shared-prompt path for batches of groups, row path for
  # a batch with a packed Hard slot), each compiled once; the sampler's prefill once, and no
  # decode segment (one per row count it shrinks through) traced after the warm-up.
  steps = trainer._updates  # pylint: disable=protected-access
  compiles = (trainer.update_trace_count, trainer.sampler.trace_count)
  caches = ([_cache_size(step) for step in steps.values()],
            _cache_size(trainer.sampler._start_jit))  # pylint: disable=protected-access
  new_segments = trainer.sampler.segment_trace_count - segments_after_warmup
  # A variant compiled ahead (at the batch shape's first update) but never called holds 0 entries.
  ok = (compiles == (len(steps), 1) and all(c in (None, 0, 1) for c in caches[0])
        and caches[1] in (None, 1) and new_segments == 0)
  variants = ", ".join(f"{'shared-prompt' if shared else 'row'} path" + (" + term norms" if norms
                                                                         else "")
                       for shared, norms in steps)
  print(f"\nCompiles: step traced {compiles[0]}x for {len(steps)} variant(s) used ({variants}), "
        f"sampler traced {compiles[1]}x (after warm-up: {compiles_after_warmup}); jit cache "
        f"entries per step variant {caches[0]}, sampler prefill {caches[1]}; "
        f"{new_segments} decode segment(s) traced after warm-up -> "
        f"{'OK (1 per program)' if ok else 'RECOMPILED'}")
  print(f"Peak RSS MB = {w1_step.peak_rss_mb():.0f}")
  if args.thunks:
    thunk_profile(trainer, batch, args.reps, args.thunks)


if __name__ == "__main__":
  main()

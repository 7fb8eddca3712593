"""Long-tailed response lengths: rollout efficiency of the sampler, and decode cost by position.

Workload: the W1 model shape (Qwen2, hidden 128, 2 layers, vocab 512; benchmarks/w1.py) and W1's
8 prompts x 8 samples, max_new_tokens 512 and 2048, temperature 1.0, the sampler's default
settings (`sampler.rows` = 0: every sample of the round in flight at once, compacted as rows end).

Lengths. The random model is edited so that the real stop path ends responses with a constant
probability q per token: every token's embedding gets a large constant in dimension 0 (so the
final-norm hidden state has a near-constant first coordinate), and the LM head reads dimension 0
only into the stop id's logit, at a value that makes the stop's probability q = 1 / mean against
the ~uniform other 511 tokens. Response lengths are then geometric, truncated at
max_new_tokens: median ~0.69 mean, p90 ~2.3 mean, and the longest of 64 ~4.7 mean. With the mean
at max_new_tokens / 8 this is the distribution the issue measured on the W1 model (median 50, p90
164, max 366 at 512). Nothing in the sampler knows of it: it samples and stops as always.

Figures (`rollout_efficiency`):
  useful tokens/s  = sum of the response lengths (stop token included) / wall seconds of a call
  uniform tokens/s = the same sampler, same prompts, samples and settings, with no stop id and
                     max_new_tokens = round(mean long-tail length): every row runs that many tokens
  rollout efficiency = useful tokens/s / uniform tokens/s (1.0: a long-tailed round costs what the
                     same number of tokens at uniform length costs)
Each is the median over timed calls (each call a new rng) after warm-up calls that compile.
`decode_step_times` times one decode step of 64 rows at the position S/8 and at S - 1 of an
S-slot cache (S = prompt + max_new_tokens).

The update efficiency (the other half of issue 27) is benchmarks/longtail_update.py's (the packed
update on the same length distribution against the same update at uniform length; see its
docstring), run for each max_new_tokens after the rollout figures (`--update-reps 0`: skipped,
printed "n/a").

Run (from the repository root):
  python benchmarks/longtail.py                       # 512 and 2048, 2 warm-up + 5 timed calls
  python benchmarks/longtail.py --new-tokens 512 --reps 9 --rows 16
"""
import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# This checkout's dypo_jax, not an installed one (longtail_update imports it the same way).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.models import kv_cache  # noqa: E402
from dypo_jax.models import sampler as sampler_lib  # noqa: E402
import longtail_update  # noqa: E402
import w1  # noqa: E402

STOP_ID = w1.EOS_ID
_CONSTANT = 10.0  # Embedding dimension 0 of every token (the other entries are ~0.02).


def geometric_stop_model(config, *, mean_length: float):
  """The W1 random model edited so that each token is the stop id with probability 1 / mean."""
  model = w1.make_model(config)
  emb = np.asarray(model.embedding[...]).copy()
  emb[:, 0] = _CONSTANT
  model.embedding[...] = jnp.asarray(emb)
  # The final-norm hidden state's first coordinate is ~sqrt(D) (dimension 0 dominates the rms).
  h0 = np.sqrt(config.embed_dim)
  q = 1.0 / mean_length
  target = np.log(q * (config.vocab_size - 1) / (1.0 - q))  # Stop logit against ~0 elsewhere.
  head = np.asarray(model.lm_head[...]).copy()
  head[0, :] = 0.0
  head[0, STOP_ID] = target / h0
  model.lm_head[...] = jnp.asarray(head)
  return model


def _timed_calls(sampler, params, prompts, *, reps, warmup, **kw):
  """Median tokens/s and the lengths of every timed call."""
  rates, lengths = [], []
  for rep in range(reps):
    start = time.perf_counter()
    out = sampler.sample(params, prompts, rng=jax.random.key(1000 + rep), **kw)
    seconds = time.perf_counter() - start
    if rep >= warmup:
      rates.append(out.lengths.sum() / seconds)
      lengths.append(out.lengths.ravel())
  return float(np.median(rates)), np.concatenate(lengths)


def rollout_efficiency(*, new_tokens: int, reps: int, warmup: int, rows: int,
                       scan_layers: bool) -> dict:
  """The long-tail round and its uniform twin (see the module docstring)."""
  prompts, _ = w1.make_prompts(w1.NUM_PROMPTS)
  config = dataclasses.replace(
      w1.model_config(max_seq_len=len(prompts[0]) + new_tokens), scan_layers=scan_layers)
  model = geometric_stop_model(config, mean_length=new_tokens / 8)
  graphdef, params = nnx.split(model, nnx.Param)
  sampler = sampler_lib.Sampler(graphdef, model_config=config, pad_id=w1.PAD_ID, rows=rows)
  kw = dict(num_samples=w1.NUM_SAMPLES, temperature=1.0)
  tail_rate, lengths = _timed_calls(sampler, params, prompts, reps=reps, warmup=warmup,
                                    max_new_tokens=new_tokens, stop_ids=(STOP_ID,), **kw)
  mean = max(1, int(round(lengths.mean())))
  uniform_rate, _ = _timed_calls(sampler, params, prompts, reps=reps, warmup=warmup,
                                 max_new_tokens=mean, stop_ids=(), **kw)
  return dict(new_tokens=new_tokens, rows=sampler.rows_in_flight(len(prompts) * w1.NUM_SAMPLES),
              useful_rate=tail_rate, uniform_rate=uniform_rate,
              efficiency=tail_rate / uniform_rate, mean=lengths.mean(),
              median=float(np.median(lengths)), p90=float(np.percentile(lengths, 90)),
              max=int(lengths.max()))


def decode_step_times(*, new_tokens: int, rows: int = 64, steps: int = 32,
                      scan_layers: bool) -> dict:
  """Seconds of one decode step of `rows` rows at position S/8 and at S - 1."""
  config = dataclasses.replace(w1.model_config(max_seq_len=32 + new_tokens),
                               scan_layers=scan_layers)
  model = w1.make_model(config)
  graphdef, params = nnx.split(model, nnx.Param)
  s = -(-(32 + new_tokens) // 64) * 64

  @jax.jit
  def run(params, position):
    model = nnx.merge(graphdef, params)
    cache = kv_cache.KVCache.zeros(config, rows, s).replace(
        end_index=jnp.full((rows,), position, jnp.int32), starts=jnp.zeros((rows,), jnp.int32))

    def step(_, carry):
      last, cache = carry
      logits, cache = model.forward(last[:, None], positions=cache.end_index[:, None],
                                    attention_mask=None, cache=cache)
      return jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache.replace(
          end_index=jnp.full((rows,), position, jnp.int32))

    return jax.lax.fori_loop(0, steps, step, (jnp.zeros((rows,), jnp.int32), cache))[0]

  out = {}
  for name, position in (("s8", s // 8), ("s", s - 1)):
    run(params, position).block_until_ready()
    times = []
    for _ in range(5):
      start = time.perf_counter()
      run(params, position).block_until_ready()
      times.append((time.perf_counter() - start) / steps)
    out[name] = float(np.median(times))
  out["slots"] = s
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new-tokens", type=int, nargs="+", default=[512, 2048])
  ap.add_argument("--reps", type=int, default=7, help="calls per figure, the first --warmup untimed")
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--rows", type=int, default=0, help="sampler.rows (0, the default: all samples)")
  ap.add_argument("--scan-layers", type=int, choices=(0, 1), default=0)
  ap.add_argument("--update-reps", type=int, default=5,
                  help="timed updates of the update-efficiency figure (0: skip it)")
  args = ap.parse_args()
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  for t in args.new_tokens:
    r = rollout_efficiency(new_tokens=t, reps=args.reps, warmup=args.warmup, rows=args.rows,
                           scan_layers=bool(args.scan_layers))
    print(f"max_new_tokens {t}, rows {r['rows']}: lengths mean {r['mean']:.1f} median "
          f"{r['median']:.0f} p90 {r['p90']:.0f} max {r['max']}; useful tokens/s "
          f"{r['useful_rate']:.0f}, uniform (length {round(r['mean'])}) tokens/s "
          f"{r['uniform_rate']:.0f}", flush=True)
    d = decode_step_times(new_tokens=t, scan_layers=bool(args.scan_layers))
    print(f"decode step, 64 rows, S={d['slots']}: position S/8 {1e3 * d['s8']:.3f} ms, position "
          f"S-1 {1e3 * d['s']:.3f} ms, ratio {d['s8'] / d['s']:.2f}", flush=True)
    update = "n/a"
    if args.update_reps:
      u = longtail_update.update_efficiency(new_tokens=t, reps=args.update_reps, unpacked=False)
      print(longtail_update.describe(u), flush=True)
      update = f"{u['efficiency']:.2f}"
    print(f"RESULT longtail rollout efficiency = {r['efficiency']:.2f}; update efficiency = "
          f"{update} (max_new_tokens {t}; useful tokens/s {r['useful_rate']:.0f}; decode step "
          f"S/8 / S = {d['s8'] / d['s']:.2f})", flush=True)


if __name__ == "__main__":
  main()

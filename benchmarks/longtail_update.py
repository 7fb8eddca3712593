"""Long-tailed response lengths: update efficiency of the packed update (train.pack_updates).

Workload: the W1 model (Qwen2, hidden 128, 2 layers, vocab 512; benchmarks/w1.py) and W1's DYPO
update (benchmarks/w1_step.py's config: 8 prompts x 8 samples, 32-token prompts, KL 0.04 so the
reference pass runs, seq-mean-token-mean, GRPO + GAL weights of a batch of 8 Mid groups), one
micro-batch, per-term gradient norms off, the update step of `rl.train_step` jitted as the
Trainer jits it.

Lengths. Each response's length is drawn geometric with mean max_new_tokens / 8, truncated at
max_new_tokens (numpy seed 0, a new draw per timed batch): the distribution the sampler half of
benchmarks/longtail.py produces with its stop-probability model, and the one issue 27 measured
(median 50, p90 164, max 366 at 512). Tokens, old log-probs and rewards are random (half of each
group rewarded).

Figures:
  useful tokens/s   = the batch's response tokens / seconds of one update, packing included
                      (`update_batch.pack` on the host, then the jitted step on its packed rows)
  uniform tokens/s  = the same update (unpacked, the shared-prompt path the Trainer takes for
                      groups) on the same 64 rows with every response exactly round(mean) long,
                      allocated at T = round(mean): the same work at uniform length, no padding
  update efficiency = useful tokens/s / uniform tokens/s
  unpacked tokens/s = the long-tailed batch through today's unpacked update (every row padded to
                      max_new_tokens), for comparison
Each rate is the median over timed updates, each batch first run once untimed (which compiles
the packed row buckets it meets: a run compiles a bucket once, at its first batch); the timed
updates of the three interleave, so a shared machine's load weighs on them alike.

Run (from the repository root):
  python benchmarks/longtail_update.py                   # 512 and 2048, 5 timed updates each
  python benchmarks/longtail.py                          # both halves, one RESULT line each
"""
import argparse
import dataclasses
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax.parallel import sharding  # noqa: E402
from dypo_jax.rl import program as program_lib  # noqa: E402
from dypo_jax.rl import queues as queues_lib  # noqa: E402
from dypo_jax.rl import routing  # noqa: E402
from dypo_jax.rl import train_step as step_lib  # noqa: E402
from dypo_jax.rl import update_batch  # noqa: E402
import w1  # noqa: E402
import w1_step  # noqa: E402

PROMPT_LEN = w1.PROMPT_WORDS + 1


def _groups(rng, prompts, *, k: int, max_len: int, lengths) -> list:
  """One Mid group per prompt; `lengths(k)` draws its K response lengths."""
  items = []
  for i, prompt in enumerate(prompts):
    rewards = (np.arange(k) % 2 == 0).astype(np.float32)
    items.append(queues_lib.MidItem(
        uid=f"longtail/{i}", prompt_tokens=prompt,
        response_tokens=rng.integers(3, w1.VOCAB, (k, max_len)).astype(np.int32),
        response_lengths=lengths(k), rewards=rewards, shaped_rewards=rewards,
        logprobs=-rng.uniform(0.5, 8.0, (k, max_len)).astype(np.float32), step=0))
  return items


class _Update:
  """The W1 DYPO update at one max_len, packed or not: `time(items)` lays out (and packs) the
  batch on the host and runs the jitted step; returns (seconds, response tokens)."""

  def __init__(self, *, max_len: int, packed: bool, shared_prompt: bool,
               attention_block: int | None = None):
    config = w1_step.w1_config("dypo", new_tokens=max_len)
    config.train.pack_updates = packed
    if attention_block is not None:
      config.train.pack_attention_block = attention_block
    config.model.max_seq_len = PROMPT_LEN + max_len
    mc = dataclasses.replace(w1.model_config(max_seq_len=PROMPT_LEN + max_len),
                             scan_layers=config.model.scan_layers)
    graphdef, params = nnx.split(w1.make_model(mc), nnx.Param)
    self.params = params
    mesh = sharding.build_mesh(config.mesh)
    self.program = program_lib.UpdateProgram.build(
        config, graphdef=graphdef, params=params, mesh=mesh, rules=sharding.mesh_rules(config),
        prompt_len=PROMPT_LEN, num_teachers=1)
    self.policy = routing.Policy.from_config(config.rl)
    self.step = self.program.jit(shared_prompt=shared_prompt, term_norms=False)
    self.state = self.program.init_state(params)
    self.k, self.max_len, self.config = config.rl.num_samples, max_len, config
    self.rows = []  # The model's rows of each update.

  def time(self, items) -> tuple[float, float]:
    start = time.perf_counter()
    batch, _ = update_batch.layout([], items, slot_buckets=self.program.slot_buckets, k=self.k,
                                   prompt_len=PROMPT_LEN, max_len=self.max_len,
                                   pad_id=w1.PAD_ID, teacher_index={})
    batch["weights"][:] = routing.loss_weights(self.policy, 0, n_hard=0, n_mid=len(items))
    if self.program.packed:
      batch = self.program.pack(batch, share_prompts=True)
    self.state, metrics = self.step(self.state, self.params, batch, jax.random.key(0))
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    assert np.isfinite(float(metrics["loss/total"]))
    self.rows.append(batch["pack_tokens"].shape[0] if self.program.packed
                     else batch["tokens"].shape[0] * self.k)
    return seconds, float(batch["resp_mask"].sum())


def _rates(runs, *, reps: int) -> list[float]:
  """Median tokens/s of each (update, make_items) of `runs`, their timed updates interleaved (a
  shared machine's load then weighs on all of them alike)."""
  batches = [[make_items(rep) for rep in range(reps)] for _, make_items in runs]
  for (update, _), mine in zip(runs, batches):
    for items in mine:  # Untimed: compiles every packed row bucket the timed batches meet.
      update.time(items)
  rates = [[] for _ in runs]
  for rep in range(reps):
    for i, (update, _) in enumerate(runs):
      seconds, tokens = update.time(batches[i][rep])
      rates[i].append(tokens / seconds)
  return [float(np.median(r)) for r in rates]


def update_efficiency(*, new_tokens: int, reps: int = 5, unpacked: bool = True,
                      attention_block: int | None = None) -> dict:
  """The long-tailed packed update and its uniform twin (see the module docstring)."""
  prompts, _ = w1.make_prompts(w1.NUM_PROMPTS)
  k, mean = w1.NUM_SAMPLES, new_tokens / 8

  def tail_lengths(rng):
    return lambda n: np.minimum(rng.geometric(1.0 / mean, n), new_tokens).astype(np.int32)

  def tail_items(rep):
    rng = np.random.default_rng(rep + 1)
    return _groups(rng, prompts, k=k, max_len=new_tokens, lengths=tail_lengths(rng))

  lengths = np.concatenate([np.concatenate([it.response_lengths for it in tail_items(rep)])
                            for rep in range(reps)])
  uniform_len = max(1, int(round(lengths.mean())))

  def uniform_items(rep):
    return _groups(np.random.default_rng(rep + 1), prompts, k=k, max_len=uniform_len,
                   lengths=lambda n: np.full(n, uniform_len, np.int32))

  packed = _Update(max_len=new_tokens, packed=True, shared_prompt=False,
                   attention_block=attention_block)
  uniform = _Update(max_len=uniform_len, packed=False, shared_prompt=True)
  runs = [(packed, tail_items), (uniform, uniform_items)]
  if unpacked:
    runs.append((_Update(max_len=new_tokens, packed=False, shared_prompt=True), tail_items))
  rates = _rates(runs, reps=reps)
  out = dict(new_tokens=new_tokens, useful_rate=rates[0], uniform_rate=rates[1],
             efficiency=rates[0] / rates[1], mean=lengths.mean(), uniform_len=uniform_len,
             median=float(np.median(lengths)), p90=float(np.percentile(lengths, 90)),
             max=int(lengths.max()), packed_rows=sorted(set(packed.rows)),
             rows=w1.NUM_PROMPTS * k,
             attention_block=packed.program.step_cfg.pack_attention_block)
  if unpacked:
    out["unpacked_rate"] = rates[2]
  return out


def describe(r: dict) -> str:
  rows = "/".join(map(str, r["packed_rows"]))
  text = (f"update, max_new_tokens {r['new_tokens']}: lengths mean {r['mean']:.1f} median "
          f"{r['median']:.0f} p90 {r['p90']:.0f} max {r['max']}; {r['rows']} rows packed into "
          f"{rows} (attention block {r['attention_block']}); useful tokens/s "
          f"{r['useful_rate']:.0f} packed, uniform (length {r['uniform_len']}) tokens/s "
          f"{r['uniform_rate']:.0f}")
  if "unpacked_rate" in r:
    text += (f", unpacked long-tail tokens/s {r['unpacked_rate']:.0f} (efficiency "
             f"{r['unpacked_rate'] / r['uniform_rate']:.2f})")
  return text


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--new-tokens", type=int, nargs="+", default=[512, 2048])
  ap.add_argument("--reps", type=int, default=5, help="timed updates per figure")
  ap.add_argument("--no-unpacked", action="store_true", help="skip the unpacked comparison")
  ap.add_argument("--attention-block", type=int, default=None,
                  help="train.pack_attention_block (default: the config's)")
  args = ap.parse_args()
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  for t in args.new_tokens:
    r = update_efficiency(new_tokens=t, reps=args.reps, unpacked=not args.no_unpacked,
                          attention_block=args.attention_block)
    print(describe(r), flush=True)
    print(f"RESULT longtail update efficiency = {r['efficiency']:.2f} (max_new_tokens {t}; "
          f"useful tokens/s {r['useful_rate']:.0f})", flush=True)


if __name__ == "__main__":
  main()

r"""Workload W1, whole GRPO / DYPO steps through the real `dypo_jax.rl.trainer.Trainer`.

The same workload as `benchmarks/peers/*_grpo_tiny.py` (see benchmarks/README.md):

- Model: Qwen2, random weights, hidden 128, 2 layers, 4 heads / 2 KV heads, MLP 512, vocab 512,
  untied, float32 (0.62 M parameters), built by `build.build_model` from a `base_config()`.
- Tokenizer: `WordTokenizer`, our `Tokenizer` interface over the vocabulary of the peers'
  word-level tokenizer (`peers/tiny_tok.py`; checked id for id against it at start-up).
- Prompts: `tiny_tok.make_prompts(8 * steps, 31, seed=0)`, in order (8 per step, as the peers take
  them); the "plain" template + BOS gives exactly 32 tokens.
- Reward: the peers' toy reward (fraction of words with an even number, + 0.01 length bonus),
  registered as `rewards.REWARDS["w1_toy"]` at import time. The GRPO advantage uses it as is (as
  the peers do); DYPO's grading reads it as binary correctness (> 0.5), like every reward.
- One step: 8 prompts x 8 samples, up to 32 new tokens, temperature 0.9, top-p 1.0, stop at EOS;
  beta_KL = 0.04 (k3, so the reference log-probs are computed inside the jitted update); AdamW
  lr 1e-5 (weight decay 0, grad clip 1.0); `seq-mean-token-mean` loss; clip 0.2; one update.
  Per-term gradient norms (a METHOD.md §6 metric, 3x the backward) are off, since the peers
  compute no such thing; `--per-term-grad-norms` turns them on.
- 2 warm-up steps (the first includes the compiles) are not timed.

What one step is: exactly the body of `Trainer.run()` without the metrics writer, progress line,
eval and checkpoint: rollout rounds (`Trainer.run_rollout_round`: sample, decode, reward, grade,
queue) until `update_prompts` items are queued, `QueueSet.pop_batch`, `Trainer.build_batch`,
`Trainer.update` (the jitted step) and the host metrics (`device_get`, `_host_metrics`).

`--method grpo`: every group is queued (no grading), weights (0, 1, 0).
`--method dypo`: DYPO from step 0 (switch_gate 0), alpha 0.5: each group is graded from the
binary reading of the toy reward. With a random model a sample's toy reward is about
Binomial(32, 0.5)/32, so P(> 0.5) is about 0.57 and a group of 8 is Mid with probability ~0.99
(Easy ~0.01, Hard ~0.001): the step is GRPO (weight 0.5) + GAL (weight 0.5) on Mid groups, the
reference forward serving both the KL term and GAL. An Easy group is dropped, so an update now
and then needs a second rollout round (its leftovers stay queued for the next update); a Hard
group would get an SFT row on its teacher trace (31 even words + EOS, given to every prompt).

Figures (the peers' RESULT lines, plus first step and memory): steps/s (mean and median),
generated tokens/s over the whole step, rollout-only tokens/s (sampler calls), first-step
(compile) seconds, peak resident memory (ru_maxrss), the compile counts of step and sampler, and
the median process CPU seconds per step (all threads; steadier than wall time on a shared machine).

Run (from the repository root):
  python benchmarks/w1_step.py --method grpo --steps 10
  python benchmarks/w1_step.py --method dypo --steps 10
  python benchmarks/w1_step.py --tiny --steps 1      # seconds: a smoke run at toy sizes
"""
import argparse
import os
import random
import resource
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from dypo_jax import build  # noqa: E402
from dypo_jax import config as config_lib  # noqa: E402
from dypo_jax.data import records as records_lib  # noqa: E402
from dypo_jax.data import tokenizers  # noqa: E402
from dypo_jax.evaluation import rewards as rewards_lib  # noqa: E402
from dypo_jax.parallel import host  # noqa: E402
from dypo_jax.parallel import sharding  # noqa: E402
from dypo_jax.rl import queues as queues_lib  # noqa: E402
from dypo_jax.rl import trainer as trainer_lib  # noqa: E402

REWARD_NAME = "w1_toy"
PROMPT_WORDS = 31  # + BOS = 32 prompt tokens.
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 in tiny_tok.
N_WORDS = 509  # + 3 specials = 512.
PEERS_DIR = os.environ.get(
    "DYPO_PEERS_DIR",
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "peers"))


def _tiny_tok():
  """The peers' tiny_tok module, or None when its folder (or transformers) is not here."""
  path = os.path.abspath(PEERS_DIR)
  if not os.path.exists(os.path.join(path, "tiny_tok.py")):
    return None
  if path not in sys.path:
    sys.path.append(path)
  try:
    import tiny_tok  # pylint: disable=g-import-not-at-top
    return tiny_tok
  except ImportError:
    return None


def words() -> list[str]:
  return [f"w{i:03d}" for i in range(N_WORDS)]


def toy_score(response: str) -> float:
  """The peers' toy reward of one completion: the fraction of its words "wNNN" with NNN even,
  plus 0.01 * min(#words, 32) / 32 (tiny_tok.toy_reward's rule)."""
  tt = _tiny_tok()
  if tt is not None:
    return float(tt.toy_reward([""], [response])[0])
  ws = response.split()
  good = sum(1 for w in ws if len(w) == 4 and w[0] == "w" and w[1:].isdigit()
             and int(w[1:]) % 2 == 0)
  return good / max(len(ws), 1) + 0.01 * min(len(ws), 32) / 32


def _w1_toy_reward(record: records_lib.PromptRecord, response: str) -> float:
  del record
  return toy_score(response)


if REWARD_NAME not in rewards_lib.REWARDS:
  rewards_lib.register(REWARD_NAME)(_w1_toy_reward)


class WordTokenizer(tokenizers.Tokenizer):
  """Whitespace word-level tokenizer over a fixed vocabulary (tiny_tok's, when available).

  Unknown words map to <pad>, as tiny_tok's `unk_token="<pad>"` does; decode joins words with
  single spaces (what tiny_tok's WordPiece decoder does for these words).
  """

  def __init__(self, vocab: dict[str, int], source: str):
    self._vocab = dict(vocab)
    size = max(self._vocab.values()) + 1
    self._words = [""] * size
    for w, i in self._vocab.items():
      self._words[i] = w
    self._special = {self._vocab[s] for s in SPECIALS}
    self.source = source

  def __repr__(self) -> str:
    return f"WordTokenizer({len(self._vocab)} words from {self.source})"

  @property
  def vocab_size(self) -> int:
    return len(self._words)

  @property
  def bos_id(self) -> int:
    return self._vocab["<s>"]

  @property
  def eos_id(self) -> int:
    return self._vocab["</s>"]

  @property
  def pad_id(self) -> int:
    return self._vocab["<pad>"]

  def id_of(self, token: str) -> int:
    if token not in self._vocab:
      raise ValueError(f"token {token!r} is not in the vocabulary of {self!r}")
    return self._vocab[token]

  def _encode_texts(self, texts: list[str]) -> list[list[int]]:
    unk = self.pad_id
    return [[self._vocab.get(w, unk) for w in t.split()] for t in texts]

  def _decode_ids(self, ids: list[int], skip_special: bool) -> str:
    return " ".join(self._words[i] for i in ids if not (skip_special and i in self._special))


def make_tokenizer() -> WordTokenizer:
  """tiny_tok's vocabulary (checked against its HF tokenizer), else specials + words in order."""
  tt = _tiny_tok()
  if tt is None:
    return WordTokenizer({w: i for i, w in enumerate(SPECIALS + tuple(words()))}, "builtin")
  hf = tt.build_tokenizer()
  tok = WordTokenizer(hf.get_vocab(), "tiny_tok")
  for text in tt.make_prompts(4, PROMPT_WORDS, seed=7):
    ids = hf.encode(text, add_special_tokens=False)
    if tok.encode(text) != ids or tok.decode(ids) != hf.decode(ids, skip_special_tokens=True):
      raise ValueError(f"WordTokenizer disagrees with tiny_tok on {text[:40]!r}...")
  return tok


def make_prompt_texts(n: int, *, seed: int = 0, prompt_words: int = PROMPT_WORDS) -> list[str]:
  tt = _tiny_tok()
  if tt is not None:
    return tt.make_prompts(n, prompt_words, seed=seed)
  rng = random.Random(seed)
  ws = words()
  return [" ".join(rng.choice(ws) for _ in range(prompt_words)) for _ in range(n)]


def make_records(n: int, *, seed: int = 0,
                 prompt_words: int = PROMPT_WORDS) -> list[records_lib.PromptRecord]:
  """n W1 prompts; each carries one teacher trace (31 even words) for the Hard route."""
  rng = random.Random(seed + 1)
  even = [w for i, w in enumerate(words()) if i % 2 == 0]
  recs = []
  for i, text in enumerate(make_prompt_texts(n, seed=seed, prompt_words=prompt_words)):
    trace = " ".join(rng.choice(even) for _ in range(PROMPT_WORDS))
    recs.append(records_lib.PromptRecord(
        uid=f"w1/{i}", prompt=text, answer="even", source="w1",
        teachers=(records_lib.TeacherSolution("even_words", trace),)))
  return recs


def w1_config(method: str = "grpo", *, hidden: int = 128, layers: int = 2, prompts: int = 8,
              k: int = 8, new_tokens: int = 32, kl_coef: float = 0.04, alpha: float = 0.5,
              per_term_grad_norms: bool = False, num_steps: int = 100, micro_batches: int = 1,
              attention_chunk: int = 0, seed: int = 0, host_devices: int = 0,
              host_reuse_memory: bool = True, scan_layers: bool = True):
  """The W1 config from `base_config()` (validated, then the reward set to "w1_toy")."""
  c = config_lib.base_config()
  c.seed = seed
  c.model.update(dict(
      arch="qwen2", vocab_size=512, embed_dim=hidden, num_layers=layers, num_heads=4,
      num_kv_heads=2, head_dim=hidden // 4, mlp_dim=4 * hidden, rope_theta=10000.0,
      rms_norm_eps=1e-6, tie_embeddings=False, qkv_bias=True, qk_norm=False,
      max_seq_len=max(256, 32 + new_tokens + 1), param_dtype="float32", dtype="float32",
      scan_layers=scan_layers))
  if attention_chunk:
    c.model.attention_chunk = attention_chunk  # Query blocks (validate() needs the key).
  if host_devices:  # The host as N XLA devices: rollouts data-parallel over all N, the update on
    # the first (whose matmuls use every core).
    c.mesh.update(dict(host_devices=host_devices, data=1, fsdp=1, tensor=1,
                       rollout_data=host_devices))
  c.mesh.host_reuse_memory = host_reuse_memory
  c.tokenizer.template = "plain"
  c.data.shuffle = False  # The peers take the prompts in order.
  c.sampler.update(dict(max_new_tokens=new_tokens, temperature=0.9, top_p=1.0, top_k=0))
  c.rl.update(dict(method=method, num_samples=k, alpha=alpha, kl_coef=kl_coef,
                   kl_estimator="k3", clip_low=0.2, clip_high=0.2, agg_mode="seq-mean-token-mean",
                   scale_adv_by_std=True, switch_gate=0, format_penalty_coef=0.0))
  c.optim.update(dict(learning_rate=1e-5, schedule="constant", warmup_steps=0, weight_decay=0.0,
                      grad_clip=1.0))
  c.train.update(dict(num_steps=num_steps, rollout_prompts=prompts, update_prompts=prompts,
                      micro_batches=micro_batches, max_rollouts_per_update=8, log_every=1,
                      checkpoint_every=0, eval_every=0, per_term_grad_norms=per_term_grad_norms))
  config_lib.validate(c)  # data.reward is still "exact_match": the schema allows only built-ins.
  c.data.reward = REWARD_NAME
  return c


def build_trainer(config, *, num_records: int, tokenizer: WordTokenizer | None = None,
                  workdir: str | None = None,
                  prompt_words: int = PROMPT_WORDS) -> trainer_lib.Trainer:
  """A Trainer on the W1 pool of `num_records` prompts (taken in order)."""
  tok = tokenizer or make_tokenizer()
  host.configure_host(config.mesh)
  mesh = sharding.build_mesh(config.mesh)
  host.keep_host_heap(config.mesh)
  model = build.build_model(config, mesh, tok)
  pools = {"train": make_records(num_records, seed=config.seed, prompt_words=prompt_words),
           "eval_id": [], "eval_ood": []}
  workdir = workdir or tempfile.mkdtemp(prefix="dypo-w1-")
  return trainer_lib.Trainer(config, workdir=workdir, mesh=mesh, tokenizer=tok, model=model,
                             pools=pools)


def run_step(trainer: trainer_lib.Trainer) -> dict[str, Any]:
  """One update of the loop (`Trainer.step`, what `run()` calls), with its time split by phase."""
  c0 = time.process_time()
  m = trainer.step()
  cpu_s = time.process_time() - c0
  rounds_s, step_s = m["time/rounds_s"], m["time/step_s"]
  sample_s, reward_s = m.get("time/rollout_s", 0.0), m.get("time/reward_s", 0.0)
  build_s, update_s = m.get("time/build_s", 0.0), m.get("time/update_s", 0.0)
  groups = m["rollout/groups"]
  return {
      "step_s": step_s, "cpu_s": cpu_s, "rollout_rounds_s": rounds_s, "sample_s": sample_s,
      "reward_s": reward_s, "route_s": rounds_s - sample_s - reward_s, "build_s": build_s,
      "update_s": update_s, "host_metrics_s": step_s - rounds_s - build_s - update_s,
      "tokens": m["rollout/tokens"], "rounds": m["rollout/rounds"],
      "hard_items": m.get("batch/hard_items", 0), "mid_items": m.get("batch/mid_items", 0),
      "groups": {g: round(m.get(f"route/{g}_frac", 0.0) * groups) for g in ("easy", "mid", "hard")},
      "metrics": m,
  }


def synthetic_batch(trainer: trainer_lib.Trainer, *, seed: int = 0) -> dict[str, np.ndarray]:
  """A full update batch without sampling: every item a Mid group of full-length responses
  (random tokens, rewards alternating 1/0 so that GRPO and GAL both have signal), laid out by
  the real `Trainer.build_batch`."""
  rng = np.random.default_rng(seed)
  u, k, t = trainer.config.train.update_prompts, trainer.k, trainer.max_len
  v = trainer.tok.vocab_size
  mid = []
  for i in range(u):
    rewards = (np.arange(k) % 2 == 0).astype(np.float32)
    mid.append(queues_lib.MidItem(
        uid=f"synthetic/{i}",
        prompt_tokens=trainer.pool.prompt_tokens[i % len(trainer.pool)],
        response_tokens=rng.integers(3, v, (k, t)).astype(np.int32),
        response_lengths=np.full((k,), t, np.int32), rewards=rewards, shaped_rewards=rewards,
        logprobs=np.full((k, t), -np.log(v), np.float32), step=0))
  batch, _ = trainer.build_batch([], mid)
  return batch


def update_flops(*, mc, rows: int, prompt_len: int, resp_len: int, with_ref: bool,
                 group: int = 1) -> dict[str, float]:
  """Model FLOPs of one update on `rows` sequences of P + T tokens (matmuls only, 2 per MAC).

  The step feeds L - 1 = P + T - 1 tokens per row through the policy, or with the shared-prompt
  path (`group` = K rows per prompt pass) P tokens per group and T - 1 per row. Per token and
  layer the projections cost 2·D·H·(N + 2·KV) + 2·N·H·D, the SwiGLU MLP 3·2·D·F, and attention
  2·2·(L - 1)·N·H (scores and values over all L - 1 key slots, as executed; causal-only
  counting would halve it); the LM head 2·D·V only at the T response positions. Training =
  3 x the policy forward (forward + backward) + 1 x the reference forward (when it runs).
  Not counted: the chunked log-prob's recomputed logits in the backward (recompute, not model
  work), norms, softmax, RoPE, the optimizer. `six_n` is the usual 6·N·tokens for comparison,
  N = the non-embedding parameters including the LM head.
  """
  d, h, n, kv, f, v = (mc.embed_dim, mc.head_dim, mc.num_heads, mc.num_kv_heads, mc.mlp_dim,
                       mc.vocab_size)
  l1 = prompt_len + resp_len - 1
  tokens = rows // group * prompt_len + rows * (resp_len - 1)
  per_token_layer = 2 * d * h * (n + 2 * kv) + 2 * n * h * d + 6 * d * f
  attn_per_token_layer = 4 * l1 * n * h
  fwd = (tokens * mc.num_layers * (per_token_layer + attn_per_token_layer)
         + rows * resp_len * 2 * d * v)
  total = 3 * fwd + (fwd if with_ref else 0)
  non_embedding = mc.num_params - mc.vocab_size * mc.embed_dim
  return {"policy_fwd": float(fwd), "total": float(total),
          "attention_share": tokens * mc.num_layers * attn_per_token_layer / fwd,
          "six_n": float(6 * non_embedding * tokens)}


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def add_host_memory_arg(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--no-host-reuse-memory", dest="host_reuse_memory", action="store_false",
                  help="mesh.host_reuse_memory=False: async dispatch, glibc's default heap (each "
                  "step maps its XLA temporaries afresh)")


def add_size_args(ap: argparse.ArgumentParser) -> None:
  ap.add_argument("--hidden", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--prompts", type=int, default=8)
  ap.add_argument("--gens", type=int, default=8, help="k, samples per prompt")
  ap.add_argument("--new-tokens", type=int, default=32)
  ap.add_argument("--beta", type=float, default=0.04, help="beta_KL")
  ap.add_argument("--alpha", type=float, default=0.5, help="DYPO's GRPO weight on Mid groups")
  ap.add_argument("--per-term-grad-norms", action="store_true")
  ap.add_argument("--scan-layers", type=int, choices=(0, 1), default=0,
                  help="model.scan_layers: 0 (default) a loop over W1's 2 layers, what a CPU run "
                  "at this depth uses (20%% faster than the scan here); 1 the scanned stack")
  ap.add_argument("--devices", type=int, default=0,
                  help="mesh.host_devices = mesh.rollout_data = N: the CPU as N XLA devices, "
                  "rollouts split over them, the update on the first")
  add_host_memory_arg(ap)
  ap.add_argument("--tiny", action="store_true",
                  help="toy sizes for a smoke run: hidden 32, 1 layer, 2 prompts x 2, 8 tokens")


def apply_tiny(args) -> None:
  if args.tiny:
    args.hidden, args.layers, args.prompts, args.gens, args.new_tokens = 32, 1, 2, 2, 8


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--method", choices=("grpo", "dypo"), default="grpo")
  ap.add_argument("--steps", type=int, default=6, help="timed steps (after --warmup steps)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (compiles)")
  add_size_args(ap)
  args = ap.parse_args()
  apply_tiny(args)
  print("command: " + " ".join([os.path.basename(sys.executable)] + sys.argv), flush=True)
  total = args.warmup + args.steps
  config = w1_config(args.method, hidden=args.hidden, layers=args.layers, prompts=args.prompts,
                     k=args.gens, new_tokens=args.new_tokens, kl_coef=args.beta,
                     alpha=args.alpha, per_term_grad_norms=args.per_term_grad_norms,
                     num_steps=total, host_devices=args.devices,
                     host_reuse_memory=args.host_reuse_memory,
                     scan_layers=bool(args.scan_layers))
  host.configure_host(config.mesh)
  print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
  t0 = time.perf_counter()
  tok = make_tokenizer()
  # DYPO drops Easy groups, so a few updates take a second round: give it spare prompts.
  trainer = build_trainer(config, num_records=args.prompts * total * 2, tokenizer=tok)
  mc = trainer.sampler.config
  print(f"model: dypo_jax Transformer {mc.num_layers}L "
        f"({'scanned' if mc.scan_layers else 'looped'}) d={mc.embed_dim} "
        f"heads={mc.num_heads}/{mc.num_kv_heads} vocab={mc.vocab_size} "
        f"params={mc.num_params / 1e6:.3f}M; tokenizer {tok!r}; P={trainer.prompt_len} "
        f"T={trainer.max_len}; method={args.method} use_gal={trainer.program.step_cfg.use_gal} "
        f"kl={trainer.program.step_cfg.kl_coef}", flush=True)
  print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)

  steps = []
  for i in range(total):
    s = run_step(trainer)
    steps.append(s)
    m = s["metrics"]
    print(f"step {i}{' (warm-up)' if i < args.warmup else ''}: {s['step_s']:.3f}s (cpu "
          f"{s['cpu_s']:.3f}s) = sample "
          f"{s['sample_s']:.3f} + reward {s['reward_s']:.3f} + route {s['route_s']:.3f} + build "
          f"{s['build_s']:.3f} + update {s['update_s']:.3f} + host {s['host_metrics_s']:.3f}; "
          f"{s['tokens']} tokens in {s['rounds']} round(s); groups {s['groups']}; items "
          f"hard={s['hard_items']} mid={s['mid_items']}; loss {m.get('loss/total', 0):.4f} "
          f"reward {m.get('reward/shaped', 0):.3f}", flush=True)

  name = f"dypo_jax_{args.method}"
  timed = steps[args.warmup:]
  times = np.array([s["step_s"] for s in timed])
  gen_tok = sum(s["tokens"] for s in timed)
  gen_time = sum(s["sample_s"] for s in timed)
  seqs = args.prompts * args.gens
  warm = [round(s["step_s"], 2) for s in steps[:args.warmup]]
  print(f"warm-up steps (incl. jit compile): {warm}")
  print(f"per-step times (s): {[round(float(x), 3) for x in times]}")
  print(f"RESULT {name} steps/s = {len(times) / times.sum():.3f}  (mean step {times.mean():.3f}s, "
        f"median {np.median(times):.3f}s, {seqs} seqs/step)")
  print(f"RESULT {name} generated tokens/s (over whole step) = {gen_tok / times.sum():.1f}")
  print(f"RESULT {name} median-based: steps/s = {1 / np.median(times):.3f}, "
        f"generated tokens/s = {(gen_tok / len(times)) / np.median(times):.1f}")
  print(f"RESULT {name} rollout-only tokens/s = {gen_tok / gen_time:.1f} (rollout "
        f"{gen_time / len(times):.3f}s/step = {100 * gen_time / times.sum():.0f}% of step; "
        f"{gen_tok / len(times):.0f} tokens/step)")
  print(f"RESULT {name} process CPU s/step = {np.median([s['cpu_s'] for s in timed]):.3f} "
        f"(median; all threads: steadier than wall on a shared machine)")
  print(f"RESULT {name} first step (compile) s = {steps[0]['step_s']:.2f}; peak RSS MB = "
        f"{peak_rss_mb():.0f}; compiles: step {trainer.update_trace_count}, sampler "
        f"{trainer.sampler.trace_count}")


if __name__ == "__main__":
  main()

"""Tunix (google-tunix 0.1.7) GRPO peer baseline on CPU, tiny random Qwen2.

Random-weight tunix.models.qwen2 model built from a ModelConfig (no checkpoint),
local word-level tokenizer (tiny_tok.py), toy reward, vanilla Tunix sampler
(KV cache), GRPOLearner + RLCluster on a 1-device CPU mesh.

Per step: 8 prompts x 8 generations = 64 rollouts, prompt 32 tokens (31 words
+ BOS), up to 32 new tokens, beta>0 => reference-model logps, 1 optimizer step.
The first --warmup steps (jit compiles) are not timed.

Workarounds needed with tunix 0.1.7 + jax 0.10.2 (see comments below):
  * mesh must use AxisType.Auto (jax.make_mesh now defaults to Explicit);
  * dataset batches must be {"prompts": np.ndarray[str]}, not python lists.

Workload W1: benchmarks/README.md. Run (from benchmarks/peers/, after setup.sh;
benchmarks/peers/run.sh does this in rounds):
  "$PEERS"/tunix-venv/bin/python tunix_grpo_tiny.py --steps 10 --sampler-only
"""
import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from tunix.models.qwen2 import model as qwen2_lib  # noqa: E402
from tunix.rl import rl_cluster as rl_cluster_lib  # noqa: E402
from tunix.rl.grpo import grpo_learner  # noqa: E402
from tunix.rl.rollout import base_rollout  # noqa: E402

import tiny_tok  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6, help="timed GRPO steps (after --warmup steps)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (jit compiles)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--gens", type=int, default=8)
    ap.add_argument("--prompt-words", type=int, default=31, help="+BOS => 32 prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--sampler-only", action="store_true", help="also time the bare sampler (64 x 32 tokens)")
    args = ap.parse_args()

    print(f"jax {jax.__version__} devices={jax.devices()}", flush=True)
    tok = tiny_tok.build_tokenizer()

    cfg = qwen2_lib.ModelConfig(
        num_layers=args.layers,
        vocab_size=len(tok),           # 512
        embed_dim=args.hidden,         # 128
        hidden_dim=4 * args.hidden,    # MLP 512
        num_heads=4,
        head_dim=args.hidden // 4,     # 32
        num_kv_heads=2,
        rope_theta=10_000,
        norm_eps=1e-6,
        use_tied_embedding=False,
    )
    # NB: jax>=0.7 jax.make_mesh defaults to *Explicit* axis types, which the
    # Tunix Qwen2 KV-cache update rejects (ShardingTypeError) -> use Auto axes.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("fsdp", "tp"),
                             axis_types=(jax.sharding.AxisType.Auto,) * 2)
    actor = qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(params=0))
    reference = qwen2_lib.Qwen2(cfg, rngs=nnx.Rngs(params=0))  # same init
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(actor, nnx.Param)))
    print(f"model: tunix Qwen2 {cfg.num_layers}L d={cfg.embed_dim} heads={cfg.num_heads}/{cfg.num_kv_heads} "
          f"vocab={cfg.vocab_size} params={n_params/1e6:.3f}M", flush=True)

    max_prompt_len = args.prompt_words + 1  # BOS added by the Tunix sampler
    rollout_cfg = base_rollout.RolloutConfig(
        max_tokens_to_generate=args.new_tokens,
        max_prompt_length=max_prompt_len,
        kv_cache_size=max_prompt_len + args.new_tokens + 8,
        temperature=0.9,
        top_p=1.0,
        top_k=None,
    )
    total_steps = args.steps + args.warmup
    train_cfg = rl_cluster_lib.RLTrainingConfig(
        actor_optimizer=optax.adamw(1e-5),
        eval_every_n_steps=10_000,
        max_steps=total_steps,
        mini_batch_size=args.prompts,
        train_micro_batch_size=args.prompts,
        rollout_micro_batch_size=args.prompts,
        compute_logps_micro_batch_size=args.prompts,
        pbar_description=None,
    )
    role_to_mesh = {
        rl_cluster_lib.Role.ACTOR: mesh,
        rl_cluster_lib.Role.REFERENCE: mesh,
        rl_cluster_lib.Role.ROLLOUT: mesh,
    }
    cluster_cfg = rl_cluster_lib.ClusterConfig(
        role_to_mesh=role_to_mesh,
        rollout_engine="vanilla",
        offload_to_cpu=False,
        training_config=train_cfg,
        rollout_config=rollout_cfg,
    )
    t0 = time.perf_counter()
    cluster = rl_cluster_lib.RLCluster(
        actor=actor, reference=reference if args.beta else None,
        tokenizer=tok, cluster_config=cluster_cfg)
    grpo_cfg = grpo_learner.GRPOConfig(
        num_generations=args.gens, num_iterations=1, beta=args.beta, epsilon=0.2)
    reward_means = []

    def reward_fn(prompts, completions, **kw):
        r = tiny_tok.toy_reward(prompts, completions)
        reward_means.append(float(np.mean(r)))
        return r

    learner = grpo_learner.GRPOLearner(
        rl_cluster=cluster, algo_config=grpo_cfg, reward_fns=[reward_fn])
    p_before = jax.tree.map(np.array, nnx.state(cluster.actor_trainer.model, nnx.Param))
    print(f"setup {time.perf_counter()-t0:.1f}s", flush=True)

    # ---- instrumentation: time each rollout, count generated tokens ----------
    eos, pad = tok.eos_token_id, tok.pad_token_id
    gen_log = []  # (t_start, t_end, n_tokens, n_seqs)
    orig_generate = cluster.generate

    def timed_generate(*a, **kw):
        ts = time.perf_counter()
        out = orig_generate(*a, **kw)
        te = time.perf_counter()
        ntok = sum(int(np.sum(np.asarray(t) != pad)) for t in out.tokens)
        gen_log.append((ts, te, ntok, len(out.tokens)))
        return out

    cluster.generate = timed_generate

    prompts = tiny_tok.make_prompts(args.prompts * total_steps, args.prompt_words, seed=0)
    # NB: Tunix expects batched numpy arrays (as grain produces), not python
    # lists: a list of str is treated as a pytree and np.repeat'ed leaf-wise.
    dataset = [{"prompts": np.array(prompts[i * args.prompts:(i + 1) * args.prompts])}
               for i in range(total_steps)]

    t_train0 = time.perf_counter()
    learner.train(dataset)
    t_train1 = time.perf_counter()

    n = len(gen_log)
    p_after = jax.tree.map(np.array, nnx.state(cluster.actor_trainer.model, nnx.Param))
    delta = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(p_before), jax.tree.leaves(p_after)))
    print(f"sanity: max |param change| after training = {delta:.3e}; "
          f"mean reward per step = {[round(x, 3) for x in reward_means]}")
    print(f"rollouts done: {n} (expected {total_steps}); train() wall {t_train1-t_train0:.1f}s", flush=True)
    assert n == total_steps, (n, total_steps)
    W = args.warmup
    # step k (k>=1) spans [gen_start_k, gen_start_{k+1}); last ends at train() return
    starts = [g[0] for g in gen_log] + [t_train1]
    step_times = [starts[k + 1] - starts[k] for k in range(n)]
    timed = step_times[W:]
    gen_tok = sum(g[2] for g in gen_log[W:])
    gen_time = sum(g[1] - g[0] for g in gen_log[W:])
    seqs = gen_log[W][3]
    print(f"warm-up steps (incl. jit compile): {[round(x, 2) for x in step_times[:W]]}")
    print(f"per-step times (s): {[round(x, 2) for x in timed]}")
    print(f"RESULT tunix_grpo steps/s = {len(timed)/sum(timed):.3f}  "
          f"(mean step {np.mean(timed):.3f}s, median {np.median(timed):.3f}s, {seqs} seqs/step)")
    print(f"RESULT tunix_grpo generated tokens/s (over whole step) = {gen_tok/sum(timed):.1f}")
    print(f"RESULT tunix_grpo median-based: steps/s = {1/np.median(timed):.3f}, "
          f"generated tokens/s = {(gen_tok/len(timed))/np.median(timed):.1f}")
    print(f"RESULT tunix_grpo rollout-only tokens/s = {gen_tok/gen_time:.1f} "
          f"(rollout {gen_time/len(timed):.3f}s/step = {100*gen_time/sum(timed):.0f}% of step; "
          f"{gen_tok/len(timed):.0f} tokens/step)")

    if args.sampler_only:
        # bare sampler throughput: 64 sequences x 32 new tokens, KV cache on
        sampler = cluster.rollout._sampler  # the vanilla Tunix sampler
        ps = tiny_tok.make_prompts(args.prompts * args.gens, args.prompt_words, seed=123)
        rates = []
        for rep in range(6):
            ts = time.perf_counter()
            out = sampler(input_strings=ps, max_generation_steps=args.new_tokens,
                          max_prompt_length=max_prompt_len, echo=False, temperature=0.9,
                          top_p=1.0, seed=rep, pad_output=False)
            te = time.perf_counter()
            ntok = sum(len(t) for t in out.tokens)
            if rep >= 2:
                rates.append(ntok / (te - ts))
            print(f"sampler rep{rep}: {len(ps)} seqs, {ntok} new tokens, {te-ts:.3f}s "
                  f"-> {ntok/(te-ts):.1f} tok/s" + (" (includes compile)" if rep == 0 else ""))
        print(f"RESULT tunix_sampler tokens/s = {np.median(rates):.1f} (median of reps 2-5; "
              f"{len(ps)} seqs x {args.new_tokens} new tokens, prompt {max_prompt_len})")


if __name__ == "__main__":
    main()

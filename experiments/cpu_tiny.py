r"""DYPO on a laptop: a tiny model learns procedural arithmetic from programmatic teachers.

  python -m dypo_jax.main --config=experiments/cpu_tiny.py --workdir=/tmp/dypo_tiny
  python -m dypo_jax.main --config=experiments/cpu_tiny.py:quick --workdir=/tmp/dypo_quick

The run generates the data, trains a SentencePiece tokenizer, pre-trains a base model by teacher
SFT until a greedy held-out accuracy gate (METHOD.md §8), runs DYPO from it, evaluates ID and OOD
pass@1 before and after, and writes metrics, plots and a final table into the workdir.

Variants: "" (the default run, at most about 15 minutes on 2 CPU cores) and "quick" (a couple of
minutes; CI runs it end to end).
"""
from dypo_jax import config as config_lib

VARIANTS = ("", "quick")


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.seed = 0
  c.model.update(dict(
      arch="qwen2", vocab_size=64, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=32, mlp_dim=384, max_seq_len=160, tie_embeddings=True, logprob_impl="full",
      # Two layers on a CPU: a loop over them runs rollouts ~25% faster than the scan, which
      # pays off only at depth (compile time; BENCHMARKS.md).
      scan_layers=False))
  c.tokenizer.train_vocab_size = 64  # Addition traces hold 72 distinct pieces at most.
  # Multi-term addition in-distribution (three teacher styles, one of them sloppy); OOD sets near
  # (a zero term, a space before "="), mid (5 terms, a term in 100..199) and far (5-6 terms,
  # 3-digit terms) from training (data/tasks.py; METHOD.md §8), each reported apart.
  c.data.update(dict(num_train=2000, num_eval_id=200, num_eval_ood=300, id_tasks=("add",),
                     ood_tasks=("add_zero", "add_space_eq", "add_5x1", "add_100s", "add_long",
                                "add_3digit")))
  c.sampler.update(dict(max_new_tokens=64, prompt_buckets=(16, 32, 64)))
  c.rl.num_samples = 8
  c.optim.update(dict(learning_rate=2e-4, grad_clip=1.0))
  c.train.update(dict(num_steps=150, rollout_prompts=16, update_prompts=16, log_every=5,
                      checkpoint_every=50, eval_every=50))
  c.eval.update(dict(num_samples=4, temperature=0.6, max_new_tokens=96, max_prompts=300))
  # The base stops on the accuracy gate, or at max_steps: a step budget, not a clock, so the same
  # seed gives the same base on a loaded machine (seed 0 crosses the gate at step 950, about 3
  # minutes on 2 quiet cores); max_minutes is only a safety net.
  c.pretrain.update(dict(enabled=True, target_accuracy=0.35, max_steps=2000, eval_every=50,
                         eval_prompts=64, learning_rate=1e-3, update_prompts=32,
                         max_minutes=15.0))
  if variant == "quick":
    c.model.update(dict(embed_dim=64, num_heads=2, num_kv_heads=1, mlp_dim=192))
    c.data.update(dict(num_train=400, num_eval_id=32, num_eval_ood=32))
    c.train.update(dict(num_steps=6, rollout_prompts=8, update_prompts=8, log_every=1,
                        checkpoint_every=3, eval_every=3))
    c.eval.update(dict(num_samples=2, max_prompts=32))
    c.pretrain.update(dict(target_accuracy=0.05, max_steps=40, eval_every=20, eval_prompts=16,
                           update_prompts=16, max_minutes=1.0))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/cpu_tiny.py; allowed: "
                     f"{VARIANTS}")
  return c

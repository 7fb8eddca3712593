r"""DYPO on a laptop: a tiny model learns procedural arithmetic from three programmatic teachers.

  python -m dypo_jax.main --config=experiments/cpu_tiny.py --workdir=/tmp/dypo_tiny
  python -m dypo_jax.main --config=experiments/cpu_tiny.py:quick --workdir=/tmp/dypo_quick

Variants: "" (the default run, about 10-15 minutes on 2 CPU cores) and "quick" (a couple of
minutes; CI runs it end to end).
"""
from dypo_jax import config as config_lib


def get_config(variant: str = ""):
  c = config_lib.base_config()
  c.seed = 0
  c.model.update(dict(
      arch="qwen2", vocab_size=128, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2,
      head_dim=32, mlp_dim=384, max_seq_len=256, tie_embeddings=True, logprob_impl="full"))
  c.tokenizer.train_vocab_size = 128
  c.sampler.max_new_tokens = 96
  c.rl.num_samples = 8
  c.optim.learning_rate = 1e-3
  c.train.update(dict(num_steps=200, rollout_prompts=16, update_prompts=16, log_every=5,
                      checkpoint_every=50, eval_every=50))
  if variant == "quick":
    c.model.update(dict(embed_dim=64, num_heads=2, num_kv_heads=1, mlp_dim=192))
    c.data.update(dict(num_train=400, num_eval_id=32, num_eval_ood=32))
    c.train.update(dict(num_steps=6, rollout_prompts=8, update_prompts=8, log_every=1,
                        checkpoint_every=3, eval_every=3))
    c.eval.update(dict(num_samples=2, max_prompts=32))
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of experiments/cpu_tiny.py; allowed: '', quick")
  return c


VARIANTS = ("", "quick")

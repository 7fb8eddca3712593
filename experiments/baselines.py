r"""METHOD.md §5: every method on the cpu_tiny setup, with the same code, data and update budget.

  python -m dypo_jax.main --config=experiments/baselines.py:grpo --workdir=/tmp/grpo
  python -m dypo_jax.main --config=experiments/baselines.py:luffy,quick --workdir=/tmp/luffy

Variants (add ",quick" for the few-step CI size):
  sft             multi-teacher SFT on every prompt (no rollouts);
  grpo            plain GRPO on every group (no grading, no GAL);
  sft_then_rl     SFT for the first half of the updates, then GRPO;
  luffy           LUFFY-style mixing: K-1 rollouts plus a teacher trace as an off-policy member;
  ladder_rl       Table 3 "+RL": SFT on every prompt's teacher trace and GRPO on every group;
  ladder_grading  Table 3 "+dynamic grading": Easy dropped, Hard -> SFT, Mid -> GRPO (alpha = 1);
  dypo            Table 3 "+GAL" = DYPO (alpha = 0.5).
"""
import os

from dypo_jax import config as config_lib

VARIANTS = ("sft", "grpo", "sft_then_rl", "luffy", "ladder_rl", "ladder_grading", "dypo",
            "sft,quick", "grpo,quick", "sft_then_rl,quick", "luffy,quick", "ladder_rl,quick",
            "ladder_grading,quick", "dypo,quick")


def get_config(variant: str = "dypo"):
  method, _, size = variant.partition(",")
  if size not in ("", "quick"):
    raise ValueError(f"size {size!r} in variant {variant!r}; allowed: '' or 'quick'")
  c = config_lib.load_experiment(os.path.join(os.path.dirname(__file__), "cpu_tiny.py"), size)
  if method == "sft":
    c.rl.method = "sft"
  elif method == "grpo":
    c.rl.method = "grpo"
  elif method == "sft_then_rl":
    c.rl.method = "sft_then_rl"
    c.rl.sft_then_rl_switch = c.train.num_steps // 2
  elif method == "luffy":
    c.rl.method = "luffy"
  elif method == "ladder_rl":
    c.rl.method = "sft_plus_rl"
  elif method == "ladder_grading":
    c.rl.method = "dypo"
    c.rl.alpha = 1.0
  elif method == "dypo":
    c.rl.method = "dypo"
  else:
    raise ValueError(f"unknown method {method!r} in variant {variant!r}; allowed: "
                     "sft, grpo, sft_then_rl, luffy, ladder_rl, ladder_grading, dypo")
  return c

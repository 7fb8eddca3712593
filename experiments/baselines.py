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
  dypo            Table 3 "+GAL" = DYPO (alpha = 0.5);
  srft            SRFT: entropy-weighted SFT on every prompt's teacher trace, GRPO on its group,
                  and an NLL term on the group's correct rollouts, in one stage;
  chord           CHORD: (1 - mu)·GRPO + mu·SFT (p(1-p)-weighted tokens), mu from 0.9 to 0.05
                  over the run's updates.
"""
import os

from dypo_jax import config as config_lib

METHODS = ("sft", "grpo", "sft_then_rl", "luffy", "ladder_rl", "ladder_grading", "dypo", "srft",
           "chord")
VARIANTS = METHODS + tuple(f"{m},quick" for m in METHODS)


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
  elif method == "srft":
    c.rl.method = "srft"
  elif method == "chord":
    c.rl.method = "chord"
    c.rl.chord_mu_steps = c.train.num_steps  # mu reaches its end value at the last update.
  else:
    raise ValueError(f"unknown method {method!r} in variant {variant!r}; allowed: "
                     f"{', '.join(METHODS)}")
  return c

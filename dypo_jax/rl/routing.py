"""A method's policy, written once: where a graded group goes, the loss weights of an update
batch, and which update programs a run can take (METHOD.md §1, §3 and §5).

This is the only code that reads a method's name. Everything here is a pure function of plain
values (a `Policy`, the update step, a grade, counts), so the trainer asks and never re-decides,
and the tests are truth tables.

Methods (`rl.method`):
  dypo         plain GRPO before `rl.switch_gate`; then Easy dropped, Hard -> teacher SFT (or, with
               `rl.offline_loss_type="rl"`, a group with the teacher trace as an off-policy row),
               Mid -> α·GRPO + (1-α)·GAL;
  grpo         every group -> GRPO;
  sft          no rollouts: every prompt -> teacher SFT;
  sft_then_rl  `sft` for `rl.sft_then_rl_switch` updates, then `grpo`;
  luffy        every group -> GRPO with K-1 rollouts and the teacher trace as an off-policy row;
  sft_plus_rl  every prompt -> teacher SFT and its group -> GRPO (Table 3's "+RL" rung);
  srft         as sft_plus_rl, SFT weighted by exp(-H) per token, plus an NLL term on the
               group's correct rollouts (SRFT, METHOD.md §5);
  chord        as sft_plus_rl, weights (μ, 1-μ, 0) with μ scheduled over the updates and SFT
               tokens weighted by p(1-p) (CHORD).
"""
import dataclasses
import enum

import ml_collections

from dypo_jax.rl import grading

METHODS = ("dypo", "grpo", "sft", "sft_then_rl", "luffy", "sft_plus_rl", "srft", "chord")
OFFLINE_LOSS_TYPES = ("sft", "rl")


class Phase(enum.Enum):
  """What a rollout round does at a given update step."""
  SFT = "sft"  # No sampling: every prompt's teacher trace is queued for SFT.
  GRPO = "grpo"  # Every sampled group is queued whole (no grading).
  ROUTED = "routed"  # Groups are graded: Easy dropped, Hard -> teacher, Mid -> the group.
  LUFFY = "luffy"  # Every group is queued with its teacher trace as an off-policy member.
  SFT_PLUS_RL = "sft_plus_rl"  # Every prompt's teacher trace for SFT and its group for GRPO.


@dataclasses.dataclass(frozen=True)
class Policy:
  """The plain values of `config.rl` that decide routing and weights."""
  method: str
  alpha: float = 0.5  # GRPO's share of a Mid prompt's loss (GAL has 1 - alpha).
  sft_loss_coef: float = 1.0  # γ.
  switch_gate: int = 0  # dypo: the update step from which groups are graded.
  sft_then_rl_switch: int = 0  # sft_then_rl: SFT updates before GRPO.
  offline_loss_type: str = "sft"  # dypo: how a Hard prompt's teacher trace is trained.
  srft_sft_coef: float = 0.5  # srft: the demonstration SFT's weight (times γ).
  srft_positive_coef: float = 0.1  # srft: the weight of the NLL on correct rollouts.
  chord_mu_start: float = 0.9  # chord: μ, SFT's share, at update 0 ...
  chord_mu_end: float = 0.05  # ... falling linearly to this ...
  chord_mu_steps: int = 100  # ... at this update, and held there.

  def __post_init__(self):
    if self.method not in METHODS:
      raise ValueError(f"rl.method={self.method!r}; allowed: {METHODS}")
    if self.offline_loss_type not in OFFLINE_LOSS_TYPES:
      raise ValueError(f"rl.offline_loss_type={self.offline_loss_type!r}; allowed: "
                       f"{OFFLINE_LOSS_TYPES}")

  @classmethod
  def from_config(cls, rl: ml_collections.ConfigDict) -> "Policy":
    return cls(method=rl.method, alpha=rl.alpha, sft_loss_coef=rl.sft_loss_coef,
               switch_gate=rl.switch_gate, sft_then_rl_switch=rl.sft_then_rl_switch,
               offline_loss_type=rl.offline_loss_type, srft_sft_coef=rl.srft_sft_coef,
               srft_positive_coef=rl.srft_positive_coef, chord_mu_start=rl.chord_mu_start,
               chord_mu_end=rl.chord_mu_end, chord_mu_steps=rl.chord_mu_steps)


def phase(policy: Policy, step: int) -> Phase:
  """What the rollout rounds feeding update `step` (0-based) do."""
  m = policy.method
  if m == "sft" or (m == "sft_then_rl" and step < policy.sft_then_rl_switch):
    return Phase.SFT
  if m == "dypo" and step >= policy.switch_gate:
    return Phase.ROUTED
  if m == "luffy":
    return Phase.LUFFY
  if m in ("sft_plus_rl", "srft", "chord"):
    return Phase.SFT_PLUS_RL
  return Phase.GRPO  # grpo, sft_then_rl after its SFT, dypo before switch_gate.


def samples(policy: Policy, step: int) -> bool:
  """Whether the rounds of update `step` sample groups (SFT rounds only read teacher traces)."""
  return phase(policy, step) is not Phase.SFT


def rollouts_per_group(policy: Policy, k: int) -> int:
  """Rollouts sampled per prompt: K, or K - 1 where the teacher trace is the K-th member."""
  return k - 1 if policy.method == "luffy" else k


@dataclasses.dataclass(frozen=True)
class Destination:
  """Where one prompt of a round goes."""
  hard: bool = False  # Queue a Hard item: the drawn teacher trace, for SFT.
  mid: bool = False  # Queue a Mid item: the sampled group, for GRPO (and GAL).
  mid_teacher: bool = False  # The Mid item carries the drawn teacher trace as an off-policy row.
  no_teacher: bool = False  # A teacher trace was wanted and the prompt has none: counted.


DROP = Destination()


def route(policy: Policy, step: int, grade: int | None, *, has_teacher: bool) -> Destination:
  """Where a prompt goes at update `step`, from its group's grade (None in SFT rounds, which
  sample nothing) and whether it carries a teacher trace.

  A prompt that needs a teacher and has none is counted (`no_teacher`) and, where the teacher
  was all it would be trained on, dropped: never trained on something else silently.
  """
  p = phase(policy, step)
  if p is Phase.SFT:
    return Destination(hard=has_teacher, no_teacher=not has_teacher)
  if grade is None:
    raise ValueError(f"route: method {policy.method!r} samples at step {step}: a grade is needed")
  if p is Phase.GRPO:
    return Destination(mid=True)
  if p is Phase.LUFFY:
    return Destination(mid=True, mid_teacher=has_teacher, no_teacher=not has_teacher)
  if p is Phase.SFT_PLUS_RL:
    return Destination(hard=has_teacher, mid=True, no_teacher=not has_teacher)
  # Routed (DYPO after switch_gate).
  if grade == grading.EASY:
    return DROP
  if grade == grading.MID:
    return Destination(mid=True)
  if not has_teacher:
    return Destination(no_teacher=True)
  if policy.offline_loss_type == "rl":
    return Destination(mid=True, mid_teacher=True)
  return Destination(hard=True)


def uses_gal(policy: Policy) -> bool:
  """Whether any update of the run weights GAL (DYPO with α < 1)."""
  return policy.method == "dypo" and policy.alpha < 1.0


def sft_token_weight(policy: Policy) -> str:
  """The SFT term's per-token weight (`losses.SFT_TOKEN_WEIGHTS`): SRFT's exp(-H), CHORD's p(1-p)."""
  return {"srft": "exp_neg_entropy", "chord": "p_one_minus_p"}.get(policy.method, "none")


def positive_nll_coef(policy: Policy) -> float:
  """The weight of SRFT's NLL on correct rollouts inside the RL term (0 for every other method)."""
  return policy.srft_positive_coef if policy.method == "srft" else 0.0


def chord_mu(policy: Policy, step: int) -> float:
  """CHORD's μ at update `step`: linear from chord_mu_start to chord_mu_end over chord_mu_steps."""
  frac = min(step / max(policy.chord_mu_steps, 1), 1.0)
  return policy.chord_mu_start + frac * (policy.chord_mu_end - policy.chord_mu_start)


def loss_weights(policy: Policy, step: int, *, n_hard: int,
                 n_mid: int) -> tuple[float, float, float]:
  """(w_sft, w_grpo, w_gal) of an update batch with n_hard Hard and n_mid Mid items.

  Routed and SFT+RL batches: (N_H / N)·γ, (N_M / N)·α, (N_M / N)·(1 - α), N = N_H + N_M (the
  per-prompt expectation of the paper's eq. 4; α = 1 where GAL is off). SFT rounds: (γ, 0, 0).
  Plain GRPO and LUFFY (whose teacher rows are part of the group): (0, 1, 0). SRFT sums its
  terms, (srft_sft_coef·γ, 1, 0); CHORD mixes them, (μ·γ, 1 - μ, 0); a term with no items in
  the batch is weighted 0.
  """
  p = phase(policy, step)
  if p is Phase.SFT:
    return (policy.sft_loss_coef, 0.0, 0.0)
  if policy.method in ("srft", "chord"):
    w_sft, w_rl = ((policy.srft_sft_coef, 1.0) if policy.method == "srft"
                   else (chord_mu(policy, step), 1.0 - chord_mu(policy, step)))
    return (w_sft * policy.sft_loss_coef if n_hard else 0.0, w_rl if n_mid else 0.0, 0.0)
  if p in (Phase.ROUTED, Phase.SFT_PLUS_RL):
    n = max(n_hard + n_mid, 1)
    alpha = policy.alpha if uses_gal(policy) else 1.0
    return (n_hard / n * policy.sft_loss_coef, n_mid / n * alpha, n_mid / n * (1.0 - alpha))
  return (0.0, 1.0, 0.0)


def items_per_prompt(policy: Policy) -> int:
  """Queued items a prompt of a round can give: SFT+RL methods queue its teacher trace and its
  group (2), every other method one of them at most."""
  return 2 if policy.method in ("sft_plus_rl", "srft", "chord") else 1


def update_items(policy: Policy, update_prompts: int) -> int:
  """Items an update takes: every prompt's items, so one rollout round of `update_prompts`
  prompts feeds one update for every method (equal rollout budgets; METHOD.md §6)."""
  return update_prompts * items_per_prompt(policy)


def update_slots(policy: Policy, update_prompts: int, k: int) -> int:
  """The slots the largest update batch needs: one per group, K Hard items per slot. SFT+RL
  methods hold U groups and U teacher traces (U + ceil(U / K)); the others at most U."""
  if items_per_prompt(policy) == 2:
    return update_prompts + -(-update_prompts // k)
  return update_prompts


def queues_hard(policy: Policy) -> bool:
  """Whether some update of the run can hold Hard items (teacher traces packed K to a slot)."""
  m = policy.method
  return m in ("sft", "sft_then_rl", "sft_plus_rl", "srft", "chord") or (
      m == "dypo" and policy.offline_loss_type == "sft")


def queues_groups(policy: Policy) -> bool:
  """Whether some update of the run can hold sampled groups."""
  return policy.method != "sft"


def update_variants(policy: Policy, *, shared_prompt: bool, term_norms: bool,
                    every_update_logged: bool) -> list[tuple[bool, bool]]:
  """The (shared_prompt, term_norms) update programs a run can take, each compiled once.

  A batch of groups alone runs each prompt once (`shared_prompt`); a batch with a packed Hard
  slot runs every row whole. Per-term gradient norms are computed on logged updates only.
  """
  paths = []
  if shared_prompt and queues_groups(policy):
    paths.append(True)
  if queues_hard(policy) or not paths:
    paths.append(False)
  if not term_norms:
    norms = [False]
  elif every_update_logged:
    norms = [True]
  else:
    norms = [False, True]
  return [(path, norm) for path in paths for norm in norms]

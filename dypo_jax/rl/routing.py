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
  sft_plus_rl  every prompt -> teacher SFT and its group -> GRPO (Table 3's "+RL" rung).
"""
import dataclasses
import enum

import ml_collections

from dypo_jax.rl import grading

METHODS = ("dypo", "grpo", "sft", "sft_then_rl", "luffy", "sft_plus_rl")
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
               offline_loss_type=rl.offline_loss_type)


def phase(policy: Policy, step: int) -> Phase:
  """What the rollout rounds feeding update `step` (0-based) do."""
  m = policy.method
  if m == "sft" or (m == "sft_then_rl" and step < policy.sft_then_rl_switch):
    return Phase.SFT
  if m == "dypo" and step >= policy.switch_gate:
    return Phase.ROUTED
  if m == "luffy":
    return Phase.LUFFY
  if m == "sft_plus_rl":
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


def loss_weights(policy: Policy, step: int, *, n_hard: int,
                 n_mid: int) -> tuple[float, float, float]:
  """(w_sft, w_grpo, w_gal) of an update batch with n_hard Hard and n_mid Mid items.

  Routed and SFT+RL batches: (N_H / N)·γ, (N_M / N)·α, (N_M / N)·(1 - α), N = N_H + N_M (the
  per-prompt expectation of the paper's eq. 4; α = 1 where GAL is off). SFT rounds: (γ, 0, 0).
  Plain GRPO and LUFFY (whose teacher rows are part of the group): (0, 1, 0).
  """
  p = phase(policy, step)
  if p is Phase.SFT:
    return (policy.sft_loss_coef, 0.0, 0.0)
  if p in (Phase.ROUTED, Phase.SFT_PLUS_RL):
    n = max(n_hard + n_mid, 1)
    alpha = policy.alpha if uses_gal(policy) else 1.0
    return (n_hard / n * policy.sft_loss_coef, n_mid / n * alpha, n_mid / n * (1.0 - alpha))
  return (0.0, 1.0, 0.0)


def queues_hard(policy: Policy) -> bool:
  """Whether some update of the run can hold Hard items (teacher traces packed K to a slot)."""
  m = policy.method
  return m in ("sft", "sft_then_rl", "sft_plus_rl") or (
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

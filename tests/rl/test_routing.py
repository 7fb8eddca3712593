"""Truth tables of dypo_jax.rl.routing: every method x phase x grade x teacher availability."""
import itertools

import pytest

from dypo_jax.rl import grading
from dypo_jax.rl import routing
from dypo_jax.rl.routing import Destination

E, M, H = grading.EASY, grading.MID, grading.HARD
HARD = Destination(hard=True)
GROUP = Destination(mid=True)
GROUP_WITH_TEACHER = Destination(mid=True, mid_teacher=True)
NO_TEACHER = Destination(no_teacher=True)
DROP = routing.DROP

# (method, policy settings, step) -> {(grade, has_teacher): destination}. Steps are chosen on
# both sides of every switch (switch_gate = 3, sft_then_rl_switch = 3).
_GATE = dict(switch_gate=3, sft_then_rl_switch=3)
_ALL_TO_GROUP = {(g, t): GROUP for g in (E, M, H) for t in (True, False)}
TABLE = {
    ("dypo", "sft", 5): {
        (E, True): DROP, (E, False): DROP, (M, True): GROUP, (M, False): GROUP,
        (H, True): HARD, (H, False): NO_TEACHER},
    ("dypo", "rl", 5): {
        (E, True): DROP, (E, False): DROP, (M, True): GROUP, (M, False): GROUP,
        (H, True): GROUP_WITH_TEACHER, (H, False): NO_TEACHER},
    ("dypo", "sft", 2): _ALL_TO_GROUP,  # Before switch_gate: plain GRPO.
    ("dypo", "sft", 3): {  # The gate's own step is routed.
        (E, True): DROP, (E, False): DROP, (M, True): GROUP, (M, False): GROUP,
        (H, True): HARD, (H, False): NO_TEACHER},
    ("grpo", "sft", 0): _ALL_TO_GROUP,
    ("grpo", "sft", 9): _ALL_TO_GROUP,
    ("sft_then_rl", "sft", 9): _ALL_TO_GROUP,
    ("luffy", "sft", 0): {(g, t): (GROUP_WITH_TEACHER if t else
                                   Destination(mid=True, no_teacher=True))
                          for g in (E, M, H) for t in (True, False)},
    **{(method, "sft", 0): {(g, t): (Destination(hard=True, mid=True) if t else
                                     Destination(mid=True, no_teacher=True))
                            for g in (E, M, H) for t in (True, False)}
       for method in ("sft_plus_rl", "srft", "chord")},
}


@pytest.mark.parametrize("method,offline,step", sorted(TABLE))
def test_route_truth_table(method, offline, step):
  policy = routing.Policy(method=method, offline_loss_type=offline, **_GATE)
  for (grade, has_teacher), want in TABLE[(method, offline, step)].items():
    got = routing.route(policy, step, grade, has_teacher=has_teacher)
    assert got == want, (method, offline, step, grade, has_teacher, got)


@pytest.mark.parametrize("method,step", [("sft", 0), ("sft", 9), ("sft_then_rl", 0),
                                         ("sft_then_rl", 2)])
def test_sft_rounds_sample_nothing_and_queue_the_teacher(method, step):
  policy = routing.Policy(method=method, **_GATE)
  assert not routing.samples(policy, step)
  assert routing.route(policy, step, None, has_teacher=True) == HARD
  assert routing.route(policy, step, None, has_teacher=False) == NO_TEACHER


def test_every_sampling_phase_needs_a_grade():
  for method in routing.METHODS:
    policy = routing.Policy(method=method, **_GATE)
    for step in (0, 5):
      if routing.samples(policy, step):
        with pytest.raises(ValueError, match="grade"):
          routing.route(policy, step, None, has_teacher=True)


def test_phases():
  p = lambda method, step, **kw: routing.phase(routing.Policy(method=method, **_GATE, **kw), step)
  assert [p("dypo", s) for s in (0, 2, 3, 4)] == [routing.Phase.GRPO] * 2 + [
      routing.Phase.ROUTED] * 2
  assert [p("sft_then_rl", s) for s in (0, 2, 3)] == [routing.Phase.SFT] * 2 + [
      routing.Phase.GRPO]
  assert {p("sft", s) for s in range(6)} == {routing.Phase.SFT}
  assert {p("grpo", s) for s in range(6)} == {routing.Phase.GRPO}
  assert {p("luffy", s) for s in range(6)} == {routing.Phase.LUFFY}
  assert {p("sft_plus_rl", s) for s in range(6)} == {routing.Phase.SFT_PLUS_RL}
  assert {p(m, s) for m in ("srft", "chord") for s in range(6)} == {routing.Phase.SFT_PLUS_RL}


def test_rollouts_per_group():
  for method in routing.METHODS:
    want = 7 if method == "luffy" else 8
    assert routing.rollouts_per_group(routing.Policy(method=method), 8) == want


def test_an_update_takes_every_item_of_its_prompts():
  """One round of U prompts feeds one update for every method: the most items a prompt can queue
  (Destination.hard + .mid over the truth table) times U, in slots that hold them all."""
  for method in routing.METHODS:
    policy = routing.Policy(method=method)
    most = max(int(d.hard) + int(d.mid) for (m, _, _), table in TABLE.items() if m == method
               for d in table.values()) if method != "sft" else 1
    assert routing.items_per_prompt(policy) == most, method
    assert routing.update_items(policy, 16) == 16 * most
    # U groups plus U teacher traces packed K = 8 to a slot; one slot per item otherwise.
    assert routing.update_slots(policy, 16, 8) == (16 + 2 if most == 2 else 16)


# (method, alpha, step, n_hard, n_mid) -> (w_sft, w_grpo, w_gal); γ = 2 throughout.
WEIGHTS = {
    ("dypo", 0.5, 5, 2, 6): (2 / 8 * 2, 6 / 8 * 0.5, 6 / 8 * 0.5),
    ("dypo", 0.5, 5, 4, 0): (2.0, 0.0, 0.0),  # All Hard: pure SFT.
    ("dypo", 0.5, 5, 0, 4): (0.0, 0.5, 0.5),  # All Mid: the α-mix.
    ("dypo", 0.8, 5, 1, 3): (1 / 4 * 2, 3 / 4 * 0.8, 3 / 4 * 0.2),
    ("dypo", 1.0, 5, 1, 3): (1 / 4 * 2, 3 / 4, 0.0),  # Table 3's "+dynamic grading".
    ("dypo", 0.5, 2, 0, 4): (0.0, 1.0, 0.0),  # Before switch_gate: plain GRPO.
    ("dypo", 0.5, 5, 0, 0): (0.0, 0.0, 0.0),  # Nothing queued: no term weighted.
    ("grpo", 0.5, 5, 0, 4): (0.0, 1.0, 0.0),
    ("luffy", 0.5, 5, 0, 4): (0.0, 1.0, 0.0),
    ("sft", 0.5, 5, 4, 0): (2.0, 0.0, 0.0),
    ("sft_then_rl", 0.5, 1, 4, 0): (2.0, 0.0, 0.0),
    ("sft_then_rl", 0.5, 5, 0, 4): (0.0, 1.0, 0.0),
    ("sft_plus_rl", 0.5, 5, 3, 3): (0.5 * 2, 0.5, 0.0),  # No GAL outside DYPO, whatever α.
    ("srft", 0.5, 5, 3, 3): (0.5 * 2, 1.0, 0.0),  # SRFT sums its terms: 0.5·γ, 1.
    ("srft", 0.5, 5, 0, 3): (0.0, 1.0, 0.0),  # No teacher trace in the batch.
    # CHORD, μ linear 0.9 -> 0.05 over 10 updates: μ(5) = 0.475, μ(20) = 0.05.
    ("chord", 0.5, 5, 3, 3): (0.475 * 2, 0.525, 0.0),
    ("chord", 0.5, 20, 3, 3): (0.05 * 2, 0.95, 0.0),
    ("chord", 0.5, 0, 3, 0): (0.9 * 2, 0.0, 0.0),
}


@pytest.mark.parametrize("method,alpha,step,n_hard,n_mid", sorted(WEIGHTS))
def test_loss_weights(method, alpha, step, n_hard, n_mid):
  policy = routing.Policy(method=method, alpha=alpha, sft_loss_coef=2.0, chord_mu_steps=10,
                          **_GATE)
  got = routing.loss_weights(policy, step, n_hard=n_hard, n_mid=n_mid)
  assert got == pytest.approx(WEIGHTS[(method, alpha, step, n_hard, n_mid)])


def test_uses_gal_only_for_dypo_below_alpha_one():
  for method, alpha in itertools.product(routing.METHODS, (0.2, 0.5, 1.0)):
    got = routing.uses_gal(routing.Policy(method=method, alpha=alpha))
    assert got == (method == "dypo" and alpha < 1.0), (method, alpha)


# (method, offline_loss_type) -> the update paths (shared_prompt values) a run can take.
PATHS = {("dypo", "sft"): [True, False], ("dypo", "rl"): [True], ("grpo", "sft"): [True],
         ("luffy", "sft"): [True], ("sft", "sft"): [False], ("sft_then_rl", "sft"): [True, False],
         ("sft_plus_rl", "sft"): [True, False], ("srft", "sft"): [True, False],
         ("chord", "sft"): [True, False]}


def test_step_settings_only_for_srft_and_chord():
  for method in routing.METHODS:
    policy = routing.Policy(method=method, srft_positive_coef=0.3)
    want = {"srft": "exp_neg_entropy", "chord": "p_one_minus_p"}.get(method, "none")
    assert routing.sft_token_weight(policy) == want, method
    assert routing.positive_nll_coef(policy) == (0.3 if method == "srft" else 0.0), method


@pytest.mark.parametrize("method,offline", sorted(PATHS))
def test_update_variants(method, offline):
  policy = routing.Policy(method=method, offline_loss_type=offline)
  paths = PATHS[(method, offline)]
  got = routing.update_variants(policy, shared_prompt=True, term_norms=False,
                                every_update_logged=False)
  assert got == [(p, False) for p in paths]
  got = routing.update_variants(policy, shared_prompt=True, term_norms=True,
                                every_update_logged=False)
  assert got == [(p, n) for p in paths for n in (False, True)]
  got = routing.update_variants(policy, shared_prompt=True, term_norms=True,
                                every_update_logged=True)
  assert got == [(p, True) for p in paths]
  # Without the shared-prompt path every batch takes the row path.
  got = routing.update_variants(policy, shared_prompt=False, term_norms=False,
                                every_update_logged=False)
  assert got == [(False, False)]


def test_every_destination_it_can_return_is_consistent_with_the_queues_it_declares():
  """route() never queues a kind of item that update_variants() did not compile for."""
  for method, offline in itertools.product(routing.METHODS, routing.OFFLINE_LOSS_TYPES):
    policy = routing.Policy(method=method, offline_loss_type=offline, **_GATE)
    for step, grade, teacher in itertools.product(range(6), (E, M, H), (True, False)):
      d = routing.route(policy, step, grade if routing.samples(policy, step) else None,
                        has_teacher=teacher)
      assert not d.hard or routing.queues_hard(policy), (method, offline, step, grade)
      assert not d.mid or routing.queues_groups(policy), (method, offline, step, grade)
      assert not (d.mid_teacher and not d.mid)
      assert not (d.no_teacher and teacher)


def test_bad_policy_named():
  with pytest.raises(ValueError, match="rl.method='ppo'"):
    routing.Policy(method="ppo")
  with pytest.raises(ValueError, match="offline_loss_type"):
    routing.Policy(method="dypo", offline_loss_type="dpo")

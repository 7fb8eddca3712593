"""A few-update run's metrics pinned to recorded values, so a change that moves the study's
figures is noticed when it is made (issue 26), not discovered at the next study.

The run is the suite's shared reference run (conftest.reference_run: DYPO on
experiments/cpu_tiny.py:quick with tests/tiny_runs.OVERRIDES, 16 updates from a random init).
Its first PINNED_STEPS updates' budget (rollout rounds, groups, sampled and update tokens: exact)
and figures (reward, routing fractions, loss, gradient norm: to a relative 1e-4, for CPU
rounding) are compared with tests/pinned/reference_run.json. A change meant to move them (a loss,
the sampler, the data, a jax upgrade) rewrites the file, and says so in its commit:

  DYPO_UPDATE_PINS=1 python -m pytest -q -n 0 tests/test_pinned_metrics.py
"""
import json
import os

import jax
import pytest

import tiny_runs

PINNED_STEPS = 4  # Later updates only compound what the first ones pin.
EXACT = ("rollout/rounds", "rollout/groups", "rollout/tokens", "batch/tokens")
CLOSE = ("reward/binary", "route/hard_frac", "route/mid_frac", "loss/total", "grad/norm")
PINS = os.path.join(tiny_runs.TESTS, "pinned", "reference_run.json")


def _pinned_view(metrics: dict[int, dict]) -> dict[str, dict[str, float]]:
  return {str(step): {k: metrics[step][k] for k in EXACT + CLOSE if k in metrics[step]}
          for step in range(1, PINNED_STEPS + 1)}


@pytest.mark.slow
def test_reference_run_metrics_match_the_recorded_values(reference_run):
  got = _pinned_view(tiny_runs.comparable_metrics(reference_run))
  if os.environ.get("DYPO_UPDATE_PINS") == "1":
    with open(PINS, "w") as f:
      json.dump({"jax": jax.__version__, "steps": got}, f, indent=1, sort_keys=True)
      f.write("\n")
  with open(PINS) as f:
    pinned = json.load(f)
  regenerate = (f"recorded with jax {pinned['jax']} (now {jax.__version__}); if the change is "
                f"meant, regenerate: DYPO_UPDATE_PINS=1 python -m pytest -q -n 0 {__file__}")
  for step, want in pinned["steps"].items():
    assert set(got[step]) == set(want), (step, set(got[step]) ^ set(want), regenerate)
    for key, value in want.items():
      if key in EXACT:
        assert got[step][key] == value, (f"update {step} {key}: {got[step][key]}, pinned "
                                          f"{value}; {regenerate}")
      else:
        assert got[step][key] == pytest.approx(value, rel=1e-4, abs=1e-7), (
            f"update {step} {key}: {got[step][key]}, pinned {value}; {regenerate}")

#!/usr/bin/env bash
# Workload W1 side by side: R interleaved rounds of
#   our w1_step.py --method grpo, our w1_step.py --method dypo, our sampler.py, peers/run.sh 1 STEPS
# (Tunix then TRL), then the median of each figure over the rounds and the ratios ours / peer.
# Interleaving spreads the drift of a shared machine over every contender.
#
# Usage (from anywhere):
#   bash benchmarks/run_all.sh [ROUNDS] [STEPS]          # default 3 rounds of 10 timed steps
# Environment:
#   PEERS_DIR    the peers' folder (default benchmarks/peers, next to this script)
#   PEERS        their venvs (read by peers/run.sh; default ~/.cache/dypo-peers)
#   SKIP_PEERS=1 ours only (no ratios);  SKIP_SAMPLER=1 no sampler.py
#   DEVICES      the CPU as N XLA devices for our scripts (default 2: rollouts split over both,
#                the update on the first; `mesh.host_devices` / `mesh.rollout_data`); 1 = one device
#   OURS_ARGS    extra arguments for w1_step.py (e.g. "--tiny" for a smoke run)
#   LOG          where the RESULT lines are collected (default: a temporary file, printed)
#   PYTHON       the interpreter for our scripts (default: python)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
PEERS_DIR=${PEERS_DIR:-$HERE/peers}
PY=${PYTHON:-python}
ROUNDS=${1:-3}
STEPS=${2:-10}
DEVICES=${DEVICES:-2}
OURS_ARGS=${OURS_ARGS:-}
DEV_ARGS=""
if [ "$DEVICES" -gt 1 ]; then DEV_ARGS="--devices $DEVICES"; fi
LOG=${LOG:-$(mktemp /tmp/dypo-run-all.XXXXXX)}
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}

echo "command: bash benchmarks/run_all.sh $ROUNDS $STEPS (DEVICES=$DEVICES, OURS_ARGS='$OURS_ARGS'," \
  "SKIP_PEERS=${SKIP_PEERS:-0}, SKIP_SAMPLER=${SKIP_SAMPLER:-0}); RESULT lines -> $LOG"
cd "$REPO" || exit 1
: > "$LOG"
run() {  # run NAME CMD...: keep the RESULT lines (tagged with the round) and say if it failed
  local name=$1; shift
  echo "== round $r: $name" | tee -a "$LOG"
  local out rc
  out=$("$@" 2>&1); rc=$?
  grep RESULT <<< "$out" | tee -a "$LOG"
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (rc=$rc); last lines:"; tail -5 <<< "$out"
  fi
}
for r in $(seq 1 "$ROUNDS"); do
  # shellcheck disable=SC2086
  run "dypo_jax grpo" "$PY" benchmarks/w1_step.py --method grpo --steps "$STEPS" $DEV_ARGS $OURS_ARGS
  # shellcheck disable=SC2086
  run "dypo_jax dypo" "$PY" benchmarks/w1_step.py --method dypo --steps "$STEPS" $DEV_ARGS $OURS_ARGS
  if [ "${SKIP_SAMPLER:-0}" != 1 ]; then
    # shellcheck disable=SC2086
    run "dypo_jax sampler" "$PY" benchmarks/sampler.py $DEV_ARGS
  fi
  if [ "${SKIP_PEERS:-0}" != 1 ]; then
    echo "== round $r: peers (peers/run.sh 1 $STEPS)"
    bash "$PEERS_DIR/run.sh" 1 "$STEPS" 2>&1 | tee -a "$LOG"
  fi
done

"$PY" - "$LOG" <<'EOF'
"""Medians over the rounds of each RESULT figure, and ours / peer ratios."""
import re
import statistics
import sys

PATTERNS = {  # figure -> regex with (name, value)
    "steps/s (median)": r"RESULT (\S+) median-based: steps/s = ([\d.]+)",
    "gen tok/s, whole step (median)": r"RESULT (\S+) median-based: .*generated tokens/s = ([\d.]+)",
    "steps/s (mean)": r"RESULT (\S+) steps/s = ([\d.]+)",
    "rollout-only tok/s": r"RESULT (\S+) rollout-only tokens/s = ([\d.]+)",
    "sampler tok/s": r"RESULT (\S+) tokens/s = ([\d.]+)",
    "first step s": r"RESULT (\S+) first (?:step|call) \(compile\) s = ([\d.]+)",
    "peak RSS MB": r"RESULT (\S+) .*peak RSS MB = ([\d.]+)",
    "process CPU s/step": r"RESULT (\S+) process CPU s/step = ([\d.]+)",
}
SAMPLERS = {"dypo_sampler": "dypo_jax", "tunix_sampler": "tunix", "trl_model.generate": "trl"}
values = {}  # (figure, contender) -> [values]
for line in open(sys.argv[1]):
  for fig, pat in PATTERNS.items():
    m = re.search(pat, line)
    if not m:
      continue
    name, value = m.group(1), float(m.group(2))
    if fig == "sampler tok/s" and name not in SAMPLERS:
      continue
    contender = SAMPLERS.get(name, name)
    if fig == "sampler tok/s":
      contender += "_sampler"
    values.setdefault((fig, contender), []).append(value)

ours = ["dypo_jax_grpo", "dypo_jax_dypo"]
peers = ["tunix_grpo", "trl_grpo"]
med = {key: statistics.median(v) for key, v in values.items()}
print("\nMedians over rounds (n = rounds seen); ratio = ours / peer (> 1 is better for rates,"
      " < 1 better for seconds and MB)")
header = f"{'figure':<32} {'contender':<16} {'median':>10} {'n':>3}  ratios"
print(header)
print("-" * len(header))
for fig in PATTERNS:
  if fig == "sampler tok/s":
    rows, refs = ["dypo_jax_sampler"], ["tunix_sampler", "trl_sampler"]
  else:
    rows, refs = ours, peers
  for c in rows + refs:
    if (fig, c) not in med:
      continue
    ratios = ""
    if c in rows:
      ratios = "  ".join(f"vs {p.split('_')[0]} {med[(fig, c)] / med[(fig, p)]:.2f}"
                         for p in refs if (fig, p) in med and med[(fig, p)] > 0)
    print(f"{fig:<32} {c:<16} {med[(fig, c)]:>10.3f} {len(values[(fig, c)]):>3}  {ratios}")
missing = [f for f in ("first step s", "peak RSS MB") if not any((f, p) in med for p in peers)]
if missing:
  print(f"(peers/run.sh keeps only the peers' RESULT lines, which carry no {' / '.join(missing)};"
        " those rows are ours only)")
EOF

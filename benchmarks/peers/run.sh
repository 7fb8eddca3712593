#!/usr/bin/env bash
# Runs the peers (Tunix, then TRL) on workload W1 (benchmarks/README.md), interleaved, several
# rounds; prints their RESULT lines. benchmarks/run_all.sh calls it once per round.
# Usage (from anywhere): bash benchmarks/peers/run.sh [ROUNDS] [STEPS]   (default 2 rounds of 10
#   timed steps; after benchmarks/peers/setup.sh; PEERS: the venvs' folder, as there)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
PEERS=${PEERS:-$HOME/.cache/dypo-peers}
ROUNDS=${1:-2}; STEPS=${2:-10}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$HERE"
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r: tunix"; "$PEERS/tunix-venv/bin/python" tunix_grpo_tiny.py --steps "$STEPS" --sampler-only 2>&1 | grep RESULT
  echo "== round $r: trl";   "$PEERS/trl-venv/bin/python" trl_grpo_tiny.py --steps "$STEPS" 2>&1 | grep RESULT
done

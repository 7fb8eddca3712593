#!/usr/bin/env bash
# Builds the two peer environments (Tunix and TRL) for the side-by-side benchmark of workload W1
# (benchmarks/README.md): one venv each, under $PEERS or ~/.cache/dypo-peers (about 3 GB).
# Usage (from the repository root): bash benchmarks/peers/setup.sh [DIR]
#   DIR defaults to $PEERS or ~/.cache/dypo-peers; give run.sh the same PEERS.
set -euo pipefail
PEERS=${1:-${PEERS:-$HOME/.cache/dypo-peers}}
mkdir -p "$PEERS"
if [[ ! -x $PEERS/tunix-venv/bin/python ]]; then
  python3 -m venv "$PEERS/tunix-venv"
  "$PEERS/tunix-venv/bin/pip" install -q "google-tunix==0.1.7" "jax==0.10.2" "jaxlib==0.10.2" "flax==0.12.8"
fi
if [[ ! -x $PEERS/trl-venv/bin/python ]]; then
  python3 -m venv "$PEERS/trl-venv"
  "$PEERS/trl-venv/bin/pip" install -q "torch==2.13.0"
  "$PEERS/trl-venv/bin/pip" install -q "trl==1.16.0" "torch==2.13.0" "transformers==5.24.0"
fi
echo "peers ready in $PEERS"

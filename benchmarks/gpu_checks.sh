#!/usr/bin/env bash
# The checks that need a GPU, as one script for a lent GPU machine (~5 minutes on an H100).
#
#   bash benchmarks/gpu_checks.sh        # log: $OUT/gpu_checks.log, else ./gpu_checks.log
#   ONLY="1 2" bash benchmarks/gpu_checks.sh
#
# 1. the Triton log-prob kernel, compiled, against the jnp reference (values and gradients);
# 2. the log-prob path at V = 151,936, T = 4,096 (memory and time: full, fused, chunked);
# 3. the kernel's block settings at that size (benchmarks/logprob_gpu_blocks.py);
# 4. a CLI run through model.logprob_impl=pallas against the chunked run;
# 5. W1 steps/s on the GPU (ours only: the peers' scripts run on CPU).
# The machine has JAX with CUDA but may lack some of our packages: wheels of those may lie in
# .whl/ (BUILD_NOTES.md, "GPU checks") and are installed to /tmp/site first. Run it on a copy
# of the repo (it links kernels/ into dypo_jax/).
set -u
cd "$(dirname "$0")/.."
exec > >(tee "${OUT:-.}/gpu_checks.log") 2>&1
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# No pip install of this repo (pip would fetch setuptools): on this throwaway copy, kernels/
# becomes dypo_jax.kernels through a link, and the repo goes on the path.
[ -e dypo_jax/kernels ] || ln -s ../kernels dypo_jax/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
section() { echo; echo "=== $* ($(date -u +%T))"; }
want() { [ -z "${ONLY:-}" ] || [[ " $ONLY " == *" $1 "* ]]; }

section machine
nvidia-smi -L
python3 -c "import jax; print('jax', jax.__version__, jax.devices())"

if want 1; then
  section "1. Triton kernel vs reference, compiled"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_logprob_gpu.py \
    tests/rl/test_losses.py::test_pallas_impl_matches_full
fi
if want 2; then
  section "2. log-prob path at V=151,936, T=4,096"
  for dtype in bfloat16 float32; do
    timeout 150 python3 benchmarks/logprob_memory.py --chunked --dtype "$dtype"
  done
fi
if want 3; then
  section "3. kernel block settings"
  timeout 240 python3 benchmarks/logprob_gpu_blocks.py
fi
if want 4; then
  section "4. CLI run: pallas == chunked"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/models/test_logprob_impl_runs.py
fi
if want 5; then
  section "5. W1 on the GPU"
  for method in grpo dypo; do
    timeout 150 python3 benchmarks/w1_step.py --method "$method" --steps 10
  done
fi
section done

#!/usr/bin/env bash
# One lent GPU, one call: every kernel benchmark in order of importance, results under $OUT
# (default benchmarks/results). Each step has its own time limit so that one slow step (fla's
# autotuning, a Triton compile) cannot eat the others' budget.
#
#   bash benchmarks/gpu_session.sh            # on the device machine, repository root
#   STEPS="gdn decode" bash benchmarks/gpu_session.sh
#
# flash-linear-attention is a baseline, not a dependency: its pure-Python wheels are installed
# from .whl/ (carried to the device) into a scratch directory when present.
set -uo pipefail
OUT=${OUT:-benchmarks/results}
STEPS=${STEPS:-"gdn decode attention"}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  pip install --quiet --no-index --no-deps --target /tmp/fla_site .whl/*.whl && export PYTHONPATH=/tmp/fla_site:${PYTHONPATH:-}
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for step in $STEPS; do
  case $step in
    gdn) cmd=(python -m benchmarks.gated_delta_rule --shapes 27b-32k --breakdown --configs 64:4:2,32:4:2,64:8:2) ; limit=300 ;;
    decode) cmd=(python -m benchmarks.decode_step) ; limit=90 ;;
    attention) cmd=(python -m benchmarks.attention) ; limit=150 ;;
    *) echo "unknown step $step"; continue ;;
  esac
  echo "== $step: ${cmd[*]}"
  timeout "$limit" "${cmd[@]}" --out "$OUT" 2>&1 | tee "$OUT/$step.log" | grep -v "^W0000\|^I0000"
  echo "== $step exit ${PIPESTATUS[0]}"
done

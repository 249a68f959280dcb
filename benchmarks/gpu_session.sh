#!/usr/bin/env bash
# One lent GPU, one call: every kernel benchmark in order of importance, results under $OUT
# (default benchmarks/results). Each step has its own time limit so that one slow step (fla's
# autotuning, a Triton compile) cannot eat the others' budget.
#
#   bash benchmarks/gpu_session.sh            # on the device machine, repository root
#   STEPS="gdn decode" bash benchmarks/gpu_session.sh
#   STEPS="decode_attention generate_kernel" bash benchmarks/gpu_session.sh  # xla vs the decode kernel
#   STEPS="generate serve" bash benchmarks/gpu_session.sh   # issue 7: 27B with random weights
#   STEPS=scheduler bash benchmarks/gpu_session.sh          # the serving loop: overlap vs serial
#   STEPS=prefix bash benchmarks/gpu_session.sh             # serving: TTFT with prefix reuse
#   STEPS=decode_hlo bash benchmarks/gpu_session.sh         # compile only: weights copied per step?
#   STEPS=serve SERVE_PRESET=tiny SERVE_REQUESTS=8 OUT=/tmp/x bash benchmarks/gpu_session.sh  # CPU dry run
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
# The 27B shapes behind `qwenjax serve` with random bf16 weights (54 GB) and a tokenizer of any
# vocabulary (the tiny one: prompts are token ids); 32 slots x 2048 tokens of KV cache (4 GiB)
# and GDN state (4.6 GiB) fit an 80 GB H100 beside the weights. Needs starlette, uvicorn,
# prometheus-client, llguidance and openai importable (carry wheels in .whl/ if the image lacks
# them). Random prompts never share a prefix, so --no-prefix-cache: its snapshots (two GDN states
# per slot, 9.2 GiB more) would buy nothing here.
serve_27b() {
  local port=8321 log="$OUT/serve.log"
  python -c "from qwenjax.testing.tiny_data import save_tiny_tokenizer as s; s('/tmp/qwenjax-tok')"
  python -c "from qwenjax.cli import main; main()" serve --random-weights "${SERVE_PRESET:-qwen3.6-27b}" \
    --tokenizer /tmp/qwenjax-tok --dtype bfloat16 --slots 32 --max-length 2048 --port $port \
    --no-prefix-cache >"$log" 2>&1 &
  local pid=$!
  for _ in $(seq 120); do
    curl -sf "localhost:$port/health" >/dev/null && break
    kill -0 $pid 2>/dev/null || { echo "== serve died:"; tail -20 "$log"; return; }
    sleep 2
  done
  echo "== serve: up after $SECONDS s of this session"
  timeout 360 python benchmarks/serve_load.py --base-url "http://127.0.0.1:$port/v1" \
    --concurrency 1 8 32 --requests "${SERVE_REQUESTS:-48}" --prompt-len 512 --max-tokens 128 \
    --out "$OUT/$(date -u +%Y-%m-%dT%H%MZ)_serve_load_${SERVE_PRESET:-qwen3.6-27b}.jsonl" 2>&1 | tee "$OUT/serve_load.log"
  kill -TERM $pid; wait $pid
}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
for step in $STEPS; do
  outflag=(--out "$OUT")
  case $step in
    gdn) cmd=(python -m benchmarks.gated_delta_rule --shapes 27b-32k --breakdown --configs 64:4:2,32:4:2,64:8:2) ; limit=300 ;;
    decode) cmd=(python -m benchmarks.decode_step) ; limit=90 ;;
    attention) cmd=(python -m benchmarks.attention) ; limit=150 ;;
    decode_attention) cmd=(python -m benchmarks.decode_attention) ; limit=150 ;;
    # What this image's XLA writes per decode step (jax 0.10.2's copies every weight out of the
    # scanned stack before its GEMM; newer XLA fuses dynamic slices into GEMMs). Not a timing.
    # T = 3: MTP speculation's verification with the commit after it (--verify).
    decode_hlo) cmd=(python -m benchmarks.decode_hlo --target local --min-mib 4 --verify
                     --kernels auto attention=pallas_gpu,gdn=pallas_gpu) ; limit=200 ;;
    generate) cmd=(python benchmarks/generate.py --model qwen3.6-27b --dtype bfloat16 --batch 1 32
                   --prompt-len 512 --new-tokens 128 --speculative-tokens 0 2 --repeats 2)
              outflag=(--out "$OUT/$(date -u +%Y-%m-%dT%H%MZ)_generate_27b.jsonl") ; limit=300 ;;
    # The 27B's decode on the jnp paths and on the Pallas decode kernels (attention over the
    # cache, then also the GDN step), one run.
    generate_kernel) cmd=(python benchmarks/generate.py --model qwen3.6-27b --dtype bfloat16
                          --batch 32 --prompt-len 2048 --new-tokens 128 --speculative-tokens 0
                          --repeats 2 --kernels auto attention=pallas_gpu
                          attention=pallas_gpu,gdn=pallas_gpu)
                     outflag=(--out "$OUT/$(date -u +%Y-%m-%dT%H%MZ)_generate_kernel_27b.jsonl")
                     limit=300 ;;
    # Two schedulers of 16 slots x 2048 tokens (KV 2 GiB + GDN state 2.3 GiB each) beside 54 GB.
    scheduler) cmd=(python -m benchmarks.scheduler_loop --model qwen3.6-27b --dtype bfloat16
                    --slots 16 --max-length 2048 --prompt-len 512 --new-tokens 128 --repeats 3)
               limit=300 ;;
    # Multi-turn conversations on the 27B, prefix reuse against whole prefills: two schedulers
    # of 2 slots x 16384 tokens (KV 2 GiB, GDN state 0.3 GiB, snapshots 0.6 GiB) beside 54 GB.
    prefix) cmd=(python -m benchmarks.prefix_cache --model qwen3.6-27b --dtype bfloat16
                 --slots 2 --max-length 16384 --system 8192 --turns 4 --user 512 --reply 64 --repeats 2)
            limit=300 ;;
    serve) serve_27b ; continue ;;
    *) echo "unknown step $step"; continue ;;
  esac
  echo "== $step: ${cmd[*]}"
  timeout "$limit" "${cmd[@]}" "${outflag[@]}" 2>&1 | tee "$OUT/$step.log" | grep -v "^W0000\|^I0000"
  echo "== $step exit ${PIPESTATUS[0]}"
done

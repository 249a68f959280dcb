#!/usr/bin/env bash
# Fine-tune on every worker of a TPU VM slice. Run from your workstation:
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a CONFIG=configs/sft_27b_v5p.yaml bash launch/tpu_pod.sh [key=value ...]
# Each worker needs this repository at $REPO_DIR (default ~/qwenjax) and its venv at $REPO_DIR/.venv;
# JAX detects the slice by itself, so no coordinator flags are needed.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${CONFIG:?set CONFIG}"
REPO_DIR="${REPO_DIR:-~/qwenjax}"
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}
OVERRIDES=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="
  cd $REPO_DIR && . .venv/bin/activate && qwenjax train --config $CONFIG $OVERRIDES
"

#!/usr/bin/env bash
# Run N processes of one job on this machine (CPU or one GPU each), e.g. to test multi-host code:
#   bash launch/local.sh 2 configs/tiny-demo.yaml [key=value ...]
# Process i gets QWENJAX_PROCESS_ID=i; all meet at QWENJAX_COORDINATOR (localhost, a free port).
set -euo pipefail
N=${1:?usage: launch/local.sh NUM_PROCESSES CONFIG [key=value ...]}
CONFIG=${2:?usage: launch/local.sh NUM_PROCESSES CONFIG [key=value ...]}
shift 2
PORT=${PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < N; i++)); do
  QWENJAX_COORDINATOR="127.0.0.1:$PORT" QWENJAX_NUM_PROCESSES="$N" QWENJAX_PROCESS_ID="$i" \
    qwenjax train --config "$CONFIG" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status

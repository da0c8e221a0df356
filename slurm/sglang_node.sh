#!/bin/bash
# Start SGLang servers on this node and keep them up (run by slurm/disaggregated.sbatch through
# srun, one task per rollout node). Server i uses GPUs [i*SGLANG_TP, (i+1)*SGLANG_TP) and port
# SGLANG_BASE_PORT + i. When one server exits, or this script is signalled (srun forwards the
# teardown's SIGTERM), all of them are stopped and the script exits with the first one's status.
set -euo pipefail

: "${MODEL_PATH:?}" "${SGLANG_TP:?}" "${SGLANG_MEM_FRACTION:?}" "${SGLANG_BASE_PORT:?}"
: "${SGLANG_SERVERS_PER_NODE:?}"
PYTHON=${PYTHON:-python3}
SGLANG_EXTRA_ARGS=${SGLANG_EXTRA_ARGS:-}   # extra flags of sglang.launch_server (word-split)

server_pids=()
stop_servers() {
    local status=$?
    trap - EXIT INT TERM
    kill "${server_pids[@]}" 2>/dev/null || true
    wait || true
    exit "$status"
}
trap stop_servers EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

for ((i = 0; i < SGLANG_SERVERS_PER_NODE; i++)); do
    first_gpu=$((i * SGLANG_TP))
    gpus=$(seq -s, "$first_gpu" $((first_gpu + SGLANG_TP - 1)))
    # shellcheck disable=SC2086  # SGLANG_EXTRA_ARGS is a list of flags
    CUDA_VISIBLE_DEVICES=$gpus "$PYTHON" -m sglang.launch_server --model-path "$MODEL_PATH" \
        --tp-size "$SGLANG_TP" --mem-fraction-static "$SGLANG_MEM_FRACTION" \
        --host 0.0.0.0 --port $((SGLANG_BASE_PORT + i)) $SGLANG_EXTRA_ARGS &
    server_pids+=("$!")
done
wait -n

#!/bin/bash
# Start SGLang servers on this node and keep them up (run by slurm/disaggregated.sbatch through
# srun, one task per rollout node). Server i uses GPUs [i*SGLANG_TP, (i+1)*SGLANG_TP) and port
# SGLANG_BASE_PORT + i; its flags are SGLANG_SERVER_ARGS (shell words from
# `python -m recipes.launch RECIPE --print-rollout-env`: the colocated path's flags, the config's
# rollout.sglang_extra_args included) and it logs to SGLANG_LOG_DIR/<node>/server-<i>.log. When
# one server exits, or this script is signalled (srun forwards the teardown's SIGTERM), all of
# them are stopped and the script exits with the first one's status.
set -euo pipefail

: "${SGLANG_TP:?}" "${SGLANG_BASE_PORT:?}" "${SGLANG_SERVERS_PER_NODE:?}"
: "${SGLANG_SERVER_ARGS:?}" "${SGLANG_LOG_DIR:?}"
PYTHON=${PYTHON:-python3}
SGLANG_SERVER_MODULE=${SGLANG_SERVER_MODULE:-sglang.launch_server}   # rollout.sglang_server_module
server_args=()
eval "server_args=($SGLANG_SERVER_ARGS)"   # shell-quoted by the launcher
node=${SLURMD_NODENAME:-$(hostname)}
log_dir="$SGLANG_LOG_DIR/$node"
mkdir -p "$log_dir"

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
    CUDA_VISIBLE_DEVICES=$gpus "$PYTHON" -m "$SGLANG_SERVER_MODULE" "${server_args[@]}" \
        --host 0.0.0.0 --port $((SGLANG_BASE_PORT + i)) --base-gpu-id 0 \
        >"$log_dir/server-$i.log" 2>&1 &
    echo "sglang_node.sh: server $i on $node, GPUs $gpus, log $log_dir/server-$i.log"
    server_pids+=("$!")
done
wait -n

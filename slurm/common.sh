# shellcheck shell=bash
# Helpers shared by slurm/*.sbatch (sourced, not run). They read the knobs the sbatch script set:
# MASA_ROOT, PYTHON, CONTAINER_IMAGE, CONTAINER_MOUNTS, GPUS_PER_NODE, DRY_RUN, DRY_RUN_NODES.
#
# - run / run_bg: run a command (in the background: its pid joins BACKGROUND_PIDS), or with
#   DRY_RUN=1 print it shell-quoted instead;
# - masa_python: python on the batch host, or in the container (one srun task) when
#   CONTAINER_IMAGE is set; used for the config, the torchrun command and the SGLang settings,
#   which all come from `python -m recipes.launch` / `masa config show` (one source of truth);
# - wait_healthy URL TIMEOUT [PID]: poll URL/health with curl until it answers, the timeout
#   passes or the step PID exits;
# - teardown (EXIT trap): stop every background step, then exit with the script's status.

BACKGROUND_PIDS=()
LAST_BG_PID=""     # pid of the latest run_bg step (empty in a dry run)
CONTAINER_FLAGS=()

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

die() {  # die MESSAGE [EXIT_CODE]
    log "error: $1"
    exit "${2:-1}"
}

section() { printf '== %s ==\n' "$*"; }

is_dry_run() { [[ "${DRY_RUN:-0}" == 1 ]]; }

run() {
    if is_dry_run; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

run_bg() {
    if is_dry_run; then
        printf '%q ' "$@"
        printf '&\n'
    else
        "$@" &
        LAST_BG_PID=$!
        BACKGROUND_PIDS+=("$LAST_BG_PID")
    fi
}

teardown() {
    local status=$?
    trap - EXIT INT TERM
    if ((${#BACKGROUND_PIDS[@]})); then
        log "stopping ${#BACKGROUND_PIDS[@]} background step(s)"
        kill "${BACKGROUND_PIDS[@]}" 2>/dev/null || true
        wait "${BACKGROUND_PIDS[@]}" 2>/dev/null || true
    fi
    exit "$status"
}

setup_environment() {
    cd "$MASA_ROOT" || die "MASA_ROOT=$MASA_ROOT is not a folder"
    export PYTHONPATH="$MASA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if [[ -n "${CONTAINER_IMAGE:-}" ]]; then
        CONTAINER_FLAGS=(--container-image="$CONTAINER_IMAGE"
                         --container-mounts="$MASA_ROOT:$MASA_ROOT${CONTAINER_MOUNTS:+,$CONTAINER_MOUNTS}"
                         --container-workdir="$MASA_ROOT")
    fi
    trap teardown EXIT
    trap 'exit 143' TERM
    trap 'exit 130' INT
}

masa_python() {
    if [[ -n "${CONTAINER_IMAGE:-}" ]] && ! is_dry_run; then
        srun --nodes=1 --ntasks=1 --overlap "${CONTAINER_FLAGS[@]}" "$PYTHON" "$@"
    else
        "$PYTHON" "$@"
    fi
}

node_list() {  # the allocation's hostnames, one per line (DRY_RUN_NODES without an allocation)
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
        scontrol show hostnames "$SLURM_JOB_NODELIST"
    else
        # shellcheck disable=SC2086  # a space-separated list of hostnames
        printf '%s\n' ${DRY_RUN_NODES:-localhost}
    fi
}

wait_healthy() {  # wait_healthy URL TIMEOUT_S [PID]
    local url=$1 timeout=$2 pid=${3:-}
    if is_dry_run; then
        printf 'wait for %s/health (curl, up to %ss)\n' "$url" "$timeout"
        return
    fi
    local deadline=$((SECONDS + timeout))
    until curl --silent --fail --max-time 5 "$url/health" >/dev/null; do
        if [[ -n "$pid" ]] && ! kill -0 "$pid" 2>/dev/null; then
            die "the step serving $url exited before it became healthy"
        fi
        ((SECONDS < deadline)) || die "$url did not become healthy within ${timeout}s"
        sleep 5
    done
    log "$url is healthy"
}

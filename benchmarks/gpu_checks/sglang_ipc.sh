#!/usr/bin/env bash
# SGLang colocation paths on a GPU without SGLang: CUDA IPC weight payloads decoded in another
# process the way SGLang 0.5.x decodes them, and trainer-state offload/reload. Called by
# benchmarks/gpu_check.sh; writes $OUT/gpu_sglang_ipc.json (OUT defaults to benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
timeout "${SGLANG_IPC_TIMEOUT_S:-300}" "$PY" benchmarks/gpu_checks/sglang_ipc.py \
  --out "$OUT_DIR/gpu_sglang_ipc.json"

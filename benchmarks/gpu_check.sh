#!/usr/bin/env bash
# Every GPU check of the project in one run, for a single H100/H200 machine that has torch with
# CUDA but no package registry. Bring megatron-core and omegaconf (pure Python but for one small
# extension) as wheels; the rest (transformers, tokenizers, matplotlib, pandas) is on such images:
#
#   here:   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#             --platform manylinux_2_28_x86_64 -d .whl \
#             megatron-core==0.16.1 omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
#   there:  bash benchmarks/gpu_check.sh        (installs .whl/*.whl into /tmp/site first)
#
# Results go to $OUT (default benchmarks/results) as JSON; each check prints its own figures.
# The limits add up to ~22 minutes, more than one lent-device command may run (600 s): choose
# checks by key with CHECKS, e.g.  CHECKS="graphs-tests graphs-tiny graphs-1b" bash ...
# (keys: rl-tiny sglang-ipc rl-1b graphs-tests graphs-tiny graphs-1b standin demo; unset: all).
# If the first CUDA run fails inside torch.compile (Megatron's fused SwiGLU is compiled on
# CUDA), rerun with TORCH_COMPILE_DISABLE=1 to tell compile failures from the rest.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
PY="${PY:-python3}"
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export OUT PY
status=0
check() {  # key, name, timeout in seconds, command...
  local key=$1 name=$2 limit=$3; shift 3
  if [ -n "${CHECKS:-}" ] && [[ " $CHECKS " != *" $key "* ]]; then
    echo "=== $name: skipped (not in CHECKS)"; return
  fi
  local start=$SECONDS
  echo "=== $name"
  if timeout "$limit" "$@"; then echo "=== $name: ok ($((SECONDS - start)) s)"
  else echo "=== $name: FAILED (exit $?, $((SECONDS - start)) s; limit $limit s)"; status=1; fi
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import megatron.core, omegaconf, transformers; print('megatron-core', megatron.core.__version__, '| transformers', transformers.__version__)" || exit 1
# Limits are ~3x the expected time on an H100, so a hang costs minutes, not the whole lease.
check rl-tiny "tiny model, three RL steps (bf16, local spec)" 90 \
  "$PY" benchmarks/gpu_rl_step.py --size tiny --device cuda --out "$OUT/gpu_rl_step_tiny.json"
check sglang-ipc "SGLang colocation paths (CUDA IPC tensor sync, offload)" 120 \
  bash benchmarks/gpu_checks/sglang_ipc.sh
check rl-1b "~1B model, three RL steps (bf16, local spec)" 180 \
  "$PY" benchmarks/gpu_rl_step.py --size 1b --device cuda --out "$OUT/gpu_rl_step_1b.json"
# CUDA-graph decoding (rollout.cuda_graphs; never run on a GPU before this check was added):
# fp32 greedy rows must equal the eager engine's exactly; on the 1B model, generation tokens/s
# with graphs off and on side by side (target: >= 2x the eager 3,379 tokens/s of an H100), graph
# rows equal to the static-eager rows, the fraction equal to eager bf16 rows recorded.
check graphs-tests "CUDA-graph decoding: tests (graphs vs eager decode, re-capture after weights move)" 120 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_rollout_static_decode.py
check graphs-tiny "CUDA-graph decoding, tiny model fp32: greedy rows equal eager" 120 \
  "$PY" benchmarks/gpu_rl_step.py --size tiny --device cuda --dtype fp32 --cuda-graphs \
  --strict-greedy --out "$OUT/gpu_rl_step_tiny_graphs.json"
check graphs-1b "CUDA-graph decoding, ~1B model: generation tokens/s off vs on" 300 \
  "$PY" benchmarks/gpu_rl_step.py --size 1b --device cuda --cuda-graphs \
  --out "$OUT/gpu_rl_step_1b_graphs.json"
# The stand-in server on the same GPU in a second process: tensor sync by CUDA IPC handles (both
# load formats) and disk sync must make it generate what the trainer's new weights generate
# (broadcast is left out: NCCL refuses two ranks on one GPU). Passed on an H100 on 2026-11-26.
check standin "stand-in server on the GPU: tensor (CUDA IPC) and disk sync" 240 \
  "$PY" -m pytest -q -p no:cacheprovider tests/test_sglang_standin_model.py -k "not broadcast"
# The whole trainer on CUDA: warm start, then grpo / masa / masa_efficient in parallel processes
# sharing the GPU (NCCL, one rank each). Only the report's two small files are kept.
DEMO_DIR="${DEMO_DIR:-/tmp/masa_demo_gpu}"
rm -rf "$DEMO_DIR"
check demo "masa demo --quick on CUDA" 150 "$PY" -m masa_megatron.cli demo --quick --out "$DEMO_DIR"
cp "$DEMO_DIR/summary.md" "$OUT/gpu_demo_summary.md" 2>/dev/null || true
cp "$DEMO_DIR/timing.json" "$OUT/gpu_demo_timing.json" 2>/dev/null || true
exit $status

#!/usr/bin/env bash
# Every GPU check of the project in one run, for a single H100/H200 machine that has torch with
# CUDA but no package registry. Bring megatron-core (and its small pure-Python deps) as wheels:
#
#   here:   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#             --platform manylinux_2_28_x86_64 -d .whl megatron-core==0.19.2
#   there:  bash benchmarks/gpu_check.sh        (installs .whl/*.whl into /tmp/site first)
#
# Results go to $OUT (default benchmarks/results) as JSON; each check prints its own figures.
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
check() {  # name, command...
  local name=$1; shift
  echo "=== $name"
  if "$@"; then echo "=== $name: ok"; else echo "=== $name: FAILED"; status=1; fi
}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
check "tiny model, one RL step (bf16, local spec)" \
  "$PY" benchmarks/gpu_rl_step.py --size tiny --device cuda --out "$OUT/gpu_rl_step_tiny.json"
check "~1B model, one RL step (bf16, local spec)" \
  "$PY" benchmarks/gpu_rl_step.py --size 1b --device cuda --out "$OUT/gpu_rl_step_1b.json"
check "SGLang colocation paths (CUDA IPC tensor sync, offload)" \
  bash benchmarks/gpu_checks/sglang_ipc.sh
exit $status

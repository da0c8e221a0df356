#!/usr/bin/env bash
# Smoke test against megatron-core 0.19.x (what Python 3.12 clusters get).
# megatron-core 0.17+ declares Python >= 3.12, but its cp311 wheel works: install it with
# --no-deps --ignore-requires-python into a side folder that shadows the main venv's 0.16.1,
# plus triton (imported by 0.19) and numpy<2.5 (already pinned by constraints/cpu.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
SIDE=${SIDE:-.mcore019}
VERSION=${MCORE_VERSION:-0.19.2}
if [ ! -f "$SIDE/.installed-$VERSION" ]; then
  rm -rf "$SIDE"
  "$VENV/bin/python" -m pip install -q --no-deps --ignore-requires-python --target "$SIDE" \
    "megatron-core==$VERSION" "triton<3.10"
  touch "$SIDE/.installed-$VERSION"
fi
PYTHONPATH="$PWD/$SIDE${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" - <<PY
import megatron.core, sys
v = megatron.core.__version__
print("megatron-core", v, "from", megatron.core.__file__)
sys.exit(0 if v.split("+")[0] == "$VERSION" else 1)
PY
PYTHONPATH="$PWD/$SIDE${PYTHONPATH:+:$PYTHONPATH}" "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_smoke_megatron.py

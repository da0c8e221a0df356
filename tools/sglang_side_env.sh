#!/usr/bin/env bash
# The SGLang side environment for the contract test (tests/test_sglang_contract.py): a venv with
# SGLang and sglang-router at the versions pinned in setup.py, next to the torch they pin, so
# that SGLang's own request classes, serializer and argument parsers import on this CPU machine
# (its engine cannot run here). Everything is installed with --no-deps from the exact list in
# constraints/sglang-side.txt (about 6 GB, mostly CUDA libraries torch needs to import).
# Idempotent: reinstalled only when setup.py's pins or the list change. The stamp naming them is
# written last, so an environment without it is unfinished (the contract test skips then).
# `--check`: exit 0 if the environment is finished for the current pins, else 1 saying what is
# missing; installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
SIDE=${SGLANG_SIDE_VENV:-.venv-sglang}
PYTHON=${PYTHON:-python3}
pins=$(sed -n 's/^SGLANG\(_ROUTER\)\? = "\(.*\)"$/\2/p' setup.py | tr '\n' ' ')
read -r SGLANG SGLANG_ROUTER <<<"$pins"
[ -n "${SGLANG:-}" ] && [ -n "${SGLANG_ROUTER:-}" ] || { echo "no SGLANG pins in setup.py" >&2; exit 2; }
stamp="$SIDE/.installed-$SGLANG-$SGLANG_ROUTER-$(sha1sum constraints/sglang-side.txt | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "SGLang side environment ready: $SIDE (sglang $SGLANG, sglang-router $SGLANG_ROUTER)"
  exit 0
elif [ "${1:-}" = --check ]; then
  echo "$stamp missing (written when the install for sglang $SGLANG, sglang-router $SGLANG_ROUTER and constraints/sglang-side.txt finishes)"
  exit 1
fi
rm -rf "$SIDE"
"$PYTHON" -m venv "$SIDE"
echo "installing the SGLang side environment into $SIDE (sglang $SGLANG, sglang-router $SGLANG_ROUTER)..."
# The list pins every package exactly, torch included: no resolver run, nothing newer pulled in.
# A failing pip stops the script (pipefail); grep finding nothing to print does not.
"$SIDE/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  -r constraints/sglang-side.txt "sglang==$SGLANG" "sglang-router==$SGLANG_ROUTER" 2>&1 \
  | { grep -v "^WARNING: Location" || true; }
"$SIDE/bin/python" -c "import sglang.srt.managers.io_struct, sglang_router" \
  || { echo "the SGLang side environment does not import; see above" >&2; exit 1; }
touch "$stamp"
echo "SGLang side environment ready: $SIDE"

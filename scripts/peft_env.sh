#!/usr/bin/env bash
# A second Python environment with PyTorch and Hugging Face PEFT for the
# cross-check tests (tests/test_peft_compat.py). PEFT needs torch, which has no
# wheels for every Python the package supports, so this is a separate Python
# 3.11 virtual environment at .venv-peft; the tests run tests/peft_side.py
# under it. Idempotent: an existing environment with the right versions is kept.
#
#   bash scripts/peft_env.sh
#   export DORA_JAX_PEFT_PYTHON="$PWD/.venv-peft/bin/python"   # optional: the tests also look here
#
# Environment: PEFT_PYTHON (interpreter to build from, default python3.11 or
# pyenv's 3.11.x), PEFT_VENV (default .venv-peft).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${PEFT_VENV:-.venv-peft}"
# The versions the cross-check was written against.
PACKAGES=(torch==2.13.0 peft==0.21.2 transformers==5.24.0 safetensors==0.8.0 numpy)

find_python() {
  if [ -n "${PEFT_PYTHON:-}" ]; then echo "$PEFT_PYTHON"; return; fi
  local candidates=(python3.11)
  if command -v pyenv >/dev/null 2>&1; then
    candidates+=("$(pyenv root)"/versions/3.11.*/bin/python3.11)
  fi
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null; then
      command -v "$c"; return
    fi
  done
  echo "peft_env.sh needs Python 3.11 (python3.11 on PATH, pyenv's 3.11.x, or PEFT_PYTHON)" >&2
  return 1
}

ready() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "${PACKAGES[@]}" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
  name, _, want = spec.partition("==")
  have = version(name)
  if want and have.split("+")[0] != want:
    raise SystemExit(1)
import torch, peft, safetensors, numpy  # noqa: F401  (imports work)
PY
}

if ready; then
  echo "$VENV: ready ($("$VENV/bin/python" -c 'import torch, peft; print("torch", torch.__version__, "peft", peft.__version__)'))"
  exit 0
fi
PY=$(find_python)
echo "building $VENV with $PY ($("$PY" --version))"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0
"$VENV/bin/pip" install -q "${PACKAGES[@]}"
ready
echo "$VENV: ready"

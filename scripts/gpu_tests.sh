#!/usr/bin/env bash
# The GPU test run, on a machine with an NVIDIA GPU and a CUDA build of jax:
#   bash scripts/gpu_tests.sh [extra pytest args]     (DORA_JAX_GPU_WORKERS=N: xdist workers)
# 1. the tests marked `gpu` (skipped everywhere else): Pallas kernels lowered
#    through Triton vs XLA and float64, NaN-poisoned outputs; the Mosaic GPU
#    (Hopper) kernels, including the fused low-rank variant interpret mode
#    cannot run;
# 2. the numerics suites of the core on the GPU (matmuls pinned to "highest"
#    precision there, so float32 is not TF32): dense, norm, memory, kernels,
#    mosaic, scale_reduce, flagged_columns, column_norm, cancelled_columns
#    (their kernel tests run natively there), the norm's cancellation, the
#    exact gradient, the native-layout op and QDoRA (needs qwix).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import jax, sys
if jax.default_backend() != "gpu":
    sys.exit(f"gpu_tests.sh needs a GPU backend, jax sees {jax.default_backend()!r}")
print("devices:", jax.devices())
PY
# several workers share the GPU (memory taken as needed, not preallocated): on
# one H200 the numerics suites take 4.5 min with 10 workers, over 10 one by one
export XLA_PYTHON_CLIENT_PREALLOCATE=false
workers=()
if python -c "import xdist" 2>/dev/null; then workers=(-n "${DORA_JAX_GPU_WORKERS:-10}"); fi
python -m pytest -q "${workers[@]}" -m gpu tests/ "$@"
python -m pytest -q "${workers[@]}" tests/test_dense.py tests/test_norm.py tests/test_memory.py \
  tests/test_kernels.py tests/test_mosaic.py tests/test_scale_reduce.py \
  tests/test_flagged_columns.py tests/test_column_norm.py tests/test_cancelled_columns.py \
  tests/test_norm_cancellation.py tests/test_exact_gradient.py tests/test_general.py \
  tests/test_qdora.py "$@"

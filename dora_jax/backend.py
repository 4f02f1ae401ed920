"""Backend selection: the one documented switch of process-wide state.

``dora_dense(..., backend=...)`` takes, per call:

* ``"xla"`` — plain ``jax.numpy`` (XLA fuses the elementwise work); runs everywhere.
* ``"pallas"`` — the fused Pallas kernels (Triton lowering on NVIDIA GPUs,
  interpret mode elsewhere, which is slow and meant for tests).
* ``"mosaic"`` — the Hopper kernels (Pallas Mosaic GPU: TMA + wgmma) that fold
  DoRA's column scale into the base GEMMs; shapes they do not tile exactly, and
  dtypes other than bf16/fp16, run XLA (logged once). Interpret mode off the GPU.
* ``"auto"`` — the fused kernels on CUDA GPUs for the shapes where they were
  measured faster, XLA everywhere else.
* ``None`` — the process default: the environment variable ``DORA_JAX_BACKEND``
  (one of the names above) read when the call is traced, else ``"auto"``.
"""

from __future__ import annotations

import os

BACKENDS = ("auto", "xla", "pallas", "mosaic")
ENV_VAR = "DORA_JAX_BACKEND"


def default_backend() -> str:
  """The process default: ``$DORA_JAX_BACKEND`` or ``"auto"``."""
  value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
  if value not in BACKENDS:
    raise ValueError(f"{ENV_VAR}={value!r} is not one of {BACKENDS}")
  return value


def check_backend(backend: str | None) -> str:
  """Return the requested backend name, ``None`` meaning the process default."""
  if backend is None:
    return default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
  return backend

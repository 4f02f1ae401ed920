"""``backend="auto"``: which implementation a call gets.

XLA everywhere until a fused kernel has been measured faster for a shape on
the device at hand; see BENCHMARKS.md for the measurements behind the table.
"""

from __future__ import annotations

import jax


def on_cuda_gpu() -> bool:
  """Whether the default JAX backend is an NVIDIA GPU."""
  try:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # noqa: BLE001 - any failure to inspect means "not a CUDA GPU"
    return False


def choose(tokens: int, kernel_shape: tuple[int, int], rank: int, dtype) -> str:
  """Return ``"pallas"`` or ``"xla"`` for one call of ``dora_dense``."""
  del tokens, kernel_shape, rank, dtype
  return "xla"

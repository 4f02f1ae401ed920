"""``backend="auto"``: which implementation a call gets.

Pallas only on CUDA GPUs, and only inside the measured region where the fused
kernels beat XLA end to end (forward and forward+backward of ``dora_dense``);
XLA everywhere else. The measurements (H100, jax 0.11.2, bf16) are in
``benchmarks/KERNELS.md``; the override is ``DORA_JAX_BACKEND`` or
``dora_dense(..., backend=...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def on_cuda_gpu() -> bool:
  """Whether the default JAX backend is an NVIDIA GPU."""
  try:
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
  except Exception:  # noqa: BLE001 - any failure to inspect means "not a CUDA GPU"
    return False


#: ``(d_in, d_out) -> largest rank`` where the fused path was measured faster
#: than XLA on an H100 (bf16, T = 4096, forward and forward+backward; see
#: ``benchmarks/KERNELS.md``). 4096×4096: fwd+bwd 0.624 vs 0.661 ms at r = 16
#: (0.614 vs 0.675 and 0.636 vs 0.705 at r = 16/64 in the module suite); at
#: r = 384 a tie (0.785 vs 0.789), so not listed. Not listed because measured
#: slower or tied end to end: 4096×14336 (forward 6–8% faster at r ≤ 64 but
#: forward+backward within ±6% either way), 8192×8192, 8192×28672, 14336×4096
#: (cuBLAS' main loop beats the Pallas/Triton one by ~5% at these sizes).
PALLAS_WINS: dict[tuple[int, int], int] = {(4096, 4096): 64}

#: Token counts measured: T = 4096. Larger T only adds row tiles; below it the
#: 128-row tiles run partly masked and XLA is kept.
PALLAS_MIN_TOKENS = 4096


def choose(tokens: int, kernel_shape: tuple[int, int], rank: int, dtype) -> str:
  """Return ``"pallas"`` or ``"xla"`` for one call of ``dora_dense``.

  ``"pallas"`` only when all hold: a CUDA GPU; bf16 activations; ``tokens``
  at least :data:`PALLAS_MIN_TOKENS` and a multiple of 128 (unmasked row
  tiles); ``kernel_shape`` in :data:`PALLAS_WINS` with ``rank`` at most its
  entry. Everything else is XLA, which is also what runs off the GPU.
  """
  if jnp.dtype(dtype) != jnp.bfloat16:
    return "xla"
  if tokens < PALLAS_MIN_TOKENS or tokens % 128:
    return "xla"
  max_rank = PALLAS_WINS.get(tuple(int(d) for d in kernel_shape))
  if max_rank is None or rank > max_rank:
    return "xla"
  return "pallas" if on_cuda_gpu() else "xla"

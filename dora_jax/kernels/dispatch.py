"""``backend="auto"``: which implementation a call gets.

The fused kernels (Pallas Triton, Pallas Mosaic GPU) only on CUDA GPUs, and
only inside the measured region where they beat XLA end to end (forward and
forward+backward of ``dora_dense``); XLA everywhere else. The measurements (H100, jax 0.11.2, bf16) are in
``benchmarks/KERNELS.md``; the override is ``DORA_JAX_BACKEND`` or
``dora_dense(..., backend=...)``.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding

_log = logging.getLogger("dora_jax")
_fallbacks_logged: set[str] = set()


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


#: Tokens measured for the Mosaic kernel: T = 4096 (bf16, H100). Below it XLA.
MOSAIC_MIN_TOKENS = 4096


def choose(tokens: int, kernel_shape: tuple[int, int], rank: int, dtype) -> str:
  """Return ``"pallas"``, ``"mosaic"`` or ``"xla"`` for one call of ``dora_dense``.

  Only bf16 activations on a CUDA GPU get a kernel; everything else is XLA,
  which is also what runs off the GPU.

  * ``"mosaic"`` (Hopper): when their tiles divide the shape and ``tokens >=
    MOSAIC_MIN_TOKENS``, at any rank: ranks 16 and 32 have the LoRA term fused
    in-kernel (:func:`~dora_jax.kernels.scaled_matmul.fusable_rank`), others
    hand it over as the GEMMs' addend. Measured on an H100 (jax 0.11.2,
    ``benchmarks/module_suite.py --only rank``, commit 566618f; BENCHMARKS.md),
    forward+backward ms, mosaic vs XLA's DoRA, five shapes × r = 16/64/384:
    faster at 13 of 15 (e.g. 4096×4096 r = 384: 0.685 vs 0.742; 14336×4096
    r = 384: 1.790 vs 1.901), behind by 0.5% and 0.7% at 8192×28672 r = 64
    and 384 (within the run-to-run spread); forward faster at 14 of 15
    (14336×4096 r = 64: +1.4%).
  * ``"pallas"`` (Triton): otherwise, ``tokens`` at least
    :data:`PALLAS_MIN_TOKENS` and a multiple of 128, and ``kernel_shape`` in
    :data:`PALLAS_WINS` with ``rank`` at most its entry.
  """
  if jnp.dtype(dtype) != jnp.bfloat16 or not on_cuda_gpu():
    return "xla"
  shape = tuple(int(d) for d in kernel_shape)
  from dora_jax.kernels import fused_mosaic  # noqa: PLC0415
  if (on_hopper() and tokens >= MOSAIC_MIN_TOKENS
      and fused_mosaic.shapes_supported(tokens, *shape)):
    return "mosaic"
  max_rank = PALLAS_WINS.get(shape)
  if max_rank is not None and rank <= max_rank:
    return "pallas" if tokens >= PALLAS_MIN_TOKENS and tokens % 128 == 0 else "xla"
  return "xla"


#: Whether ``dora_dense`` may compute its norm with the one-pass kernel
#: (:mod:`dora_jax.kernels.column_norm`) instead of :func:`dora_jax.factored_norm`
#: (private, for A/B benchmarks; read at trace time).
NORM_KERNEL = True

#: Largest ``d_in·d_out`` where the one-pass norm kernel beat the factored norm
#: with ``‖W‖²`` cached. H100, jax 0.11.2, bf16, GPU µs per call
#: (``benchmarks/column_norm.py``): 4096×4096 18.7 vs 21.8 (r = 16) and 47.9 vs
#: 63.8 (r = 384); slower at 4096×14336 (64 vs 53, 230 vs 151) and 8192×28672
#: (187 vs 172, 672 vs 406), where cuBLAS's ``aᵀW`` outruns the kernel's
#: Triton product (~250 TFLOP/s).
NORM_KERNEL_MAX_SIZE = 4096 * 4096

#: Largest rank where the kernel beat the factored norm *without* the cache
#: (which then re-reads ``W`` for ``‖W‖²``) at every measured shape: r = 16,
#: 18.7 vs 39.3, 64 vs 95, 187 vs 338 µs (same run); at r = 384 it lost beyond
#: 4096×4096 (230 vs 195, 672 vs 574).
NORM_KERNEL_MAX_RANK_UNCACHED = 16


def norm_kernel_allowed(impl: str, auto: bool, kernel_shape, rank: int, cached: bool,
                        *arrays) -> bool:
  """Whether a call's norm runs :mod:`dora_jax.kernels.column_norm`.

  Only where it was measured faster than :func:`dora_jax.factored_norm`:
  ``d_in·d_out`` up to :data:`NORM_KERNEL_MAX_SIZE`, or, when ``‖W‖²`` is not
  cached (``cached`` false), ranks up to :data:`NORM_KERNEL_MAX_RANK_UNCACHED`.
  With ``backend="pallas"`` or ``"mosaic"`` (``impl`` a kernel backend) on the
  GPU or in interpret mode; under ``"auto"`` when the default device is a CUDA
  GPU and the arrays are not split across devices, whatever ``impl`` the
  layer's GEMMs got; never with ``backend="xla"``.
  """
  d_in, d_out = (int(d) for d in kernel_shape)
  if not NORM_KERNEL or not (d_in * d_out <= NORM_KERNEL_MAX_SIZE
                             or (not cached and rank <= NORM_KERNEL_MAX_RANK_UNCACHED)):
    return False
  if impl in ("pallas", "mosaic"):
    return True
  return auto and on_cuda_gpu() and partitioned_reason(*arrays) is None


def on_hopper() -> bool:
  """Whether the default device is a CUDA GPU of compute capability 9.x (wgmma, TMA)."""
  if not on_cuda_gpu():
    return False
  capability = str(getattr(jax.devices()[0], "compute_capability", ""))
  return capability.startswith("9")


def mosaic_or_xla(tokens: int, kernel_shape: tuple[int, int], dtype) -> str:
  """``"mosaic"`` if the Hopper kernels can run this call, else ``"xla"`` (logged once).

  They need a 2-byte dtype (bf16/fp16), dimensions their tiles divide
  (:func:`dora_jax.kernels.fused_mosaic.shapes_supported`) and, on a GPU, a
  Hopper one; off the GPU they run in interpret mode.
  """
  from dora_jax.kernels import fused_mosaic  # noqa: PLC0415 - Mosaic GPU is optional
  d_in, d_out = (int(d) for d in kernel_shape)
  reason = None
  if jnp.dtype(dtype).itemsize != 2:
    reason = f"dtype {jnp.dtype(dtype).name} (bf16/fp16 only)"
  elif not fused_mosaic.shapes_supported(tokens, d_in, d_out):
    reason = f"T={tokens}, d_in={d_in}, d_out={d_out} not multiples of the kernels' tiles"
  elif jax.default_backend() == "gpu" and not on_hopper():
    reason = "the GPU is not a Hopper (compute capability 9.x) one"
  if reason is None:
    return "mosaic"
  key = f"mosaic:{reason}"
  if key not in _fallbacks_logged:
    _fallbacks_logged.add(key)
    _log.warning("dora_jax: backend='mosaic' cannot run %s; using the XLA path", reason)
  return "xla"


def partitioned_reason(*arrays) -> str | None:
  """Why a call over ``arrays`` may be split across devices at trace time, or ``None``.

  ``pallas_call`` is not partitioned by GSPMD: under a mesh it would force its
  operands to be gathered. Detected: a concrete array that is not fully
  replicated over more than one device; an abstract value whose type carries
  a sharded spec (explicit mesh axes); tracing under ``jax.set_mesh(mesh)``
  with an ``Auto`` (or explicit) mesh axis of size > 1 that is not manual. Inside
  ``jax.shard_map`` over every axis of size > 1 the arrays are per-device
  blocks and this returns ``None`` (the kernels then run per shard).
  Not detectable: a ``jit`` of sharded inputs traced outside any mesh context.
  """
  for x in arrays:
    if x is None:
      continue
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      sharding = x.sharding
      if len(sharding.device_set) > 1 and not sharding.is_fully_replicated:
        return f"an input is sharded over {len(sharding.device_set)} devices"
      continue
    sharding = getattr(jax.typeof(x), "sharding", None)
    if isinstance(sharding, NamedSharding) and any(e is not None for e in sharding.spec):
      return f"an input has sharded type {sharding.spec}"
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    split = [name for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes, mesh.axis_types)
             if size > 1 and kind != AxisType.Manual]
    if split:
      return f"traced under a device mesh (axes {split} are not manual)"
  return None


def unpartitioned(choice: str, *arrays, requested: bool = True) -> str:
  """``choice``, or ``"xla"`` when it is ``"pallas"`` and the call may be partitioned.

  The fallback is logged once per process on the ``"dora_jax"`` logger
  (warning when Pallas was requested explicitly, info under ``"auto"``).
  """
  if choice not in ("pallas", "mosaic"):
    return choice
  reason = partitioned_reason(*arrays)
  if reason is None:
    return choice
  key = f"{requested}"
  if key not in _fallbacks_logged:
    _fallbacks_logged.add(key)
    _log.log(logging.WARNING if requested else logging.INFO,
             "dora_jax: the Pallas kernels are not partitioned by GSPMD and %s; "
             "using the XLA path (run dora_dense inside jax.shard_map to use Pallas per shard)",
             reason)
  return "xla"

"""``backend="auto"``: which implementation a call gets, and when its norm uses the kernel.

The fused kernels (Pallas Triton, Pallas Mosaic GPU) only on CUDA GPUs, and
only inside the measured region where they beat XLA end to end (forward and
forward+backward of ``dora_dense``); XLA everywhere else. The measurements
behind each rule are in benchmarks/KERNELS.md and BENCHMARKS.md; the override
is ``DORA_JAX_BACKEND`` or ``dora_dense(..., backend=...)``.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding

from dora_jax import backend as backend_lib

_log = logging.getLogger("dora_jax")
_fallbacks_logged: set[str] = set()  # log each fallback reason once per process


class Device(NamedTuple):
  """What the rules need to know about the default device."""

  gpu: bool = False     # the default JAX backend is a GPU
  cuda: bool = False    # ... an NVIDIA one
  hopper: bool = False  # ... of compute capability 9.x (wgmma, TMA)

  @staticmethod
  def current() -> "Device":
    """The default device's."""
    gpu = jax.default_backend() == "gpu"
    try:
      cuda = gpu and "cuda" in jax.devices()[0].client.platform_version.lower()
    except Exception:  # noqa: BLE001 - any failure to inspect means "not a CUDA GPU"
      cuda = False
    capability = str(getattr(jax.devices()[0], "compute_capability", "")) if cuda else ""
    return Device(gpu, cuda, capability.startswith("9"))


#: ``(d_in, d_out) -> largest rank`` where the Pallas (Triton) path beat XLA
#: end to end on an H100 (bf16, T = 4096); other shapes measured tied or slower.
PALLAS_WINS: dict[tuple[int, int], int] = {(4096, 4096): 64}

#: Fewest tokens measured for the Pallas path (below, 128-row tiles run partly masked).
PALLAS_MIN_TOKENS = 4096

#: Fewest tokens measured for the Mosaic kernels (bf16, H100); below it XLA.
MOSAIC_MIN_TOKENS = 4096


def choose(tokens: int, kernel_shape: tuple[int, int], rank: int, dtype,
           device: Device | None = None) -> str:
  """Return ``"pallas"``, ``"mosaic"`` or ``"xla"`` for one call of ``dora_dense``.

  Only bf16 activations on a CUDA GPU get a kernel; everything else is XLA,
  which is also what runs off the GPU.

  * ``"mosaic"`` (Hopper): when its tiles divide the shape and ``tokens >=
    MOSAIC_MIN_TOKENS``, at any rank (16 and 32 fused in-kernel, others as the
    GEMMs' addend): faster than XLA's DoRA in forward+backward at 13 of the 15
    measured shape × rank points and within noise at the other two.
  * ``"pallas"`` (Triton): otherwise, ``tokens`` at least
    :data:`PALLAS_MIN_TOKENS` and a multiple of 128, and ``kernel_shape`` in
    :data:`PALLAS_WINS` with ``rank`` at most its entry.
  """
  device = Device.current() if device is None else device
  if jnp.dtype(dtype) != jnp.bfloat16 or not device.cuda:
    return "xla"
  shape = tuple(int(d) for d in kernel_shape)
  if (device.hopper and tokens >= MOSAIC_MIN_TOKENS
      and backend_lib.implementation("mosaic").shapes_supported(tokens, *shape)):
    return "mosaic"
  max_rank = PALLAS_WINS.get(shape)
  if max_rank is not None and rank <= max_rank:
    return "pallas" if tokens >= PALLAS_MIN_TOKENS and tokens % 128 == 0 else "xla"
  return "xla"


#: Largest ``d_in·d_out`` where the one-pass norm kernel beat the factored norm
#: with ``‖W‖²`` cached (beyond it cuBLAS's ``aᵀW`` outruns the kernel's product).
NORM_KERNEL_MAX_SIZE = 4096 * 4096

#: Largest rank where it beat the factored norm without the cache at every
#: measured shape.
NORM_KERNEL_MAX_RANK_UNCACHED = 16


def norm_kernel_allowed(impl: str, auto: bool, kernel_shape, rank: int, cached: bool,
                        *arrays, device: Device | None = None, ruled: bool = False) -> bool:
  """Whether a call's norm runs :mod:`dora_jax.kernels.column_norm`.

  Only where it was measured faster than :func:`dora_jax.factored_norm`:
  ``d_in·d_out`` up to :data:`NORM_KERNEL_MAX_SIZE`, or, when ``‖W‖²`` is not
  cached (``cached`` false), ranks up to :data:`NORM_KERNEL_MAX_RANK_UNCACHED`.
  With ``backend="pallas"`` or ``"mosaic"`` (``impl`` a kernel backend) on the
  GPU or in interpret mode; under ``"auto"`` when the default device is a CUDA
  GPU and the arrays are not split across devices or ``ruled`` (the call is
  partitioned by :mod:`dora_jax.kernels.partition`), whatever ``impl`` the
  layer's GEMMs got; never with ``backend="xla"``.
  """
  d_in, d_out = (int(d) for d in kernel_shape)
  if not (d_in * d_out <= NORM_KERNEL_MAX_SIZE
          or (not cached and rank <= NORM_KERNEL_MAX_RANK_UNCACHED)):
    return False
  if impl in ("pallas", "mosaic"):
    return True
  device = Device.current() if device is None else device
  return auto and device.cuda and (ruled or partitioned_reason(*arrays) is None)


def mosaic_or_xla(tokens: int, kernel_shape: tuple[int, int], dtype,
                  device: Device | None = None) -> str:
  """``"mosaic"`` if the Hopper kernels can run this call, else ``"xla"`` (logged once).

  They need a 2-byte dtype (bf16/fp16), dimensions their tiles divide
  (:func:`dora_jax.kernels.fused_mosaic.shapes_supported`) and, on a GPU, a
  Hopper one; off the GPU they run in interpret mode.
  """
  device = Device.current() if device is None else device
  d_in, d_out = (int(d) for d in kernel_shape)
  reason = None
  if jnp.dtype(dtype).itemsize != 2:
    reason = f"dtype {jnp.dtype(dtype).name} (bf16/fp16 only)"
  elif not backend_lib.implementation("mosaic").shapes_supported(tokens, d_in, d_out):
    reason = f"T={tokens}, d_in={d_in}, d_out={d_out} not multiples of the kernels' tiles"
  elif device.gpu and not device.hopper:
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
  operands to be gathered, so such calls go through the partition rules of
  :mod:`dora_jax.kernels.partition` (see :func:`placement`). Detected: a concrete array that is not fully
  replicated over more than one device; an abstract value whose type carries
  a sharded spec (explicit mesh axes); tracing under ``jax.set_mesh(mesh)``
  with an ``Auto`` (or explicit) mesh axis of size > 1 that is not manual. Inside
  ``jax.shard_map`` over every axis of size > 1 the arrays are per-device
  blocks and this returns ``None`` (the kernels then run per shard).
  Not detectable: a ``jit`` of sharded inputs traced outside any mesh context
  (GSPMD then gathers the kernels' operands).
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


def placement(choice: str, tokens: int, kernel_shape, *arrays,
              requested: bool = True) -> tuple[str, bool]:
  """``(implementation, partitioned)`` for a call over ``arrays``.

  ``choice`` unchanged and ``partitioned`` false when it is not a kernel
  backend or the call is not split across devices (:func:`partitioned_reason`);
  ``partitioned`` true when it is split and :mod:`dora_jax.kernels.partition`
  has a rule for it (the kernels then run per shard); else ``"xla"``, logged
  once per process on the ``"dora_jax"`` logger with what is missing (warning
  when the kernels were requested explicitly, info under ``"auto"``).
  """
  if choice not in ("pallas", "mosaic"):
    return choice, False
  reason = partitioned_reason(*arrays)
  if reason is None:
    return choice, False
  from dora_jax.kernels import partition  # the rules import the kernel modules
  d_in, d_out = (int(d) for d in kernel_shape)
  missing = partition.no_rule(tokens, d_in, d_out, devices=_devices(*arrays))
  if missing is None:
    return choice, True
  key = f"{requested}:{missing}"
  if key not in _fallbacks_logged:
    _fallbacks_logged.add(key)
    _log.log(logging.WARNING if requested else logging.INFO,
             "dora_jax: the Pallas kernels have no partition rule for this call (%s; %s); "
             "using the XLA path", reason, missing)
  return "xla", False


def _devices(*arrays) -> int:
  """Most devices a concrete array among ``arrays`` is placed on (1 if none)."""
  return max([len(x.sharding.device_set) for x in arrays
              if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)], default=1)

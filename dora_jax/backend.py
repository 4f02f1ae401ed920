"""The backends of :func:`dora_jax.dora_dense`: names, default, kernel options, registry.

``dora_dense(..., backend=...)`` takes, per call:

* ``"xla"`` — plain ``jax.numpy`` (XLA fuses the elementwise work); runs everywhere.
* ``"pallas"`` — the fused Pallas kernels (Triton lowering on NVIDIA GPUs,
  interpret mode elsewhere, which is slow and meant for tests).
* ``"mosaic"`` — the Hopper kernels (Pallas Mosaic GPU: TMA + wgmma) that fold
  DoRA's column scale into the base GEMMs; shapes they do not tile exactly, and
  dtypes other than bf16/fp16, run XLA (logged once). Interpret mode off the GPU.
* ``"auto"`` — the fused kernels on CUDA GPUs for the shapes where they were
  measured faster, XLA everywhere else (:func:`dora_jax.kernels.dispatch.choose`).
* ``None`` — the process default: the environment variable ``DORA_JAX_BACKEND``
  (one of the names above) read when the call is traced, else ``"auto"``.

What a kernel backend runs inside is set per call too, by
``dora_dense(..., options=KernelOptions(...))`` (static: part of the traced
program, like the backend name). Each backend is an :class:`Implementation`
(``forward``, ``backward``) in :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import os
from typing import Callable, NamedTuple

import jax

from dora_jax.kernels._common import MatmulConfig

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


@dataclasses.dataclass(frozen=True)
class KernelOptions:
  """What the kernel backends run, for one :func:`dora_jax.dora_dense` call.

  Frozen and hashable: it is part of the static configuration of the layer's
  ``custom_vjp`` (a function traced with other options is another program).
  The defaults are what was measured fastest (BENCHMARKS.md,
  benchmarks/KERNELS.md); the alternatives are kept where both sides still
  run by default somewhere, for A/B benchmarks. A field that does not concern
  the backend a call runs is ignored.
  """

  #: Norm by the one-pass kernel where kernels.dispatch.norm_kernel_allowed says it is faster.
  norm_kernel: bool = True
  #: "mosaic", bias-free: the dm residual is y ("output"; zero g by flagged_columns) or "pre".
  mosaic_residual: str = "output"
  #: "mosaic": dx = dpre·Wᵀ + (s·t)·aᵀ as one Mosaic GEMM where its tiles divide the shape.
  mosaic_dx: bool = True
  #: "mosaic": widest d_out given the one-pass dpre/dm kernel (XLA fuses both beyond); 0: never.
  scale_reduce_max_width: int = 8192
  #: "pallas": dx as one launch; None: where measured faster (kernels.fused_dense.use_dx_kernel).
  pallas_dx: bool | None = None
  #: "pallas": tiling of the forward launch; None: MatmulConfig.default_for(dtype).
  pallas_tiles: MatmulConfig | None = None
  #: "pallas": tiling of the dx launch; None: MatmulConfig.default_for(dtype).
  pallas_dx_tiles: MatmulConfig | None = None
  #: Pallas interpret mode (slow; tests and debugging); None: off the GPU.
  interpret: bool | None = None

  def __post_init__(self):
    for name in ("norm_kernel", "mosaic_dx"):
      if not isinstance(getattr(self, name), bool):
        raise TypeError(f"KernelOptions.{name} must be a bool, got {getattr(self, name)!r}")
    for name in ("pallas_dx", "interpret"):
      if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
        raise TypeError(f"KernelOptions.{name} must be None or a bool, "
                        f"got {getattr(self, name)!r}")
    if self.mosaic_residual not in ("output", "pre"):
      raise ValueError("KernelOptions.mosaic_residual must be 'output' or 'pre', "
                       f"got {self.mosaic_residual!r}")
    width = self.scale_reduce_max_width
    if not isinstance(width, int) or isinstance(width, bool) or width < 0:
      raise ValueError(f"KernelOptions.scale_reduce_max_width must be an int >= 0, got {width!r}")
    for name in ("pallas_tiles", "pallas_dx_tiles"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, MatmulConfig):
        raise TypeError(f"KernelOptions.{name} must be None or a "
                        f"dora_jax.kernels.MatmulConfig, got {type(value).__name__}")


class Implementation(NamedTuple):
  """One backend of :func:`dora_jax.dora_dense` (the twins in :mod:`dora_jax.compose`).

  ``forward(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre, options)
  -> (y, pre, h)`` and ``backward(res: Residuals, dy, wants, *, options) ->
  Grads``, as :func:`~dora_jax.compose.forward_xla` and
  :func:`~dora_jax.compose.backward_xla`; ``shapes_supported(tokens, d_in,
  d_out) -> bool`` where the kernels need whole tiles (``None``: any shape).
  """

  forward: Callable
  backward: Callable
  shapes_supported: Callable | None = None


#: name -> (module, forward, backward, shapes_supported or None). The kernel
#: modules are imported on first use, here only (they load Pallas and Mosaic GPU).
REGISTRY = {
    "xla": ("dora_jax.compose", "forward_xla", "backward_xla", None),
    "pallas": ("dora_jax.kernels.fused_dense", "forward_pallas", "backward_pallas", None),
    "mosaic": ("dora_jax.kernels.fused_mosaic", "forward_mosaic", "backward_mosaic",
               "shapes_supported"),
}


@functools.cache
def implementation(name: str, partitioned: bool = False) -> Implementation:
  """The backend ``name`` of :data:`REGISTRY`; ``partitioned``: its kernels per shard.

  ``partitioned=True`` (a kernel backend traced under a device mesh) wraps its
  ``forward`` and ``backward`` in the partition rules of
  :mod:`dora_jax.kernels.partition`, so the partitioner runs them on each
  device's blocks.

  A kernel backend's ``forward`` and ``backward`` are differentiable: their
  derivatives are those of the XLA twins (``pallas_call`` has no usable JVP
  rule), so second-order reverse mode (a gradient of a gradient, or
  ``jax.jvp`` of ``jax.grad``) runs the kernels for values and XLA for the
  derivative of the backward.
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown backend {name!r}; registered: {tuple(REGISTRY)}")
  if not isinstance(partitioned, bool):
    raise TypeError(f"partitioned must be a bool, got {partitioned!r}")
  module, forward, backward, shapes = REGISTRY[name]
  module = importlib.import_module(module)
  impl = Implementation(getattr(module, forward), getattr(module, backward),
                        None if shapes is None else getattr(module, shapes))
  if name == "xla":
    return impl
  if partitioned:
    from dora_jax.kernels import partition  # imports the kernels; first use only
    impl = impl._replace(forward=partition.forward(name), backward=partition.backward(name))
  twin = implementation("xla")
  return impl._replace(forward=_twin_derivatives(impl.forward, twin.forward, arrays=7),
                       backward=_twin_derivatives(impl.backward, twin.backward, arrays=2))


def _twin_derivatives(kernel_fn, twin_fn, arrays: int):
  """``kernel_fn``'s values with ``twin_fn``'s JVP. Both take the same arguments:
  the first ``arrays`` positional ones are (pytrees of) arrays, the rest and
  the keyword arguments static."""

  def call(*args, **kwargs):
    static = args[arrays:]

    def values_fn(*values):
      return kernel_fn(*values, *static, **kwargs)

    values_fn.__name__ = kernel_fn.__name__  # the name jaxprs show
    fn = jax.custom_jvp(values_fn)

    @fn.defjvp
    def _(primals, tangents):
      _, tangents_out = jax.jvp(lambda *v: twin_fn(*v, *static, **kwargs), primals, tangents)
      return fn(*primals), tangents_out

    return fn(*args[:arrays])

  return functools.wraps(kernel_fn)(call)

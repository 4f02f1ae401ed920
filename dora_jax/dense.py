"""``dora_dense``: the DoRA Dense layer as one differentiable function.

Semantics are Hugging Face PEFT's DoRA (``LoraConfig(use_dora=True)``) in Flax
layout. For ``x [..., d_in]``::

  n = ‖W + s·a·b‖ per output column        [d_out], float32, a constant (detached)
  g = m / n                                  [d_out]
  y = g ⊙ (x·W + s·(x·a)·b) + bias           [..., d_out], x's dtype

The backward is a ``jax.custom_vjp`` that keeps as residuals only ``x``,
``h = x·a [T, r]``, one ``[T, d_out]`` activation when the magnitude is
differentiated (``pre = x·W + s·h·b``; on the ``"mosaic"`` backend without a
bias, the output ``y`` itself, which a network's next layer holds anyway) and
two ``[d_out]`` float32 vectors, and that skips every cotangent nobody asked for
(the frozen kernel's ``xᵀ·dpre`` in particular is never computed unless the
kernel itself is differentiated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax import backend as backend_lib
from dora_jax._checks import (accumulation_dtype, check_dora_args, check_real_scalar,
                              check_scale, check_vector, check_weights, precision_name)
from dora_jax.compose import Wants, backward_xla, forward_xla
from dora_jax.norm import NORM_EPS, factored_norm


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
  """The LoRA scale ``s``: ``alpha / rank``, or ``alpha / √rank`` with rsLoRA (PEFT's rules)."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  return check_real_scalar("alpha", alpha) / (math.sqrt(rank) if rslora else rank)


class _Config(NamedTuple):
  """Static (hashable) part of a call: which implementation runs, matmul precision."""

  impl: str
  precision: str | None = None

  def scope(self):
    """The matmul-precision context for tracing the forward or the backward."""
    if self.precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.precision)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _StaticWants:
  """Carries :class:`Wants` through the residuals as static (leafless) data."""

  wants: Wants


def _scale_vectors(magnitude, norm, acc):
  """``(g, 1/n)``. ``g = m / n`` is a true division so that ``m == n`` gives
  exactly 1 (``m · (1/n)`` can round to 1 − 2⁻²⁴), keeping PEFT's init exact."""
  safe = jnp.maximum(norm.astype(acc), NORM_EPS)
  return magnitude.astype(acc) / safe, 1.0 / safe


#: Whether a bias-free call keeps its output ``y`` (rather than ``pre``) as the
#: ``dm`` residual: ``None`` (the default) per backend, ``True``/``False`` force
#: it (private, for A/B benchmarks: ``benchmarks/step_profile.py``; read at
#: trace time). Recovering ``pre = y / g`` needs zero magnitudes handled apart:
#: the ``"mosaic"`` backend does it on the device
#: (:mod:`dora_jax.kernels.flagged_columns`) and keeps ``y`` — no ``pre``
#: store, one ``[T, d_out]`` buffer less (H100, r = 16: 1.717 vs 1.801 ms at
#: 4096×14336, 0.556 vs 0.552 at 4096×4096; BENCHMARKS.md); the others would
#: need a ``lax.cond`` (:func:`dora_jax.compose.magnitude_grad`), whose
#: predicate XLA's GPU runtime reads on the host, stalling the stream once per
#: layer and step, so they keep ``pre``.
_OUTPUT_AS_RESIDUAL: bool | None = None


def _keeps_output(impl: str) -> bool:
  if _OUTPUT_AS_RESIDUAL is not None:
    return _OUTPUT_AS_RESIDUAL
  return impl == "mosaic"


def _implementation(impl: str):
  if impl == "xla":
    return forward_xla, backward_xla
  if impl == "pallas":
    from dora_jax.kernels import fused_dense  # imported lazily: Pallas is optional
    return fused_dense.forward_pallas, fused_dense.backward_pallas
  if impl == "mosaic":
    from dora_jax.kernels import fused_mosaic
    return fused_mosaic.forward_mosaic, fused_mosaic.backward_mosaic
  raise AssertionError(impl)


def _core(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm):
  with cfg.scope():
    return _core_primal(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm)


def _core_primal(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm):
  g, _ = _scale_vectors(magnitude, norm, scale.dtype)
  if cfg.impl == "pallas":  # nothing is differentiated: the kernel skips writing `pre`
    from dora_jax.kernels import fused_dense
    return fused_dense.forward_pallas_y(x2, kernel, lora_a, lora_b, g, scale, bias)
  if cfg.impl == "mosaic":
    from dora_jax.kernels import fused_mosaic
    return fused_mosaic.forward_mosaic_y(x2, kernel, lora_a, lora_b, g, scale, bias)
  forward, _ = _implementation(cfg.impl)
  y, _, _ = forward(x2, kernel, lora_a, lora_b, g, scale, bias)
  return y


def _core_fwd(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm):
  wants = Wants(
      x=x2.perturbed, kernel=kernel.perturbed, lora_a=lora_a.perturbed,
      lora_b=lora_b.perturbed, magnitude=magnitude.perturbed,
      scale=scale.perturbed, bias=bias is not None and bias.perturbed)
  x2, kernel, lora_a, lora_b, magnitude, scale, norm = (
      v.value for v in (x2, kernel, lora_a, lora_b, magnitude, scale, norm))
  bias = None if bias is None else bias.value
  g, inv_norm = _scale_vectors(magnitude, norm, scale.dtype)
  forward, _ = _implementation(cfg.impl)
  # dm needs pre. A bias-free call on the mosaic backend (or as the private
  # A/B switch says) keeps the output instead and recovers pre = y / g;
  # float16 always keeps pre, whose range y = g ⊙ pre could leave.
  keep_y = (_keeps_output(cfg.impl) and wants.magnitude and bias is None
            and x2.dtype != jnp.float16)
  with cfg.scope():
    y, pre, h = forward(x2, kernel, lora_a, lora_b, g, scale, bias,
                        want_pre=wants.magnitude and not keep_y)
  bias_dtype = None if bias is None else jnp.zeros((), bias.dtype)
  res = (x2, kernel, lora_a, lora_b, h, pre, y if keep_y else None, g,
         inv_norm, scale, jnp.zeros((), magnitude.dtype), bias_dtype, _StaticWants(wants))
  return y, res


def _core_bwd(cfg, res, dy):
  (x2, kernel, lora_a, lora_b, h, pre, y, g, inv_norm, scale, m_proto, bias_proto,
   static) = res
  wants = static.wants
  _, backward = _implementation(cfg.impl)
  with cfg.scope():  # the backward is traced later, outside any caller's context
    grads = backward(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy, wants, y=y)

  def cast(value, like_dtype):
    return None if value is None else value.astype(like_dtype)

  return (
      cast(grads.x, x2.dtype),
      cast(grads.kernel, kernel.dtype),
      cast(grads.lora_a, lora_a.dtype),
      cast(grads.lora_b, lora_b.dtype),
      cast(grads.magnitude, m_proto.dtype),
      cast(grads.scale, scale.dtype),
      None if bias_proto is None else cast(grads.bias, bias_proto.dtype),
      None,  # the norm is a constant (PEFT detaches it)
  )


_dora_core = jax.custom_vjp(_core, nondiff_argnums=(0,))
_dora_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


def _resolve(backend: str | None, x2, kernel, lora_a, *others,
             cached: bool = False) -> tuple[str, bool]:
  """``(implementation, whether the norm uses its kernel)``; ``cached``: ``‖W‖²`` is given."""
  choice = backend_lib.check_backend(backend)
  if choice == "xla":
    return choice, False
  from dora_jax.kernels import dispatch
  requested = choice != "auto"
  if choice == "auto":
    choice = dispatch.choose(x2.shape[0], kernel.shape, lora_a.shape[1], x2.dtype)
  elif choice == "mosaic":
    choice = dispatch.mosaic_or_xla(x2.shape[0], kernel.shape, x2.dtype)
  # Pallas is not partitioned by GSPMD: the XLA path under a mesh (logged once).
  impl = dispatch.unpartitioned(choice, x2, kernel, lora_a, *others, requested=requested)
  return impl, dispatch.norm_kernel_allowed(impl, not requested, kernel.shape, lora_a.shape[1],
                                            cached, kernel, lora_a, *others)


def _weight_norm(use_kernel: bool, kernel, lora_a, lora_b, scale, base_sq_norm):
  """DoRA's norm ``[d_out]``: the one-pass kernel
  (:mod:`dora_jax.kernels.column_norm`) where allowed and its dtypes fit, else
  :func:`factored_norm` (with the cached ``‖W‖²`` if given)."""
  if use_kernel:
    from dora_jax.kernels import column_norm
    if column_norm.supported(kernel, lora_a, lora_b):
      return column_norm.column_norm(kernel, lora_a, lora_b, scale)
  return factored_norm(kernel, lora_a, lora_b, scale,
                       base_sq_norm=None if base_sq_norm is None
                       else lax.stop_gradient(base_sq_norm))


def dora_dense(x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
               magnitude: jax.Array, scale, bias: jax.Array | None = None, *,
               norm: jax.Array | None = None, base_sq_norm: jax.Array | None = None,
               precision=None, backend: str | None = None) -> jax.Array:
  """DoRA Dense layer: ``(m / ‖W + s·a·b‖) ⊙ (x·W + s·(x·a)·b) + bias``.

  Args:
    x: activations ``[..., d_in]`` (any leading dims); sets the compute dtype.
    kernel: frozen base kernel ``[d_in, d_out]``.
    lora_a: ``[d_in, r]``.
    lora_b: ``[r, d_out]``.
    magnitude: ``[d_out]``, the trained column magnitudes ``m``.
    scale: LoRA scale ``s`` (see :func:`lora_scale`): Python number or 0-d array.
    bias: optional ``[d_out]``, added after the DoRA scaling (not scaled).
    norm: optional precomputed ``[d_out]`` ``factored_norm(kernel, lora_a, lora_b,
      scale)``. The norm depends on parameters only, so a step over k
      micro-batches can compute it once and pass it to each (it is treated as a
      constant either way).
    base_sq_norm: optional ``column_sq_norm(kernel)`` ``[d_out]``. The kernel is
      frozen, so its column norms can be computed once (the layers do after
      :func:`dora_jax.cache_base_norms` / :func:`dora_jax.linen.cache_base_norms`)
      instead of re-reading the whole kernel every call. Ignored when ``norm`` is given
      and where the norm comes from the one-pass kernel
      (:mod:`dora_jax.kernels.column_norm`, which needs no ``‖W‖²``; see
      :func:`dora_jax.kernels.dispatch.norm_kernel_allowed`).
    precision: matmul precision of the layer's matmuls, forward and backward
      (``None``, a ``jax.lax.Precision`` or ``"default"``/``"high"``/``"highest"``,
      as Flax's ``precision``); ``None`` follows ``jax.default_matmul_precision``.
      The norm's own matmuls always run at full float32 precision.
    backend: ``"auto"``, ``"xla"``, ``"pallas"``, ``"mosaic"`` or ``None`` (process default, see
      :mod:`dora_jax.backend`).

  Returns:
    ``[..., d_out]`` in ``x.dtype``. Differentiable with respect to ``x``,
    ``lora_a``, ``lora_b``, ``magnitude``, ``bias`` (and ``kernel``/``scale`` if
    asked); the norm is held constant as in PEFT.

  Example:
    >>> import jax, jax.numpy as jnp, dora_jax
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> x = jax.random.normal(k[0], (2, 5, 16))
    >>> w = jax.random.normal(k[1], (16, 8))
    >>> a = jax.random.normal(k[2], (16, 4))
    >>> b = jax.random.normal(k[3], (4, 8))
    >>> m = jnp.linalg.norm(w, axis=0)
    >>> dora_jax.dora_dense(x, w, a, b, m, 0.5).shape
    (2, 5, 8)
  """
  dims = check_dora_args(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  acc = accumulation_dtype(x, kernel, lora_a, lora_b, magnitude)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, dims.d_in)
  impl, norm_kernel = _resolve(backend, x2, kernel, lora_a, lora_b, magnitude, bias,
                               cached=base_sq_norm is not None)
  if norm is None:
    norm = _weight_norm(norm_kernel, kernel, lora_a, lora_b, scale, base_sq_norm)
  else:
    check_vector("norm", norm, dims.d_out)
  norm = lax.stop_gradient(norm.astype(acc))
  scale = jnp.asarray(scale, acc)
  y2 = _dora_core(_Config(impl, precision_name(precision)), x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm)
  return y2.reshape(*lead, dims.d_out)


def dora_norm_scale(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                    magnitude: jax.Array, scale, *, norm: jax.Array | None = None
                    ) -> jax.Array:
  """``g = m / ‖W + s·a·b‖`` ``[d_out]`` float32, the per-column DoRA scale.

  Differentiable with respect to ``magnitude`` only (the norm is detached).
  Used to cache the scale for unmerged inference.
  """
  dims = check_weights(kernel, lora_a, lora_b)
  check_vector("magnitude", magnitude, dims.d_out)
  check_scale(scale)
  acc = accumulation_dtype(kernel, lora_a, lora_b, magnitude)
  if norm is None:
    norm = factored_norm(kernel, lora_a, lora_b, scale)
  g, _ = _scale_vectors(magnitude, lax.stop_gradient(norm), acc)
  return g


def merge_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                 magnitude: jax.Array, scale) -> jax.Array:
  """The merged kernel ``W' = g ⊙ (W + s·a·b)`` ``[d_in, d_out]`` in ``kernel.dtype``.

  ``x·W' + bias`` equals :func:`dora_dense` up to rounding. The composition
  runs in float32 (float64 for float64 inputs) and is cast back once.
  """
  dims = check_weights(kernel, lora_a, lora_b)
  check_vector("magnitude", magnitude, dims.d_out)
  check_scale(scale)
  acc = accumulation_dtype(kernel, lora_a, lora_b, magnitude)
  g = dora_norm_scale(kernel, lora_a, lora_b, magnitude, scale)
  delta = jnp.dot(lora_a.astype(acc), lora_b.astype(acc), precision=lax.Precision.HIGHEST)
  merged = (kernel.astype(acc) + jnp.asarray(scale, acc) * delta) * g.astype(acc)
  return merged.astype(kernel.dtype)

"""The DoRA composition given the scale ``g = m / n``: XLA forward and backward.

These are the plain ``jax.numpy`` implementations the ``"xla"`` backend runs,
the twins the fused kernels in :mod:`dora_jax.kernels` are tested against, and
the derivatives the kernel backends use when their own backward is
differentiated (:func:`dora_jax.backend.implementation`). Shapes (leading dims
already flattened)::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: ``pre = x2·W + s·(x2·a)·b``; ``y = g ⊙ pre + bias``. The big matmuls
run in the activation dtype (tensor cores for bf16) and the compose runs in
float32 inside one fused elementwise pass; the outputs are cast back.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Wants(NamedTuple):
  """Which cotangents the backward must produce (the rest are symbolic zeros)."""

  x: bool = True
  kernel: bool = False
  lora_a: bool = True
  lora_b: bool = True
  magnitude: bool = True
  scale: bool = False
  bias: bool = True


class Grads(NamedTuple):
  """Cotangents in float32/the activation dtype; ``None`` where not wanted."""

  x: jax.Array | None
  kernel: jax.Array | None
  lora_a: jax.Array | None
  lora_b: jax.Array | None
  magnitude: jax.Array | None
  scale: jax.Array | None
  bias: jax.Array | None


class Residuals(NamedTuple):
  """What a forward keeps for its backward.

  ``h = x2·a [T, r]``; one of ``pre [T, d_out]`` and ``y [T, d_out]`` (the
  layer's output, for a bias-free layer) for the magnitude gradient, or
  neither when it is not wanted; ``g``, ``inv_norm = 1/n`` ``[d_out]``; the
  0-d ``scale``.
  """

  x2: jax.Array
  kernel: jax.Array
  lora_a: jax.Array
  lora_b: jax.Array
  h: jax.Array
  pre: jax.Array | None
  y: jax.Array | None
  g: jax.Array
  inv_norm: jax.Array
  scale: jax.Array


def dot_t(lhs, rhs, out_dtype=None):
  """``lhsᵀ · rhs`` contracting the leading axis, without a transpose copy."""
  return lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                         preferred_element_type=out_dtype)


def dot_nt(lhs, rhs, out_dtype=None):
  """``lhs · rhsᵀ`` contracting the trailing axes."""
  return lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())),
                         preferred_element_type=out_dtype)


def lora_hidden(x2: jax.Array, lora_a: jax.Array) -> jax.Array:
  """``h = x2·a [T, r]`` in the activation dtype (float32 accumulation)."""
  acc = jnp.promote_types(jnp.float32, x2.dtype)
  return jnp.dot(x2, lora_a.astype(x2.dtype), preferred_element_type=acc).astype(x2.dtype)


def forward_xla(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True,
                options=None):
  """Return ``(y, pre, h)``: output, pre-scale activations (the residual), ``x2·a``.

  ``y [T, d_out]`` and ``pre [T, d_out]`` are in ``x2.dtype``; ``h [T, r]`` too.
  ``pre`` is ``None`` when ``want_pre`` is false. ``options`` (the kernel
  backends' :class:`~dora_jax.backend.KernelOptions`) is ignored.
  """
  del options
  cdt = x2.dtype
  acc = g.dtype
  h = lora_hidden(x2, lora_a)
  pre = _pre_activation(x2, kernel, lora_b, h, scale, acc)
  y = g * pre
  if bias is not None:
    y = y + bias.astype(acc)
  return y.astype(cdt), pre.astype(cdt) if want_pre else None, h


def _pre_activation(x2, kernel, lora_b, h, scale, acc):
  """``x2·W + s·h·b [T, d_out]`` in ``acc`` (each matmul rounded to x2's dtype once)."""
  cdt = x2.dtype
  base = jnp.dot(x2, kernel.astype(cdt))
  lora = jnp.dot(h, lora_b.astype(cdt))
  return base.astype(acc) + scale * lora.astype(acc)


#: Below this ``|g|``, ``dm`` is not recovered from the output ``y = g ⊙ pre``
#: (which may have underflowed or be exactly zero) but from ``pre`` recomputed.
G_TINY = 1e-30


def magnitude_grad(res: Residuals, dy, *, dy_v=None, recompute_flagged=None):
  """``dm = Σ_T dy ⊙ pre / n [d_out]`` from the residual ``pre`` or from ``y``.

  ``dy_v``, when given, is ``Σ_T dy ⊙ v`` already reduced (``v`` the kept
  residual). Without a bias ``y = g ⊙ pre``, so ``Σ dy ⊙ pre / n = Σ dy ⊙ y /
  (g·n)`` and the layer's output can serve as the residual instead of a second
  ``[T, d_out]`` buffer. Where ``|g| < G_TINY`` (a zero magnitude, say) that
  quotient is undefined and those columns take ``recompute_flagged(tiny) ->
  [d_out]`` (``Σ_T dy ⊙ pre`` in the flagged columns, 0 elsewhere), decided
  per column on the device (:mod:`dora_jax.kernels.flagged_columns`);
  ``None`` recomputes ``pre`` for every column with XLA (a full ``x2·W``: the
  twin, and the derivative of the kernel backends' backward).
  """
  acc = res.g.dtype
  if res.pre is not None:
    if dy_v is None:
      dy_v = jnp.sum(dy.astype(acc) * res.pre.astype(acc), axis=0)
    return dy_v * res.inv_norm
  tiny = jnp.abs(res.g) < G_TINY
  if dy_v is None:
    dy_v = jnp.sum(dy.astype(acc) * res.y.astype(acc), axis=0)
  dm = dy_v * (res.inv_norm / jnp.where(tiny, 1.0, res.g))
  if recompute_flagged is None:
    def recompute_flagged(flags):
      pre = _pre_activation(res.x2, res.kernel, res.lora_b, res.h, res.scale, acc)
      total = jnp.sum(dy.astype(acc) * pre.astype(res.x2.dtype).astype(acc), axis=0)
      return jnp.where(flags, total, 0.0)
  return jnp.where(tiny, recompute_flagged(tiny) * res.inv_norm, dm)


def backward_xla(res: Residuals, dy, wants: Wants, *, options=None, dx_matmul=None,
                 scale_reduce=None, recompute_flagged=None) -> Grads:
  """Cotangents of :func:`forward_xla` with the norm held constant (PEFT's detach).

  ``dpre = dy ⊙ g``; ``dx = dpre·Wᵀ + s·(dpre·bᵀ)·aᵀ``; ``db = s·hᵀ·dpre``;
  ``da = s·x2ᵀ·(dpre·bᵀ)``; ``dm = Σ_T dy ⊙ pre / n``; ``dbias = Σ_T dy``;
  ``ds = Σ h ⊙ (dpre·bᵀ)``; ``dW = x2ᵀ·dpre`` (only when asked for).

  The kernel backends plug their kernels in (``options`` is ignored here):
  ``dx_matmul(dpre [T, d_out], ts [T, r]) -> dx [T, d_in]``, with ``ts = s·t``
  in the activation dtype, replaces the two XLA matmuls of ``dx``;
  ``scale_reduce(dy, v, g) -> (dpre, Σ_T dy ⊙ v)`` computes ``dpre`` and the
  magnitude's reduction in one pass (:mod:`dora_jax.kernels.scale_reduce`),
  ``v`` being the kept residual (``pre`` or ``y``); ``recompute_flagged`` is
  passed to :func:`magnitude_grad`.
  """
  del options
  x2, kernel, lora_a, lora_b, h, pre, y, g, inv_norm, scale = res
  cdt = dy.dtype
  acc = g.dtype
  need_t = wants.x or wants.lora_a or wants.scale
  need_dpre = need_t or wants.lora_b or wants.kernel
  residual = pre if pre is not None else y
  dy_v = None
  if scale_reduce is not None and need_dpre and wants.magnitude and residual is not None:
    dpre, dy_v = scale_reduce(dy, residual, g)
  else:
    dpre = (dy.astype(acc) * g).astype(cdt) if need_dpre else None
  t = dot_nt(dpre, lora_b.astype(cdt), acc) if need_t else None  # [T, r]

  dx = da = db = dm = ds = dbias = dkernel = None
  if wants.x and dx_matmul is not None:
    dx = dx_matmul(dpre, (scale * t).astype(cdt))
  elif wants.x:
    dx_base = dot_nt(dpre, kernel.astype(cdt))
    dx_lora = dot_nt(t.astype(cdt), lora_a.astype(cdt))
    dx = (dx_base.astype(acc) + scale * dx_lora.astype(acc)).astype(cdt)
  if wants.lora_a:
    da = scale * dot_t(x2, t.astype(cdt), acc)
  if wants.lora_b:
    db = scale * dot_t(h, dpre, acc)
  if wants.magnitude:
    dm = magnitude_grad(res, dy, dy_v=dy_v, recompute_flagged=recompute_flagged)
  if wants.scale:
    ds = jnp.sum(h.astype(acc) * t)
  if wants.bias:
    dbias = jnp.sum(dy.astype(acc), axis=0)
  if wants.kernel:
    dkernel = dot_t(x2, dpre, acc)
  return Grads(dx, dkernel, da, db, dm, ds, dbias)

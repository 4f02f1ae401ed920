"""The DoRA composition given the scale ``g = m / n``: XLA forward and backward.

These are the plain ``jax.numpy`` implementations the ``"xla"`` backend runs,
and the twins the fused Pallas kernels in :mod:`dora_jax.kernels` are tested
against. Shapes (leading dims already flattened)::

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


def _dot_t(lhs, rhs, out_dtype=None):
  """``lhsᵀ · rhs`` contracting the leading axis, without a transpose copy."""
  return lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())),
                         preferred_element_type=out_dtype)


def _dot_nt(lhs, rhs, out_dtype=None):
  """``lhs · rhsᵀ`` contracting the trailing axes."""
  return lax.dot_general(lhs, rhs, (((1,), (1,)), ((), ())),
                         preferred_element_type=out_dtype)


def lora_hidden(x2: jax.Array, lora_a: jax.Array) -> jax.Array:
  """``h = x2·a [T, r]`` in the activation dtype (float32 accumulation)."""
  acc = jnp.promote_types(jnp.float32, x2.dtype)
  return jnp.dot(x2, lora_a.astype(x2.dtype), preferred_element_type=acc).astype(x2.dtype)


def forward_xla(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True):
  """Return ``(y, pre, h)``: output, pre-scale activations (the residual), ``x2·a``.

  ``y [T, d_out]`` and ``pre [T, d_out]`` are in ``x2.dtype``; ``h [T, r]`` too.
  ``pre`` is ``None`` when ``want_pre`` is false.
  """
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

#: Tokens per chunk when ``pre`` is recomputed for :func:`magnitude_grad`.
RECOMPUTE_CHUNK = 256


def _dy_dot_pre(dy, x2, kernel, lora_b, h, scale, acc):
  """``Σ_T dy ⊙ pre [d_out]`` with ``pre`` recomputed ``RECOMPUTE_CHUNK`` tokens at a
  time, so the rare path that needs it holds no ``[T, d_out]`` temporary."""
  tokens = x2.shape[0]
  chunk = min(RECOMPUTE_CHUNK, tokens)
  full = tokens // chunk

  def part(start, size):
    rows = lambda v: lax.dynamic_slice_in_dim(v, start, size, axis=0)
    pre = _pre_activation(rows(x2), kernel, lora_b, rows(h), scale, acc)
    return jnp.sum(rows(dy).astype(acc) * pre.astype(x2.dtype).astype(acc), axis=0)

  total = lax.fori_loop(0, full, lambda i, t: t + part(i * chunk, chunk),
                        jnp.zeros((kernel.shape[1],), acc))
  if full * chunk < tokens:
    total = total + part(full * chunk, tokens - full * chunk)
  return total


def magnitude_grad(dy, pre, y, g, inv_norm, recompute, *, dy_y=None, recompute_flagged=None):
  """``dm = Σ_T dy ⊙ pre / n [d_out]`` from the residual ``pre`` or from ``y``.

  Without a bias ``y = g ⊙ pre``, so ``Σ dy ⊙ pre / n = Σ dy ⊙ y / (g·n)`` and the
  layer's output can serve as the residual instead of a second ``[T, d_out]``
  buffer. Where some ``|g| < G_TINY`` (a zero magnitude, say) that quotient is
  undefined: a ``lax.cond`` taken only then replaces those columns with
  ``recompute() -> Σ_T dy ⊙ pre`` (chunked over tokens). The main reduction
  stays outside the ``cond`` so XLA fuses it as usual. Under a ``vmap`` that
  batches the magnitude (stacked adapters) the ``cond`` becomes a ``select``
  and the recomputation runs every time: correct, one extra base matmul.

  ``dy_y`` (``Σ_T dy ⊙ y``, already reduced) and ``recompute_flagged(tiny) ->
  [d_out]`` (``Σ_T dy ⊙ pre`` in the flagged columns, 0 elsewhere; see
  :mod:`dora_jax.kernels.flagged_columns`) replace the reduction and the
  ``cond``: the kernel decides per column tile on the device.
  """
  acc = g.dtype
  if pre is not None:
    return jnp.sum(dy.astype(acc) * pre.astype(acc), axis=0) * inv_norm
  tiny = jnp.abs(g) < G_TINY
  if dy_y is None:
    dy_y = jnp.sum(dy.astype(acc) * y.astype(acc), axis=0)
  dm = dy_y * (inv_norm / jnp.where(tiny, 1.0, g))
  if recompute_flagged is not None:
    return jnp.where(tiny, recompute_flagged(tiny) * inv_norm, dm)

  def fix(dm, tiny, inv_norm):
    return jnp.where(tiny, recompute() * inv_norm, dm)

  return lax.cond(jnp.any(tiny), fix, lambda dm, tiny, inv_norm: dm, dm, tiny, inv_norm)


def backward_xla(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy,
                 wants: Wants, *, y=None, dx_matmul=None, scale_reduce=None,
                 scale_reduce_lowrank=None, recompute_flagged=None) -> Grads:
  """Cotangents of :func:`forward_xla` with the norm held constant (PEFT's detach).

  ``dpre = dy ⊙ g``; ``dx = dpre·Wᵀ + s·(dpre·bᵀ)·aᵀ``; ``db = s·hᵀ·dpre``;
  ``da = s·x2ᵀ·(dpre·bᵀ)``; ``dm = Σ_T dy ⊙ pre / n``; ``dbias = Σ_T dy``;
  ``ds = Σ h ⊙ (dpre·bᵀ)``; ``dW = x2ᵀ·dpre`` (only when asked for).

  ``dm`` needs either the residual ``pre`` or, for a layer without bias, its
  output ``y`` (``pre=None``; see :func:`magnitude_grad`).

  ``dx_matmul(dpre [T, d_out], ts [T, r]) -> dx [T, d_in]``, with ``ts = s·t`` in
  the activation dtype, replaces the two XLA matmuls of ``dx`` (the fused
  Pallas backward plugs in here); ``None`` keeps XLA's.
  ``scale_reduce(dy, v, g) -> (dpre, Σ_T dy ⊙ v)`` computes ``dpre`` and
  the magnitude's reduction in one pass (:mod:`dora_jax.kernels.scale_reduce`)
  when both are needed, ``v`` being the kept ``pre`` or else the output ``y``;
  ``None`` keeps XLA's two passes. ``scale_reduce_lowrank(dy, v, g, lora_b, h)
  -> (dpre, Σ_T dy ⊙ v, t, hᵀ·dpre)`` also takes ``t`` and ``db / s`` in that
  pass (:func:`dora_jax.kernels.scale_reduce.scale_reduce_lowrank`), used when
  ``t``, ``db`` and ``dm`` are all wanted. ``recompute_flagged`` is passed to
  :func:`magnitude_grad` (output-as-residual only).
  """
  cdt = dy.dtype
  acc = g.dtype
  need_t = wants.x or wants.lora_a or wants.scale
  need_dpre = need_t or wants.lora_b or wants.kernel
  dy_pre = dy_y = t = hd = None
  residual = pre if pre is not None else y
  if (scale_reduce_lowrank is not None and need_t and wants.lora_b and wants.magnitude
      and residual is not None):
    dpre, dy_v, t, hd = scale_reduce_lowrank(dy, residual, g, lora_b, h)
    dy_pre, dy_y = (dy_v, None) if pre is not None else (None, dy_v)
  elif scale_reduce is not None and need_dpre and wants.magnitude and pre is not None:
    dpre, dy_pre = scale_reduce(dy, pre, g)
  elif scale_reduce is not None and need_dpre and wants.magnitude and y is not None:
    dpre, dy_y = scale_reduce(dy, y, g)
  else:
    dpre = (dy.astype(acc) * g).astype(cdt) if need_dpre else None
  if t is None and need_t:
    t = _dot_nt(dpre, lora_b.astype(cdt), acc)  # [T, r]

  dx = da = db = dkernel = None
  if wants.x and dx_matmul is not None:
    dx = dx_matmul(dpre, (scale * t).astype(cdt))
  elif wants.x:
    dx_base = _dot_nt(dpre, kernel.astype(cdt))
    dx_lora = _dot_nt(t.astype(cdt), lora_a.astype(cdt))
    dx = (dx_base.astype(acc) + scale * dx_lora.astype(acc)).astype(cdt)
  if wants.lora_a:
    da = scale * _dot_t(x2, t.astype(cdt), acc)
  if wants.lora_b:
    db = scale * (hd if hd is not None else _dot_t(h, dpre, acc))
  dm, ds, dbias = vector_grads(x2, kernel, lora_b, h, pre, y, g, inv_norm, scale, dy, t, wants,
                               dy_pre=dy_pre, dy_y=dy_y, recompute_flagged=recompute_flagged)
  if wants.kernel:
    dkernel = _dot_t(x2, dpre, acc)
  return Grads(dx, dkernel, da, db, dm, ds, dbias)


def vector_grads(x2, kernel, lora_b, h, pre, y, g, inv_norm, scale, dy, t, wants: Wants, *,
                 dy_pre=None, dy_y=None, recompute_flagged=None):
  """``(dm, ds, dbias)`` (``None`` where not wanted): the reductions of the backward.

  ``t = dpre·bᵀ [T, r]`` (float32) is needed only for ``ds``; ``dy_pre`` /
  ``dy_y``, when given, are ``Σ_T dy ⊙ pre`` / ``Σ_T dy ⊙ y`` already reduced;
  ``recompute_flagged`` see :func:`magnitude_grad`.
  """
  acc = g.dtype
  dm = ds = dbias = None
  if wants.magnitude and dy_pre is not None:
    dm = dy_pre * inv_norm
  elif wants.magnitude:
    dm = magnitude_grad(dy, pre, y, g, inv_norm,
                        lambda: _dy_dot_pre(dy, x2, kernel, lora_b, h, scale, acc),
                        dy_y=dy_y, recompute_flagged=recompute_flagged)
  if wants.scale:
    ds = jnp.sum(h.astype(acc) * t)
  if wants.bias:
    dbias = jnp.sum(dy.astype(acc), axis=0)
  return dm, ds, dbias

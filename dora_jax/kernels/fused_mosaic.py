"""The ``"mosaic"`` backend of :func:`dora_jax.dora_dense`: Hopper GEMMs with the scale folded in.

Same signatures and semantics as :func:`dora_jax.compose.forward_xla` and
:func:`dora_jax.compose.backward_xla`. Shapes::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: one kernel (:func:`scaled_matmul`) computes ``g ⊙ (x·W + h·(s·b))``.
For ranks it can fuse (:func:`fusable_rank`: multiples of 16 up to 32) the
LoRA factors' tiles join the accumulator with one more wgmma, so the whole
DoRA composition costs one GEMM, and the epilogue also stores ``pre`` (the
accumulator before ``g``) when the backward needs it. Other ranks hand the
low-rank product ``h·(s·b)`` (cuBLAS) to the same kernel as its ``addend``:
its tile is fetched during the main loop and summed into the accumulator
before ``g``, so there is no sum pass; where they must also write ``pre``, XLA's
forward runs instead (it writes fewer ``[T, d_out]`` arrays than the kernel's
pair of outputs plus a sum).

The backward is XLA's (:func:`dora_jax.compose.backward_xla`) with three
kernels plugged in: ``dpre = dy ⊙ g`` and the magnitude's ``Σ_T dy ⊙ v`` from
one pass over ``dy`` and the residual ``v``
(:func:`dora_jax.kernels.scale_reduce.scale_reduce`, Pallas/Triton), where XLA
makes two; ``dx = dpre·Wᵀ + (s·t)·aᵀ`` as one Mosaic GEMM (``W`` read
transposed; the LoRA term fused for fusable ranks, else its product as the
addend), where XLA needs cuBLAS, a low-rank GEMM and an add pass; and, with the
output ``y`` as the ``dm`` residual (bias-free layers,
:attr:`~dora_jax.backend.KernelOptions.mosaic_residual`), ``Σ_T dy ⊙ pre`` for
zero-magnitude columns from :mod:`dora_jax.kernels.flagged_columns` (``pre``
recomputed only in the column tiles that need it, decided on the device,
instead of a host-synchronising ``lax.cond``).

Interpret mode runs the branches the GPU runs at ranks the kernel cannot fuse
(Mosaic GPU's interpreter cannot run the fused low-rank term), at every rank.
Rounding differs from the XLA path only in where the activation dtype's
rounding falls (``s·b`` is rounded once; ``dy ⊙ g`` is rounded per tile in
the kernel as XLA rounds ``dpre``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from dora_jax.backend import KernelOptions
from dora_jax.compose import Grads, Residuals, Wants, backward_xla, dot_nt, forward_xla, lora_hidden
from dora_jax.kernels._common import resolve_interpret
from dora_jax.kernels.flagged_columns import flagged_dy_dot_pre
from dora_jax.kernels.scale_reduce import scale_reduce, scale_reduce_reference
from dora_jax.kernels.scaled_matmul import (FORWARD_TILES, FUSED_TILES, fusable_rank,
                                            scaled_matmul, supported)


def shapes_supported(tokens: int, d_in: int, d_out: int) -> bool:
  """Whether the kernels tile ``T``, ``d_in``, ``d_out`` exactly."""
  return supported(tokens, d_out, d_in, FORWARD_TILES)


def _fused(rank: int, interpret: bool) -> bool:
  """Whether the kernel adds the LoRA term itself (the GPU at fusable ranks)."""
  return fusable_rank(rank) and not interpret


def forward_mosaic(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True,
                   options: KernelOptions = KernelOptions()):
  """Return ``(y, pre, h)`` like :func:`dora_jax.compose.forward_xla`.

  With a fusable rank one kernel computes ``y`` and, when ``want_pre``, also
  stores ``pre`` (its accumulator before ``g``). Other ranks: the kernel with
  the low-rank product ``h·(s·b)`` as its addend; XLA's forward when
  ``want_pre``.
  """
  cdt = x2.dtype
  acc = g.dtype
  interpret = resolve_interpret(options.interpret)
  fused = _fused(lora_a.shape[1], interpret)
  if want_pre and not fused:
    return forward_xla(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre=True)
  h = lora_hidden(x2, lora_a)
  sb = (scale * lora_b.astype(acc)).astype(cdt)
  pre = None
  if fused:  # g ⊙ (x·W + h·(s·b)) in one kernel: the LoRA term joins the accumulator
    y = scaled_matmul(x2, kernel.astype(cdt), g, (h, sb), with_unscaled=want_pre)
    if want_pre:
      y, pre = y
  else:  # the low-rank product (any rank) joins the GEMM's accumulator as its addend
    y = scaled_matmul(x2, kernel.astype(cdt), g, addend=jnp.dot(h, sb), interpret=interpret)
  if bias is not None:
    y = (y.astype(acc) + bias.astype(acc)).astype(cdt)
  return y, pre, h


def dx_variant(tokens: int, d_in: int, d_out: int, rank: int,
               options: KernelOptions = KernelOptions()) -> str | None:
  """How the backward computes ``dx``: ``"fused"`` (one Mosaic GEMM with the LoRA
  term in-kernel), ``"addend"`` (the GEMM with ``(s·t)·aᵀ`` as its addend) or
  ``None`` (cuBLAS and XLA: :attr:`KernelOptions.mosaic_dx` off, or tiles that
  do not divide ``T``, ``d_in``, ``d_out``)."""
  if not options.mosaic_dx or not supported(tokens, d_in, d_out, FUSED_TILES):
    return None
  return "fused" if _fused(rank, resolve_interpret(options.interpret)) else "addend"


def _dx_matmul(variant, kernel, lora_a, cdt, interpret):
  """``dx_matmul(dpre, ts)`` for :func:`dora_jax.compose.backward_xla`."""
  ones = jnp.ones((kernel.shape[0],), jnp.float32)

  def dx_matmul(dpre, ts):
    if variant == "fused":
      return scaled_matmul(dpre, kernel.astype(cdt), ones, (ts, lora_a.T.astype(cdt)),
                           trans_w=True)
    return scaled_matmul(dpre, kernel.astype(cdt), ones, addend=dot_nt(ts, lora_a.astype(cdt)),
                         trans_w=True, interpret=interpret)

  return dx_matmul


def _scale_reduce(dy, v, g, *, max_width, interpret):
  """The one-pass kernel up to ``max_width`` columns, else XLA's (which fuses both there)."""
  if dy.shape[1] > max_width:
    return scale_reduce_reference(dy, v, g)
  return scale_reduce(dy, v, g, interpret=interpret)


def backward_mosaic(res: Residuals, dy, wants: Wants, *,
                    options: KernelOptions = KernelOptions()) -> Grads:
  """Cotangents of :func:`forward_mosaic`, like :func:`dora_jax.compose.backward_xla`."""
  interpret = resolve_interpret(options.interpret)
  x2, kernel, lora_a, lora_b = res.x2, res.kernel, res.lora_a, res.lora_b
  flagged = None
  if res.pre is None and res.y is not None:  # zero magnitudes: pre recomputed on the device
    hs = (res.scale * res.h.astype(res.scale.dtype)).astype(x2.dtype)
    flagged = functools.partial(flagged_dy_dot_pre, x2, kernel, hs, lora_b, dy,
                                interpret=interpret)
  variant = dx_variant(x2.shape[0], x2.shape[1], kernel.shape[1], lora_a.shape[1], options)
  dx = (None if not wants.x or variant is None
        else _dx_matmul(variant, kernel, lora_a, x2.dtype, interpret))
  return backward_xla(res, dy, wants, dx_matmul=dx, recompute_flagged=flagged,
                      scale_reduce=functools.partial(
                          _scale_reduce, max_width=options.scale_reduce_max_width,
                          interpret=interpret))


__all__ = ["backward_mosaic", "dx_variant", "forward_mosaic", "shapes_supported"]

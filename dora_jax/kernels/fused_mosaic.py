"""The ``"mosaic"`` backend of :func:`dora_jax.dora_dense`: Hopper GEMMs with the scale folded in.

Same signatures and semantics as :func:`dora_jax.compose.forward_xla` and
:func:`dora_jax.compose.backward_xla`. Shapes::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: one kernel (:func:`scaled_matmul`) computes ``g ⊙ (x·W + h·(s·b))``
for ranks it can fuse (:func:`fusable_rank`: multiples of 16 up to 32): the
LoRA factors' tiles join the accumulator with one more wgmma and ``g`` is
applied in the epilogue, so the whole DoRA composition costs one GEMM; the
epilogue also stores ``pre`` (the accumulator before ``g``) when the backward
needs it. Other ranks (and interpret mode, where the fused variant cannot run)
compute the low-rank product ``h·(s·b)`` apart (cuBLAS) and hand it to the
same kernel as its ``addend`` (:data:`ADDEND_KERNEL`): its tile is fetched
during the main loop and summed into the accumulator before ``g``, so there is
no sum pass (:func:`forward_mosaic` says what the training forward, which
needs ``pre``, does there).

The backward is XLA's (:func:`dora_jax.compose.backward_xla`) except for its
prologue: ``dpre = dy ⊙ g`` and the magnitude's ``Σ_T dy ⊙ pre`` come from one
pass over ``dy`` and ``pre`` (:func:`dora_jax.kernels.scale_reduce.scale_reduce`,
Pallas/Triton; :data:`SCALE_REDUCE_KERNEL`), where XLA makes two; and, for
fusable ranks, ``dx = dpre·Wᵀ + (s·t)·aᵀ`` is one Mosaic GEMM (:data:`DX_FUSED`:
``W`` read transposed, the LoRA term joining the accumulator as in the
forward), where XLA needs cuBLAS, a low-rank GEMM writing ``[T, d_in]`` and an
add pass; other ranks keep the low-rank GEMM but give its result to the Mosaic
GEMM as the addend, so the add pass goes. The output ``y`` is the ``dm`` residual here (no bias; see
``dora_jax.dense._OUTPUT_AS_RESIDUAL``): ``Σ_T dy ⊙ y`` comes from the same
one-pass kernel and zero-magnitude columns get ``Σ_T dy ⊙ pre`` from
:mod:`dora_jax.kernels.flagged_columns` (``pre`` recomputed only in the column
tiles that need it, decided on the device) instead of a host-synchronising
``lax.cond`` (:data:`FLAGGED_KERNEL`). The alternative that never forms
``dpre`` — ``dx = (dy ⊙ g)·Wᵀ`` as one GEMM scaling each ``dy`` tile in registers
(:func:`matmul_scaled_k`), ``t = dy·(b ⊙ g)ᵀ``, ``db = s·(hᵀ·dy) ⊙ g`` — is kept
behind :data:`DX_KERNEL` (off): on an H100 the register scaling slows the GEMM
more than the pass it saves (benchmarks/KERNELS.md, "Mosaic GPU").

Rounding differs from the XLA path only in where the activation dtype's
rounding falls (``s·b⊙g`` is rounded once; ``dy ⊙ g`` is rounded per tile in
the kernel as XLA rounds ``dpre``).
"""

from __future__ import annotations

import functools

import jax.numpy as jnp

from dora_jax.compose import (Grads, Wants, _dot_nt, _dot_t, backward_xla, forward_xla,
                              lora_hidden, vector_grads)
from dora_jax.kernels._common import default_interpret
from dora_jax.kernels.scaled_matmul import (BACKWARD_TILES, FORWARD_TILES, FUSED_TILES,
                                            fusable_rank, matmul_scaled_k, scaled_matmul,
                                            supported)


def shapes_supported(tokens: int, d_in: int, d_out: int) -> bool:
  """Whether the kernels in use tile ``T``, ``d_in``, ``d_out`` exactly."""
  return (supported(tokens, d_out, d_in, FORWARD_TILES)
          and (not DX_KERNEL or supported(tokens, d_in, d_out, BACKWARD_TILES)))


def _scaled_b(lora_b, g, scale, cdt):
  """``s·b ⊙ g [r, d_out]`` in float32 and rounded to ``cdt``."""
  return (scale * lora_b.astype(g.dtype) * g).astype(cdt)


def forward_mosaic(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True):
  """Return ``(y, pre, h)`` like :func:`dora_jax.compose.forward_xla`.

  With a fusable rank one kernel computes ``y`` and, when ``want_pre``, also
  stores ``pre`` (its accumulator before ``g``). Other ranks: the kernel with
  the low-rank product ``h·(s·b)`` as its addend (where the tiles divide the
  shape; else the base GEMM with ``g`` in its epilogue plus XLA's low-rank
  product and sum). A ``want_pre`` forward at those ranks is XLA's own on the
  GPU (it writes fewer ``[T, d_out]`` arrays than the kernel's two outputs
  plus a sum), and in interpret mode the kernel's ``(x·W ⊙ g, x·W)`` pair
  with XLA's sums (so that the CPU tests run the kernel).
  """
  cdt = x2.dtype
  acc = g.dtype
  interpret = default_interpret()
  fused = (fusable_rank(lora_a.shape[1]) and not interpret
           and supported(x2.shape[0], kernel.shape[1], x2.shape[1], FUSED_TILES))
  if want_pre and not fused and not interpret:
    return forward_xla(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre=True)
  h = lora_hidden(x2, lora_a)
  pre = None
  if fused:
    # g ⊙ (x·W + h·(s·b)) in one kernel: the LoRA term joins the accumulator
    sb = (scale * lora_b.astype(acc)).astype(cdt)
    y = scaled_matmul(x2, kernel.astype(cdt), g, (h, sb), with_unscaled=want_pre)
    if want_pre:
      y, pre = y
  elif want_pre:
    base_g, base = scaled_matmul(x2, kernel.astype(cdt), g, with_unscaled=True,
                                 interpret=interpret)
    lora = scale * jnp.dot(h, lora_b.astype(cdt), preferred_element_type=acc)
    pre = (base.astype(acc) + lora).astype(cdt)
    y = (base_g.astype(acc) + lora * g).astype(cdt)
  elif ADDEND_KERNEL and supported(x2.shape[0], kernel.shape[1], x2.shape[1], FUSED_TILES):
    # g ⊙ (x·W + h·(s·b)): the low-rank product (any rank) joins the GEMM's accumulator
    lora = jnp.dot(h, (scale * lora_b.astype(acc)).astype(cdt))
    y = scaled_matmul(x2, kernel.astype(cdt), g, addend=lora, interpret=interpret)
  else:
    base = scaled_matmul(x2, kernel.astype(cdt), g, interpret=interpret)
    y = jnp.dot(h, _scaled_b(lora_b, g, scale, cdt)) + base
  if bias is not None:
    y = (y.astype(acc) + bias.astype(acc)).astype(cdt)
  return y, pre, h


def forward_mosaic_y(x2, kernel, lora_a, lora_b, g, scale, bias):
  """``y`` only: the forward when nothing is differentiated."""
  return forward_mosaic(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre=False)[0]


#: Whether the backward uses :func:`matmul_scaled_k` for ``dx`` (read at trace time).
DX_KERNEL = False

#: Whether the backward computes ``dpre = dy ⊙ g`` and ``Σ_T dy ⊙ pre`` in one
#: pass (:func:`dora_jax.kernels.scale_reduce.scale_reduce`; read at trace time).
SCALE_REDUCE_KERNEL = True


#: Widest ``d_out`` given to the one-pass kernel. Measured alone (H200, T =
#: 4096, benchmarks/scale_reduce.py, default tiling): kernel 31 µs vs XLA's
#: 83 µs at d_out = 4096 (XLA makes two passes there), 95 vs 111 µs at 14336,
#: 189 vs 173 µs at 28672 (XLA fuses both into one pass itself at these widths,
#: also inside the H100 training step). Between 8192 and 28672 the limit is
#: not tuned: 14336 may gain from the kernel, unmeasured inside a step.
SCALE_REDUCE_MAX_WIDTH = 8192


#: Whether the one-pass backward prologue also takes ``t = dpre·bᵀ`` and
#: ``hᵀ·dpre`` (:func:`dora_jax.kernels.scale_reduce.scale_reduce_lowrank`),
#: for ranks up to :data:`LOWRANK_PROLOGUE_MAX_RANK`, instead of two more
#: passes over ``dpre`` in XLA's GEMMs. Off: on an H100 (commit 6f036d1, r = 16,
#: ``benchmarks/step_profile.py``) the kernel took 356 µs at 4096×14336 where
#: XLA's pass and two GEMMs take 112 + 48 + 42, and 69 µs at 4096×4096 against
#: 33 + 12 + 12 (its 16-row tile products and partial stores are slow); steps
#: 1.828 vs 1.704 ms and 0.562 vs 0.546 ms. Its best tiling since
#: (``scale_reduce.LOWRANK_CONFIG``), alone: 58 / 240 / 368 µs at d_out =
#: 4096 / 14336 / 28672 against XLA's 110 / 228 / 407 alone, but XLA's take
#: about 57 / 202 µs inside the step: no clear gain. Read at trace time.
LOWRANK_PROLOGUE = False
LOWRANK_PROLOGUE_MAX_RANK = 32


def _scale_reduce_lowrank(dy, v, g, lora_b, h):
  from dora_jax.kernels.scale_reduce import scale_reduce_lowrank  # noqa: PLC0415
  return scale_reduce_lowrank(dy, v, g, lora_b, h, interpret=default_interpret())


def _scale_reduce(dy, pre, g):
  """The one-pass kernel where it beats XLA, else XLA's (fused by XLA there)."""
  from dora_jax.kernels.scale_reduce import scale_reduce, scale_reduce_reference  # noqa: PLC0415
  interpret = default_interpret()
  if dy.shape[1] > SCALE_REDUCE_MAX_WIDTH and not interpret:
    return scale_reduce_reference(dy, pre, g)
  return scale_reduce(dy, pre, g, interpret=interpret)


#: Whether, with the output as the ``dm`` residual (``dense._OUTPUT_AS_RESIDUAL``),
#: zero-magnitude columns get ``Σ_T dy ⊙ pre`` from a kernel that recomputes
#: ``pre`` only in the column tiles holding one, decided on the device
#: (:mod:`dora_jax.kernels.flagged_columns`), instead of XLA's ``lax.cond``,
#: whose host-read predicate stalls the stream. Read at trace time.
FLAGGED_KERNEL = True


def _flagged(x2, kernel, hs, lora_b, dy, tiny):
  from dora_jax.kernels.flagged_columns import flagged_dy_dot_pre  # noqa: PLC0415
  return flagged_dy_dot_pre(x2, kernel, hs, lora_b, dy, tiny, interpret=default_interpret())


#: Whether the backward computes ``dx = dpre·Wᵀ + (s·t)·aᵀ`` as one Mosaic GEMM
#: (``W`` read transposed, the LoRA term fused as in the forward) where the
#: rank is fusable and the tiles divide ``T``, ``d_in``, ``d_out``; otherwise
#: (and when off) cuBLAS's ``dpre·Wᵀ``, XLA's ``t·aᵀ`` and an add pass.
DX_FUSED = True


#: Whether, for ranks the kernel cannot fuse (and in interpret mode, where the
#: fused low-rank variant cannot run), the low-rank product computed apart
#: (``h·(s·b)`` in the forward, ``(s·t)·aᵀ`` for ``dx``) joins the Mosaic GEMM
#: as its ``addend``, instead of an XLA sum pass over ``[T, d_out]`` /
#: ``[T, d_in]``. Read at trace time.
ADDEND_KERNEL = True


def _dx_fused(x2, kernel, lora_a):
  """``dx_matmul`` for :func:`dora_jax.compose.backward_xla`, or ``None`` for XLA's:
  the fused low-rank GEMM for fusable ranks on the GPU, else the GEMM with the
  low-rank product as its addend (:data:`ADDEND_KERNEL`)."""
  tokens, d_in = x2.shape
  if not DX_FUSED or not supported(tokens, d_in, kernel.shape[1], FUSED_TILES):
    return None
  cdt = x2.dtype
  interpret = default_interpret()
  ones = jnp.ones((d_in,), jnp.float32)
  if fusable_rank(lora_a.shape[1]) and not interpret:
    def dx_matmul(dpre, ts):
      return scaled_matmul(dpre, kernel.astype(cdt), ones, (ts, lora_a.T.astype(cdt)),
                           trans_w=True)
    return dx_matmul
  if ADDEND_KERNEL:
    def dx_addend(dpre, ts):
      return scaled_matmul(dpre, kernel.astype(cdt), ones, addend=_dot_nt(ts, lora_a.astype(cdt)),
                           trans_w=True, interpret=interpret)
    return dx_addend
  return None


def backward_mosaic(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy,
                    wants: Wants, *, y=None) -> Grads:
  """Cotangents of :func:`forward_mosaic`, like :func:`dora_jax.compose.backward_xla`."""
  if not DX_KERNEL:
    flagged = None
    if pre is None and y is not None and FLAGGED_KERNEL:
      flagged = functools.partial(_flagged, x2, kernel, (scale * h.astype(scale.dtype)).astype(
          x2.dtype), lora_b, dy)
    lowrank = (_scale_reduce_lowrank if SCALE_REDUCE_KERNEL and LOWRANK_PROLOGUE
               and lora_b.shape[0] <= LOWRANK_PROLOGUE_MAX_RANK else None)
    return backward_xla(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy, wants, y=y,
                        dx_matmul=_dx_fused(x2, kernel, lora_a) if wants.x else None,
                        scale_reduce=_scale_reduce if SCALE_REDUCE_KERNEL else None,
                        scale_reduce_lowrank=lowrank, recompute_flagged=flagged)
  cdt = dy.dtype
  acc = g.dtype
  need_t = wants.x or wants.lora_a or wants.scale
  t = _dot_nt(dy, (lora_b.astype(acc) * g).astype(cdt), acc) if need_t else None  # [T, r]

  dx = da = db = dkernel = None
  if wants.x:
    dx_base = matmul_scaled_k(dy, kernel.astype(cdt), g, interpret=default_interpret())
    dx = _dot_nt((scale * t).astype(cdt), lora_a.astype(cdt)) + dx_base  # cuBLAS addend
  if wants.lora_a:
    da = scale * _dot_t(x2, t.astype(cdt), acc)
  if wants.lora_b:
    db = scale * _dot_t(h, dy, acc) * g
  dm, ds, dbias = vector_grads(x2, kernel, lora_b, h, pre, y, g, inv_norm, scale, dy, t, wants)
  if wants.kernel:
    dkernel = _dot_t(x2, (dy.astype(acc) * g).astype(cdt), acc)
  return Grads(dx, dkernel, da, db, dm, ds, dbias)


__all__ = ["ADDEND_KERNEL", "DX_FUSED", "LOWRANK_PROLOGUE", "DX_KERNEL", "FLAGGED_KERNEL", "SCALE_REDUCE_KERNEL", "backward_mosaic", "forward_mosaic", "forward_mosaic_y", "shapes_supported"]

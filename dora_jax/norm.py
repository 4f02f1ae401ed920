"""The DoRA weight norm through its factored form.

For ``kernel W [d_in, d_out]``, ``lora_a a [d_in, r]``, ``lora_b b [r, d_out]``
and scale ``s``, the per-output-column squared norm of ``W + s·a·b`` is::

  ‖W_j‖²  +  2s · Σ_k b_kj (aᵀW)_kj  +  s² · Σ_k b_kj (G·b)_kj ,   G = aᵀa [r, r]
   base         cross, U = aᵀW [r, d_out]        Gram

so the only intermediates are ``U [r, d_out]``, ``G [r, r]`` and ``G·b [r, d_out]``:
the dense ``[d_in, d_out]`` product ``a·b`` is never formed. Everything is
accumulated in float32 (float64 when an input is float64).

Two numerical hazards of that sum are handled per column:

* Cancellation. Where the update nearly cancels its column
  (``W_j ≈ −s(ab)_j``) the three terms are each about ``‖W_j‖²`` while their
  sum is far smaller, and the sum keeps only the terms' absolute rounding
  error (at ``‖W+s·a·b‖/‖W‖ = 10⁻³`` about one correct digit is left in
  float32). Each column's sum is compared with the sum of its summands'
  magnitudes (:func:`cancelled_columns`); the flagged columns, rare in
  practice, are recomputed from ``W_j + s(ab)_j`` itself
  (:func:`refine_cancelled`, or on a GPU the Pallas kernel
  :mod:`dora_jax.kernels.cancelled_columns`), without a host round trip.
* Overflow. ``s²·‖ab‖²`` leaves float32 long before the norm does (from
  ``|s| ≈ 10¹⁹``). Columns whose terms could overflow are evaluated divided
  by a per-column ``c_j²`` and the norm multiplied back by ``c_j``; every
  other column runs the plain formula, bit for bit (``c_j = 1``).
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import custom_vjp_primal_tree_values

from dora_jax._checks import accumulation_dtype, check_float, check_scale, check_weights
from dora_jax.kernels import dispatch

#: Bound, in bytes, on the float32 ``[r, chunk]`` intermediates of one chunk of
#: :func:`factored_norm` when ``chunk_size`` is left at ``None``. Layers whose
#: ``3·r·d_out·4`` bytes fit under it are done in one piece.
NORM_CHUNK_BYTES = 256 * 2**20

#: Floor applied to the norm before dividing by it (``g = m / max(n, NORM_EPS)``),
#: so a dead column (``W_j + s(ab)_j = 0``) gives a finite scale instead of inf/NaN.
NORM_EPS = 1e-12

#: A column counts as cancelled when its squared norm from the three terms is
#: below this fraction of the sum of its summands' magnitudes (``bound``).
#: The sum's rounding error is about ``γ·bound``; γ measured on the CPU ranges
#: from about 3·2⁻²⁴ (rank ≥ 3) to 21·2⁻²⁴ (rank 1, d_in = 2048, where a
#: vector-matrix product accumulates sequentially) and grows like √d_in. An
#: unflagged column's relative error is at most ``γ / (2·CANCEL_RATIO)``: about
#: 2e-5 at the worst γ measured, 1e-4 at γ ≈ 100·2⁻²⁴. An update that cancels
#: its column (``s·‖ab_j‖ ≈ ‖W_j‖``, opposite directions) is flagged from
#: ``‖W_j + s(ab)_j‖ ≈ 0.35·‖W_j‖`` down; ordinary fine-tuning
#: (``s·‖ab_j‖ ≪ ‖W_j‖``) never comes near.
CANCEL_RATIO = 2.0**-5

#: Columns recomputed per round by :func:`refine_cancelled` (a static size:
#: each round gathers ``[d_in, REFINE_COLUMNS]`` of ``W`` and ``[r, REFINE_COLUMNS]``
#: of ``b``).
REFINE_COLUMNS = 16

#: Name scope of the refinement's work (its loop or kernel), which runs only for
#: cancelled columns: it labels the refinement in profiles and compiled programs,
#: and lets program inspections tell it from the norm's passes.
REFINE_SCOPE = "refine_cancelled"

#: How :func:`factored_norm` refines cancelled columns (``refine=``).
REFINE_MODES = ("auto", "columns", "kernel", "off")

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def column_sq_norm(kernel: jax.Array) -> jax.Array:
  """``‖kernel[:, j]‖²`` for each output column, ``[d_in, d_out] -> [d_out]``.

  Depends only on the frozen kernel, so callers may compute it once and pass it
  to :func:`factored_norm` as ``base_sq_norm``. Accumulates in float32 (float64
  for a float64 kernel).
  """
  if jnp.ndim(kernel) != 2:
    raise ValueError(f"kernel must be a 2-D array [d_in, d_out], got shape {jnp.shape(kernel)}")
  check_float("kernel", kernel)
  acc = accumulation_dtype(kernel)
  return jnp.sum(jnp.square(kernel.astype(acc)), axis=0)


def _split_bf16(value: jax.Array, pieces: int, axis: int = 0) -> jax.Array:
  """``value`` (float32/64) as ``pieces`` bf16 terms whose sum is ``value`` to
  ~8·pieces mantissa bits, concatenated along ``axis`` (high part first)."""
  terms, rest = [], value
  for _ in range(pieces):
    # reduce_precision, not a bf16 round trip: XLA's GPU compiler may drop a
    # convert pair under its default excess-precision rule, which would leave
    # rest = 0 and keep only the high part (float32 accuracy lost)
    high = lax.reduce_precision(rest, exponent_bits=8, mantissa_bits=7)
    terms.append(high.astype(jnp.bfloat16))  # exact: high is a bf16 value
    rest = rest - high
  return jnp.concatenate(terms, axis=axis)


def _cross(lora_a: jax.Array, kernel: jax.Array, acc) -> jax.Array:
  """``U = aᵀW [r, d_out]`` in ``acc`` precision at the fastest exact route.

  bf16 operands with fp32 accumulation are exact products, so a bf16 kernel
  with a bf16 ``lora_a`` runs on tensor cores. A float32 ``lora_a`` against a
  bf16 kernel is split into ``a_hi + a_lo`` (two bf16 terms, ~16 mantissa bits)
  instead of upcasting the whole kernel to float32.
  """
  k_dtype, a_dtype = kernel.dtype, lora_a.dtype
  # rank 1 makes this a vector-matrix product, which XLA's GPU compiler may
  # rewrite as a multiply and reduce in the operands' dtype: upcast first
  if k_dtype == jnp.bfloat16 and acc == jnp.float32 and (
      (a_dtype == k_dtype and lora_a.shape[1] > 1) or a_dtype == jnp.float32):
    return _cross_bf16(lora_a, kernel)
  if k_dtype in _HALF and a_dtype == k_dtype and lora_a.shape[1] > 1:
    return lax.dot_general(lora_a, kernel, _CONTRACT_ROWS, preferred_element_type=acc)
  if k_dtype == jnp.bfloat16 and a_dtype in (jnp.float32, jnp.float64):
    return _cross_split(lora_a, kernel, acc)
  return lax.dot_general(
      lora_a.astype(acc), kernel.astype(acc), _CONTRACT_ROWS,
      precision=lax.Precision.HIGHEST, preferred_element_type=acc)


_CONTRACT_ROWS = (((0,), (0,)), ((), ()))


def _halves_summed(value: jax.Array, rank: int, axis: int) -> jax.Array:
  """``value[..., :rank, ...] + value[..., rank:2·rank, ...]`` along ``axis``: the
  two bf16 terms of a split operand, their products summed in float32."""
  return (lax.slice_in_dim(value, 0, rank, axis=axis)
          + lax.slice_in_dim(value, rank, 2 * rank, axis=axis))


def _cross_split(lora_a, kernel, acc):
  """``aᵀW`` for a bf16 kernel and a float32/64 ``a``: ``a`` split into
  ``a_hi + a_lo`` ``[d_in, 2r]``, one bf16 pass over ``W``."""
  u = lax.dot_general(_split_bf16(lora_a, 2, axis=1), kernel, _CONTRACT_ROWS,
                      preferred_element_type=acc)
  return _halves_summed(u, lora_a.shape[1], 0)


def _bf16_cross(forward: Callable, da_of: Callable, dk_of: Callable) -> Callable:
  """``U = forward(a, W)`` with its transpose given: ``∂a = da_of(W, ∂U)`` and,
  only when the kernel is differentiated, ``∂W = dk_of(a, ∂U)`` (``∂U``
  float32; results cast to the operands' dtypes). For the bf16 routes of
  ``aᵀW``: there ``da_of`` splits ``∂U`` into bf16 terms, where autodiff would
  multiply it by ``W`` upcast to float32 (a float32 GEMM of ``r·d_in·d_out``)
  and, for a float32 ``a``, round its cotangent through the bf16 split."""

  @jax.custom_vjp
  def cross(lora_a, kernel):
    return forward(lora_a, kernel)

  def fwd(lora_a, kernel):
    wants_kernel = kernel.perturbed
    lora_a, kernel = custom_vjp_primal_tree_values((lora_a, kernel))
    return forward(lora_a, kernel), (lora_a, kernel, wants_kernel)

  def bwd(res, du):
    lora_a, kernel, wants_kernel = res
    du = du.astype(jnp.float32)
    # a frozen kernel's cotangent is not asked for in training
    dk = dk_of(lora_a, du).astype(kernel.dtype) if wants_kernel else None
    return da_of(kernel, du).astype(lora_a.dtype), dk

  cross.defvjp(fwd, bwd, symbolic_zeros=True)
  return cross


def _cross_bf16_forward(lora_a, kernel):
  if lora_a.dtype == jnp.float32:
    return _cross_split(lora_a, kernel, jnp.float32)
  return lax.dot_general(lora_a, kernel, _CONTRACT_ROWS, preferred_element_type=jnp.float32)


def _cross_bf16_da(kernel, du):
  # ∂a = W·∂Uᵀ: [d_in, d_out] · [d_out, 2r] in bf16, the two halves summed in float32
  da2 = lax.dot_general(kernel, _split_bf16(du, 2, axis=0), (((1,), (1,)), ((), ())),
                        preferred_element_type=jnp.float32)
  return _halves_summed(da2, du.shape[0], 1)


def _cross_bf16_dk(lora_a, du):
  return lax.dot_general(lora_a.astype(jnp.float32), du, (((1,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


#: ``U = aᵀW`` (float32) for a bf16 kernel, ``a`` bf16 or float32, its transpose
#: one bf16 GEMM of ``2r`` columns (``∂U`` split in two bf16 terms, ~16 bits).
_cross_bf16 = _bf16_cross(_cross_bf16_forward, _cross_bf16_da, _cross_bf16_dk)


def gram(lora_a: jax.Array) -> jax.Array:
  """``G = aᵀa [r, r]``, accumulated in float32 (float64 for float64 input)."""
  acc = accumulation_dtype(lora_a)
  if lora_a.dtype == jnp.bfloat16 and lora_a.shape[1] > 1:
    return _gram_bf16(lora_a)
  # rank 1 is a dot of vectors (see _cross): upcast so no product rounds to bf16
  a = lora_a if lora_a.dtype in _HALF and lora_a.shape[1] > 1 else lora_a.astype(acc)
  return lax.dot_general(a, a, _CONTRACT_ROWS, precision=lax.Precision.HIGHEST,
                         preferred_element_type=acc)


@jax.custom_vjp
def _gram_bf16(lora_a):
  """``aᵀa`` float32 for a bf16 ``a`` (``r > 1``), whose transpose
  ``∂a = a·(∂G + ∂Gᵀ)`` runs as one bf16 product with ``∂G + ∂Gᵀ`` split in
  two bf16 terms, not as a float32 one (autodiff's: ``a`` upcast)."""
  return lax.dot_general(lora_a, lora_a, _CONTRACT_ROWS, preferred_element_type=jnp.float32)


def _gram_bf16_fwd(lora_a):
  return _gram_bf16(lora_a), lora_a


def _gram_bf16_bwd(lora_a, dg):
  sym = dg.astype(jnp.float32) + dg.astype(jnp.float32).T
  da2 = jnp.dot(lora_a, _split_bf16(sym, 2, axis=1), preferred_element_type=jnp.float32)
  return (_halves_summed(da2, lora_a.shape[1], 1).astype(lora_a.dtype),)


_gram_bf16.defvjp(_gram_bf16_fwd, _gram_bf16_bwd)


def _gram_times_b(g, lora_b, acc):
  """``G·b [r, d_out]`` in ``acc`` precision.

  With a bf16 ``lora_b`` (exact in bf16), ``G`` is split into three bf16 terms
  and the product runs as one bf16 tensor-core matmul with float32
  accumulation: ~24 mantissa bits, several times faster on GPUs than a float32
  matmul at full precision, which dominates the norm's cost at high rank.
  Rank 1 (a vector product, see :func:`_cross`) runs in float32.
  """
  if lora_b.dtype == jnp.bfloat16 and acc == jnp.float32 and lora_b.shape[0] > 1:
    return _gram_times_b_bf16(g.astype(jnp.float32), lora_b)
  return jnp.dot(g, lora_b.astype(acc), precision=lax.Precision.HIGHEST,
                 preferred_element_type=acc)


@jax.custom_vjp
def _gram_times_b_bf16(g, lora_b):
  """``G·b`` float32 for a bf16 ``b``: ``[G_hi | G_mid | G_lo] [r, 3r] · [b; b; b]
  [3r, d_out]``, the three products summed in the one float32 accumulator (no
  ``[3r, d_out]`` intermediate). Its transpose runs on bf16 products too:
  ``∂G = ∂Y·bᵀ`` with ``∂Y`` split in two, ``∂b = Gᵀ·∂Y`` as the five largest
  of the six products of ``G``'s three terms and ``∂Y``'s two (the sixth is
  below 2⁻³² relative); autodiff's are float32 GEMMs (``b`` upcast)."""
  stacked_b = jnp.concatenate([lora_b] * 3, axis=0)
  return jnp.dot(_split_bf16(g, 3, axis=1), stacked_b, preferred_element_type=jnp.float32)


def _gram_times_b_bf16_fwd(g, lora_b):
  return _gram_times_b_bf16(g, lora_b), (g, lora_b)


def _gram_times_b_bf16_bwd(res, dy):
  g, lora_b = res
  rank = g.shape[0]
  dy2 = _split_bf16(dy.astype(jnp.float32), 2, axis=0)  # [dY_hi; dY_lo]  [2r, d_out]
  dg2 = lax.dot_general(dy2, lora_b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dg = _halves_summed(dg2, rank, 0)
  g1, g2, g3 = jnp.split(_split_bf16(g.T, 3, axis=1), 3, axis=1)  # Gᵀ's terms, [r, r] each
  lhs = jnp.concatenate([g1, g2, g3, g1, g2], axis=1)           # [r, 5r]
  hi, lo = dy2[:rank], dy2[rank:]
  rhs = jnp.concatenate([hi, hi, hi, lo, lo], axis=0)            # [5r, d_out]
  db = jnp.dot(lhs, rhs, preferred_element_type=jnp.float32)
  return dg.astype(g.dtype), db.astype(lora_b.dtype)


_gram_times_b_bf16.defvjp(_gram_times_b_bf16_fwd, _gram_times_b_bf16_bwd)


def _norm_terms(kernel, lora_a, lora_b, g, base_sq, acc):
  """The factored norm's sums for a block of columns, stacked ``[5, n]``:
  ``‖W_j‖²``, ``X_j = Σ_k b_kj U_kj``, ``Y_j = Σ_k b_kj (G·b)_kj`` and the
  summands' magnitudes ``Σ_k |b_kj U_kj|``, ``Σ_k |b_kj (G·b)_kj|``.

  The four sums over ``r`` read ``U``, ``G·b`` and ``b`` once (one fusion).
  The scale enters later (:func:`_combine`), so no sum here can overflow on
  its account.
  """
  u = _cross(lora_a, kernel, acc)
  gb = _gram_times_b(g, lora_b, acc)
  if base_sq is None:
    base_sq = column_sq_norm(kernel)
  b = lora_b.astype(acc)
  bu, bgb = b * u, b * gb
  return jnp.stack([base_sq.astype(acc), jnp.sum(bu, axis=0), jnp.sum(bgb, axis=0),
                    jnp.sum(jnp.abs(bu), axis=0), jnp.sum(jnp.abs(bgb), axis=0)])


class _Combined(NamedTuple):
  """Per-column ``[n]`` results of :func:`_combine` (``c`` and ``t`` as the
  refinement needs them)."""

  sq: jax.Array     # ‖W_j + s(ab)_j‖² / c_j², the sum of the three terms
  bound: jax.Array  # the summands' magnitudes, same units
  c: jax.Array      # the column's scale: 1 where the plain formula cannot overflow
  t: jax.Array      # s / c_j


def _overflow_limit(acc) -> float:
  """Largest magnitude a summand may have for the plain sum of four of them to
  stay finite in ``acc``."""
  return float(jnp.finfo(acc).max) / 16


def _combine(terms, scale, limit: float) -> _Combined:
  """``sq``, ``bound``, ``c`` and ``t`` from the stacked terms of :func:`_norm_terms`.

  ``sq = ‖W‖²/c² + 2(s/c)·X/c + (s/c)²·Y`` with ``c = 1`` wherever every
  summand is at most ``limit`` (overflowed products compare as inf, so they
  fail the test): there the arithmetic is the plain
  ``‖W‖² + 2s·X + s·(s·Y)`` bit for bit (division by 1 is exact). Elsewhere
  ``c`` is the square root of the largest summand magnitude (``‖W‖²``,
  ``2|s|·Σ|bU|``, ``s²·Σ|b·Gb|``, each formed without overflow), which
  brings every scaled summand to at most 1: the norm ``c·√sq`` stays finite
  whenever it fits the dtype and ``‖W_j‖²`` itself does. A summand scaled
  below the smallest normal number is then under 2⁻¹²⁶ of the largest,
  negligible.
  """
  base, x, y, x_abs, y_abs = terms
  s_abs = jnp.abs(scale)
  plain = ((base <= limit) & (2.0 * s_abs * x_abs <= limit)
           & (s_abs * (s_abs * y_abs) <= limit))
  largest = jnp.maximum(jnp.maximum(jnp.sqrt(base), s_abs * jnp.sqrt(y_abs)),
                        jnp.sqrt(2.0 * s_abs) * jnp.sqrt(x_abs))
  # c only rescales (c·√sq is the norm for any c > 0): a constant in the backward, which
  # also keeps the unused branch's √0 (b = 0, PEFT's init) out of the gradient
  c = lax.stop_gradient(jnp.where(plain, 1.0, jnp.maximum(largest, 1.0)).astype(base.dtype))
  t = scale / c
  t_abs = jnp.abs(t)
  base_c = base / c / c
  sq = base_c + 2.0 * t * (x / c) + t * (t * y)
  bound = base_c + 2.0 * t_abs * (x_abs / c) + t_abs * (t_abs * y_abs)
  return _Combined(sq, bound, c, t)


def cancelled_columns(sq: jax.Array, bound: jax.Array) -> jax.Array:
  """``[n]`` bool: the columns whose factored sum ``sq`` lost accuracy to cancellation.

  ``sq`` is a sum of summands whose magnitudes add up to ``bound``; its
  rounding error is a small multiple of ``bound·2⁻²⁴`` (float32), so it is
  trusted while ``sq ≥ CANCEL_RATIO·bound``. ``bound = 0`` (a zero column
  with a zero update) is exact and never flagged; neither is a NaN.
  """
  return sq < CANCEL_RATIO * bound


def _refined(refined: jax.Array, sq: jax.Array, done: jax.Array) -> jax.Array:
  """``refined`` where ``done``, else ``sq``; the gradient is ``sq``'s everywhere.

  The refinement changes the rounding, not the function, so the factored
  terms' derivative stays the derivative (and no gradient is asked of a
  ``while_loop`` or a kernel): ``stop_gradient(refined) + (sq − sq)`` has
  ``refined``'s value exactly.
  """
  return jnp.where(done, lax.stop_gradient(refined) + (sq - lax.stop_gradient(sq)), sq)


def refine_cancelled(sq: jax.Array, bound: jax.Array,
                     exact_sq_columns: Callable[[jax.Array], jax.Array], *,
                     columns: int = REFINE_COLUMNS, loop: bool | None = None) -> jax.Array:
  """Replace the squared norms of cancelled columns by accurately computed ones.

  The combine-and-refine step of a factored DoRA norm, for any weight layout:
  ``sq`` holds each column's squared norm as the sum of its factored terms,
  ``bound`` the sum of those summands' magnitudes (in :func:`factored_norm`,
  ``‖W_j‖² + 2|s|·Σ_k |b_kj U_kj| + s²·Σ_k |b_kj (G·b)_kj|``). Columns with
  ``sq < CANCEL_RATIO·bound`` (:func:`cancelled_columns`) get
  ``exact_sq_columns`` instead, ``columns`` at a time, most cancelled first.

  Args:
    sq: ``[n]`` float squared column norms from the factored terms. Any
      per-column units will do (:func:`factored_norm` passes them divided by
      ``c_j²``) if ``bound`` and ``exact_sq_columns`` share them.
    bound: ``[n]``, the summands' magnitudes, same dtype and units.
    exact_sq_columns: ``idx -> [K]``, with ``idx`` ``[K] int32`` distinct
      column indices in ``[0, n)`` and ``K = min(columns, n)`` static: the
      accurate squared norms of those columns in ``sq``'s dtype and units, for
      instance ``Σ_i (W[i, idx] + s·(a·b[:, idx])_i)²`` formed densely from
      ``K`` gathered columns. Called with columns that need no refinement too
      (those results are discarded); traced once.
    columns: ``K``, the columns recomputed per round.
    loop: ``True``: rounds repeat in a ``lax.while_loop`` until every flagged
      column is refined, and none runs when nothing cancels. ``False``: one
      round, always run, for the ``K`` most cancelled columns, with no
      data-dependent control flow; further flagged columns keep their
      factored value. ``None``: ``False`` on a GPU, whose runtime copies a
      ``while_loop``'s predicate to the host on every call (a stall per call),
      ``True`` elsewhere.

  Returns:
    ``[n]``: ``sq`` with the refined columns replaced. The gradient is
    ``sq``'s (the refinement changes rounding, not the function).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.norm import refine_cancelled
    >>> w = jax.random.normal(jax.random.key(0), (50, 6))
    >>> exact = lambda idx: jnp.sum(w[:, idx] ** 2, axis=0)
    >>> sq = jnp.sum(w ** 2, axis=0).at[2].set(-1e-9)   # a "cancelled" sum
    >>> bound = jnp.sum(w ** 2, axis=0)
    >>> out = refine_cancelled(sq, bound, exact, columns=4)
    >>> bool(jnp.allclose(out, bound))
    True
  """
  sq, bound = jnp.asarray(sq), jnp.asarray(bound)
  if sq.ndim != 1 or bound.shape != sq.shape:
    raise ValueError(f"sq and bound must be [n] vectors of one shape, got {sq.shape} and "
                     f"{bound.shape}")
  if isinstance(columns, bool) or not isinstance(columns, int) or columns < 1:
    raise ValueError(f"columns must be a positive int, got {columns!r}")
  k = min(columns, sq.shape[0])
  if loop is None:
    loop = jax.default_backend() != "gpu"
  value, bound = lax.stop_gradient(sq), lax.stop_gradient(bound)
  flagged = cancelled_columns(value, bound)
  # flagged columns have bound > 0; the ratio ranks them, most cancelled first
  ratio = value / jnp.where(flagged, bound, 1)

  def one_round(state):
    out, pending = state
    _, idx = lax.top_k(jnp.where(pending, -ratio, -jnp.inf), k)
    exact = jnp.asarray(exact_sq_columns(idx))
    if exact.shape != (k,):
      raise ValueError(f"exact_sq_columns must return shape ({k},), got {exact.shape}")
    take = pending[idx]
    out = out.at[idx].set(jnp.where(take, exact.astype(out.dtype), out[idx]),
                          unique_indices=True)
    return out, pending.at[idx].set(False, unique_indices=True)

  with jax.named_scope(REFINE_SCOPE):
    if loop:
      out, left = lax.while_loop(lambda state: jnp.any(state[1]), one_round, (value, flagged))
    else:
      out, left = one_round((value, flagged))
  return _refined(out, sq, flagged & ~left)


def _low_rank_columns(lora_a, b_cols, acc):
  """``a·b[:, idx]`` ``[d_in, K]`` in ``acc``: one 2-byte dtype on tensor cores
  (exact products, ``acc`` accumulation), anything else upcast at full
  precision; rank 1 is upcast too (an outer product, see :func:`_cross`)."""
  if lora_a.dtype in _HALF and b_cols.dtype == lora_a.dtype and lora_a.shape[1] > 1:
    return jnp.dot(lora_a, b_cols, preferred_element_type=acc)
  return jnp.dot(lora_a.astype(acc), b_cols.astype(acc), precision=lax.Precision.HIGHEST,
                 preferred_element_type=acc)


def _refine_mode(refine: str, acc, *arrays) -> str:
  if refine not in REFINE_MODES:
    raise ValueError(f"refine must be one of {REFINE_MODES}, got {refine!r}")
  if refine == "kernel" and acc != jnp.float32:
    raise ValueError(f"refine='kernel' accumulates in float32, the inputs ask for {acc.name} "
                     "(use refine='columns')")
  if refine != "auto":
    return refine
  if acc == jnp.float32 and dispatch.Device.current().cuda and dispatch.partitioned_reason(*arrays) is None:
    return "kernel"
  return "columns"


def _auto_chunk(rank: int, d_out: int) -> int:
  per_column = 3 * rank * 4
  if per_column * d_out <= NORM_CHUNK_BYTES:
    return d_out
  return max(128, (NORM_CHUNK_BYTES // per_column) // 128 * 128)


def factored_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale,
                  *, base_sq_norm: jax.Array | None = None,
                  chunk_size: int | None = None, refine: str = "auto") -> jax.Array:
  """Per-output-column norm ``‖kernel + scale·lora_a·lora_b‖`` without the dense product.

  Args:
    kernel: frozen base kernel ``[d_in, d_out]``.
    lora_a: ``[d_in, r]``.
    lora_b: ``[r, d_out]``.
    scale: the LoRA scale ``s`` (Python number or 0-d array), see :func:`lora_scale`.
    base_sq_norm: optional precomputed ``column_sq_norm(kernel)`` ``[d_out]``; saves
      one read of the kernel per call when the kernel is frozen.
    chunk_size: process the output columns in chunks of this many, bounding the
      ``[r, chunk]`` float32 intermediates. ``None`` picks whole-layer when the
      intermediates fit in :data:`NORM_CHUNK_BYTES`, else the largest multiple of
      128 that does. Chunks run one after another in a ``fori_loop``.
    refine: how columns whose update cancels them (``W_j ≈ −s(ab)_j``, see
      :func:`cancelled_columns`) are recomputed from ``W_j + s(ab)_j``:
      ``"columns"``: :func:`refine_cancelled`, :data:`REFINE_COLUMNS`
      gathered columns at a time (rounds in a ``while_loop``, none when nothing
      cancels; on a GPU one round, always run, and columns beyond it keep the
      factored value); ``"kernel"``: the Pallas kernel
      :func:`dora_jax.kernels.cancelled_columns.refine_columns`, which works
      only in the column tiles holding a flagged column, decided on the
      device (interpret mode off the GPU; float32 accumulation only);
      ``"auto"``: ``"kernel"`` on a CUDA GPU for float32 accumulation and
      arrays not split across devices (``pallas_call`` is not partitioned by
      GSPMD), else ``"columns"``; ``"off"``: the plain factored sum (for
      comparisons).

  Returns:
    ``[d_out]`` float32 (float64 when an input is float64) norms, clamped at 0
    before the square root. Finite wherever the true norm and ``‖W_j‖²`` are
    (large ``scale`` included). Differentiable through the factored terms
    (the exact DoRA gradient, ``detach_norm=False``, runs through them), with
    finite gradients at ``lora_b = 0`` (PEFT's init).

  Example:
    >>> import jax, jax.numpy as jnp, dora_jax
    >>> w = jax.random.normal(jax.random.key(0), (64, 32))
    >>> a = jax.random.normal(jax.random.key(1), (64, 4))
    >>> b = jax.random.normal(jax.random.key(2), (4, 32))
    >>> n = dora_jax.factored_norm(w, a, b, 0.5)
    >>> bool(jnp.allclose(n, jnp.linalg.norm(w + 0.5 * a @ b, axis=0), rtol=1e-4))
    True
  """
  d_in, d_out, rank = check_weights(kernel, lora_a, lora_b)
  check_scale(scale)
  if base_sq_norm is not None and tuple(base_sq_norm.shape) != (d_out,):
    raise ValueError(f"base_sq_norm must have shape [d_out] = [{d_out}], got {base_sq_norm.shape}")
  if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
  acc = accumulation_dtype(kernel, lora_a, lora_b)
  mode = _refine_mode(refine, acc, kernel, lora_a, lora_b)
  chunk = _auto_chunk(rank, d_out) if chunk_size is None else min(chunk_size, d_out)
  return _factored_norm(kernel, lora_a, lora_b, jnp.asarray(scale, acc), base_sq_norm,
                        chunk=chunk, mode=mode)


@functools.partial(jax.jit, static_argnames=("chunk", "mode"))
def _factored_norm(kernel, lora_a, lora_b, scale, base_sq_norm, *, chunk: int, mode: str):
  """:func:`factored_norm` once its arguments are checked: one compiled
  program, so an eager call runs (and rounds) as it does inside a jitted
  forward, and its refinement is traced once per shape."""
  d_out = kernel.shape[1]
  acc = scale.dtype
  g = gram(lora_a).astype(acc)
  if chunk >= d_out:
    terms = _norm_terms(kernel, lora_a, lora_b, g, base_sq_norm, acc)
  else:
    n_chunks = math.ceil(d_out / chunk)

    def body(i, out):
      # The last chunk's start is clamped by dynamic_slice to d_out - chunk: it
      # recomputes a few columns and writes the same values back.
      start = jnp.minimum(i * chunk, d_out - chunk)
      w_c = lax.dynamic_slice_in_dim(kernel, start, chunk, axis=1)
      b_c = lax.dynamic_slice_in_dim(lora_b, start, chunk, axis=1)
      base_c = (None if base_sq_norm is None
                else lax.dynamic_slice_in_dim(base_sq_norm, start, chunk))
      terms_c = _norm_terms(w_c, lora_a, b_c, g, base_c, acc)
      return lax.dynamic_update_slice_in_dim(out, terms_c, start, axis=1)

    terms = lax.fori_loop(0, n_chunks, body, jnp.zeros((5, d_out), acc))

  combined = _combine(terms, scale, _overflow_limit(acc))
  sq = combined.sq
  # Refinement. Cancelling columns are rare and their number is known only on
  # the device, so the work must be decided there without a host round trip
  # (XLA's GPU runtime copies a lax.cond or while_loop predicate to the host,
  # a stall per call), and must cost nothing when no column cancels:
  # * "columns" (XLA, any platform and layout): a static-size set of the K
  #   most cancelled columns is gathered ([d_in, K] of W, [r, K] of b) and
  #   formed densely. Off the GPU the rounds run in a while_loop, zero times
  #   when nothing cancels (its predicate is a [d_out] reduction), as many
  #   as needed otherwise. On a GPU one round always runs (K/d_out of W, no
  #   control flow); columns beyond K keep the factored value there, so a
  #   GPU prefers:
  # * "kernel" (GPU, arrays not split across devices): one Pallas launch over
  #   column tiles; a tile without a flagged column reads its flags and
  #   returns, writing nothing (sq is aliased), a tile with one recomputes
  #   its columns over all of d_in. Exact for any number of flagged columns.
  # Beyond that nothing reads W again, and there is no [T, d_out] operand here
  # at all; the flags are a [d_out] comparison fused with the combine.
  if mode == "columns":
    inv_c = 1.0 / combined.c

    def exact_sq_columns(idx):
      w_cols = jnp.take(kernel, idx, axis=1, mode="clip").astype(acc)
      b_cols = jnp.take(lora_b, idx, axis=1, mode="clip")
      v = w_cols * inv_c[idx] + combined.t[idx] * _low_rank_columns(lora_a, b_cols, acc)
      return jnp.sum(v * v, axis=0)

    sq = refine_cancelled(sq, combined.bound, exact_sq_columns)
  elif mode == "kernel":
    from dora_jax.kernels import cancelled_columns as refine_kernel  # noqa: PLC0415 - Pallas
    flagged = lax.stop_gradient(cancelled_columns(sq, combined.bound))
    with jax.named_scope(REFINE_SCOPE):
      refined = refine_kernel.refine_columns(kernel, lora_a, lora_b, combined.t,
                                             1.0 / combined.c, lax.stop_gradient(sq), flagged)
    sq = _refined(refined, sq, flagged)
  return combined.c * jnp.sqrt(jnp.maximum(sq, 0.0))


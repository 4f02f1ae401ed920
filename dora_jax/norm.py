"""The DoRA weight norm through its factored form.

For ``kernel W [d_in, d_out]``, ``lora_a a [d_in, r]``, ``lora_b b [r, d_out]``
and scale ``s``, the per-output-column squared norm of ``W + s·a·b`` is::

  ‖W_j‖²  +  2s · Σ_k b_kj (aᵀW)_kj  +  s² · Σ_k b_kj (G·b)_kj ,   G = aᵀa [r, r]
   base         cross, U = aᵀW [r, d_out]        Gram

so the only intermediates are ``U [r, d_out]``, ``G [r, r]`` and ``G·b [r, d_out]``:
the dense ``[d_in, d_out]`` product ``a·b`` is never formed. Everything is
accumulated in float32 (float64 when an input is float64).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax._checks import accumulation_dtype, check_float, check_scale, check_weights

#: Bound, in bytes, on the float32 ``[r, chunk]`` intermediates of one chunk of
#: :func:`factored_norm` when ``chunk_size`` is left at ``None``. Layers whose
#: ``3·r·d_out·4`` bytes fit under it are done in one piece.
NORM_CHUNK_BYTES = 256 * 2**20

#: Floor applied to the norm before dividing by it (``g = m / max(n, NORM_EPS)``),
#: so a dead column (``W_j + s(ab)_j = 0``) gives a finite scale instead of inf/NaN.
NORM_EPS = 1e-12

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
  contract = (((0,), (0,)), ((), ()))
  k_dtype, a_dtype = kernel.dtype, lora_a.dtype
  # rank 1 makes this a vector-matrix product, which XLA's GPU compiler may
  # rewrite as a multiply and reduce in the operands' dtype: upcast first
  if k_dtype in _HALF and a_dtype == k_dtype and lora_a.shape[1] > 1:
    return lax.dot_general(lora_a, kernel, contract, preferred_element_type=acc)
  if k_dtype == jnp.bfloat16 and a_dtype in (jnp.float32, jnp.float64):
    a_split = _split_bf16(lora_a, 2, axis=1)  # [d_in, 2r]: one pass over W
    u = lax.dot_general(a_split, kernel, contract, preferred_element_type=acc)
    rank = lora_a.shape[1]
    return u[:rank] + u[rank:]
  return lax.dot_general(
      lora_a.astype(acc), kernel.astype(acc), contract,
      precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def gram(lora_a: jax.Array) -> jax.Array:
  """``G = aᵀa [r, r]``, accumulated in float32 (float64 for float64 input)."""
  acc = accumulation_dtype(lora_a)
  # rank 1 is a dot of vectors (see _cross): upcast so no product rounds to bf16
  a = lora_a if lora_a.dtype in _HALF and lora_a.shape[1] > 1 else lora_a.astype(acc)
  return lax.dot_general(a, a, (((0,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST, preferred_element_type=acc)


def _gram_times_b(g, lora_b, acc):
  """``G·b [r, d_out]`` in ``acc`` precision.

  With a bf16 ``lora_b`` (exact in bf16), ``G`` is split into three bf16 terms
  and the product runs as one bf16 tensor-core matmul with float32
  accumulation: ~24 mantissa bits, several times faster on GPUs than a float32
  matmul at full precision, which dominates the norm's cost at high rank.
  Rank 1 (a vector product, see :func:`_cross`) runs in float32.
  """
  if lora_b.dtype == jnp.bfloat16 and acc == jnp.float32 and lora_b.shape[0] > 1:
    # [G_hi | G_mid | G_lo] [r, 3r] · [b; b; b] [3r, d_out]: the three products
    # summed in the one float32 accumulator, no [3r, d_out] intermediate
    stacked_b = jnp.concatenate([lora_b] * 3, axis=0)
    return jnp.dot(_split_bf16(g, 3, axis=1), stacked_b, preferred_element_type=acc)
  return jnp.dot(g, lora_b.astype(acc), precision=lax.Precision.HIGHEST,
                 preferred_element_type=acc)


def _norm_sq_columns(kernel, lora_a, lora_b, g, scale, base_sq, acc):
  """Squared norms of a block of columns (``kernel``/``lora_b``/``base_sq`` sliced)."""
  u = _cross(lora_a, kernel, acc)
  gb = _gram_times_b(g, lora_b, acc)
  if base_sq is None:
    base_sq = column_sq_norm(kernel)
  b = lora_b.astype(acc)
  return base_sq.astype(acc) + jnp.sum(b * (2.0 * scale * u + scale * scale * gb), axis=0)


def _auto_chunk(rank: int, d_out: int) -> int:
  per_column = 3 * rank * 4
  if per_column * d_out <= NORM_CHUNK_BYTES:
    return d_out
  return max(128, (NORM_CHUNK_BYTES // per_column) // 128 * 128)


def factored_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale,
                  *, base_sq_norm: jax.Array | None = None,
                  chunk_size: int | None = None) -> jax.Array:
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

  Returns:
    ``[d_out]`` float32 (float64 when an input is float64) norms, clamped at 0
    before the square root. Gradients are not defined through this function's
    use in DoRA (the norm is detached), but it is differentiable as written.

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
  scale = jnp.asarray(scale, acc)
  g = gram(lora_a).astype(acc)
  chunk = _auto_chunk(rank, d_out) if chunk_size is None else min(chunk_size, d_out)

  if chunk >= d_out:
    sq = _norm_sq_columns(kernel, lora_a, lora_b, g, scale, base_sq_norm, acc)
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
      sq_c = _norm_sq_columns(w_c, lora_a, b_c, g, scale, base_c, acc)
      return lax.dynamic_update_slice_in_dim(out, sq_c, start, axis=0)

    sq = lax.fori_loop(0, n_chunks, body, jnp.zeros((d_out,), acc))
  return jnp.sqrt(jnp.maximum(sq, 0.0))


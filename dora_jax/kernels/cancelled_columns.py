"""Cancelled columns of the factored norm, recomputed only where flagged (Pallas, Triton).

:func:`dora_jax.factored_norm` sums three terms per column; where the update
nearly cancels its column (``W_j ≈ −s(ab)_j``) that sum loses float32
accuracy, and :func:`dora_jax.norm.cancelled_columns` flags the column. This
kernel recomputes the flagged columns' squared norms from the update itself,
formed tile by tile in registers as :mod:`dora_jax.kernels.column_norm` does,
and only in the column tiles that hold a flagged column: each program reads
its tile's flags and returns at once when there is none (``pl.when``, decided
on the device; no ``lax.cond``, whose predicate XLA's GPU runtime copies to
the host). ``sq`` is updated in place (aliased), so a program with nothing to
do writes nothing::

  for a block of columns j holding a flagged column:
    for the row blocks i of W:
      P = a[i, :] · b[:, j]               float32 accumulation, in rank steps
      v = W[i, j] · inv_c[j] + t[j] · P   float32, in registers only
      acc[j] += v²
    sq[j] = Σ_i acc[j]   where flagged[j]  (the others keep their value)

``t = s / c`` and ``inv_c = 1 / c`` carry the factored norm's per-column
rescaling (``c = 1`` except where the plain squares would overflow), so the
result is ``‖W_j + s(ab)_j‖² / c_j²`` in the units of ``sq``.

The grid has one program per column block, walking all of ``d_in``: flagged
tiles are rare, and without a row split no partial rows need summing.
Operands of one 2-byte dtype multiply on tensor cores in it (exact products);
anything else runs in float32 at full precision (IEEE, not TF32). Ragged
sizes are masked. :func:`refine_columns_reference` is the ``jax.numpy`` twin.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dora_jax._checks import check_float, check_weights
from dora_jax.kernels._common import cdiv, load_1d, load_2d, next_pow2, resolve_interpret

_F32 = jnp.float32
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class RefineConfig:
  """Tiling: ``block_m × block_n`` tiles of ``W`` (rows × columns), rank
  steps of ``block_k``; powers of two, at least 16 (shrunk to small shapes)."""

  block_m: int = 64
  block_n: int = 64
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 2


def _compute_dtype(kernel, lora_a, lora_b):
  """The tile products' operand dtype and precision."""
  dtypes = {jnp.dtype(v.dtype) for v in (kernel, lora_a, lora_b)}
  if len(dtypes) == 1 and next(iter(dtypes)) in _HALF:
    return next(iter(dtypes)), None
  return jnp.dtype(_F32), lax.Precision.HIGHEST


def refine_columns_reference(kernel, lora_a, lora_b, t, inv_c, sq, flags):
  """The twin: ``Σ_i (W_ij·inv_c_j + t_j·(a·b)_ij)²`` where ``flags``, else ``sq``
  (materialises ``[d_in, d_out]``: tests only)."""
  dtype, precision = _compute_dtype(kernel, lora_a, lora_b)
  update = jnp.dot(lora_a.astype(dtype), lora_b.astype(dtype), precision=precision,
                   preferred_element_type=_F32)
  v = kernel.astype(_F32) * inv_c + t * update
  return jnp.where(flags, jnp.sum(v * v, axis=0), sq)


def _kernel(w_ref, a_ref, b_ref, t_ref, inv_c_ref, flag_ref, sq_ref, out_ref, *, cfg, rank,
            dtype, precision):
  del sq_ref  # aliased to out_ref: read and written there
  d_in, d_out = w_ref.shape
  c0 = pl.program_id(0) * cfg.block_n
  check_m, check_n, check_k = (d_in % cfg.block_m != 0, d_out % cfg.block_n != 0,
                               rank % cfg.block_k != 0)
  flags = load_1d(flag_ref, c0, cfg.block_n, check_n)

  @pl.when(jnp.max(flags) > 0)
  def _():
    t = load_1d(t_ref, c0, cfg.block_n, check_n)
    inv_c = load_1d(inv_c_ref, c0, cfg.block_n, check_n)

    def k_step(r0, kk, acc):
      k0 = kk * cfg.block_k
      a = load_2d(a_ref, r0, cfg.block_m, k0, cfg.block_k, check_m, check_k).astype(dtype)
      b = load_2d(b_ref, k0, cfg.block_k, c0, cfg.block_n, check_k, check_n).astype(dtype)
      return acc + jnp.dot(a, b, precision=precision, preferred_element_type=_F32)

    def row_step(i, total):
      r0 = i * cfg.block_m
      update = lax.fori_loop(0, cdiv(rank, cfg.block_k), functools.partial(k_step, r0),
                             jnp.zeros((cfg.block_m, cfg.block_n), _F32))
      w = load_2d(w_ref, r0, cfg.block_m, c0, cfg.block_n, check_m, check_n).astype(_F32)
      v = w * inv_c[None, :] + t[None, :] * update
      return total + v * v  # summed over rows once, after the loop

    total = lax.fori_loop(0, cdiv(d_in, cfg.block_m), row_step,
                          jnp.zeros((cfg.block_m, cfg.block_n), _F32))
    view = out_ref.at[pl.ds(c0, cfg.block_n)]
    columns = c0 + jnp.arange(cfg.block_n)
    plt.store(view, jnp.sum(total, axis=0), mask=(flags > 0) & (columns < d_out))


def refine_columns(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, t: jax.Array,
                   inv_c: jax.Array, sq: jax.Array, flags: jax.Array, *,
                   config: RefineConfig | None = None,
                   interpret: bool | None = None) -> jax.Array:
  """``[d_out]`` float32: ``Σ_i (W_ij·inv_c_j + t_j·(a·b)_ij)²`` where ``flags``, else ``sq``.

  Args:
    kernel: ``[d_in, d_out]``.
    lora_a: ``[d_in, r]``.
    lora_b: ``[r, d_out]``.
    t: ``[d_out]`` float32, the scale per column (``s / c_j``).
    inv_c: ``[d_out]`` float32, ``1 / c_j`` (ones where nothing is rescaled).
    sq: ``[d_out]`` float32, the values kept where not flagged.
    flags: ``[d_out]`` bool, the columns to recompute.
    config: tiling (default :class:`RefineConfig`).
    interpret: interpret mode (``None``: off the GPU).

  Gradients do not flow through it (:func:`dora_jax.factored_norm` takes
  the gradient from the factored terms).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.kernels.cancelled_columns import refine_columns
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> a = jax.random.normal(k[0], (40, 3))
    >>> b = jax.random.normal(k[1], (3, 20))
    >>> w = -2.0 * a @ b + 1e-3 * jax.random.normal(k[2], (40, 20))
    >>> flags = jnp.arange(20) % 7 == 0
    >>> ones = jnp.ones(20)
    >>> sq = refine_columns(w, a, b, 2.0 * ones, ones, jnp.zeros(20), flags, interpret=True)
    >>> bool(jnp.all((sq > 0) == flags))
    True
  """
  d_in, d_out, rank = check_weights(kernel, lora_a, lora_b)
  for name, value in (("t", t), ("inv_c", inv_c), ("sq", sq)):
    check_float(f"refine_columns: {name}", value)
    if value.shape != (d_out,) or value.dtype != _F32:
      raise ValueError(f"refine_columns: {name} must be float32 [d_out] = [{d_out}], got "
                       f"{value.dtype}{list(value.shape)}")
  if flags.shape != (d_out,) or flags.dtype != jnp.bool_:
    raise ValueError(f"refine_columns: flags must be bool [d_out] = [{d_out}], got "
                     f"{flags.dtype}{list(flags.shape)}")
  kernel, lora_a, lora_b, t, inv_c, sq, flags = (
      lax.stop_gradient(v) for v in (kernel, lora_a, lora_b, t, inv_c, sq, flags))
  cfg = config or RefineConfig()
  shrink = lambda block, size: max(16, min(block, next_pow2(size)))
  cfg = dataclasses.replace(cfg, block_m=shrink(cfg.block_m, d_in),
                            block_n=shrink(cfg.block_n, d_out), block_k=shrink(cfg.block_k, rank))
  dtype, precision = _compute_dtype(kernel, lora_a, lora_b)
  body = functools.partial(_kernel, cfg=cfg, rank=rank, dtype=dtype, precision=precision)
  return pl.pallas_call(
      body,
      grid=(cdiv(d_out, cfg.block_n),),
      out_shape=jax.ShapeDtypeStruct((d_out,), _F32),
      input_output_aliases={6: 0},
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      # what runs when nothing is flagged (the usual case): each program reads its flags
      cost_estimate=pl.CostEstimate(flops=0, transcendentals=0, bytes_accessed=4 * d_out),
      interpret=resolve_interpret(interpret),
      name="dora_refine_cancelled_columns",
  )(kernel, lora_a, lora_b, t, inv_c, flags.astype(jnp.int32), sq)


__all__ = ["RefineConfig", "refine_columns", "refine_columns_reference"]

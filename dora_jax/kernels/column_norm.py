"""DoRA's weight norm ``‖W + s·a·b‖`` per column in one pass over ``W`` (Pallas, Triton lowering).

The factored norm (:func:`dora_jax.factored_norm`) needs ``U = aᵀW`` (one
GEMM over ``W``), the Gram matrix ``G = aᵀa``, ``G·b`` and the reductions
around them. On a GPU the small, badly shaped ``G·b`` product and those passes
can cost more than ``U`` itself (BENCHMARKS.md, "One-pass norm").
This kernel instead forms the update tile by tile and never stores it::

  for a block of columns j and a block of rows i of W:
    P = a[i, :] · b[:, j]          float32 accumulation, K = r (tensor cores)
    v = W[i, j] + s·P              float32, in registers only
    partial[j] += Σ_i v²            (squares kept per row, summed once at the end)

  norm = √(max(Σ_splits partial, 0))                  [d_out] float32

At huge scales (``|s|`` near 10¹⁹, where ``v²`` overflows float32) a column is
evaluated divided by its bound ``c_j = |s|·max_i‖a_i‖·‖b_j‖ ≥ max_i|s·P_ij|``:
``v/c_j = W/c_j + (s/c_j)·P`` and ``norm_j = c_j·√Σ(v/c_j)²``. Columns whose
bound is at most 2⁴⁸ keep ``c_j = 1`` (the plain sum bit for bit: multiplying
by 1 is exact), so only an overflowing column changes arithmetic.

It does the FLOPs of ``U`` alone (``2·d_in·d_out·r``), reads ``W`` once, needs
no ``‖W‖²`` cache, and has no cancellation between the three factored terms.
No ``[d_in, d_out]`` value exists outside registers. The grid is column
blocks × row splits; each program walks its rows in ``block_m`` steps and
writes one partial row that XLA sums (``[splits, d_out]`` float32). Ragged
``d_in``, ``d_out`` and ranks are masked. The norm is a constant in DoRA's
backward (PEFT detaches it), so the kernel has no VJP of its own:
:func:`column_norm` stops gradients at its inputs.

:func:`column_norm_reference` is the ``jax.numpy`` twin (it materialises the
dense update: tests only). Operands must be bf16 or fp16 (all three of one
dtype); :func:`supported` says whether a call qualifies.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dora_jax._checks import check_scale, check_weights
from dora_jax.kernels._common import (cdiv, load_1d, load_2d, next_pow2, resolve_interpret,
                                       split_grid, store_2d)

_F32 = jnp.float32
_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class ColumnNormConfig:
  """Tiling: ``block_m × block_n`` tiles of ``W`` (rows × columns), rank
  steps of ``block_k``, about ``programs`` programs in all (``d_in`` is split
  to reach it), ``num_warps`` per program and ``num_stages`` of Triton's
  software pipelining. Block sizes are powers of two, at least 16."""

  block_m: int = 64
  block_n: int = 128
  block_k: int = 64
  programs: int = 264
  num_warps: int = 4
  num_stages: int = 3


def supported(kernel, lora_a, lora_b) -> bool:
  """Whether the kernel takes these operands: one 2-byte float dtype for all three."""
  dtypes = {jnp.dtype(v.dtype) for v in (kernel, lora_a, lora_b)}
  return len(dtypes) == 1 and dtypes.pop() in _HALF


#: Largest column bound ``c_j`` evaluated without rescaling: ``v² ≤ 2⁹⁷`` per
#: element, so a sum over up to 2³⁰ rows stays below float32's 2¹²⁸.
PLAIN_BOUND = 2.0**48


def column_scales(lora_a: jax.Array, lora_b: jax.Array, scale) -> jax.Array:
  """``c [d_out]`` float32: 1 where the plain sum of squares cannot overflow, else
  the column's bound ``|s|·max_i‖a_i‖·‖b_j‖`` (at most float32's largest)."""
  a_max = jnp.sqrt(jnp.max(jnp.sum(jnp.square(lora_a.astype(_F32)), axis=1)))
  b_cols = jnp.sqrt(jnp.sum(jnp.square(lora_b.astype(_F32)), axis=0))
  bound = jnp.abs(jnp.asarray(scale, _F32)) * (a_max * b_cols)
  bound = jnp.minimum(bound, jnp.finfo(_F32).max)
  return jnp.where(bound <= PLAIN_BOUND, 1.0, bound).astype(_F32)


def column_norm_reference(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                          scale) -> jax.Array:
  """``‖W + s·a·b‖`` per column as the kernel computes it (``a·b`` with float32
  accumulation, the sum in float32, columns rescaled by :func:`column_scales`).
  Materialises ``[d_in, d_out]``: tests only."""
  update = jnp.dot(lora_a, lora_b, preferred_element_type=_F32)
  c = column_scales(lora_a, lora_b, scale)
  v = kernel.astype(_F32) * (1.0 / c) + (jnp.asarray(scale, _F32) / c) * update
  return c * jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=0), 0.0))


def _kernel(w_ref, a_ref, b_ref, s_ref, inv_c_ref, part_ref, *, rank, rows_per_split, block_m, block_n,
            block_k, check_m, check_n):
  j, split = pl.program_id(0), pl.program_id(1)
  c0 = j * block_n
  s = load_1d(s_ref, c0, block_n, check_n)          # s / c_j
  inv_c = load_1d(inv_c_ref, c0, block_n, check_n)  # 1 / c_j
  check_k = rank % block_k != 0
  k_steps = cdiv(rank, block_k)
  row_steps = rows_per_split // block_m

  def product(r0, kk, acc):
    k0 = kk * block_k
    a = load_2d(a_ref, r0, block_m, k0, block_k, check_m, check_k)
    b = load_2d(b_ref, k0, block_k, c0, block_n, check_k, check_n)
    return acc + jnp.dot(a, b, preferred_element_type=_F32)

  def squares(r0, acc, total):
    w = load_2d(w_ref, r0, block_m, c0, block_n, check_m, check_n).astype(_F32)
    v = w * inv_c[None, :] + acc * s[None, :]
    return total + v * v  # summed over rows once, after the loop (no per-step shuffles)

  def row_step(i, total):
    r0 = split * rows_per_split + i * block_m
    acc = lax.fori_loop(0, k_steps, functools.partial(product, r0),
                        jnp.zeros((block_m, block_n), _F32))
    return squares(r0, acc, total)

  total = lax.fori_loop(0, row_steps, row_step, jnp.zeros((block_m, block_n), _F32))
  store_2d(part_ref, split, c0, jnp.sum(total, axis=0)[None, :], False, check_n)


def column_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale, *,
                config: ColumnNormConfig | None = None,
                interpret: bool | None = None) -> jax.Array:
  """``‖kernel + scale·lora_a·lora_b‖`` per column ``[d_out]`` float32, one pass over ``kernel``.

  Args:
    kernel: ``[d_in, d_out]`` bf16 or fp16.
    lora_a: ``[d_in, r]``, same dtype.
    lora_b: ``[r, d_out]``, same dtype.
    scale: the LoRA scale ``s`` (Python number or 0-d array).
    config: tiling (default :class:`ColumnNormConfig`).
    interpret: run the kernel in interpret mode (``None``: off the GPU).

  Gradients do not flow through it (DoRA's norm is a constant in the backward).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.kernels.column_norm import column_norm, column_norm_reference
    >>> k = jax.random.split(jax.random.key(0), 3)
    >>> w = jax.random.normal(k[0], (100, 72), jnp.bfloat16)
    >>> a = jax.random.normal(k[1], (100, 20), jnp.bfloat16)
    >>> b = jax.random.normal(k[2], (20, 72), jnp.bfloat16)
    >>> n = column_norm(w, a, b, 0.5, interpret=True)
    >>> bool(jnp.allclose(n, column_norm_reference(w, a, b, 0.5), rtol=1e-5))
    True
  """
  d_in, d_out, rank = check_weights(kernel, lora_a, lora_b)
  check_scale(scale)
  if not supported(kernel, lora_a, lora_b):
    raise ValueError("column_norm: kernel, lora_a and lora_b must share one dtype, bfloat16 "
                     f"or float16, got {kernel.dtype}, {lora_a.dtype} and {lora_b.dtype} "
                     "(use dora_jax.factored_norm for other dtypes)")
  kernel, lora_a, lora_b = (lax.stop_gradient(v) for v in (kernel, lora_a, lora_b))
  cfg = config or ColumnNormConfig()
  block_m, block_n, n_blocks, splits, rows_per_split = split_grid(
      d_in, d_out, cfg.block_m, cfg.block_n, cfg.programs)
  block_k = max(16, min(cfg.block_k, next_pow2(rank)))
  body = functools.partial(
      _kernel, rank=rank, rows_per_split=rows_per_split, block_m=block_m, block_n=block_n,
      block_k=block_k, check_m=splits * rows_per_split != d_in, check_n=d_out % block_n != 0)
  scale = lax.stop_gradient(jnp.asarray(scale, _F32))
  c = column_scales(lora_a, lora_b, scale)
  inv_c = 1.0 / c
  itemsize = kernel.dtype.itemsize
  part = pl.pallas_call(
      body,
      grid=(n_blocks, splits),
      out_shape=jax.ShapeDtypeStruct((splits, d_out), _F32),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(
          flops=2 * d_in * d_out * rank + 3 * d_in * d_out, transcendentals=0,
          bytes_accessed=itemsize * (kernel.size + n_blocks * lora_a.size + splits * lora_b.size)
          + 4 * (splits + 3) * d_out),
      interpret=resolve_interpret(interpret),
      name="dora_column_norm",
  )(kernel, lora_a, lora_b, scale * inv_c, inv_c)
  return c * jnp.sqrt(jnp.maximum(jnp.sum(part, axis=0), 0.0))


__all__ = ["ColumnNormConfig", "PLAIN_BOUND", "column_norm", "column_norm_reference", "column_scales",
           "supported"]

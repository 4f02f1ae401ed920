"""One GEMM over a virtual concatenation: ``[a1 | a2] · [b1 ; b2]`` with DoRA's edges.

The fused DoRA kernels are all this one Pallas kernel (Triton lowering)::

  acc = a1 · b1  +  a2 · b2                      fp32 accumulator, one K loop
  out = col_scale ⊙ acc + col_bias                epilogue, per output column
  pre = acc                                       optional second output

Shapes (``trans_b=False``)::

  a1 [M, K1]   b1 [K1, N]   a2 [M, K2]   b2 [K2, N]
  col_scale, col_bias [N]   out, pre [M, N]

With ``trans_b=True`` the right operands are read transposed in place:
``b1 [N, K1]``, ``b2 [N, K2]`` (no transposed copy is made).

* DoRA forward: ``a1 = x``, ``b1 = W``, ``a2 = s·h``, ``b2 = b``,
  ``col_scale = g``: ``y = g ⊙ (x·W + s·h·b) + bias`` and ``pre`` in one pass.
* DoRA ``dx``: ``a1 = dpre = dy ⊙ g``, ``b1 = W`` read as ``Wᵀ``, ``a2 = s·t``
  with ``t = dpre·bᵀ``, ``b2 = a`` read as ``aᵀ``: ``dx = dpre·Wᵀ + s·t·aᵀ``.

The K loop first walks ``K1`` in steps of ``block_k`` and then ``K2`` in steps
of ``block_k2``, keeping one float32 accumulator, so the low-rank term costs
``K2 / K1`` of the base GEMM and the ``[M, N]`` output is written once. Ragged
edges (``M``, ``N``, ``K1``, ``K2`` not multiples of the blocks) are handled by
masked loads and stores; full tiles run unmasked (the masks are static).

Precision: bf16/fp16 operands multiply exactly into the float32 accumulator.
float32 operands use the Triton lowering's default for a float32 dot, TF32 on
the GPU (as XLA's default float32 matmul there); interpret mode is exact fp32.

:func:`dual_matmul_reference` is the pure ``jax.numpy`` twin.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dora_jax.kernels._common import (MatmulConfig, cdiv, load_1d, load_2d, resolve_interpret,
                                       store_2d)

_F32 = jnp.float32


def _dot(a, b, trans_b: bool):
  dims = (((1,), (1,)), ((), ())) if trans_b else (((1,), (0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=_F32)


def _tile_ids(pid, grid_m: int, grid_n: int, group_m: int):
  """Grouped ordering: ``group_m`` tile rows share their ``b`` tiles in L2."""
  if group_m <= 1 or grid_m <= 1:
    return pid // grid_n, pid % grid_n
  per_group = group_m * grid_n
  group = pid // per_group
  first_m = group * group_m
  size_m = jnp.minimum(grid_m - first_m, group_m)
  local = pid % per_group
  return first_m + local % size_m, local // size_m


def _kernel(*refs, m, n, k1, k2, cfg: MatmulConfig, bk2: int, trans_b: bool,
            has_col_scale: bool, has_col_bias: bool, want_pre: bool, n_poison: int):
  it = iter(refs)
  a1_ref, b1_ref, a2_ref, b2_ref = next(it), next(it), next(it), next(it)
  cs_ref = next(it) if has_col_scale else None
  cb_ref = next(it) if has_col_bias else None
  for _ in range(n_poison):  # aliased to the outputs; never read
    next(it)
  out_ref = next(it)
  pre_ref = next(it) if want_pre else None

  bm, bn = cfg.block_m, cfg.block_n
  grid_m, grid_n = cdiv(m, bm), cdiv(n, bn)
  pid_m, pid_n = _tile_ids(pl.program_id(0), grid_m, grid_n, cfg.group_m)
  r0 = pl.multiple_of(pid_m * bm, bm)
  c0 = pl.multiple_of(pid_n * bn, bn)
  check_m, check_n = m % bm != 0, n % bn != 0

  def k_step(a_ref, b_ref, bk, kk, acc, check_k):
    k0 = pl.multiple_of(kk * bk, bk)
    a = load_2d(a_ref, r0, bm, k0, bk, check_m, check_k)
    if trans_b:
      b = load_2d(b_ref, c0, bn, k0, bk, check_n, check_k)
    else:
      b = load_2d(b_ref, k0, bk, c0, bn, check_k, check_n)
    return acc + _dot(a, b, trans_b)

  def segment(a_ref, b_ref, bk, size, acc):
    full, tail = divmod(size, bk)
    if full:
      body = functools.partial(k_step, a_ref, b_ref, bk, check_k=False)
      acc = lax.fori_loop(0, full, body, acc)
    if tail:  # one masked step; a loop of one keeps the index traced (no static bounds check)
      body = functools.partial(k_step, a_ref, b_ref, bk, check_k=True)
      acc = lax.fori_loop(full, full + 1, body, acc)
    return acc

  acc = jnp.zeros((bm, bn), _F32)
  acc = segment(a1_ref, b1_ref, cfg.block_k, k1, acc)
  acc = segment(a2_ref, b2_ref, bk2, k2, acc)

  out = acc
  if has_col_scale:
    out = out * load_1d(cs_ref, c0, bn, check_n).astype(_F32)[None, :]
  if has_col_bias:
    out = out + load_1d(cb_ref, c0, bn, check_n).astype(_F32)[None, :]
  store_2d(out_ref, r0, c0, out.astype(out_ref.dtype), check_m, check_n)
  if want_pre:
    store_2d(pre_ref, r0, c0, acc.astype(pre_ref.dtype), check_m, check_n)


def _check_shapes(a1, b1, a2, b2, trans_b):
  m, k1 = a1.shape
  m2, k2 = a2.shape
  if m2 != m:
    raise ValueError(f"a1 {a1.shape} and a2 {a2.shape} must have the same rows")
  n = b1.shape[0] if trans_b else b1.shape[1]
  want_b1 = (n, k1) if trans_b else (k1, n)
  want_b2 = (n, k2) if trans_b else (k2, n)
  if b1.shape != want_b1 or b2.shape != want_b2:
    raise ValueError(f"b1 {b1.shape} / b2 {b2.shape} do not match a1 {a1.shape}, "
                     f"a2 {a2.shape} (trans_b={trans_b})")
  if len({a1.dtype, b1.dtype, a2.dtype, b2.dtype}) != 1:
    raise TypeError("a1, b1, a2, b2 must share one dtype, got "
                    f"{a1.dtype}, {b1.dtype}, {a2.dtype}, {b2.dtype}")
  return m, n, k1, k2


def dual_matmul(a1, b1, a2, b2, *, col_scale=None, col_bias=None,
                trans_b: bool = False, want_pre: bool = False, out_dtype=None,
                config: MatmulConfig | None = None, interpret: bool | None = None,
                poison: bool = False):
  """``out = col_scale ⊙ (a1·b1 + a2·b2) + col_bias`` (and ``pre``) in one launch.

  Args:
    a1: ``[M, K1]``; b1: ``[K1, N]`` (``[N, K1]`` with ``trans_b``).
    a2: ``[M, K2]``; b2: ``[K2, N]`` (``[N, K2]`` with ``trans_b``). All four
      share one dtype, the MMA operand dtype.
    col_scale, col_bias: optional ``[N]``, the epilogue (float32 math).
    trans_b: read ``b1``/``b2`` transposed.
    want_pre: also return ``pre = acc`` (before the epilogue).
    out_dtype: dtype of ``out`` and ``pre`` (default ``a1.dtype``).
    config: tiling (:class:`MatmulConfig`, default by dtype); block sizes are
      capped at the problem's padded sizes.
    interpret: force interpret mode (``None``: interpret unless on a GPU).
    poison: testing aid: start the outputs as NaN (aliased buffers), so any
      element the kernel fails to write shows up.

  Returns:
    ``(out, pre)``, ``pre`` being ``None`` unless ``want_pre``.
  """
  m, n, k1, k2 = _check_shapes(a1, b1, a2, b2, trans_b)
  out_dtype = jnp.dtype(a1.dtype if out_dtype is None else out_dtype)
  cfg = (config or MatmulConfig.default_for(a1.dtype)).shrink_to(m, n, k1)
  bk2 = max(16, min(cfg.k2(k2), 1 << max(0, k2 - 1).bit_length()))
  extra = [v for v in (col_scale, col_bias) if v is not None]
  for name, vec, size in (("col_scale", col_scale, n), ("col_bias", col_bias, n)):
    if vec is not None and vec.shape != (size,):
      raise ValueError(f"{name} must be [{size}], got {vec.shape}")
  kernel = functools.partial(
      _kernel, m=m, n=n, k1=k1, k2=k2, cfg=cfg, bk2=bk2, trans_b=trans_b,
      has_col_scale=col_scale is not None,
      has_col_bias=col_bias is not None, want_pre=want_pre,
      n_poison=(2 if want_pre else 1) if poison else 0)
  out_shape = [jax.ShapeDtypeStruct((m, n), out_dtype)]
  if want_pre:
    out_shape.append(jax.ShapeDtypeStruct((m, n), out_dtype))
  inputs = [a1, b1, a2, b2, *extra]
  aliases = {}
  if poison:
    for i, shape in enumerate(out_shape):
      aliases[len(inputs)] = i
      inputs.append(jnp.full(shape.shape, jnp.nan, shape.dtype))
  flops = 2 * m * n * (k1 + k2)
  nbytes = sum(v.size * v.dtype.itemsize for v in (a1, b1, a2, b2, *extra))
  nbytes += len(out_shape) * m * n * out_dtype.itemsize
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(flops=flops, transcendentals=0, bytes_accessed=nbytes),
      input_output_aliases=aliases,
      interpret=resolve_interpret(interpret),
      name="dora_dual_matmul",
  )(*inputs)
  return outs[0], (outs[1] if want_pre else None)


def dual_matmul_reference(a1, b1, a2, b2, *, col_scale=None, col_bias=None,
                          trans_b: bool = False, want_pre: bool = False, out_dtype=None):
  """Pure ``jax.numpy`` twin of :func:`dual_matmul` (same roundings)."""
  _check_shapes(a1, b1, a2, b2, trans_b)
  out_dtype = jnp.dtype(a1.dtype if out_dtype is None else out_dtype)
  acc = _dot(a1, b1, trans_b) + _dot(a2, b2, trans_b)
  out = acc
  if col_scale is not None:
    out = out * col_scale.astype(_F32)[None, :]
  if col_bias is not None:
    out = out + col_bias.astype(_F32)[None, :]
  return out.astype(out_dtype), (acc.astype(out_dtype) if want_pre else None)

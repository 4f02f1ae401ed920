"""DoRA's backward prologue in one pass: ``dpre = dy ⊙ g`` and ``Σ_T dy ⊙ pre``.

XLA runs these as two passes over ``dy [T, N]`` (an elementwise fusion writing
``dpre`` and a column reduction for the magnitude gradient); this Pallas kernel
(Triton lowering) reads ``dy`` and ``pre`` once and writes ``dpre`` once::

  dpre [T, N]   = (dy ⊙ g) in dy's dtype        (g [N] float32)
  dy_pre [N]    = Σ_T dy ⊙ pre                   float32

so that ``dm = dy_pre / n``. The grid is ``N``-blocks × ``T``-splits; each
program walks its rows in ``block_t`` steps, keeping its column sums in
registers, and writes one partial row that XLA sums (``[splits, N]`` float32).
Ragged ``T`` and ``N`` are masked. :func:`scale_reduce_reference` is the
``jax.numpy`` twin.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from dora_jax._checks import check_float
from dora_jax.kernels._common import next_pow2, resolve_interpret, split_grid
from dora_jax.kernels.dual_matmul import _load_1d, _load_2d, _store_2d

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class ScaleReduceConfig:
  """Tiling: ``block_t × block_n`` tiles, about ``programs`` programs in all
  (``T`` is split to reach it), ``num_warps`` per program, ``num_stages``
  for Triton's software pipelining of the row loop. Block sizes are powers of
  two, at least 16."""

  block_t: int = 16
  block_n: int = 512
  programs: int = 1024
  num_warps: int = 4
  num_stages: int = 3


def scale_reduce_reference(dy: jax.Array, pre: jax.Array, g: jax.Array):
  """``(dy ⊙ g in dy.dtype, Σ_T dy ⊙ pre in float32)``."""
  dpre = (dy.astype(_F32) * g.astype(_F32)).astype(dy.dtype)
  return dpre, jnp.sum(dy.astype(_F32) * pre.astype(_F32), axis=0)


def _kernel(dy_ref, pre_ref, g_ref, dpre_ref, part_ref, *, rows_per_split, block_t, block_n,
            check_t, check_n):
  j, s = pl.program_id(0), pl.program_id(1)
  c0 = j * block_n
  g = _load_1d(g_ref, c0, block_n, check_n)

  def step(i, acc):
    r0 = s * rows_per_split + i * block_t
    dy = _load_2d(dy_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    pre = _load_2d(pre_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    _store_2d(dpre_ref, r0, c0, (dy * g[None, :]).astype(dpre_ref.dtype), check_t, check_n)
    return acc + jnp.sum(dy * pre, axis=0)

  acc = lax.fori_loop(0, rows_per_split // block_t, step, jnp.zeros((block_n,), _F32))
  _store_2d(part_ref, s, c0, acc[None, :], False, check_n)


def scale_reduce(dy: jax.Array, pre: jax.Array, g: jax.Array, *,
                 config: ScaleReduceConfig | None = None, interpret: bool | None = None):
  """``(dpre [T, N], dy_pre [N])``: ``dy ⊙ g`` (dy's dtype) and ``Σ_T dy ⊙ pre`` (float32).

  Args:
    dy: ``[T, N]`` cotangent of the layer output.
    pre: ``[T, N]`` the forward's pre-scale activations (any float dtype).
    g: ``[N]`` the DoRA column scale (cast to float32).
    config: tiling (default :class:`ScaleReduceConfig`).
    interpret: run the kernel in interpret mode (``None``: off the GPU).
  """
  for name, value in (("dy", dy), ("pre", pre), ("g", g)):
    check_float(f"scale_reduce: {name}", value)
  for name, value in (("dy", dy), ("pre", pre)):
    if value.ndim != 2:
      raise ValueError(f"scale_reduce: {name} must be 2-D [T, N], got shape {value.shape}")
  if pre.shape != dy.shape or g.shape != dy.shape[1:]:
    raise ValueError(f"scale_reduce: dy {dy.shape}, pre {pre.shape} and g {g.shape} must be "
                     "[T, N], [T, N] and [N]")
  cfg = config or ScaleReduceConfig()
  tokens, n = dy.shape
  block_t, block_n, n_blocks, splits, rows_per_split = split_grid(
      tokens, n, cfg.block_t, cfg.block_n, cfg.programs)
  kernel = functools.partial(
      _kernel, rows_per_split=rows_per_split, block_t=block_t, block_n=block_n,
      check_t=splits * rows_per_split != tokens, check_n=n % block_n != 0)
  nbytes = 2 * dy.size * dy.dtype.itemsize + pre.size * pre.dtype.itemsize + 4 * splits * n
  dpre, part = pl.pallas_call(
      kernel,
      grid=(n_blocks, splits),
      out_shape=[jax.ShapeDtypeStruct(dy.shape, dy.dtype),
                 jax.ShapeDtypeStruct((splits, n), _F32)],
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(flops=3 * dy.size, transcendentals=0, bytes_accessed=nbytes),
      interpret=resolve_interpret(interpret),
      name="dora_scale_reduce",
  )(dy, pre, g.astype(_F32))
  return dpre, jnp.sum(part, axis=0)


# ---------------------------------------------------------------------------
# the same pass, also taking the backward's two low-rank products of dpre


def scale_reduce_lowrank_reference(dy, v, g, lora_b, h):
  """``(dpre, Σ_T dy ⊙ v, dpre·bᵀ, hᵀ·dpre)``: the last two float32 from the
  rounded ``dpre``, as XLA computes DoRA's ``t`` and ``db / s``."""
  dpre, dy_v = scale_reduce_reference(dy, v, g)
  t = lax.dot_general(dpre, lora_b.astype(dpre.dtype), (((1,), (1,)), ((), ())),
                      preferred_element_type=_F32)
  hd = lax.dot_general(h.astype(dpre.dtype), dpre, (((0,), (0,)), ((), ())),
                       preferred_element_type=_F32)
  return dpre, dy_v, t, hd


def _kernel_lowrank(dy_ref, v_ref, g_ref, b_ref, h_ref, dpre_ref, part_ref, t_ref, hd_ref, *,
                    rows_per_split, padded_t, block_t, block_n, block_r, check_t, check_n,
                    check_r):
  j, s = pl.program_id(0), pl.program_id(1)
  c0 = j * block_n
  # a traced 0: the rank's block may be wider than the rank (masked), which a
  # static slice start would have checked against the array's bounds
  zero = j * 0
  g = _load_1d(g_ref, c0, block_n, check_n)
  b = _load_2d(b_ref, zero, block_r, c0, block_n, check_r, check_n)   # [r, bn]

  def step(i, carry):
    acc, hd = carry
    r0 = s * rows_per_split + i * block_t
    dy = _load_2d(dy_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    v = _load_2d(v_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    dpre = (dy * g[None, :]).astype(dpre_ref.dtype)
    _store_2d(dpre_ref, r0, c0, dpre, check_t, check_n)
    # this column block's share of t = dpre·bᵀ, and hᵀ·dpre for db
    t = lax.dot_general(dpre, b, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
    _store_2d(t_ref, j * padded_t + r0, zero, t, False, check_r)  # rows of block j's partial
    h = _load_2d(h_ref, r0, block_t, zero, block_r, check_t, check_r)   # [bt, r]
    hd = hd + lax.dot_general(h, dpre, (((0,), (0,)), ((), ())), preferred_element_type=_F32)
    return acc + jnp.sum(dy * v, axis=0), hd

  acc, hd = lax.fori_loop(0, rows_per_split // block_t, step,
                          (jnp.zeros((block_n,), _F32), jnp.zeros((block_r, block_n), _F32)))
  _store_2d(part_ref, s, c0, acc[None, :], False, check_n)
  _store_2d(hd_ref, s * block_r, c0, hd, False, check_n)  # rows of split s's partial


#: Default tiling of :func:`scale_reduce_lowrank`: the fastest of those tried
#: on an H100 (``benchmarks/scale_reduce.py --lowrank 16``, T = 4096, r = 16):
#: 58 / 240 / 368 µs at N = 4096 / 14336 / 28672, against 110 / 228 / 407 µs
#: for XLA's pass and two GEMMs timed alone.
LOWRANK_CONFIG = ScaleReduceConfig(block_t=64, block_n=128, programs=264, num_warps=4,
                                   num_stages=2)

#: Largest rank :func:`scale_reduce_lowrank` takes: its ``t`` partials are
#: ``[N-blocks, T, r]`` float32, which grows with the rank.
LOWRANK_MAX_RANK = 64


def scale_reduce_lowrank(dy: jax.Array, v: jax.Array, g: jax.Array, lora_b: jax.Array,
                         h: jax.Array, *, config: ScaleReduceConfig | None = None,
                         interpret: bool | None = None):
  """``(dpre [T, N], Σ_T dy ⊙ v [N], t [T, r], hᵀ·dpre [r, N])`` in one pass over ``dy`` and ``v``.

  :func:`scale_reduce` plus DoRA's two backward products that read ``dpre``:
  ``t = dpre·bᵀ`` (for ``dx``, ``da``) and ``hᵀ·dpre`` (``db / s``), taken on
  the tile while it is in registers instead of two more passes over
  ``dpre``. Each column block writes its share of ``t`` (``N-blocks`` of
  ``[T, r]`` float32) and each row split its share of ``hᵀ·dpre`` (``splits``
  of ``[r, N]``); XLA sums them.

  Args:
    dy: ``[T, N]`` cotangent of the layer output.
    v: ``[T, N]`` the kept residual (``pre``, or the output ``y``).
    g: ``[N]`` the DoRA column scale.
    lora_b: ``[r, N]`` with ``r`` at most :data:`LOWRANK_MAX_RANK`.
    h: ``[T, r]`` the forward's ``x·a``.
    config: tiling (default :data:`LOWRANK_CONFIG`).
    interpret: run the kernel in interpret mode (``None``: off the GPU).
  """
  for name, value in (("dy", dy), ("v", v), ("g", g), ("lora_b", lora_b), ("h", h)):
    check_float(f"scale_reduce_lowrank: {name}", value)
  for name, value in (("dy", dy), ("v", v), ("lora_b", lora_b), ("h", h)):
    if value.ndim != 2:
      raise ValueError(f"scale_reduce_lowrank: {name} must be 2-D, got shape {value.shape}")
  tokens, n = dy.shape
  rank = lora_b.shape[0]
  if (v.shape != dy.shape or g.shape != (n,) or lora_b.shape != (rank, n)
      or h.shape != (tokens, rank)):
    raise ValueError(f"scale_reduce_lowrank: dy {dy.shape}, v {v.shape}, g {g.shape}, lora_b "
                     f"{lora_b.shape} and h {h.shape} must be [T, N], [T, N], [N], [r, N] "
                     "and [T, r]")
  if rank > LOWRANK_MAX_RANK:
    raise ValueError(f"scale_reduce_lowrank: rank {rank} is above {LOWRANK_MAX_RANK}")
  cfg = config or LOWRANK_CONFIG
  grid = split_grid(tokens, n, cfg.block_t, cfg.block_n, cfg.programs)
  block_t, block_n, n_blocks, splits, rows_per_split = grid
  block_r = max(16, next_pow2(rank))
  padded_t = grid.padded_rows
  kernel = functools.partial(
      _kernel_lowrank, rows_per_split=rows_per_split, padded_t=padded_t, block_t=block_t,
      block_n=block_n, block_r=block_r, check_t=padded_t != tokens, check_n=n % block_n != 0,
      check_r=rank != block_r)
  cdt = dy.dtype
  nbytes = (2 * dy.size * dy.dtype.itemsize + v.size * v.dtype.itemsize
            + 4 * (splits * n + n_blocks * padded_t * rank + splits * block_r * n))
  # the partials as 2-D arrays: [N-blocks · T', r] (T' the rows the splits
  # cover) and [splits · r', N] (r' the rank's block), sliced after the sum
  dpre, part, t_part, hd_part = pl.pallas_call(
      kernel,
      grid=(n_blocks, splits),
      out_shape=[jax.ShapeDtypeStruct(dy.shape, cdt),
                 jax.ShapeDtypeStruct((splits, n), _F32),
                 jax.ShapeDtypeStruct((n_blocks * padded_t, rank), _F32),
                 jax.ShapeDtypeStruct((splits * block_r, n), _F32)],
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      cost_estimate=pl.CostEstimate(flops=3 * dy.size + 4 * dy.size * rank, transcendentals=0,
                                    bytes_accessed=nbytes),
      interpret=resolve_interpret(interpret),
      name="dora_scale_reduce_lowrank",
  )(dy, v, g.astype(_F32), lora_b.astype(cdt), h.astype(cdt))
  t = jnp.sum(t_part.reshape(n_blocks, padded_t, rank), axis=0)[:tokens]
  hd = jnp.sum(hd_part.reshape(splits, block_r, n), axis=0)[:rank]
  return dpre, jnp.sum(part, axis=0), t, hd


__all__ = ["LOWRANK_MAX_RANK", "ScaleReduceConfig", "scale_reduce", "scale_reduce_lowrank",
           "scale_reduce_lowrank_reference", "scale_reduce_reference"]

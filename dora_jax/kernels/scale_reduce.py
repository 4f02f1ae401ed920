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
from dora_jax.kernels._common import load_1d, load_2d, resolve_interpret, split_grid, store_2d

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
  g = load_1d(g_ref, c0, block_n, check_n)

  def step(i, acc):
    r0 = s * rows_per_split + i * block_t
    dy = load_2d(dy_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    pre = load_2d(pre_ref, r0, block_t, c0, block_n, check_t, check_n).astype(_F32)
    store_2d(dpre_ref, r0, c0, (dy * g[None, :]).astype(dpre_ref.dtype), check_t, check_n)
    return acc + jnp.sum(dy * pre, axis=0)

  acc = lax.fori_loop(0, rows_per_split // block_t, step, jnp.zeros((block_n,), _F32))
  store_2d(part_ref, s, c0, acc[None, :], False, check_n)


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


__all__ = ["ScaleReduceConfig", "scale_reduce", "scale_reduce_reference"]

"""``Σ_T dy ⊙ pre`` for flagged output columns only, ``pre`` recomputed in-kernel.

When the layer's output ``y = g ⊙ pre`` is the magnitude gradient's residual,
``dm = Σ_T dy ⊙ y / (g·n)`` is undefined where ``g ≈ 0`` (a zero magnitude).
Those columns need ``pre`` itself. This Pallas kernel (Triton lowering)
recomputes it only in the column tiles that hold a flagged column, deciding
per tile on the device (``pl.when``): no ``lax.cond``, whose predicate XLA's
GPU runtime copies to the host, and almost no work when nothing is flagged
(the usual case)::

  pre   = x2·W + hs·b                 [T, N] per tile, float32, rounded to x2's dtype
  out_j = Σ_T dy ⊙ pre  (flagged j)   [N] float32, 0 elsewhere

Shapes: ``x2 [T, K]``, ``kernel [K, N]``, ``hs [T, r]`` (``s·h``), ``lora_b
[r, N]``, ``dy [T, N]``, ``flags [N]`` (bool). Any sizes (ragged tiles are
masked). Grid: ``N``-blocks × ``T``-blocks, one partial row per ``T``-block
summed by XLA. :func:`flagged_dy_dot_pre_reference` is the ``jax.numpy`` twin.
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
from dora_jax.kernels._common import (cdiv, load_1d, load_2d, next_pow2, resolve_interpret,
                                       store_2d)

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class FlaggedConfig:
  """Tiling: ``block_t × block_n`` output tiles, K steps of ``block_k`` (the
  low-rank term in steps of ``block_r``). Powers of two, at least 16."""

  block_t: int = 64
  block_n: int = 64
  block_k: int = 64
  block_r: int = 16
  num_warps: int = 4
  num_stages: int = 2


def flagged_dy_dot_pre_reference(x2, kernel, hs, lora_b, dy, flags):
  """The twin: ``pre`` for every column (float32, rounded to ``x2.dtype``)."""
  pre = (jnp.dot(x2, kernel.astype(x2.dtype), preferred_element_type=_F32)
         + jnp.dot(hs.astype(x2.dtype), lora_b.astype(x2.dtype), preferred_element_type=_F32))
  total = jnp.sum(dy.astype(_F32) * pre.astype(x2.dtype).astype(_F32), axis=0)
  return jnp.where(flags, total, 0.0)


def _kernel(x_ref, w_ref, hs_ref, b_ref, dy_ref, flag_ref, part_ref, *, cfg, rank, dtype):
  tokens, k_dim = x_ref.shape
  n = w_ref.shape[1]
  j, i = pl.program_id(0), pl.program_id(1)
  r0, c0 = i * cfg.block_t, j * cfg.block_n
  check_t, check_n = tokens % cfg.block_t != 0, n % cfg.block_n != 0
  flags = load_1d(flag_ref, c0, cfg.block_n, check_n)
  any_flag = jnp.max(flags) > 0

  @pl.when(any_flag)
  def _():
    def k_step(kk, acc, a_ref, b_ref_, size, block):
      k0 = kk * block
      check_k = size % block != 0
      a = load_2d(a_ref, r0, cfg.block_t, k0, block, check_t, check_k).astype(dtype)
      b = load_2d(b_ref_, k0, block, c0, cfg.block_n, check_k, check_n).astype(dtype)
      return acc + jnp.dot(a, b, preferred_element_type=_F32)

    acc = jnp.zeros((cfg.block_t, cfg.block_n), _F32)
    acc = lax.fori_loop(0, cdiv(k_dim, cfg.block_k), functools.partial(
        k_step, a_ref=x_ref, b_ref_=w_ref, size=k_dim, block=cfg.block_k), acc)
    acc = lax.fori_loop(0, cdiv(rank, cfg.block_r), functools.partial(
        k_step, a_ref=hs_ref, b_ref_=b_ref, size=rank, block=cfg.block_r), acc)
    dy = load_2d(dy_ref, r0, cfg.block_t, c0, cfg.block_n, check_t, check_n).astype(_F32)
    pre = acc.astype(dtype).astype(_F32)
    total = jnp.sum(dy * pre, axis=0)
    store_2d(part_ref, i, c0, jnp.where(flags > 0, total, 0.0)[None, :], False, check_n)

  @pl.when(jnp.logical_not(any_flag))
  def _():
    store_2d(part_ref, i, c0, jnp.zeros((1, cfg.block_n), _F32), False, check_n)


def flagged_dy_dot_pre(x2: jax.Array, kernel: jax.Array, hs: jax.Array, lora_b: jax.Array,
                       dy: jax.Array, flags: jax.Array, *, config: FlaggedConfig | None = None,
                       interpret: bool | None = None) -> jax.Array:
  """``[N]`` float32: ``Σ_T dy ⊙ (x2·W + hs·b)`` where ``flags``, else 0.

  Args:
    x2: ``[T, K]`` layer input (sets the compute dtype).
    kernel: ``[K, N]``.
    hs: ``[T, r]``, the scaled LoRA hidden ``s·(x2·a)``.
    lora_b: ``[r, N]``.
    dy: ``[T, N]`` output cotangent.
    flags: ``[N]`` bool, the columns to compute.
    config: tiling (default :class:`FlaggedConfig`, shrunk to small shapes).
    interpret: interpret mode (``None``: off the GPU).
  """
  operands = (("x2", x2), ("kernel", kernel), ("hs", hs), ("lora_b", lora_b), ("dy", dy))
  for name, value in operands:
    check_float(f"flagged_dy_dot_pre: {name}", value)
    if value.ndim != 2:
      raise ValueError(f"flagged_dy_dot_pre: {name} must be 2-D, got shape {value.shape}")
  if flags.ndim != 1 or flags.dtype != jnp.bool_:
    raise ValueError(f"flagged_dy_dot_pre: flags must be a 1-D bool array [N], got "
                     f"{flags.dtype}{list(flags.shape)}")
  tokens, k_dim = x2.shape
  n = kernel.shape[1]
  rank = hs.shape[1]
  if (kernel.shape[0] != k_dim or hs.shape[0] != tokens or lora_b.shape != (rank, n)
      or dy.shape != (tokens, n) or flags.shape != (n,)):
    raise ValueError(f"flagged_dy_dot_pre: x2 {x2.shape}, kernel {kernel.shape}, hs {hs.shape}, "
                     f"lora_b {lora_b.shape}, dy {dy.shape}, flags {flags.shape} must be "
                     "[T, K], [K, N], [T, r], [r, N], [T, N], [N]")
  cfg = config or FlaggedConfig()
  shrink = lambda block, size: max(16, min(block, next_pow2(size)))
  cfg = dataclasses.replace(cfg, block_t=shrink(cfg.block_t, tokens), block_n=shrink(cfg.block_n, n),
                            block_k=shrink(cfg.block_k, k_dim), block_r=shrink(cfg.block_r, rank))
  t_blocks = cdiv(tokens, cfg.block_t)
  part = pl.pallas_call(
      functools.partial(_kernel, cfg=cfg, rank=rank, dtype=x2.dtype),
      grid=(cdiv(n, cfg.block_n), t_blocks),
      out_shape=jax.ShapeDtypeStruct((t_blocks, n), _F32),
      compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=resolve_interpret(interpret),
      name="dora_flagged_dy_dot_pre",
  )(x2, kernel, hs, lora_b, dy, flags.astype(jnp.int32))
  return jnp.sum(part, axis=0)


__all__ = ["FlaggedConfig", "flagged_dy_dot_pre", "flagged_dy_dot_pre_reference"]

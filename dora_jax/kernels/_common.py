"""Helpers shared by the Pallas kernels: interpret mode, grids, block configs, masked tiles."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def default_interpret() -> bool:
  """Interpret mode unless the default JAX backend is a GPU (Triton lowering)."""
  return jax.default_backend() != "gpu"


def resolve_interpret(interpret: bool | None) -> bool:
  """``None`` means :func:`default_interpret`."""
  return default_interpret() if interpret is None else bool(interpret)


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def next_pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _is_block(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 16 \
      and value & (value - 1) == 0


class SplitGrid(NamedTuple):
  """A column-blocks × row-splits grid (see :func:`split_grid`)."""

  block_rows: int
  block_cols: int
  col_blocks: int
  splits: int
  rows_per_split: int


def split_grid(rows: int, cols: int, block_rows: int, block_cols: int,
               programs: int) -> SplitGrid:
  """Grid of a kernel that reduces over ``rows``: ``cols`` in blocks of
  ``block_cols``, ``rows`` split so that there are about ``programs`` programs,
  each walking its split in ``block_rows`` steps. Block sizes are capped at the
  sizes rounded up to a power of two (floor 16), and no split starts past the end."""
  block_cols = max(16, min(block_cols, next_pow2(cols)))
  block_rows = max(16, min(block_rows, next_pow2(rows)))
  col_blocks = cdiv(cols, block_cols)
  splits = max(1, min(cdiv(rows, block_rows), cdiv(programs, col_blocks)))
  rows_per_split = cdiv(cdiv(rows, splits), block_rows) * block_rows
  return SplitGrid(block_rows, block_cols, col_blocks, cdiv(rows, rows_per_split),
                   rows_per_split)


@dataclasses.dataclass(frozen=True)
class MatmulConfig:
  """Tiling of one fused matmul launch (Triton lowering).

  ``block_m × block_n`` is the output tile of one program, ``block_k`` the step
  of the K loop over the big operand pair and ``block_k2`` the step over the
  low-rank pair (``None``: the rank rounded up to a power of two, at most 64).
  ``group_m`` rows of tiles are visited together for L2 reuse. All block sizes
  must be powers of two, at least 16.
  """

  block_m: int = 128
  block_n: int = 256
  block_k: int = 64
  block_k2: int | None = None
  group_m: int = 8
  num_warps: int = 8
  num_stages: int = 3

  def __post_init__(self):
    for name in ("block_m", "block_n", "block_k") + (("block_k2",) if self.block_k2 is not None
                                                     else ()):
      if not _is_block(getattr(self, name)):
        raise ValueError(f"MatmulConfig.{name} must be a power of two >= 16, got "
                         f"{getattr(self, name)!r}")
    for name in ("group_m", "num_warps", "num_stages"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"MatmulConfig.{name} must be a positive int, got {value!r}")

  @staticmethod
  def default_for(dtype) -> "MatmulConfig":
    """The default tiling for an operand dtype: 2-byte types get the H100-tuned
    (128, 256, 64) tiles; 4-byte types smaller ones (shared memory)."""
    if jnp.dtype(dtype).itemsize >= 4:
      return MatmulConfig(block_m=64, block_n=128, block_k=32, num_warps=4, num_stages=3)
    return MatmulConfig()

  def k2(self, rank: int) -> int:
    if self.block_k2 is not None:
      return self.block_k2
    return min(64, max(16, next_pow2(rank)))

  def shrink_to(self, m: int, n: int, k: int) -> "MatmulConfig":
    """Cap block sizes at the problem's (power-of-two padded) sizes, floor 16."""
    return dataclasses.replace(
        self,
        block_m=max(16, min(self.block_m, next_pow2(m))),
        block_n=max(16, min(self.block_n, next_pow2(n))),
        block_k=max(16, min(self.block_k, next_pow2(k))))


# ---------------------------------------------------------------------------
# masked tiles (Triton lowering): ragged edges read as 0 and are not written


def _mask_2d(r0, nr, c0, nc, rows, cols, check_r: bool, check_c: bool):
  mask = None
  if check_r:
    mask = (r0 + jnp.arange(nr))[:, None] < rows
  if check_c:
    col = (c0 + jnp.arange(nc))[None, :] < cols
    mask = col if mask is None else mask & col
  if mask is not None:
    mask = jnp.broadcast_to(mask, (nr, nc))
  return mask


def load_2d(ref, r0, nr, c0, nc, check_r: bool, check_c: bool):
  """Load ``ref[r0:r0+nr, c0:c0+nc]``; out-of-range elements (checked dims) are 0."""
  rows, cols = ref.shape
  view = ref.at[pl.ds(r0, nr), pl.ds(c0, nc)]
  mask = _mask_2d(r0, nr, c0, nc, rows, cols, check_r, check_c)
  if mask is None:
    return view[...]
  return plt.load(view, mask=mask, other=0)


def store_2d(ref, r0, c0, value, check_r: bool, check_c: bool):
  """Store ``value`` at ``ref[r0:, c0:]``, skipping out-of-range elements (checked dims)."""
  rows, cols = ref.shape
  nr, nc = value.shape
  view = ref.at[pl.ds(r0, nr), pl.ds(c0, nc)]
  mask = _mask_2d(r0, nr, c0, nc, rows, cols, check_r, check_c)
  if mask is None:
    view[...] = value
  else:
    plt.store(view, value, mask=mask)


def load_1d(ref, c0, nc, check: bool):
  """Load ``ref[c0:c0+nc]``; out-of-range elements (when checked) are 0."""
  (size,) = ref.shape
  view = ref.at[pl.ds(c0, nc)]
  if not check:
    return view[...]
  return plt.load(view, mask=(c0 + jnp.arange(nc)) < size, other=0)

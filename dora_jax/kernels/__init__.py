"""Fused kernels for NVIDIA GPUs and their dispatch.

* :mod:`~dora_jax.kernels.dual_matmul`, :mod:`~dora_jax.kernels.fused_dense`:
  the ``"pallas"`` backend (Pallas, Triton lowering).
* :mod:`~dora_jax.kernels.scaled_matmul`, :mod:`~dora_jax.kernels.fused_mosaic`:
  the ``"mosaic"`` backend (Pallas Mosaic GPU, Hopper), with the backward's
  :mod:`~dora_jax.kernels.scale_reduce` (``dpre`` and the magnitude reduction
  in one pass) and :mod:`~dora_jax.kernels.flagged_columns` (zero-magnitude
  columns) in Pallas/Triton.
* :mod:`~dora_jax.kernels.column_norm`: DoRA's norm in one pass over ``W``
  (Pallas/Triton), used by the kernel backends and ``"auto"`` where it beats
  the factored norm.
* :mod:`~dora_jax.kernels.dispatch`: what ``backend="auto"`` picks.

Each kernel has a pure ``jax.numpy`` twin (``*_reference``, or
:mod:`dora_jax.compose` for the compositions the ``"xla"`` backend runs) that
the tests compare against, in interpret mode off the GPU. Shared helpers
(interpret mode, grids, masked tiles, :class:`MatmulConfig`) are in
``_common``.
"""

from dora_jax.kernels._common import MatmulConfig

__all__ = ["MatmulConfig"]

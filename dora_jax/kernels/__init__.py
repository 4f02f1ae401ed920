"""Fused Pallas kernels (Triton lowering on NVIDIA GPUs) and their dispatch.

Each kernel has a pure ``jax.numpy`` twin in :mod:`dora_jax.compose` that the
``"xla"`` backend runs and the tests compare against.
"""

"""dora_jax: DoRA (Weight-Decomposed Low-Rank Adaptation) for JAX and Flax.

Functional core (Flax layout: ``kernel [d_in, d_out]``, ``lora_a [d_in, r]``,
``lora_b [r, d_out]``, ``magnitude [d_out]``):

* :func:`dora_dense` — the DoRA layer, differentiable, norm detached as in PEFT;
  :class:`KernelOptions` — what its kernel backends run.
* :func:`factored_norm` — ``‖W + s·a·b‖`` per column without the dense product.
* :func:`merge_kernel` — ``g ⊙ (W + s·a·b)`` for serving.
* :func:`lora_scale` — ``alpha / r`` (or ``alpha / √r`` with rsLoRA).
* :func:`quantize_kernel` — a quantized frozen weight for QDoRA (:mod:`dora_jax.quantized`);
  ``apply_dora(..., base_dtype="nf4")`` quantizes a model's adapted layers in place.

Layers and model surgery (:func:`apply_dora` and friends), adapter files
(:func:`save_adapter`, :func:`load_adapter`, ...), and the submodules
:mod:`dora_jax.nnx`, :mod:`dora_jax.linen` and :mod:`dora_jax.sharding`.
Constants live in their modules (``dora_jax.backend``, ``dora_jax.norm``).
"""

from dora_jax.backend import KernelOptions
from dora_jax.dense import dora_dense, dora_norm_scale, lora_scale, merge_kernel
from dora_jax.norm import column_sq_norm, factored_norm
from dora_jax.quantized import QuantizedKernel, quantize_kernel
from dora_jax import conv, embed  # functional cores of the embedding and conv layers
from dora_jax import linen, nnx
from dora_jax import sharding
from dora_jax.surgery import (apply_dora, cache_base_norms, freeze_scales, merge,
                              print_trainable_parameters, quantize_base,
                              refresh_scales, unfreeze_scales, unmerge)
from dora_jax.io import (export_merged, load_adapter, restore_adapter_state, save_adapter,
                         save_adapter_state)

__all__ = [
    "KernelOptions",
    "QuantizedKernel",
    "column_sq_norm",
    "dora_dense",
    "dora_norm_scale",
    "factored_norm",
    "lora_scale",
    "merge_kernel",
    "quantize_kernel",
    "apply_dora",
    "cache_base_norms",
    "freeze_scales",
    "linen",
    "merge",
    "nnx",
    "print_trainable_parameters",
    "quantize_base",
    "refresh_scales",
    "sharding",
    "unfreeze_scales",
    "unmerge",
    "export_merged",
    "load_adapter",
    "restore_adapter_state",
    "save_adapter",
    "save_adapter_state",
]

__version__ = "0.1.0"

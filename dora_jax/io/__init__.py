"""Adapters on disk.

* :func:`save_adapter` / :func:`load_adapter`: Hugging Face PEFT's format
  (``adapter_model.safetensors`` + ``adapter_config.json``, ``use_dora: true``),
  loadable by ``peft.PeftModel.from_pretrained`` and from PEFT's ``save_pretrained``.
* :func:`save_adapter_state` / :func:`restore_adapter_state`: Orbax checkpoints
  of the adapters, optionally with the optimizer and RNG state (resumable training).
* :func:`export_merged`: the merged plain model's parameters as one safetensors file.

Module names: :mod:`dora_jax.io.naming`; file format: :mod:`dora_jax.io.safetensors_format`;
crash-safe writes: :mod:`dora_jax.io.atomic`.
"""

from dora_jax.io.checkpoint import restore_adapter_state, save_adapter_state
from dora_jax.io.export import export_merged, merged_params
from dora_jax.io.naming import ModuleNameMap, default_module_name
from dora_jax.io.peft import (AdapterFormatError, adapter_config, load_adapter,
                              read_adapter_config, save_adapter)
from dora_jax.io.safetensors_format import SafetensorsError

__all__ = [
    "AdapterFormatError",
    "ModuleNameMap",
    "SafetensorsError",
    "adapter_config",
    "default_module_name",
    "export_merged",
    "load_adapter",
    "merged_params",
    "read_adapter_config",
    "restore_adapter_state",
    "save_adapter",
    "save_adapter_state",
]

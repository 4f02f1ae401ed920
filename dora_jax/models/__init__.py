"""Model ports for end-to-end DoRA fine-tuning.

* :class:`LlamaForCausalLM` (:mod:`dora_jax.models.llama`): a Llama/Qwen2/Mistral-style
  decoder in Flax NNX, named like Hugging Face's, so PEFT adapter names come out right.
* :func:`load_hf_llama` / :func:`save_hf_llama` (:mod:`dora_jax.models.hf_loader`):
  Hugging Face checkpoint directories (``config.json`` + safetensors).
"""

from dora_jax.models.hf_loader import (HFCheckpointError, config_from_hf, config_to_hf,
                                       hf_state_dict, load_hf_llama, read_hf_config,
                                       read_hf_weights, save_hf_llama)
from dora_jax.models.llama import (ALL_PROJECTIONS, ATTENTION_PROJECTIONS, LlamaConfig,
                                   LlamaForCausalLM, LlamaModel, RMSNorm, causal_lm_loss,
                                   random_llama)

__all__ = [
    "ALL_PROJECTIONS",
    "ATTENTION_PROJECTIONS",
    "HFCheckpointError",
    "LlamaConfig",
    "LlamaForCausalLM",
    "LlamaModel",
    "RMSNorm",
    "causal_lm_loss",
    "config_from_hf",
    "config_to_hf",
    "hf_state_dict",
    "load_hf_llama",
    "read_hf_config",
    "random_llama",
    "read_hf_weights",
    "save_hf_llama",
]

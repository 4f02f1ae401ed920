"""Hugging Face checkpoints <-> :class:`dora_jax.models.LlamaForCausalLM`.

A checkpoint directory holds ``config.json`` and either ``model.safetensors``
or shards listed in ``model.safetensors.index.json`` (``weight_map``), with
``LlamaForCausalLM`` tensor names. Supported ``model_type``: ``llama``,
``mistral`` and ``qwen2`` (q/k/v biases); RoPE ``default``, ``linear`` and
``llama3`` scaling; both the ``rope_parameters`` (transformers 5) and the
``rope_theta`` + ``rope_scaling`` (older) config layouts.

Names and layouts (Flax path -> tensor):

=========================================== =========================================== =========
Flax state path                             Hugging Face tensor                         layout
=========================================== =========================================== =========
``model/embed_tokens/embedding``            ``model.embed_tokens.weight``               same
``model/layers/0/self_attn/q_proj/kernel``  ``model.layers.0.self_attn.q_proj.weight``  transposed
``model/layers/0/self_attn/q_proj/bias``    ``model.layers.0.self_attn.q_proj.bias``    same
``model/layers/0/input_layernorm/weight``   ``model.layers.0.input_layernorm.weight``   same
``lm_head/kernel``                          ``lm_head.weight``                          transposed
=========================================== =========================================== =========

(``kernel [d_in, d_out]`` is torch's ``weight [d_out, d_in]`` transposed.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dora_jax.io import atomic, safetensors_format
from dora_jax.models.llama import LlamaConfig, LlamaForCausalLM

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
#: Tensors some checkpoints carry that the model recomputes (ignored on load).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


class HFCheckpointError(ValueError):
  """A checkpoint directory is incomplete or does not fit the model its config describes."""


# -- config -----------------------------------------------------------------


def config_from_hf(hf: dict[str, Any]) -> LlamaConfig:
  """A :class:`LlamaConfig` from the parsed ``config.json`` of a Hugging Face checkpoint.

  Raises:
    NotImplementedError: architectures or features this model does not
      implement (sliding-window attention, partial rotary, other RoPE types,
      QK norms, ...), named in the message.
  """
  model_type = hf.get("model_type", "llama")
  if model_type not in SUPPORTED_MODEL_TYPES:
    raise NotImplementedError(f"model_type {model_type!r} is not supported (supported: "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)})")
  if model_type == "qwen2" and hf.get("use_sliding_window"):
    raise NotImplementedError("Qwen2 sliding-window attention (use_sliding_window) is not "
                              "implemented")
  if model_type == "mistral" and hf.get("sliding_window") is not None:
    raise NotImplementedError(f"Mistral sliding-window attention (sliding_window="
                              f"{hf['sliding_window']}) is not implemented")
  rope = hf.get("rope_parameters") or {}
  if rope and all(isinstance(v, dict) for v in rope.values()):
    raise NotImplementedError("per-layer-type rope_parameters are not implemented")
  rope = {**(hf.get("rope_scaling") or {}), **rope}
  rope_type = rope.get("rope_type", rope.get("type", "default"))
  if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise NotImplementedError("partial_rotary_factor != 1 is not implemented")
  if rope_type not in ("default", "linear", "llama3"):
    raise NotImplementedError(
        f"RoPE type {rope_type!r} is not implemented (supported: default, linear, llama3)")
  qwen2 = model_type == "qwen2"
  return LlamaConfig(
      vocab_size=int(hf["vocab_size"]),
      hidden_size=int(hf["hidden_size"]),
      intermediate_size=int(hf["intermediate_size"]),
      num_hidden_layers=int(hf["num_hidden_layers"]),
      num_attention_heads=int(hf["num_attention_heads"]),
      num_key_value_heads=hf.get("num_key_value_heads"),
      head_dim=hf.get("head_dim"),
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
      rope_type=rope_type,
      rope_factor=float(rope.get("factor", 1.0)),
      rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
      rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
      rope_original_max_position_embeddings=rope.get("original_max_position_embeddings"),
      attention_bias=True if qwen2 else bool(hf.get("attention_bias", False)),
      o_proj_bias=False if qwen2 else None,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      hidden_act=hf.get("hidden_act", "silu"),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      initializer_range=float(hf.get("initializer_range", 0.02)),
      model_type=model_type,
  )


def config_to_hf(config: LlamaConfig, *, dtype=jnp.float32) -> dict[str, Any]:
  """The ``config.json`` content for ``config`` (``transformers`` 5 layout, also readable by 4.x)."""
  if config.model_type == "qwen2":
    if not (config.attention_bias and config.o_proj_bias is False):
      raise ValueError("a qwen2 config has q/k/v biases and no o_proj bias")
  elif config.o_proj_bias is not None and config.o_proj_bias != config.attention_bias:
    raise ValueError(f"model_type {config.model_type!r} cannot express o_proj_bias != "
                     "attention_bias")
  rope: dict[str, Any] = {"rope_theta": config.rope_theta, "rope_type": config.rope_type}
  if config.rope_type in ("linear", "llama3"):
    rope["factor"] = config.rope_factor
  if config.rope_type == "llama3":
    rope.update(low_freq_factor=config.rope_low_freq_factor,
                high_freq_factor=config.rope_high_freq_factor,
                original_max_position_embeddings=config.rope_original_max_position_embeddings)
  arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
          "qwen2": "Qwen2ForCausalLM"}[config.model_type]
  out = {
      "architectures": [arch],
      "model_type": config.model_type,
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_hidden_layers,
      "num_attention_heads": config.num_attention_heads,
      "num_key_value_heads": config.num_key_value_heads,
      "head_dim": config.head_dim,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_parameters": rope,
      "rope_theta": config.rope_theta,
      "rope_scaling": None if config.rope_type == "default" else
                      {k: v for k, v in rope.items() if k != "rope_theta"},
      "mlp_bias": config.mlp_bias,
      "tie_word_embeddings": config.tie_word_embeddings,
      "hidden_act": config.hidden_act,
      "max_position_embeddings": config.max_position_embeddings,
      "initializer_range": config.initializer_range,
      "dtype": jnp.dtype(dtype).name,
  }
  if config.model_type == "qwen2":
    out["use_sliding_window"] = False
  else:
    out["attention_bias"] = config.attention_bias
  if config.model_type == "mistral":
    out["sliding_window"] = None
  return out


def read_hf_config(directory: str | os.PathLike) -> LlamaConfig:
  """The :class:`LlamaConfig` of a checkpoint directory's ``config.json``."""
  path = Path(directory) / CONFIG_NAME
  if not path.is_file():
    raise HFCheckpointError(f"{path}: missing; not a Hugging Face checkpoint directory")
  try:
    hf = json.loads(path.read_text("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise HFCheckpointError(f"{path}: not valid JSON ({err})") from None
  try:
    return config_from_hf(hf)
  except KeyError as err:
    raise HFCheckpointError(f"{path}: missing field {err}") from None


# -- weights ----------------------------------------------------------------


def read_hf_weights(directory: str | os.PathLike) -> dict[str, np.ndarray]:
  """``{tensor name: array}`` of ``model.safetensors`` or of the shards its index lists.

  Raises:
    HFCheckpointError: no weights file, a missing shard, or a tensor the index
      lists that its shard does not hold.
  """
  directory = Path(directory)
  single, index = directory / WEIGHTS_NAME, directory / INDEX_NAME
  try:
    if single.is_file():
      return safetensors_format.read(single)[0]
    if not index.is_file():
      extra = (" (only PyTorch pickles, which are not read: re-save with safetensors)"
               if any(directory.glob("*.bin")) else "")
      raise HFCheckpointError(f"{directory}: neither {WEIGHTS_NAME} nor {INDEX_NAME}{extra}")
    try:
      weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
      raise HFCheckpointError(f"{index}: not a safetensors index ({err!r})") from None
    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
      path = directory / shard
      if not path.is_file():
        raise HFCheckpointError(f"{index} lists shard {shard!r}, which is missing")
      tensors.update(safetensors_format.read(path)[0])
  except safetensors_format.SafetensorsError as err:
    raise HFCheckpointError(str(err)) from None
  absent = sorted(name for name in weight_map if name not in tensors)
  if absent:
    raise HFCheckpointError(f"{index}: tensor(s) listed but absent from their shards: "
                            + ", ".join(absent))
  return tensors


def hf_tensor_name(path: tuple[Any, ...]) -> tuple[str, bool]:
  """``(Hugging Face tensor name, transposed?)`` for a Flax state path of the model."""
  *module, leaf = (str(p) for p in path)
  if leaf == "kernel":
    return ".".join([*module, "weight"]), True
  if leaf == "embedding":
    return ".".join([*module, "weight"]), False
  return ".".join([*module, leaf]), False


def _torch_shape(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
  return tuple(reversed(shape)) if transposed else tuple(shape)


def load_hf_llama(directory: str | os.PathLike, *, dtype=jnp.float32,
                  attn_implementation: str | None = None) -> LlamaForCausalLM:
  """Build a :class:`LlamaForCausalLM` from a Hugging Face checkpoint directory.

  Reads ``config.json`` and the safetensors weights (single file or shards),
  transposes every linear ``weight [d_out, d_in]`` to ``kernel [d_in, d_out]``
  and casts to ``dtype``. The model is built abstractly first, so nothing is
  randomly initialised.

  Args:
    directory: the checkpoint directory (``save_pretrained`` output).
    dtype: parameter and activation dtype.
    attn_implementation: see :class:`dora_jax.models.llama.LlamaAttention`.

  Returns:
    The model, with float ``dtype`` parameters.

  Raises:
    HFCheckpointError: missing files, missing or unexpected tensors (all of
      them listed), or a tensor whose shape does not fit (named, with the
      checkpoint's and the expected shape in torch layout).
    NotImplementedError: an unsupported architecture feature in the config.
  """
  directory = Path(directory)
  config = read_hf_config(directory)
  tensors = read_hf_weights(directory)
  abstract = nnx.eval_shape(lambda: LlamaForCausalLM(
      config, dtype=dtype, attn_implementation=attn_implementation, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  used, missing, mismatched, filled = set(), [], [], []
  for path, var in flat:
    name, transposed = hf_tensor_name(path)
    want = _torch_shape(var.shape, transposed)
    if name not in tensors:
      missing.append(f"{name} {want}")
      continue
    used.add(name)
    arr = tensors[name]
    if tuple(arr.shape) != want:
      mismatched.append(f"{name}: checkpoint {tuple(arr.shape)}, model expects {want}")
      continue
    if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.kind != "V":
      mismatched.append(f"{name}: dtype {arr.dtype}, expected a float tensor")
      continue
    value = (arr.T if transposed else arr).astype(jnp.dtype(dtype))
    filled.append((path, var.replace(jnp.asarray(value))))
  ignorable = {n for n in tensors if n.endswith(_IGNORED_SUFFIXES)}
  if config.tie_word_embeddings:
    ignorable.add("lm_head.weight")  # some tied checkpoints store the (shared) head too
  unexpected = sorted(set(tensors) - used - ignorable)
  problems = []
  if missing:
    problems.append("missing tensor(s) (name, expected torch shape): " + ", ".join(missing))
  if unexpected:
    problems.append("unexpected tensor(s) (not part of the model the config describes): "
                    + ", ".join(f"{n} {tuple(tensors[n].shape)}" for n in unexpected))
  if mismatched:
    problems.append("shape mismatch: " + "; ".join(mismatched))
  if problems:
    raise HFCheckpointError(f"{directory}: the weights do not fit config.json "
                            f"({config.model_type}, {config.num_hidden_layers} layers, hidden "
                            f"{config.hidden_size}): " + ". ".join(problems))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def hf_state_dict(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
  """``{Hugging Face tensor name: array}`` in torch layout for a plain (un-adapted) model.

  Raises:
    ValueError: the model carries DoRA adapters (merge or unmerge it first).
  """
  from dora_jax import surgery
  if surgery.dora_layers(model):
    raise ValueError("the model carries DoRA adapters: save dora_jax.merge(model) (merged "
                     "weights) or dora_jax.unmerge(model) (the base), or the adapters alone "
                     "with dora_jax.save_adapter")
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    name, transposed = hf_tensor_name(path)
    arr = np.asarray(jax.device_get(var[...]))
    out[name] = np.ascontiguousarray(arr.T if transposed else arr)
  return out


def save_hf_llama(model: LlamaForCausalLM, directory: str | os.PathLike) -> Path:
  """Write ``config.json`` and ``model.safetensors`` that ``transformers`` and :func:`load_hf_llama` load.

  Use it for a random test checkpoint or to serve a merged fine-tune
  (``save_hf_llama(dora_jax.merge(model), out)``). Files are replaced atomically.

  Returns:
    ``directory`` as a :class:`pathlib.Path`.
  """
  tensors = hf_state_dict(model)
  dtype = next(iter(tensors.values())).dtype
  config = json.dumps(config_to_hf(model.config, dtype=dtype), indent=2) + "\n"
  weights = safetensors_format.encode(tensors, {"format": "pt"})
  directory = Path(directory)
  atomic.write_files(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: config.encode("utf-8")},
                     commit=CONFIG_NAME)
  return directory

"""Hugging Face PEFT-compatible DoRA adapters on disk: ``adapter_model.safetensors`` + ``adapter_config.json``.

What is written (and read), for every DoRA layer, with ``<name>`` the PEFT
module name (see :mod:`dora_jax.io.naming`) and the layer's 2-D view
``lora_a [d_in, r]``, ``lora_b [r, d_out]``, ``magnitude [d_out]``:

=============================================== ============== ===================
tensor                                          shape          from
=============================================== ============== ===================
``base_model.model.<name>.lora_A.weight``       ``[r, d_in]``  ``lora_a`` transposed
``base_model.model.<name>.lora_B.weight``       ``[d_out, r]`` ``lora_b`` transposed
``base_model.model.<name>.lora_magnitude_vector`` ``[d_out]``  ``magnitude``
=============================================== ============== ===================

Embedding and convolution layers (:class:`dora_jax.embed.DoRAEmbed`,
:class:`dora_jax.conv.DoRAConv`) are written in PEFT's layouts for
``torch.nn.Embedding`` and ``torch.nn.ConvNd``, as their ``peft_tensors()``
give them:

========================================================= ===========================
tensor                                                    shape
========================================================= ===========================
``base_model.model.<name>.lora_embedding_A``              ``[r, num_embeddings]``
``base_model.model.<name>.lora_embedding_B``              ``[features, r]``
``base_model.model.<name>.lora_magnitude_vector``         ``[features]``
``base_model.model.<name>.lora_A.weight`` (conv)          ``[r, in, *window]``
``base_model.model.<name>.lora_B.weight`` (conv)          ``[out, r, 1, ...]``
``base_model.model.<name>.lora_magnitude_vector`` (conv)  ``[1, out, 1, ...]``
========================================================= ===========================

These are the keys of ``peft.get_peft_model_state_dict`` for a DoRA LoRA
adapter (the adapter name is stripped on save), and the layout of a
``torch.nn.Linear(d_in, d_out)`` whose ``weight [d_out, d_in]`` is the Flax
kernel transposed. Tensors keep their dtype (float32 by default).

``LinearGeneral`` and ``Einsum`` layers are written through the same 2-D view:
the contracted axes are flattened row-major into ``d_in`` and the output axes
into ``d_out``, in the kernel's axis order. A Flax ``q_proj`` with kernel
``[hidden, heads, head_dim]`` thus corresponds to a torch
``Linear(hidden, heads * head_dim)`` whose output is viewed as
``[..., heads, head_dim]`` (Hugging Face's convention), and an ``o_proj`` with
kernel ``[heads, head_dim, hidden]`` to ``Linear(heads * head_dim, hidden)``.

``adapter_config.json`` holds PEFT's ``LoraConfig`` with ``use_dora: true``.
Layers may differ in rank and alpha: the most common values go to ``r`` and
``lora_alpha``, the others to ``rank_pattern``/``alpha_pattern`` keyed by
``^<escaped module name>`` (which PEFT applies to that module only).
``use_rslora`` and ``lora_dropout`` must be the same for every layer (PEFT has
one value of each). A model trained with the exact gradient
(``apply_dora(..., detach_norm=False)``, the same for every layer) also gets
``"dora_jax_detach_norm": false`` (:data:`DETACH_NORM_KEY`), which PEFT ignores
(its ``LoraConfig`` drops unknown keys with a warning) and :func:`load_adapter`
restores; without the key the gradient is PEFT's (detached). ``target_modules`` lists the last name components
(``["q_proj", "v_proj"]``, as PEFT writes) when they select exactly the adapted
layers among the model's adaptable ones, and the full module names otherwise.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dora_jax import surgery
from dora_jax._checks import check_float_dtype
from dora_jax.io import atomic, naming, safetensors_format
from dora_jax.io.naming import ModuleNameMap
from dora_jax.nnx import AdapterSite, DoRAEinsum, DoRALinearGeneral, DoRADense, OpSite, registry
from dora_jax.nnx import quantize as _quant

#: Base layer types stored as PEFT ``Linear`` adapters (2-D ``lora_A``/``lora_B``), and their
#: wrappers. Other DoRA layers (embeddings, convolutions) give their PEFT layout through
#: ``peft_tensors()``/``load_peft_tensors()``; a DoRA layer with neither is refused rather
#: than written in a form PEFT would misread.
LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)
LINEAR_WRAPPERS = (DoRADense, DoRALinearGeneral, DoRAEinsum, OpSite)

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
#: The config key recording ``detach_norm=False`` (written only then; absent: PEFT's
#: detached gradient). Training metadata: the forward is the same either way.
DETACH_NORM_KEY = "dora_jax_detach_norm"
#: The files :func:`save_adapter` writes and replaces as one (other entries of the directory stay).
ADAPTER_FILES = (WEIGHTS_NAME, CONFIG_NAME)
PREFIX = "base_model.model."
#: Suffixes of the tensors of one module -> the adapter parameter they hold.
SUFFIXES = {
    ".lora_A.weight": "lora_a",
    ".lora_B.weight": "lora_b",
    ".lora_magnitude_vector": "magnitude",
}
#: The suffixes of an embedding's tensors (its magnitude is ``.lora_magnitude_vector``).
EMBED_SUFFIXES = {
    ".lora_embedding_A": "lora_a",
    ".lora_embedding_B": "lora_b",
}
#: Every suffix accepted on load -> the adapter parameter it holds.
_ALL_SUFFIXES = {**SUFFIXES, **EMBED_SUFFIXES}
#: Older PEFT releases stored the magnitude under this name; accepted on load.
_MAGNITUDE_ALIAS = ".lora_magnitude_vector.weight"
#: safetensors metadata key linking the weights to their config (sha256 of the JSON bytes).
CONFIG_HASH_KEY = "dora_jax.config_sha256"

# Config keys of LoraConfig whose non-default values change what the adapter
# computes or which tensors it has; dora_jax refuses them rather than ignore them.
_UNSUPPORTED = {
    "fan_in_fan_out": "weights stored as [d_in, d_out] (GPT-2 Conv1D)",
    "modules_to_save": "fully trained extra modules",
    "layer_replication": "replicated layers",
    "lora_bias": "a trainable bias on lora_B",
    "target_parameters": "adapters on nn.Parameter targets",
    "trainable_token_indices": "trainable token embeddings",
    "use_qalora": "QALoRA",
    "megatron_config": "Megatron parallel layers",
    "alora_invocation_tokens": "activated LoRA",
}


class AdapterFormatError(ValueError):
  """An adapter directory is incomplete, corrupt, or does not fit the model."""


@dataclass(frozen=True)
class LayerSpec:
  """The adapter configuration of one module (PEFT name), as the config gives it."""

  rank: int
  alpha: float
  rslora: bool
  dropout: float
  detach_norm: bool = True


# -- helpers ----------------------------------------------------------------


def _number(value: float) -> int | float:
  """``16.0 -> 16`` (PEFT writes integral alphas as ints)."""
  return int(value) if float(value).is_integer() else float(value)


def _mode(values: list[Any]) -> Any:
  """The most common value (ties: the first in sorted order)."""
  counts = collections.Counter(values)
  best = max(counts.values())
  return sorted(v for v, c in counts.items() if c == best)[0]


def _candidate_paths(model: nnx.Module) -> list[str]:
  """Paths of every layer an adapter may name: adapted ones and adaptable ones.

  The root itself is ``""`` when it is a (DoRA) layer.
  """
  paths = {p for p, m in _module_lookup(model).items() if _is_adaptable(m)}
  return sorted(paths)


def _is_linear(module: nnx.Module) -> bool:
  """A linear-type base layer or its DoRA wrapper (what a PEFT ``Linear`` adapter maps to)."""
  return type(module) in LINEAR_TYPES or isinstance(module, LINEAR_WRAPPERS)


def _is_adaptable(module: nnx.Module) -> bool:
  """A layer ``apply_dora`` can wrap (Linear kinds, Embed, Conv, ...), a quantized base
  layer (``Quantized<Base>``) or a DoRA layer."""
  return (registry.wrapper_for(module) is not None or isinstance(module, AdapterSite)
          or _quant.is_quantized_module(module))


def _has_peft_layout(layer: AdapterSite) -> bool:
  """Whether the layer gives its own PEFT tensors (embeddings, convolutions)."""
  return hasattr(layer, "peft_tensors") and hasattr(layer, "load_peft_tensors")


def _module_lookup(model: nnx.Module) -> dict[str, nnx.Module]:
  """``{'/'-joined path: module}`` for every module (the root is ``""``), DoRA internals
  excluded, op-level adapted modules given as their adapted weights (sites)."""
  return registry.lookup(model)


def _target_modules(adapted: list[str], all_names: list[str]) -> list[str]:
  short = sorted({name.rsplit(".", 1)[-1] for name in adapted})
  selected = {n for n in all_names if naming.peft_matches(short, n)}
  return short if selected == set(adapted) else sorted(adapted)


def _layer_arrays(layer: AdapterSite) -> dict[str, np.ndarray]:
  """``{suffix: array}`` in PEFT's layout for the layer (2-D Linear view, or its own)."""
  if _has_peft_layout(layer):
    return {suffix: np.ascontiguousarray(np.asarray(arr))
            for suffix, arr in layer.peft_tensors().items()}
  a, b, m = layer.adapter_views()
  return {".lora_A.weight": np.ascontiguousarray(np.asarray(a).T),
          ".lora_B.weight": np.ascontiguousarray(np.asarray(b).T),
          ".lora_magnitude_vector": np.asarray(m)}


# -- save -------------------------------------------------------------------


def adapter_config(model: nnx.Module, *, base_model_name_or_path: str | None = None,
                   module_name_map: ModuleNameMap = None,
                   task_type: str | None = None) -> dict[str, Any]:
  """The ``adapter_config.json`` content (a dict) that :func:`save_adapter` writes for ``model``."""
  config, _ = _build(model, base_model_name_or_path, module_name_map, task_type)
  return config


def _build(model, base_model_name_or_path, module_name_map, task_type):
  layers = surgery.dora_layers(model)
  if not layers:
    raise ValueError("save_adapter: the model has no DoRA layers (call apply_dora first)")
  others = [f"{p} ({type(l).__name__})" for p, l in layers
            if not isinstance(l, LINEAR_WRAPPERS) and not _has_peft_layout(l)]
  if others:
    raise NotImplementedError(
        "save_adapter writes PEFT adapters for DoRA on nnx.Linear, LinearGeneral, Einsum and "
        "layers with a PEFT layout (peft_tensors: Embed, Conv); these DoRA layers have "
        "none: " + ", ".join(others))
  batched = [f"{p} ({l.describe()})" for p, l in layers if getattr(l, "layout", None) is not None
             and l.layout.batch]
  if batched:
    raise NotImplementedError(
        "save_adapter: these DoRA layers have a kernel with batch axes (one norm per batch "
        "entry, block-diagonal), which a PEFT adapter (one [d_in, d_out] matrix per module) "
        "cannot express: " + ", ".join(batched))
  table = naming.name_table(_candidate_paths(model), module_name_map)
  names = {path: table[path] for path, _ in layers}
  rslora = {layer.rslora for _, layer in layers}
  if len(rslora) > 1:
    raise ValueError("save_adapter: PEFT has one use_rslora for all modules, but the DoRA "
                     "layers mix rsLoRA and plain scaling: "
                     + ", ".join(f"{p} (rslora={l.rslora})" for p, l in layers))
  dropouts = {layer.dropout_rate for _, layer in layers}
  if len(dropouts) > 1:
    raise ValueError("save_adapter: PEFT has one lora_dropout for all modules, but the DoRA "
                     "layers use " + ", ".join(f"{p}: {l.dropout_rate:g}" for p, l in layers))
  detach = {layer.detach_norm for _, layer in layers}
  if len(detach) > 1:
    raise ValueError("save_adapter: one adapter config records one detach_norm, but the DoRA "
                     "layers mix the exact and the detached gradient: "
                     + ", ".join(f"{p} (detach_norm={l.detach_norm})" for p, l in layers))
  r = _mode([layer.rank for _, layer in layers])
  alpha = _mode([layer.alpha for _, layer in layers])
  rank_pattern = {naming.exact_pattern(names[p]): l.rank for p, l in layers if l.rank != r}
  alpha_pattern = {naming.exact_pattern(names[p]): _number(l.alpha)
                   for p, l in layers if l.alpha != alpha}
  adapted_names = sorted(names.values())
  config = {
      "alpha_pattern": alpha_pattern,
      "auto_mapping": None,
      "base_model_name_or_path": base_model_name_or_path,
      "bias": "none",
      "fan_in_fan_out": False,
      "inference_mode": True,
      "init_lora_weights": True,
      "layer_replication": None,
      "layers_pattern": None,
      "layers_to_transform": None,
      "loftq_config": {},
      "lora_alpha": _number(alpha),
      "lora_dropout": float(dropouts.pop()),
      "megatron_config": None,
      "megatron_core": "megatron.core",
      "modules_to_save": None,
      "peft_type": "LORA",
      "r": int(r),
      "rank_pattern": rank_pattern,
      "revision": None,
      "target_modules": _target_modules(adapted_names, sorted(table.values())),
      "task_type": task_type,
      "use_dora": True,
      "use_rslora": bool(rslora.pop()),
  }
  if not detach.pop():
    config[DETACH_NORM_KEY] = False
  tensors = {}
  for path, layer in layers:
    for suffix, arr in _layer_arrays(layer).items():
      tensors[PREFIX + names[path] + suffix] = arr
  return config, tensors


def save_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                 base_model_name_or_path: str | None = None,
                 module_name_map: ModuleNameMap = None,
                 task_type: str | None = None) -> Path:
  """Write the model's DoRA adapters as a Hugging Face PEFT adapter directory.

  Creates ``directory`` if needed and writes ``adapter_model.safetensors``
  (``lora_A.weight [r, d_in]``, ``lora_B.weight [d_out, r]``,
  ``lora_magnitude_vector [d_out]`` per linear layer; embeddings and convs in
  PEFT's layouts for them, from their ``peft_tensors()``; keys
  ``base_model.model.<module>.…``) and ``adapter_config.json`` (``peft_type``
  ``LORA``, ``use_dora: true``, ``r``, ``lora_alpha``, ``rank_pattern``, ...).
  ``peft.PeftModel.from_pretrained(torch_model, directory)`` loads it; so does
  :func:`load_adapter`. An existing adapter is replaced crash-safely: the new
  files are written beside the directory and swapped in by rename (see
  :mod:`dora_jax.io.atomic`), so after any interruption the directory holds
  the previous adapter or the new one, complete. Other entries of the
  directory are kept.

  Args:
    model: an NNX model with DoRA layers (after :func:`dora_jax.apply_dora`).
    directory: where to write.
    base_model_name_or_path: recorded in the config (PEFT uses it to fetch the
      base model when none is given).
    module_name_map: Flax path -> PEFT module name (see :mod:`dora_jax.io.naming`).
    task_type: PEFT ``task_type`` to record (e.g. ``"CAUSAL_LM"``), or ``None``.

  Returns:
    ``directory`` as a :class:`pathlib.Path`.

  Raises:
    ValueError: no DoRA layers, layers mixing rsLoRA or dropout rates, or a
      module name map that collides or yields invalid names.
  """
  config, tensors = _build(model, base_model_name_or_path, module_name_map, task_type)
  config_bytes = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")
  from dora_jax import __version__
  metadata = {"format": "pt", CONFIG_HASH_KEY: hashlib.sha256(config_bytes).hexdigest(),
              "dora_jax.version": __version__}
  weights = safetensors_format.encode(tensors, metadata)
  directory = Path(directory)
  atomic.write_directory(directory, {WEIGHTS_NAME: weights, CONFIG_NAME: config_bytes})
  return directory


# -- load -------------------------------------------------------------------


def read_adapter_config(directory: str | os.PathLike) -> dict[str, Any]:
  """The parsed ``adapter_config.json`` of an adapter directory, validated for DoRA.

  Raises:
    AdapterFormatError: missing or malformed file, not a DoRA LoRA adapter, or
      features dora_jax does not implement (bias adapters, ``fan_in_fan_out``, ...).
  """
  directory = Path(directory)
  return _parse_config(_read_adapter_files(directory, (CONFIG_NAME,))[CONFIG_NAME],
                       directory / CONFIG_NAME)


def _read_adapter_files(directory: Path, names: tuple[str, ...]) -> dict[str, bytes | None]:
  """The bytes of ``names`` from one version of an adapter directory (``None``: absent).

  An interrupted save is recovered first (see :func:`dora_jax.io.atomic.reading`);
  the config must be there.
  """
  if os.path.lexists(directory) and not directory.is_dir():
    raise AdapterFormatError(f"{directory}: not a directory (an adapter is a directory holding "
                             f"{CONFIG_NAME} and {WEIGHTS_NAME})")
  with atomic.reading(directory, managed=ADAPTER_FILES):
    files = atomic.read_files(directory, names) if directory.is_dir() else {}
  if files.get(CONFIG_NAME) is None:
    raise AdapterFormatError(f"{directory / CONFIG_NAME}: missing; not a (complete) PEFT "
                             "adapter directory")
  return files


def _parse_config(data: bytes, path: Path) -> dict[str, Any]:
  try:
    config = json.loads(data.decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as err:
    raise AdapterFormatError(f"{path}: not valid JSON ({err})") from None
  _check_config(config, path)
  return config


def _check_config(config: Any, path: Path) -> None:
  def fail(msg: str) -> AdapterFormatError:
    return AdapterFormatError(f"{path}: {msg}")

  if not isinstance(config, dict):
    raise fail("not a JSON object")
  if config.get("peft_type") != "LORA":
    raise fail(f"peft_type is {config.get('peft_type')!r}, expected 'LORA'")
  if config.get("use_dora") is not True:
    raise fail("use_dora is not true: this is a plain LoRA adapter, not DoRA")
  r = config.get("r")
  if isinstance(r, bool) or not isinstance(r, int) or r < 1:
    raise fail(f"r must be a positive int, got {r!r}")
  alpha = config.get("lora_alpha")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
    raise fail(f"lora_alpha must be a number, got {alpha!r}")
  if not isinstance(config.get("use_rslora", False), bool):
    raise fail(f"use_rslora must be a bool, got {config.get('use_rslora')!r}")
  if not isinstance(config.get(DETACH_NORM_KEY, True), bool):
    raise fail(f"{DETACH_NORM_KEY} must be a bool, got {config.get(DETACH_NORM_KEY)!r}")
  dropout = config.get("lora_dropout", 0.0)
  if (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
      or not 0 <= dropout < 1):
    raise fail(f"lora_dropout must be in [0, 1), got {dropout!r}")
  if config.get("bias", "none") != "none":
    raise fail(f"bias={config['bias']!r} is not supported (only 'none': no bias tensors)")
  for key, what in _UNSUPPORTED.items():
    if config.get(key) not in (None, False, [], {}):
      raise fail(f"{key}={config[key]!r} ({what}) is not supported by dora_jax")
  targets = config.get("target_modules")
  if targets is not None and not isinstance(targets, str) and not (
      isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
    raise fail(f"target_modules must be a string, a list of strings or null, got {targets!r}")
  for key, kind in (("rank_pattern", int), ("alpha_pattern", (int, float))):
    pattern = config.get(key) or {}
    if not isinstance(pattern, dict) or not all(
        isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
        for k, v in pattern.items()):
      raise fail(f"{key} must map strings to numbers, got {pattern!r}")
    if key == "rank_pattern" and any(v < 1 for v in pattern.values()):
      raise fail(f"rank_pattern ranks must be positive, got {pattern!r}")


def layer_spec(config: dict[str, Any], name: str) -> LayerSpec:
  """Rank, alpha, rsLoRA and dropout that PEFT would give module ``name`` under ``config``."""
  ranks = config.get("rank_pattern") or {}
  alphas = config.get("alpha_pattern") or {}
  rk = naming.pattern_key(ranks, name)
  ak = naming.pattern_key(alphas, name)
  return LayerSpec(rank=int(ranks[rk] if rk is not None else config["r"]),
                   alpha=float(alphas[ak] if ak is not None else config["lora_alpha"]),
                   rslora=bool(config.get("use_rslora", False)),
                   dropout=float(config.get("lora_dropout", 0.0)),
                   detach_norm=bool(config.get(DETACH_NORM_KEY, True)))


def _group_tensors(tensors: dict[str, np.ndarray], source: Path
                   ) -> dict[str, dict[str, tuple[str, np.ndarray]]]:
  """``{module name: {suffix: (tensor key, array)}}``; unknown or duplicated keys raise.

  Suffixes are those of :data:`SUFFIXES` and :data:`EMBED_SUFFIXES` (the old magnitude
  alias is filed under ``.lora_magnitude_vector``). Which of them a module needs depends
  on its layer kind and is checked by :func:`load_adapter`.
  """
  modules: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
  unknown = []
  for key, arr in tensors.items():
    hit = None
    if key.startswith(PREFIX):
      for suffix, canonical in [*((x, x) for x in _ALL_SUFFIXES),
                                (_MAGNITUDE_ALIAS, ".lora_magnitude_vector")]:
        if key.endswith(suffix) and len(key) > len(PREFIX) + len(suffix):
          hit = (key[len(PREFIX):-len(suffix)], canonical)
          break
    if hit is None:
      unknown.append(key)
      continue
    name, suffix = hit
    entry = modules.setdefault(name, {})
    param = _ALL_SUFFIXES[suffix]
    clash = [k for s, (k, _) in entry.items() if _ALL_SUFFIXES[s] == param]
    if clash:
      raise AdapterFormatError(f"{source}: two tensors hold {param} of module {name!r}: "
                               f"{clash[0]!r} and {key!r}")
    entry[suffix] = (key, arr)
  if unknown:
    raise AdapterFormatError(
        f"{source}: {len(unknown)} tensor(s) are not DoRA adapter weights of the form "
        f"'{PREFIX}<module>{{{', '.join(_ALL_SUFFIXES)}}}' and would be ignored: "
        + ", ".join(sorted(unknown)))
  missing = [f"{PREFIX}{name}{suffix}" for name, entry in sorted(modules.items())
             for suffix in _expected_suffixes(entry) if suffix not in entry]
  if missing:
    raise AdapterFormatError(f"{source}: incomplete adapter, missing tensor(s): "
                             + ", ".join(missing))
  return modules


def _expected_suffixes(entry: dict[str, Any]) -> tuple[str, ...]:
  """The suffixes a module's tensors must have, from the layout its present tensors use."""
  if any(s in EMBED_SUFFIXES for s in entry):
    return (*EMBED_SUFFIXES, ".lora_magnitude_vector")
  return tuple(SUFFIXES)


def _want_shapes(layer: AdapterSite, rank: int) -> dict[str, tuple[int, ...]]:
  """``{suffix: shape}`` of the PEFT tensors of ``layer`` (adapted with ``rank``)."""
  if _has_peft_layout(layer):
    shapes = jax.eval_shape(layer.peft_tensors)
    return {suffix: tuple(s.shape) for suffix, s in shapes.items()}
  return {".lora_A.weight": (rank, layer.d_in), ".lora_B.weight": (layer.d_out, rank),
          ".lora_magnitude_vector": (layer.d_out,)}


def _layer_dims(module: nnx.Module, spec: LayerSpec, path: str) -> AdapterSite:
  """A DoRA wrapper of ``module`` with the spec's rank (adapted modules: the layer itself)."""
  if isinstance(module, AdapterSite):
    return module
  if _quant.is_quantized_module(module):
    return _QuantizedDims(module, spec, path)
  # A throwaway wrapper (it shares the base Variables and changes nothing in the model):
  # validates the rank against the layer and gives its 2-D view shapes.
  return registry.wrap(module, rank=spec.rank, alpha=spec.alpha, rslora=spec.rslora,
                                dropout=0.0, rngs=nnx.Rngs(0), path=path)


class _QuantizedDims:
  """The sizes of a quantized base layer (``Quantized<Base>``, one quantized weight) that
  a PEFT module maps to, its rank validated (what :func:`_layer_dims` gives)."""

  def __init__(self, module: nnx.Module, spec: LayerSpec, path: str):
    from dora_jax.nnx.base import check_config
    sites = _quant.config(module).sites
    if len(sites) != 1:
      raise NotImplementedError(
          f"{type(module).__name__} holds {len(sites)} quantized weights "
          f"({', '.join(p for p, _ in sites)}); a PEFT module adapts one")
    layout = sites[0][1]
    check_config(spec.rank, 0.0, layout, path)
    self.layout, self.d_in, self.d_out = layout, layout.d_in, layout.d_out


def load_adapter(model: nnx.Module, directory: str | os.PathLike, *,
                 module_name_map: ModuleNameMap = None, rngs: nnx.Rngs | None = None,
                 dtype=None, strict: bool = True) -> nnx.Module:
  """Load a PEFT DoRA adapter directory into an NNX model, in place.

  Reads ``adapter_config.json`` and ``adapter_model.safetensors`` (written by
  :func:`save_adapter` or by PEFT's ``save_pretrained``), maps every module
  name to a Flax path (inverting ``module_name_map`` over the model's layers),
  applies DoRA to the named layers that are not adapted yet (rank, alpha,
  rsLoRA, dropout and ``detach_norm`` from the config, ``rank_pattern``/``alpha_pattern``
  included) and sets ``lora_a [*in_shape, r]``, ``lora_b [r, *out_shape]``
  and ``magnitude [*out_shape]`` from ``lora_A.weight [r, d_in]``,
  ``lora_B.weight [d_out, r]`` and ``lora_magnitude_vector [d_out]`` (exact:
  transposes and reshapes only). Embedding and convolution layers take PEFT's
  layouts for them (``lora_embedding_A [r, num_embeddings]``,
  ``lora_embedding_B [features, r]``; conv ``lora_A.weight [r, in, *window]``,
  ``lora_B.weight [out, r, 1, ...]``, ``lora_magnitude_vector [1, out, 1, ...]``)
  through the layer's ``load_peft_tensors``; the shapes each layer needs are
  those of its ``peft_tensors()`` at the config's rank. Everything is validated before the model is
  touched, so a failed load leaves it unchanged.

  Args:
    model: an NNX model holding the base layers (adapted or not).
    directory: the adapter directory.
    module_name_map: Flax path -> PEFT module name (see :mod:`dora_jax.io.naming`).
    rngs: for the layers this call adapts: the ``dropout`` stream feeds their
      dropout (default ``nnx.Rngs(0)``); ``lora_a``'s init is overwritten.
    dtype: cast the tensors to this dtype (new layers get it as
      ``param_dtype``). Default: keep the file's dtype.
    strict: also require that every DoRA layer already in the model is in the file.

  Returns:
    ``model``.

  Raises:
    AdapterFormatError: missing/corrupt/truncated files, a config that does
      not match the tensors (e.g. a wrong ``r``, or ``target_modules`` that
      leaves out a module the file holds), tensors that are not adapter
      weights or name no layer of the model, missing tensors, shape or dtype
      mismatches (the message names the tensor and both shapes/dtypes), an
      adapted layer whose rank/alpha/rsLoRA differ from the config.

  Warns (``UserWarning``) when an already adapted layer's ``detach_norm`` differs
  from the config's (the values load; the layer keeps its own gradient mode).
  """
  target_dtype = None if dtype is None else check_float_dtype("dtype", dtype)
  directory = Path(directory)
  files = _read_adapter_files(directory, ADAPTER_FILES)
  config = _parse_config(files[CONFIG_NAME], directory / CONFIG_NAME)
  weights_path = directory / WEIGHTS_NAME
  if files[WEIGHTS_NAME] is None:
    extra = " (only adapter_model.bin, PyTorch pickle, which dora_jax does not read)" if (
        directory / "adapter_model.bin").exists() else ""
    raise AdapterFormatError(f"{weights_path}: missing{extra}")
  try:
    tensors, metadata = safetensors_format.decode(files[WEIGHTS_NAME], os.fspath(weights_path))
  except safetensors_format.SafetensorsError as err:
    raise AdapterFormatError(str(err)) from None
  expected_hash = metadata.get(CONFIG_HASH_KEY)
  if expected_hash is not None:
    actual = hashlib.sha256(files[CONFIG_NAME]).hexdigest()
    if actual != expected_hash:
      raise AdapterFormatError(
          f"{directory}: {CONFIG_NAME} is not the config {WEIGHTS_NAME} was saved with "
          "(edited, or files from different saves)")
  modules = _group_tensors(tensors, weights_path)
  if not modules:
    raise AdapterFormatError(f"{weights_path}: holds no adapter tensors")

  targets = config.get("target_modules")
  if targets is not None:
    if isinstance(targets, str):
      untargeted = [n for n in sorted(modules) if not naming.peft_matches(targets, n)]
    else:
      untargeted = [n for n in sorted(modules) if not naming.peft_matches(list(targets), n)]
    if untargeted:
      raise AdapterFormatError(
          f"{directory}: tensors for module(s) {', '.join(untargeted)} that target_modules="
          f"{targets!r} does not select (PEFT would not load them): config and weights disagree")

  paths = _candidate_paths(model)
  table = naming.name_table(paths, module_name_map)
  by_name = {name: path for path, name in table.items()}
  unmatched = sorted(set(modules) - set(by_name))
  if unmatched:
    raise AdapterFormatError(
        f"{weights_path}: module(s) {', '.join(unmatched)} name no adaptable layer of the "
        "model under the module name map. The model's layers map to: "
        + (", ".join(sorted(by_name)) or "(none)"))
  lookup = _module_lookup(model)

  plan = []  # (path, name, spec, layer-or-throwaway, {param: value})
  for name in sorted(modules):
    path = by_name[name]
    spec = layer_spec(config, name)
    module = lookup[path]
    entry = modules[name]
    a_key, a = next(entry[s] for s in entry if _ALL_SUFFIXES[s] == "lora_a")
    # A wrong r in the config shows first in lora_A's leading dim: say so plainly.
    if a.ndim >= 2 and a.shape[0] != spec.rank:
      raise AdapterFormatError(
          f"{directory}: the config gives module {name!r} rank {spec.rank}, but tensor "
          f"{a_key!r} has shape {tuple(a.shape)} (rank {a.shape[0]}): wrong r/rank_pattern "
          "in adapter_config.json or a mismatched weights file")
    try:
      layer = _layer_dims(module, spec, path)
    except (ValueError, TypeError, NotImplementedError) as err:
      raise AdapterFormatError(f"cannot adapt layer {path!r} (module {name!r}) with rank "
                               f"{spec.rank}: {err}") from None
    if isinstance(module, AdapterSite):
      mismatch = [f"{what} {have!r} vs {want!r}" for what, have, want in (
          ("rank", module.rank, spec.rank), ("alpha", module.alpha, spec.alpha),
          ("rslora", module.rslora, spec.rslora)) if have != want]
      if mismatch:
        raise AdapterFormatError(
            f"layer {path!r} is already adapted with a different configuration than "
            f"{CONFIG_NAME} gives module {name!r} (layer vs file): " + ", ".join(mismatch))
      if module.detach_norm != spec.detach_norm:
        warnings.warn(
            f"load_adapter: layer {path!r} has detach_norm={module.detach_norm}, but the "
            f"adapter in {directory} was trained with detach_norm={spec.detach_norm} "
            f"({DETACH_NORM_KEY} in {CONFIG_NAME}); the layer keeps detach_norm="
            f"{module.detach_norm}", UserWarning, stacklevel=2)
    want_shapes = _want_shapes(layer, spec.rank)
    kind = type(layer).__name__
    foreign = sorted(entry[s][0] for s in entry if s not in want_shapes)
    if foreign:
      raise AdapterFormatError(
          f"tensor(s) {', '.join(map(repr, foreign))} do not fit layer {path!r} ({kind}), "
          f"whose PEFT tensors are {PREFIX}{name}{{{', '.join(want_shapes)}}}")
    missing = [f"{PREFIX}{name}{s}" for s in want_shapes if s not in entry]
    if missing:
      raise AdapterFormatError(f"{weights_path}: incomplete adapter, missing tensor(s): "
                               + ", ".join(missing))
    values = {}
    for suffix, shape in want_shapes.items():
      key, arr = entry[suffix]
      param = _ALL_SUFFIXES[suffix]
      if tuple(arr.shape) != shape:
        raise AdapterFormatError(
            f"tensor {key!r} has shape {tuple(arr.shape)}, but layer {path!r} "
            f"({kind}, {layer.d_in} -> {layer.d_out}, rank {spec.rank}) needs {shape}")
      if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise AdapterFormatError(f"tensor {key!r} has dtype {arr.dtype}, expected a float dtype")
      if not np.all(np.isfinite(arr.astype(np.float32))):
        raise AdapterFormatError(f"tensor {key!r} holds non-finite values (NaN/inf)")
      have = getattr(module, param).dtype if isinstance(module, AdapterSite) else None
      if target_dtype is not None:
        arr = arr.astype(target_dtype)
      if have is not None and jnp.dtype(arr.dtype) != jnp.dtype(have):
        raise AdapterFormatError(
            f"tensor {key!r} has dtype {arr.dtype} but layer {path!r} stores {param} as "
            f"{jnp.dtype(have)} (pass dtype= to cast)")
      values[suffix] = arr
    dtypes = {jnp.dtype(v.dtype) for v in values.values()}
    if not isinstance(module, AdapterSite) and len(dtypes) > 1:
      raise AdapterFormatError(
          f"module {name!r}: its tensors mix dtypes {sorted(str(d) for d in dtypes)}; "
          "pass dtype= to load them into one param_dtype")
    plan.append((path, name, spec, layer, values))

  if strict:
    loaded = {path for path, *_ in plan}
    uncovered = [p for p in surgery.adapted_paths(model) if p not in loaded]
    if uncovered:
      raise AdapterFormatError(
          f"the model has DoRA layers the adapter in {directory} does not cover: "
          + ", ".join(uncovered) + " (pass strict=False to keep their current values)")

  # Everything checked: adapt the new layers (grouped by configuration), then assign.
  rngs = nnx.Rngs(0) if rngs is None else rngs
  groups: dict[tuple, set[str]] = collections.defaultdict(set)
  for path, name, spec, layer, values in plan:
    if not isinstance(lookup[path], AdapterSite):
      param_dtype = jnp.dtype(next(v for s, v in values.items()
                                   if _ALL_SUFFIXES[s] == "lora_a").dtype)
      groups[(spec.rank, spec.alpha, spec.rslora, spec.dropout, param_dtype,
              spec.detach_norm)].add(path)
  for (rank, alpha, rslora, dropout, param_dtype, detach_norm), group in sorted(
      groups.items(), key=lambda kv: sorted(kv[1])):
    if "" in group:
      raise AdapterFormatError("the model root is a single layer: wrap it with "
                               "dora_jax.nnx.wrap first, then load into that")
    surgery.apply_dora(model, targets=lambda p, m, g=frozenset(group): p in g, rank=rank,
                       alpha=alpha, rslora=rslora, dropout=dropout, param_dtype=param_dtype,
                       rngs=rngs, detach_norm=detach_norm)
  layers = dict(surgery.dora_layers(model))
  for path, name, spec, _, values in plan:
    layer = layers[path]
    if _has_peft_layout(layer):
      layer.load_peft_tensors(values)
      continue
    layer.lora_a[...] = jnp.asarray(values[".lora_A.weight"].T.reshape(*layer.in_shape, spec.rank))
    layer.lora_b[...] = jnp.asarray(values[".lora_B.weight"].T.reshape(spec.rank, *layer.out_shape))
    layer.magnitude[...] = jnp.asarray(values[".lora_magnitude_vector"].reshape(layer.out_shape))
  return model

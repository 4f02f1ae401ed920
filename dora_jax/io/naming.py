"""Flax module paths <-> Hugging Face (PEFT) module names.

A Flax NNX layer is addressed by its ``'/'``-joined attribute path from the
model root (``layers/0/self_attn/q_proj``, as :func:`dora_jax.surgery.dora_layers`
reports); a PyTorch/PEFT module by its ``'.'``-joined name inside the base
model (``model.layers.0.self_attn.q_proj``). PEFT's files prefix that name with
``base_model.model.``.

Default map (:func:`default_module_name`), for the usual Llama/Qwen/Gemma/Mistral
port layout where the Flax root holds the decoder stack directly:

==================================== ==========================================
Flax path                            PEFT module name
==================================== ==========================================
``layers/0/self_attn/q_proj``        ``model.layers.0.self_attn.q_proj``
``layers/3/mlp/down_proj``           ``model.layers.3.mlp.down_proj``
``model/layers/0/self_attn/q_proj``  ``model.layers.0.self_attn.q_proj``
``lm_head``                          ``lm_head``
``embed_tokens``, ``norm``           ``model.embed_tokens``, ``model.norm``
anything else                        ``'/'`` replaced by ``'.'``
==================================== ==========================================

That is: ``'/'`` becomes ``'.'``, and a path whose first component is one of
:data:`DECODER_ROOT_NAMES` (``layers``, ``embed_tokens``, ``norm``, ``rotary_emb``)
gets the ``model.`` prefix that Hugging Face's ``*ForCausalLM`` classes put
around the decoder.

Override with ``module_name_map``: a callable ``path -> name``, or a dict
``{path: name}`` whose entries take precedence over the default (paths not in
the dict use the default). The map is used in both directions: loading
inverts it over the model's adaptable layers, so a callable need not be
invertible in closed form, only injective on those paths.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Mapping, Union

#: ``module_name_map`` argument: a callable, a partial dict over the default, or ``None``.
ModuleNameMap = Union[Callable[[str], str], Mapping[str, str], None]

#: First path components that live under ``model.`` in Hugging Face causal LMs.
DECODER_ROOT_NAMES = ("layers", "embed_tokens", "norm", "rotary_emb")

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*")


def default_module_name(path: str) -> str:
  """The PEFT module name for a Flax path (see the module docstring)."""
  parts = [p for p in path.split("/") if p != ""]
  if not parts:
    raise ValueError("the model root itself has no PEFT module name; wrap the layer in a "
                     "module or pass module_name_map")
  if parts[0] in DECODER_ROOT_NAMES:
    parts = ["model", *parts]
  return ".".join(parts)


def resolve(module_name_map: ModuleNameMap) -> Callable[[str], str]:
  """A ``path -> name`` function from a ``module_name_map`` argument."""
  if module_name_map is None:
    return default_module_name
  if callable(module_name_map):
    return module_name_map
  if isinstance(module_name_map, Mapping):
    table = dict(module_name_map)
    return lambda path: table[path] if path in table else default_module_name(path)
  raise TypeError("module_name_map must be a callable path -> name, a dict {path: name} or "
                  f"None, got {type(module_name_map).__name__}")


def check_name(name: object, path: str) -> str:
  """Validate a mapped PEFT module name (dot-separated identifiers)."""
  if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
    raise ValueError(f"module_name_map gave {name!r} for {path!r}: a PEFT module name must be "
                     "dot-separated parts of letters, digits, '_' or '-'")
  return name


def name_table(paths: Iterable[str], module_name_map: ModuleNameMap) -> dict[str, str]:
  """``{path: PEFT name}`` for ``paths``; raises if two paths get the same name."""
  fn = resolve(module_name_map)
  table: dict[str, str] = {}
  owners: dict[str, str] = {}
  for path in paths:
    name = check_name(fn(path), path)
    if name in owners:
      raise ValueError(f"module_name_map maps both {owners[name]!r} and {path!r} to {name!r}")
    owners[name] = path
    table[path] = name
  return table


def peft_matches(target_modules: str | Iterable[str], name: str) -> bool:
  """Whether PEFT's ``target_modules`` selects module ``name`` (PEFT's own rule).

  A string is a regex matched in full; a list entry matches the name itself or
  a ``'.'``-separated suffix of it.
  """
  if isinstance(target_modules, str):
    return re.fullmatch(target_modules, name) is not None
  targets = list(target_modules)
  return name in targets or any(name.endswith("." + t) for t in targets)


def pattern_key(patterns: Iterable[str], name: str) -> str | None:
  """The first key of a PEFT ``rank_pattern``/``alpha_pattern`` that applies to ``name``.

  PEFT's rule (``peft.utils.other.get_pattern_key``): key ``k`` applies when
  ``re.match(rf"(.*\\.)?({k})$", name)`` succeeds.
  """
  for key in patterns:
    if re.match(rf"(.*\.)?({key})$", name):
      return key
  return None


def exact_pattern(name: str) -> str:
  """A ``rank_pattern`` key that applies to module ``name`` and nothing else."""
  return "^" + re.escape(name)

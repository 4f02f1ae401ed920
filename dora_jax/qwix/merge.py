"""Merging the adapters a :class:`~dora_jax.qwix.DoraProvider` created into plain weights.

``W' = m / ‖W + s·a·b‖ ⊙ (W + s·a·b)`` per adapted weight, in its own layout
(:func:`dora_jax.general.merge_weight`), using the layouts the provider recorded
(``provider.adapted``). The merged model is the original, un-intercepted model
type with merged weights and no adapters. A quantized weight (QDoRA,
``weight_qtype=``) merges to the float weight ``g ⊙ (Ŵ + s·a·b)`` in its float dtype.
"""

from __future__ import annotations

from typing import Any, Mapping

from flax import nnx
from flax.core import unfreeze

from dora_jax import general
from dora_jax.qwix.provider import SUFFIXES, DoraProvider

#: Attributes qwix sets on every NNX module it runs.
_QWIX_ATTRS = ("qwix_path", "disable_quant_stats_update", "qwix_rngs")


def _merged(weight, a, b, m, layout: general.WeightLayout, scale: float, where: str):
  if tuple(weight.shape) != tuple(layout.shape):
    raise NotImplementedError(
        f"{where}: the weight is stored as {tuple(weight.shape)} but entered its op as "
        f"{layout.shape}; merging through that reshape is not supported")
  if isinstance(weight, general.QuantizedWeight):  # g ⊙ (Ŵ + s·a·b), compiled once per shape
    from dora_jax import quantized
    return quantized.merge_weight(weight, a, b, m, scale)
  return general.merge_weight(weight, a, b, m, scale, layout).astype(weight.dtype)


def _module_at(model: nnx.Module, path: tuple):
  for p, module in nnx.iter_modules(model):
    if tuple(p) == tuple(path):
      return module
  raise KeyError(f"no module at {'/'.join(map(str, path))!r}")


def merge(model: nnx.Module, provider: DoraProvider) -> nnx.Module:
  """A copy of an NNX model adapted by ``qwix.apply_lora_to_model(model, provider, ...)``
  with merged weights, no adapters, and its original (un-intercepted) type."""
  if not provider.adapted:
    raise ValueError("merge: the provider adapted nothing (run apply_lora_to_model first)")
  out = nnx.clone(model)
  for (path, name), (layout, scale) in provider.adapted.items():
    module = _module_at(out, path)
    where = "/".join(map(str, path)) or "<root>"
    a, b, m = (getattr(module, name + s)[...] for s in SUFFIXES)
    var = getattr(module, name)
    var.set_value(_merged(var.get_value(), a, b, m, layout, scale, where))
    for s in SUFFIXES:
      delattr(module, name + s)
  for _, module in nnx.iter_modules(out):
    for attr in _QWIX_ATTRS:
      if attr in vars(module):
        delattr(module, attr)
  unquantized = getattr(type(out), "_unquantized_type", None)
  if unquantized is not None:
    out.__class__ = unquantized
  return out


def merge_params(params: Mapping[str, Any], provider: DoraProvider) -> dict[str, Any]:
  """Linen: the ``params`` collection with merged weights and no adapter entries (apply
  it with the original model)."""
  if not provider.adapted:
    raise ValueError("merge_params: the provider adapted nothing (run init first)")
  out = unfreeze(params)
  for (path, name), (layout, scale) in provider.adapted.items():
    node = out
    for key in path:
      node = node[key]
    where = "/".join(map(str, path)) or "<root>"
    a, b, m = (node.pop(name + s) for s in SUFFIXES)
    node[name] = _merged(node[name], a, b, m, layout, scale, where)
  return out

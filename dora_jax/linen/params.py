"""Functions of a Linen model's variables: find adapters, merge them, cache base norms.

An adapter (a dict with ``lora_a``, ``lora_b``, ``magnitude``) in the ``dora``
collection at path ``P`` adapts, in ``params``:

* the ``kernel`` or ``embedding`` of the module at ``P`` (the drop-in layers
  and intercepted ``nn.Dense``): ``[*in_shape, out]`` kernels (Dense, Conv) and
  embedding tables, on their ``[prod(in_shape), out]`` view;
* or the param at ``P`` itself (weights adapted at the op level by
  :func:`dora_jax.linen.intercept_dora`), in its
  :class:`dora_jax.general.WeightLayout`. The layout comes from ``layouts``
  (``Interception.layouts``; a weight stacked by ``nn.scan`` gets the stacking
  axes as batch axes) or, when absent, from the shapes of the weight and its
  adapters where they allow exactly one layout.
"""

from __future__ import annotations

import itertools
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from dora_jax import _adapter, general
from dora_jax.conv import conv_merge_kernel
from dora_jax.dense import lora_scale, merge_kernel
from dora_jax.linen import ops
from dora_jax.linen._common import (ADAPTER_COLLECTION, CACHE_COLLECTION, adapter_groups,
                                    dict_at, fresh_copy, join, node_at)


def _collection(variables: Mapping[str, Any], name: str) -> Mapping[str, Any]:
  """``variables[name]`` when ``variables`` is a variables dict holding it, else ``variables``."""
  return variables[name] if name in variables and isinstance(variables[name], Mapping) else variables


def adapter_paths(adapters: Mapping[str, Any]) -> list[str]:
  """Paths (``'/'``-joined) of the adapters in ``adapters`` (the ``dora`` collection or a
  variables dict holding it): module paths for adapters beside a kernel/embedding,
  ``<module path>/<param>`` for weights adapted at the op level."""
  return [join(p) for p in adapter_groups(_collection(adapters, ADAPTER_COLLECTION))]


def _shapes(layout, rank: int) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(int(d) for d in s) for s in layout.adapter_shapes(rank))


def _candidate_layouts(shape, a_shape, b_shape, m_shape) -> list:
  """Every :class:`WeightLayout` of a ``shape`` kernel under which the adapters have these shapes."""
  n = len(shape)
  found = []
  for roles in itertools.product("cbo", repeat=n):
    try:
      layout = general.WeightLayout(
          tuple(int(d) for d in shape),
          contracted=tuple(i for i in range(n) if roles[i] == "c"),
          batch=tuple(i for i in range(n) if roles[i] == "b"),
          output=tuple(i for i in range(n) if roles[i] == "o"))
    except ValueError:  # not a layout (e.g. nothing contracted)
      continue
    rank = a_shape[-1] if a_shape else 0
    if _shapes(layout, rank) == (tuple(a_shape), tuple(b_shape), tuple(m_shape)):
      found.append(layout)
  return found


def _stacked(layout, shape: tuple[int, ...]):
  """``layout`` for a weight stacked on leading axes (``nn.scan`` over layers: the
  recorded layout is one layer's); the stacking axes become batch axes."""
  lead = len(shape) - len(layout.shape)
  if lead <= 0 or shape[lead:] != tuple(layout.shape):
    return layout
  shift = lambda axes: tuple(i + lead for i in axes)
  return general.WeightLayout(shape, contracted=shift(layout.contracted),
                              batch=(*range(lead), *shift(layout.batch)),
                              output=shift(layout.output))


def weight_layout(path: str, kernel, group: Mapping[str, Any], layouts: Mapping[str, Any] | None,
                  what: str):
  """The layout of the op-level weight ``kernel`` at ``path`` (``ValueError`` when unknown)."""
  shapes = [tuple(jnp.shape(group[k])) for k in ("lora_a", "lora_b", "magnitude")]
  if layouts is not None and path in layouts:
    layout = _stacked(layouts[path], tuple(jnp.shape(kernel)))
    if tuple(layout.shape) != tuple(jnp.shape(kernel)) or _shapes(
        layout, shapes[0][-1]) != tuple(shapes):
      raise ValueError(f"{what}: layouts[{path!r}] = {layout} does not fit the weight "
                       f"{tuple(jnp.shape(kernel))} and adapters {shapes}")
    return layout
  found = _candidate_layouts(jnp.shape(kernel), *shapes)
  if len(found) == 1:
    return found[0]
  if not found:
    raise ValueError(f"{what}: the adapters at {path!r} {shapes} fit no layout of the weight "
                     f"{tuple(jnp.shape(kernel))}")
  raise ValueError(
      f"{what}: the weight at {path!r} {tuple(jnp.shape(kernel))} and its adapters {shapes} fit "
      f"{len(found)} layouts ({', '.join(str(l) for l in found)}); pass layouts= from the "
      "intercept_dora context that created them (with intercept_dora(...) as dora: ...; "
      "layouts=dora.layouts)")


def _targets(params: Mapping[str, Any], adapters: Mapping[str, Any], what: str):
  """``(path, group, holder, name)`` for each adapter: ``holder[name]`` is the adapted weight
  and ``name`` is ``None``-free; the op-level ones have ``holder`` = the module's params."""
  groups = adapter_groups(adapters)
  if not groups:
    raise ValueError(f"{what}: no DoRA adapters (lora_a/lora_b/magnitude) found")
  out = []
  for path in groups:
    group = node_at(adapters, path)
    node = node_at(params, path)
    if isinstance(node, Mapping) and ("kernel" in node or "embedding" in node):
      holder, name, op_level = node, "kernel" if "kernel" in node else "embedding", False
    elif path and hasattr(node, "shape"):
      holder, name, op_level = node_at(params, path[:-1]), path[-1], True
    else:
      raise ValueError(f"{what}: adapters at {join(path)!r} have no kernel or embedding in "
                       "params (nor a param of that name)")
    out.append((path, group, holder, name, op_level))
  return out


def merge_params(params: Mapping[str, Any], adapters: Mapping[str, Any], *, alpha: float,
                 rslora: bool = False, layouts: Mapping[str, Any] | None = None,
                 requantize: bool = False) -> dict:
  """Merged ``params`` for the plain model: every adapted weight ``W ← g ⊙ (W + s·a·b)``.

  Covers ``nn.Dense``/``DoRADense`` kernels, ``DoRAConv`` kernels, ``DoRAEmbed``
  tables (on their ``[prod(in_shape), out]`` view) and weights adapted at the op
  level in any layout (:func:`dora_jax.general.merge_weight`; batch axes merge
  per entry). Merged weights keep their shape and dtype.

  Args:
    params: the ``params`` collection, or a variables dict containing it.
    adapters: the ``dora`` collection, or a variables dict containing it.
    alpha, rslora: as used in training (the rank is read from ``lora_a``).
    layouts: ``Interception.layouts`` (``with intercept_dora(...) as dora``): the
      layout of each op-level weight; needed where the shapes allow several.
    requantize: for quantized weights (QDoRA): quantize the merged weight again with
      the same type and block size. Default: the float merged weight ``g ⊙ (Ŵ + s·a·b)``
      in the weight's float dtype (the plain model runs it as any float param).

  Returns:
    A new ``params`` dict (``{"params": ...}`` if a variables dict was given);
    the inputs are not modified.

  Raises:
    ValueError: no adapters, an adapter without its weight, or an unknown layout.
  """
  wrapped = "params" in params and isinstance(params["params"], Mapping)
  tree = fresh_copy(params["params"] if wrapped else params)
  ad = fresh_copy(_collection(adapters, ADAPTER_COLLECTION))
  for path, group, holder, name, op_level in _targets(tree, ad, "merge_params"):
    a, b, m = group["lora_a"], group["lora_b"], group["magnitude"]
    scale = lora_scale(alpha, int(a.shape[-1]), rslora=rslora)
    w = holder[name]
    if isinstance(w, general.QuantizedWeight):  # its layout is its own
      from dora_jax import quantized
      holder[name] = quantized.merge_weight(w, a, b, m, scale, requantize=bool(requantize))
    elif op_level:
      layout = weight_layout(join(path), w, group, layouts, "merge_params")
      holder[name] = general.merge_weight(w, a, b, m, scale, layout)
    elif name == "kernel" and w.ndim >= 3:
      holder[name] = conv_merge_kernel(w, a, b, m, scale)
    else:
      holder[name] = merge_kernel(w, a, b, m, scale)
  return {"params": tree} if wrapped else tree


def cache_base_norms(variables: Mapping[str, Any], *,
                     layouts: Mapping[str, Any] | None = None) -> dict:
  """``variables`` plus each adapted weight's frozen-kernel norms ``‖W‖²`` in ``dora_cache``.

  ``dora_cache/<layer path>/base_sq_norm [features]`` for Dense kernels,
  ``dora_cache/<module path>/<param>/base_sq_norm [*B, *O]`` for weights adapted
  at the op level. Applying the model with these variables skips re-reading
  every adapted kernel for ‖W‖² on each call (the kernels are frozen while the
  adapters train). Recompute them with this function whenever ``params`` change.
  Conv and embedding adapters do not read the cache and get none.

  Args:
    variables: a variables dict with the ``params`` and ``dora`` collections.
    layouts: as for :func:`merge_params`.

  Returns:
    A new variables dict (the input is not modified).

  Raises:
    ValueError: no adapters, an adapter without a matching kernel, or an unknown layout.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.linen import DoRADense, cache_base_norms
    >>> layer = DoRADense(features=8, rank=4, alpha=8)
    >>> variables = cache_base_norms(layer.init(jax.random.key(0), jnp.ones((2, 16))))
    >>> variables["dora_cache"]["base_sq_norm"].shape
    (8,)
  """
  if "params" not in variables or ADAPTER_COLLECTION not in variables:
    raise ValueError(f"cache_base_norms: variables need 'params' and '{ADAPTER_COLLECTION}' "
                     f"collections, got {sorted(variables)}")
  out = {k: fresh_copy(v) if isinstance(v, Mapping) else v for k, v in variables.items()}
  cache = out.setdefault(CACHE_COLLECTION, {})
  for path, group, holder, name, op_level in _targets(out["params"], out[ADAPTER_COLLECTION],
                                                      "cache_base_norms"):
    w = holder[name]
    if isinstance(w, general.QuantizedWeight):  # ‖Ŵ‖², cached when it was quantized
      dict_at(cache, path)["base_sq_norm"] = w.sq_norm
    elif op_level:
      layout = weight_layout(join(path), w, group, layouts, "cache_base_norms")
      dict_at(cache, path)["base_sq_norm"] = ops.base_sq_norm(w, layout)
    elif name == "kernel" and w.ndim == 2:
      dict_at(cache, path)["base_sq_norm"] = _adapter.column_sq_norm_jit(w)
  return out

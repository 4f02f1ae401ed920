"""Names, tree helpers and argument validation shared by the Linen DoRA modules.

Linen keeps variables in nested dicts keyed by module names. An adapter is a
dict holding ``lora_a``, ``lora_b`` and ``magnitude`` (:data:`ADAPTER_NAMES`):

* beside the weight it adapts, for the drop-in layers and intercepted
  ``nn.Dense`` (``dora/<module path>/lora_a``, the weight being the module's
  ``kernel`` or ``embedding``);
* under the weight's name, for weights adapted at the op level
  (``dora/<module path>/<param name>/lora_a``), so several params of one
  module can be adapted.
"""

from __future__ import annotations

import numbers
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict, unfreeze

from dora_jax import _adapter

#: Linen collection holding the trainable adapters ``lora_a``, ``lora_b``, ``magnitude``.
ADAPTER_COLLECTION = "dora"
#: Linen collection holding cached norms (``norm``/``stamp``, ``base_sq_norm``).
CACHE_COLLECTION = "dora_cache"
#: The leaves of one adapter.
ADAPTER_NAMES = ("lora_a", "lora_b", "magnitude")


def walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
  """``(path, leaf)`` for every non-mapping value of a nested dict, depth first."""
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from walk(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def adapter_groups(tree: Mapping[str, Any]) -> list[tuple[str, ...]]:
  """Paths of the dicts in ``tree`` that hold an adapter (all of :data:`ADAPTER_NAMES`)."""
  found = []

  def visit(node, path):
    if all(k in node and not isinstance(node[k], Mapping) for k in ADAPTER_NAMES):
      found.append(path)
    for key, value in node.items():
      if isinstance(value, Mapping):
        visit(value, (*path, key))

  visit(tree, ())
  return sorted(found)


def node_at(tree: Any, path: tuple[str, ...]) -> Any:
  """The value at ``path`` in a nested dict, or ``None`` when a key is missing."""
  node = tree
  for key in path:
    if not isinstance(node, Mapping) or key not in node:
      return None
    node = node[key]
  return node


def dict_at(tree: dict, path: tuple[str, ...]) -> dict:
  """The dict at ``path`` in ``tree``, created (empty) where missing."""
  node = tree
  for key in path:
    node = node.setdefault(key, {})
  return node


def fresh_copy(tree: Mapping[str, Any]) -> dict:
  """A new nested plain dict with the same leaves (a ``FrozenDict`` is unfrozen)."""
  tree = unfreeze(tree) if isinstance(tree, FrozenDict) else tree
  return jax.tree.map(lambda v: v, dict(tree))


def join(path: tuple[str, ...]) -> str:
  """``'/'``-joined path (the root's is ``''``)."""
  return "/".join(path)


def check_settings(where: str, *, rank: Any, alpha: Any, dropout: Any = 0.0,
                   adapter_dtype: Any = jnp.float32, d_in: int | None = None,
                   d_out: int | None = None, detach_norm: Any = True) -> float:
  """Validate a DoRA configuration; return the dropout rate as a float.

  ``rank`` is checked against ``min(d_in, d_out)`` when both are given (at the
  layer, once the weight is known). Raises ``TypeError``/``ValueError`` naming
  the argument and ``where``.
  """
  at = f" ({where})" if where else ""
  if not isinstance(detach_norm, bool):
    raise TypeError(f"detach_norm must be a bool, got {type(detach_norm).__name__}{at}")
  if isinstance(rank, bool) or not isinstance(rank, int):
    raise TypeError(f"rank must be an int, got {type(rank).__name__}{at}")
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got rank={rank}{at}")
  if d_in is not None and d_out is not None:
    _adapter.check_rank(rank, d_in, d_out, where)
  if isinstance(alpha, (bool, str)) or not (isinstance(alpha, numbers.Real)
                                             or np.shape(alpha) == ()):
    raise TypeError(f"alpha must be a real number, got {alpha!r}{at}")
  try:
    floating = jnp.issubdtype(jnp.dtype(adapter_dtype), jnp.floating)
  except TypeError:
    floating = False
  if not floating:
    raise TypeError(f"adapter_dtype must be a floating dtype, got {adapter_dtype!r}{at}")
  return _adapter.check_dropout(dropout)

"""DoRA for Flax Linen: drop-in layers, and adapting an existing model without editing it.

The adapters live in their own collection, :data:`ADAPTER_COLLECTION`
(``"dora"``), so the base stays frozen by construction: differentiate and
optimise ``variables["dora"]`` only. The collection maps to
:class:`dora_jax.nnx.DoRAParam` in Flax's Linen↔NNX bridge.

* Drop-in layers: :class:`DoRADense` (for ``nn.Dense``), :class:`DoRAEmbed`,
  :class:`DoRAConv` (same fields and parameter names, plus ``rank``,
  ``alpha``, ...).
* An existing model, any layer: inside ``with intercept_dora(targets, rank=...,
  alpha=...) as dora:`` every module whose path matches ``targets`` runs its
  weights as DoRA: ``nn.Dense``, and any module that calls ``jnp.einsum`` /
  ``jax.lax.dot_general`` on its own param (``nn.DenseGeneral``, ``nn.Einsum``,
  gemma's ``Einsum``, custom layers), in the weight's own layout::

    with intercept_dora(r".*Dense_\\d+", rank=8, alpha=16) as dora:
      _, adapters = model.apply(variables, x, rngs={"params": key}, mutable=["dora"])
      y = model.apply({**variables, **adapters}, x)

  and serve the plain model with
  ``merge_params(variables, adapters, alpha=16, layouts=dora.layouts)``.
* :func:`cache_base_norms` stores the frozen kernels' ``‖W‖²`` in ``dora_cache``.

Layout of the package: :mod:`~dora_jax.linen.dense`, :mod:`~dora_jax.linen.embed`,
:mod:`~dora_jax.linen.conv` (the drop-in layers), :mod:`~dora_jax.linen.ops`
(DoRA on one weight at its contraction), :mod:`~dora_jax.linen.intercept`
(:func:`intercept_dora`), :mod:`~dora_jax.linen.params` (merge, caches).
All run the same functional cores as the NNX layers, so NNX and Linen agree
given the same parameters.
"""

from __future__ import annotations

from dora_jax.linen._common import ADAPTER_COLLECTION, CACHE_COLLECTION
from dora_jax.linen.conv import DoRAConv
from dora_jax.linen.dense import DoRADense
from dora_jax.linen.embed import DoRAEmbed
from dora_jax.linen.intercept import INTERCEPTED_OPS, Interception, intercept_dora
from dora_jax.linen.params import adapter_paths, cache_base_norms, merge_params


def _register_bridge_name() -> None:
  """Map the ``dora`` collection to :class:`dora_jax.nnx.DoRAParam` in the Linen↔NNX bridge."""
  from flax.nnx import variablelib
  from dora_jax.nnx import DoRAParam
  if ADAPTER_COLLECTION not in variablelib.VariableTypeCache:
    variablelib.register_variable_name(ADAPTER_COLLECTION, DoRAParam)


_register_bridge_name()

__all__ = [
    "ADAPTER_COLLECTION",
    "CACHE_COLLECTION",
    "DoRAConv",
    "DoRADense",
    "DoRAEmbed",
    "INTERCEPTED_OPS",
    "Interception",
    "adapter_paths",
    "cache_base_norms",
    "intercept_dora",
    "merge_params",
]

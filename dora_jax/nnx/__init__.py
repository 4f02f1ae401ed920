"""DoRA layers for Flax NNX.

Two ways a layer gets adapters, both keeping the base weights' Variables (and
so the model's state paths) and adding :class:`DoRAParam` adapters (a
subclass of ``nnx.LoRAParam``: train them with ``nnx.Optimizer(model, tx,
wrt=nnx.LoRAParam)``):

* **Wrappers** for registered layer types (:data:`WRAPPERS`, :func:`register`):
  :class:`DoRADense` (``nnx.Linear``), :class:`DoRALinearGeneral`,
  :class:`DoRAEinsum` (any equation), :class:`DoRAEmbed`, :class:`DoRAConv`.
  The wrapper replaces the layer in the model.
* **The op-level layer** (:mod:`dora_jax.nnx.op`) for any other module whose own
  weight enters a ``jax.numpy.einsum``/``jax.lax.dot_general`` with the input
  (MaxText's ``DenseGeneral``, Tunix-style ``Einsum`` modules, subclasses that
  override ``__call__``): the module stays in place, its class becomes
  ``DoRA<Base>``, and the contraction is found by tracing ``example_inputs``.

Dropout (``dropout > 0``) follows PEFT: it applies to the adapter path only, is
active in training mode and off after ``model.eval()`` (or
``nnx.view(model, deterministic=True)``).

QDoRA (``apply_dora(..., base_dtype=)``): the adapted layers' frozen weights are
quantized in place and the layers adapted at the op level
(:mod:`~dora_jax.nnx.quantize`; ``Quantized<Base>`` modules are the quantized base).

Modules: :mod:`~dora_jax.nnx.base` (Variable types, the site protocol, the wrapper
base), :mod:`~dora_jax.nnx.dense`, :mod:`~dora_jax.nnx.einsum`,
:mod:`~dora_jax.nnx.embed`, :mod:`~dora_jax.nnx.conv` (wrappers),
:mod:`~dora_jax.nnx.op`, :mod:`~dora_jax.nnx.intercept`,
:mod:`~dora_jax.nnx.trace` (the op-level layer), :mod:`~dora_jax.nnx.quantize`
(quantized weights), :mod:`~dora_jax.nnx.registry`.
"""

from dora_jax.nnx.base import AdapterSite, DoRACache, DoRALayer, DoRAParam
from dora_jax.nnx.conv import DoRAConv
from dora_jax.nnx.dense import DoRADense, DoRALinearGeneral
from dora_jax.nnx.einsum import DoRAEinsum
from dora_jax.nnx.embed import DoRAEmbed
from dora_jax.nnx.op import DoRAOp, OpSite
from dora_jax.nnx.registry import WRAPPERS, register, wrap, wrapper_for

__all__ = [
    "AdapterSite",
    "DoRACache",
    "DoRAConv",
    "DoRADense",
    "DoRAEinsum",
    "DoRAEmbed",
    "DoRALayer",
    "DoRALinearGeneral",
    "DoRAOp",
    "DoRAParam",
    "OpSite",
    "WRAPPERS",
    "register",
    "wrap",
    "wrapper_for",
]

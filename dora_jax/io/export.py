"""Merged weights for serving: one safetensors file for the plain (un-adapted) model.

:func:`export_merged` replaces every DoRA layer by its merged plain layer
(``W' = m / ‖W + s·a·b‖ ⊙ (W + s·a·b)``, see :func:`dora_jax.merge`) and writes
every ``nnx.Param`` of the result (merged kernels, biases, embeddings, norms,
...) under its Flax state path:

* names are the attribute path joined by ``separator``: ``'/'`` (default,
  ``layers/0/self_attn/q_proj/kernel``) or ``'.'``
  (``layers.0.self_attn.q_proj.kernel``);
* arrays keep the Flax layout and dtype: a ``Linear`` kernel is ``[d_in,
  d_out]`` (transpose it for ``torch.nn.Linear.weight``), a ``LinearGeneral``
  or ``Einsum`` kernel keeps its full shape;
* the adapters, DoRA norm caches and RNG state are not written.

Load it back with ``safetensors`` (or :func:`dora_jax.io.safetensors_format.read`)
and ``nnx.update`` into the plain model. The file is replaced atomically.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from dora_jax import surgery
from dora_jax.general import QuantizedWeight
from dora_jax.io import atomic, safetensors_format


def merged_params(model: nnx.Module, *, separator: str = "/") -> dict[str, np.ndarray]:
  """``{name: array}`` that :func:`export_merged` writes (merging a copy if adapted)."""
  if separator not in ("/", "."):
    raise ValueError(f"separator must be '/' or '.', got {separator!r}")
  plain = surgery.merge(model) if surgery.dora_layers(model) else model
  out: dict[str, np.ndarray] = {}
  for path, value in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
    parts = [str(p) for p in path]
    if isinstance(value.get_value(), QuantizedWeight):
      raise TypeError(
          f"export_merged writes float weights, but {'/'.join(parts)} is quantized (a "
          "quantized base layer without adapters, or merge(requantize=True)); export the "
          "QDoRA model itself (its merge is float) or dequantize that layer")
    if any(separator in p for p in parts):
      raise ValueError(f"parameter path {parts} contains the separator {separator!r}; use the other one")
    out[separator.join(parts)] = np.asarray(jax.device_get(value[...]))
  return out


def export_merged(model: nnx.Module, path: str | os.PathLike, *, separator: str = "/") -> Path:
  """Write the merged model's parameters to the safetensors file ``path``.

  The model itself is not modified (a merged copy is written). See the module
  docstring for names and layouts.

  Returns:
    ``path`` as a :class:`pathlib.Path`.
  """
  params = merged_params(model, separator=separator)
  data = safetensors_format.encode(params, {"format": "flax", "layout": "flax",
                                            "separator": separator})
  return atomic.write_file(path, data)

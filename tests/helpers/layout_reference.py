"""Float64 references for DoRA on a weight in any layout, from its ``[*B, d_in, d_out]`` view.

Independent of :mod:`dora_jax.general`: the test states each weight's roles
(contracted, batch, output axes) and these helpers transpose and reshape with
numpy, form the dense ``W + s·a·b`` per batch entry, and fold ``g`` into it. By
linearity, contracting the result with the layer's own equation is the DoRA
output ``g ⊙ (x·W + s·(x·a)·b)`` (norm detached, as in PEFT).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from helpers.reference import f64


def merged_weight64(kernel, lora_a, lora_b, magnitude, scale, roles) -> np.ndarray:
  """``g ⊙ (W + s·a·b)`` in float64, in ``kernel``'s layout.

  ``roles = (contracted, batch, output)`` kernel axes; ``lora_a [*B, *C, r]``,
  ``lora_b [*B, r, *O]``, ``magnitude [*B, *O]``.
  """
  c, bt, o = roles
  w = f64(kernel)
  sizes = [[w.shape[i] for i in axes] for axes in (bt, c, o)]
  nb, ni, no = (math.prod(s) for s in sizes)
  perm = (*bt, *c, *o)
  w2 = np.transpose(w, perm).reshape(nb, ni, no)
  v = w2 + float(scale) * f64(lora_a).reshape(nb, ni, -1) @ f64(lora_b).reshape(nb, -1, no)
  g = f64(magnitude).reshape(nb, no) / np.sqrt(np.sum(v * v, axis=1))
  eff = (g[:, None, :] * v).reshape(*sizes[0], *sizes[1], *sizes[2])
  return np.transpose(eff, np.argsort(perm))


def perturb(rng: np.random.Generator, adapters):
  """Adapters with a non-zero ``lora_b`` and a magnitude away from ``‖W‖`` (``g ≠ 1``)."""
  def one(path, v):
    if path[-1].key == "lora_b":
      return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    if path[-1].key == "magnitude":
      return jnp.asarray(np.asarray(v) * (1 + 0.2 * rng.standard_normal(v.shape)), v.dtype)
    return v
  return jax.tree_util.tree_map_with_path(one, adapters)

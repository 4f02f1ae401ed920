"""Models for the QDoRA tests: filled with numpy draws (no op-by-op initialisers), adapters
moved off their init."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

import dora_jax


def sites(model):
  """``(path, layer)`` of every DoRA layer in ``model``."""
  return dora_jax.surgery.dora_layers(model)


def randomize(model, seed, b_scale=0.2):
  """Random non-zero ``lora_b`` and a magnitude away from ‖Ŵ‖ (numpy draws: no compiles)."""
  rng = np.random.default_rng(seed)
  for _, site in sites(model):
    site.lora_b[...] = jnp.asarray(b_scale * rng.standard_normal(site.lora_b.shape), jnp.float32)
    m = site.magnitude[...] * (1 + 0.1 * rng.standard_normal(site.magnitude.shape))
    site.magnitude[...] = m.astype(jnp.float32)


def filled(cls, seed):
  """``cls(rngs)`` with normal weights / sqrt(fan-in) drawn by numpy (built abstractly:
  no op-by-op initialisers)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  leaves = []
  for path, var in nnx.to_flat_state(state):
    value = rng.standard_normal(var.shape).astype(np.float32) / math.sqrt(max(var.shape[0], 1))
    leaves.append((path, var.replace(jnp.asarray(value))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))

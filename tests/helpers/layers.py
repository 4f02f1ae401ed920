"""Random DoRA layers and inputs for the tests (never zeros).

Drawn on the host with numpy from a generator seeded by a JAX key (the
``fresh_key`` fixture's, so fresh per test): ``jax.random`` compiles a program
per shape, which cost seconds per test on the CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def rng(key) -> np.random.Generator:
  """A numpy generator seeded by the JAX PRNG key ``key``."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel())


def device(value, dtype) -> jax.Array:
  """``value`` (numpy) as a JAX array of ``dtype``, rounded on the host."""
  return jnp.asarray(np.asarray(value).astype(jnp.dtype(dtype)))


def normal(key_or_rng, shape, dtype=jnp.float32, scale=1.0) -> jax.Array:
  """``scale·N(0, 1)`` samples of ``shape`` in ``dtype`` (rounded once from float32)."""
  g = key_or_rng if isinstance(key_or_rng, np.random.Generator) else rng(key_or_rng)
  return device(scale * g.standard_normal(shape, dtype=np.float32), dtype)


def uniform(key_or_rng, shape, minval, maxval, dtype=jnp.float32) -> jax.Array:
  """Uniform samples in ``[minval, maxval)`` of ``shape`` in ``dtype``."""
  g = key_or_rng if isinstance(key_or_rng, np.random.Generator) else rng(key_or_rng)
  return device(g.uniform(minval, maxval, shape).astype(np.float32), dtype)


def make_layer(key, d_in, d_out, rank, lead=(5,), *, dtype=jnp.float32, param_dtype=None,
               bias=True, b_scale=0.3):
  """Random ``(x, kernel, lora_a, lora_b, magnitude, bias, cotangent)``.

  ``lora_b`` is non-zero (``b_scale``) so the adapter changes the output, and the
  magnitude is perturbed from the column norms so ``g`` is not exactly 1.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  g = rng(key)
  x = normal(g, (*lead, d_in), dtype)
  kernel = normal(g, (d_in, d_out), param_dtype, 1.0 / np.sqrt(d_in))
  lora_a = uniform(g, (d_in, rank), -1.0 / np.sqrt(d_in), 1.0 / np.sqrt(d_in), param_dtype)
  lora_b = normal(g, (rank, d_out), param_dtype, b_scale)
  column_norms = np.linalg.norm(np.asarray(kernel).astype(np.float32), axis=0)
  magnitude = device(column_norms * (1.0 + 0.2 * g.standard_normal(d_out, dtype=np.float32)),
                     param_dtype)
  b = normal(g, (d_out,), param_dtype, 0.5) if bias else None
  cot = normal(g, (*lead, d_out), dtype)
  return x, kernel, lora_a, lora_b, magnitude, b, cot

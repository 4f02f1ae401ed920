"""Helpers for the NNX/Linen/surgery tests: random adapters and float64 references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from helpers.reference import f64


def np_rng(key) -> np.random.Generator:
  """A numpy generator seeded from a JAX key (host-side randomness: no compilation)."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def build(make, key, *, std=0.3):
  """``make()`` traced abstractly, then every ``nnx.Param`` filled with N(0, std²) values.

  Much faster on a CPU than running Flax initialisers op by op, and just as random.
  """
  from flax import nnx
  rng = np_rng(key)
  module = nnx.eval_shape(make)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Param):
      var.set_value(jnp.asarray(rng.normal(0.0, std, var.shape).astype(var.dtype)))
  return module


def randomize_adapters(layer, key, *, b_scale=0.3, m_jitter=0.2):
  """Give an NNX DoRA layer a non-zero ``lora_b`` and a magnitude away from the norm."""
  rng = np_rng(key)
  b = b_scale * rng.normal(size=layer.lora_b.shape)
  m = np.asarray(layer.magnitude[...]) * (1.0 + m_jitter * rng.normal(size=layer.magnitude.shape))
  layer.lora_b[...] = jnp.asarray(b, layer.lora_b.dtype)
  layer.magnitude[...] = jnp.asarray(m, layer.magnitude.dtype)


def g_is_exact_at_init() -> bool:
  """Whether ``dora_dense`` gives ``g == 1`` exactly when ``m == n`` (a property of dense.py).

  ``g = m · (1/n)`` can round to 1 − 2⁻²⁴; ``g = m / n`` cannot. Probed on many
  random columns, so the answer reflects the implementation, not luck.
  """
  w = jax.random.normal(jax.random.key(123), (64, 512))
  a = jnp.zeros((64, 2))
  b = jnp.zeros((2, 512))
  m = jnp.sqrt(dora_jax.column_sq_norm(w))
  g = dora_jax.dora_norm_scale(w, a, b, m, 1.0)
  return bool(jnp.all(g == 1.0))


def reproduces_base(y, y_base) -> bool:
  """Assert ``y`` equals ``y_base`` to a few ulp of the output scale; return bit equality.

  (``g`` is 1 up to one rounding and ``y = g·pre + bias`` may cancel, hence the
  output-scale tolerance.) Collect the returned flags and finish the test with
  :func:`require_bit_exact`, so every case is checked before the verdict.
  """
  y, y_base = np.asarray(y), np.asarray(y_base)
  assert y.shape == y_base.shape and y.dtype == y_base.dtype
  tol = 4 * np.finfo(y.dtype).eps * float(np.max(np.abs(y_base)))
  assert np.max(np.abs(y.astype(np.float64) - y_base)) <= tol
  return bool(np.array_equal(y, y_base))


def require_bit_exact(flags) -> None:
  """Fail unless every flag is True; an expected failure while dense.py rounds ``g``."""
  flags = list(flags)
  if all(flags):
    return
  if not g_is_exact_at_init():
    pytest.xfail(f"{flags.count(False)}/{len(flags)} outputs differ from the base in the last "
                 "ulp: dora_dense computes g = m * (1/n), which rounds to 1 - 2^-24 for "
                 "some columns; g = m / n would make the init output bit-exact")
  raise AssertionError(f"init output not bit-exact for {flags.count(False)}/{len(flags)} cases")


def einsum_reference(eq: str, x, kernel, lora_a, lora_b, magnitude, scale, bias,
                     bias_broadcast_shape=None) -> np.ndarray:
  """Float64 DoRA through the layer's own einsum equation, no 2-D views.

  ``kernel [*in_shape, *out_shape]`` (contracted axes first), ``lora_a
  [*in_shape, r]``, ``lora_b [r, *out_shape]``, ``magnitude [*out_shape]``. The
  norm is taken over the contracted axes of ``W + s·a·b`` in its own shape.
  """
  k = f64(kernel)
  a, b, m = f64(lora_a), f64(lora_b), f64(magnitude)
  n_in = a.ndim - 1
  delta = np.tensordot(a, b, axes=([n_in], [0]))
  w_eff = k + float(scale) * delta
  norm = np.sqrt(np.sum(w_eff ** 2, axis=tuple(range(n_in))))
  v = w_eff * (m / norm)
  y = np.einsum(eq, f64(x), v)
  if bias is not None:
    y = y + f64(bias).reshape(bias_broadcast_shape if bias_broadcast_shape else f64(bias).shape)
  return y


def kernel_reductions(closed_jaxpr, kernel_shapes) -> int:
  """How many ``reduce_sum`` ops (recursively, sub-jaxprs included) read an array
  whose shape is in ``kernel_shapes``: each is one full pass over a kernel."""
  import jax.extend  # noqa: F401, PLC0415  (jax.extend.core.Jaxpr)

  count = 0

  def visit(jaxpr):
    nonlocal count
    for eqn in jaxpr.eqns:
      if "refine_cancelled" in str(eqn.source_info.name_stack):
        continue  # dora_jax.norm.REFINE_SCOPE: runs only for cancelled columns
      if eqn.primitive.name == "reduce_sum" and tuple(eqn.invars[0].aval.shape) in kernel_shapes:
        count += 1
      for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
          if isinstance(item, jax.extend.core.ClosedJaxpr):
            visit(item.jaxpr)
          elif isinstance(item, jax.extend.core.Jaxpr):
            visit(item)

  visit(closed_jaxpr.jaxpr)
  return count

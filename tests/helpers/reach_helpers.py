"""Checks shared by the reach tests (synthetic modules, third-party models).

Float64 references are built from the weight viewed as ``[d_in, d_out]`` (per batch
entry), with the axes' roles given by the test, not by the library's layout.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from helpers.reference import f64, rel_err

#: Base weights: every nnx.Param that is not an adapter.
BASE = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))


def matrix_view(kernel, contracted, batch, output) -> np.ndarray:
  """``kernel`` as float64 ``[*B, d_in, d_out]`` (axes transposed, then flattened)."""
  k = f64(kernel)
  shape = k.shape
  k = np.transpose(k, (*batch, *contracted, *output))
  nb = [shape[i] for i in batch]
  return k.reshape(*nb, math.prod(shape[i] for i in contracted),
                   math.prod(shape[i] for i in output))


def from_matrix_view(matrix, shape, contracted, batch, output) -> np.ndarray:
  """The inverse of :func:`matrix_view`."""
  perm = (*batch, *contracted, *output)
  k = matrix.reshape(*(shape[i] for i in perm))
  return np.transpose(k, np.argsort(perm))


def merged_reference(site, contracted, batch=(), output=None, *, kernel=None) -> np.ndarray:
  """Float64 ``g ⊙ (W + s·a·b)`` of an adapted weight, in the kernel's shape, computed on
  the ``[d_in, d_out]`` view with a dense ``a·b`` (the roles of the kernel's axes as the
  test states them)."""
  kernel = site.kernel[...] if kernel is None else kernel
  shape = np.shape(kernel)
  output = tuple(i for i in range(len(shape)) if i not in contracted and i not in batch) \
      if output is None else output
  w = matrix_view(kernel, contracted, batch, output)
  nb, d_in, d_out = w.shape[:-2], w.shape[-2], w.shape[-1]
  a = f64(site.lora_a[...]).reshape(*nb, d_in, -1)
  b = f64(site.lora_b[...]).reshape(*nb, -1, d_out)
  m = f64(site.magnitude[...]).reshape(*nb, d_out)
  full = w + float(site.scale) * a @ b
  n = np.sqrt(np.sum(full * full, axis=-2))
  return from_matrix_view(full * (m / n)[..., None, :], shape, contracted, batch, output)


def randomize(site, rng: np.random.Generator, *, b_scale=0.3, m_jitter=0.2) -> None:
  """A non-zero ``lora_b`` and a magnitude away from the norm (so ``g != 1``)."""
  site.lora_b[...] = jnp.asarray(b_scale * rng.normal(size=site.lora_b.shape),
                                 site.lora_b.dtype)
  m = f64(site.magnitude[...]) * (1 + m_jitter * rng.normal(size=site.magnitude.shape))
  site.magnitude[...] = jnp.asarray(m, site.magnitude.dtype)


def base_state(model) -> dict:
  return {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, BASE))}


def assert_base_unchanged(model, before: dict) -> None:
  after = base_state(model)
  assert after.keys() == before.keys()
  for key, value in before.items():
    np.testing.assert_array_equal(after[key], value, err_msg=str(key))


def train(model, loss_fn, steps: int = 5, lr: float = 1e-2) -> list[float]:
  """``steps`` Adam steps on the ``nnx.LoRAParam``\\ s under ``nnx.jit``; the losses."""
  opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  return [float(step(model, opt)) for _ in range(steps)]


def assert_exact(actual, expected, what="") -> None:
  """Bit equality, with the largest difference in the message when it fails."""
  a, e = np.asarray(actual), np.asarray(expected)
  assert a.shape == e.shape and a.dtype == e.dtype, (what, a.shape, e.shape, a.dtype, e.dtype)
  if not np.array_equal(a, e):
    raise AssertionError(f"{what}: not bit-exact, max |diff| {np.max(np.abs(f64(a) - e)):.3g}")


__all__ = ["BASE", "assert_base_unchanged", "assert_exact", "base_state", "matrix_view",
           "merged_reference", "randomize", "rel_err", "train"]

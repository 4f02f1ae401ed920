"""The implementations compared by the benchmarks, as plain functions.

All take ``(x [T, d_in], kernel [d_in, d_out], p)`` with ``p`` a dict of
``a [d_in, r]``, ``b [r, d_out]``, ``m [d_out]``, ``bias [d_out]`` or ``None``
and a Python float ``scale``; all return ``[T, d_out]`` in x's dtype. The
suites use no bias, as in the Llama/Mistral projections whose shapes they time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import dora_jax


def lora(x, kernel, p, scale):
  """Plain JAX LoRA: the floor."""
  y = x @ kernel + scale * ((x @ p["a"]) @ p["b"])
  return y if p["bias"] is None else y + p["bias"]


def dora_naive_dense(x, kernel, p, scale):
  """What a naive port does: materialise a·b [d_in, d_out] for the norm."""
  dense = kernel.astype(jnp.float32) + scale * (p["a"] @ p["b"]).astype(jnp.float32)
  norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=0)))
  pre = x @ kernel + scale * ((x @ p["a"]) @ p["b"])
  return _scaled(p, norm, pre, x.dtype)


def _scaled(p, norm, pre, dtype):
  y = (p["m"].astype(jnp.float32) / norm) * pre
  return (y if p["bias"] is None else y + p["bias"]).astype(dtype)


def dora_factored_autodiff(x, kernel, p, scale):
  """Factored norm + plain autodiff (stop_gradient norm), no custom_vjp."""
  norm = jax.lax.stop_gradient(dora_jax.factored_norm(kernel, p["a"], p["b"], scale))
  pre = x @ kernel + scale * ((x @ p["a"]) @ p["b"])
  return _scaled(p, norm, pre, x.dtype)


def dora_jax_backend(backend):
  """dora_jax.dora_dense with the frozen kernel's column norms computed once and
  passed in (``base_sq_norm=p["w_sq"]``), which saves one read of the kernel per call."""
  def fn(x, kernel, p, scale):
    return dora_jax.dora_dense(x, kernel, p["a"], p["b"], p["m"], scale, p["bias"],
                               base_sq_norm=p.get("w_sq"), backend=backend)
  fn.__name__ = f"dora_jax_{backend}"
  return fn


def train_grads(impl):
  """``(x, p, kernel, cot, scale) -> (loss, (dx, dp))``: forward+backward of ``Σ y ⊙ cot``.

  The loss value is returned so the forward output is consumed: LoRA is linear
  in x, and ``jax.grad`` alone would let XLA drop its forward matmul entirely.
  """
  def loss(x, p, kernel, cot, scale):
    return jnp.sum((impl(x, kernel, p, scale) * cot).astype(jnp.float32))
  return jax.value_and_grad(loss, argnums=(0, 1))


def make_inputs(key, d_in, d_out, rank, tokens, dtype, sets, *, bias=False):
  """Random frozen kernel, adapter (non-zero b), ``sets`` inputs and cotangents."""
  ks = jax.random.split(key, 8)
  kernel = (jax.random.normal(ks[0], (d_in, d_out), jnp.float32) / d_in**0.5).astype(dtype)
  p = {
      "a": (jax.random.normal(ks[1], (d_in, rank)) / d_in**0.5).astype(dtype),
      "b": (0.01 * jax.random.normal(ks[2], (rank, d_out))).astype(dtype),
      "m": jnp.linalg.norm(kernel.astype(jnp.float32), axis=0).astype(dtype),
      "bias": (0.1 * jax.random.normal(ks[3], (d_out,))).astype(dtype) if bias else None,
  }
  p["w_sq"] = dora_jax.column_sq_norm(kernel)  # the kernel is frozen: computed once
  xs = [jax.random.normal(jax.random.fold_in(ks[4], i), (tokens, d_in)).astype(dtype)
        for i in range(sets)]
  cots = [jax.random.normal(jax.random.fold_in(ks[5], i), (tokens, d_out)).astype(dtype)
          for i in range(sets)]
  return kernel, p, xs, cots

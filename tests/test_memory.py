"""The memory claim, structurally: no matmul ever produces a [d_in, d_out] value.

CPU ``memory_analysis()`` numbers are not representative (XLA:CPU upcasts bf16
matmul operands and fuses differently), so the test inspects the traced
program instead: every ``dot_general`` in the jitted forward+backward, recursing
into sub-jaxprs (pjit, custom_vjp, loops), must have an output smaller than the
dense product.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import dora_jax
from helpers.jaxprs import dense_shaped_dots

D_IN, D_OUT, RANK, TOKENS = 1536, 2560, 64, 512


def _train_step(norm_fn):
  def loss(params, kernel, x, cot):
    return jnp.sum(norm_fn(x, kernel, params) * cot)

  return jax.jit(jax.grad(loss))


def _inputs(dtype=jnp.bfloat16):
  sd = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  params = {"a": sd(D_IN, RANK), "b": sd(RANK, D_OUT), "m": sd(D_OUT), "bias": sd(D_OUT)}
  return params, sd(D_IN, D_OUT), sd(TOKENS, D_IN), sd(TOKENS, D_OUT)


def _dora(x, kernel, p):
  return dora_jax.dora_dense(x, kernel, p["a"], p["b"], p["m"], 2.0, p["bias"], backend="xla")


def _dense_dora(x, kernel, p):
  """The naive port: materialises a·b for the norm (what the library avoids)."""
  dense = kernel.astype(jnp.float32) + 2.0 * (p["a"] @ p["b"]).astype(jnp.float32)
  norm = jax.lax.stop_gradient(jnp.linalg.norm(dense, axis=0))
  pre = x @ kernel + 2.0 * (x @ p["a"]) @ p["b"]
  return (p["m"] / norm * pre + p["bias"]).astype(x.dtype)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_train_step_has_no_dense_matmul(dtype):
  jaxpr = jax.make_jaxpr(_train_step(_dora))(*_inputs(dtype))
  assert dense_shaped_dots(jaxpr, D_IN, D_OUT) == []


def test_forward_has_no_dense_matmul():
  jaxpr = jax.make_jaxpr(jax.jit(_dora))(_inputs()[2], _inputs()[1], _inputs()[0])
  assert dense_shaped_dots(jaxpr, D_IN, D_OUT) == []


def test_checker_catches_the_naive_port():
  """The check can fail: the dense-a·b implementation is flagged."""
  jaxpr = jax.make_jaxpr(_train_step(_dense_dora))(*_inputs())
  assert dense_shaped_dots(jaxpr, D_IN, D_OUT) != []


def test_kernel_gradient_is_dense_only_when_requested():
  """Differentiating the frozen kernel is allowed and is the one dense output."""
  def loss(kernel, x, params, cot):
    return jnp.sum(_dora(x, kernel, params) * cot)

  params, kernel, x, cot = _inputs()
  jaxpr = jax.make_jaxpr(jax.grad(loss))(kernel, x, params, cot)
  assert len(dense_shaped_dots(jaxpr, D_IN, D_OUT)) == 1

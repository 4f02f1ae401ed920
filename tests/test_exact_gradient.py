"""``detach_norm=False``: the exact DoRA gradient through the norm, in factored form.

Every gradient equals ``jax.grad`` of the dense float64 formula *without* the
detach to 1e-12 (float64), finite differences agree, float32 stays within its
rounding on every backend (interpret mode off the GPU), the default stays
PEFT's detached gradient, and the exact step adds exactly one product with
the kernel and no ``[d_in, d_out]`` temporary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from helpers.jaxprs import dense_shaped_dots, dot_equations
from helpers.layers import make_layer
from helpers.reference import f64, rel_err

SCALE = 0.8


def _undetached(p, scale=SCALE):
  """Dense DoRA, the norm differentiated (float64 autodiff target)."""
  dense = p["kernel"] + scale * p["lora_a"] @ p["lora_b"]
  norm = jnp.sqrt(jnp.sum(dense * dense, axis=0))
  return p["magnitude"] / norm * (p["x"] @ p["kernel"] + scale * (p["x"] @ p["lora_a"]) @ p["lora_b"])


def _params(fresh_key, d_in, d_out, rank, dtype):
  x, kernel, lora_a, lora_b, magnitude, _, cot = make_layer(fresh_key(), d_in, d_out, rank,
                                                            lead=(6,), dtype=dtype)
  return dict(x=x, kernel=kernel, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude), cot


def _loss(p, cot, backend, detach):
  y = dora_jax.dora_dense(p["x"], p["kernel"], p["lora_a"], p["lora_b"], p["magnitude"], SCALE,
                          backend=backend, detach_norm=detach)
  return jnp.sum(y * cot)


def test_float64_exact_and_finite_differences(fresh_key):
  with jax.enable_x64(True):
    p, cot = _params(fresh_key, 23, 17, 4, jnp.float64)
    expected = jax.jit(jax.grad(lambda q: jnp.sum(_undetached(q) * cot)))(p)
    got = jax.jit(jax.grad(lambda q: _loss(q, cot, "xla", False)))(p)
    for name in p:  # the kernel's gradient included
      assert rel_err(got[name], expected[name]) < 1e-12, (name, rel_err(got[name], expected[name]))
    detached = jax.jit(jax.grad(lambda q: _loss(q, cot, "xla", True)))(p)
    assert rel_err(detached["lora_a"], expected["lora_a"]) > 1e-6  # the default is PEFT's
    eps = 1e-6
    direction = {k: jax.random.normal(fresh_key(), v.shape, jnp.float64) for k, v in p.items()}
    shifted = jax.jit(lambda t: _loss({k: p[k] + t * direction[k] for k in p}, cot, "xla", False))
    fd = float((shifted(eps) - shifted(-eps)) / (2 * eps))
    analytic = float(sum(jnp.sum(got[k] * direction[k]) for k in p))
    assert abs(fd - analytic) <= 1e-7 * max(1.0, abs(analytic))


@pytest.mark.parametrize("backend", ["xla", "pallas", "mosaic"])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_backends_within_rounding(fresh_key, backend, dtype, tol):
  if backend == "mosaic" and dtype == jnp.float32:
    pytest.skip("the Mosaic kernels take 2-byte dtypes (float32 runs XLA there)")
  d_in, d_out = (64, 128) if backend == "mosaic" else (40, 24)
  p, cot = _params(fresh_key, d_in, d_out, 8, dtype)
  with jax.enable_x64(True):
    p64 = {k: jnp.asarray(f64(v)) for k, v in p.items()}
    expected = jax.jit(jax.grad(lambda q: jnp.sum(_undetached(q) * jnp.asarray(f64(cot)))))(p64)
  adapters = ("x", "lora_a", "lora_b", "magnitude")
  got = jax.jit(jax.grad(lambda q: _loss({**p, **q}, cot, backend, False)))(
      {k: p[k] for k in adapters})
  for name in adapters:
    assert rel_err(got[name], expected[name]) < tol, (name, rel_err(got[name], expected[name]))


def test_one_more_kernel_product_and_no_dense_temporary():
  d_in, d_out, rank, tokens = 1536, 2560, 64, 512
  sd = jax.ShapeDtypeStruct
  p = dict(x=sd((tokens, d_in), jnp.bfloat16), lora_a=sd((d_in, rank), jnp.float32),
           lora_b=sd((rank, d_out), jnp.float32), magnitude=sd((d_out,), jnp.float32))
  kernel, cot = sd((d_in, d_out), jnp.bfloat16), sd((tokens, d_out), jnp.bfloat16)

  def step(detach):
    def loss(q, kernel, cot):
      y = dora_jax.dora_dense(q["x"], kernel, q["lora_a"], q["lora_b"], q["magnitude"], 2.0,
                              backend="xla", detach_norm=detach)
      return jnp.sum(y.astype(jnp.float32) * cot)
    return jax.make_jaxpr(jax.jit(jax.grad(loss)))(p, kernel, cot)

  def kernel_products(jaxpr):
    return sum(1 for eqn in dot_equations(jaxpr)
               if any(tuple(v.aval.shape) == (d_in, d_out) for v in eqn.invars))

  exact, detached = step(False), step(True)
  assert kernel_products(exact) == kernel_products(detached) + 1
  assert dense_shaped_dots(exact, d_in, d_out) == []


@pytest.mark.parametrize("adapter_dtype", [jnp.bfloat16, jnp.float32])
def test_kernel_products_stay_in_bf16(adapter_dtype):
  """A bf16 kernel meets no float32 operand in the exact step: the norm's
  ``∂a = W·∂Uᵀ`` runs as a bf16 product (``∂U`` split in two bf16 terms), not
  as a float32 GEMM over ``W`` upcast (several times slower on GPUs)."""
  d_in, d_out, rank, tokens = 256, 384, 16, 64
  sd = jax.ShapeDtypeStruct
  p = dict(x=sd((tokens, d_in), jnp.bfloat16), lora_a=sd((d_in, rank), adapter_dtype),
           lora_b=sd((rank, d_out), adapter_dtype), magnitude=sd((d_out,), jnp.float32))
  kernel, cot = sd((d_in, d_out), jnp.bfloat16), sd((tokens, d_out), jnp.bfloat16)

  def loss(q, kernel, cot):
    y = dora_jax.dora_dense(q["x"], kernel, q["lora_a"], q["lora_b"], q["magnitude"], 2.0,
                            backend="xla", detach_norm=False)
    return jnp.sum(y.astype(jnp.float32) * cot)

  jaxpr = jax.make_jaxpr(jax.jit(jax.grad(loss)))(p, kernel, cot)
  reads = [eqn for eqn in dot_equations(jaxpr)
           if any(tuple(v.aval.shape) in ((d_in, d_out), (d_out, d_in)) for v in eqn.invars)]
  assert len(reads) >= 3  # the forward's x·W and aᵀW, the backward's dx and ∂a
  mixed = [[v.aval.dtype.name for v in eqn.invars] for eqn in reads
           if any(v.aval.dtype != jnp.bfloat16 for v in eqn.invars)]
  assert not mixed, mixed
  if adapter_dtype == jnp.bfloat16:  # the norm's small products (G = aᵀa, G·b) too
    mixed = [[(v.aval.dtype.name, v.aval.shape) for v in eqn.invars]
             for eqn in dot_equations(jaxpr) if any(v.aval.dtype != jnp.bfloat16
                                                   for v in eqn.invars)]
    assert not mixed, mixed


def test_small_products_transpose_to_float32_accuracy(fresh_key):
  """The bf16 transposes of the norm's ``G·b`` and ``aᵀa`` (split cotangents)
  against float64: float32 outputs within 1e-5, bf16 ones within their own rounding."""
  from dora_jax import norm as norm_lib
  r, n, d_in = 12, 40, 64
  k = jax.random.split(fresh_key(), 4)
  a = jax.random.normal(k[0], (d_in, r)).astype(jnp.bfloat16)
  b = jax.random.normal(k[1], (r, n)).astype(jnp.bfloat16)
  g = norm_lib.gram(a)
  dy = jax.random.normal(k[2], (r, n))
  dgram = jax.random.normal(k[3], (r, r))
  _, vjp = jax.vjp(norm_lib._gram_times_b_bf16, g, b)
  dg, db = vjp(dy)
  _, vjp_gram = jax.vjp(norm_lib.gram, a)
  (da,) = vjp_gram(dgram)
  g64, b64, a64, dy64, dgram64 = (f64(v) for v in (g, b, a, dy, dgram))
  assert rel_err(dg, dy64 @ b64.T) < 1e-5
  assert rel_err(db, g64.T @ dy64) < 2 ** -8  # bf16 output
  assert rel_err(da, a64 @ (dgram64 + dgram64.T)) < 2 ** -8
  assert rel_err(norm_lib._gram_times_b_bf16(g, b), g64 @ b64) < 1e-6


def test_bf16_kernel_norm_gradient_accuracy(fresh_key):
  """The split transpose keeps float32 accuracy: the exact norm's gradient for a
  bf16 kernel and float32 adapters within 1e-5 of float64 (autodiff of the
  norm of the stored values)."""
  d_in, d_out, rank, scale = 96, 80, 8, 0.7
  k = jax.random.split(fresh_key(), 4)
  kernel = (jax.random.normal(k[0], (d_in, d_out)) / d_in ** 0.5).astype(jnp.bfloat16)
  a = jax.random.normal(k[1], (d_in, rank)) / d_in ** 0.5
  b = 0.3 * jax.random.normal(k[2], (rank, d_out))
  cot = jax.random.normal(k[3], (d_out,))
  got = jax.jit(jax.grad(lambda a, b: jnp.sum(dora_jax.factored_norm(kernel, a, b, scale) * cot),
                         argnums=(0, 1)))(a, b)
  with jax.enable_x64(True):
    w64 = jnp.asarray(f64(kernel))
    want = jax.grad(lambda a, b: jnp.sum(jnp.linalg.norm(w64 + scale * a @ b, axis=0)
                                         * jnp.asarray(f64(cot))), argnums=(0, 1))(
        jnp.asarray(f64(a)), jnp.asarray(f64(b)))
  for g, w in zip(got, want):
    assert rel_err(g, w) < 1e-5, rel_err(g, w)


def test_native_layout_norm_gradient_bf16_kernel(fresh_key):
  """The native-layout norm (``[N, D, H]``, gemma's layout) over a bf16 kernel:
  float32 adapters get their exact gradient within 1e-5 of float64 (1.5e-3
  when autodiff rounded it through the bf16 split), and, off the CPU, no
  product with the kernel takes a float32 operand."""
  from dora_jax import general
  n, d, h, rank, scale = 3, 48, 8, 4, 0.9
  layout = general.einsum_layout("btd,ndh->btnh", (1, 2, d), (n, d, h))
  k = jax.random.split(fresh_key(), 4)
  kernel = (jax.random.normal(k[0], (n, d, h)) / d ** 0.5).astype(jnp.bfloat16)
  a_shape, b_shape, m_shape = layout.adapter_shapes(rank)
  a = jax.random.normal(k[1], a_shape) / d ** 0.5
  b = 0.3 * jax.random.normal(k[2], b_shape)
  cot = jax.random.normal(k[3], m_shape)
  loss = lambda a, b: jnp.sum(general.weight_norm(kernel, a, b, scale, layout) * cot)
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)
  with jax.enable_x64(True):
    w2 = jnp.asarray(f64(kernel)).transpose(1, 0, 2).reshape(d, n * h)  # [D, N·H]
    want = jax.grad(lambda a, b: jnp.sum(
        jnp.linalg.norm(w2 + scale * a @ b.reshape(rank, n * h), axis=0).reshape(m_shape)
        * jnp.asarray(f64(cot))), argnums=(0, 1))(jnp.asarray(f64(a)), jnp.asarray(f64(b)))
  for g, w in zip(got, want):
    assert rel_err(g, w) < 1e-5, rel_err(g, w)
  if jax.default_backend() == "cpu":
    return  # the op upcasts bf16 operands for XLA:CPU's dots (general._contract)
  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
  mixed = [[v.aval.dtype.name for v in eqn.invars] for eqn in dot_equations(jaxpr)
           if any(tuple(v.aval.shape) == kernel.shape for v in eqn.invars)
           and any(v.aval.dtype != jnp.bfloat16 for v in eqn.invars)]
  assert not mixed, mixed

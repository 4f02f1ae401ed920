"""dora_dense: forward and every gradient against the float64 dense reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import compose
from helpers.layers import make_layer
from helpers.reference import dense_norm, dora_forward, dora_value_and_grads, f64, rel_err

# Relative (Frobenius) error bounds against float64, per activation dtype. bf16
# keeps 8 mantissa bits: its matmul outputs alone are off by ~2^-9 relative.
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2, jnp.float16: 3e-3}

# (d_in, d_out, rank, leading dims, bias): odd sizes, r = 1, r > d_out, batched;
# every dtype runs each shape, with and without a bias across the shapes.
SHAPES = [
    (37, 53, 1, (7,), True),
    (70, 41, 64, (3, 5), False),
    (129, 66, 16, (2, 3, 4), True),
    (16, 9, 12, (), False),
]


def _grads(x, kernel, lora_a, lora_b, magnitude, scale, bias, cot, backend="xla"):
  def loss(x, lora_a, lora_b, magnitude, bias):
    y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, scale, bias, backend=backend)
    return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))

  argnums = (0, 1, 2, 3, 4) if bias is not None else (0, 1, 2, 3)
  grads = jax.jit(jax.grad(loss, argnums=argnums))(x, lora_a, lora_b, magnitude, bias)
  names = ["x", "lora_a", "lora_b", "magnitude", "bias"][: len(argnums)]
  return dict(zip(names, grads))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_grads_match_float64(fresh_key, dtype, shape):
  d_in, d_out, rank, lead, with_bias = shape
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(
      fresh_key(), d_in, d_out, rank, lead, dtype=dtype, bias=with_bias)
  scale = dora_jax.lora_scale(2.0 * rank, rank)
  y = jax.jit(lambda *a: dora_jax.dora_dense(*a, backend="xla"))(
      x, kernel, lora_a, lora_b, magnitude, scale, bias)
  assert y.dtype == dtype and y.shape == (*lead, d_out)
  y_ref, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, scale, bias, cot)
  tol = TOL[dtype]
  assert np.all(np.isfinite(f64(y)))
  assert rel_err(y, y_ref) < tol
  grads = _grads(x, kernel, lora_a, lora_b, magnitude, scale, bias, cot)
  assert set(grads) == set(g_ref)
  for name, grad in grads.items():
    assert grad.shape == g_ref[name].shape, name
    assert grad.dtype == {"x": x}.get(name, kernel).dtype, name
    # bf16 gradients go through two bf16 matmuls: allow 2x the forward bound.
    assert rel_err(grad, g_ref[name]) < 2 * tol, (name, rel_err(grad, g_ref[name]))


def test_float64_is_exact(fresh_key):
  with jax.enable_x64(True):
    x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(
        fresh_key(), 45, 31, 6, (4, 3), dtype=jnp.float64)
    y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 0.7, bias)
    assert y.dtype == jnp.float64
    grads = _grads(x, kernel, lora_a, lora_b, magnitude, 0.7, bias, cot)
    norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 0.7)
    assert norm.dtype == jnp.float64
  y_ref, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, 0.7, bias, cot)
  assert rel_err(y, y_ref) < 1e-12
  assert rel_err(norm, dense_norm(kernel, lora_a, lora_b, 0.7)) < 1e-12
  for name, grad in grads.items():
    assert rel_err(grad, g_ref[name]) < 1e-12, name


def test_mixed_precision_bf16_activations_fp32_params(fresh_key):
  """bf16 activations with fp32 master weights: bf16 matmuls, fp32 norm and compose."""
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(
      fresh_key(), 96, 80, 8, (6,), dtype=jnp.bfloat16, param_dtype=jnp.float32)
  y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 0.5, bias)
  assert y.dtype == jnp.bfloat16
  y_ref, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, 0.5, bias, cot)
  assert rel_err(y, y_ref) < TOL[jnp.bfloat16]
  grads = _grads(x, kernel, lora_a, lora_b, magnitude, 0.5, bias, cot)
  for name, grad in grads.items():
    want = jnp.bfloat16 if name == "x" else jnp.float32
    assert grad.dtype == want, name
    assert rel_err(grad, g_ref[name]) < 2 * TOL[jnp.bfloat16], name


def test_bf16_kernel_fp32_lora_a_norm_is_fp32_accurate(fresh_key):
  """The hi/lo bf16 split of an fp32 lora_a keeps the norm at ~1e-5 relative."""
  _, kernel, lora_a, lora_b, *_ = make_layer(fresh_key(), 300, 70, 24, dtype=jnp.float32)
  kernel = kernel.astype(jnp.bfloat16)
  norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 1.3)
  assert norm.dtype == jnp.float32
  assert rel_err(norm, dense_norm(kernel, lora_a, lora_b, 1.3)) < 2e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_near_unity_regime_against_float64(fresh_key, dtype):
  """lora_b tiny so g ≈ 1: the DoRA change to the output must survive rounding.

  Forming ``g − 1`` from a bf16 ``g`` would zero it (bf16 cannot represent
  1 + 1e-5); the fp32 compose keeps ``g`` exact to fp32 and the output within
  the activation dtype's own rounding of the float64 answer.
  """
  x, kernel, lora_a, lora_b, _, bias, _ = make_layer(
      fresh_key(), 128, 96, 16, (32,), dtype=dtype, b_scale=1e-4)
  scale = 2.0
  # m = the base column norms (PEFT's init) + a tiny trained change: g ≈ 1 ± 1e-4.
  magnitude = (jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)
               * (1.0 + 1e-4 * jax.random.normal(fresh_key(), (96,)))).astype(dtype)
  g = dora_jax.dora_norm_scale(kernel, lora_a, lora_b, magnitude, scale)
  g_ref = f64(magnitude) / dense_norm(kernel, lora_a, lora_b, scale)
  assert g.dtype == jnp.float32
  assert np.max(np.abs(f64(g) - g_ref)) < 1e-6  # |g − 1| ~ 1e-4 is resolved
  assert np.max(np.abs(g_ref - 1.0)) > 1e-5
  y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  y_ref = dora_forward(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  if dtype == jnp.float32:
    # The DoRA delta itself (y − base) is accurate, not just y.
    base = f64(x) @ f64(kernel) + f64(bias)
    assert rel_err(f64(y) - base, y_ref - base) < 1e-3
  else:
    # Every element within the rounding bf16 itself imposes: the base matmul's
    # bf16 output (≤ 2^-8 of |x·W|) and the final bf16 output (≤ 2^-8 of |y|).
    xw = np.abs(f64(x) @ f64(kernel))
    bound = 2.0**-8 * (xw + np.abs(y_ref)) + 1e-6
    assert np.all(np.abs(f64(y) - y_ref) <= bound)


def test_gradients_wrt_kernel_and_scale_when_asked(fresh_key):
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(fresh_key(), 33, 27, 5, (4,))

  def loss(kernel, scale):
    return jnp.sum(dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, scale, bias) * cot)

  dk, ds = jax.grad(loss, argnums=(0, 1))(kernel, jnp.float32(0.8))
  _, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, 0.8, bias, cot,
                                  wrt_kernel=True)
  assert rel_err(dk, g_ref["kernel"]) < 2e-5
  # d/ds with the norm detached: Σ cot ⊙ g ⊙ (x·a·b).
  g = f64(magnitude) / dense_norm(kernel, lora_a, lora_b, 0.8)
  terms = f64(cot) * g * ((f64(x) @ f64(lora_a)) @ f64(lora_b))
  # A float32 sum of signed terms: its error is bounded by the terms' magnitudes, not by
  # |Σ terms| (random cotangents can make the sum cancel to a few percent of them).
  assert abs(float(ds) - np.sum(terms)) <= 2e-5 * np.sum(np.abs(terms))


def test_precomputed_norm_gives_identical_values_and_grads(fresh_key):
  """Gradient accumulation: a norm computed once per step and passed in."""
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(fresh_key(), 40, 30, 4, (6,))
  norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 0.5)

  def loss(params, norm):
    y = dora_jax.dora_dense(x, kernel, params["a"], params["b"], params["m"], 0.5, bias, norm=norm)
    return jnp.sum(y * cot)

  params = {"a": lora_a, "b": lora_b, "m": magnitude}
  v1, g1 = jax.value_and_grad(loss)(params, None)
  v2, g2 = jax.value_and_grad(loss)(params, norm)
  np.testing.assert_array_equal(v1, v2)
  for k in params:
    np.testing.assert_array_equal(g1[k], g2[k])


def test_vmap_jit_and_leading_dims_agree(fresh_key):
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(fresh_key(), 20, 18, 3, (4, 6))
  f = lambda xi: dora_jax.dora_dense(xi, kernel, lora_a, lora_b, magnitude, 1.5, bias)
  y_batched = f(x)
  y_vmap = jax.vmap(f)(x)
  y_jit = jax.jit(f)(x)
  np.testing.assert_allclose(y_vmap, y_batched, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(y_jit, y_batched, rtol=1e-6, atol=1e-6)
  # A 1-D x (one token) works too.
  np.testing.assert_allclose(f(x[0, 0]), y_batched[0, 0], rtol=1e-6, atol=1e-6)


def test_init_reproduces_base_layer(fresh_key):
  """b = 0 and m = ‖W‖: DoRA is the base layer (PEFT's init)."""
  x, kernel, lora_a, lora_b, _, bias, _ = make_layer(fresh_key(), 50, 40, 8, (9,))
  magnitude = jnp.sqrt(dora_jax.column_sq_norm(kernel))
  y = dora_jax.dora_dense(x, kernel, lora_a, jnp.zeros_like(lora_b), magnitude, 2.0, bias)
  np.testing.assert_allclose(y, x @ kernel + bias, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_merge_kernel_matches_unmerged(fresh_key, dtype):
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(
      fresh_key(), 64, 48, 8, (10,), dtype=dtype)
  merged = dora_jax.merge_kernel(kernel, lora_a, lora_b, magnitude, 0.25)
  assert merged.shape == kernel.shape and merged.dtype == dtype
  y_ref = dora_forward(x, kernel, lora_a, lora_b, magnitude, 0.25, bias)
  y_merged = f64(x) @ f64(merged) + f64(bias)
  assert rel_err(y_merged, y_ref) < {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}[dtype]


def test_lora_scale():
  assert dora_jax.lora_scale(16, 8) == 2.0
  assert dora_jax.lora_scale(16, 64, rslora=True) == 2.0
  with pytest.raises(ValueError, match="rank"):
    dora_jax.lora_scale(16, 0)
  with pytest.raises(TypeError, match="alpha"):
    dora_jax.lora_scale("16", 4)


def test_backend_argument_and_env(monkeypatch, fresh_key):
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(fresh_key(), 12, 10, 2)
  args = (x, kernel, lora_a, lora_b, magnitude, 1.0, bias)
  with pytest.raises(ValueError, match="backend"):
    dora_jax.dora_dense(*args, backend="cuda")
  monkeypatch.setenv("DORA_JAX_BACKEND", "nonsense")
  with pytest.raises(ValueError, match="DORA_JAX_BACKEND"):
    dora_jax.dora_dense(*args)
  monkeypatch.setenv("DORA_JAX_BACKEND", "xla")
  np.testing.assert_allclose(dora_jax.dora_dense(*args),
                             dora_jax.dora_dense(*args, backend="xla"), rtol=0, atol=0)


def test_precision_reaches_forward_and_backward(fresh_key):
  """``precision`` is applied to every matmul of the forward and of the backward."""
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(fresh_key(), 24, 20, 4, (3,))

  def loss(x, a):
    y = dora_jax.dora_dense(x, kernel, a, lora_b, magnitude, 0.5, bias,
                            precision=jax.lax.Precision.HIGHEST)
    return jnp.sum(y * cot)

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, lora_a).as_text()
  # the XLA matmuls (on a GPU the norm's refinement is a Triton kernel whose
  # serialised IR names dot_general too: its precision is the kernel's own)
  dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
  assert len(dots) >= 6  # forward x·W, x·a, h·b; backward dx (2), da, t
  assert all("HIGHEST" in line for line in dots), [l for l in dots if "HIGHEST" not in l][:3]
  with pytest.raises(ValueError, match="precision"):
    dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 0.5, precision="fastest")


@pytest.mark.parametrize("backend", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_magnitude_columns_get_the_true_magnitude_gradient(fresh_key, backend, dtype):
  """g = 0 columns (zero magnitudes): dm comes from pre, not 0 or NaN (21 tokens,
  bias-free: the case where the mosaic backend keeps y instead, see test_mosaic)."""
  x, kernel, lora_a, lora_b, magnitude, _, cot = make_layer(
      fresh_key(), 45, 38, 6, (3, 7), dtype=dtype, bias=False)
  magnitude = magnitude.at[jnp.array([0, 5, 37])].set(0)
  _, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, 1.5, None, cot)
  assert np.min(np.abs(g_ref["magnitude"][[0, 5, 37]])) > 1e-3  # a real gradient there
  grads = _grads(x, kernel, lora_a, lora_b, magnitude, 1.5, None, cot, backend=backend)
  tol = 2 * TOL[dtype]
  for name, grad in grads.items():
    assert np.all(np.isfinite(f64(grad))), name
    assert rel_err(grad, g_ref[name]) < tol, (name, rel_err(grad, g_ref[name]))
  dm = f64(grads["magnitude"])[[0, 5, 37]]
  # Per column, against the scale of the whole gradient (a column's sum can cancel).
  np.testing.assert_allclose(dm, g_ref["magnitude"][[0, 5, 37]], rtol=0,
                             atol=tol * np.max(np.abs(g_ref["magnitude"])))


def test_xla_backward_from_the_output_residual(fresh_key):
  """``backward_xla`` given y instead of pre (the kernel backends' derivative
  twin): dm from Σ dy ⊙ y / g, and zero-magnitude columns from pre recomputed."""
  x, kernel, lora_a, lora_b, magnitude, _, cot = make_layer(
      fresh_key(), 45, 38, 6, (21,), bias=False)
  magnitude = magnitude.at[jnp.array([0, 5, 37])].set(0)
  norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 1.5)
  g, inv_norm = magnitude / norm, 1.0 / norm
  scale = jnp.float32(1.5)
  y, pre, h = compose.forward_xla(x, kernel, lora_a, lora_b, g, scale, None)
  wants = compose.Wants(bias=False)
  from_pre = compose.backward_xla(compose.Residuals(x, kernel, lora_a, lora_b, h, pre, None, g,
                                                    inv_norm, scale), cot, wants)
  from_y = compose.backward_xla(compose.Residuals(x, kernel, lora_a, lora_b, h, None, y, g,
                                                  inv_norm, scale), cot, wants)
  _, g_ref = dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, 1.5, None, cot)
  assert rel_err(from_y.magnitude, g_ref["magnitude"]) < 2 * TOL[jnp.float32]
  np.testing.assert_allclose(f64(from_y.magnitude)[[0, 5, 37]], g_ref["magnitude"][[0, 5, 37]],
                             rtol=0, atol=2e-5 * np.max(np.abs(g_ref["magnitude"])))
  for name in ("x", "lora_a", "lora_b"):
    np.testing.assert_array_equal(getattr(from_y, name), getattr(from_pre, name))


def _wide_residuals(backend, with_bias, options, *args):
  """The ``[T, d_out]`` residuals of a vjp, and whether each is the output itself."""
  x, kernel, lora_a, lora_b, magnitude, bias = args

  def forward(x, a, b, m):
    y, vjp = jax.vjp(lambda x, a, b, m: dora_jax.dora_dense(
        x, kernel, a, b, m, 2.0, bias if with_bias else None, backend=backend,
        options=options), x, a, b, m)
    return y, jax.tree.leaves(vjp)

  closed = jax.make_jaxpr(forward)(x, lora_a, lora_b, magnitude)
  y_var, *leaves = closed.jaxpr.outvars
  return [leaf is y_var for leaf in leaves if leaf.aval.shape == y_var.aval.shape]


@pytest.mark.parametrize("backend,with_bias,options,keeps_output", [
    ("xla", False, None, False), ("xla", True, None, False),
    ("mosaic", False, None, True), ("mosaic", True, None, False),
    ("mosaic", False, dora_jax.KernelOptions(mosaic_residual="pre"), False)])
def test_the_backward_keeps_one_wide_residual(fresh_key, backend, with_bias, options,
                                             keeps_output):
  """One [T, d_out] activation is kept: pre, or on the mosaic backend without a
  bias the output y itself (unless the options ask for pre)."""
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(
      fresh_key(), 64, 256, 4, (128,), dtype=jnp.bfloat16)
  wide = _wide_residuals(backend, with_bias, options, x, kernel, lora_a, lora_b, magnitude, bias)
  assert wide == [keeps_output]


def test_kernel_options_are_validated_and_static(fresh_key):
  with pytest.raises(ValueError, match="mosaic_residual"):
    dora_jax.KernelOptions(mosaic_residual="y")
  with pytest.raises(ValueError, match="scale_reduce_max_width"):
    dora_jax.KernelOptions(scale_reduce_max_width=-1)
  with pytest.raises(TypeError, match="norm_kernel"):
    dora_jax.KernelOptions(norm_kernel=1)
  with pytest.raises(TypeError, match="pallas_dx"):
    dora_jax.KernelOptions(pallas_dx="yes")
  with pytest.raises(TypeError, match="pallas_tiles"):
    dora_jax.KernelOptions(pallas_tiles=(128, 256, 64))
  with pytest.raises(ValueError, match="block_n"):
    dora_jax.kernels.MatmulConfig(block_n=100)
  options = dora_jax.KernelOptions(pallas_tiles=dora_jax.kernels.MatmulConfig(16, 32, 16))
  assert hash(options) == hash(dora_jax.KernelOptions(
      pallas_tiles=dora_jax.kernels.MatmulConfig(16, 32, 16)))
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(fresh_key(), 12, 10, 2)
  with pytest.raises(TypeError, match="options"):
    dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 1.0, options={"norm_kernel": False})


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "jit_jvp", "vmap_jvp"])
def test_forward_mode_says_reverse_mode_only(fresh_key, transform):
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(fresh_key(), 12, 10, 2, (3,))
  f = lambda x: dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 1.0, bias)
  run = {"jvp": lambda: jax.jvp(f, (x,), (x,)),
         "jacfwd": lambda: jax.jacfwd(f)(x),
         "jit_jvp": lambda: jax.jit(lambda x: jax.jvp(f, (x,), (x,)))(x),
         "vmap_jvp": lambda: jax.jvp(jax.vmap(f), (x[None],), (x[None],))}[transform]
  with pytest.raises(TypeError, match="reverse mode only") as info:
    run()
  assert "jax.jacrev" in str(info.value) and "custom_jvp" in str(info.value)


def _second_order(backend, x, kernel, lora_a, lora_b, magnitude, bias, cot, options=None):
  """∂/∂(a, b, m) of ‖∂L/∂(x, a)‖² with L = Σ cot ⊙ dora_dense(...)."""
  def loss(x, a, b, m):
    y = dora_jax.dora_dense(x, kernel, a, b, m, 0.5, bias, backend=backend, options=options)
    return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32))

  def grad_norm(a, b, m):
    dx, da = jax.grad(loss, argnums=(0, 1))(x, a, b, m)
    return jnp.sum(jnp.square(dx.astype(jnp.float32))) + jnp.sum(jnp.square(da))

  return jax.jit(jax.grad(grad_norm, argnums=(0, 1, 2)))(lora_a, lora_b, magnitude)


def _second_order_f64(x, kernel, lora_a, lora_b, magnitude, bias, cot):
  with jax.enable_x64(True):
    args = [jnp.asarray(f64(v)) for v in (x, kernel, lora_a, lora_b, magnitude, bias, cot)]
    x, kernel, a0, b0, m0, bias, cot = args
    norm = jax.lax.stop_gradient(dense_norm(kernel, a0, b0, 0.5))

    def loss(x, a, b, m):
      pre = x @ kernel + 0.5 * (x @ a) @ b
      return jnp.sum((m / jnp.asarray(norm) * pre + bias) * cot)

    def grad_norm(a, b, m):
      dx, da = jax.grad(loss, argnums=(0, 1))(x, a, b, m)
      return jnp.sum(dx * dx) + jnp.sum(da * da)

    return [np.asarray(g) for g in jax.grad(grad_norm, argnums=(0, 1, 2))(a0, b0, m0)]


@pytest.mark.parametrize("backend,dtype", [("xla", jnp.float32), ("pallas", jnp.float32),
                                           ("mosaic", jnp.bfloat16)])
def test_second_order_reverse_mode(fresh_key, backend, dtype):
  """A gradient of a gradient: the kernel backends differentiate their backward
  through its XLA twin (pallas_call has no usable JVP rule), the Mosaic one
  from its output residual (bias-free); float64 oracle."""
  shape = (256, 256, 16, (128,)) if backend == "mosaic" else (37, 29, 5, (11,))
  x, kernel, lora_a, lora_b, magnitude, bias, cot = make_layer(
      fresh_key(), *shape, dtype=dtype, bias=backend != "mosaic")
  bias64 = jnp.zeros(kernel.shape[1]) if bias is None else bias
  got = _second_order(backend, x, kernel, lora_a, lora_b, magnitude, bias, cot,
                      options=dora_jax.KernelOptions(pallas_dx=True))
  want = _second_order_f64(x, kernel, lora_a, lora_b, magnitude, bias64, cot)
  tol = TOL[dtype]
  for name, g, w in zip(("lora_a", "lora_b", "magnitude"), got, want):
    assert rel_err(g, w) < tol, (name, rel_err(g, w))

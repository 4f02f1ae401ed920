"""The one-pass norm kernel ``‖W + s·a·b‖`` (Pallas, Triton lowering).

Interpret mode on the CPU (Triton on a GPU) vs its ``jax.numpy`` twin (float32
reassociation, ≤ 2e-6 relative) and vs the float64 dense norm (≤ 2e-6
relative: the kernel sums float32 squares of exact bf16/fp16 products). Shapes
are not multiples of the blocks, so every mask, the ragged rank step and the
last, partial row split are exercised; ranks 1, 16 and 384.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax.kernels import column_norm as cn
from dora_jax.kernels import dispatch
from helpers.layers import make_layer, normal, rng, uniform
from helpers.reference import dense_norm, dora_forward

GPU = jax.default_backend() == "gpu"
SMALL = cn.ColumnNormConfig(block_m=32, block_n=32, block_k=16, programs=8)


def _weights(key, d_in, d_out, rank, dtype, *, adapter=0.5):
  g = rng(key)
  return (normal(g, (d_in, d_out), dtype, d_in**-0.5),
          uniform(g, (d_in, rank), -(d_in**-0.5), d_in**-0.5, dtype),
          normal(g, (rank, d_out), dtype, adapter))


def _rel(value, expected):
  value = np.asarray(value, np.float64)
  return float(np.max(np.abs(value - expected) / np.abs(expected)))


@pytest.mark.parametrize("dtype,d_in,d_out,rank,cfg", [
    (jnp.bfloat16, 37, 53, 1, SMALL),       # rank 1, everything ragged
    (jnp.float16, 257, 130, 16, SMALL),     # several row splits, last one partial
    (jnp.bfloat16, 70, 41, 384, SMALL),     # the high rank, 24 rank steps
    (jnp.float16, 130, 300, 20, None),      # default tiling, ragged rank step
])
def test_column_norm_vs_twin_and_f64(fresh_key, dtype, d_in, d_out, rank, cfg):
  w, a, b = _weights(fresh_key(), d_in, d_out, rank, dtype)
  norm = jax.jit(lambda *v: cn.column_norm(*v, 1.7, config=cfg, interpret=not GPU))(w, a, b)
  assert norm.dtype == jnp.float32 and norm.shape == (d_out,)
  expected = np.asarray(dense_norm(w, a, b, 1.7))
  assert _rel(norm, expected) <= 2e-6
  assert _rel(norm, np.asarray(cn.column_norm_reference(w, a, b, 1.7), np.float64)) <= 2e-6
  assert _rel(dora_jax.factored_norm(w, a, b, 1.7), expected) <= 1e-5


def test_column_norm_adapter_dominated_and_cancelling(fresh_key):
  """Columns where s·a·b ≫ W and where W ≈ −s·a·b: the direct sum of squares
  keeps float32 accuracy and never goes negative."""
  w, a, b = _weights(fresh_key(), 211, 77, 8, jnp.bfloat16, adapter=30.0)
  norm = cn.column_norm(w, a, b, 3.0, interpret=not GPU)
  assert _rel(norm, np.asarray(dense_norm(w, a, b, 3.0))) <= 2e-6
  cancel = (-2.0 * jnp.dot(a, b, preferred_element_type=jnp.float32)).astype(jnp.bfloat16)
  small = cn.column_norm(cancel, a, b, 2.0, interpret=not GPU)
  assert np.all(np.isfinite(small)) and np.all(np.asarray(small) >= 0)
  np.testing.assert_allclose(small, dense_norm(cancel, a, b, 2.0), rtol=1e-4, atol=1e-7)


def test_column_norm_traced_scale_and_vmap(fresh_key):
  """The scale may be a traced 0-d array; stacked adapters batch through vmap."""
  w, a, b = _weights(fresh_key(), 48, 40, 4, jnp.bfloat16)
  s = jnp.float32(0.8)
  got = jax.jit(lambda s: cn.column_norm(w, a, b, s, config=SMALL, interpret=not GPU))(s)
  assert _rel(got, np.asarray(dense_norm(w, a, b, 0.8))) <= 2e-6
  a2 = jnp.stack([a, (a * 2).astype(a.dtype)])
  b2 = jnp.stack([b, (-b).astype(b.dtype)])
  both = jax.vmap(lambda a, b: cn.column_norm(w, a, b, 0.8, config=SMALL,
                                              interpret=not GPU))(a2, b2)
  for i in range(2):
    assert _rel(both[i], np.asarray(dense_norm(w, a2[i], b2[i], 0.8))) <= 2e-6


def test_column_norm_rejects_bad_input():
  w = jnp.ones((16, 8), jnp.bfloat16)
  a = jnp.ones((16, 2), jnp.bfloat16)
  b = jnp.ones((2, 8), jnp.bfloat16)
  with pytest.raises(ValueError, match="must share one dtype"):
    cn.column_norm(w, a.astype(jnp.float32), b, 1.0)
  with pytest.raises(ValueError, match="must share one dtype"):
    cn.column_norm(w.astype(jnp.float32), a.astype(jnp.float32), b.astype(jnp.float32), 1.0)
  with pytest.raises(ValueError, match="lora_b"):
    cn.column_norm(w, a, b[:, :7], 1.0)
  with pytest.raises(ValueError, match="kernel must be a 2-D"):
    cn.column_norm(w[None], a, b, 1.0)
  with pytest.raises(ValueError, match="scale must be a scalar"):
    cn.column_norm(w, a, b, jnp.ones(2))


def test_column_norm_builds_no_dense_product():
  """Outside the kernel, nothing of ``[d_in, d_out]`` size is formed (the
  update lives in ``[block_m, block_n]`` register tiles)."""
  from helpers.jaxprs import dense_shaped_dots
  d_in, d_out, r = 96, 160, 8
  spec = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)  # noqa: E731
  jaxpr = jax.make_jaxpr(lambda w, a, b: cn.column_norm(w, a, b, 1.0, config=SMALL,
                                                        interpret=True))(
      spec(d_in, d_out), spec(d_in, r), spec(r, d_out))
  assert dense_shaped_dots(jaxpr, d_in, d_out) == []
  assert "dora_column_norm" in str(jaxpr)


def _norm_in_jaxpr(backend, dtype=jnp.bfloat16, *, cached=False, options=None):
  x = jax.ShapeDtypeStruct((256, 128), dtype)
  w = jax.ShapeDtypeStruct((128, 256), dtype)
  a = jax.ShapeDtypeStruct((128, 16), dtype)
  b = jax.ShapeDtypeStruct((16, 256), dtype)
  m = jax.ShapeDtypeStruct((256,), jnp.float32)
  q = jax.ShapeDtypeStruct((256,), jnp.float32) if cached else None
  fn = lambda x, w, a, b, m, q: dora_jax.dora_dense(  # noqa: E731
      x, w, a, b, m, 2.0, backend=backend, base_sq_norm=q, options=options)
  return "dora_column_norm" in str(jax.make_jaxpr(fn)(x, w, a, b, m, q))


def test_dora_dense_uses_the_norm_kernel_where_allowed():
  """The kernel backends use it (interpret mode off the GPU); ``"xla"`` never;
  ``"auto"`` only on a CUDA GPU; float32 weights never; the options turn it off."""
  assert _norm_in_jaxpr("pallas") and _norm_in_jaxpr("mosaic")
  assert not _norm_in_jaxpr("xla")
  assert _norm_in_jaxpr("auto") == dispatch.Device.current().cuda
  assert not _norm_in_jaxpr("pallas", jnp.float32)
  assert not _norm_in_jaxpr("pallas", options=dora_jax.KernelOptions(norm_kernel=False))
  assert _norm_in_jaxpr("pallas", cached=True)  # 128×256: within the size rule
  # only where it was measured faster: small layers, or small ranks without the ‖W‖² cache
  allowed = lambda impl, shape, rank, cached, auto=False, device=None: (  # noqa: E731
      dispatch.norm_kernel_allowed(impl, auto, shape, rank, cached, device=device))
  assert allowed("pallas", (4096, 4096), 384, True)
  assert not allowed("pallas", (4096, 4097), 384, False)
  assert allowed("mosaic", (8192, 28672), 16, False)      # uncached, r ≤ 16
  assert not allowed("mosaic", (8192, 28672), 16, True)   # the cache makes the factored norm win
  assert not allowed("pallas", (8192, 28672), 17, False)
  cuda = dispatch.Device(gpu=True, cuda=True)
  assert allowed("xla", (4096, 4096), 64, True, auto=True, device=cuda)
  assert not allowed("xla", (4096, 4096), 64, True, auto=False, device=cuda)  # backend="xla"
  assert not allowed("xla", (4096, 4096), 64, True, auto=True, device=dispatch.Device())


@pytest.mark.parametrize("backend", ["pallas", "mosaic"])
def test_dora_dense_with_the_norm_kernel_matches_xla(fresh_key, backend):
  """Forward and gradients through a kernel backend (its norm from the kernel)
  agree with the XLA backend (factored norm) to bf16 rounding."""
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 128, 256, 16, lead=(256,),
                                     dtype=jnp.bfloat16, bias=False)

  def step(backend):
    def f(x, a, b, m):
      y = dora_jax.dora_dense(x, w, a, b, m, 2.0, backend=backend)
      return jnp.sum((y * cot).astype(jnp.float32)), y
    return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True))

  ((_, y_k), g_k), ((_, y_x), g_x) = step(backend)(x, a, b, m), step("xla")(x, a, b, m)
  for got, want in zip((y_k, *g_k), (y_x, *g_x)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.max(np.abs(got - want)) <= 3e-2 * np.max(np.abs(want))


@pytest.mark.gpu
def test_gpu_column_norm_at_a_projection_shape(fresh_key):
  """Triton lowering, default tiling, 4096×4096 at r = 384 vs float64 (chunked)."""
  w, a, b = _weights(fresh_key(), 4096, 4096, 384, jnp.bfloat16)
  norm = jax.jit(lambda *v: cn.column_norm(*v, 0.25))(w, a, b)
  w64, a64, b64 = (np.asarray(v, np.float64) for v in (w, a, b))
  sq = np.zeros(4096)
  for i in range(0, 4096, 512):
    sq += np.sum((w64[i:i + 512] + 0.25 * a64[i:i + 512] @ b64) ** 2, axis=0)
  assert _rel(norm, np.sqrt(sq)) <= 2e-6


@pytest.mark.parametrize("scale", [1e19, -1e20, 1e30])
def test_column_norm_is_finite_and_accurate_at_huge_scales(fresh_key, scale):
  """``(s·P)²`` overflows float32 from ``|s| ≈ 1e19``: the overflowing columns are
  summed divided by their bound, the others (``b_j = 0`` here) plain: bit for bit
  what they give when no column needs the rescale."""
  w, a, b = _weights(fresh_key(), 75, 61, 8, jnp.bfloat16, adapter=10.0)
  b = b.at[:, :5].set(0)  # columns with no update: norm ‖W_j‖ at any scale
  norm = cn.column_norm(w, a, b, scale, config=SMALL, interpret=not GPU)
  assert np.all(np.isfinite(norm))
  assert _rel(norm, np.asarray(dense_norm(w, a, b, scale))) <= 2e-6
  plain = cn.column_norm(w, a, b.at[:, 5:].set(0), scale, config=SMALL, interpret=not GPU)
  np.testing.assert_array_equal(norm[:5], plain[:5])
  np.testing.assert_array_equal(cn.column_scales(a, b, scale)[:5], 1.0)


@pytest.mark.parametrize("backend", ["pallas", "mosaic"])
def test_bf16_dora_dense_at_huge_scales_on_kernel_backends(fresh_key, backend):
  """The kernel backends' bf16 layer at ``s = 1e19`` (the norm kernel's squares
  overflowed there): finite, within bf16 rounding of the float64 layer."""
  x, kernel, lora_a, lora_b, magnitude, bias, _ = make_layer(
      fresh_key(), 48, 40, 8, (6,), dtype=jnp.bfloat16, b_scale=10.0)
  y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, 1e19, bias, backend=backend)
  assert np.all(np.isfinite(np.asarray(y, np.float32)))
  y_ref = dora_forward(x, kernel, lora_a, lora_b, magnitude, 1e19, bias)
  assert float(np.max(np.abs(np.asarray(y, np.float64) - y_ref))) <= 2.0**-6 * float(
      np.max(np.abs(y_ref)))

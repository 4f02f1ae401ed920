"""factored_norm against the float64 dense norm; chunking; edge cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from helpers.layers import make_layer
from helpers.layers import normal, rng
from helpers.reference import (assert_same_result, dense_norm, dense_norm_jax, dora_forward, f64,
                               rel_err)

NORM_TOL = {jnp.float32: 2e-6, jnp.bfloat16: 2e-6, jnp.float16: 2e-6}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("d_in,d_out,rank", [(37, 53, 1), (70, 41, 64), (257, 130, 16)])
def test_factored_norm_matches_dense_float64(fresh_key, dtype, d_in, d_out, rank):
  _, kernel, lora_a, lora_b, *_ = make_layer(fresh_key(), d_in, d_out, rank, dtype=dtype)
  norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 1.7)
  assert norm.dtype == jnp.float32 and norm.shape == (d_out,)
  # Inputs are exactly representable in fp32 and accumulated in fp32: the
  # error is fp32 rounding, whatever the storage dtype.
  assert rel_err(norm, dense_norm(kernel, lora_a, lora_b, 1.7)) < 1e-5
  dense = dense_norm_jax(kernel, lora_a, lora_b, 1.7)
  assert rel_err(norm, dense) < 1e-5


@pytest.mark.parametrize("rank", [1, 16, 96])
def test_bf16_gram_term_keeps_float32_accuracy(fresh_key, rank):
  """bf16 adapters run G·b as split-bf16 tensor-core products: with the adapter
  dominating the column (s·a·b ≫ W), each column's norm still has float32 accuracy."""
  g = rng(fresh_key())
  kernel = normal(g, (211, 77), jnp.bfloat16, 1e-3)
  lora_a = normal(g, (211, rank), jnp.bfloat16)
  lora_b = normal(g, (rank, 77), jnp.bfloat16)
  norm = jax.jit(lambda *a: dora_jax.factored_norm(*a, 3.0))(kernel, lora_a, lora_b)
  expected = dense_norm(kernel, lora_a, lora_b, 3.0)
  np.testing.assert_allclose(f64(norm), expected, rtol=3e-6)


@pytest.mark.parametrize("chunk", [1, 7, 16, 52, 53, 1000])
def test_chunked_norm_equals_unchunked(fresh_key, chunk):
  _, kernel, lora_a, lora_b, *_ = make_layer(fresh_key(), 29, 53, 5)
  whole = dora_jax.factored_norm(kernel, lora_a, lora_b, 0.9)
  chunked = jax.jit(lambda *a: dora_jax.factored_norm(*a, 0.9, chunk_size=chunk))(
      kernel, lora_a, lora_b)
  np.testing.assert_allclose(chunked, whole, rtol=2e-6)


def test_auto_chunking_bounds_intermediates():
  """``chunk_size=None``: whole-layer while the ``3·r·d_out`` float32
  intermediates fit in NORM_CHUNK_BYTES, else the largest multiple of 128 that
  fits (the chunked path itself: test_chunked_norm_equals_unchunked)."""
  budget = dora_jax.norm.NORM_CHUNK_BYTES
  assert dora_jax.norm._auto_chunk(4, 300) == 300
  assert dora_jax.norm._auto_chunk(1024, 30000) == (budget // (3 * 1024 * 4)) // 128 * 128
  assert 3 * 1024 * 4 * dora_jax.norm._auto_chunk(1024, 30000) <= budget
  assert dora_jax.norm._auto_chunk(1 << 20, 1 << 20) == 128  # floor of one block


def test_base_sq_norm_cache(fresh_key):
  _, kernel, lora_a, lora_b, *_ = make_layer(fresh_key(), 40, 21, 3)
  cached = dora_jax.column_sq_norm(kernel)
  np.testing.assert_allclose(
      dora_jax.factored_norm(kernel, lora_a, lora_b, 2.0, base_sq_norm=cached),
      dora_jax.factored_norm(kernel, lora_a, lora_b, 2.0), rtol=1e-6)
  with pytest.raises(ValueError, match="base_sq_norm"):
    dora_jax.factored_norm(kernel, lora_a, lora_b, 2.0, base_sq_norm=cached[:-1])


def test_cancelling_update_gives_zero_norm_not_nan(fresh_key):
  """W ≈ −s·a·b: the factored sum can round below 0; it is clamped, and g stays finite."""
  g = rng(fresh_key())
  lora_a = normal(g, (24, 4))
  lora_b = normal(g, (4, 10))
  kernel = -2.0 * lora_a @ lora_b
  norm = dora_jax.factored_norm(kernel, lora_a, lora_b, 2.0)
  assert np.all(np.isfinite(norm)) and np.all(norm >= 0)
  assert float(jnp.max(norm)) < 1e-2 * float(jnp.max(jnp.linalg.norm(kernel, axis=0)))
  x = normal(g, (3, 24))
  y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, jnp.ones(10), 2.0)
  assert np.all(np.isfinite(y))


def test_norm_never_builds_dense_product():
  """No dot_general in the norm's jaxpr produces a [d_in, d_out] value."""
  from helpers.jaxprs import dense_shaped_dots
  d_in, d_out, r = 96, 160, 8
  jaxpr = jax.make_jaxpr(lambda w, a, b: dora_jax.factored_norm(w, a, b, 1.0))(
      jnp.ones((d_in, d_out)), jnp.ones((d_in, r)), jnp.ones((r, d_out)))
  assert dense_shaped_dots(jaxpr, d_in, d_out) == []


# -- scales whose squares leave float32 -----------------------------------------------

HUGE_SCALES = (1e19, 1e20, -1e20, 1e30)


def _huge_layer(key, lead=(6,)):
  """A layer whose update columns ``s·(ab)_j`` overflow float32 when squared
  from ``|s| ≈ 1e19`` (``‖ab_j‖ ≈ 15``)."""
  return make_layer(key, 48, 40, 8, lead, b_scale=10.0)


def test_factored_norm_is_finite_and_accurate_at_huge_scales(fresh_key):
  """Until ‖W + s·a·b‖ itself overflows, the norm is finite and float32-accurate."""
  _, kernel, lora_a, lora_b, *_ = _huge_layer(fresh_key())
  for scale in HUGE_SCALES:
    got = dora_jax.factored_norm(kernel, lora_a, lora_b, scale)
    assert np.all(np.isfinite(got)), scale
    np.testing.assert_allclose(f64(got), dense_norm(kernel, lora_a, lora_b, scale), rtol=2e-6)


@pytest.mark.parametrize("backend", ["xla", "pallas", "mosaic", "auto"])
def test_dora_dense_at_huge_scales(fresh_key, backend):
  """float32 ``dora_dense`` at ``s = 1e19`` and ``1e20`` (inf and NaN norms
  before the rescale: zero or NaN outputs) against the float64 layer."""
  x, kernel, lora_a, lora_b, magnitude, bias, _ = _huge_layer(fresh_key())
  for scale in HUGE_SCALES[:2]:
    y = dora_jax.dora_dense(x, kernel, lora_a, lora_b, magnitude, scale, bias, backend=backend)
    assert np.all(np.isfinite(y)), scale
    assert rel_err(y, dora_forward(x, kernel, lora_a, lora_b, magnitude, scale, bias)) < 1e-5


def test_peft_init_stays_exact_at_any_scale(fresh_key):
  """``lora_b = 0``, ``m = ‖W‖``: the norm is ‖W‖ bit for bit and ``g = 1``
  exactly, huge scales included (no summand needs a rescale); on a GPU, where
  ``m`` and the norm's ``‖W‖²`` are summed by two programs, to a few ulps."""
  _, kernel, lora_a, lora_b, *_ = _huge_layer(fresh_key())
  zero_b = jnp.zeros_like(lora_b)
  magnitude = jax.jit(lambda w: jnp.sqrt(dora_jax.column_sq_norm(w)))(kernel)
  for scale in (0.5, 1e19, 1e20):
    norm = dora_jax.factored_norm(kernel, lora_a, zero_b, scale)
    assert_same_result(norm, magnitude)  # ‖W‖², summed by two programs
    g = dora_jax.dora_norm_scale(kernel, lora_a, zero_b, magnitude, scale)
    assert_same_result(g, jnp.ones_like(g))


def test_rescale_leaves_ordinary_columns_bit_for_bit(fresh_key):
  """Where no summand can overflow, the combine step is the plain formula
  ``‖W‖² + 2s·X + s·(s·Y)`` to the bit (``c = 1``); where one can, the plain
  formula overflows and the rescaled one does not."""
  from dora_jax import norm as norm_lib
  _, kernel, lora_a, lora_b, *_ = _huge_layer(fresh_key())

  def combined(scale, limit):
    terms = norm_lib._norm_terms(kernel, lora_a, lora_b, norm_lib.gram(lora_a), None,
                                 jnp.float32)
    return norm_lib._combine(terms, scale, limit)

  combine = jax.jit(combined, static_argnums=1)
  limit = norm_lib._overflow_limit(jnp.float32)
  for scale in (0.3, -2.0, 1e9):
    rescaled, plain = combine(jnp.float32(scale), limit), combine(jnp.float32(scale), np.inf)
    np.testing.assert_array_equal(rescaled.c, 1.0)
    np.testing.assert_array_equal(rescaled.sq, plain.sq)
    np.testing.assert_array_equal(rescaled.bound, plain.bound)
  rescaled, plain = combine(jnp.float32(1e20), limit), combine(jnp.float32(1e20), np.inf)
  assert not np.any(np.isfinite(plain.sq)) and np.all(np.isfinite(rescaled.sq))

"""The flagged-columns refinement kernel (Pallas, Triton lowering) against its twin.

Interpret mode on the CPU (Triton on a GPU); the all-float32 path is checked
against float64 through ``factored_norm(refine="kernel")`` in
``test_norm_cancellation.py``. Shapes are not multiples of the blocks, so the
row, column and rank masks and the partial tiles all run; flagged columns sit
in some tiles and none in the last ones, so the tiles that return at once
(writing nothing: ``sq`` is aliased) are exercised too. Tolerances: float32
reassociation between the kernel's tile sums and the twin's dense sum (2e-6
of the column's sum of squared magnitudes), and the untouched columns bit for
bit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.kernels import cancelled_columns as cc
from helpers.reference import f64

GPU = jax.default_backend() == "gpu"
SMALL = cc.RefineConfig(block_m=16, block_n=16, block_k=16)


def _case(key, d_in, d_out, rank, kernel_dtype, adapter_dtype, scale=1.3):
  k = jax.random.split(key, 5)
  a = (jax.random.normal(k[0], (d_in, rank)) / d_in**0.5).astype(adapter_dtype)
  b = jax.random.normal(k[1], (rank, d_out)).astype(adapter_dtype)
  w = (-scale * f64(a) @ f64(b) + 0.05 * f64(jax.random.normal(k[2], (d_in, d_out))))
  w = jnp.asarray(w, jnp.float32).astype(kernel_dtype)
  c = jnp.where(jax.random.uniform(k[3], (d_out,)) < 0.3, 7.5, 1.0)  # some rescaled columns
  t, inv_c = scale / c, 1.0 / c
  sq = jax.random.normal(k[4], (d_out,))  # the values to keep
  flags = (jnp.arange(d_out) % 5 == 0) & (jnp.arange(d_out) < d_out - 16)  # last tile clean
  return w, a, b, t, inv_c, sq, flags


def _magnitude(w, a, b, t, inv_c):
  """``Σ_i (|W_ij|·inv_c_j + |t_j|·Σ_k |a_ik b_kj|)²``, float64: the scale of
  the float32 rounding in either sum."""
  m = np.abs(f64(w)) * f64(inv_c) + np.abs(f64(t)) * (np.abs(f64(a)) @ np.abs(f64(b)))
  return np.sum(m * m, axis=0)


@pytest.mark.parametrize("d_in,d_out,rank,kernel_dtype,adapter_dtype,cfg", [
    (37, 53, 20, jnp.bfloat16, jnp.bfloat16, SMALL),  # tensor cores, all ragged, rank steps
    (45, 70, 1, jnp.bfloat16, jnp.float32, None),     # float32 products, rank 1, default tiles
])
def test_refine_columns_vs_twin_and_f64(fresh_key, d_in, d_out, rank, kernel_dtype,
                                        adapter_dtype, cfg):
  args = _case(fresh_key(), d_in, d_out, rank, kernel_dtype, adapter_dtype)
  w, a, b, t, inv_c, sq, flags = args
  out = jax.jit(lambda *v: cc.refine_columns(*v, config=cfg, interpret=not GPU))(*args)
  assert out.dtype == jnp.float32 and out.shape == (d_out,)
  keep = ~np.asarray(flags)
  np.testing.assert_array_equal(np.asarray(out)[keep], np.asarray(sq)[keep])
  scale = _magnitude(w, a, b, t, inv_c)[~keep]
  twin = np.asarray(cc.refine_columns_reference(*args), np.float64)[~keep]
  assert np.max(np.abs(f64(out)[~keep] - twin) / scale) <= 2e-6
  dense = f64(w) * f64(inv_c) + f64(t) * (f64(a) @ f64(b))
  exact = np.sum(dense * dense, axis=0)[~keep]
  assert np.max(np.abs(f64(out)[~keep] - exact) / scale) <= 2e-6


def test_refine_columns_checks_its_arguments():
  w, a, b = jnp.ones((8, 6)), jnp.ones((8, 2)), jnp.ones((2, 6))
  v, flags = jnp.ones(6), jnp.ones(6, bool)
  with pytest.raises(ValueError, match="inv_c"):
    cc.refine_columns(w, a, b, v, v[:5], v, flags)
  with pytest.raises(ValueError, match="sq"):
    cc.refine_columns(w, a, b, v, v, v.astype(jnp.bfloat16), flags)
  with pytest.raises(ValueError, match="flags"):
    cc.refine_columns(w, a, b, v, v, v, flags.astype(jnp.int32))

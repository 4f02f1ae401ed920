"""The zero-magnitude kernel: ``Σ_T dy ⊙ pre`` for flagged columns, ``pre`` recomputed in-kernel.

Interpret mode on the CPU (Triton lowering on a GPU) vs its ``jax.numpy`` twin
and vs float64, on shapes no block divides (ragged ``T``, ``K``, ``N`` and
rank), with no column, some columns and every column flagged.

Tolerances are per column and come from rounding analysis, not from the
largest column sum (a column sum can cancel to far below its terms): the kernel
rounds ``pre`` once to the input dtype (unit roundoff ``u``: 2^-8 bf16, 2^-11
fp16), so each column is within ``2u·Σ_T |dy|·|pre|`` of float64 (and of the
twin, which may round a tie the other way), plus ``1e-5`` of the float32 sums'
absolute terms. float32 (no rounding of ``pre``) is also held to the earlier
bounds: 2e-6 (twin) and 1e-5 (float64) of the largest column sum.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.kernels import flagged_columns as fc
from helpers.layers import normal, rng

GPU = jax.default_backend() == "gpu"
SMALL = fc.FlaggedConfig(block_t=16, block_n=16, block_k=16, block_r=16)
ROUNDOFF = {jnp.float32: 0.0, jnp.bfloat16: 2.0**-8, jnp.float16: 2.0**-11}


def _inputs(key, tokens, k, n, rank, dtype):
  g = rng(key)
  return (normal(g, (tokens, k), dtype), normal(g, (k, n), dtype, 1 / np.sqrt(k)),
          normal(g, (tokens, rank), dtype), normal(g, (rank, n), dtype, 0.3),
          normal(g, (tokens, n), dtype))


@pytest.mark.parametrize("dtype,tokens,k,n,rank", [
    (jnp.float32, 37, 50, 70, 3), (jnp.bfloat16, 37, 50, 70, 3),
    (jnp.bfloat16, 64, 96, 80, 20), (jnp.float16, 33, 40, 130, 1)])
def test_flagged_dy_dot_pre_vs_twin_and_f64(fresh_key, dtype, tokens, k, n, rank):
  """Some, no and every column flagged: one compiled kernel, three calls."""
  x, w, hs, b, dy = _inputs(fresh_key(), tokens, k, n, rank, dtype)
  kernel = jax.jit(lambda *a: fc.flagged_dy_dot_pre(*a, config=SMALL, interpret=not GPU))
  x64, w64, hs64, b64, dy64 = (np.asarray(v, np.float64) for v in (x, w, hs, b, dy))
  pre = x64 @ w64 + hs64 @ b64
  bound = (2 * ROUNDOFF[dtype] * np.sum(np.abs(dy64) * np.abs(pre), axis=0)
           + 1e-5 * np.sum(np.abs(dy64) * (np.abs(x64) @ np.abs(w64) + np.abs(hs64) @ np.abs(b64)),
                           axis=0))
  for which in ("some", "none", "all"):
    flags = {"some": jnp.zeros(n, bool).at[jnp.array([0, 17, n - 1])].set(True),
             "none": jnp.zeros(n, bool), "all": jnp.ones(n, bool)}[which]
    got = kernel(x, w, hs, b, dy, flags)
    assert got.shape == (n,) and got.dtype == jnp.float32
    f64 = np.where(np.asarray(flags), np.sum(dy64 * pre, axis=0), 0.0)
    got = np.asarray(got, np.float64)
    assert np.all(got[~np.asarray(flags)] == 0.0), which
    if which == "none":
      continue
    twin = np.asarray(fc.flagged_dy_dot_pre_reference(x, w, hs, b, dy, flags), np.float64)
    assert np.all(np.abs(got - twin) <= bound), which
    assert np.all(np.abs(got - f64) <= bound), which
    if dtype == jnp.float32:  # no rounding of pre: also within 1e-5 of the largest column sum
      scale = np.max(np.abs(f64))
      assert np.max(np.abs(got - twin)) <= 2e-6 * scale
      assert np.max(np.abs(got - f64)) <= 1e-5 * scale
    # The bound is tight enough to catch a missing term: the low-rank part alone
    # is far outside it on some flagged column.
    flagged = np.asarray(flags)
    assert np.any(np.abs(np.sum(dy64 * (hs64 @ b64), axis=0))[flagged] > bound[flagged]), which


def test_flagged_dy_dot_pre_rejects_bad_shapes():
  x, w, hs, b, dy = _inputs(jax.random.key(0), 8, 16, 24, 2, jnp.float32)
  with pytest.raises(ValueError, match=r"flags \(23,\)"):
    fc.flagged_dy_dot_pre(x, w, hs, b, dy, jnp.zeros(23, bool))
  with pytest.raises(ValueError, match=r"lora_b \(3, 24\)"):
    fc.flagged_dy_dot_pre(x, w, hs, jnp.zeros((3, 24)), dy, jnp.zeros(24, bool))
  with pytest.raises(ValueError, match="x2 must be 2-D"):
    fc.flagged_dy_dot_pre(x[None], w, hs, b, dy, jnp.zeros(24, bool))
  with pytest.raises(ValueError, match="flags must be a 1-D bool"):
    fc.flagged_dy_dot_pre(x, w, hs, b, dy, jnp.zeros(24, jnp.int32))
  with pytest.raises(TypeError, match="dy must have a floating dtype"):
    fc.flagged_dy_dot_pre(x, w, hs, b, dy.astype(jnp.int32), jnp.zeros(24, bool))


@pytest.mark.gpu
def test_gpu_flagged_dy_dot_pre_at_a_projection_shape(fresh_key):
  if not GPU:
    pytest.skip("needs a GPU")
  x, w, hs, b, dy = _inputs(fresh_key(), 2048, 1024 + 32, 4096 + 96, 16, jnp.bfloat16)
  flags = jnp.zeros(4096 + 96, bool).at[jnp.array([3, 2000, 4191])].set(True)
  got = np.asarray(jax.jit(fc.flagged_dy_dot_pre)(x, w, hs, b, dy, flags), np.float64)
  twin = np.asarray(fc.flagged_dy_dot_pre_reference(x, w, hs, b, dy, flags), np.float64)
  assert np.all(got[~np.asarray(flags)] == 0.0)
  assert np.max(np.abs(got - twin)) <= 2e-2 * np.max(np.abs(twin))

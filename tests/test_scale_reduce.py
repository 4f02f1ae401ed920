"""The backward-prologue kernel: ``dpre = dy ⊙ g`` and ``Σ_T dy ⊙ pre`` in one pass.

Interpret mode on the CPU (Triton lowering on a GPU) vs its ``jax.numpy`` twin
(``dpre`` bit-exact: the same float32 product rounded once; the sum to float32
reassociation, ≤ 1e-6 relative) and vs float64 (the sum ≤ 1e-5 relative to its
largest column). Shapes are not multiples of the blocks, so every mask and the
last, partial, ``T`` split are exercised.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dora_jax.kernels import scale_reduce as sr
from helpers.layers import normal, rng, uniform

GPU = jax.default_backend() == "gpu"


def _inputs(key, tokens, n, dtype):
  g = rng(key)
  return (normal(g, (tokens, n), dtype), normal(g, (tokens, n), dtype, 3.0),
          uniform(g, (n,), 0.3, 2.0))


def _check(dy, pre, g, dpre, dy_pre):
  twin_dpre, twin_sum = sr.scale_reduce_reference(dy, pre, g)
  assert dpre.dtype == dy.dtype and dpre.shape == dy.shape
  assert dy_pre.dtype == jnp.float32 and dy_pre.shape == dy.shape[1:]
  np.testing.assert_array_equal(np.asarray(dpre, np.float32), np.asarray(twin_dpre, np.float32))
  f64 = np.sum(np.asarray(dy, np.float64) * np.asarray(pre, np.float64), axis=0)
  scale = np.max(np.abs(f64))
  assert np.max(np.abs(np.asarray(dy_pre, np.float64) - np.asarray(twin_sum, np.float64))) \
      <= 1e-6 * scale
  assert np.max(np.abs(np.asarray(dy_pre, np.float64) - f64)) <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("tokens,n,cfg", [
    (37, 50, sr.ScaleReduceConfig(block_t=16, block_n=16, programs=8)),   # ragged T and N
    (130, 300, None),                                                      # default tiling
    (96, 64, sr.ScaleReduceConfig(block_t=16, block_n=32, programs=4)),   # exact tiles
    (1, 24, None)])                                                        # one token
def test_scale_reduce_vs_twin_and_f64(fresh_key, dtype, tokens, n, cfg):
  dy, pre, g = _inputs(fresh_key(), tokens, n, dtype)
  dpre, dy_pre = jax.jit(lambda *a: sr.scale_reduce(*a, config=cfg, interpret=not GPU))(
      dy, pre, g)
  _check(dy, pre, g, dpre, dy_pre)


def test_scale_reduce_rejects_bad_shapes():
  dy = jnp.ones((8, 16), jnp.bfloat16)
  with pytest.raises(ValueError, match="dy must be 2-D"):
    sr.scale_reduce(dy[None], dy[None], jnp.ones(16))
  with pytest.raises(ValueError, match=r"g \(15,\)"):
    sr.scale_reduce(dy, dy, jnp.ones(15))
  with pytest.raises(ValueError, match=r"pre \(8, 8\)"):
    sr.scale_reduce(dy, dy[:, :8], jnp.ones(16))
  with pytest.raises(TypeError, match="scale_reduce: dy must have a floating dtype"):
    sr.scale_reduce(dy.astype(jnp.int32), dy, jnp.ones(16))


@pytest.mark.gpu
def test_gpu_scale_reduce_at_a_projection_shape(fresh_key):
  if not GPU:
    pytest.skip("needs a GPU")
  dy, pre, g = _inputs(fresh_key(), 4096, 4096 + 96, jnp.bfloat16)
  dpre, dy_pre = jax.jit(sr.scale_reduce)(dy, pre, g)
  _check(dy, pre, g, dpre, dy_pre)

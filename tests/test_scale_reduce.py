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

GPU = jax.default_backend() == "gpu"


def _inputs(key, tokens, n, dtype):
  ks = jax.random.split(key, 3)
  dy = jax.random.normal(ks[0], (tokens, n)).astype(dtype)
  pre = (3.0 * jax.random.normal(ks[1], (tokens, n))).astype(dtype)
  g = jax.random.uniform(ks[2], (n,), minval=0.3, maxval=2.0)
  return dy, pre, g


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


# ----------------------------------------------------------------------------- with t and hᵀ·dpre


def _check_lowrank(dy, v, g, b, h, out):
  dpre, dy_v, t, hd = out
  _check(dy, v, g, dpre, dy_v)
  twin = sr.scale_reduce_lowrank_reference(dy, v, g, b, h)
  assert t.shape == twin[2].shape and hd.shape == twin[3].shape
  assert t.dtype == hd.dtype == jnp.float32
  # from the same rounded dpre: float32 reassociation vs the twin; the float64
  # products of the rounded dpre vs the kernel's float32 sums
  d64 = np.asarray(twin[0], np.float64)
  for got, twin_v, f64 in ((t, twin[2], d64 @ np.asarray(b, np.float64).T),
                           (hd, twin[3], np.asarray(h, np.float64).T @ d64)):
    scale = np.max(np.abs(f64))
    assert np.max(np.abs(np.asarray(got, np.float64) - np.asarray(twin_v, np.float64))) \
        <= 1e-5 * scale
    assert np.max(np.abs(np.asarray(got, np.float64) - f64)) <= 1e-5 * scale


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("tokens,n,rank,cfg", [
    (37, 50, 1, sr.ScaleReduceConfig(block_t=16, block_n=16, programs=8)),   # all ragged
    (130, 300, 16, None),                                                     # default tiling
    (96, 64, 24, sr.ScaleReduceConfig(block_t=16, block_n=32, programs=4)),  # rank padded to 32
])
def test_scale_reduce_lowrank_vs_twin_and_f64(fresh_key, dtype, tokens, n, rank, cfg):
  dy, v, g = _inputs(fresh_key(), tokens, n, dtype)
  ks = jax.random.split(fresh_key(), 2)
  b = jax.random.normal(ks[0], (rank, n)).astype(dtype)
  h = jax.random.normal(ks[1], (tokens, rank)).astype(dtype)
  out = jax.jit(lambda *a: sr.scale_reduce_lowrank(*a, config=cfg, interpret=not GPU))(
      dy, v, g, b, h)
  _check_lowrank(dy, v, g, b, h, out)


def test_scale_reduce_lowrank_rejects_bad_input():
  dy = jnp.ones((8, 16), jnp.bfloat16)
  b, h = jnp.ones((4, 16), jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16)
  with pytest.raises(ValueError, match=r"h \(8, 3\)"):
    sr.scale_reduce_lowrank(dy, dy, jnp.ones(16), b, h[:, :3])
  with pytest.raises(ValueError, match="lora_b must be 2-D"):
    sr.scale_reduce_lowrank(dy, dy, jnp.ones(16), b[0], h)
  with pytest.raises(ValueError, match="rank 65 is above"):
    sr.scale_reduce_lowrank(dy, dy, jnp.ones(16), jnp.ones((65, 16), jnp.bfloat16),
                            jnp.ones((8, 65), jnp.bfloat16))


@pytest.mark.gpu
def test_gpu_scale_reduce_lowrank_at_a_projection_shape(fresh_key):
  if not GPU:
    pytest.skip("needs a GPU")
  dy, v, g = _inputs(fresh_key(), 4096, 4096 + 96, jnp.bfloat16)
  ks = jax.random.split(fresh_key(), 2)
  b = jax.random.normal(ks[0], (16, 4096 + 96)).astype(jnp.bfloat16)
  h = jax.random.normal(ks[1], (4096, 16)).astype(jnp.bfloat16)
  _check_lowrank(dy, v, g, b, h, jax.jit(sr.scale_reduce_lowrank)(dy, v, g, b, h))

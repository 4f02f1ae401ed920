"""The Hopper (Mosaic GPU) kernel and the ``"mosaic"`` backend.

On the CPU the kernel runs in Mosaic GPU's interpret mode (all but the fused
low-rank term, which runs in the ``gpu`` tests). Kernel-level shapes are small
multiples of small tiles with several tiles per dimension, none a power of
two, so that the persistent tile loop, the K pipeline and the epilogue slices
all iterate; ``dora_dense``-level shapes are the smallest the default tiles
divide (the shape is not the point there). Tolerances (relative L2 error):
kernel vs its ``*_reference`` twin ≤ 4e-3 (both round once to bf16; only the
accumulation order differs), vs float64 ≤ 1e-2 (bf16) / 2e-3 (fp16);
``dora_dense`` gradients ≤ 2× that.
"""

from __future__ import annotations

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax.kernels import dispatch, fused_mosaic
from dora_jax.kernels import scaled_matmul as sm

from helpers import reference
from helpers.jaxprs import primitives_outside_kernels
from helpers.layers import make_layer, normal, rng, uniform

GPU = jax.default_backend() == "gpu"
INTERPRET = not GPU
# Small tiles for the kernel-level tests: CTA 128×128, two 64-row output pieces
# per warpgroup, K step 32.
FWD = sm.Tiles(tile_m=128, tile_n=64, tile_k=32, stages=2, epi_m=64, epi_n=32, snake=2)
TOL_F64 = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# what the GPU runs, traced (not run) on any machine
ON_GPU = dora_jax.KernelOptions(interpret=False)


def rel(u, v) -> float:
  u = reference.f64(u)
  v = reference.f64(v) if not isinstance(v, np.ndarray) else v
  return float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30))


def _mats(key, m, n, k, dtype):
  g = rng(key)
  return (normal(g, (m, k), dtype), normal(g, (k, n), dtype, 1 / np.sqrt(k)),
          uniform(g, (n,), 0.3, 2.0))


@pytest.mark.parametrize("dtype,mnk", [(jnp.bfloat16, (384, 384, 96)),   # 3×3 tiles, 3 K steps
                                       (jnp.float16, (128, 640, 160))])  # 1×5 tiles, 5 K steps
def test_scaled_matmul_vs_twin_and_f64(fresh_key, dtype, mnk):
  m, n, k = mnk
  x, w, g = _mats(fresh_key(), m, n, k, dtype)
  out = jax.jit(lambda *a: sm.scaled_matmul(*a, tiles=FWD, interpret=INTERPRET))(x, w, g)
  assert out.shape == (m, n) and out.dtype == dtype
  f64 = (reference.f64(x) @ reference.f64(w)) * reference.f64(g)
  assert rel(out, sm.scaled_matmul_reference(x, w, g)) <= 4e-3
  assert rel(out, f64) <= TOL_F64[dtype]
  # every column really scaled: the unscaled product is far off
  assert rel(out, reference.f64(x) @ reference.f64(w)) > 0.1


def test_scaled_matmul_with_unscaled_output(fresh_key):
  """``with_unscaled``: the same GEMM also stores ``x·w`` before the scale (the
  two outputs interleave through the epilogue's two shared-memory slots; 3×3
  tiles of 3 K steps)."""
  m, n, k = 384, 384, 96
  x, w, g = _mats(fresh_key(), m, n, k, jnp.bfloat16)
  out, unscaled = jax.jit(lambda *a: sm.scaled_matmul(*a, with_unscaled=True, tiles=FWD,
                                                      interpret=INTERPRET))(x, w, g)
  twin, twin_unscaled = sm.scaled_matmul_reference(x, w, g, with_unscaled=True)
  f64 = reference.f64(x) @ reference.f64(w)
  assert out.shape == unscaled.shape == (m, n) and unscaled.dtype == jnp.bfloat16
  assert rel(out, twin) <= 4e-3 and rel(unscaled, twin_unscaled) <= 4e-3
  assert rel(out, f64 * reference.f64(g)) <= TOL_F64[jnp.bfloat16]
  assert rel(unscaled, f64) <= TOL_F64[jnp.bfloat16]
  assert rel(unscaled, f64 * reference.f64(g)) > 0.1  # not the scaled one stored twice
  # under vmap over rows both outputs fold into one launch
  xs = jnp.stack([x, -x])
  outs = jax.jit(jax.vmap(lambda xi: sm.scaled_matmul(xi, w, g, with_unscaled=True, tiles=FWD,
                                                      interpret=INTERPRET)))(xs)
  assert outs[0].shape == outs[1].shape == (2, m, n)
  assert rel(outs[1][1], -twin_unscaled) <= 4e-3


@pytest.mark.parametrize("mnk", [(384, 384, 96), (128, 640, 160)])
def test_scaled_matmul_with_transposed_w(fresh_key, mnk):
  """``trans_w``: ``w [N, K]`` read transposed in place (DoRA's ``dpre·Wᵀ``)."""
  m, n, k = mnk
  x, w, g = _mats(fresh_key(), m, n, k, jnp.bfloat16)
  wt = jnp.asarray(w.T)  # [N, K]
  out = jax.jit(lambda *a: sm.scaled_matmul(*a, trans_w=True, tiles=FWD,
                                            interpret=INTERPRET))(x, wt, g)
  assert rel(out, sm.scaled_matmul_reference(x, wt, g, trans_w=True)) <= 4e-3
  assert rel(out, (reference.f64(x) @ reference.f64(w)) * reference.f64(g)) <= 1e-2
  with pytest.raises(ValueError, match=r"\[N, K\] \(trans_w\)"):
    sm.scaled_matmul(x, w[:, : k - 32] if n != k else w[: k - 32], g, trans_w=True, tiles=FWD,
                     interpret=True)


@pytest.mark.parametrize("dtype,mnk,trans_w", [(jnp.bfloat16, (384, 384, 96), False),
                                               (jnp.float16, (128, 640, 160), True)])
def test_scaled_matmul_with_addend(fresh_key, dtype, mnk, trans_w):
  """``addend``: added to the accumulator before the scale, its buffer staging
  the store (several tiles per warpgroup, so the buffer is reused)."""
  m, n, k = mnk
  x, w, g = _mats(fresh_key(), m, n, k, dtype)
  add = normal(fresh_key(), (m, n), dtype, 2.0)
  wk = jnp.asarray(w.T) if trans_w else w
  out = jax.jit(lambda *a: sm.scaled_matmul(*a[:3], addend=a[3], trans_w=trans_w, tiles=FWD,
                                            interpret=INTERPRET))(x, wk, g, add)
  assert out.shape == (m, n) and out.dtype == dtype
  f64 = (reference.f64(x) @ reference.f64(w) + reference.f64(add)) * reference.f64(g)
  assert rel(out, sm.scaled_matmul_reference(x, wk, g, addend=add, trans_w=trans_w)) <= 4e-3
  assert rel(out, f64) <= TOL_F64[dtype]
  assert rel(out, sm.scaled_matmul_reference(x, wk, g, trans_w=trans_w)) > 0.3  # really added
  # under vmap over rows the addend folds into M with x
  outs = jax.jit(jax.vmap(lambda xi, ai: sm.scaled_matmul(
      xi, wk, g, addend=ai, trans_w=trans_w, tiles=FWD, interpret=INTERPRET)))(
          jnp.stack([x, -x]), jnp.stack([add, -add]))
  assert rel(outs[1], -out.astype(jnp.float32)) <= 4e-3
  with pytest.raises(ValueError, match=r"addend \(.*\) must be \[M, N\]"):
    sm.scaled_matmul(x, wk, g, addend=add[:, :-64], trans_w=trans_w, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="cannot be combined"):
    sm.scaled_matmul(x, wk, g, addend=add, with_unscaled=True, tiles=FWD, interpret=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rank", [16, 32])
def test_gpu_scaled_matmul_with_low_rank_term(fresh_key, dtype, rank):
  """``(x·w + l·r) ⊙ g`` in one kernel, 5 K steps, 3×5 output tiles (GPU only:
  the interpreter cannot run this variant)."""
  if not dispatch.Device.current().hopper:
    pytest.skip("needs a Hopper GPU")
  x, w, g = _mats(fresh_key(), 384, 640, 160, dtype)
  lhs2, rhs2 = normal(fresh_key(), (384, rank), dtype), normal(fresh_key(), (rank, 640), dtype, 0.5)
  out = jax.jit(lambda *a: sm.scaled_matmul(*a[:3], a[3:], tiles=FWD))(x, w, g, lhs2, rhs2)
  f64 = (reference.f64(x) @ reference.f64(w)
         + reference.f64(lhs2) @ reference.f64(rhs2)) * reference.f64(g)
  assert rel(out, sm.scaled_matmul_reference(x, w, g, (lhs2, rhs2))) <= 4e-3
  assert rel(out, f64) <= TOL_F64[dtype]
  assert rel(out, sm.scaled_matmul_reference(x, w, g)) > 0.1  # the term is really added
  out2, pre = jax.jit(lambda *a: sm.scaled_matmul(*a[:3], a[3:], with_unscaled=True, tiles=FWD))(
      x, w, g, lhs2, rhs2)
  assert rel(out2, out) == 0.0
  assert rel(pre, f64 / reference.f64(g)) <= TOL_F64[dtype]
  # the dx form: w read transposed, the low-rank term fused
  wt = jnp.asarray(w.T)
  out_t = jax.jit(lambda *a: sm.scaled_matmul(*a[:3], a[3:], trans_w=True, tiles=FWD))(
      x, wt, g, lhs2, rhs2)
  assert rel(out_t, f64) <= TOL_F64[dtype]


def test_low_rank_term_is_checked(fresh_key):
  x, w, g = _mats(fresh_key(), 128, 128, 64, jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="interpret"):
    sm.scaled_matmul(x, w, g, (x[:, :16], w[:16]), tiles=FWD, interpret=True)
  trace = lambda *lr: jax.eval_shape(lambda: sm.scaled_matmul(x, w, g, lr, tiles=FWD))
  with pytest.raises(ValueError, match="multiple of 16"):
    trace(x[:, :8], w[:8])
  with pytest.raises(ValueError, match=r"\[M, r\] and \[r, N\]"):
    trace(x[:, :16], w[:16, :64])
  assert sm.fusable_rank(16) and sm.fusable_rank(32)
  assert not (sm.fusable_rank(8) or sm.fusable_rank(48) or sm.fusable_rank(0))


def test_kernels_reject_shapes_they_do_not_tile(fresh_key):
  x, w, g = _mats(fresh_key(), 100, 128, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="multiples of 64"):
    sm.scaled_matmul(x[:64], w, g, tiles=sm.Tiles(tile_m=64, epi_m=32), interpret=True)
  with pytest.raises(ValueError, match="M=100"):
    sm.scaled_matmul(x, w, g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match=r"col_scale \(5,\) must be"):
    sm.scaled_matmul(x, w, g[:5], tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="x must be bfloat16 or float16"):
    sm.scaled_matmul(x.astype(jnp.float32), w, g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="w must have dtype bfloat16"):
    sm.scaled_matmul(x, w.astype(jnp.float16), g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="x must be 2-D"):
    sm.scaled_matmul(x[None], w, g, tiles=FWD, interpret=True)


def test_scaled_matmul_under_vmap(fresh_key):
  """A batch of the left operand folds into M; a batched right operand maps."""
  x, w, g = _mats(fresh_key(), 128, 128, 64, jnp.bfloat16)
  xs = jnp.stack([x, -2 * x])
  ws = jnp.stack([w, jnp.flip(w, 0)])
  call = lambda xi, wi: sm.scaled_matmul(xi, wi, g, tiles=FWD, interpret=INTERPRET)
  twin = lambda xi, wi: sm.scaled_matmul_reference(xi, wi, g)
  got = jax.jit(jax.vmap(call, in_axes=(0, None)))(xs, w)
  assert rel(got, jax.vmap(twin, in_axes=(0, None))(xs, w)) <= 4e-3
  got = jax.jit(jax.vmap(call))(xs, ws)
  assert rel(got, jax.vmap(twin)(xs, ws)) <= 4e-3


# ----------------------------------------------------------------------------- dora_dense
# T = 128 tokens over two leading dims, d_in = 256, d_out = 256: one tile of the
# default tilings (each kernel's tile loop is covered at the kernel level above)


def _kernel_names(jaxpr) -> set[str]:
  return set(re.findall(r"name=(dora_\w+)", str(jaxpr)))


@pytest.mark.parametrize("dtype,rank", [
    (jnp.bfloat16, 1),    # rank not fusable: the low-rank product as the addend; y residual
    (jnp.float16, 16),    # LoRA term fused on the GPU; fp16 keeps pre (XLA's forward off it)
    (jnp.bfloat16, 32)])  # fused on the GPU, the y residual
def test_dora_dense_mosaic_forward_and_grads(fresh_key, dtype, rank):
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 256, 256, rank, (2, 64), dtype=dtype,
                                     bias=False)

  def loss(backend, x, a, b, m, options=None):
    y = dora_jax.dora_dense(x, w, a, b, m, 1.5, backend=backend, options=options)
    return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)), y

  step = lambda backend, options=None: jax.value_and_grad(  # noqa: E731
      lambda *v: loss(backend, *v, options=options), argnums=(0, 1, 2, 3), has_aux=True)
  # The kernels of the training step, as the GPU runs them (traced) and as this
  # machine runs them: a fusable rank's term fused in on the GPU, else the
  # low-rank product as the GEMM's addend (the forward: XLA's where it must
  # write pre), for dx the transposed GEMM the same way; dpre and dm in one pass.
  fused = sm.fusable_rank(rank)
  keep_y = dtype == jnp.bfloat16
  gpu_forward = ("dora_matmul_lowrank" if keep_y else "dora_matmul_lowrank_pre") if fused else (
      "dora_matmul_addend" if keep_y else None)
  gpu = (gpu_forward, "dora_matmul_wt_" + ("lowrank" if fused else "addend"))
  interpreted = ("dora_matmul_addend" if keep_y else None, "dora_matmul_wt_addend")
  for options, (forward, dx) in ((ON_GPU, gpu), (None, gpu if GPU else interpreted)):
    names = _kernel_names(jax.make_jaxpr(step("mosaic", options))(x, a, b, m))
    want = {dx, "dora_scale_reduce", "dora_column_norm"} | ({forward} if forward else set()) | (
        {"dora_flagged_dy_dot_pre"} if keep_y else set())
    assert names == want, (options, names)
  ((_, y), (dx, da, db, dm)) = jax.jit(step("mosaic"))(x, a, b, m)
  y64, g64 = reference.dora_value_and_grads(x, w, a, b, m, 1.5, None, cot)
  tol = TOL_F64[dtype]
  assert y.dtype == dtype and rel(y, y64) <= tol
  for name, got in zip(["x", "lora_a", "lora_b", "magnitude"], (dx, da, db, dm)):
    assert rel(got, g64[name]) <= 2 * tol, (name, rel(got, g64[name]))
  if not keep_y:  # the training forward wrote pre: the inference one is another program
    y_inf = jax.jit(lambda *v: dora_jax.dora_dense(*v, 1.5, backend="mosaic"))(x, w, a, b, m)
    # the same up to where the activation dtype rounds (XLA's forward rounds x·W apart)
    assert rel(y_inf, y) <= 4e-3


@pytest.mark.parametrize("with_bias,residual", [(True, "output"), (False, "output"),
                                               (False, "pre")])
def test_dora_dense_mosaic_with_bias_and_zero_magnitudes(fresh_key, with_bias, residual):
  """With a bias (pre kept whatever the options), and bias-free with zero
  magnitudes: with the output as the dm residual (the default) those columns
  take pre recomputed by the flagged-columns kernel, decided on the device (no
  lax.cond outside the kernels)."""
  options = dora_jax.KernelOptions(mosaic_residual=residual)
  x, w, a, b, m, bias, cot = make_layer(fresh_key(), 256, 256, 8, (128,), dtype=jnp.bfloat16,
                                        bias=with_bias)
  zeros = np.array([0, 7, 255])
  mag = m if with_bias else m.at[zeros].set(0)

  def f(x, a, b, m, *rest):
    return dora_jax.dora_dense(x, w, a, b, m, 0.7, *rest, backend="mosaic", options=options)

  args = (x, a, b, mag) + ((bias,) if with_bias else ())
  jaxpr = jax.make_jaxpr(lambda *v: jax.vjp(f, *v)[1](cot))(*args)
  assert ("dora_flagged_dy_dot_pre" in str(jaxpr)) == (residual == "output" and not with_bias)
  assert "cond" not in primitives_outside_kernels(jaxpr.jaxpr)
  y, vjp = jax.vjp(jax.jit(f), *args)
  grads = vjp(cot)
  y64, g64 = reference.dora_value_and_grads(x, w, a, b, mag, 0.7, bias, cot)
  assert rel(y, y64) <= 1e-2
  names = ["x", "lora_a", "lora_b", "magnitude", "bias"][: len(grads)]
  for name, got in zip(names, grads):
    assert np.all(np.isfinite(reference.f64(got))), name
    assert rel(got, g64[name]) <= 2e-2, name
  if not with_bias:  # the zero-magnitude columns' own gradient, against the whole one's scale
    assert np.min(np.abs(g64["magnitude"][zeros])) > 0
    assert np.max(np.abs(reference.f64(grads[3])[zeros] - g64["magnitude"][zeros])) <= \
        2e-2 * np.max(np.abs(g64["magnitude"]))


def test_dora_dense_mosaic_under_vmap(fresh_key):
  x, w, a, b, m, _, _ = make_layer(fresh_key(), 64, 256, 4, (2, 128), dtype=jnp.bfloat16,
                                   bias=False)
  f = lambda xi: dora_jax.dora_dense(xi, w, a, b, m, 1.0, backend="mosaic")
  assert rel(jax.jit(jax.vmap(f))(x), jax.jit(f)(x)) <= 1e-6


def test_mosaic_falls_back_to_xla_where_it_cannot_run(fresh_key, caplog):
  x, w, a, b, m, _, _ = make_layer(fresh_key(), 100, 256, 4, (256,), dtype=jnp.bfloat16,
                                   bias=False)
  with caplog.at_level(logging.WARNING, logger="dora_jax"):
    y = dora_jax.dora_dense(x, w, a, b, m, 1.0, backend="mosaic")
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(
      dora_jax.dora_dense(x, w, a, b, m, 1.0, backend="xla"), np.float32))
  assert any("d_in=100" in r.getMessage() for r in caplog.records)
  assert dispatch.mosaic_or_xla(256, (128, 256), jnp.float32) == "xla"
  ampere = dispatch.Device(gpu=True, cuda=True, hopper=False)
  assert dispatch.mosaic_or_xla(256, (128, 256), jnp.bfloat16, ampere) == "xla"
  assert dispatch.mosaic_or_xla(256, (128, 256), jnp.bfloat16, dispatch.Device()) == "mosaic"
  assert fused_mosaic.shapes_supported(4096, 4096, 14336)
  assert not fused_mosaic.shapes_supported(4000, 4096, 14336)


def test_auto_picks_mosaic_only_where_measured():
  hopper = dispatch.Device(gpu=True, cuda=True, hopper=True)
  def choose(tokens, shape, rank, dtype=jnp.bfloat16, device=hopper):
    return dispatch.choose(tokens, shape, rank, dtype, device)
  for shape in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)):
    for rank in (16, 32):
      assert choose(4096, shape, rank) == "mosaic", (shape, rank)
    for rank in (8, 64, 384):  # not fused in-kernel: the low-rank product as the addend
      assert choose(4096, shape, rank) == "mosaic", (shape, rank)
  assert choose(2048, (4096, 14336), 16) == "xla"  # below the measured T
  assert choose(4096, (4096, 14336), 16, jnp.float16) == "xla"
  assert choose(4096, (4100, 14336), 16) == "xla"  # not tiled exactly
  ampere = dispatch.Device(gpu=True, cuda=True, hopper=False)
  assert choose(4096, (4096, 14336), 16, device=ampere) == "xla"
  assert choose(4096, (4096, 4096), 64, device=ampere) == "pallas"  # the Triton table
  assert choose(4096, (4096, 4096), 16, device=dispatch.Device()) == "xla"  # off the GPU


def test_backward_kernels_are_used_only_where_they_run(fresh_key):
  """The fused dx GEMM needs a fusable rank, shapes its tiles divide and a GPU
  (the addend form otherwise, XLA's where the tiles do not divide); the
  one-pass dpre/dm kernel runs up to KernelOptions.scale_reduce_max_width
  columns (XLA fuses both passes itself beyond)."""
  variant = lambda rank, tokens=4096, **kw: fused_mosaic.dx_variant(  # noqa: E731
      tokens, 4096, 14336, rank, dora_jax.KernelOptions(interpret=False, **kw))
  assert variant(16) == "fused" and variant(32) == "fused"
  assert variant(64) == "addend" and variant(8) == "addend"
  assert variant(16, tokens=4000) is None           # T not tiled: XLA
  assert variant(16, mosaic_dx=False) is None
  assert fused_mosaic.dx_variant(4096, 4096, 14336, 16,
                                 dora_jax.KernelOptions(interpret=True)) == "addend"
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 256, 256, 4, (128,), dtype=jnp.bfloat16,
                                     bias=False)

  def kernels(**kw):
    f = lambda x, a, m: dora_jax.dora_dense(x, w, a, b, m, 1.0, backend="mosaic",  # noqa: E731
                                            options=dora_jax.KernelOptions(**kw))
    return _kernel_names(jax.make_jaxpr(lambda *v: jax.vjp(f, *v)[1](cot))(x, a, m))

  assert "dora_scale_reduce" in kernels() and "dora_scale_reduce" in kernels(
      scale_reduce_max_width=256)
  assert "dora_scale_reduce" not in kernels(scale_reduce_max_width=255)
  assert "dora_matmul_wt_addend" not in kernels(mosaic_dx=False)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [16, 384])
def test_gpu_mosaic_matches_xla_and_f64(fresh_key, rank):
  if not dispatch.Device.current().hopper:
    pytest.skip("needs a Hopper GPU")
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 1024, 1536, rank, (2048,),
                                     dtype=jnp.bfloat16, bias=False)
  # zero magnitudes in two column tiles: the flagged-columns kernel's compute branch
  zeros = jnp.array([5, 700, 701])
  m = m.at[zeros].set(0)

  def step(backend):
    def f(x, a, b, m):
      return dora_jax.dora_dense(x, w, a, b, m, 0.5, backend=backend)
    y, vjp = jax.vjp(f, x, a, b, m)
    return y, vjp(cot)

  y, grads = jax.jit(lambda: step("mosaic"))()
  y64, g64 = reference.dora_value_and_grads(x, w, a, b, m, 0.5, None, cot)
  assert rel(y, y64) <= 1e-2
  for name, got in zip(["x", "lora_a", "lora_b", "magnitude"], grads):
    assert rel(got, g64[name]) <= 2e-2, name
  dm = reference.f64(grads[3])[np.asarray(zeros)]
  assert np.max(np.abs(dm - g64["magnitude"][np.asarray(zeros)])) <= 2e-2 * np.max(
      np.abs(g64["magnitude"]))
  assert np.min(np.abs(g64["magnitude"][np.asarray(zeros)])) > 0  # a real gradient there


@pytest.mark.gpu
def test_gpu_scaled_matmul_at_the_default_tiles(fresh_key):
  if not dispatch.Device.current().hopper:
    pytest.skip("needs a Hopper GPU")
  x, w, g = _mats(fresh_key(), 512, 512, 768, jnp.bfloat16)  # 128×256 CTAs, 4 stages
  out = sm.scaled_matmul(x, w, g)
  assert rel(out, sm.scaled_matmul_reference(x, w, g)) <= 4e-3

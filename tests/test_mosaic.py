"""The Hopper (Mosaic GPU) kernels and the ``"mosaic"`` backend.

On the CPU the kernels run in Mosaic GPU's interpret mode (the wgmma of
:func:`matmul_scaled_k` through shared memory: the interpreter cannot take a
register operand; the register path runs in the ``gpu`` tests). Shapes are
small multiples of the tiles with several tiles per dimension, none a power of
two, so that the persistent tile loop, the K pipeline and the epilogue slices
all iterate. Tolerances (relative L2 error): kernel vs its ``*_reference`` twin
≤ 4e-3 (both round once to bf16; only the accumulation order differs), vs
float64 ≤ 1e-2 (bf16) / 2e-3 (fp16); ``dora_dense`` gradients ≤ 2× that.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax.kernels import dispatch, fused_mosaic
from dora_jax.kernels import scaled_matmul as sm

from conftest import make_layer
import reference

GPU = jax.default_backend() == "gpu"
INTERPRET = not GPU
# Small tiles for the kernel-level tests: CTA 128×128 (forward, two 64-row output
# pieces per warpgroup) / 128×64 (dx), K step 32.
FWD = sm.Tiles(tile_m=128, tile_n=64, tile_k=32, stages=2, epi_m=64, epi_n=32, snake=2)
BWD = sm.Tiles(tile_m=64, tile_n=64, tile_k=32, stages=3, epi_n=32, snake=2, split="m",
               a_in_registers=False)
TOL_F64 = {jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def rel(u, v) -> float:
  u = reference.f64(u)
  v = reference.f64(v) if not isinstance(v, np.ndarray) else v
  return float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30))


def _mats(key, m, n, k, dtype):
  ks = jax.random.split(key, 4)
  lhs = jax.random.normal(ks[0], (m, k)).astype(dtype)
  w = (jax.random.normal(ks[1], (k, n)) / np.sqrt(k)).astype(dtype)
  scale_n = jax.random.uniform(ks[2], (n,), minval=0.3, maxval=2.0)
  scale_k = jax.random.uniform(ks[3], (k,), minval=0.3, maxval=2.0)
  return lhs, w, scale_n, scale_k


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mnk", [(384, 384, 96), (128, 640, 160)])
def test_scaled_matmul_vs_twin_and_f64(fresh_key, dtype, mnk):
  m, n, k = mnk
  x, w, g, _ = _mats(fresh_key(), m, n, k, dtype)
  out = jax.jit(lambda *a: sm.scaled_matmul(*a, tiles=FWD, interpret=INTERPRET))(x, w, g)
  assert out.shape == (m, n) and out.dtype == dtype
  f64 = (reference.f64(x) @ reference.f64(w)) * reference.f64(g)
  assert rel(out, sm.scaled_matmul_reference(x, w, g)) <= 4e-3
  assert rel(out, f64) <= TOL_F64[dtype]
  # every column really scaled: the unscaled product is far off
  assert rel(out, reference.f64(x) @ reference.f64(w)) > 0.1


@pytest.mark.parametrize("mnk", [(384, 384, 96), (128, 640, 160)])
def test_scaled_matmul_with_unscaled_output(fresh_key, mnk):
  """``with_unscaled``: the same GEMM also stores ``x·w`` before the scale (the
  two outputs interleave through the epilogue's two shared-memory slots)."""
  m, n, k = mnk
  x, w, g, _ = _mats(fresh_key(), m, n, k, jnp.bfloat16)
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
  x, w, g, _ = _mats(fresh_key(), m, n, k, jnp.bfloat16)
  wt = jnp.asarray(w.T)  # [N, K]
  out = jax.jit(lambda *a: sm.scaled_matmul(*a, trans_w=True, tiles=FWD,
                                            interpret=INTERPRET))(x, wt, g)
  assert rel(out, sm.scaled_matmul_reference(x, wt, g, trans_w=True)) <= 4e-3
  assert rel(out, (reference.f64(x) @ reference.f64(w)) * reference.f64(g)) <= 1e-2
  with pytest.raises(ValueError, match=r"\[N, K\] \(trans_w\)"):
    sm.scaled_matmul(x, w[:, : k - 32] if n != k else w[: k - 32], g, trans_w=True, tiles=FWD,
                     interpret=True)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mnk,trans_w", [((384, 384, 96), False), ((128, 640, 160), True)])
def test_scaled_matmul_with_addend(fresh_key, dtype, mnk, trans_w):
  """``addend``: added to the accumulator before the scale, its buffer staging
  the store (several tiles per warpgroup, so the buffer is reused)."""
  m, n, k = mnk
  x, w, g, _ = _mats(fresh_key(), m, n, k, dtype)
  add = (2.0 * jax.random.normal(fresh_key(), (m, n))).astype(dtype)
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


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("mnk", [(384, 192, 96), (128, 320, 160)])
def test_matmul_scaled_k_vs_twin_and_f64(fresh_key, dtype, mnk):
  m, n, k = mnk
  ks = jax.random.split(fresh_key(), 3)
  dy = jax.random.normal(ks[0], (m, k)).astype(dtype)
  w = (jax.random.normal(ks[1], (n, k)) / np.sqrt(k)).astype(dtype)  # the [d_in, d_out] kernel
  g = jax.random.uniform(ks[2], (k,), minval=0.3, maxval=2.0)
  out = jax.jit(lambda *a: sm.matmul_scaled_k(*a, tiles=BWD, interpret=INTERPRET))(dy, w, g)
  assert out.shape == (m, n) and out.dtype == dtype
  f64 = (reference.f64(dy) * reference.f64(g)) @ reference.f64(w).T
  assert rel(out, sm.matmul_scaled_k_reference(dy, w, g)) <= 4e-3
  assert rel(out, f64) <= TOL_F64[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rank", [16, 32])
def test_gpu_scaled_matmul_with_low_rank_term(fresh_key, dtype, rank):
  """``(x·w + l·r) ⊙ g`` in one kernel, 5 K steps, 3×5 output tiles (GPU only:
  the interpreter cannot run this variant)."""
  if not dispatch.on_hopper():
    pytest.skip("needs a Hopper GPU")
  x, w, g, _ = _mats(fresh_key(), 384, 640, 160, dtype)
  ks = jax.random.split(fresh_key(), 2)
  lhs2 = jax.random.normal(ks[0], (384, rank)).astype(dtype)
  rhs2 = (0.5 * jax.random.normal(ks[1], (rank, 640))).astype(dtype)
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
  x, w, g, _ = _mats(fresh_key(), 128, 128, 64, jnp.bfloat16)
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
  x, w, g, gk = _mats(fresh_key(), 100, 128, 64, jnp.bfloat16)
  with pytest.raises(ValueError, match="multiples of 64"):
    sm.scaled_matmul(x[:64], w, g, tiles=sm.Tiles(tile_m=64, epi_m=32), interpret=True)
  with pytest.raises(ValueError, match="M=100"):
    sm.scaled_matmul(x, w, g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match=r"col_scale \(5,\) must be"):
    sm.scaled_matmul(x, w, g[:5], tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="split"):
    sm.matmul_scaled_k(w.T, w.T, gk, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="x must be bfloat16 or float16"):
    sm.scaled_matmul(x.astype(jnp.float32), w, g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="w must have dtype bfloat16"):
    sm.scaled_matmul(x, w.astype(jnp.float16), g, tiles=FWD, interpret=True)
  with pytest.raises(ValueError, match="dy must be 2-D"):
    sm.matmul_scaled_k(x[None], w.T, gk, tiles=BWD, interpret=True)
  with pytest.raises(ValueError, match=r"k_scale \(128,\)"):
    sm.matmul_scaled_k(w.T, w.T, g, tiles=BWD, interpret=True)


def test_scaled_matmul_under_vmap(fresh_key):
  """A batch of the left operand folds into M; a batched right operand maps."""
  x, w, g, _ = _mats(fresh_key(), 128, 128, 64, jnp.bfloat16)
  xs = jnp.stack([x, -2 * x])
  ws = jnp.stack([w, jnp.flip(w, 0)])
  call = lambda xi, wi: sm.scaled_matmul(xi, wi, g, tiles=FWD, interpret=INTERPRET)
  twin = lambda xi, wi: sm.scaled_matmul_reference(xi, wi, g)
  got = jax.jit(jax.vmap(call, in_axes=(0, None)))(xs, w)
  assert rel(got, jax.vmap(twin, in_axes=(0, None))(xs, w)) <= 4e-3
  got = jax.jit(jax.vmap(call))(xs, ws)
  assert rel(got, jax.vmap(twin)(xs, ws)) <= 4e-3


# ----------------------------------------------------------------------------- dora_dense


@pytest.mark.parametrize("dtype,rank,dx_kernel,d_out", [
    (jnp.bfloat16, 1, False, 512),   # rank not fusable: the low-rank product as the addend
    (jnp.bfloat16, 24, True, 512),
    (jnp.float16, 16, True, 256),    # LoRA term fused on the GPU (the addend interpreted)
    (jnp.bfloat16, 32, False, 256)])
def test_dora_dense_mosaic_forward_and_grads(fresh_key, monkeypatch, dtype, rank, dx_kernel,
                                             d_out):
  monkeypatch.setattr(fused_mosaic, "DX_KERNEL", dx_kernel)
  # T = 2·128 tokens over two leading dims, d_in = 3·256, d_out = k·256 (default tiles)
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 768, d_out, rank, (2, 128), dtype=dtype,
                                     bias=False)

  def loss(backend, x, a, b, m):
    y = dora_jax.dora_dense(x, w, a, b, m, 1.5, backend=backend)
    return jnp.sum(y.astype(jnp.float32) * cot.astype(jnp.float32)), y

  jaxpr = str(jax.make_jaxpr(jax.grad(lambda *v: loss("mosaic", *v)[0], argnums=(0, 1, 2, 3)))(
      x, a, b, m))
  # the forward kernel: on the GPU a fusable rank's term fused in; else (and in
  # interpret mode) bf16 keeps y and takes the low-rank product as the addend,
  # fp16 keeps pre (the kernel's pair of outputs). For dx the scaled-K kernel if
  # asked, else the transposed one with the low-rank term fused or as the addend.
  fused = GPU and sm.fusable_rank(rank)
  forward = ("dora_matmul_lowrank" if fused else
             "dora_matmul_addend" if dtype == jnp.bfloat16 else "dora_matmul_pre")
  assert forward in jaxpr
  assert ("dora_matmul_scaled_k" in jaxpr) == dx_kernel
  assert ("dora_matmul_wt_" + ("lowrank" if fused else "addend") in jaxpr) == (not dx_kernel)
  grad = lambda backend: jax.jit(jax.grad(lambda *v: loss(backend, *v), argnums=(0, 1, 2, 3),
                                          has_aux=True))(x, a, b, m)
  (dx, da, db, dm), y = grad("mosaic")
  y64, g64 = reference.dora_value_and_grads(x, w, a, b, m, 1.5, None, cot)
  tol = TOL_F64[dtype]
  assert y.dtype == dtype and rel(y, y64) <= tol
  for name, got in zip(["x", "lora_a", "lora_b", "magnitude"], (dx, da, db, dm)):
    assert rel(got, g64[name]) <= 2 * tol, (name, rel(got, g64[name]))
  y_inf = jax.jit(lambda *v: dora_jax.dora_dense(*v, 1.5, backend="mosaic"))(x, w, a, b, m)
  # the inference forward is the training one up to where bf16 rounds (the unfused
  # variant sums the low-rank term in float32 when it also writes pre)
  assert rel(y_inf, y) <= 4e-3


def _primitives_outside_kernels(jaxpr) -> set[str]:
  """Primitive names in ``jaxpr`` and its sub-jaxprs, not looking inside kernels."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name in ("pallas_call", "mpmd_map"):  # Triton / Mosaic GPU kernels
      continue
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          names |= _primitives_outside_kernels(inner)
  return names


@pytest.mark.parametrize("output_residual", [False, True])
def test_dora_dense_mosaic_with_bias_and_zero_magnitudes(fresh_key, monkeypatch, output_residual):
  """With a bias and with zero magnitudes; with the output as the dm residual
  (private switch) zero magnitudes take the recomputed-``pre`` branch of ``dm``."""
  monkeypatch.setattr(dora_jax.dense, "_OUTPUT_AS_RESIDUAL", output_residual)
  x, w, a, b, m, bias, cot = make_layer(fresh_key(), 128, 256, 8, (256,), dtype=jnp.bfloat16)
  for with_bias, mag in ((True, m), (False, m.at[jnp.array([0, 7, 255])].set(0))):
    bb = bias if with_bias else None

    def f(x, a, b, m, *rest):
      return dora_jax.dora_dense(x, w, a, b, m, 0.7, *rest, backend="mosaic")

    args = (x, a, b, mag) + ((bb,) if with_bias else ())
    if output_residual and not with_bias:
      # the zero-magnitude columns come from the flagged-columns kernel: no lax.cond
      # outside the kernels (whose pl.when branches run on the device)
      jaxpr = jax.make_jaxpr(lambda *v: jax.vjp(f, *v)[1](cot))(*args)
      assert "dora_flagged_dy_dot_pre" in str(jaxpr)
      assert "cond" not in _primitives_outside_kernels(jaxpr.jaxpr)
    y, vjp = jax.vjp(jax.jit(f), *args)
    grads = vjp(cot)
    y64, g64 = reference.dora_value_and_grads(x, w, a, b, mag, 0.7, bb, cot)
    assert rel(y, y64) <= 1e-2
    names = ["x", "lora_a", "lora_b", "magnitude", "bias"][: len(grads)]
    for name, got in zip(names, grads):
      assert np.all(np.isfinite(reference.f64(got))), name
      assert rel(got, g64[name]) <= 2e-2, (name, with_bias)


def test_dora_dense_mosaic_under_vmap(fresh_key):
  x, w, a, b, m, _, _ = make_layer(fresh_key(), 128, 256, 4, (2, 256), dtype=jnp.bfloat16,
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
  assert dispatch.mosaic_or_xla(256, (128, 256), jnp.bfloat16) == ("mosaic" if not GPU or
                                                                  dispatch.on_hopper() else "xla")
  assert fused_mosaic.shapes_supported(4096, 4096, 14336)
  assert not fused_mosaic.shapes_supported(4000, 4096, 14336)


def test_auto_picks_mosaic_only_where_measured(monkeypatch):
  monkeypatch.setattr(dispatch, "on_cuda_gpu", lambda: True)
  monkeypatch.setattr(dispatch, "on_hopper", lambda: True)
  bf16 = jnp.bfloat16
  for shape in ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)):
    for rank in (16, 32):
      assert dispatch.choose(4096, shape, rank, bf16) == "mosaic", (shape, rank)
    for rank in (8, 64, 384):  # not fused in-kernel: the low-rank product as the addend
      assert dispatch.choose(4096, shape, rank, bf16) == "mosaic", (shape, rank)
  assert dispatch.choose(2048, (4096, 14336), 16, bf16) == "xla"  # below the measured T
  assert dispatch.choose(4096, (4096, 14336), 16, jnp.float16) == "xla"
  assert dispatch.choose(4096, (4100, 14336), 16, bf16) == "xla"  # not tiled exactly
  monkeypatch.setattr(dispatch, "on_hopper", lambda: False)  # e.g. an A100
  assert dispatch.choose(4096, (4096, 14336), 16, bf16) == "xla"
  assert dispatch.choose(4096, (4096, 4096), 64, bf16) == "pallas"  # the Triton table


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("rank", [16, 384])
def test_gpu_mosaic_matches_xla_and_f64(fresh_key, rank):
  if not dispatch.on_hopper():
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
def test_gpu_kernels_register_and_smem_paths_agree(fresh_key):
  if not dispatch.on_hopper():
    pytest.skip("needs a Hopper GPU")
  # multiples of the default tiles: 128×256 CTAs for both kernels
  dy = jax.random.normal(fresh_key(), (512, 768), jnp.bfloat16)
  w = jax.random.normal(fresh_key(), (512, 768), jnp.bfloat16)
  g = jax.random.uniform(fresh_key(), (768,), minval=0.3, maxval=2.0)
  regs = sm.matmul_scaled_k(dy, w, g)
  smem = sm.matmul_scaled_k(dy, w, g, tiles=sm.Tiles(split="m", stages=3,
                                                      a_in_registers=False))
  twin = sm.matmul_scaled_k_reference(dy, w, g)
  assert rel(regs, twin) <= 4e-3 and rel(smem, twin) <= 4e-3
  x = jax.random.normal(fresh_key(), (512, 768), jnp.bfloat16)
  out = sm.scaled_matmul(x, w.T, g[:512])
  assert rel(out, sm.scaled_matmul_reference(x, w.T, g[:512])) <= 4e-3


def test_backward_kernels_are_used_only_where_they_run(monkeypatch):
  """The fused ``dx`` GEMM needs a fusable rank, shapes its tiles divide and a
  GPU; the one-pass ``dpre``/``dm`` kernel is used up to
  ``SCALE_REDUCE_MAX_WIDTH`` columns (XLA fuses both passes itself beyond)."""
  monkeypatch.setattr(fused_mosaic, "default_interpret", lambda: False)  # as on a GPU
  bf16 = jnp.bfloat16
  x = jnp.zeros((4096, 4096), bf16)
  w = jnp.zeros((4096, 14336), bf16)
  name = lambda rank, rows=4096: getattr(  # noqa: E731
      fused_mosaic._dx_fused(x[:rows], w, jnp.zeros((4096, rank), bf16)), "__name__", None)
  assert name(16) == "dx_matmul"            # the low-rank term fused
  assert name(64) == "dx_addend"            # rank not fusable: the product as the addend
  assert name(16, rows=4000) is None        # T not tiled: XLA
  monkeypatch.setattr(fused_mosaic, "ADDEND_KERNEL", False)
  assert name(16) == "dx_matmul" and name(64) is None
  monkeypatch.setattr(fused_mosaic, "DX_FUSED", False)
  assert name(16) is None

  def traced(width):
    dy = jax.ShapeDtypeStruct((256, width), bf16)
    g = jax.ShapeDtypeStruct((width,), jnp.float32)
    return str(jax.make_jaxpr(fused_mosaic._scale_reduce)(dy, dy, g))

  assert "pallas_call" in traced(fused_mosaic.SCALE_REDUCE_MAX_WIDTH)
  assert "pallas_call" not in traced(fused_mosaic.SCALE_REDUCE_MAX_WIDTH + 512)


def test_lowrank_prologue_switch(fresh_key, monkeypatch):
  """``LOWRANK_PROLOGUE`` (off by default: slower on an H100) swaps XLA's
  ``t``/``db`` GEMMs for the one-pass kernel's products; gradients agree."""
  x, w, a, b, m, _, cot = make_layer(fresh_key(), 256, 256, 16, (256,), dtype=jnp.bfloat16,
                                     bias=False)

  def grads():
    f = lambda x, a, b, m: jnp.sum(  # noqa: E731
        dora_jax.dora_dense(x, w, a, b, m, 1.5, backend="mosaic").astype(jnp.float32)
        * cot.astype(jnp.float32))
    g = jax.grad(f, argnums=(0, 1, 2, 3))
    return str(jax.make_jaxpr(g)(x, a, b, m)), jax.jit(g)(x, a, b, m)

  jaxpr_off, off = grads()
  monkeypatch.setattr(fused_mosaic, "LOWRANK_PROLOGUE", True)
  jaxpr_on, on = grads()
  assert "dora_scale_reduce_lowrank" in jaxpr_on and "dora_scale_reduce_lowrank" not in jaxpr_off
  for got, want in zip(on, off):
    assert rel(got, want) <= 4e-3

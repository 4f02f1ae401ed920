"""DoRA on a weight in its native einsum / dot_general layout (dora_jax.general).

Every layout is checked against a float64 DoRA built from the weight viewed as
``[*B, d_in, d_out]`` (the dense formulation, norm detached), forward and every
gradient; init reproduces the base op bit for bit; merge equals the op; the
traced training step forms no ``[d_in, d_out]`` matmul output.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import general
from helpers.reference import assert_grads_close, assert_same_result, f64, rel_err
from helpers.jaxprs import dot_equations, dot_output_shapes

# (equation, input shape, kernel shape): gemma's q/kv/gating einsums, the
# attention output (two contracted axes), a block-diagonal (batched) kernel,
# the kernel transposed relative to [C, O], and a plain projection.
LAYOUTS = [
    ("BTD,NDH->BTNH", (2, 3, 12), (4, 12, 5)),
    ("BSD,CKDH->CBSKH", (2, 3, 12), (2, 3, 12, 4)),
    ("...F,NHF->...NH", (2, 3, 10), (3, 4, 10)),
    ("btnh,nhd->btd", (2, 3, 4, 5), (4, 5, 7)),
    ("...hi,hij->...hj", (2, 3, 4, 6), (4, 6, 5)),
    ("btd,fd->btf", (2, 3, 9), (7, 9)),
    ("btd,df->btf", (2, 3, 9), (9, 7)),
]
RANK, SCALE = 3, 0.7


def _case(fresh_key, spec, x_shape, k_shape, dtype=jnp.float32):
  x = jax.random.normal(fresh_key(), x_shape).astype(dtype)
  w = jax.random.normal(fresh_key(), k_shape).astype(dtype)
  layout = general.einsum_layout(spec, x_shape, k_shape)
  a_shape, b_shape, m_shape = layout.adapter_shapes(RANK)
  a = (jax.random.normal(fresh_key(), a_shape) / math.sqrt(layout.d_in)).astype(dtype)
  b = (0.5 * jax.random.normal(fresh_key(), b_shape)).astype(dtype)
  base = jnp.sqrt(general.weight_sq_norm(w, layout))
  m = (base * (1 + 0.2 * jax.random.normal(fresh_key(), m_shape))).astype(dtype)
  return x, w, a, b, m, layout


def _reference(spec, layout, x, w, a, b, m, scale):
  """Float64 DoRA via the [*B, d_in, d_out] view: value and detached-norm gradients."""
  nb = math.prod(layout.batch_shape)
  with jax.enable_x64(True):
    def forward(p):
      mat = layout.to_matrix(p["w"]).reshape(nb, layout.d_in, layout.d_out)
      a2 = p["a"].reshape(nb, layout.d_in, RANK)
      b2 = p["b"].reshape(nb, RANK, layout.d_out)
      dense = mat + scale * a2 @ b2
      norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=1)))
      g = p["m"].reshape(nb, layout.d_out) / norm
      merged = layout.from_matrix((dense * g[:, None, :]).reshape(*layout.batch_shape,
                                                                  layout.d_in, layout.d_out))
      return jnp.einsum(spec, p["x"], merged, precision=jax.lax.Precision.HIGHEST)

    p = {k: jnp.asarray(f64(v)) for k, v in dict(x=x, w=w, a=a, b=b, m=m).items()}
    y = forward(p)
    cot = jnp.asarray(np.random.default_rng(0).normal(size=y.shape))
    grads = jax.grad(lambda q: jnp.sum(forward(q) * cot))(p)
    return np.asarray(y), np.asarray(cot), {k: np.asarray(v) for k, v in grads.items()}


@pytest.mark.parametrize("spec,x_shape,k_shape", LAYOUTS)
def test_layout_matches_float64_reference(fresh_key, spec, x_shape, k_shape):
  x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape)
  y_ref, cot, g_ref = _reference(spec, layout, x, w, a, b, m, SCALE)

  def loss(x, w, a, b, m):
    y = general.dora_einsum(spec, x, w, a, b, m, SCALE)
    return jnp.sum(y * cot.astype(y.dtype)), y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(x, w, a, b, m)
  assert y.shape == y_ref.shape and y.dtype == jnp.float32
  assert rel_err(y, y_ref) < 1e-5
  assert_grads_close(grads, "xwabm", g_ref, 1e-5)


@pytest.mark.parametrize("spec,x_shape,k_shape", LAYOUTS)
def test_init_reproduces_base_exactly(fresh_key, spec, x_shape, k_shape):
  x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape)
  b = jnp.zeros_like(b)
  m = general.init_magnitude(w, layout)  # PEFT's init
  base = jax.jit(lambda x, w: jnp.einsum(spec, x, w))(x, w)
  y = jax.jit(lambda *args: general.dora_einsum(spec, *args, SCALE))(x, w, a, b, m)
  assert y.dtype == base.dtype
  assert_same_result(y, base, jnp.einsum(spec, jnp.abs(x), jnp.abs(w),
                                         precision=jax.lax.Precision.HIGHEST))


@pytest.mark.parametrize("spec,x_shape,k_shape", LAYOUTS)
def test_merge_equals_op(fresh_key, spec, x_shape, k_shape):
  x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape)
  merged = general.merge_weight(w, a, b, m, SCALE, layout)
  assert merged.shape == w.shape and merged.dtype == w.dtype
  y = general.dora_einsum(spec, x, w, a, b, m, SCALE)
  y_merged = jnp.einsum(spec, x, merged, precision=jax.lax.Precision.HIGHEST)
  assert rel_err(y_merged, y) < 1e-5


def test_norm_matches_dense_view(fresh_key):
  for spec, x_shape, k_shape in LAYOUTS:
    _, w, a, b, _, layout = _case(fresh_key, spec, x_shape, k_shape)
    nb = math.prod(layout.batch_shape)
    mat = f64(layout.to_matrix(w)).reshape(nb, layout.d_in, layout.d_out)
    dense = mat + SCALE * f64(a).reshape(nb, layout.d_in, RANK) @ f64(b).reshape(nb, RANK, -1)
    expected = np.sqrt(np.sum(dense * dense, axis=1)).reshape(layout.adapter_shapes(RANK)[2])
    got = general.weight_norm(w, a, b, SCALE, layout)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    assert rel_err(got, expected) < 1e-6, spec


@pytest.mark.parametrize("spec,x_shape,k_shape", [LAYOUTS[0], LAYOUTS[3], LAYOUTS[4]])
def test_bf16_within_rounding(fresh_key, spec, x_shape, k_shape):
  x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape, dtype=jnp.bfloat16)
  y_ref, _, _ = _reference(spec, layout, x, w, a, b, m, SCALE)
  y = general.dora_einsum(spec, x, w, a, b, m, SCALE)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y, y_ref) < 1e-2


def test_dot_general_equals_einsum(fresh_key):
  """A batched kernel through lax.dot_general: [h, t, i] x [h, i, j] -> [h, t, j]."""
  x = jax.random.normal(fresh_key(), (4, 5, 6))
  w = jax.random.normal(fresh_key(), (4, 6, 3))
  dn = (((2,), (1,)), ((0,), (0,)))
  layout = general.dot_general_layout(dn, x.shape, w.shape)
  assert (layout.contracted, layout.batch, layout.output) == ((1,), (0,), (2,))
  a_shape, b_shape, m_shape = layout.adapter_shapes(2)
  a = jax.random.normal(fresh_key(), a_shape)
  b = jax.random.normal(fresh_key(), b_shape)
  m = jax.random.uniform(fresh_key(), m_shape, minval=0.5, maxval=2.0)
  y = general.dora_dot_general(x, w, a, b, m, 0.5, dn)
  y_e = general.dora_einsum("hti,hij->htj", x, w, a, b, m, 0.5)
  assert rel_err(y, y_e) < 1e-6
  base = jax.lax.dot_general(x, w, dn)
  zero = general.dora_dot_general(x, w, a, jnp.zeros(b_shape),
                                  general.init_magnitude(w, layout), 0.5, dn)
  assert_same_result(zero, base, jax.lax.dot_general(jnp.abs(x), jnp.abs(w), dn,
                                                     precision=jax.lax.Precision.HIGHEST))


def _kernel_sized_dots(closed, kernel_shape):
  """Every dot_general output (recursively) that holds a whole kernel-shaped value:
  all of the kernel's dimensions among its own, and at least its size."""
  want, size = Counter(kernel_shape), math.prod(kernel_shape)
  return [shape for shape in dot_output_shapes(closed)
          if math.prod(shape) >= size and not want - Counter(shape)]


def test_frozen_kernel_cotangent_skipped_and_no_dense_matmul():
  """The native-layout training step forms no kernel-sized dot output (the
  dense ``W + s·a·b``); the kernel's cotangent, the one such output, appears
  only when asked for; and the check flags a naive port."""
  spec = "BTD,NDH->BTNH"
  n, d, hd, tokens, rank = 8, 384, 48, 64, 16
  sd = jax.ShapeDtypeStruct
  x, w = sd((2, tokens, d), jnp.bfloat16), sd((n, d, hd), jnp.bfloat16)
  layout = general.einsum_layout(spec, x.shape, w.shape)
  a_s, b_s, m_s = (sd(s, jnp.float32) for s in layout.adapter_shapes(rank))
  cot = sd((2, tokens, n, hd), jnp.bfloat16)

  def loss(x, w, a, b, m, cot, op=general.dora_einsum):
    return jnp.sum(op(spec, x, w, a, b, m, 2.0).astype(jnp.float32) * cot)

  def naive(spec, x, w, a, b, m, s):
    dense = w.astype(jnp.float32) + s * jnp.einsum("Dr,rNH->NDH", a, b)
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=1)))
    return jnp.einsum(spec, x.astype(jnp.float32), dense) * (m / norm)

  step = lambda argnums, op=general.dora_einsum: jax.make_jaxpr(jax.jit(jax.grad(
      lambda *args: loss(*args, op=op), argnums=argnums)))(x, w, a_s, b_s, m_s, cot)
  assert _kernel_sized_dots(step((0, 2, 3, 4)), w.shape) == []
  assert len(_kernel_sized_dots(step((1,)), w.shape)) == 1
  assert _kernel_sized_dots(step((0, 2, 3, 4), naive), w.shape) != []


def _unsorted_contractions(closed, base_operands):
  """Dots (recursively) contracting several axes of their larger operand out of its
  stored order (``jnp.einsum`` lists them reversed), the base op's own excepted."""
  found = []
  for eqn in dot_equations(closed):
    shapes = tuple(tuple(v.aval.shape) for v in eqn.invars)
    if shapes == base_operands:
      continue  # the model's contraction, computed exactly as the model does
    (lc, rc), _ = eqn.params["dimension_numbers"]
    axes = lc if math.prod(shapes[0]) >= math.prod(shapes[1]) else rc
    if list(axes) != sorted(axes):
      found.append((shapes, eqn.params["dimension_numbers"]))
  return found


@pytest.mark.parametrize("spec,x_shape,k_shape", [
    ("BTD,NDH->BTNH", (2, 64, 96), (8, 96, 16)),  # t = dpre·bᵀ contracts (N, H) of dy
    ("btnh,nhd->btd", (2, 64, 8, 16), (8, 16, 96)),  # x·a and aᵀW contract (N, H)
])
def test_adapter_contractions_take_axes_in_stored_order(spec, x_shape, k_shape):
  """The native step's own contractions over several axes take the larger operand's
  axes in stored order: XLA:CPU would otherwise copy ``dy``, ``x`` or the kernel
  into einsum's reversed order on every call (a [T, d_out]-, [T, d_in]- or
  kernel-sized transpose; XLA:GPU sorts them itself)."""
  sd = jax.ShapeDtypeStruct
  layout = general.einsum_layout(spec, x_shape, k_shape)
  x, w = sd(x_shape, jnp.bfloat16), sd(k_shape, jnp.bfloat16)
  a, b, m = (sd(s, jnp.bfloat16) for s in layout.adapter_shapes(16))
  cot = jax.eval_shape(lambda x, w: jnp.einsum(spec, x, w), x, w)
  for detach in (True, False):
    loss = lambda x, a, b, m, cot: jnp.sum(general.dora_einsum(
        spec, x, jnp.zeros(k_shape, jnp.bfloat16), a, b, m, 2.0,
        detach_norm=detach).astype(jnp.float32) * cot)
    closed = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, a, b, m, cot)
    assert _unsorted_contractions(closed, (x_shape, k_shape)) == [], (spec, detach)


def test_dense_like_layout_routes_to_dora_dense():
  """A plain x·W keeps dora_dense's fused kernels: with backend='pallas' the
  traced op holds the Pallas call, for one and for two contracted axes."""
  for spec, x_shape, k_shape in [("btd,df->btf", (2, 8, 32), (32, 48)),
                                 ("btnh,nhd->btd", (2, 8, 4, 8), (4, 8, 48))]:
    layout = general.einsum_layout(spec, x_shape, k_shape)
    a, b, m = (jnp.ones(s) for s in layout.adapter_shapes(4))
    jaxpr = jax.make_jaxpr(lambda x, w: general.dora_einsum(spec, x, w, a, b, m, 1.0,
                                                            backend="pallas"))(
        jnp.ones(x_shape, jnp.bfloat16), jnp.ones(k_shape, jnp.bfloat16))
    assert "pallas_call" in str(jaxpr), spec
  # a native layout never routes there
  spec, x_shape, k_shape = LAYOUTS[0]
  layout = general.einsum_layout(spec, x_shape, k_shape)
  a, b, m = (jnp.ones(s) for s in layout.adapter_shapes(2))
  jaxpr = jax.make_jaxpr(lambda x, w: general.dora_einsum(spec, x, w, a, b, m, 1.0,
                                                          backend="pallas"))(
      jnp.ones(x_shape), jnp.ones(k_shape))
  assert "pallas_call" not in str(jaxpr)


def test_layout_parsing_and_bad_input():
  layout = general.einsum_layout("BSD,CKDH->CBSKH", (2, 3, 12), (2, 3, 12, 4))
  assert (layout.contracted, layout.batch, layout.output) == ((2,), (), (0, 1, 3))
  assert layout.adapter_shapes(5) == ((12, 5), (5, 2, 3, 4), (2, 3, 4))
  assert not layout.is_matrix
  w = jnp.arange(2 * 3 * 12 * 4, dtype=jnp.float32).reshape(2, 3, 12, 4)
  np.testing.assert_array_equal(layout.from_matrix(layout.to_matrix(w)), w)
  with pytest.raises(ValueError, match="summed away"):
    general.einsum_layout("btd,df->bf", (2, 3, 4), (4, 5))
  with pytest.raises(ValueError, match="summed away"):
    general.einsum_layout("bd,dfe->bf", (2, 4), (4, 5, 6))
  with pytest.raises(ValueError, match="two operands"):
    general.einsum_layout("bd,df,fe->be", (2, 4), (4, 5))
  with pytest.raises(ValueError, match="ellipsis in the kernel"):
    general.einsum_layout("bd,...d->b...", (2, 4), (3, 4))
  with pytest.raises(ValueError, match="input has rank 2"):
    general.einsum_layout("btd,df->btf", (2, 4), (4, 5))
  with pytest.raises(ValueError, match="repeated"):
    general.einsum_layout("bdd,df->bf", (2, 4, 4), (4, 5))
  x = jnp.ones((2, 3, 12))
  w = jnp.ones((4, 12, 5))
  a, b, m = (jnp.ones(s) for s in general.einsum_layout("BTD,NDH->BTNH", x.shape,
                                                        w.shape).adapter_shapes(2))
  with pytest.raises(ValueError, match="lora_b must have shape"):
    general.dora_einsum("BTD,NDH->BTNH", x, w, a, b.T, m, 1.0)
  with pytest.raises(ValueError, match="magnitude must have shape"):
    general.dora_einsum("BTD,NDH->BTNH", x, w, a, b, m.reshape(-1), 1.0)
  with pytest.raises(TypeError, match="kernel must have a floating dtype"):
    general.dora_einsum("BTD,NDH->BTNH", x, w.astype(jnp.int32), a, b, m, 1.0)
  with pytest.raises(ValueError, match="dimension_numbers"):
    general.dora_dot_general(x, w, a, b, m, 1.0, (((5,), (1,)), ((), ())))


def _undetached_reference(spec, layout, p, scale):
  """Dense DoRA without detach on the [*B, d_in, d_out] view (float64 autodiff target)."""
  nb = math.prod(layout.batch_shape)
  rank = p["a"].shape[-1]
  mat = layout.to_matrix(p["w"]).reshape(nb, layout.d_in, layout.d_out)
  dense = mat + scale * p["a"].reshape(nb, layout.d_in, rank) @ p["b"].reshape(nb, rank, -1)
  norm = jnp.sqrt(jnp.sum(dense * dense, axis=1))  # no stop_gradient
  merged = dense * (p["m"].reshape(nb, layout.d_out) / norm)[:, None, :]
  merged = layout.from_matrix(merged.reshape(*layout.batch_shape, layout.d_in, layout.d_out))
  return jnp.einsum(spec, p["x"], merged, precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("spec,x_shape,k_shape", [LAYOUTS[0], LAYOUTS[1], LAYOUTS[4], LAYOUTS[6]])
def test_exact_gradient_matches_undetached_float64(fresh_key, spec, x_shape, k_shape):
  """detach_norm=False: every gradient (the kernel's too) is jax.grad of the dense
  float64 formula without detach to 1e-12; the default stays detached."""
  with jax.enable_x64(True):
    x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape, dtype=jnp.float64)
    p = dict(x=x, w=w, a=a, b=b, m=m)
    cot = jax.random.normal(fresh_key(), _undetached_reference(spec, layout, p, SCALE).shape,
                            jnp.float64)
    expected = jax.jit(jax.grad(
        lambda q: jnp.sum(_undetached_reference(spec, layout, q, SCALE) * cot)))(p)

    def loss(q, detach):
      y = general.dora_einsum(spec, q["x"], q["w"], q["a"], q["b"], q["m"], SCALE,
                              detach_norm=detach)
      return jnp.sum(y * cot)

    got = jax.jit(jax.grad(lambda q: loss(q, False)))(p)
    for name in p:
      assert rel_err(got[name], expected[name]) < 1e-12, (name, rel_err(got[name], expected[name]))
    detached = jax.jit(jax.grad(lambda q: loss(q, True)))(p)
    assert rel_err(detached["a"], expected["a"]) > 1e-6  # the default differs: it is detached
    # central finite differences along a random direction of (a, b)
    da, db = (jax.random.normal(fresh_key(), v.shape, jnp.float64) for v in (a, b))
    eps = 1e-6
    shifted = jax.jit(lambda t: loss(dict(p, a=a + t * da, b=b + t * db), False))
    fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    analytic = jnp.sum(got["a"] * da) + jnp.sum(got["b"] * db)
    assert abs(float(fd - analytic)) <= 1e-7 * max(1.0, abs(float(analytic)))


def test_exact_gradient_float32_and_one_more_kernel_read(fresh_key):
  """float32 exact gradients within rounding of float64; the exact step adds one
  contraction with the kernel (aᵀ-side cotangent) and no kernel-sized dot output."""
  spec, x_shape, k_shape = LAYOUTS[0]
  x, w, a, b, m, layout = _case(fresh_key, spec, x_shape, k_shape)
  p = dict(x=x, w=w, a=a, b=b, m=m)
  with jax.enable_x64(True):
    p64 = {k: jnp.asarray(f64(v)) for k, v in p.items()}
    cot = np.random.default_rng(1).normal(size=_undetached_reference(spec, layout, p64,
                                                                     SCALE).shape)
    expected = jax.grad(lambda q: jnp.sum(_undetached_reference(spec, layout, q, SCALE)
                                          * jnp.asarray(cot)))(p64)
  adapters = ("x", "a", "b", "m")

  def loss(q, detach):
    y = general.dora_einsum(spec, q["x"], w, q["a"], q["b"], q["m"], SCALE, detach_norm=detach)
    return jnp.sum(y * cot.astype(np.float32))

  got = jax.jit(jax.grad(lambda q: loss(q, False)))({k: p[k] for k in adapters})
  for name in adapters:
    assert rel_err(got[name], expected[name]) < 1e-5, name

  def kernel_dots(detach):
    jaxpr = jax.make_jaxpr(jax.grad(lambda q: loss(q, detach)))({k: p[k] for k in adapters})
    return sum(1 for shapes in _dot_operand_shapes(jaxpr) if tuple(k_shape) in shapes)

  assert kernel_dots(False) == kernel_dots(True) + 1
  exact = jax.make_jaxpr(jax.grad(lambda q: loss(q, False)))({k: p[k] for k in adapters})
  assert _kernel_sized_dots(exact, k_shape) == []


def _dot_operand_shapes(closed):
  return [{tuple(v.aval.shape) for v in eqn.invars} for eqn in dot_equations(closed)]


@pytest.mark.parametrize("spec,x_shape,k_shape", [LAYOUTS[0], LAYOUTS[4]])
def test_norm_cancellation_native_layout(fresh_key, spec, x_shape, k_shape):
  """Columns whose update cancels them (W_j ≈ −s(ab)_j, down to ‖W+s·a·b‖/‖W‖ = 1e-3)
  stay within 1e-4 of float64 in a native layout too (on a GPU: all but the
  flagged columns beyond one refinement round); rank 5, float32."""
  from test_norm_cancellation import GPU, assert_refined, cancelling_layer
  layout = general.einsum_layout(spec, x_shape, k_shape)
  nb, rank, scale = math.prod(layout.batch_shape), 5, 1.3
  parts = [cancelling_layer(fresh_key(), layout.d_in, layout.d_out, rank, scale)
           for _ in range(nb)]
  w = layout.from_matrix(jnp.stack([p[0] for p in parts]).reshape(
      *layout.batch_shape, layout.d_in, layout.d_out))
  a = jnp.stack([p[1] for p in parts]).reshape(layout.adapter_shapes(rank)[0])
  b = jnp.stack([p[2] for p in parts]).reshape(layout.adapter_shapes(rank)[1])
  dense = (f64(jnp.stack([p[0] for p in parts]))
           + scale * f64(jnp.stack([p[1] for p in parts])) @ f64(jnp.stack([p[2] for p in parts])))
  expected = np.linalg.norm(dense, axis=1).reshape(layout.adapter_shapes(rank)[2])
  ratio = expected / np.linalg.norm(f64(jnp.stack([p[0] for p in parts])), axis=1).reshape(
      expected.shape)
  assert ratio.min() < 1.5e-3  # the layer does cancel
  got = jax.jit(lambda w, a, b: general.weight_norm(w, a, b, scale, layout))(w, a, b)
  # the native layout refines with gathered columns: one round on a GPU
  plain = None
  if GPU:
    unrefined = jax.jit(jax.vmap(functools.partial(dora_jax.factored_norm, refine="off"),
                                 in_axes=(0, 0, 0, None)))
    plain = unrefined(*(jnp.stack(v) for v in zip(*parts)), scale).reshape(expected.shape)
  assert_refined(got, expected, ratio, plain=plain)

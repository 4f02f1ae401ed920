"""QDoRA (dora_jax.quantized): DoRA over a quantized frozen weight.

For every quantized type, the forward and every adapter gradient are checked
against a float64 DoRA computed over the dequantized weight ``Ŵ``; init
reproduces the quantized base op bit for bit; merge equals the op; the traced
training step holds no float array as large as the kernel (no dequantized
copy, no convert of the whole quantized weight) and its residuals no
dequantized kernel, while qwix's QLoRA op and a dequantize-first DoRA fail
that check. The quantizer is qwix's: codes and dequantized values are
compared with it directly.
"""

from __future__ import annotations

import functools
import math
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("qwix")

from dora_jax import _qwix_compat, general, quantized
from dora_jax.quantized import QTYPES, quantize_kernel
from helpers.reference import assert_grads_close, assert_same_result, f64, rel_err
from helpers.jaxprs import float_values_holding, largest_value_holding, sub_jaxprs as _sub_jaxprs

SCALE, RANK = 0.7, 3
# (spec, x shape, kernel shape, block size of the 4-bit types): a Dense kernel,
# gemma's q einsum, a [d_out, d_in] kernel, two contracted axes, a batched kernel
DENSE = ("btd,df->btf", (2, 3, 32), (32, 24), 8)
NATIVE = ("BTD,NDH->BTNH", (2, 3, 32), (4, 32, 6), 16)
TRANSPOSED = ("btd,fd->btf", (2, 3, 32), (24, 32), 8)
TWO_CONTRACTED = ("btnh,nhd->btd", (2, 3, 4, 8), (4, 8, 20), 4)
BATCHED = ("...hi,hij->...hj", (2, 3, 4, 16), (4, 16, 10), 8)
# every type on the Dense kernel and one native layout; every layout at least once
CASES = ([(q, DENSE) for q in QTYPES]
         + [("nf4", NATIVE), ("fp8", NATIVE), ("int8", TRANSPOSED), ("int4", TWO_CONTRACTED),
            ("nf4", BATCHED)])


def _block(qtype, block):
  return block if qtype in ("nf4", "int4") else None


def _layer(fresh_key, qtype, case, dtype=jnp.float32, chunk_bytes=700):
  """``(x, qk, a, b, m, layout)``; a small ``chunk_bytes`` splits the weight into parts
  (with a remainder part for the Dense kernel: 24 = 4 · 5 + 4 columns)."""
  spec, x_shape, k_shape, block = case
  layout = general.einsum_layout(spec, x_shape, k_shape)
  w = (jax.random.normal(fresh_key(), k_shape) / math.sqrt(layout.d_in)).astype(dtype)
  qk = quantize_kernel(w, qtype, block_size=_block(qtype, block), layout=layout,
                       chunk_bytes=chunk_bytes)
  x = jax.random.normal(fresh_key(), x_shape).astype(dtype)
  a_shape, b_shape, m_shape = layout.adapter_shapes(RANK)
  a = jax.random.normal(fresh_key(), a_shape) / math.sqrt(layout.d_in)
  b = 0.5 * jax.random.normal(fresh_key(), b_shape)
  m = quantized.init_magnitude(qk) * (1 + 0.2 * jax.random.normal(fresh_key(), m_shape))
  return x, qk, a, b, m, layout


@functools.partial(jax.jit, static_argnums=(0, 1))
def _dense_dora64(spec, layout, p, cot):
  """Float64 DoRA through the ``[*B, d_in, d_out]`` view of the float weight (the
  dense formulation, norm detached): the value and the gradients of ``Σ y ⊙ cot``."""
  nb, rank = math.prod(layout.batch_shape), p["a"].shape[-1]

  def forward(q):
    mat = layout.to_matrix(p["w"]).reshape(nb, layout.d_in, layout.d_out)
    dense = mat + SCALE * (q["a"].reshape(nb, layout.d_in, rank)
                           @ q["b"].reshape(nb, rank, layout.d_out))
    norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=1)))
    g = q["m"].reshape(nb, layout.d_out) / norm
    merged = layout.from_matrix((dense * g[:, None, :]).reshape(
        *layout.batch_shape, layout.d_in, layout.d_out))
    return jnp.einsum(spec, q["x"], merged, precision=jax.lax.Precision.HIGHEST)

  q = {k: p[k] for k in "xabm"}
  return forward(q), jax.grad(lambda q: jnp.sum(forward(q) * cot))(q)


def _reference(spec, layout, x, w, a, b, m):
  """``(y, cot, grads)`` in float64 numpy for the float weight ``w`` (here ``Ŵ``)."""
  with jax.enable_x64(True):
    p = {k: jnp.asarray(f64(v)) for k, v in dict(x=x, w=w, a=a, b=b, m=m).items()}
    shape = jax.eval_shape(lambda: jnp.einsum(spec, p["x"], p["w"])).shape
    cot = np.random.default_rng(int(np.asarray(x).ravel()[0] * 1e6) % 2**31).normal(size=shape)
    y, grads = _dense_dora64(spec, layout, p, jnp.asarray(cot))
    return np.asarray(y), cot, {k: np.asarray(v) for k, v in grads.items()}


def _loss_and_grads(spec, qk, cot):
  def loss(x, a, b, m):
    y = general.dora_einsum(spec, x, qk, a, b, m, SCALE)
    return jnp.sum(y.astype(jnp.float32) * cot), y

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))


@pytest.mark.parametrize("qtype,case", CASES, ids=[f"{q}-{c[0]}" for q, c in CASES])
def test_forward_and_grads_match_float64_over_dequantized(fresh_key, qtype, case):
  spec = case[0]
  x, qk, a, b, m, layout = _layer(fresh_key, qtype, case)
  assert not qk.parts().whole
  w = qk.dequantize()
  y_ref, cot, g_ref = _reference(spec, layout, x, w, a, b, m)
  grads, y = _loss_and_grads(spec, qk, jnp.asarray(cot, jnp.float32))(x, a, b, m)
  assert y.dtype == jnp.float32 and y.shape == y_ref.shape
  assert rel_err(y, y_ref) < 1e-5
  assert_grads_close(grads, "xabm", g_ref, 1e-5)


@pytest.mark.parametrize("qtype", QTYPES)
def test_bf16_within_rounding(fresh_key, qtype):
  spec = DENSE[0]
  x, qk, a, b, m, layout = _layer(fresh_key, qtype, DENSE, dtype=jnp.bfloat16)
  assert qk.dtype == jnp.bfloat16
  y_ref, cot, g_ref = _reference(spec, layout, x, qk.dequantize(), a, b, m)
  grads, y = _loss_and_grads(spec, qk, jnp.asarray(cot, jnp.float32))(x, a, b, m)
  assert y.dtype == jnp.bfloat16
  assert rel_err(y, y_ref) < 1e-2
  assert_grads_close(grads, "xabm", g_ref, 2e-2)


@pytest.mark.parametrize("qtype", QTYPES)
def test_init_reproduces_quantized_base_exactly(fresh_key, qtype):
  """PEFT's QDoRA init (b = 0, m = ‖Ŵ‖): the output is the quantized base op's,
  bit for bit (on a GPU to the rounding of two compilations: assert_same_result)."""
  for case, dtype in ((DENSE, jnp.float32), (DENSE, jnp.bfloat16), (NATIVE, jnp.float32)):
    spec = case[0]
    x, qk, a, b, _, _ = _layer(fresh_key, qtype, case, dtype=dtype)
    base = quantized.quantized_einsum(spec, x, qk)
    y = general.dora_einsum(spec, x, qk, a, jnp.zeros_like(b), quantized.init_magnitude(qk),
                            SCALE)
    assert y.dtype == base.dtype == dtype
    assert_same_result(y, base, np.einsum(spec, np.abs(f64(x)), np.abs(f64(qk.dequantize()))))
    # and the quantized base op is x·Ŵ
    assert rel_err(base, np.einsum(spec, f64(x), f64(qk.dequantize()))) < (
        1e-6 if dtype == jnp.float32 else 1e-2)


@pytest.mark.parametrize("qtype", QTYPES)
def test_merge_equals_unmerged(fresh_key, qtype):
  spec = NATIVE[0]
  x, qk, a, b, m, layout = _layer(fresh_key, qtype, NATIVE)
  merged = quantized.merge_weight(qk, a, b, m, SCALE)
  assert merged.shape == layout.shape and merged.dtype == jnp.float32
  y = general.dora_einsum(spec, x, qk, a, b, m, SCALE)
  y_merged = jnp.einsum(spec, x, merged, precision=jax.lax.Precision.HIGHEST)
  assert rel_err(y_merged, y) < 1e-5
  again = quantized.merge_weight(qk, a, b, m, SCALE, requantize=True)
  assert (again.qtype, again.block_size, again.layout) == (qk.qtype, qk.block_size, qk.layout)
  _assert_within_quantization_error(again, merged)


def _assert_same_codes_but_ties(mine, ref, w, qk):
  """Codes equal qwix's, except where ``w / scale`` sits on the midpoint of two
  neighbouring codes (within 1e-5): such a tie (the absmax entry at exactly
  ±127.5 for int8) rounds either way with the division's last bit, which
  XLA's GPU compiler may produce differently in two programs."""
  def values(q):
    v = np.asarray(q.qvalue).astype(np.float64)
    return _qwix_compat.nf4_codebook().astype(np.float64)[v.astype(int)] if qk.qtype == "nf4" else v
  got, want = values(mine), values(ref)
  diff = got != want
  if not diff.any():
    return
  scale = np.asarray(qk.scale, np.float64)
  if qk.block_size is not None:
    scale = np.repeat(scale, qk.block_size, axis=qk.blocked_axis)
  t = np.broadcast_to(f64(w) / scale, got.shape)[diff]
  mid = (got[diff] + want[diff]) / 2
  assert np.all(np.abs(t - mid) <= 1e-5 * np.maximum(1.0, np.abs(t))), np.max(np.abs(t - mid))


def _assert_within_quantization_error(qk, w):
  """Each dequantized entry lies within half a quantization step of the float weight."""
  scale = np.asarray(qk.scale, np.float64)
  if qk.block_size is not None:
    scale = np.repeat(scale, qk.block_size, axis=qk.blocked_axis)
  w, err = f64(w), np.abs(f64(qk.dequantize()) - f64(w))
  if qk.qtype == "nf4":
    book = _qwix_compat.nf4_codebook().astype(np.float64)
    bound = np.max(np.diff(book)) / 2 * scale
  elif qk.qtype == "fp8":  # 3 mantissa bits; the subnormal spacing 2⁻⁹ near zero
    bound = np.abs(w) * 2.0 ** -4 + 2.0 ** -10 * scale
  else:
    bound = 0.5 * scale
  # slack: x / scale rounds to within an ulp of the step's half (e.g. ±127.5)
  assert np.all(err <= bound + 1e-4 * scale), float(np.max((err - bound) / scale))


@pytest.mark.parametrize("qtype", QTYPES)
def test_quantizer_is_qwix_and_bounded(fresh_key, qtype):
  """Codes and Ŵ are qwix's (quantizing the whole kernel at once), also when
  quantize_kernel works slice by slice; the error is within half a step."""
  spec, x_shape, k_shape, block = NATIVE
  layout = general.einsum_layout(spec, x_shape, k_shape)
  w = jax.random.normal(fresh_key(), k_shape)
  qk = quantize_kernel(w, qtype, block_size=_block(qtype, block), layout=layout,
                       quantize_chunk=300)  # slice by slice
  axis = layout.contracted[-1]
  ref = _qwix_compat.quantize(w, qtype, channelwise_axes=layout.batch + layout.output,
                              tiled_axes={axis: qk.block_size} if qk.block_size else {})
  mine = qk.to_qarray()
  assert mine.qvalue.dtype == ref.qvalue.dtype and mine.qtype == ref.qtype
  assert_same_result(mine.scale, ref.scale)  # absmax / qmax, divided in two programs
  _assert_same_codes_but_ties(mine, ref, w, qk)
  np.testing.assert_array_equal(np.asarray(qk.dequantize()),
                                np.asarray(_qwix_compat.dequantize(mine)))
  _assert_within_quantization_error(qk, w)
  # ‖Ŵ‖² is of the dequantized weight
  np.testing.assert_allclose(np.asarray(qk.sq_norm),
                             np.sum(f64(qk.dequantize()) ** 2, axis=1), rtol=1e-6)


def test_qwix_private_names_still_there():
  """The one private qwix name dora_jax uses (the nf4 codebook), checked against
  qwix's public dequantizer: a qwix release that moves or changes it fails here."""
  assert _qwix_compat.version() == _qwix_compat.QWIX_VERSION
  book = _qwix_compat.nf4_codebook()
  assert book.shape == (16,) and book[0] == -1 and book[7] == 0 and book[15] == 1
  assert np.all(np.diff(book) > 0)
  codes = jnp.arange(16, dtype=jnp.uint8).astype(jnp.uint4).reshape(16, 1)
  public = _qwix_compat.dequantize(_qwix_compat.qarray(codes, jnp.ones((1, 1)), "nf4"))
  np.testing.assert_array_equal(np.asarray(public).ravel(), book)


def test_storage_bytes():
  """4-bit codes take half a byte per weight, int8/fp8 one; plus float32 scales."""
  sd = jax.ShapeDtypeStruct
  d_in, d_out = 512, 384
  for qtype, block, per_param in (("nf4", 64, 0.5 + 4 / 64), ("int4", 128, 0.5 + 4 / 128),
                                  ("int8", None, 1 + 4 / d_in), ("fp8", None, 1 + 4 / d_in)):
    qk = jax.eval_shape(lambda w: quantize_kernel(w, qtype, block_size=block),
                        sd((d_in, d_out), jnp.bfloat16))
    nbytes = sum(math.prod(v.shape) * v.dtype.itemsize for v in (qk.codes, qk.scale))
    assert nbytes / (d_in * d_out) == pytest.approx(per_param), qtype


# -- memory: no dequantized kernel --------------------------------------------------


MEM_CASES = [("btd,df->btf", (2, 64, 4096), (4096, 14336), "nf4"),
             ("btd,df->btf", (2, 64, 4096), (4096, 14336), "int8"),
             ("btd,df->btf", (2, 64, 14336), (14336, 4096), "int4"),
             ("btd,df->btf", (2, 64, 4096), (4096, 1024), "fp8"),
             ("BTD,NDH->BTNH", (2, 64, 4096), (32, 4096, 128), "nf4")]


@pytest.mark.parametrize("spec,x_shape,k_shape,qtype", MEM_CASES)
def test_training_step_forms_no_dequantized_kernel(spec, x_shape, k_shape, qtype):
  """The traced training step (grads of x and the adapters, bf16): no float value
  as large as the kernel (a dequantized copy, or a convert of the whole quantized
  weight); the dequantized parts stay within chunk_bytes and at most half the
  kernel. The same check flags qwix's QLoRA op and a dequantize-first DoRA."""
  sd = jax.ShapeDtypeStruct
  w = sd(k_shape, jnp.bfloat16)
  layout = general.einsum_layout(spec, x_shape, k_shape)
  qk = jax.eval_shape(lambda w: quantize_kernel(w, qtype, layout=layout), w)
  a, b, m = (sd(s, jnp.float32) for s in layout.adapter_shapes(16))
  x = sd(x_shape, jnp.bfloat16)
  cot = sd(jax.eval_shape(lambda x, w: jnp.einsum(spec, x, w), x, w).shape, jnp.bfloat16)

  def step(dora):
    def loss(x, a, b, m, qk, cot):
      return jnp.sum(dora(x, qk, a, b, m).astype(jnp.float32) * cot)
    return jax.make_jaxpr(jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))))(x, a, b, m, qk, cot)

  closed = step(lambda x, qk, a, b, m: general.dora_einsum(spec, x, qk, a, b, m, 2.0))
  assert float_values_holding(closed, k_shape) == []
  largest = largest_value_holding(closed, layout.in_shape)  # elements of one dequantized part
  assert largest <= min(quantized.DEQUANT_CHUNK_BYTES // 2, math.prod(k_shape) // 2)
  # the check can fail: dequantizing first, and qwix's QLoRA (dequantizes on its input)
  naive = step(lambda x, qk, a, b, m: general.dora_einsum(spec, x, qk.dequantize(), a, b, m,
                                                          2.0))
  assert float_values_holding(naive, k_shape) != []
  if len(k_shape) == 2:
    import qwix
    qlora = step(lambda x, qk, a, b, m: qwix.dot_general(x, qk.to_qarray(),
                                                         (((2,), (0,)), ((), ())))
                 + 2.0 * (x @ a.astype(x.dtype)) @ b.astype(x.dtype))
    assert float_values_holding(qlora, k_shape) != []


def test_residuals_hold_no_dequantized_kernel(fresh_key):
  """What the backward keeps (the vjp closure's arrays): the quantized weight as
  stored and activation-sized values, never a float copy of the kernel."""
  x, qk, a, b, m, _ = _layer(fresh_key, "nf4", DENSE, chunk_bytes=1024)
  spec, size = DENSE[0], math.prod(DENSE[2])

  def residuals(dora):
    _, vjp = jax.vjp(lambda x, a, b, m: dora(x, a, b, m), x, a, b, m)
    return [leaf for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "dtype")]

  kept = residuals(lambda x, a, b, m: general.dora_einsum(spec, x, qk, a, b, m, SCALE))
  assert not [r.shape for r in kept
              if jnp.issubdtype(r.dtype, jnp.floating) and r.size >= size]
  assert any(r.dtype == jnp.uint8 and r.shape == qk.codes.shape for r in kept)
  w = qk.dequantize()
  naive = residuals(lambda x, a, b, m: general.dora_einsum(spec, x, w, a, b, m, SCALE))
  assert [r.shape for r in naive if jnp.issubdtype(r.dtype, jnp.floating) and r.size >= size]


# -- the contraction and the base op, differentiated -----------------------------------


def test_contraction_gradients_both_split_modes(fresh_key):
  """``contract`` differentiated in its lhs: where the split axis reaches the output
  (x·Ŵ) and where it is contracted (dpre·Ŵᵀ), against float64 over Ŵ; and the
  quantized base op's dx, and the norm's gradient through aᵀŴ."""
  x, qk, a, b, _, layout = _layer(fresh_key, "int4", DENSE)
  w = f64(qk.dequantize())
  cot_y = jax.random.normal(fresh_key(), (2, 3, 24))
  cot_x = jax.random.normal(fresh_key(), (2, 3, 32))
  dy = jax.random.normal(fresh_key(), (2, 3, 24))
  piece = lambda spec: lambda l, v: jnp.einsum(spec, l, v, preferred_element_type=jnp.float32)
  fwd = lambda x: jnp.sum(qk.contract("btd,df->btf", x, piece("btd,df->btf")) * cot_y)
  back = lambda d: jnp.sum(qk.contract("btf,df->btd", d, piece("btf,df->btd")) * cot_x)
  assert rel_err(jax.grad(fwd)(x), np.einsum("btf,df->btd", f64(cot_y), w)) < 1e-6
  assert rel_err(jax.grad(back)(dy), np.einsum("btd,df->btf", f64(cot_x), w)) < 1e-6
  dx = jax.grad(lambda x: jnp.sum(quantized.quantized_einsum("btd,df->btf", x, qk) * cot_y))(x)
  assert rel_err(dx, np.einsum("btf,df->btd", f64(cot_y), w)) < 1e-6
  norm_grads = [jax.grad(lambda a, b: jnp.sum(general.weight_norm(k, a, b, SCALE, layout)),
                         argnums=(0, 1))(a, b) for k in (qk, qk.dequantize())]
  for got, want in zip(*norm_grads):
    assert rel_err(got, want) < 1e-5


def test_contraction_onto_init(fresh_key):
  """``contract(..., init, init_scale)`` is ``init_scale·init + einsum`` in both split
  modes (a remainder part included), differentiated in lhs, init and init_scale."""
  x, qk, *_ = _layer(fresh_key, "nf4", DENSE)
  piece = lambda spec: lambda l, v: jnp.einsum(spec, l, v, preferred_element_type=jnp.float32)
  for spec, lhs_shape, out_shape in (("btd,df->btf", (2, 3, 32), (2, 3, 24)),
                                     ("btf,df->btd", (2, 3, 24), (2, 3, 32))):
    lhs = jax.random.normal(fresh_key(), lhs_shape)
    init = jax.random.normal(fresh_key(), out_shape)
    cot = jax.random.normal(fresh_key(), out_shape)
    s = jnp.float32(0.7)
    onto = lambda l, i, s: jnp.sum(qk.contract(spec, l, piece(spec), i, s) * cot)
    apart = lambda l, i, s: jnp.sum((s * i + qk.contract(spec, l, piece(spec))) * cot)
    got = qk.contract(spec, lhs, piece(spec), init, s)
    assert rel_err(got, s * init + qk.contract(spec, lhs, piece(spec))) < 1e-6
    for got, want in zip(jax.grad(onto, argnums=(0, 1, 2))(lhs, init, s),
                         jax.grad(apart, argnums=(0, 1, 2))(lhs, init, s)):
      assert rel_err(got, want) < 1e-6
    got = qk.contract(spec, lhs, piece(spec), init)
    assert rel_err(got, init + qk.contract(spec, lhs, piece(spec))) < 1e-6
  with pytest.raises(ValueError, match="output shape"):
    qk.contract("btd,df->btf", x, piece("btd,df->btf"), jnp.zeros((2, 3, 23)))
  with pytest.raises(ValueError, match="init_scale must be a scalar"):
    qk.contract("btd,df->btf", x, piece("btd,df->btf"), jnp.zeros((2, 3, 24)), jnp.ones(3))
  with pytest.raises(ValueError, match="pass init too"):
    qk.contract("btd,df->btf", x, piece("btd,df->btf"), None, 2.0)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's buffer assignment")
def test_training_step_temp_memory():
  """The compiled bf16 QDoRA step (forward + backward of x and the adapters; CPU
  compile, XLA's buffer assignment) within the buffers it must hold.

  T=512 tokens, d_in=2048 > d_out=512, nf4 split into 8 parts. The backward's
  dx = Σ_parts dpre·Ŵ_partᵀ is a float32 [T, d_in] sum over the parts: its
  accumulator (4 MiB) and one part's float32 product (4 MiB; XLA:CPU adds it to the
  accumulator out of place) must be live together; the [T, d_out]-sized
  activations (pre in float32, dpre, the loss's terms) and the parts of Ŵ are
  given two float32 [T, d_out] (2 MiB) here. The sum starts from the LoRA term
  dx_lora itself (and pre = s·h·b with the base op's parts added in place): a
  zeros accumulator beside dx_lora, and the base op's own [T, d_out] output, made
  it 13.2 MiB."""
  t, d_in, d_out, rank = 512, 2048, 512, 8
  dtype = jnp.bfloat16
  spec = jax.ShapeDtypeStruct
  qk = jax.eval_shape(lambda w: quantize_kernel(w, "nf4", block_size=64, chunk_bytes=2**18),
                      spec((d_in, d_out), dtype))
  assert qk.parts().count == 8

  def loss(a, b, m, x, cot, qk):
    y = general.dora_einsum("td,df->tf", x, qk, a, b, m, SCALE)
    return jnp.sum((y * cot).astype(jnp.float32))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  compiled = step.lower(spec((d_in, rank), dtype), spec((rank, d_out), dtype),
                        spec((d_out,), dtype), spec((t, d_in), dtype), spec((t, d_out), dtype),
                        qk).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  f32 = 4
  assert temp <= 2 * t * d_in * f32 + 2 * t * d_out * f32, temp / 2**20


def test_parts_bound_and_split():
  parts = quantized._parts
  p = parts((4096, 14336), (1,), 2, 32 * 2**20, 2)      # 112 MiB of bf16
  assert (p.axis, p.size, p.count, p.rest) == (1, 3584, 4, 0)
  p = parts((4096, 1024), (1,), 2, 32 * 2**20, 2)       # fits: still two halves
  assert (p.size, p.count, p.rest) == (512, 2, 0)
  p = parts((32, 4096, 128), (0, 2), 2, 8 * 2**20, 2)   # 32 MiB: heads, 4 parts
  assert (p.axis, p.count, p.rest) == (0, 4, 0)
  p = parts((64, 24), (1,), 4, 1280, 2)                 # 5 columns fit: 4 · 5 + 4
  assert (p.size, p.count, p.rest) == (5, 4, 4)
  p = parts((4, 32, 6), (0, 2), 4, 700, 2)              # one head (768 bytes) at least
  assert (p.axis, p.size, p.count, p.rest) == (0, 1, 4, 0)
  assert parts((8, 1), (1,), 4, 1, 2).whole


# -- bad input --------------------------------------------------------------------------


def test_bad_input_is_named(fresh_key):
  w = jax.random.normal(fresh_key(), (32, 24))
  with pytest.raises(ValueError, match="qtype must be one of"):
    quantize_kernel(w, "int3")
  with pytest.raises(ValueError, match="block_size=12 must divide d_in"):
    quantize_kernel(w, "nf4", block_size=12)
  with pytest.raises(ValueError, match="block_size=5 must be even"):
    quantize_kernel(jax.random.normal(fresh_key(), (40, 24)), "int4", block_size=5)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    quantize_kernel(w, "int8", block_size=0)
  qk = quantize_kernel(w, "int8")
  with pytest.raises(TypeError, match="already quantized"):
    quantize_kernel(qk, "nf4")
  with pytest.raises(TypeError, match="already quantized .a qwix QArray"):
    quantize_kernel(qk.to_qarray(), "nf4")
  with pytest.raises(TypeError, match="look quantized already"):
    quantize_kernel(qk.codes, "nf4")
  with pytest.raises(ValueError, match="layout: a kernel of shape .4, 32, 6. needs"):
    quantize_kernel(jax.random.normal(fresh_key(), (4, 32, 6)), "nf4")
  with pytest.raises(ValueError, match="layout is for a kernel of shape"):
    quantize_kernel(w.T, "nf4", layout=general.einsum_layout("bd,df->bf", (2, 32), (32, 24)))
  with pytest.raises(TypeError, match="layout must be a dora_jax.general.WeightLayout"):
    quantize_kernel(w, "nf4", layout="dense")
  # a weight quantized for one contraction, used in another (other axes contracted)
  square = quantize_kernel(jax.random.normal(fresh_key(), (24, 24)), "int8")
  lay = general.einsum_layout("bd,fd->bf", (2, 24), (24, 24))
  a, b, m = (jnp.ones(s) for s in lay.adapter_shapes(2))
  with pytest.raises(ValueError, match="kernel was quantized for"):
    general.dora_einsum("bd,fd->bf", jnp.ones((2, 24)), square, a, b, m, 1.0)
  with pytest.raises(ValueError, match="kernel was quantized for"):
    quantized.quantized_einsum("bd,fd->bf", jnp.ones((2, 24)), square)
  with pytest.raises(TypeError, match="weight must be a QuantizedKernel"):
    quantized.quantized_einsum("bd,df->bf", jnp.ones((2, 32)), w)
  # the quantized weight is frozen
  x = jnp.ones((2, 32))
  a, b, m = jnp.ones((32, 2)), jnp.ones((2, 24)), quantized.init_magnitude(qk)
  with pytest.raises(TypeError, match="quantized weight is frozen"):
    jax.grad(lambda k: jnp.sum(general.dora_einsum("bd,df->bf", x, k, a, b, m, 1.0)),
             allow_int=True)(qk)
  with pytest.raises(TypeError, match="quantized weight is frozen"):
    jax.grad(lambda k: jnp.sum(quantized.quantized_einsum("bd,df->bf", x, k)),
             allow_int=True)(qk)


def test_exact_gradient_through_the_quantized_norm(fresh_key):
  """detach_norm=False over a quantized weight: the exact gradient of DoRA over Ŵ
  (float64 autodiff of the undetached dense formula), the norm's aᵀŴ transposed
  part by part; the traced step still forms no kernel-sized float value."""
  from test_general import _undetached_reference
  spec = NATIVE[0]
  x, qk, a, b, m, layout = _layer(fresh_key, "nf4", NATIVE)
  p = dict(x=x, a=a, b=b, m=m)
  with jax.enable_x64(True):
    p64 = {k: jnp.asarray(f64(v)) for k, v in dict(p, w=qk.dequantize()).items()}
    shape = jax.eval_shape(lambda: _undetached_reference(spec, layout, p64, SCALE)).shape
    cot = np.random.default_rng(2).normal(size=shape)
    expected = jax.jit(jax.grad(lambda q: jnp.sum(
        _undetached_reference(spec, layout, dict(q, w=p64["w"]), SCALE) * jnp.asarray(cot))))(
            {k: p64[k] for k in p})

  def loss(q):
    y = general.dora_einsum(spec, q["x"], qk, q["a"], q["b"], q["m"], SCALE, detach_norm=False)
    return jnp.sum(y * cot.astype(np.float32))

  got = jax.jit(jax.grad(loss))(p)
  for name in p:
    assert rel_err(got[name], expected[name]) < 1e-5, (name, rel_err(got[name], expected[name]))
  spec, x_shape, k_shape, qtype = MEM_CASES[0]
  sd = jax.ShapeDtypeStruct
  big = jax.eval_shape(lambda w: quantize_kernel(w, qtype), sd(k_shape, jnp.bfloat16))
  lay = general.einsum_layout(spec, x_shape, k_shape)
  args = [sd(x_shape, jnp.bfloat16)] + [sd(s, jnp.float32) for s in lay.adapter_shapes(16)]
  closed = jax.make_jaxpr(jax.grad(lambda x, a, b, m: jnp.sum(general.dora_einsum(
      spec, x, big, a, b, m, 2.0, detach_norm=False).astype(jnp.float32)),
      argnums=(0, 1, 2, 3)))(*args)
  assert float_values_holding(closed, k_shape) == []

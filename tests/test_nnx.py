"""Flax NNX DoRA layers: init, float64 references, training, merge, cached norm, dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from helpers.adapter_helpers import (build, einsum_reference, randomize_adapters, reproduces_base,
                                     require_bit_exact)
from helpers.reference import dora_forward, dora_value_and_grads, f64, rel_err
from dora_jax.nnx import DoRACache, DoRADense, DoRAEinsum, DoRALinearGeneral, DoRAParam

FP32_TOL = 2e-6  # rel-L2 vs float64 for small fp32 layers

# One compiled call per layer structure (eager op-by-op dispatch is slow on CPU).
_fwd = nnx.jit(lambda m, x: m(x))


def _seed(fresh_key):
  return int(jax.random.randint(fresh_key(), (), 0, 2**30))


_BASES: list = []


def _layers(fresh_key):
  """(base layer, fresh input, einsum equation for the reference) triples.

  The base layers (random kernels and biases) are built once per session and
  shared, read-only, so their compiled forwards are reused; inputs are fresh.
  """
  if not _BASES:
    makers = [
        lambda r: nnx.Linear(12, 10, rngs=r),
        lambda r: nnx.Linear(12, 10, use_bias=False, rngs=r),
        lambda r: nnx.LinearGeneral(12, (2, 5), rngs=r),
        # contracted axes (1, -1) are not trailing: the input is transposed
        lambda r: nnx.LinearGeneral((5, 4), (6,), axis=(1, -1), rngs=r),
        lambda r: nnx.Einsum("btd,dhk->bthk", (12, 2, 5), (2, 5), rngs=r),
        # output order differs from the kernel's: the output (and bias) are permuted
        lambda r: nnx.Einsum("btd,dhk->bkth", (12, 2, 5), (5, 2), rngs=r),
        # attention-output style: two contracted axes
        lambda r: nnx.Einsum("btnh,nhd->btd", (3, 4, 7), (7,), rngs=r),
        lambda r: nnx.Einsum("...d,dk->...k", (12, 6), (6,), rngs=r),
    ]
    layers = [build(lambda: make(nnx.Rngs(0)), fresh_key()) for make in makers]
    kinds = [(3, "btd,de->bte"), (3, "btd,de->bte"), (3, "btd,dhk->bthk"),
             (4, "bsci,sie->bce"), (3, "btd,dhk->bthk"), (3, "btd,dhk->bkth"),
             (4, "btnh,nhd->btd"), (3, "btd,dk->btk")]
    _BASES.extend((layer, kind, eq) for layer, (kind, eq) in zip(layers, kinds))
  x3 = jax.random.normal(fresh_key(), (3, 5, 12))
  x4 = jax.random.normal(fresh_key(), (2, 5, 3, 4))
  return [(base, x3 if kind == 3 else x4, eq) for base, kind, eq in _BASES]


# Same adapter configuration everywhere, so each wrapper structure compiles once.
RANK, ALPHA = 3, 6.0


def _bias_shape(base, eq):
  if base.bias is None:
    return None
  out = eq.split("->")[1]
  rhs = eq.split(",")[1].split("->")[0]
  sizes = dict(zip(rhs, base.kernel.shape))
  return [sizes.get(c, 1) for c in out]


def test_init_reproduces_base(fresh_key):
  exact = []
  for base, x, _ in _layers(fresh_key):
    y_base = _fwd(base, x)
    layer = dora_jax.nnx.wrap(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(_seed(fresh_key)))
    assert layer.kernel is base.kernel  # the same Variable, not a copy
    assert type(layer.kernel) is nnx.Param and not isinstance(layer.kernel, nnx.LoRAParam)
    assert isinstance(layer.lora_a, DoRAParam) and isinstance(layer.lora_a, nnx.LoRAParam)
    # The base contraction runs as the base layer runs it (its own einsum/dot_general,
    # several contracted axes included), so the output is the base's bit for bit.
    exact.append(reproduces_base(_fwd(layer, x), y_base))
  require_bit_exact(exact)


def test_peft_init():
  base = nnx.Linear(400, 300, rngs=nnx.Rngs(0))
  layer = DoRADense(base, rank=64, alpha=16, rngs=nnx.Rngs(1))
  a = np.asarray(layer.lora_a[...])
  bound = 1 / np.sqrt(400)  # torch kaiming_uniform_(a=sqrt(5)) on [r, d_in]
  assert a.shape == (400, 64) and np.abs(a).max() <= bound
  assert np.abs(a).max() > 0.98 * bound and abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound
  assert np.all(np.asarray(layer.lora_b[...]) == 0)
  np.testing.assert_allclose(layer.magnitude[...], np.linalg.norm(f64(base.kernel[...]), axis=0),
                             rtol=1e-6)
  assert layer.scale == 16 / 64
  rs = DoRADense(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), rank=4, alpha=8, rslora=True,
                 rngs=nnx.Rngs(1))
  assert rs.scale == 8 / 2


def test_forward_matches_float64(fresh_key):
  for base, x, eq in _layers(fresh_key):
    layer = dora_jax.nnx.wrap(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(_seed(fresh_key)))
    randomize_adapters(layer, fresh_key())
    y = _fwd(layer, x)
    expected = einsum_reference(eq, x, base.kernel[...], layer.lora_a[...], layer.lora_b[...],
                                layer.magnitude[...], layer.scale,
                                None if base.bias is None else base.bias[...],
                                _bias_shape(base, eq))
    assert y.shape == expected.shape, (eq, y.shape, expected.shape)
    assert rel_err(y, expected) < FP32_TOL, eq
    assert rel_err(y, _fwd(base, x)) > 1e-3  # the adapter changed the output


def test_dense_matches_core_reference_and_grads(fresh_key):
  base = build(lambda: nnx.Linear(24, 16, rngs=nnx.Rngs(0)), fresh_key())
  layer = DoRADense(base, rank=4, alpha=8, rngs=nnx.Rngs(_seed(fresh_key)))
  randomize_adapters(layer, fresh_key())
  x = jax.random.normal(fresh_key(), (7, 24))
  cot = jax.random.normal(fresh_key(), (7, 16))
  a, b, m = layer.lora_a[...], layer.lora_b[...], layer.magnitude[...]
  y64, g64 = dora_value_and_grads(x, base.kernel[...], a, b, m, layer.scale, base.bias[...], cot)
  assert rel_err(layer(x), y64) < FP32_TOL

  def loss(model):
    return jnp.sum(model(x) * cot)

  grads = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  assert rel_err(grads["lora_a"][...], g64["lora_a"]) < 1e-5
  assert rel_err(grads["lora_b"][...], g64["lora_b"]) < 1e-5
  assert rel_err(grads["magnitude"][...], g64["magnitude"]) < 1e-5
  assert "kernel" not in grads and "bias" not in grads


class _Tiny(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(12, 16, rngs=rngs)
    self.proj = nnx.Einsum("btd,dhk->bthk", (16, 2, 4), (2, 4), rngs=rngs)
    self.out = nnx.LinearGeneral((2, 4), 6, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.gelu(self.proj(jax.nn.gelu(self.up(x)))))


_TX = optax.adamw(3e-2)  # one transformation object: the jitted step compiles once


@nnx.jit
def _step(model, opt, x, y):
  def loss(model):
    return jnp.mean((model(x) - y) ** 2)
  value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  opt.update(model, grads)
  return value


def _train(model, x, y, steps=3, opt=None):
  opt = opt if opt is not None else nnx.Optimizer(model, _TX, wrt=nnx.LoRAParam)
  return [float(_step(model, opt, x, y)) for _ in range(steps)]


def test_training_changes_only_adapters(fresh_key):
  model = build(lambda: _Tiny(nnx.Rngs(0)), fresh_key())
  x = jax.random.normal(fresh_key(), (4, 3, 12))
  y = jax.random.normal(fresh_key(), (4, 3, 6))
  before_base = {k: np.asarray(v) for k, v in
                 nnx.to_flat_state(nnx.state(model, nnx.Param))}
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  before_ad = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}
  losses = _train(model, x, y, steps=4)
  assert losses[-1] < losses[0]
  # Base kernels/biases: same paths, bit-identical values.
  after_all = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, value in before_base.items():
    assert path in after_all, path
    np.testing.assert_array_equal(np.asarray(after_all[path]), value, err_msg=str(path))
  # Every adapter moved (lora_b from zero, lora_a and magnitude through it).
  after_ad = dict(nnx.to_flat_state(nnx.state(model, nnx.LoRAParam)))
  assert len(after_ad) == 9
  for path, value in before_ad.items():
    assert not np.array_equal(np.asarray(after_ad[path]), value), path


def test_merge_matches_unmerged(fresh_key):
  for base, x, _ in _layers(fresh_key):
    layer = dora_jax.nnx.wrap(base, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(_seed(fresh_key)))
    randomize_adapters(layer, fresh_key())
    merged = layer.merged_layer()
    assert type(merged) is type(base)
    assert merged.kernel.shape == base.kernel.shape
    y, y_m = _fwd(layer, x), _fwd(merged, x)
    assert rel_err(y_m, y) < 1e-5
    assert rel_err(_fwd(base, x), y) > 1e-3
    plain = layer.base_layer()
    np.testing.assert_array_equal(plain.kernel[...], base.kernel[...])


def test_merge_model_and_resume(fresh_key):
  model = build(lambda: _Tiny(nnx.Rngs(0)), fresh_key())
  x = jax.random.normal(fresh_key(), (4, 3, 12))
  y = jax.random.normal(fresh_key(), (4, 3, 6))
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  _train(model, x, y, steps=3)
  merged = dora_jax.merge(model)
  assert type(merged.up) is nnx.Linear and type(merged.proj) is nnx.Einsum
  assert type(merged.out) is nnx.LinearGeneral
  assert not nnx.state(merged, nnx.LoRAParam)  # no adapters left
  assert rel_err(merged(x), model(x)) < 1e-5
  # The adapted model is untouched, so training resumes from it.
  assert isinstance(model.up, DoRADense)
  losses = _train(model, x, y, steps=2)
  assert np.isfinite(losses).all()
  base = dora_jax.unmerge(model)
  np.testing.assert_array_equal(base.up.kernel[...], model.up.kernel[...])


def test_cached_norm_matches_and_refreshes(fresh_key):
  model = build(lambda: _Tiny(nnx.Rngs(0)), fresh_key())
  x = jax.random.normal(fresh_key(), (4, 3, 12))
  y = jax.random.normal(fresh_key(), (4, 3, 6))
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  _train(model, x, y, steps=2)
  forward = nnx.jit(lambda m, x: m(x))
  y_train = forward(model, x)

  dora_jax.freeze_scales(model)
  for _, layer in dora_jax.surgery.dora_layers(model):
    assert layer.cache_norm and bool(layer.cache_is_fresh())
    np.testing.assert_allclose(layer.norm_cache[...], layer.weight_norm(), rtol=1e-6)
  assert rel_err(forward(model, x), y_train) < 1e-6

  # The cache is really used: corrupting the stored norm (stamp still valid) changes y.
  saved = model.up.norm_cache[...]
  model.up.norm_cache[...] = saved * 2.0
  assert rel_err(forward(model, x), y_train) > 1e-2
  model.up.norm_cache[...] = saved

  # An optimizer step changes lora_a/lora_b: the stale norm must not be used.
  _train(model, x, y, steps=1)
  assert not bool(model.up.cache_is_fresh())
  dora_jax.unfreeze_scales(model)
  y_new = forward(model, x)  # recomputes the norm every call
  dora_jax.surgery.dora_layers(model)
  for _, layer in dora_jax.surgery.dora_layers(model):
    layer.cache_norm = True
  assert rel_err(y_new, y_train) > 1e-4
  assert rel_err(forward(model, x), y_new) < 1e-6  # stale stamp -> recomputed
  # ... and nnx.jit wrote the refreshed cache back.
  for _, layer in dora_jax.surgery.dora_layers(model):
    assert bool(layer.cache_is_fresh())
    np.testing.assert_allclose(layer.norm_cache[...], layer.weight_norm(), rtol=1e-6)
  # A jax.jit closure cannot write the cache but still never uses a stale one.
  model.up.lora_b[...] = model.up.lora_b[...] + 0.1
  expected = nnx.view(model, cache_norm=False)(x)
  assert rel_err(jax.jit(lambda x: model(x))(x), expected) < 1e-6
  assert not bool(model.up.cache_is_fresh())


def test_cached_norm_in_training_keeps_magnitude_grad(fresh_key):
  base = build(lambda: nnx.Linear(10, 6, rngs=nnx.Rngs(0)), fresh_key())
  layer = DoRADense(base, rank=2, alpha=4, rngs=nnx.Rngs(1))
  randomize_adapters(layer, fresh_key())
  x = jax.random.normal(fresh_key(), (5, 10))
  loss = lambda m: jnp.sum(m(x) ** 2)
  g_ref = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  dora_jax.freeze_scales(layer)
  g_cached = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(layer)
  for name in ("lora_a", "lora_b", "magnitude"):
    assert rel_err(g_cached[name][...], g_ref[name][...]) < 1e-6


def test_fingerprint_detects_single_bit_changes(fresh_key):
  from dora_jax import _adapter
  a = jax.random.normal(fresh_key(), (33, 4))
  b = jax.random.normal(fresh_key(), (4, 17))
  s0 = _adapter.fingerprint(a, b)
  assert int(s0[2]) == 1
  bits = jax.lax.bitcast_convert_type(a, jnp.uint32)
  for idx in [(0, 0), (32, 3), (7, 2)]:
    for bit in (0, 13, 31):
      flipped = bits.at[idx].set(bits[idx] ^ jnp.uint32(1 << bit))
      a2 = jax.lax.bitcast_convert_type(flipped, jnp.float32)
      assert not np.array_equal(_adapter.fingerprint(a2, b), s0)
  assert not np.array_equal(_adapter.fingerprint(b.T.reshape(4, 17), a.reshape(4, 33)), s0)
  np.testing.assert_array_equal(_adapter.fingerprint(a, b), s0)


def _dropout_expected(x, xt, layer):
  """PEFT's dropout formula in float64: x·W + bias + (g−1)⊙(x̃·W) + g⊙s·(x̃·a)·b."""
  w, a, b = f64(layer.kernel[...]), f64(layer.lora_a[...]), f64(layer.lora_b[...])
  m = f64(layer.magnitude[...])
  n = np.linalg.norm(w + layer.scale * a @ b, axis=0)
  g = m / n
  xs, xts = f64(x), f64(xt)
  return xs @ w + f64(layer.bias[...]) + (g - 1) * (xts @ w) + g * (layer.scale * (xts @ a) @ b)


def test_dropout_semantics(fresh_key):
  base = build(lambda: nnx.Linear(20, 12, rngs=nnx.Rngs(0)), fresh_key())
  layer = DoRADense(base, rank=4, alpha=8, dropout=0.3,
                    rngs=nnx.Rngs(params=_seed(fresh_key), dropout=_seed(fresh_key)))
  randomize_adapters(layer, fresh_key())
  x = jax.random.normal(fresh_key(), (6, 20))
  key = fresh_key()
  y = layer(x, rngs=key)
  xt = nnx.Dropout(0.3)(x, deterministic=False, rngs=key)  # the same mask
  assert not np.array_equal(xt, x)
  assert rel_err(y, _dropout_expected(x, xt, layer)) < FP32_TOL
  # Training mode draws fresh masks; eval is deterministic and equals p = 0.
  y1, y2 = layer(x), layer(x)
  assert not np.array_equal(y1, y2)
  ref_eval = dora_forward(x, base.kernel[...], layer.lora_a[...], layer.lora_b[...],
                          layer.magnitude[...], layer.scale, base.bias[...])
  layer.eval()
  e1, e2 = layer(x), layer(x)
  np.testing.assert_array_equal(e1, e2)
  assert rel_err(e1, ref_eval) < FP32_TOL
  layer.train()
  assert rel_err(nnx.view(layer, deterministic=True)(x), ref_eval) < FP32_TOL
  assert rel_err(layer(x, deterministic=True), ref_eval) < FP32_TOL


def test_dtypes_follow_base_layer(fresh_key):
  base = nnx.Linear(32, 16, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    rngs=nnx.Rngs(_seed(fresh_key)))
  layer = DoRADense(base, rank=4, alpha=8, rngs=nnx.Rngs(1))
  assert layer.lora_a.dtype == jnp.float32 and layer.magnitude.dtype == jnp.float32
  randomize_adapters(layer, fresh_key())
  x = jax.random.normal(fresh_key(), (5, 32))  # float32 input, bf16 compute
  y = layer(x)
  assert y.dtype == jnp.bfloat16 and base(x).dtype == jnp.bfloat16
  ref = dora_forward(x.astype(jnp.bfloat16), base.kernel[...], layer.lora_a[...],
                     layer.lora_b[...], layer.magnitude[...], layer.scale, base.bias[...])
  assert rel_err(y, ref) < 2e-2
  # dtype=None promotes like nnx.Linear: bf16 input with fp32 kernel computes in fp32.
  base32 = nnx.Linear(32, 16, rngs=nnx.Rngs(0))
  l32 = DoRADense(base32, rank=4, alpha=8, rngs=nnx.Rngs(1))
  assert l32(x.astype(jnp.bfloat16)).dtype == base32(x.astype(jnp.bfloat16)).dtype


def test_precision_is_applied(fresh_key):
  base = nnx.Linear(16, 8, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
  layer = DoRADense(base, rank=2, alpha=4, rngs=nnx.Rngs(1))
  x = jax.random.normal(fresh_key(), (3, 16))
  text = str(jax.make_jaxpr(lambda x: layer(x))(x))
  assert "HIGHEST" in text or "highest" in text.lower()


def test_cache_is_not_trainable_state(fresh_key):
  layer = DoRADense(nnx.Linear(8, 8, rngs=nnx.Rngs(0)), rank=2, alpha=4, rngs=nnx.Rngs(1))
  assert set(nnx.state(layer, DoRACache).keys()) == {"norm_cache", "norm_stamp"}
  assert set(nnx.state(layer, nnx.LoRAParam).keys()) == {"lora_a", "lora_b", "magnitude"}
  assert set(nnx.state(layer, nnx.Param).keys()) == {"kernel", "bias", "lora_a", "lora_b",
                                                     "magnitude"}

"""Flax Linen DoRA: the drop-in Dense, interception of an existing model, NNX agreement."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from helpers.adapter_helpers import kernel_reductions, randomize_adapters, reproduces_base, require_bit_exact
from dora_jax.linen import DoRADense, intercept_dora, merge_params
from helpers.reference import dora_forward, f64, rel_err

FP32_TOL = 2e-6


def _seed(fresh_key):
  return int(jax.random.randint(fresh_key(), (), 0, 2**30))


def test_collections_and_init_reproduces_dense(fresh_key):
  x = jax.random.normal(fresh_key(), (4, 3, 12))
  key = fresh_key()
  dense = nn.Dense(10, bias_init=nn.initializers.normal(0.5))
  layer = DoRADense(10, rank=4, alpha=8, bias_init=nn.initializers.normal(0.5))
  v_dense = dense.init(key, x)
  v = layer.init(key, x)
  assert set(v) == {"params", "dora"}
  assert set(v["params"]) == {"kernel", "bias"}
  assert {k: a.shape for k, a in v["dora"].items()} == {
      "lora_a": (12, 4), "lora_b": (4, 10), "magnitude": (10,)}
  # same names and initialisers as nn.Dense: the same base params from the same key
  np.testing.assert_array_equal(v["params"]["kernel"], v_dense["params"]["kernel"])
  np.testing.assert_allclose(v["dora"]["magnitude"],
                             np.linalg.norm(f64(v["params"]["kernel"]), axis=0), rtol=1e-6)
  assert np.all(np.asarray(v["dora"]["lora_b"]) == 0)
  y = jax.jit(layer.apply)(v, x)
  require_bit_exact([reproduces_base(y, jax.jit(dense.apply)(v_dense, x))])


def test_matches_float64_reference(fresh_key):
  x = jax.random.normal(fresh_key(), (6, 16))
  layer = DoRADense(12, rank=3, alpha=5)
  v = layer.init(fresh_key(), x)
  v = {"params": v["params"], "dora": {
      **v["dora"], "lora_b": 0.3 * jax.random.normal(fresh_key(), (3, 12)),
      "magnitude": v["dora"]["magnitude"] * (1 + 0.2 * jax.random.normal(fresh_key(), (12,)))}}
  y = layer.apply(v, x)
  ref = dora_forward(x, v["params"]["kernel"], v["dora"]["lora_a"], v["dora"]["lora_b"],
                     v["dora"]["magnitude"], 5 / 3, v["params"]["bias"])
  assert rel_err(y, ref) < FP32_TOL


def test_nnx_and_linen_agree(fresh_key):
  base = nnx.Linear(16, 12, rngs=nnx.Rngs(_seed(fresh_key)))
  base.bias[...] = jax.random.normal(fresh_key(), (12,))
  for rslora in (False, True):
    layer = dora_jax.nnx.DoRADense(base, rank=4, alpha=6, rslora=rslora,
                                   rngs=nnx.Rngs(_seed(fresh_key)))
    randomize_adapters(layer, fresh_key())
    x = jax.random.normal(fresh_key(), (2, 5, 16))
    variables = {
        "params": {"kernel": layer.kernel[...], "bias": layer.bias[...]},
        "dora": {"lora_a": layer.lora_a[...], "lora_b": layer.lora_b[...],
                 "magnitude": layer.magnitude[...]},
    }
    y_linen = DoRADense(12, rank=4, alpha=6, rslora=rslora).apply(variables, x)
    y_nnx = layer(x)
    np.testing.assert_allclose(y_linen, y_nnx, rtol=1e-6, atol=1e-6)
    assert rel_err(y_linen, y_nnx) < 1e-6


class Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(24, name="up")(x))
    h = nn.Dense(16, name="down")(h)
    return nn.Dense(4, name="head")(h)


def test_intercept_existing_model(fresh_key):
  model = Mlp()
  x = jax.random.normal(fresh_key(), (5, 16))
  base_vars = model.init(fresh_key(), x)
  y_base = model.apply(base_vars, x)
  with intercept_dora(r"up|down", rank=4, alpha=8):
    y0, adapters = model.apply(base_vars, x, rngs={"params": fresh_key()}, mutable=["dora"])
    assert set(adapters["dora"]) == {"up", "down"}
    exact = reproduces_base(y0, y_base)
    # magnitude comes from the pretrained kernel it was created against
    np.testing.assert_allclose(adapters["dora"]["up"]["magnitude"],
                               np.linalg.norm(f64(base_vars["params"]["up"]["kernel"]), axis=0),
                               rtol=1e-6)
    adapters = jax.tree.map(lambda a: a, dict(adapters))
    for name in ("up", "down"):
      b = adapters["dora"][name]["lora_b"]
      adapters["dora"][name]["lora_b"] = 0.3 * jax.random.normal(fresh_key(), b.shape)
    y = model.apply({**base_vars, **adapters}, x)
  assert rel_err(y, y_base) > 1e-3

  # the same as writing DoRADense into the model
  class Explicit(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(DoRADense(24, rank=4, alpha=8, name="up")(x))
      h = DoRADense(16, rank=4, alpha=8, name="down")(h)
      return nn.Dense(4, name="head")(h)

  y_explicit = Explicit().apply({**base_vars, **adapters}, x)
  np.testing.assert_allclose(y_explicit, y, rtol=1e-6, atol=1e-6)

  # merged params serve the plain model
  merged = merge_params(base_vars, adapters, alpha=8)
  assert rel_err(model.apply(merged, x), y) < 1e-5
  np.testing.assert_array_equal(merged["params"]["head"]["kernel"],
                                base_vars["params"]["head"]["kernel"])
  with pytest.raises(ValueError, match="no DoRA adapters"):
    merge_params(base_vars, {"dora": {}}, alpha=8)
  require_bit_exact([exact])


def test_training_only_adapters_change(fresh_key):
  model = Mlp()
  x = jax.random.normal(fresh_key(), (8, 16))
  target = jax.random.normal(fresh_key(), (8, 4))
  base_vars = model.init(fresh_key(), x)
  with intercept_dora(r".*", rank=2, alpha=4):
    _, adapters = model.apply(base_vars, x, rngs={"params": fresh_key()}, mutable=["dora"])

    def loss(ad, params):
      return jnp.mean((model.apply({"params": params, "dora": ad}, x) - target) ** 2)

    tx = optax.adam(3e-2)
    ad = adapters["dora"]
    state = tx.init(ad)
    step = jax.jit(lambda ad, st: (lambda v, g: (v, *tx.update(g, st, ad)))(
        *jax.value_and_grad(loss)(ad, base_vars["params"])))
    losses = []
    for _ in range(5):
      value, updates, state = step(ad, state)
      ad = optax.apply_updates(ad, updates)
      losses.append(float(value))
  assert losses[-1] < losses[0]
  for (path, a0), a1 in zip(jax.tree_util.tree_leaves_with_path(adapters["dora"]),
                            jax.tree.leaves(ad)):
    assert not np.array_equal(a0, a1), path


def test_errors(fresh_key):
  x = jnp.ones((2, 4))
  with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = 3"):
    DoRADense(3, rank=4, alpha=1).init(fresh_key(), x)
  with pytest.raises(ValueError, match="dropout"):
    with intercept_dora(".*", rank=1, alpha=1, dropout=1.5):
      pass


def test_cached_norm_refreshes(fresh_key):
  x = jax.random.normal(fresh_key(), (3, 8))
  layer = DoRADense(6, rank=2, alpha=4)
  cached = DoRADense(6, rank=2, alpha=4, cache_norm=True)
  v = layer.init(fresh_key(), x)
  v["dora"]["lora_b"] = 0.3 * jax.random.normal(fresh_key(), (2, 6))
  y_ref = layer.apply(v, x)
  y, cache = cached.apply(v, x, mutable=["dora_cache"])
  assert rel_err(y, y_ref) < 1e-6
  v_cached = {**v, **cache}
  assert rel_err(cached.apply(v_cached, x), y_ref) < 1e-6
  # adapters change, cache does not: the stamp makes the layer recompute
  v2 = {**v_cached, "dora": {**v["dora"], "lora_b": v["dora"]["lora_b"] + 0.2}}
  y2_ref = layer.apply({"params": v["params"], "dora": v2["dora"]}, x)
  assert rel_err(y2_ref, y_ref) > 1e-3
  assert rel_err(cached.apply(v2, x), y2_ref) < 1e-6
  _, new_cache = cached.apply(v2, x, mutable=["dora_cache"])
  assert not np.array_equal(new_cache["dora_cache"]["stamp"], cache["dora_cache"]["stamp"])


def test_dropout_train_and_eval(fresh_key):
  x = jax.random.normal(fresh_key(), (4, 10))
  layer = DoRADense(8, rank=2, alpha=4, dropout=0.5)
  v = layer.init(fresh_key(), x, deterministic=True)
  v["dora"]["lora_b"] = 0.3 * jax.random.normal(fresh_key(), (2, 8))
  e1 = layer.apply(v, x, deterministic=True)
  ref = dora_forward(x, v["params"]["kernel"], v["dora"]["lora_a"], v["dora"]["lora_b"],
                     v["dora"]["magnitude"], 2.0, v["params"]["bias"])
  assert rel_err(e1, ref) < FP32_TOL
  t1 = layer.apply(v, x, deterministic=False, rngs={"dropout": fresh_key()})
  assert rel_err(t1, ref) > 1e-3


class _TwoDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jax.nn.gelu(DoRADense(24, rank=3, alpha=6, name="up")(x))
    return DoRADense(12, rank=5, alpha=10, use_bias=False, name="down")(h)


def test_cache_base_norms_same_step_without_rereading_kernels(fresh_key):
  """Cached ‖W‖² in dora_cache: bit-identical loss and adapter gradients, and no
  reduction over a kernel left in the traced step."""
  from dora_jax.linen import cache_base_norms

  key = fresh_key()
  x = jax.random.normal(jax.random.fold_in(key, 0), (2, 7, 12))
  model = _TwoDense()
  variables = model.init(jax.random.fold_in(key, 1), x)
  rng = np.random.default_rng(_seed(fresh_key))
  variables = {"params": variables["params"], "dora": jax.tree.map(
      lambda v: jnp.asarray(v + 0.3 * rng.normal(size=v.shape), v.dtype), variables["dora"])}
  cached = cache_base_norms(variables)
  assert set(cached["dora_cache"]) == {"up", "down"}
  np.testing.assert_allclose(cached["dora_cache"]["up"]["base_sq_norm"],
                             np.sum(f64(variables["params"]["up"]["kernel"]) ** 2, axis=0),
                             rtol=1e-6)

  def loss(dora, rest):
    return jnp.sum(model.apply({**rest, "dora": dora}, x) ** 2)

  def reductions(rest):
    return kernel_reductions(jax.make_jaxpr(loss)(variables["dora"], rest), {(12, 24), (24, 12)})

  plain_rest = {"params": variables["params"]}
  cached_rest = {"params": cached["params"], "dora_cache": cached["dora_cache"]}
  assert reductions(plain_rest) > 0 and reductions(cached_rest) == 0
  step = jax.jit(jax.value_and_grad(loss))
  (l0, g0), (l1, g1) = step(variables["dora"], plain_rest), step(variables["dora"], cached_rest)
  assert float(l0) == float(l1)
  for u, v in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  with pytest.raises(ValueError, match="'params' and 'dora'"):
    cache_base_norms({"params": variables["params"]})


def test_adapters_without_kernels_are_refused_by_name(fresh_key):
  """merge_params and cache_base_norms name the adapter path whose kernel is missing."""
  from dora_jax.linen import cache_base_norms

  x = jax.random.normal(fresh_key(), (2, 12))
  variables = _TwoDense().init(fresh_key(), x)
  params = {"up": variables["params"]["up"]}  # "down" lost its kernel
  with pytest.raises(ValueError, match="merge_params: adapters at 'down' have no kernel"):
    merge_params(params, variables["dora"], alpha=10)
  with pytest.raises(ValueError, match="cache_base_norms: adapters at 'down' have no kernel"):
    cache_base_norms({"params": params, "dora": variables["dora"]})
  with pytest.raises(ValueError, match="cache_base_norms: no DoRA adapters"):
    cache_base_norms({"params": params, "dora": {}})

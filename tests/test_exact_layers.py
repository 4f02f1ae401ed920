"""``detach_norm=False`` on every layer kind: the exact DoRA gradient through the norm.

For the embedding and conv cores, the NNX layers (Dense, LinearGeneral, Einsum,
op level, Embed with ``attend``, Conv, QDoRA), the Linen drop-ins and
``intercept_dora``, qwix's ``DoraProvider`` and a tiny Llama through
``apply_dora``: every adapter gradient equals ``jax.grad`` of the dense float64
formula without the detach (:mod:`helpers.exact`) to 1e-12 relative; finite
differences agree to 1e-7 (cores, NNX layers); float32 stays within 1e-4 of
float64 (cores; QDoRA in float32 to 1e-5); the default stays PEFT's detached gradient; the traced exact step of a native-layout layer
holds no ``[d_in, d_out]`` product; bad values are refused, naming the argument.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import conv as conv_core
from dora_jax import embed as embed_core
from helpers.exact import (adapter_loss, check_fd, dense_merged, grads_and_fd, grads_program,
                           initial_adapters, random_adapters, random_like, reference_loss)
from helpers.jaxprs import dense_shaped_dots
from helpers.layers import normal, rng, uniform
from helpers.reference import rel_err

EXACT = 1e-12  # float64, relative L2
FD_TOL = 1e-7  # central differences at eps = 1e-6, relative to max(1, |analytic|)
F32_TOL = 1e-4  # float32 against the float64 reference


def _to32(tree):
  return jax.tree.map(lambda v: v.astype(jnp.float32) if v.dtype == jnp.float64 else v, tree)


def _check_grads(got, expected, tol, what):
  for key in expected:
    for name, g, e in zip(("lora_a", "lora_b", "magnitude"), got[key], expected[key]):
      err = rel_err(g, e)
      assert err < tol, (what, key, name, err)


# -- the functional cores (no custom VJP: autodiff through the factored norm) --------


def _embed_case(key, dtype):
  g = rng(key)
  table = normal(g, (13, 6), dtype)
  p = dict(table=table, a=normal(g, (13, 3), dtype, 0.4), b=normal(g, (3, 6), dtype, 0.5),
           m=jnp.linalg.norm(table, axis=0) * uniform(g, (6,), 0.8, 1.2, dtype))
  ids = jnp.asarray(g.integers(0, 13, (2, 5)), jnp.int32)
  cots = (normal(g, (2, 5, 6), dtype), normal(g, (2, 4, 13), dtype))
  return p, ids, normal(g, (2, 4, 6), dtype), cots


def _embed_loss(p, ids, query, cots, detach):
  kw = dict(detach_norm=detach)
  y = embed_core.dora_embed(ids, p["table"], p["a"], p["b"], p["m"], 0.7, **kw)
  z = embed_core.dora_attend(query, p["table"], p["a"], p["b"], p["m"], 0.7, **kw)
  return jnp.sum(y * cots[0]) + jnp.sum(z * cots[1])


def _embed_reference(p, ids, query, cots):
  layout = dora_jax.general.WeightLayout(p["table"].shape, (0,), (), (1,))
  merged = dense_merged(p["table"], layout, p["a"], p["b"], p["m"], 0.7)
  return jnp.sum(merged[ids] * cots[0]) + jnp.sum((query @ merged.T) * cots[1])


def _conv_case(key, dtype):
  g = rng(key)
  kernel = normal(g, (3, 3, 4, 5), dtype, 0.3)
  p = dict(kernel=kernel, a=normal(g, (3, 3, 4, 2), dtype, 0.3), b=normal(g, (2, 5), dtype, 0.5),
           m=jnp.sqrt(jnp.sum(kernel ** 2, axis=(0, 1, 2))) * uniform(g, (5,), 0.8, 1.2, dtype),
           bias=normal(g, (5,), dtype), x=normal(g, (2, 7, 7, 4), dtype))
  return p, normal(g, (2, 4, 4, 5), dtype)


_CONV = dict(strides=2, padding="SAME")


def _conv_loss(p, cot, detach):
  y = conv_core.dora_conv(p["x"], p["kernel"], p["a"], p["b"], p["m"], 0.9, p["bias"],
                          detach_norm=detach, **_CONV)
  return jnp.sum(y * cot)


def _conv_reference(p, cot):
  layout = dora_jax.general.WeightLayout(p["kernel"].shape, (0, 1, 2), (), (3,))
  merged = dense_merged(p["kernel"], layout, p["a"], p["b"], p["m"], 0.9)
  y = jax.lax.conv_general_dilated(p["x"], merged, (2, 2), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["bias"]
  return jnp.sum(y * cot)


def _core_loss(p, args, detach):
  return _embed_loss(p["embed"], *args["embed"], detach) + _conv_loss(p["conv"], *args["conv"],
                                                                       detach)


def _core_reference(p, args):
  return _embed_reference(p["embed"], *args["embed"]) + _conv_reference(p["conv"], *args["conv"])


def test_embed_conv_cores_exact_float64_fd_float32(fresh_key):
  """dora_embed + dora_attend and dora_conv: every gradient (the frozen table/kernel and
  the conv input included) is the undetached float64 one; the default is PEFT's."""
  with jax.enable_x64(True):
    (pe, *ae), (pc, *ac) = _embed_case(fresh_key(), jnp.float64), _conv_case(fresh_key(),
                                                                              jnp.float64)
    p, args = {"embed": pe, "conv": pc}, {"embed": ae, "conv": ac}
    direction = random_like(p, fresh_key())
    got, (expected, detached), fd = grads_and_fd(
        lambda q: _core_loss(q, args, False),
        (lambda q: _core_reference(q, args), lambda q: _core_loss(q, args, True)), p, direction)
    for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(expected)):
      assert rel_err(g, e) < EXACT, (jax.tree_util.keystr(path), rel_err(g, e))
    for kind in p:  # the default is PEFT's
      assert rel_err(detached[kind]["a"], expected[kind]["a"]) > 1e-6, kind
    check_fd(fd, got, direction)
    p32, args32 = _to32((p, args))
  got32 = jax.jit(jax.grad(_core_loss), static_argnums=2)(p32, args32, False)
  for (path, g), e in zip(jax.tree_util.tree_leaves_with_path(got32), jax.tree.leaves(expected)):
    assert rel_err(g, e) < F32_TOL, (jax.tree_util.keystr(path), rel_err(g, e))


# -- NNX: every layer kind in one network --------------------------------------------


class _Proj(nnx.Module):
  """A custom layer (op-level DoRA): ``w [out, in]`` in torch's layout."""

  def __init__(self, d_in, d_out, dtype, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d_out, d_in), dtype) * 0.3)

  def __call__(self, x):
    return jnp.einsum("bi,oi->bo", x, self.w[...])


class _Net(nnx.Module):
  def __init__(self, dtype, rngs):
    kw = dict(param_dtype=dtype, rngs=rngs)
    self.dense = nnx.Linear(7, 5, **kw)
    self.general = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), **kw)
    self.einsum = nnx.Einsum("btd,dhk->bthk", (6, 2, 3), (2, 3), **kw)
    self.embed = nnx.Embed(11, 6, **kw)
    self.conv = nnx.Conv(3, 4, (3, 3), strides=2, **kw)
    self.proj = _Proj(5, 4, dtype, rngs)

  def __call__(self, xs):
    return (self.dense(xs["dense"]), self.general(xs["general"]), self.einsum(xs["einsum"]),
            self.embed(xs["ids"]), self.embed.attend(xs["query"]), self.conv(xs["conv"]),
            self.proj(xs["proj"]))


def _net_inputs(seed, dtype):
  shapes = dict(dense=(3, 7), general=(3, 2, 3), einsum=(2, 3, 6), query=(2, 6), conv=(2, 6, 6, 3),
                proj=(3, 5))
  g = np.random.default_rng(seed)
  xs = {k: normal(g, s, dtype) for k, s in shapes.items()}
  xs["ids"] = jnp.asarray(g.integers(0, 11, (2, 4)), jnp.int32)
  return xs


def _adapted_net(seed):
  """The float64 network (weights drawn on the host), a plain copy, inputs; the layers
  adapted with ``detach_norm=False``."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: _Net(jnp.float64, nnx.Rngs(0))))
  g = np.random.default_rng(seed)
  base = nnx.merge(graphdef, jax.tree.map(lambda v: normal(g, v.shape, v.dtype, 0.4), state))
  plain = nnx.clone(base)
  xs = _net_inputs(seed + 1, jnp.float64)
  targets = r"dense|general|einsum|embed|conv|proj"
  model = dora_jax.apply_dora(base, targets=targets, rank=2, alpha=3.0, param_dtype=jnp.float64,
                              rngs=nnx.Rngs(seed), example_inputs=(xs,), detach_norm=False)
  return model, plain, xs


def _cotangents(outputs, key):
  g = rng(key)
  return [normal(g, o.shape, o.dtype) for o in outputs]


def _weighted(cots):
  return lambda outs: sum(jnp.sum(o * c) for o, c in zip(outs, cots))


def test_nnx_layers_exact_float64_fd(fresh_key):
  seed = int(jax.random.randint(fresh_key(), (), 0, 2 ** 20))
  with jax.enable_x64(True):
    model, plain, xs = _adapted_net(seed)
    assert all(not site.detach_norm for _, site in dora_jax.surgery.dora_layers(model))
    adapters = random_adapters(model, fresh_key())
    cots = _cotangents(jax.eval_shape(lambda: model(xs)), fresh_key())
    call = lambda m: _weighted(cots)(m(xs))
    direction = random_like(adapters, fresh_key())
    run = grads_program(adapter_loss(model, call), (reference_loss(plain, model, call),))
    # at random adapters, and at PEFT's init (lora_b = 0: finite, and still not detached)
    for point, what in ((adapters, "random"), (initial_adapters(model), "init")):
      got, (expected,), fd = run(point, direction)
      assert len(expected) == 6
      _check_grads(got, expected, EXACT, f"nnx float64 {what}")
      check_fd(fd, got, direction)


def test_qdora_layer_exact_gradient(fresh_key):
  """``apply_dora(base_dtype="int8", detach_norm=False)``: the exact gradient of DoRA over
  the dequantized weight (float32 against float64)."""
  seed = int(jax.random.randint(fresh_key(), (), 0, 2 ** 20))
  model = nnx.Sequential(nnx.Linear(16, 12, rngs=nnx.Rngs(seed)))
  dora_jax.apply_dora(model, targets="layers/0", rank=2, alpha=4.0, rngs=nnx.Rngs(seed + 1),
                      base_dtype="int8", detach_norm=False)
  g = rng(fresh_key())
  x, cot = normal(g, (3, 16)), normal(g, (3, 12))
  adapters = random_adapters(model, fresh_key())
  call = lambda m: jnp.sum(m(x) * cot)
  got = jax.jit(jax.grad(adapter_loss(model, call)))(adapters)
  layer = model.layers[0]
  with jax.enable_x64(True):
    w = jnp.asarray(np.asarray(layer.kernel[...].dequantize(), np.float64))
    bias = jnp.asarray(np.asarray(layer.bias[...], np.float64))
    layout = dora_jax.general.WeightLayout(w.shape, (0,), (), (1,))
    a64 = {k: tuple(jnp.asarray(np.asarray(v, np.float64)) for v in t) for k, t in adapters.items()}
    ref = lambda ad: jnp.sum(
        (jnp.asarray(x, jnp.float64) @ dense_merged(w, layout, *ad["layers/0"], 2.0) + bias)
        * jnp.asarray(cot, jnp.float64))
    expected = jax.grad(ref)(a64)
  _check_grads(got, expected, 1e-5, "qdora")


# -- a tiny Llama through apply_dora -------------------------------------------------


def _lm_loss(logits, ids):
  """Next-token cross-entropy in the logits' dtype (float64 here)."""
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def test_llama_apply_dora_exact_gradient(fresh_key):
  from dora_jax.models import ALL_PROJECTIONS, LlamaConfig, random_llama
  config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, initializer_range=0.2)
  seed = int(jax.random.randint(fresh_key(), (), 0, 2 ** 20))
  ids = jnp.asarray(rng(fresh_key()).integers(0, 32, (2, 6)), jnp.int32)
  with jax.enable_x64(True):
    model = random_llama(config, dtype=jnp.float64, seed=seed)
    plain = nnx.clone(model)
    dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=2, alpha=4.0,
                        param_dtype=jnp.float64, rngs=nnx.Rngs(seed), detach_norm=False)
    adapters = random_adapters(model, fresh_key())
    assert len(adapters) == 7
    call = lambda m: _lm_loss(m(ids), ids)
    run = grads_program(adapter_loss(model, call), (reference_loss(plain, model, call),))
    for point, what in ((adapters, "random"), (initial_adapters(model), "init")):
      got, (expected,), _ = run(point, None)
      _check_grads(got, expected, EXACT, f"llama {what}")


# -- Linen -----------------------------------------------------------------------------


class _Custom(nn.Module):
  """A custom Linen layer for ``intercept_dora``: ``w [out, in]`` and an ``nn.Dense``."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.3), (4, 5), jnp.float64)
    return nn.Dense(3, param_dtype=jnp.float64, name="head")(jnp.einsum("bi,oi->bo", x, w))


class _LinenNet(nn.Module):
  """The Linen drop-ins (``adapted``) or their base layers (the reference twin), and a
  custom layer that ``intercept_dora`` adapts."""

  adapted: bool = True

  @nn.compact
  def __call__(self, x, ids, query, image, z):
    kw = dict(param_dtype=jnp.float64)
    ad = dict(rank=2, alpha=3.0, adapter_dtype=jnp.float64, detach_norm=False)
    if self.adapted:
      dense = dora_jax.linen.DoRADense(5, name="dense", **kw, **ad)
      embed = dora_jax.linen.DoRAEmbed(11, 6, name="embed", **kw, **ad)
      conv = dora_jax.linen.DoRAConv(4, (3, 3), strides=2, name="conv", **kw, **ad)
    else:
      dense = nn.Dense(5, name="dense", **kw)
      embed = nn.Embed(11, 6, name="embed", **kw)
      conv = nn.Conv(4, (3, 3), strides=2, name="conv", **kw)
    return dense(x), embed(ids), embed.attend(query), conv(image), _Custom(name="custom")(z)


def _matrix(shape):
  return dora_jax.general.WeightLayout(tuple(shape), tuple(range(len(shape) - 1)), (),
                                       (len(shape) - 1,))


#: (param path, adapter group path, layout or None for the matrix layout)
_LINEN_SITES = ((("dense", "kernel"), ("dense",), None), (("embed", "embedding"), ("embed",), None),
                (("conv", "kernel"), ("conv",), None),
                (("custom", "head", "kernel"), ("custom", "head"), None),
                (("custom", "w"), ("custom", "w"),
                 dora_jax.general.WeightLayout((4, 5), (1,), (), (0,))))


def _linen_reference(params, dora, scale):
  """``params`` with every adapted weight replaced by :func:`dense_merged`."""
  params = jax.tree.map(lambda v: v, params)
  for (*owner, name), group_path, layout in _LINEN_SITES:
    node = params
    for key in owner:
      node = node[key]
    group = dora
    for key in group_path:
      group = group[key]
    node[name] = dense_merged(node[name], layout or _matrix(node[name].shape), group["lora_a"],
                              group["lora_b"], group["magnitude"], scale)
  return params


def _randomized(tree, key):
  """``tree`` plus ``0.3·N(0, 1)`` noise (non-zero ``lora_b``, ``m`` off the norm)."""
  return jax.tree.map(lambda a, n: a + 0.3 * n, tree, random_like(tree, key))


def test_linen_drop_ins_and_intercept_exact_float64(fresh_key):
  """DoRADense, DoRAEmbed (call and attend), DoRAConv with ``detach_norm=False``, and
  ``intercept_dora(detach_norm=False)`` on an ``nn.Dense`` and a custom einsum weight."""
  with jax.enable_x64(True):
    g = rng(fresh_key())
    f64 = jnp.float64
    inputs = (normal(g, (3, 7), f64), jnp.asarray(g.integers(0, 11, (2, 4)), jnp.int32),
              normal(g, (2, 6), f64), normal(g, (2, 6, 6, 3), f64), normal(g, (3, 5), f64))
    with dora_jax.linen.intercept_dora(r"custom(/head)?", rank=2, alpha=3.0,
                                       adapter_dtype=jnp.float64, detach_norm=False):
      variables = jax.jit(_LinenNet().init)(fresh_key(), *inputs)
      params, dora = variables["params"], _randomized(variables["dora"], fresh_key())
      cots = _cotangents(jax.eval_shape(_LinenNet().apply, variables, *inputs), fresh_key())
      loss = lambda d: _weighted(cots)(_LinenNet().apply({"params": params, "dora": d}, *inputs))
      got = jax.jit(jax.grad(loss))(dora)
    ref = lambda d: _weighted(cots)(_LinenNet(adapted=False).apply(
        {"params": _linen_reference(params, d, 1.5)}, *inputs))
    expected = jax.jit(jax.grad(ref))(dora)
  assert len(jax.tree.leaves(expected)) == 3 * len(_LINEN_SITES)
  for (path, got_leaf), want in zip(jax.tree_util.tree_leaves_with_path(got),
                                    jax.tree.leaves(expected)):
    assert rel_err(got_leaf, want) < EXACT, (jax.tree_util.keystr(path), rel_err(got_leaf, want))


# -- qwix ------------------------------------------------------------------------------


def test_qwix_provider_exact_float64(fresh_key):
  qwix = pytest.importorskip("qwix")
  import dora_jax.qwix
  with jax.enable_x64(True):
    g = rng(fresh_key())
    x, cot = normal(g, (3, 6), jnp.float64), normal(g, (3, 5), jnp.float64)
    base = nnx.Sequential(nnx.Linear(6, 5, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    plain = nnx.clone(base)
    provider = dora_jax.qwix.DoraProvider(module_path=r".*", rank=2, alpha=3.0,
                                          param_dtype=jnp.float64, detach_norm=False)
    model = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))
    layer = model.layers[0]
    names = ("kernel_lora_a", "kernel_lora_b", "kernel_magnitude")
    adapters = _randomized(tuple(getattr(layer, n)[...] for n in names), fresh_key())
    graphdef, state = nnx.split(model)

    def loss(ad):
      m = nnx.merge(graphdef, state, copy=True)
      for n, v in zip(names, ad):
        getattr(m.layers[0], n)[...] = v
      return jnp.sum(m(x) * cot)

    layout = dora_jax.general.WeightLayout((6, 5), (0,), (), (1,))
    ref = lambda ad: jnp.sum(
        (x @ dense_merged(plain.layers[0].kernel[...], layout, *ad, 1.5)
         + plain.layers[0].bias[...]) * cot)
    got, (expected,), _ = grads_and_fd(loss, (ref,), adapters)
    _check_grads({"": got}, {"": expected}, EXACT, "qwix")


# -- structure and bad input -----------------------------------------------------------


def test_native_layer_exact_step_holds_no_dense_product():
  """The exact step of an ``nnx.Einsum`` in torch's ``[out, in]`` layout (the native-layout
  custom VJP, not dora_dense): no ``[d_in, d_out]`` product anywhere in the traced step."""
  d_in, d_out, tokens = 1536, 2560, 64
  layer = nnx.Einsum("bi,oi->bo", (d_out, d_in), None, rngs=nnx.Rngs(0))
  model = dora_jax.apply_dora(layer, targets="", rank=16, alpha=32.0, rngs=nnx.Rngs(1),
                              detach_norm=False)
  graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
  x = jax.ShapeDtypeStruct((tokens, d_in), jnp.float32)

  def loss(p, x):
    return jnp.sum(nnx.merge(graphdef, p, rest)(x))

  closed = jax.make_jaxpr(jax.grad(loss))(params, x)
  assert dense_shaped_dots(closed, d_in, d_out) == []
  assert dense_shaped_dots(closed, d_out, d_in) == []


def test_bad_detach_norm_is_named():
  import dora_jax.qwix
  base = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="detach_norm must be a bool, got str"):
    dora_jax.apply_dora(nnx.Sequential(base), targets="layers/0", rank=2, alpha=2.0,
                        rngs=nnx.Rngs(0), detach_norm="no")
  with pytest.raises(TypeError, match="detach_norm must be a bool, got int"):
    dora_jax.nnx.DoRADense(base, rank=2, alpha=2.0, rngs=nnx.Rngs(0), detach_norm=0)
  with pytest.raises(TypeError, match="detach_norm must be a bool, got NoneType"):
    dora_jax.linen.DoRADense(3, rank=2, detach_norm=None).init(jax.random.key(0), jnp.ones((1, 4)))
  with pytest.raises(TypeError, match="detach_norm must be a bool, got str"):
    with dora_jax.linen.intercept_dora("x", rank=2, alpha=2.0, detach_norm="yes"):
      pass
  with pytest.raises(TypeError, match="detach_norm must be a bool"):
    dora_jax.qwix.DoraRule(module_path=".*", rank=2, alpha=2.0, detach_norm=1)
  w, a, b, m = jnp.ones((5, 3)), jnp.ones((5, 2)), jnp.ones((2, 3)), jnp.ones(3)
  with pytest.raises(TypeError, match="detach_norm must be a bool"):
    embed_core.dora_embed(jnp.zeros((2,), jnp.int32), w, a, b, m, 1.0, detach_norm="x")
  with pytest.raises(TypeError, match="detach_norm must be a bool"):
    conv_core.dora_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3)), jnp.ones((3, 3, 2, 2)),
                        b, m, 1.0, detach_norm=[])


def test_registered_wrapper_without_detach_norm_is_named():
  class Old(dora_jax.nnx.DoRADense):
    def __init__(self, base, *, rank, alpha, rslora=False, dropout=0.0, param_dtype=jnp.float32,
                 rngs, path=""):
      super().__init__(base, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                       param_dtype=param_dtype, rngs=rngs, path=path)

  class MyLinear(nnx.Linear):
    pass

  dora_jax.nnx.register(MyLinear, Old)
  try:
    model = nnx.Sequential(MyLinear(4, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="Old takes no detach_norm argument"):
      dora_jax.apply_dora(model, targets="layers/0", rank=2, alpha=2.0, rngs=nnx.Rngs(0),
                          detach_norm=False)
    dora_jax.apply_dora(model, targets="layers/0", rank=2, alpha=2.0, rngs=nnx.Rngs(0))
    assert model.layers[0].detach_norm
  finally:
    del dora_jax.nnx.registry.WRAPPERS[MyLinear]

"""QDoRA through Linen's ``intercept_dora(..., base_dtype=)`` and qwix's
``DoraProvider(weight_qtype=)``, each on a small synthetic model: a gemma-style einsum
module over ``[N, D, H]``, a Dense layer and a ``[d_in, d_out]`` einsum.

For each: the output at init equals the quantized base model's (the same model with
every adapted projection replaced by the quantized base op) bit for bit; Adam lowers
the loss; the output with random adapters matches float64 DoRA computed densely over
the dequantized weights ``Ŵ`` (rel err < 1e-5).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

qwix = pytest.importorskip("qwix")

import dora_jax
import dora_jax.qwix
from dora_jax import general, quantized
from helpers.reference import f64, rel_err
from helpers.qdora_models import filled as _filled

Q_SPEC, DOWN_SPEC = "BTD,NDH->BTNH", "btf,fd->btd"
DENSE_DN = (((2,), (0,)), ((), ()))
RANK, ALPHA = 4, 8.0


def _dora64(x, w_hat, layout, spec, a, b, m, scale):
  """Float64 dense DoRA of one projection over ``Ŵ``: ``einsum(spec, x, g ⊙ (Ŵ + s·a·b))``."""
  w = f64(layout.to_matrix(jnp.asarray(f64(w_hat))))
  dense = w + scale * f64(a).reshape(layout.d_in, -1) @ f64(b).reshape(-1, layout.d_out)
  merged = dense * (f64(m).reshape(-1) / np.linalg.norm(dense, axis=0))
  return np.einsum(spec, f64(x), f64(layout.from_matrix(jnp.asarray(merged))))


def _network64(x, weights, adapters, bias, scale):
  """The synthetic model in float64 over the dequantized weights and the adapters
  (``weights``/``adapters``: ``{"q"|"up"|"down": ...}``, adapters as ``(a, b, m)``)."""
  with jax.enable_x64(True):
    lay = {n: w.layout for n, w in weights.items()}
    q = _dora64(x, weights["q"].dequantize(), lay["q"], Q_SPEC, *adapters["q"], scale)
    h = np.tanh(q).reshape(*x.shape[:2], 32)
    h = _dora64(h, weights["up"].dequantize(), lay["up"], "btd,df->btf", *adapters["up"],
                scale) + f64(bias)
    h = h / (1 + np.exp(-h))  # silu
    return _dora64(h, weights["down"].dequantize(), lay["down"], DOWN_SPEC, *adapters["down"],
                   scale)


def _quantized_base(x, weights, bias):
  """The quantized base model: every projection as the quantized base op."""
  q = quantized.quantized_einsum(Q_SPEC, x, weights["q"])
  h = jnp.tanh(q).reshape(*x.shape[:2], 32)
  h = quantized.quantized_dot_general(h, weights["up"], DENSE_DN) + jnp.reshape(bias, (1, 1, -1))
  return quantized.quantized_einsum(DOWN_SPEC, jax.nn.silu(h), weights["down"])


def _random_adapters(tree, seed):
  """``tree`` (adapter arrays) with non-zero ``lora_b`` and a jittered magnitude."""
  rng = np.random.default_rng(seed)

  def draw(path, v):
    name = str(path[-1])
    if "lora_b" in name:
      return jnp.asarray(0.3 * rng.standard_normal(v.shape), v.dtype)
    if "magnitude" in name:
      return (v * (1 + 0.1 * rng.standard_normal(v.shape))).astype(v.dtype)
    return v

  return jax.tree_util.tree_map_with_path(draw, tree)


# -- Linen ------------------------------------------------------------------------------


class LinenProj(nn.Module):
  """gemma's ``Einsum``: a weight, the equation given per call."""

  shape: tuple

  @nn.compact
  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.param("w", nn.initializers.normal(0.3), self.shape))


class LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):  # [B, T, 32]
    q = LinenProj((4, 32, 8), name="q")(Q_SPEC, x)
    h = nn.Dense(48, name="up", bias_init=nn.initializers.normal(0.5))(
        jnp.tanh(q).reshape(*x.shape[:2], 32))
    return LinenProj((48, 32), name="down")(DOWN_SPEC, jax.nn.silu(h))


def test_linen_intercept_dora_qdora(fresh_key):
  net, x = LinenNet(), jax.random.normal(fresh_key(), (2, 5, 32))
  rng = np.random.default_rng(int(jax.random.randint(fresh_key(), (), 0, 2**30)))
  params = jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype),
                        jax.eval_shape(net.init, jax.random.key(0), x)["params"])
  target = jax.random.normal(fresh_key(), (2, 5, 32))
  with dora_jax.linen.intercept_dora(r"q|up|down", rank=RANK, alpha=ALPHA, base_dtype="nf4",
                                     block_size=16) as dora:
    # the creating call quantizes the adapted weights into the params it returns
    y_init, variables = net.apply({"params": params}, x, rngs={"params": fresh_key()},
                                  mutable=["dora", "params"])
    qparams, adapters = variables["params"], variables["dora"]
    weights = {"q": qparams["q"]["w"], "up": qparams["up"]["kernel"],
               "down": qparams["down"]["w"]}
    assert all(isinstance(w, quantized.QuantizedKernel) and w.qtype == "nf4"
               and w.block_size == 16 for w in weights.values())
    assert weights["q"].layout == dora.layouts["q/w"]
    bias = qparams["up"]["bias"]
    np.testing.assert_array_equal(np.asarray(y_init), np.asarray(_quantized_base(x, weights, bias)))
    np.testing.assert_array_equal(np.asarray(net.apply({"params": qparams, "dora": adapters}, x)),
                                  np.asarray(y_init))

    def loss(ad):
      return jnp.mean((net.apply({"params": qparams, "dora": ad}, x) - target) ** 2)

    tx = optax.adam(1e-2)

    @jax.jit
    def step(ad, state):
      value, grads = jax.value_and_grad(loss)(ad)
      updates, state = tx.update(grads, state)
      return optax.apply_updates(ad, updates), state, value

    ad, state, losses = adapters, tx.init(adapters), []
    for _ in range(11):  # the 11th value: the loss after 10 steps
      ad, state, value = step(ad, state)
      losses.append(float(value))
    assert losses[-1] < 0.9 * losses[0], losses

    ad = _random_adapters(ad, int(jax.random.randint(fresh_key(), (), 0, 2**30)))
    y = net.apply({"params": qparams, "dora": ad}, x)
  groups = {"q": ad["q"]["w"], "up": ad["up"], "down": ad["down"]["w"]}
  ref = _network64(x, weights, {n: (g["lora_a"], g["lora_b"], g["magnitude"])
                                for n, g in groups.items()}, bias, ALPHA / RANK)
  assert rel_err(y, ref) < 1e-5
  assert rel_err(y_init, ref) > 1e-2
  # merged float params run the plain model (no interception) to float rounding
  merged = dora_jax.linen.merge_params(qparams, {"dora": ad}, alpha=ALPHA, layouts=dora.layouts)
  assert merged["up"]["kernel"].dtype == jnp.float32
  assert rel_err(net.apply({"params": merged}, x), y) < 1e-5
  # a float weight in params with base_dtype but params not mutable: a clear error
  with dora_jax.linen.intercept_dora(r"q|up|down", rank=RANK, alpha=ALPHA, base_dtype="nf4",
                                     block_size=16):
    with pytest.raises(ValueError, match="is a float weight; quantize the params once"):
      net.apply({"params": params}, x, rngs={"params": fresh_key()}, mutable=["dora"])
  with pytest.raises(ValueError, match="block_size=24 must divide d_in, which has size 32"):
    with dora_jax.linen.intercept_dora(r"q|up|down", rank=RANK, alpha=ALPHA, base_dtype="nf4",
                                       block_size=24):
      net.apply({"params": params}, x, rngs={"params": fresh_key()}, mutable=["dora", "params"])
  with pytest.raises(ValueError, match="base_dtype must be one of"):
    with dora_jax.linen.intercept_dora(r"q", rank=RANK, alpha=ALPHA, base_dtype="nf3"):
      pass


# -- qwix -------------------------------------------------------------------------------


class NnxProj(nnx.Module):
  def __init__(self, shape, rngs):
    self.w = nnx.Param(0.3 * jax.random.normal(rngs.params(), shape))

  def __call__(self, eqn, x):
    return jnp.einsum(eqn, x, self.w[...])


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.q = NnxProj((4, 32, 8), rngs)
    self.up = nnx.Linear(32, 48, bias_init=nnx.initializers.normal(0.5), rngs=rngs)
    self.down = NnxProj((48, 32), rngs)

  def __call__(self, x):
    q = self.q(Q_SPEC, x)
    h = self.up(jnp.tanh(q).reshape(*x.shape[:2], 32))
    return self.down(DOWN_SPEC, jax.nn.silu(h))


def test_qwix_provider_qdora(fresh_key):
  x = jax.random.normal(fresh_key(), (2, 5, 32))
  target = jax.random.normal(fresh_key(), (2, 5, 32))
  base = _filled(NnxNet, int(jax.random.randint(fresh_key(), (), 0, 2**30)))
  provider = dora_jax.qwix.DoraProvider(module_path=r"q|up|down", rank=RANK, alpha=ALPHA,
                                        weight_qtype=jnp.float8_e4m3fn)
  model = qwix.apply_lora_to_model(base, provider, x, rngs=nnx.Rngs(1))
  weights = {"q": model.q.w.get_value(), "up": model.up.kernel.get_value(),
             "down": model.down.w.get_value()}
  assert all(isinstance(w, quantized.QuantizedKernel) and w.qtype == "fp8"
             for w in weights.values())
  assert weights["q"].layout == general.einsum_layout(Q_SPEC, x.shape, (4, 32, 8))
  bias = model.up.bias[...]
  y_init = model(x)
  np.testing.assert_array_equal(np.asarray(y_init), np.asarray(_quantized_base(x, weights, bias)))

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  loss = lambda m: jnp.mean((m(x) - target) ** 2)

  @nnx.jit
  def step(m, o):
    value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
    o.update(m, grads)
    return value

  losses = [float(step(model, opt)) for _ in range(11)]  # the 11th: after 10 steps
  assert losses[-1] < 0.9 * losses[0], losses
  state = nnx.state(model, nnx.LoRAParam)
  nnx.update(model, _random_adapters(state, int(jax.random.randint(fresh_key(), (), 0, 2**30))))
  y = model(x)
  adapters = {n: tuple(getattr(m, f"{w}{s}")[...] for s in ("_lora_a", "_lora_b", "_magnitude"))
              for n, (m, w) in {"q": (model.q, "w"), "up": (model.up, "kernel"),
                                "down": (model.down, "w")}.items()}
  ref = _network64(x, weights, adapters, bias, ALPHA / RANK)
  assert rel_err(y, ref) < 1e-5
  assert rel_err(y_init, ref) > 1e-2
  # merged: the plain model type, float weights
  merged = dora_jax.qwix.merge(model, provider)
  assert type(merged) is NnxNet and merged.up.kernel[...].dtype == jnp.float32
  assert rel_err(merged(x), y) < 1e-5
  # bad input, named
  for kwargs, match in (({"weight_qtype": "int2"}, "weight_qtype='int2' is not a QDoRA type"),
                        ({"weight_qtype": "nf4", "tile_size": 0.5}, "tile_size=0.5"),
                        ({"weight_qtype": "nf4", "tile_size": 24},
                         "tile_size=24.*block_size=24 must divide d_in")):
    bad = dora_jax.qwix.DoraProvider(module_path=r"q|up|down", rank=RANK, alpha=ALPHA, **kwargs)
    with pytest.raises((ValueError, NotImplementedError), match=match):
      qwix.apply_lora_to_model(base, bad, x, rngs=nnx.Rngs(1))  # base: still the float model

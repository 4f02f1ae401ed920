"""QDoRA on whole NNX models: ``apply_dora(..., base_dtype=)``, ``quantize_base``, merge,
unmerge, the memory the frozen weights take, save/load, and the errors.

The quantized base model is what :func:`dora_jax.unmerge` returns (the same quantized
weights, no adapters); a QDoRA model at init reproduces it bit for bit. Numerics are
checked against float64 DoRA computed densely over the dequantized weights ``Ŵ``.
"""

from __future__ import annotations

import gc
import math
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

pytest.importorskip("qwix")

import dora_jax
from dora_jax import quantized
from dora_jax.models import ALL_PROJECTIONS, LlamaConfig, causal_lm_loss, random_llama
from dora_jax.nnx import quantize as nnx_quantize
from helpers.jaxprs import float_values_holding
from helpers.qdora_models import filled as _filled, randomize as _randomize, sites as _sites
from helpers.reference import assert_same_result, f64, rel_err

CFG = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
RANK, ALPHA = 4, 8.0


def _frozen_leaves(model):
  """Every array of the model's non-adapter Params (quantized weights' codes, scales and
  cached norms included), as numpy copies."""
  state = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  return [np.array(x) for x in jax.tree.leaves(state)]


def _seed(fresh_key) -> int:
  return int(jax.random.randint(fresh_key(), (), 0, 2**30))


@nnx.jit
def _logits(model, ids):
  return model(ids)


@nnx.jit
def _train_step(model, opt, ids):
  """One Adam step of the adapters; returns the loss before the update."""
  loss, grads = nnx.value_and_grad(lambda m: causal_lm_loss(m(ids), ids),
                                   argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  opt.update(model, grads)
  return loss


@pytest.mark.parametrize("qtype", ["nf4", "int8"])
def test_tiny_llama_qdora_trains_over_a_bitwise_frozen_quantized_base(fresh_key, tmp_path, qtype):
  """Exact init against the quantized base model, 20 Adam steps lowering the loss with
  the quantized base bitwise unchanged, merge equal to the adapted model to rounding;
  the frozen weights take the quantized size; a saved adapter loads into the quantized
  base model (quantize_base) and into another QDoRA model with the same outputs."""
  seed = _seed(fresh_key)
  model = random_llama(CFG, seed=seed)
  float_bytes = _llama_frozen_bytes(model)
  float_kernel = model.model.layers[0].mlp.up_proj.kernel[...]
  probe = weakref.ref(float_kernel)
  dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=RANK, alpha=ALPHA,
                      rngs=nnx.Rngs(_seed(fresh_key)), base_dtype=qtype)
  del float_kernel
  gc.collect()
  assert probe() is None  # the float kernel is gone: quantized in place
  _check_bytes(float_bytes, _llama_frozen_bytes(model), qtype)
  sites = _sites(model)
  assert len(sites) == 7 * CFG.num_hidden_layers
  for _, site in sites:
    qk = site.kernel.get_value()
    assert isinstance(qk, quantized.QuantizedKernel) and qk.qtype == qtype
    assert qk.block_size == (64 if qtype == "nf4" else None)
    # PEFT's QDoRA init: the magnitude is the norm of the dequantized weight
    np.testing.assert_allclose(np.asarray(site.magnitude[...]),
                               np.linalg.norm(f64(qk.dequantize()), axis=0), rtol=1e-6)
  ids = jax.random.randint(fresh_key(), (2, 12), 0, CFG.vocab_size)
  base_model = dora_jax.unmerge(model)  # the quantized base model (a copy)
  q_proj = base_model.model.layers[0].self_attn.q_proj
  assert type(q_proj).__name__ == "QuantizedLinear" and isinstance(q_proj, nnx.Linear)
  # init reproduces the quantized base model bit for bit (on a GPU: a few ulps
  # of the largest logit per adapted site, two compilations of the whole model)
  expected = np.asarray(_logits(base_model, ids))
  assert_same_result(_logits(model, ids), expected,
                     np.full(expected.shape, len(sites) * np.abs(expected).max()))

  frozen = _frozen_leaves(model)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
  # the traced training step forms no float value as large as an MLP kernel [64, 128]
  # (no dequantized copy of a quantized weight; nothing else in this model is that large)
  graphdef, state = nnx.split((model, opt))

  def pure_step(state, ids):
    m, o = nnx.merge(graphdef, state)
    return _train_step(m, o, ids), nnx.state((m, o))

  closed = jax.make_jaxpr(pure_step)(state, ids)
  assert float_values_holding(closed, (64, 128)) == []
  losses = [float(_train_step(model, opt, ids)) for _ in range(20)]
  trained_logits = _logits(model, ids)
  final = float(causal_lm_loss(trained_logits, ids))  # after 20 steps
  assert final < 0.9 * losses[0], (losses, final)
  # merge: a float model (the weights' float dtype) equal to the adapted one to rounding
  merged = dora_jax.merge(model)
  up = merged.model.layers[0].mlp.up_proj
  assert type(up) is nnx.Linear and up.kernel[...].dtype == jnp.float32
  assert rel_err(_logits(merged, ids), trained_logits) < 1e-5
  after = _frozen_leaves(model)
  assert len(after) == len(frozen)
  for a, b in zip(after, frozen):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)  # the quantized base, bitwise unchanged

  # the adapter in PEFT's format, into the quantized base model and into a QDoRA model
  dora_jax.save_adapter(model, tmp_path / "adapter")
  base = dora_jax.quantize_base(random_llama(CFG, seed=seed), targets=ALL_PROJECTIONS,
                                base_dtype=qtype)
  assert not _sites(base)
  assert type(base.model.layers[0].mlp.gate_proj).__name__ == "QuantizedLinear"
  dora_jax.load_adapter(base, tmp_path / "adapter")
  assert len(_sites(base)) == 7
  np.testing.assert_array_equal(np.asarray(_logits(base, ids)), np.asarray(trained_logits))
  other = random_llama(CFG, seed=seed)
  dora_jax.apply_dora(other, targets=ALL_PROJECTIONS, rank=RANK, alpha=ALPHA,
                      rngs=nnx.Rngs(seed + 1), base_dtype=qtype)
  dora_jax.load_adapter(other, tmp_path / "adapter")
  np.testing.assert_array_equal(np.asarray(_logits(other, ids)), np.asarray(trained_logits))
  summary = dora_jax.print_trainable_parameters(other, print_fn=lambda s: None)
  assert summary.total == float_bytes[3] + summary.trainable  # quantized weights count as params
  assert (" nf4/64)" if qtype == "nf4" else " int8)") in summary.layers[0][1]

  # requantized: the merged weights, quantized again (type, block and layout kept)
  again = dora_jax.merge(model, requantize=True)
  merged = dora_jax.merge(model)
  for name in ("o_proj", "down_proj"):
    group = "self_attn" if name == "o_proj" else "mlp"
    layer = getattr(getattr(again.model.layers[0], group), name)
    want = getattr(getattr(merged.model.layers[0], group), name).kernel[...]
    qk, ref = layer.kernel.get_value(), quantized.quantize_kernel(want, qtype)
    assert type(layer).__name__ == "QuantizedLinear" and qk.block_size == ref.block_size
    np.testing.assert_array_equal(np.asarray(qk.codes), np.asarray(ref.codes))
    np.testing.assert_array_equal(np.asarray(qk.scale), np.asarray(ref.scale))


def _llama_frozen_bytes(model):
  """``(projection bytes, projection params, all frozen bytes, all frozen params)`` of the
  arrays the model holds (quantized weights: their codes, scales and cached ‖Ŵ‖²)."""
  proj_bytes = proj_params = 0
  for path, module in nnx.iter_modules(model):
    if "layers" in path and hasattr(module, "kernel"):
      value = module.kernel.get_value()
      proj_bytes += (value.nbytes if nnx_quantize.is_quantized(value)
                     else value.size * value.dtype.itemsize)
      proj_params += math.prod(value.shape)
  frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
  total = sum(x.nbytes for x in jax.tree.leaves(frozen))
  params = sum(math.prod(v.get_value().shape) if nnx_quantize.is_quantized(v.get_value())
               else v.get_value().size for _, v in nnx.to_flat_state(frozen))
  return proj_bytes, proj_params, total, params


def _check_bytes(before, after, qtype):
  """The projections hold codes + float32 scales (nothing of the float kernels); the
  rest of the model is untouched; the cached ‖Ŵ‖² adds 4 bytes per output."""
  proj_float, params, total_float, _ = before
  proj, n, total, _ = after
  assert n == params == 64 * (64 + 32 + 32 + 64 + 3 * 128)  # 7 projections
  assert proj_float == 4 * params  # float32
  outputs = {64: 64 + 32 + 32 + 64 + 2 * 128, 128: 64}  # d_out summed per d_in
  if qtype in ("nf4", "int4"):  # two codes per byte, one scale per 64 along d_in
    assert proj == params // 2 + 4 * params // 64
  else:  # one byte per code, one scale per output
    assert proj == params + 4 * sum(outputs.values())
  assert total == proj + (total_float - proj_float) + 4 * sum(outputs.values())
  want = 0.5625 if qtype in ("nf4", "int4") else 1 + 4 * sum(outputs.values()) / params
  assert proj / params == pytest.approx(want)


class Proj(nnx.Module):
  """A custom layer (op-level): its weight, cast to the input's dtype, in an einsum."""

  def __init__(self, shape, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / math.sqrt(shape[0]))

  def __call__(self, x):
    return jnp.einsum("btf,fd->btd", x, self.w[...].astype(x.dtype))


class Kinds(nnx.Module):
  """nnx.Linear -> LinearGeneral [hidden, heads, head_dim] -> nnx.Einsum over two
  contracted axes -> a custom einsum module."""

  def __init__(self, rngs):
    self.linear = nnx.Linear(32, 32, rngs=rngs)
    self.general = nnx.LinearGeneral(32, (4, 8), use_bias=False, rngs=rngs)
    self.einsum = nnx.Einsum("btnh,nhd->btd", (4, 8, 48), (48,), rngs=rngs)
    self.proj = Proj((48, 16), rngs)

  def __call__(self, x):
    h = jnp.tanh(self.linear(x))
    h = jnp.tanh(self.general(h))
    return self.proj(jax.nn.silu(self.einsum(h)))


_SPECS = {"linear": "btd,df->btf", "general": "btd,dnh->btnh", "einsum": "btnh,nhd->btd",
          "proj": "btf,fd->btd"}


def _dora64(spec, x, site):
  """Float64 dense DoRA of one layer over its dequantized weight ``Ŵ``."""
  lay = site.layout
  w = lay.to_matrix(jnp.asarray(f64(site.kernel.get_value().dequantize())))
  a = f64(site.lora_a[...]).reshape(lay.d_in, -1)
  b = f64(site.lora_b[...]).reshape(-1, lay.d_out)
  dense = np.asarray(w) + site.scale * a @ b
  merged = dense * (f64(site.magnitude[...]).reshape(-1) / np.linalg.norm(dense, axis=0))
  return np.einsum(spec, x, np.asarray(lay.from_matrix(jnp.asarray(merged))))


@pytest.mark.default_opt
def test_every_layer_kind_float64_and_exact_init(fresh_key):
  """Linear, LinearGeneral, Einsum and a custom (op-level) module, int4 blockwise: init
  reproduces the quantized base model bit for bit (at XLA's default CPU optimisation;
  on a GPU to a few ulps, two compilations); with random adapters the output
  matches float64 DoRA over Ŵ (rel err < 1e-5)."""
  model = _filled(Kinds, _seed(fresh_key))
  x = jax.random.normal(fresh_key(), (2, 5, 32))
  dora_jax.apply_dora(model, targets="linear|general|einsum|proj", rank=3, alpha=6.0,
                      rngs=nnx.Rngs(1), example_inputs=(x,), base_dtype="int4", block_size=8)
  sites = dict(_sites(model))
  assert sorted(sites) == ["einsum", "general", "linear", "proj"]
  assert all(s.kernel.get_value().qtype == "int4" for s in sites.values())
  base = dora_jax.unmerge(model)
  assert [type(getattr(base, n)).__name__ for n in ("linear", "general", "einsum", "proj")] == [
      "QuantizedLinear", "QuantizedLinearGeneral", "QuantizedEinsum", "QuantizedProj"]
  forward = nnx.jit(lambda m, x: m(x))
  expected = np.asarray(forward(base, x))
  # a chain of layers: on a GPU a few ulps of the largest output per adapted site
  assert_same_result(forward(model, x), expected,
                     np.full(expected.shape, len(sites) * np.abs(expected).max()))

  _randomize(model, _seed(fresh_key), b_scale=0.5)
  y = forward(model, x)
  with jax.enable_x64(True):
    h = _dora64(_SPECS["linear"], f64(x), sites["linear"]) + f64(model.linear.bias[...])
    h = _dora64(_SPECS["general"], np.tanh(h), sites["general"])
    h = _dora64(_SPECS["einsum"], np.tanh(h), sites["einsum"]) + f64(model.einsum.bias[...])
    ref = _dora64(_SPECS["proj"], np.asarray(jax.nn.silu(jnp.asarray(h))), sites["proj"])
  assert rel_err(y, ref) < 1e-5
  assert rel_err(np.asarray(forward(base, x)), ref) > 1e-2  # the adapters matter


class Reshaping(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 8, 16)))

  def __call__(self, x):
    return jnp.einsum("btd,df->btf", x, self.w[...].reshape(32, 16))


class WithEmbed(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 16, rngs=rngs)
    self.conv = nnx.Conv(16, 16, (3,), rngs=rngs)
    self.out = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, ids):
    return self.out(self.conv(self.embed(ids)))


class Two(nnx.Module):
  def __init__(self, rngs):
    self.up = nnx.Linear(32, 8, rngs=rngs)
    self.down = nnx.Linear(8, 32, rngs=rngs)

  def __call__(self, x):
    return self.down(jnp.tanh(self.up(x)))


def test_bad_input_names_the_argument(fresh_key):
  rngs = nnx.Rngs(0)
  fresh = lambda: _filled(Two, 3)
  kw = dict(targets="up|down", rank=2, alpha=2.0, rngs=rngs)
  with pytest.raises(ValueError, match="base_dtype must be one of 'nf4', 'int4', 'int8', 'fp8'"):
    dora_jax.apply_dora(fresh(), base_dtype="int3", **kw)
  with pytest.raises(ValueError, match="block_size=.* is the quantization block of base_dtype"):
    dora_jax.apply_dora(fresh(), block_size=64, **kw)
  with pytest.raises(ValueError, match="block_size must be a positive int"):
    dora_jax.apply_dora(fresh(), base_dtype="nf4", block_size=0, **kw)
  model = fresh()
  kernels = [m.kernel[...] for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)]
  with pytest.raises(ValueError, match=r"block_size=16 must divide d_in, which has size 8 "
                                       r".* \(down/kernel\)"):
    dora_jax.apply_dora(model, base_dtype="nf4", block_size=16, **kw)
  # all or nothing: nothing was quantized or adapted
  assert not _sites(model)
  assert all(m.kernel[...] is k for m, k in zip(
      (m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear)), kernels))
  # quantizing an already-quantized model
  base = dora_jax.quantize_base(fresh(), base_dtype="int8", targets="up|down")
  with pytest.raises(ValueError, match="base_dtype='nf4': down/kernel is already quantized .int8."):
    dora_jax.apply_dora(base, base_dtype="nf4", block_size=8, **kw)
  with pytest.raises(ValueError, match="already quantized"):
    dora_jax.quantize_base(base, base_dtype="int8", targets="up|down")
  with pytest.raises(TypeError, match="export_merged writes float weights, but (up|down)/kernel is "
                                      "quantized"):
    dora_jax.io.export.merged_params(base)
  adapted = fresh()
  dora_jax.apply_dora(adapted, base_dtype="int8", **kw)
  with pytest.raises(ValueError, match="DoRA is already applied"):
    dora_jax.apply_dora(adapted, base_dtype="int8", **kw)
  # layer kinds that cannot be quantized, named
  net = _filled(WithEmbed, 0)
  with pytest.raises(NotImplementedError, match="nnx.Embed layers cannot have a quantized base"
                                                ".* \\(layer 'embed'\\)"):
    dora_jax.apply_dora(net, targets="embed|out", rank=2, alpha=2.0, rngs=rngs, base_dtype="nf4",
                        block_size=2)
  with pytest.raises(NotImplementedError, match="nnx.Conv layers cannot have a quantized base"):
    dora_jax.apply_dora(net, targets="conv", rank=2, alpha=2.0, rngs=rngs, base_dtype="int8")
  assert not _sites(net)
  x = jax.random.normal(fresh_key(), (2, 3, 32))
  with pytest.raises(NotImplementedError, match="w is reshaped or transposed"):
    dora_jax.apply_dora(_filled(Reshaping, 0), targets=".*", rank=2, alpha=2.0, rngs=rngs,
                        example_inputs=(x,), base_dtype="int8")
  with pytest.raises(ValueError, match="base_dtype must be a quantization type"):
    dora_jax.quantize_base(fresh(), base_dtype=None, targets="up")
  # a quantized weight outside a contraction is refused, not dequantized whole
  qk = quantized.quantize_kernel(jax.random.normal(fresh_key(), (32, 8)), "int8")
  with pytest.raises(TypeError, match="entered an operation other than"):
    jnp.dot(x, qk)
  with pytest.raises(TypeError, match="cannot be indexed"):
    qk[0]

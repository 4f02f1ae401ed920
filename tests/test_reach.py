"""apply_dora beyond stock layers: every einsum layout, batched kernels, subclasses of
nnx.Linear, custom modules calling jnp.einsum / lax.dot_general on their own weight.

Per layer: adapted; output at PEFT's init equal to the base bit for bit (float32);
5 Adam steps on nnx.LoRAParam lower the loss with the base weights bitwise
unchanged; output vs a float64 DoRA reference built from the weight viewed as
[d_in, d_out] (rel err < 1e-5); merge vs unmerged (rel err < 1e-5); unmerge exact.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

import dora_jax
from helpers.adapter_helpers import build, np_rng
from dora_jax.nnx import DoRADense, DoRAEinsum, DoRALinearGeneral, intercept
from dora_jax.nnx.op import DoRAOp
from helpers.reach_helpers import (assert_base_unchanged, assert_exact, base_state, f64,
                           merged_reference, randomize, rel_err, train)

RANK, ALPHA = 2, 4.0
TOL = 1e-5


class ProjEinsum(nnx.Module):
  """Tunix/bonsai-style projection: its own weight ``w``, ``jnp.einsum(eq, x, w)``."""

  def __init__(self, einsum_str: str, shape: tuple[int, ...], *, rngs: nnx.Rngs):
    self.einsum_str = einsum_str
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class DotGeneralProj(nnx.Module):
  """A custom layer calling ``lax.dot_general`` on its own weight, plus a bias."""

  def __init__(self, d: int, heads: int, head_dim: int, *, rngs: nnx.Rngs):
    self.weight = nnx.Param(jax.random.normal(rngs.params(), (d, heads, head_dim)))
    self.bias = nnx.Param(jnp.zeros((heads, head_dim)))

  def __call__(self, x):
    y = lax.dot_general(x, self.weight[...], (((x.ndim - 1,), (0,)), ((), ())))
    return y + self.bias[...]


class ScaledLinear(nnx.Linear):
  """A subclass of nnx.Linear that overrides __call__ (adapted at the op level)."""

  def __call__(self, x):
    return super().__call__(x) * 0.5


class PlainSubLinear(nnx.Linear):
  """A subclass of nnx.Linear that keeps its __call__ (wrapped by DoRADense)."""


#: name -> (constructor, input shape, kernel axes (contracted, batch, output), reference op)
LAYERS = {
    "q_einsum": (lambda r: nnx.Einsum("BTD,NDH->BTNH", (3, 8, 4), (3, 4), rngs=r),
                 (2, 5, 8), ((1,), (), (0, 2)), "BTD,NDH->BTNH"),
    "kv_einsum": (lambda r: nnx.Einsum("BSD,CKDH->CBSKH", (2, 3, 8, 4), rngs=r),
                  (2, 5, 8), ((2,), (), (0, 1, 3)), "BSD,CKDH->CBSKH"),
    "gating": (lambda r: nnx.Einsum("...F,NHF->...NH", (3, 4, 8), rngs=r),
               (2, 5, 8), ((2,), (), (0, 1)), "...F,NHF->...NH"),
    "attn_out": (lambda r: ProjEinsum("...hd,hde->...e", (3, 4, 6), rngs=r),
                 (2, 5, 3, 4), ((0, 1), (), (2,)), "...hd,hde->...e"),
    "blockdiag": (lambda r: ProjEinsum("...hi,hij->...hj", (3, 4, 5), rngs=r),
                  (2, 5, 3, 4), ((1,), (0,), (2,)), "...hi,hij->...hj"),
    "dot_general": (lambda r: DotGeneralProj(8, 3, 4, rngs=r), (2, 5, 8), ((0,), (), (1, 2)),
                    "btd,dhk->bthk"),
    "scaled_linear": (lambda r: ScaledLinear(8, 6, rngs=r), (2, 5, 8), ((0,), (), (1,)),
                      "btd,de->bte"),
    "plain_sublinear": (lambda r: PlainSubLinear(8, 6, rngs=r), (2, 5, 8), ((0,), (), (1,)),
                        "btd,de->bte"),
    "batch_general": (lambda r: nnx.LinearGeneral(4, 5, axis=-1, batch_axis={0: 3}, rngs=r),
                      (3, 2, 4), ((1,), (0,), (2,)), "nbd,nde->nbe"),
}
NAMES = tuple(LAYERS)
OP_LEVEL = {"attn_out", "blockdiag", "dot_general", "scaled_linear"}


class Zoo(nnx.Module):
  def __init__(self, rngs):
    for name, (make, *_) in LAYERS.items():
      setattr(self, name, make(rngs))

  def __call__(self, xs):
    return tuple(getattr(self, name)(x) for name, x in zip(NAMES, xs))


def _reference(name, layer_site, module, x):
  """Float64 DoRA output of one adapted layer, from the [d_in, d_out] view."""
  _, _, (contracted, batch, output), eq = LAYERS[name]
  merged = merged_reference(layer_site, contracted, batch, output)
  y = np.einsum(eq, f64(x), merged)
  bias = getattr(module, "bias", None)
  if bias is not None:
    b = f64(bias[...])
    if name == "q_einsum":
      b = b.reshape(1, 1, 3, 4)
    elif name == "batch_general":
      b = b.reshape(3, 1, 5)
    y = y + b
  return 0.5 * y if name == "scaled_linear" else y


def _inputs(key):
  keys = jax.random.split(key, len(NAMES))
  return tuple(jax.random.normal(k, LAYERS[n][1]) for k, n in zip(keys, NAMES))


_forward = nnx.jit(lambda m, xs: m(xs))


@pytest.fixture(scope="module")
def zoo():
  model = build(lambda: Zoo(nnx.Rngs(0)), jax.random.key(17))
  xs = _inputs(jax.random.key(3))
  base_out = _forward(model, xs)
  before = base_state(model)
  dora_jax.apply_dora(model, targets="all-linear", rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(5),
                      example_inputs=(xs,))
  return model, xs, base_out, before


def test_every_layer_adapted_at_init_exact(zoo):
  model, xs, base_out, before = zoo
  assert dora_jax.surgery.adapted_paths(model) == sorted(NAMES)
  for name in NAMES:
    layer = getattr(model, name)
    assert isinstance(layer, DoRAOp) == (name in OP_LEVEL), name
  assert isinstance(model.plain_sublinear, DoRADense)
  assert isinstance(model.q_einsum, DoRAEinsum)
  assert isinstance(model.batch_general, DoRALinearGeneral)
  assert isinstance(model.scaled_linear, ScaledLinear)  # the module stays a ScaledLinear
  sites = dict(dora_jax.surgery.dora_layers(model))
  for name, (_, _, (contracted, batch, output), _) in LAYERS.items():
    layout = sites[name].layout
    assert (layout.contracted, layout.batch, layout.output) == (contracted, batch, output), name
  # the base weights: same Variables, same paths, same bits; adapters beside them
  assert_base_unchanged(model, before)
  assert type(model.attn_out.w) is nnx.Param and type(model.attn_out.lora_a).__name__ == "DoRAParam"
  out = _forward(model, xs)
  for name, y, y0 in zip(NAMES, out, base_out):
    assert_exact(y, y0, name)
  assert not intercept.is_installed()
  assert jax.lax.dot_general is intercept.ORIGINALS["dot_general"][1]
  assert jnp.einsum is intercept.ORIGINALS["einsum"][1]


def test_train_float64_merge_unmerge(zoo, fresh_key):
  model, xs, base_out, before = zoo
  model = nnx.clone(model)
  ys = _inputs(fresh_key())
  targets = tuple(jax.random.normal(k, np.shape(y)) for k, y in
                  zip(jax.random.split(fresh_key(), len(NAMES)), base_out))

  def loss_fn(m):
    return sum(jnp.mean((y - t) ** 2) for y, t in zip(m(ys), targets))

  losses = train(model, loss_fn, steps=5)
  assert losses[-1] < losses[0], losses
  assert_base_unchanged(model, before)
  rng = np_rng(fresh_key())
  sites = dict(dora_jax.surgery.dora_layers(model))
  for site in sites.values():
    randomize(site, rng)
  out = _forward(model, ys)
  for name, y in zip(NAMES, out):
    module = getattr(model, name)
    assert rel_err(y, _reference(name, sites[name], module, ys[NAMES.index(name)])) < TOL, name
  base_now = _forward(dora_jax.unmerge(model), ys)
  merged = dora_jax.merge(model)
  assert not nnx.state(merged, nnx.LoRAParam)
  assert type(merged.attn_out) is ProjEinsum and type(merged.scaled_linear) is ScaledLinear
  assert type(merged.plain_sublinear) is PlainSubLinear
  merged_out = _forward(merged, ys)
  for name, y, ym, y0 in zip(NAMES, out, merged_out, base_now):
    assert rel_err(ym, y) < TOL, name
    assert rel_err(y0, y) > 1e-3, name  # the adapter moved the output
  # unmerge is exact: the base model back, bit for bit
  plain = dora_jax.unmerge(model)
  assert type(plain.blockdiag) is ProjEinsum and not hasattr(plain.blockdiag, "lora_a")
  for name, y, y0 in zip(NAMES, _forward(plain, xs), base_out):
    assert_exact(y, y0, name)


def test_caches_and_dropout_on_op_level_layers(fresh_key):
  layer = build(lambda: ProjEinsum("...hd,hde->...e", (3, 4, 6), rngs=nnx.Rngs(0)), fresh_key())
  x = jax.random.normal(fresh_key(), (4, 3, 4))
  dora_jax.apply_dora(layer, targets=".*", rank=RANK, alpha=ALPHA, dropout=0.3,
                      rngs=nnx.Rngs(params=1, dropout=2), example_inputs=(x,))
  assert isinstance(layer, DoRAOp) and layer.dora_dropout.rate == 0.3
  (_, site), = dora_jax.surgery.dora_layers(layer)
  randomize(site, np_rng(fresh_key()))
  # PEFT's dropout: y = x·W + (g−1)⊙(x̃·W) + g⊙s·(x̃·a)·b, with the module's own mask
  x_dropped = nnx.clone(layer.dora_dropout)(x)
  assert not np.array_equal(x_dropped, x)
  y = layer(x)
  w, merged = f64(layer.w[...]), merged_reference(site, (0, 1))
  expected = np.einsum("bhd,hde->be", f64(x), w) + np.einsum(
      "bhd,hde->be", f64(x_dropped), merged - w)
  assert rel_err(y, expected) < TOL
  layer.eval()
  y_eval = layer(x)
  assert rel_err(y_eval, np.einsum("bhd,hde->be", f64(x), merged)) < TOL
  # cached norms: same output, stale stamps recomputed
  dora_jax.freeze_scales(layer)
  assert site.cache_norm and bool(site.cache_is_fresh())
  np.testing.assert_allclose(site.norm_cache[...], site.weight_norm(), rtol=1e-6)
  assert rel_err(layer(x), y_eval) < 1e-6
  site.lora_b[...] = site.lora_b[...] + 0.1
  assert not bool(site.cache_is_fresh())
  y_new = layer(x)
  assert rel_err(y_new, y_eval) > 1e-4
  assert rel_err(y_new, np.einsum("bhd,hde->be", f64(x), merged_reference(site, (0, 1)))) < TOL
  dora_jax.unfreeze_scales(layer)
  dora_jax.cache_base_norms(layer)
  np.testing.assert_allclose(site.base_sq_norm[...],
                             np.sum(f64(layer.w[...]) ** 2, axis=(0, 1)), rtol=1e-6)
  assert rel_err(layer(x), y_new) < 1e-6
  summary = dora_jax.print_trainable_parameters(layer, print_fn=lambda s: None)
  assert summary.trainable == 12 * RANK + RANK * 6 + 6


def test_dropout_on_a_native_layout_wrapper(fresh_key):
  base = build(lambda: nnx.Einsum("BTD,NDH->BTNH", (3, 8, 4), (3, 4), rngs=nnx.Rngs(0)),
               fresh_key())
  layer = DoRAEinsum(base, rank=RANK, alpha=ALPHA, dropout=0.25,
                     rngs=nnx.Rngs(params=1, dropout=2))
  randomize(layer, np_rng(fresh_key()))
  x = jax.random.normal(fresh_key(), (2, 5, 8))
  key = fresh_key()
  x_dropped = nnx.Dropout(0.25)(x, deterministic=False, rngs=key)  # the layer's mask
  w, merged = f64(layer.kernel[...]), merged_reference(layer, (1,), (), (0, 2))
  bias = f64(layer.bias[...])[None, None]
  expected = (np.einsum("btd,ndh->btnh", f64(x), w) + bias
              + np.einsum("btd,ndh->btnh", f64(x_dropped), merged - w))
  assert rel_err(layer(x, rngs=key), expected) < TOL
  expected_eval = np.einsum("btd,ndh->btnh", f64(x), merged) + bias
  assert rel_err(layer(x, deterministic=True), expected_eval) < TOL


def test_save_load_op_level_and_batched_refused(tmp_path, fresh_key):
  class Two(nnx.Module):
    def __init__(self, rngs):
      self.proj = DotGeneralProj(8, 3, 4, rngs=rngs)
      self.out = ProjEinsum("...hd,hde->...e", (3, 4, 6), rngs=rngs)
      self.q = nnx.Einsum("BD,NDH->BNH", (2, 6, 3), rngs=rngs)  # kernel [N, D, H]: D inside

    def __call__(self, x):
      return self.q(self.out(self.proj(x)))

  model = build(lambda: Two(nnx.Rngs(0)), fresh_key())
  x = jax.random.normal(fresh_key(), (2, 8))
  dora_jax.apply_dora(model, targets="proj|out|q", rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1),
                      example_inputs=(x,))
  rng = np_rng(fresh_key())
  for _, site in dora_jax.surgery.dora_layers(model):
    randomize(site, rng)
  y = model(x)
  dora_jax.save_adapter(model, tmp_path / "a")
  fresh = build(lambda: Two(nnx.Rngs(0)), fresh_key())
  nnx.update(fresh, nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
  dora_jax.apply_dora(fresh, targets="proj|out|q", rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(9),
                      example_inputs=(x,))
  config = dora_jax.io.read_adapter_config(tmp_path / "a")
  assert sorted(config["target_modules"]) == ["out", "proj", "q"]
  dora_jax.load_adapter(fresh, tmp_path / "a")
  np.testing.assert_array_equal(fresh(x), y)

  block = build(lambda: ProjEinsum("...hi,hij->...hj", (3, 4, 5), rngs=nnx.Rngs(0)), fresh_key())
  dora_jax.apply_dora(block, targets=".*", rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1),
                      example_inputs=(jnp.ones((2, 3, 4)),))
  with pytest.raises(NotImplementedError, match="batch axes.*cannot express"):
    dora_jax.save_adapter(block, tmp_path / "b")


class MatmulProj(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))

  def __call__(self, x):
    return x @ self.w[...]


class KernelFirst(nnx.Module):
  def __init__(self, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (3, 4)))

  def __call__(self, x):
    return jnp.einsum("ed,bd->be", self.w[...], x)


class Block(nnx.Module):
  def __init__(self, rngs):
    self.norm = nnx.RMSNorm(4, rngs=rngs)
    self.proj = ProjEinsum("bd,de->be", (4, 3), rngs=rngs)
    self.unused = ProjEinsum("bd,de->be", (4, 3), rngs=rngs)

  def __call__(self, x):
    return self.proj(self.norm(x))


def test_errors_name_the_module():
  x = jnp.ones((2, 4))
  model = Block(nnx.Rngs(0))
  with pytest.raises(ValueError, match="matched no adaptable layer. Adaptable paths: proj$"):
    dora_jax.apply_dora(model, targets="nothing", rank=1, alpha=1, rngs=nnx.Rngs(0),
                        example_inputs=(x,))
  with pytest.raises(TypeError, match=r"proj \(ProjEinsum\).*pass example_inputs"):
    dora_jax.apply_dora(model, targets="proj", rank=1, alpha=1, rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match=r"never enter a contraction.*norm \(RMSNorm\)"):
    dora_jax.apply_dora(model, targets="norm|proj", rank=1, alpha=1, rngs=nnx.Rngs(0),
                        example_inputs=(x,))
  with pytest.raises(NotImplementedError, match=r"unused \(ProjEinsum\)"):
    dora_jax.apply_dora(model, targets="unused", rank=1, alpha=1, rngs=nnx.Rngs(0),
                        example_inputs=(x,))
  assert not dora_jax.surgery.adapted_paths(model)  # all or nothing
  with pytest.raises(NotImplementedError, match=r"'w' enters 1 dot_general.*x @ W"):
    dora_jax.apply_dora(MatmulProj(nnx.Rngs(0)), targets=".*", rank=1, alpha=1,
                        rngs=nnx.Rngs(0), example_inputs=(x,))
  with pytest.raises(NotImplementedError, match="first operand"):
    dora_jax.apply_dora(KernelFirst(nnx.Rngs(0)), targets=".*", rank=1, alpha=1,
                        rngs=nnx.Rngs(0), example_inputs=(jnp.ones((2, 4)),))
  with pytest.raises(TypeError, match="example_inputs must be a tuple"):
    dora_jax.apply_dora(model, targets="proj", rank=1, alpha=1, rngs=nnx.Rngs(0),
                        example_inputs=x)
  assert not intercept.is_installed()


def test_register_hook():
  class Proj(nnx.Module):  # unregistered: needs a trace; registered: wrapped directly
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3)))
      self.bias = None
      self.dtype = self.precision = self.preferred_element_type = None
      self.in_features, self.out_features = 4, 3
      self.dot_general = lax.dot_general

    __call__ = nnx.Linear.__call__
    promote_dtype = staticmethod(nnx.Linear(1, 1, rngs=nnx.Rngs(0)).promote_dtype)
    use_bias = False

  class DoRAProj(DoRADense):
    @classmethod
    def check_base(cls, base, registered):
      assert isinstance(base, Proj)

  saved = dict(dora_jax.nnx.WRAPPERS)
  try:
    dora_jax.nnx.register(Proj, DoRAProj)
    model = nnx.Dict(p=Proj(nnx.Rngs(0)))
    dora_jax.apply_dora(model, targets="p", rank=1, alpha=1, rngs=nnx.Rngs(0))
    assert isinstance(model["p"], DoRAProj)
    with pytest.raises(TypeError, match="DoRALayer subclass"):
      dora_jax.nnx.register(Proj, object)
  finally:
    dora_jax.nnx.WRAPPERS.clear()
    dora_jax.nnx.WRAPPERS.update(saved)


@pytest.mark.parametrize("make,x_shape", [
    (lambda r: nnx.Einsum("BTD,NDH->BTNH", (5, 24, 7), rngs=r), (2, 3, 24)),
    (lambda r: ProjEinsum("...hd,hde->...e", (3, 8, 20), rngs=r), (2, 3, 3, 8)),
    (lambda r: ProjEinsum("...hi,hij->...hj", (3, 8, 9), rngs=r), (2, 2, 3, 8)),
], ids=["wrapper", "op-level", "batched"])
def test_train_step_has_no_kernel_sized_matmul(make, x_shape):
  """No dot_general of the compiled step's gradient makes a kernel-sized value (the dense
  ``a·b``, a transposed kernel copy, or the frozen kernel's cotangent). The norm's
  cancellation refinement forms ``REFINE_COLUMNS`` (16) gathered columns densely, so every
  layer here has more output columns than that."""
  from helpers.jaxprs import dot_output_shapes
  layer = build(lambda: make(nnx.Rngs(0)), jax.random.key(1))
  x = jax.random.normal(jax.random.key(2), x_shape)
  layer = dora_jax.apply_dora(layer, targets=".*", rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1),
                              example_inputs=(x,))
  (_, site), = dora_jax.surgery.dora_layers(layer)
  kernel_size = int(np.prod(site.kernel.shape))
  graphdef, lora, rest = nnx.split(layer, nnx.LoRAParam, ...)

  def loss(lora):
    return jnp.sum(nnx.merge(graphdef, lora, rest)(x) ** 2)

  shapes = dot_output_shapes(jax.make_jaxpr(jax.grad(loss))(lora))
  assert shapes, "no dot_general traced"
  big = [s for s in shapes if np.prod(s) >= kernel_size]
  assert not big, big

"""Model surgery: target matching, replacement in containers, merge/unmerge, errors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax.nnx import DoRADense, DoRAEinsum, DoRALinearGeneral
from dora_jax.surgery import adaptable_paths, adapted_paths
from helpers.adapter_helpers import build, kernel_reductions, randomize_adapters
from helpers.reference import rel_err

_fwd = nnx.jit(lambda m, x: m(x))


class Mlp(nnx.Module):
  def __init__(self, d, rngs):
    self.up_proj = nnx.Linear(d, 2 * d, rngs=rngs)
    self.down_proj = nnx.Linear(2 * d, d, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.relu(self.up_proj(x)))


class Block(nnx.Module):
  def __init__(self, d, rngs):
    self.norm = nnx.LayerNorm(d, rngs=rngs)
    self.attn = nnx.Dict(q=nnx.Einsum("btd,dhk->bthk", (d, 2, d // 2), rngs=rngs),
                         o=nnx.Einsum("bthk,hkd->btd", (2, d // 2, d), rngs=rngs))
    self.mlp = Mlp(d, rngs)

  def __call__(self, x):
    h = self.norm(x)
    return x + self.attn["o"](self.attn["q"](h)) + self.mlp(h)


class Model(nnx.Module):
  def __init__(self, d=8, rngs=None):
    self.embed = nnx.Embed(16, d, rngs=rngs)
    self.layers = nnx.List([Block(d, rngs) for _ in range(2)])
    self.head = nnx.LinearGeneral(d, (2, 8), rngs=rngs)
    self.tied = self.layers[0].mlp.up_proj  # a shared reference

  def __call__(self, tokens):
    x = self.embed(tokens)
    for layer in self.layers:
      x = layer(x)
    return self.head(x) + self.tied(x).reshape(*x.shape[:-1], 2, 8)


def _model(seed=0):
  return build(lambda: Model(rngs=nnx.Rngs(0)), jax.random.key(seed))


def _tokens(key):
  return jax.random.randint(key, (2, 5), 0, 16)


def test_regex_targets_full_match_and_paths(fresh_key):
  model = _model()
  assert "layers/0/mlp/up_proj" in adaptable_paths(model)
  assert "layers/1/attn/q" in adaptable_paths(model)
  dora_jax.apply_dora(model, targets=r"layers/\d+/mlp/(up|down)_proj", rank=2, alpha=4,
                      rngs=nnx.Rngs(1))
  assert adapted_paths(model) == ["layers/0/mlp/down_proj", "layers/0/mlp/up_proj",
                                  "layers/1/mlp/down_proj", "layers/1/mlp/up_proj"]
  assert isinstance(model.layers[1].mlp.up_proj, DoRADense)
  assert type(model.layers[0].attn["q"]) is nnx.Einsum
  # the shared reference was swapped too: one wrapper, two paths
  assert model.tied is model.layers[0].mlp.up_proj
  # full match only: "up_proj" alone matches nothing
  with pytest.raises(ValueError, match="matched no adaptable layer"):
    dora_jax.apply_dora(_model(), targets="up_proj", rank=2, alpha=4, rngs=nnx.Rngs(1))


def test_callable_and_all_linear_targets(fresh_key):
  model = _model()
  dora_jax.apply_dora(model, targets=lambda path, m: isinstance(m, nnx.Einsum), rank=2,
                      alpha=4, rngs=nnx.Rngs(1))
  assert all(isinstance(model.layers[i].attn[k], DoRAEinsum) for i in (0, 1) for k in "qo")
  model = _model()
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  assert isinstance(model.head, DoRALinearGeneral)
  assert len(adapted_paths(model)) == 9
  assert set(adaptable_paths(model)) <= {"embed"}  # "all-linear": linear layers only


def test_adapted_model_runs_and_merges(fresh_key):
  model = _model(int(jax.random.randint(fresh_key(), (), 0, 1000)))
  tokens = _tokens(fresh_key())
  y0 = _fwd(model, tokens)
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(_fwd(model, tokens), y0, rtol=1e-6, atol=1e-6)
  for _, layer in dora_jax.surgery.dora_layers(model):
    randomize_adapters(layer, fresh_key())
  y = _fwd(model, tokens)
  assert rel_err(y, y0) > 1e-3
  merged = dora_jax.merge(model)
  assert adapted_paths(merged) == []
  assert len([p for p in adaptable_paths(merged) if p != "embed"]) == 9
  assert merged.tied is merged.layers[0].mlp.up_proj  # sharing survives the merge
  assert rel_err(_fwd(merged, tokens), y) < 1e-5
  assert isinstance(model.head, DoRALinearGeneral)  # not in place by default
  base = dora_jax.unmerge(model)
  np.testing.assert_array_equal(_fwd(base, tokens), y0)
  inplace = dora_jax.merge(model, inplace=True)
  assert inplace is model and type(model.head) is nnx.LinearGeneral


def test_print_trainable_parameters(capsys):
  model = _model()
  total_before = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  dora_jax.apply_dora(model, targets=r".*mlp/.*", rank=2, alpha=4, rngs=nnx.Rngs(1))
  summary = dora_jax.print_trainable_parameters(model)
  # per layer (d_in + d_out)·r + d_out; the tied up_proj is counted once
  expected = 2 * ((8 + 16) * 2 + 16 + (16 + 8) * 2 + 8)
  assert summary.trainable == expected
  assert summary.total == total_before + expected
  out = capsys.readouterr().out
  assert "layers/0/mlp/up_proj" in out and f"trainable params: {expected:,}" in out


def test_error_nothing_matched_lists_paths():
  with pytest.raises(ValueError) as err:
    dora_jax.apply_dora(_model(), targets=r"nope/.*", rank=2, alpha=4, rngs=nnx.Rngs(1))
  msg = str(err.value)
  assert "layers/0/mlp/up_proj" in msg and "head" in msg and "layers/1/attn/o" in msg


def test_error_rank_bounds():
  with pytest.raises(ValueError, match=r"1 <= rank <= min\(d_in, d_out\) = 8"):
    dora_jax.apply_dora(_model(), targets=r".*up_proj", rank=9, alpha=4, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="positive"):
    dora_jax.apply_dora(_model(), targets=r".*up_proj", rank=0, alpha=4, rngs=nnx.Rngs(1))
  model = _model()
  model.narrow = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
  # all or nothing: the failing layer is found before anything is replaced
  with pytest.raises(ValueError, match=r"narrow \(d_in=8, d_out=3\), got rank=4"):
    dora_jax.apply_dora(model, targets=r".*(up_proj|narrow)", rank=4, alpha=4,
                        rngs=nnx.Rngs(1))
  assert adapted_paths(model) == []


def test_error_applying_twice():
  model = _model()
  dora_jax.apply_dora(model, targets=r".*mlp/up_proj", rank=2, alpha=4, rngs=nnx.Rngs(1))
  with pytest.raises(ValueError, match="already applied to: layers/0/mlp/up_proj"):
    dora_jax.apply_dora(model, targets=r".*_proj", rank=2, alpha=4, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="DoRADense wraps an nnx.Linear"):
    DoRADense(model.layers[0].mlp.up_proj, rank=2, alpha=4, rngs=nnx.Rngs(1))


def test_error_unsupported_type():
  with pytest.raises(TypeError, match=r"layers/0/norm \(LayerNorm\)"):
    dora_jax.apply_dora(_model(), targets=r".*norm", rank=2, alpha=4, rngs=nnx.Rngs(1))
  with pytest.raises(TypeError, match="cannot adapt LoRALinear"):
    dora_jax.nnx.wrap(nnx.LoRALinear(4, 4, lora_rank=2, rngs=nnx.Rngs(0)), rank=2, alpha=1,
                      rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="targets is not a valid regular expression"):
    dora_jax.apply_dora(_model(), targets="(", rank=2, alpha=4, rngs=nnx.Rngs(1))


def test_error_merge_non_adapted():
  with pytest.raises(ValueError, match="no DoRA layers.*apply_dora"):
    dora_jax.merge(_model())
  with pytest.raises(ValueError, match="no DoRA layers"):
    dora_jax.unmerge(_model())
  with pytest.raises(ValueError, match="no DoRA layers"):
    dora_jax.freeze_scales(_model())


def test_error_unadaptable_einsums():
  # Every kernel layout and batched kernels are adapted (tests/test_reach.py); what is
  # left is refused with the reason.
  with pytest.raises(NotImplementedError, match=r"kernel indices \['k'\] are summed away"):
    DoRAEinsum(nnx.Einsum("btd,dk->bt", (6, 4), rngs=nnx.Rngs(0)), rank=2, alpha=1,
               rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="no kernel index reaches only the output"):
    DoRAEinsum(nnx.Einsum("bnd,nd->bn", (3, 4), rngs=nnx.Rngs(0)), rank=2, alpha=1,
               rngs=nnx.Rngs(0))
  with pytest.raises(NotImplementedError, match="custom einsum_op"):
    DoRAEinsum(nnx.Einsum("btd,dk->btk", (6, 4), einsum_op=lambda *a, **k: jnp.einsum(*a, **k),
                          rngs=nnx.Rngs(0)), rank=2, alpha=1, rngs=nnx.Rngs(0))


def test_immutable_container_is_reported():
  class Holder(nnx.Module):
    def __init__(self):
      self.pair = nnx.data((nnx.Linear(4, 4, rngs=nnx.Rngs(0)),))

  with pytest.raises(TypeError, match="immutable"):
    dora_jax.apply_dora(Holder(), targets="all-linear", rank=2, alpha=1, rngs=nnx.Rngs(0))


def test_bare_layer_is_wrapped(fresh_key):
  base = build(lambda: nnx.Linear(6, 4, rngs=nnx.Rngs(0)), fresh_key())
  layer = dora_jax.apply_dora(base, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  assert isinstance(layer, DoRADense) and layer.kernel is base.kernel
  merged = dora_jax.merge(layer)
  assert type(merged) is nnx.Linear


def test_cache_base_norms_same_step_without_rereading_kernels(fresh_key):
  """Cached ‖W‖²: the training step's loss and adapter gradients are bit-identical,
  and no reduction over a kernel is left in it; after a kernel changes,
  refresh_scales brings the cache back in line with an uncached model."""
  key = fresh_key()
  model = _model()
  dora_jax.apply_dora(model, targets=r".*(up|down)_proj|.*head", rank=3, alpha=6,
                      rngs=nnx.Rngs(1))
  for i, (_, layer) in enumerate(dora_jax.surgery.dora_layers(model)):
    randomize_adapters(layer, jax.random.fold_in(key, i))
  tokens = jax.random.randint(jax.random.fold_in(key, 99), (2, 5), 0, 16)

  def loss(m, tokens):
    return jnp.sum(m(tokens) ** 2)

  grad_fn = nnx.jit(nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam)))
  plain = nnx.clone(model)
  cached = dora_jax.cache_base_norms(nnx.clone(model))
  kernels = {tuple(layer.kernel[...].reshape(layer.d_in, layer.d_out).shape)
             for _, layer in dora_jax.surgery.dora_layers(model)}
  for m, expected in ((plain, True), (cached, False)):
    graphdef, state = nnx.split(m)
    jaxpr = jax.make_jaxpr(lambda s, t: loss(nnx.merge(graphdef, s), t))(state, tokens)
    assert (kernel_reductions(jaxpr, kernels) > 0) == expected
  (l0, g0), (l1, g1) = grad_fn(plain, tokens), grad_fn(cached, tokens)
  assert float(l0) == float(l1)
  for u, v in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))

  # A changed base kernel: refresh, then the cached model matches an uncached one.
  for m in (plain, cached):
    layer = m.layers[1].mlp.down_proj
    layer.kernel[...] = 2.0 * layer.kernel[...]
  dora_jax.refresh_scales(cached)
  np.testing.assert_array_equal(np.asarray(_fwd(plain, tokens)), np.asarray(_fwd(cached, tokens)))

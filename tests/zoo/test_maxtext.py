"""DoRA on MaxText's llama2 decoder (NNX, ``maxtext.layers.linears.DenseGeneral``), two ways:
``dora_jax.apply_dora(..., example_inputs=...)`` and ``qwix.apply_lora_to_model(model,
dora_jax.qwix.DoraProvider(...))``.

Both: all 14 projections adapted; logits at PEFT's init equal to the base bit for bit
(float32); 5 Adam steps on nnx.LoRAParam lower the loss with the base weights bitwise
unchanged; every adapted projection's output (captured in a full-model call) matches a
float64 DoRA reference built from its kernel viewed as [d_in, d_out] (rel err < 1e-5);
the merged model's logits match the adapted model's (rel err < 1e-5). And QDoRA with the
exact gradient (int8 base, ``detach_norm=False``) through ``apply_dora``.
"""

from __future__ import annotations

import types

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from zoo_support import require

mt = require("maxtext_support")
qwix = require("qwix")

pytestmark = pytest.mark.xdist_group("maxtext")
import dora_jax.qwix  # noqa: E402
from dora_jax import sharding as dsh  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from helpers.adapter_helpers import np_rng  # noqa: E402
from helpers.reach_helpers import (assert_base_unchanged, assert_exact, base_state, f64,  # noqa: E402
                           merged_reference, randomize, rel_err, train)

RANK, ALPHA, TOL = 4, 8.0, 1e-5
N_PROJ = len(mt.PROJECTIONS) * mt.N_LAYERS


@pytest.fixture(scope="module")
def base():
  cfg = mt.config()
  model, mesh = mt.build(cfg)
  tokens, positions = mt.inputs(jax.random.key(0))
  labels = jax.random.randint(jax.random.key(1), tokens.shape, 0, 256)
  with jax.set_mesh(mesh):
    logits = _forward(model, tokens, positions)
  return model, mesh, (tokens, positions), labels, logits


_forward = nnx.jit(lambda m, t, p: m(t, p, enable_dropout=False))


def _loss_fn(tokens, positions, labels):
  def loss(m):
    logits = m(tokens, positions, enable_dropout=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return loss


class _Recorder:
  """Swaps the projections' classes for subclasses that record (input, output) of a call."""

  def __init__(self, modules: dict):
    self.modules, self.records, self.saved = modules, {}, {}

  def __enter__(self):
    for path, module in self.modules.items():
      cls, records = type(module), self.records

      def call(self, x, *a, _cls=cls, _path=path, **kw):
        y = _cls.__call__(self, x, *a, **kw)
        # a callback: the decoder layers run under jax.checkpoint even eagerly
        jax.debug.callback(lambda x, y, p=_path: records.__setitem__(
            p, (np.asarray(x), np.asarray(y))), x, y)
        return y

      self.saved[path] = cls
      module.__class__ = type(cls.__name__, (cls,), {"__call__": call})
    return self.records

  def __exit__(self, *exc):
    jax.effects_barrier()
    for path, module in self.modules.items():
      module.__class__ = self.saved[path]


def _reference(site, x):
  """Float64 DoRA output of a DenseGeneral projection: ``x`` contracted over its trailing
  ``len(in_features)`` axes with the merged kernel (its leading axes)."""
  n_in = len(site.module.in_features_shape)
  k_ndim = np.ndim(site.kernel[...])
  merged = merged_reference(site, tuple(range(n_in)), (), tuple(range(n_in, k_ndim)))
  return np.tensordot(f64(x), merged, axes=(list(range(x.ndim - n_in, x.ndim)),
                                            list(range(n_in))))


def _check(model, base_model, mesh, inputs, labels, base_logits, sites: dict, merged_of):
  """The checks shared by both ways of adapting (see the module docstring)."""
  tokens, positions = inputs
  assert len(sites) == N_PROJ, sorted(sites)
  with jax.set_mesh(mesh):
    assert_exact(_forward(model, tokens, positions), base_logits, "logits at init")
    before = base_state(model)
    losses = train(model, _loss_fn(tokens, positions, labels), steps=5, lr=1e-2)
    assert losses[-1] < losses[0], losses
    assert_base_unchanged(model, before)
    rng = np_rng(jax.random.key(7))
    for site in sites.values():
      randomize(site, rng)
    fresh = mt.inputs(jax.random.key(11))
    with _Recorder({p: s.module for p, s in sites.items()}) as records:
      logits = model(*fresh, enable_dropout=False)
    errors = {p: rel_err(y, _reference(sites[p], x)) for p, (x, y) in records.items()}
    assert len(errors) == N_PROJ and max(errors.values()) < TOL, errors
    merged = merged_of(model)
    merged_logits = _forward(merged, *fresh)
    assert not nnx.state(merged, nnx.LoRAParam)
    assert rel_err(merged_logits, logits) < TOL
    base_now = _forward(base_model, *fresh)
    assert rel_err(base_now, logits) > 1e-3  # the adapters moved the logits
  print(f"\n{len(sites)}/{N_PROJ} projections adapted; init logits bit-exact; loss "
        f"{losses[0]:.6f} -> {losses[-1]:.6f} (5 Adam steps), base weights unchanged; max "
        f"rel err vs float64 {max(errors.values()):.2e}; merged vs unmerged "
        f"{rel_err(merged_logits, logits):.2e}")


def test_apply_dora(base):
  model0, mesh, inputs, labels, base_logits = base
  model = nnx.clone(model0)
  with jax.set_mesh(mesh):
    dora_jax.apply_dora(model, targets=mt.TARGETS, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1),
                        example_inputs=inputs, example_kwargs={"enable_dropout": False})
  paths = dora_jax.surgery.adapted_paths(model)
  assert paths == sorted(mt.projections(model0)), paths
  sites = dict(dora_jax.surgery.dora_layers(model))
  # the adapters' specs follow MaxText's logical kernel axes by role (on a copy:
  # logical names need MaxText's rules to be placed)
  found = dsh.annotate_adapters(nnx.clone(model), mesh)
  for path, site in sites.items():
    names = site.kernel.get_metadata()["out_sharding"]  # MaxText's logical axis names
    pick = lambda axes: tuple(names[i] for i in axes)
    assert found[path]["lora_a"] == P(*pick(site.layout.contracted), None), path
    assert found[path]["lora_b"] == P(None, *pick(site.layout.output)), path
    assert found[path]["magnitude"] == P(*pick(site.layout.output)), path
  _check(model, model0, mesh, inputs, labels, base_logits, sites, dora_jax.merge)


def test_qwix_dora_provider(base):
  model0, mesh, inputs, labels, base_logits = base
  provider = dora_jax.qwix.DoraProvider(module_path=mt.QWIX_PATH, rank=RANK, alpha=ALPHA)
  with jax.set_mesh(mesh):
    model = qwix.apply_lora_to_model(model0, provider, *inputs, enable_dropout=False,
                                     rngs=nnx.Rngs(1))
  modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(model)}
  sites = {}
  for (path, name), (layout, scale) in provider.adapted.items():
    module = modules["/".join(map(str, path))]
    sites["/".join(map(str, path))] = types.SimpleNamespace(
        module=module, kernel=getattr(module, name), scale=scale,
        lora_a=getattr(module, name + "_lora_a"), lora_b=getattr(module, name + "_lora_b"),
        magnitude=getattr(module, name + "_magnitude"))
  assert sorted(sites) == sorted(mt.projections(model0))
  assert all(type(s.lora_a) is dora_jax.nnx.DoRAParam for s in sites.values())
  _check(model, model0, mesh, inputs, labels, base_logits, sites,
         lambda m: dora_jax.qwix.merge(m, provider))


def test_qdora_with_the_exact_gradient(base):
  """QDoRA (int8 frozen base) with ``detach_norm=False`` on the same decoder: all 14
  projections adapted and quantized; logits at init equal to the quantized base model's
  (``unmerge``) bit for bit; 5 Adam steps lower the loss with the quantized base bitwise
  unchanged; the gradients are finite."""
  model0, mesh, inputs, labels, _ = base
  tokens, positions = inputs
  model = nnx.clone(model0)
  with jax.set_mesh(mesh):
    dora_jax.apply_dora(model, targets=mt.TARGETS, rank=RANK, alpha=ALPHA, rngs=nnx.Rngs(1),
                        example_inputs=inputs, example_kwargs={"enable_dropout": False},
                        base_dtype="int8", detach_norm=False)
    sites = dict(dora_jax.surgery.dora_layers(model))
    assert sorted(sites) == sorted(mt.projections(model0)), sorted(sites)
    quantized_base = dora_jax.unmerge(model)
    assert_exact(_forward(model, tokens, positions), _forward(quantized_base, tokens, positions),
                 "QDoRA logits at init")
    before = base_state(model)
    losses = train(model, _loss_fn(tokens, positions, labels), steps=5, lr=1e-2)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    assert_base_unchanged(model, before)
  print(f"\nQDoRA int8, exact gradient: {len(sites)}/{N_PROJ} projections; loss "
        f"{losses[0]:.6f} -> {losses[-1]:.6f} (5 Adam steps), quantized base unchanged")

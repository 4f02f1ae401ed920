"""``detach_norm`` in saved adapters: PEFT's ``adapter_config.json`` and Orbax checkpoints.

``save_adapter`` of a model trained with ``detach_norm=False`` writes
``"dora_jax_detach_norm": false``; PEFT (``PeftModel.from_pretrained`` in the
PyTorch interpreter, when there is one) loads that adapter and computes what
dora_jax does (float32, relative L2 < 1e-5); ``load_adapter`` into a fresh model
restores ``detach_norm=False``, into an adapted model with the other setting
warns; Orbax checkpoints record it per layer and refuse a model that differs.
"""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax.io import safetensors_format
from dora_jax.io.peft import DETACH_NORM_KEY, AdapterFormatError
from helpers.exact import random_adapters
from helpers.io_models import SPEC, ToyLM, rel_err, torch_base_weights
from helpers.layers import normal, rng
from helpers.torch_env import PEFT_PYTHON, ROOT

PROJ = r"layers/0/(self_attn/q_proj|mlp/down_proj)"
SMALL = {**SPEC, "layers": 1}  # one block: quick to build on both sides


def _toy(seed: int) -> ToyLM:
  """A one-block toy model, its weights drawn on the host (no per-shape compilation)."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: ToyLM(SMALL, seed=0)))
  g = np.random.default_rng(seed)
  return nnx.merge(graphdef, jax.tree.map(lambda v: normal(g, v.shape, v.dtype, 0.3), state))


def _model(seed: int, detach: bool, key=None) -> ToyLM:
  """``_toy(seed)`` with DoRA on two projections (random non-zero adapters with ``key``)."""
  model = _toy(seed)
  dora_jax.apply_dora(model, targets=PROJ, rank=2, alpha=4, rngs=nnx.Rngs(seed),
                      detach_norm=detach)
  if key is not None:
    layers = dict(dora_jax.surgery.dora_layers(model))
    for path, (a, b, m) in random_adapters(model, key).items():
      layers[path].lora_a[...], layers[path].lora_b[...], layers[path].magnitude[...] = a, b, m
  return model


def _detach_flags(model) -> set[bool]:
  return {layer.detach_norm for _, layer in dora_jax.surgery.dora_layers(model)}


def test_save_load_keeps_detach_norm(tmp_path, fresh_key):
  model = _model(1, False, fresh_key())
  dora_jax.save_adapter(model, tmp_path / "exact")
  config = json.loads((tmp_path / "exact" / "adapter_config.json").read_text())
  assert config[DETACH_NORM_KEY] is False
  fresh = _toy(1)
  dora_jax.load_adapter(fresh, tmp_path / "exact")
  assert _detach_flags(fresh) == {False}
  x = normal(rng(fresh_key()), (2, 5, SMALL["hidden"]))
  assert rel_err(np.asarray(fresh(x)), np.asarray(model(x))) < 1e-6
  # the default (PEFT's gradient) writes no key, and loads as detached
  detached = _model(2, True, fresh_key())
  dora_jax.save_adapter(detached, tmp_path / "detached")
  assert DETACH_NORM_KEY not in json.loads(
      (tmp_path / "detached" / "adapter_config.json").read_text())
  fresh = _toy(2)
  dora_jax.load_adapter(fresh, tmp_path / "detached")
  assert _detach_flags(fresh) == {True}
  # an adapted model with the other setting: loads, warns, keeps its own
  with pytest.warns(UserWarning, match="detach_norm=True, but the adapter .* was trained "
                                       "with detach_norm=False"):
    dora_jax.load_adapter(detached, tmp_path / "exact")
  assert _detach_flags(detached) == {True}
  loaded = [np.asarray(v) for v in jax.tree.leaves(nnx.state(detached, nnx.LoRAParam))]
  for got, want in zip(loaded, jax.tree.leaves(nnx.state(model, nnx.LoRAParam))):
    np.testing.assert_array_equal(got, np.asarray(want))  # the adapters did load


def test_bad_or_mixed_detach_norm_is_refused(tmp_path):
  model = _toy(3)
  dora_jax.apply_dora(model, targets=r"layers/0/self_attn/q_proj", rank=2, alpha=4,
                      rngs=nnx.Rngs(0), detach_norm=False)
  dora_jax.apply_dora(model, targets=r"layers/0/mlp/up_proj", rank=2, alpha=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="mix the exact and the detached gradient"):
    dora_jax.save_adapter(model, tmp_path / "mixed")
  good = _model(4, False)
  dora_jax.save_adapter(good, tmp_path / "a")
  path = tmp_path / "a" / "adapter_config.json"
  config = json.loads(path.read_text())
  config[DETACH_NORM_KEY] = "no"
  path.write_text(json.dumps(config))
  weights = tmp_path / "a" / "adapter_model.safetensors"
  tensors, _ = safetensors_format.decode(weights.read_bytes())
  weights.write_bytes(safetensors_format.encode(tensors))  # no config hash: the edit is read
  with pytest.raises(AdapterFormatError, match=f"{DETACH_NORM_KEY} must be a bool, got 'no'"):
    dora_jax.load_adapter(_toy(4), tmp_path / "a")


def test_orbax_state_records_detach_norm(tmp_path, fresh_key):
  pytest.importorskip("orbax.checkpoint")
  model = _model(5, False, fresh_key())
  dora_jax.save_adapter_state(model, tmp_path / "ckpt")
  resumed = _model(5, False)
  dora_jax.restore_adapter_state(resumed, tmp_path / "ckpt")
  state = lambda m: jax.tree.leaves(nnx.state(m, nnx.LoRAParam))
  for a, b in zip(state(resumed), state(model)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="'detach_norm': False.*'detach_norm': True"):
    dora_jax.restore_adapter_state(_model(5, True), tmp_path / "ckpt")


@pytest.mark.skipif(PEFT_PYTHON is None, reason="no PyTorch+PEFT interpreter")
def test_peft_loads_an_exact_gradient_adapter(tmp_path, fresh_key):
  model = _model(6, False, fresh_key())
  x = normal(rng(fresh_key()), (2, 5, SMALL["hidden"]))
  np.save(tmp_path / "x.npy", np.asarray(x))
  (tmp_path / "base.safetensors").write_bytes(
      safetensors_format.encode(torch_base_weights(model)))
  dora_jax.save_adapter(model, tmp_path / "adapter")
  job = {"kind": "load", "base": str(tmp_path / "base.safetensors"), "x": str(tmp_path / "x.npy"),
         "adapter": str(tmp_path / "adapter"), "out": str(tmp_path / "out.npz"),
         "resave": str(tmp_path / "resaved")}
  (tmp_path / "jobs.json").write_text(json.dumps({"spec": SMALL, "jobs": [job]}))
  proc = subprocess.run([PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "peft_side.py"),
                         str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = np.load(tmp_path / "out.npz")
  assert rel_err(out["adapted"], out["base"]) > 1e-2
  assert rel_err(out["adapted"], np.asarray(model(x))) < 1e-5
  # PEFT drops the key it does not know when it re-saves: that adapter loads as detached
  assert DETACH_NORM_KEY not in json.loads((tmp_path / "resaved" / "adapter_config.json")
                                           .read_text())
  fresh = _toy(6)
  dora_jax.load_adapter(fresh, tmp_path / "resaved")
  assert _detach_flags(fresh) == {True}

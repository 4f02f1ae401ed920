"""Cross-check with Hugging Face PEFT (PyTorch): adapters both ways, same outputs.

The JAX side runs here; the PyTorch side (``peft_side.py``) runs under a
separate interpreter with torch and peft, found through the environment
variable ``DORA_JAX_PEFT_PYTHON`` or at ``.venv-peft/bin/python`` (made by
``scripts/peft_env.sh``). Without one the tests are skipped. The two sides
exchange files only: base weights (safetensors, torch layout, exported from
the JAX model), inputs and outputs (``.npy``/``.npz``) and adapter directories.

Cases (one PyTorch process runs all of them):

* ``jax_uniform``: dora_jax adapts every projection (r=4, alpha=8) of a random
  Llama-named toy model, randomises the adapters and saves; PEFT's
  ``PeftModel.from_pretrained`` loads it onto the torch twin, which must give
  the JAX outputs; PEFT re-saves it and dora_jax loads that bit-identically.
* ``jax_mixed``: a subset of layers, two ranks/alphas (``rank_pattern``,
  ``alpha_pattern``), rsLoRA, dropout recorded in the config.
* ``llama_jax`` / ``llama_peft``: the same both ways on a 2-layer
  ``transformers`` ``LlamaForCausalLM`` (GQA, RoPE, RMSNorm; eager attention)
  against a Flax twin with Hugging Face's module names, token ids in, logits out.
* ``peft_uniform`` / ``peft_patterns``: PEFT creates DoRA adapters
  (``get_peft_model(..., LoraConfig(use_dora=True, ...))``), randomised, saved
  with ``save_pretrained``; ``dora_jax.load_adapter`` into the plain JAX model
  must give PEFT's outputs.

Tolerance: float32, relative L2 error < 1e-5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax.io import safetensors_format
from helpers.io_models import (LLAMA_SPEC, SPEC, TinyLlama, ToyLM, inputs, randomize, rel_err,
                               torch_base_weights, torch_llama_weights)

from helpers.torch_env import ENV_VAR, PEFT_PYTHON, ROOT
TOL = 1e-5



pytestmark = pytest.mark.skipif(
    PEFT_PYTHON is None,
    reason=f"no PyTorch+PEFT interpreter: run scripts/peft_env.sh (makes .venv-peft) or set "
           f"{ENV_VAR} to a python with torch, peft and safetensors")

ALL_PROJ = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def _jax_cases(tmp: Path, key) -> dict:
  """Build the dora_jax-saved adapters; returns per-case data for the checks."""
  cases = {}
  k = jax.random.split(key, 6)
  x = inputs(k[0])
  np.save(tmp / "x.npy", np.asarray(x))
  ids = jax.random.randint(k[3], (2, 7), 0, LLAMA_SPEC["vocab"], jnp.int32)
  np.save(tmp / "ids.npy", np.asarray(ids))

  m = ToyLM(seed=1)
  dora_jax.apply_dora(m, targets=ALL_PROJ, rank=4, alpha=8, rngs=nnx.Rngs(2))
  randomize(m, k[1])
  cases["jax_uniform"] = {"model": m, "fresh": lambda: ToyLM(seed=1), "x": x}

  m = ToyLM(seed=3)
  dora_jax.apply_dora(m, targets=r"layers/0/self_attn/(q|k|v|o)_proj", rank=4, alpha=8,
                      rslora=True, dropout=0.1, rngs=nnx.Rngs(4))
  dora_jax.apply_dora(m, targets=r"lm_head|layers/1/mlp/down_proj", rank=2, alpha=3,
                      rslora=True, dropout=0.1, rngs=nnx.Rngs(5))
  randomize(m, k[2])
  m.eval()
  cases["jax_mixed"] = {"model": m, "fresh": lambda: ToyLM(seed=3), "x": x}

  m = TinyLlama(seed=11)
  dora_jax.apply_dora(m, targets=ALL_PROJ, rank=4, alpha=8, rngs=nnx.Rngs(12))
  randomize(m, k[4])
  cases["llama_jax"] = {"model": m, "fresh": lambda: TinyLlama(seed=11), "x": ids,
                        "arch": "llama"}

  for name, case in cases.items():
    case["y"] = np.asarray(case["model"](case["x"]))
    llama = case.get("arch") == "llama"
    base = tmp / f"{name}-base.safetensors"
    weights = (torch_llama_weights if llama else torch_base_weights)(case["model"])
    base.write_bytes(safetensors_format.encode(weights))
    dora_jax.save_adapter(case["model"], tmp / name, task_type="CAUSAL_LM" if llama else None)
    case["job"] = {"kind": "load", "base": str(base),
                   "x": str(tmp / ("ids.npy" if llama else "x.npy")),
                   "adapter": str(tmp / name), "out": str(tmp / f"{name}.npz"),
                   "resave": str(tmp / f"{name}-resaved")}
    if llama:
      case["job"].update(arch="llama", spec=LLAMA_SPEC)
  return cases


def _peft_cases(tmp: Path) -> dict:
  cases = {}
  base = tmp / "peft-base.safetensors"
  base.write_bytes(safetensors_format.encode(torch_base_weights(ToyLM(seed=6))))
  llama_base = tmp / "peft-llama-base.safetensors"
  llama_base.write_bytes(safetensors_format.encode(torch_llama_weights(TinyLlama(seed=13))))
  all_proj = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
  configs = {
      "peft_uniform": {"r": 4, "lora_alpha": 8, "target_modules": all_proj},
      "peft_patterns": {"r": 4, "lora_alpha": 16, "use_rslora": True, "lora_dropout": 0.05,
                        "target_modules": ["q_proj", "o_proj", "up_proj", "lm_head"],
                        "rank_pattern": {"o_proj": 2, "lm_head": 3},
                        "alpha_pattern": {"layers.1.mlp.up_proj": 5}},
      "llama_peft": {"r": 8, "lora_alpha": 16, "target_modules": all_proj,
                     "task_type": "CAUSAL_LM"},
  }
  for i, (name, config) in enumerate(configs.items()):
    llama = name.startswith("llama")
    cases[name] = {"job": {"kind": "make", "base": str(llama_base if llama else base),
                           "x": str(tmp / ("ids.npy" if llama else "x.npy")),
                           "adapter": str(tmp / name), "out": str(tmp / f"{name}.npz"),
                           "config": config, "seed": 100 + i},
                   "fresh": (lambda: TinyLlama(seed=13)) if llama else (lambda: ToyLM(seed=6))}
    if llama:
      cases[name]["job"].update(arch="llama", spec=LLAMA_SPEC)
  return cases


@pytest.fixture(scope="module")
def crosscheck(tmp_path_factory):
  """Run every case's PyTorch side in one subprocess; returns the cases with their results."""
  tmp = tmp_path_factory.mktemp("peft")
  key = jax.random.key(int.from_bytes(os.urandom(4), "little"))
  cases = {**_jax_cases(tmp, key), **_peft_cases(tmp)}
  request = {"spec": SPEC, "jobs": [case["job"] for case in cases.values()]}
  (tmp / "jobs.json").write_text(json.dumps(request))
  proc = subprocess.run([PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "peft_side.py"), str(tmp / "jobs.json")],
                        capture_output=True, text=True, timeout=600)
  if proc.returncode != 0:
    pytest.fail(f"the PyTorch side failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  for case, result in zip(cases.values(), summary):
    case["result"] = result
    case["out"] = dict(np.load(case["job"]["out"]))
  return tmp, cases


def _names(model):
  return sorted(dora_jax.io.default_module_name(p) for p in dora_jax.surgery.adapted_paths(model))


@pytest.mark.parametrize("name", ["jax_uniform", "jax_mixed", "llama_jax"])
def test_dora_jax_adapter_in_peft(crosscheck, name):
  tmp, cases = crosscheck
  case = cases[name]
  model, result, out = case["model"], case["result"], case["out"]
  # PEFT adapted exactly our layers (target_modules and name mapping are right) ...
  assert result["modules"] == _names(model)
  for path, layer in dora_jax.surgery.dora_layers(model):
    peft_name = dora_jax.io.default_module_name(path)
    assert result["r"][peft_name] == layer.rank
    assert result["scaling"][peft_name] == pytest.approx(layer.scale, rel=1e-12)
  # ... the base models agree, the adapters matter, and PEFT computes what dora_jax does.
  plain = dora_jax.unmerge(model)
  assert rel_err(out["base"], np.asarray(plain(case["x"]))) < TOL
  assert rel_err(out["adapted"], out["base"]) > 1e-2
  assert rel_err(out["adapted"], case["y"]) < TOL


@pytest.mark.parametrize("name", ["jax_uniform", "jax_mixed", "llama_jax"])
def test_peft_resave_round_trips_bit_exactly(crosscheck, name):
  _, cases = crosscheck
  case = cases[name]
  fresh = case["fresh"]()
  dora_jax.load_adapter(fresh, case["job"]["resave"])
  want = nnx.to_flat_state(nnx.state(case["model"], nnx.LoRAParam))
  got = nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam))
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, g), (_, w) in zip(got, want):
    assert g[...].dtype == w[...].dtype, path
    np.testing.assert_array_equal(np.asarray(g[...]), np.asarray(w[...]), err_msg=str(path))
  for (path, a), (_, b) in zip(dora_jax.surgery.dora_layers(fresh),
                               dora_jax.surgery.dora_layers(case["model"])):
    assert (a.rank, a.alpha, a.rslora) == (b.rank, b.alpha, b.rslora), path


@pytest.mark.parametrize("name", ["peft_uniform", "peft_patterns", "llama_peft"])
def test_peft_adapter_in_dora_jax(crosscheck, name):
  _, cases = crosscheck
  case = cases[name]
  model = case["fresh"]()
  x = jnp.asarray(np.load(case["job"]["x"]))
  y_base = np.asarray(model(x))
  dora_jax.load_adapter(model, case["job"]["adapter"])
  assert _names(model) == case["result"]["modules"]
  config = case["job"]["config"]
  model.eval()
  y = np.asarray(model(x))
  assert rel_err(case["out"]["adapted"], y_base) > 1e-2
  assert rel_err(y, case["out"]["adapted"]) < TOL
  layers = dict(dora_jax.surgery.dora_layers(model))
  if name == "peft_patterns":
    assert layers["layers/0/self_attn/o_proj"].rank == 2
    assert layers["lm_head"].rank == 3
    assert layers["layers/1/mlp/up_proj"].alpha == 5
    assert layers["layers/0/mlp/up_proj"].alpha == 16
    assert all(layer.rslora for layer in layers.values())
    assert all(layer.dropout_rate == config["lora_dropout"] for layer in layers.values())


def test_embed_conv_adapter_in_peft_and_back(tmp_path, fresh_key):
  """Embed + Conv2d + Linear: PEFT's ``from_pretrained`` reproduces dora_jax's outputs,
  and PEFT's re-save loads back bit-identically."""
  from test_io import embed_conv_adapted, embed_conv_ids
  from helpers.io_models import EmbedConvNet
  model = embed_conv_adapted(fresh_key())
  dora_jax.save_adapter(model, tmp_path / "adapter")
  plain = EmbedConvNet(seed=0)
  ids = np.asarray(embed_conv_ids(fresh_key()), np.int64)
  weights = {"embed.weight": plain.embed.embedding[...],
             "conv.weight": jnp.transpose(plain.conv.kernel[...], (3, 2, 0, 1)),
             "conv.bias": plain.conv.bias[...], "head.weight": plain.head.kernel[...].T,
             "head.bias": plain.head.bias[...]}
  np.savez(tmp_path / "inputs.npz", ids=ids, **{k: np.asarray(v) for k, v in weights.items()})
  proc = subprocess.run(
      [PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "peft_io_embed_conv_side.py"), str(tmp_path / "adapter"),
       str(tmp_path / "inputs.npz"), str(tmp_path / "out.npz"), str(tmp_path / "resave")],
      capture_output=True, text=True, timeout=300)
  if proc.returncode != 0:
    pytest.fail(f"the PyTorch side failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
  ranks = json.loads(proc.stdout.strip().splitlines()[-1])["ranks"]
  assert sorted(k.rsplit(".", 1)[-1] for k in ranks) == ["conv", "embed", "head"]
  assert set(ranks.values()) == {3}
  out = dict(np.load(tmp_path / "out.npz"))
  assert rel_err(out["base"], np.asarray(plain(jnp.asarray(ids)))) < TOL
  assert rel_err(out["adapted"], out["base"]) > 1e-2
  assert rel_err(out["adapted"], np.asarray(model(jnp.asarray(ids)))) < TOL
  fresh = EmbedConvNet(seed=0)
  dora_jax.load_adapter(fresh, tmp_path / "resave")
  want = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  got = nnx.to_flat_state(nnx.state(fresh, nnx.LoRAParam))
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, g), (_, w) in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g[...]), np.asarray(w[...]), err_msg=str(path))

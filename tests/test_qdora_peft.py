"""A QDoRA adapter in Hugging Face PEFT (torch, CPU): saved by dora_jax from a model
with an nf4 base, loaded by ``PeftModel.from_pretrained`` over a float model holding the
same dequantized weights ``Ŵ``; PEFT's outputs equal dora_jax's (relative L2 < 1e-5).
PEFT's re-save loads back into a QDoRA model with the adapters bit for bit.

The PyTorch side is ``peft_side.py`` (the ``load`` job of ``test_peft_compat.py``), run
under the interpreter of ``scripts/peft_env.sh``; without it the test is skipped.
"""

from __future__ import annotations

import json
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("qwix")

import dora_jax
from dora_jax.io import safetensors_format
from dora_jax.nnx import quantize as nnx_quantize
from helpers.io_models import SPEC, ToyLM, inputs, rel_err, torch_base_weights
from helpers.qdora_models import filled as _filled, randomize as _randomize
from helpers.torch_env import ENV_VAR, PEFT_PYTHON, ROOT

pytestmark = pytest.mark.skipif(
    PEFT_PYTHON is None,
    reason=f"no PyTorch+PEFT interpreter: run scripts/peft_env.sh (makes .venv-peft) or set "
           f"{ENV_VAR} to a python with torch, peft and safetensors")

ALL_PROJ = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)|lm_head"
TOL = 1e-5


def dequantized_twin(model: nnx.Module) -> nnx.Module:
  """The float model PEFT runs over: the QDoRA model's base with every quantized weight
  replaced by its dequantized value ``Ŵ`` (no adapters)."""
  plain = dora_jax.unmerge(model)
  for _, module in nnx.iter_modules(plain):
    if nnx_quantize.is_quantized_module(module):
      for param, _ in nnx_quantize.config(module).sites:
        var = getattr(module, param)
        var.set_value(var.get_value().dequantize())
      nnx_quantize.unmark(module)
  return plain


def test_qdora_adapter_loads_in_peft_over_the_dequantized_base(tmp_path, fresh_key):
  seed = int(jax.random.randint(fresh_key(), (), 0, 2**30))
  model = _filled(lambda rngs: ToyLM(), seed)
  # q/o_proj are LinearGeneral (head axes), k_proj an Einsum, the rest Linear
  dora_jax.apply_dora(model, targets=ALL_PROJ, rank=4, alpha=8, rngs=nnx.Rngs(seed),
                      base_dtype="nf4", block_size=4)
  assert all(s.kernel.get_value().qtype == "nf4" for _, s in dora_jax.surgery.dora_layers(model))
  _randomize(model, seed + 1)
  x = inputs(fresh_key())
  forward = nnx.jit(lambda m, x: m(x))
  y = np.asarray(forward(model, x))
  y_base = np.asarray(forward(dora_jax.unmerge(model), x))  # the quantized base model
  adapter = tmp_path / "adapter"
  dora_jax.save_adapter(model, adapter)
  config = json.loads((adapter / "adapter_config.json").read_text())
  assert config["use_dora"] is True and config["r"] == 4
  twin = dequantized_twin(model)
  assert rel_err(forward(twin, x), y_base) < TOL  # the quantized base computes x·Ŵ
  base_file = tmp_path / "base.safetensors"
  base_file.write_bytes(safetensors_format.encode(torch_base_weights(twin)))
  np.save(tmp_path / "x.npy", np.asarray(x))
  job = {"kind": "load", "base": str(base_file), "x": str(tmp_path / "x.npy"),
         "adapter": str(adapter), "out": str(tmp_path / "out.npz"),
         "resave": str(tmp_path / "resaved")}
  (tmp_path / "jobs.json").write_text(json.dumps({"spec": SPEC, "jobs": [job]}))
  proc = subprocess.run([PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "peft_side.py"),
                         str(tmp_path / "jobs.json")], capture_output=True, text=True, timeout=300)
  if proc.returncode != 0:
    pytest.fail(f"the PyTorch side failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])[0]
  assert result["modules"] == sorted(dora_jax.io.default_module_name(p)
                                     for p in dora_jax.surgery.adapted_paths(model))
  out = dict(np.load(tmp_path / "out.npz"))
  assert rel_err(out["base"], y_base) < TOL
  assert rel_err(out["adapted"], out["base"]) > 1e-2
  assert rel_err(out["adapted"], y) < TOL, float(np.max(np.abs(out["adapted"] - y)))

  # PEFT's re-save, loaded into a QDoRA model with other adapters: the same adapters
  other = _filled(lambda rngs: ToyLM(), seed)
  dora_jax.apply_dora(other, targets=ALL_PROJ, rank=4, alpha=8, rngs=nnx.Rngs(seed + 1),
                      base_dtype="nf4", block_size=4)
  dora_jax.load_adapter(other, tmp_path / "resaved")
  want = nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))
  got = nnx.to_flat_state(nnx.state(other, nnx.LoRAParam))
  assert [p for p, _ in got] == [p for p, _ in want]
  for (path, g), (_, w) in zip(got, want):
    np.testing.assert_array_equal(np.asarray(g[...]), np.asarray(w[...]), err_msg=str(path))
  np.testing.assert_array_equal(np.asarray(forward(other, x)), y)

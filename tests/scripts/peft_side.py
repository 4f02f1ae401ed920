"""The PyTorch/PEFT side of tests/test_peft_compat.py (run under a separate interpreter).

Usage: ``python peft_side.py JOBS.json`` where the JSON file holds
``{"spec": {...}, "jobs": [...]}``. Every job works in files only (numpy
``.npy`` inputs/outputs, safetensors weights, PEFT adapter directories):

* ``{"kind": "load", "base", "x", "adapter", "out", "resave"}``: build the toy
  model, load the base weights, ``PeftModel.from_pretrained(model, adapter)``,
  check every adapter tensor of the file landed in the model, write the base
  and adapted outputs on ``x`` to ``out`` (``.npz``) and, if ``resave`` is set,
  ``save_pretrained`` the loaded adapter there.
* ``{"kind": "make", "base", "x", "adapter", "out", "config", "seed"}``:
  ``get_peft_model(model, LoraConfig(use_dora=True, **config))``, randomise
  ``lora_A``, ``lora_B`` and the magnitude, ``save_pretrained(adapter)`` and
  write the adapted output to ``out``.

A job may carry its own ``"spec"`` and ``"arch": "llama"`` (a transformers
``LlamaForCausalLM`` with eager attention, inputs are token ids) instead of the
toy model. A summary (adapted module names per job) is printed as JSON on the
last line.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.set_default_dtype(torch.float32)


class Attention(torch.nn.Module):
  def __init__(self, spec):
    super().__init__()
    hd = spec["heads"] * spec["head_dim"]
    self.q_proj = torch.nn.Linear(spec["hidden"], hd, bias=False)
    self.k_proj = torch.nn.Linear(spec["hidden"], hd, bias=False)
    self.v_proj = torch.nn.Linear(spec["hidden"], hd, bias=False)
    self.o_proj = torch.nn.Linear(hd, spec["hidden"], bias=True)

  def forward(self, h):
    return self.o_proj(self.q_proj(h) * torch.tanh(self.k_proj(h)) + self.v_proj(h))


class MLP(torch.nn.Module):
  def __init__(self, spec):
    super().__init__()
    self.gate_proj = torch.nn.Linear(spec["hidden"], spec["inter"], bias=False)
    self.up_proj = torch.nn.Linear(spec["hidden"], spec["inter"], bias=False)
    self.down_proj = torch.nn.Linear(spec["inter"], spec["hidden"], bias=True)

  def forward(self, h):
    return self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Layer(torch.nn.Module):
  def __init__(self, spec):
    super().__init__()
    self.self_attn = Attention(spec)
    self.mlp = MLP(spec)

  def forward(self, h):
    h = h + self.self_attn(h)
    return h + self.mlp(h)


class Decoder(torch.nn.Module):
  def __init__(self, spec):
    super().__init__()
    self.layers = torch.nn.ModuleList([Layer(spec) for _ in range(spec["layers"])])

  def forward(self, h):
    for layer in self.layers:
      h = layer(h)
    return h


class ToyLM(torch.nn.Module):
  """Llama-style module names: ``model.layers.N.self_attn.q_proj``, ``lm_head``."""

  def __init__(self, spec):
    super().__init__()
    self.model = Decoder(spec)
    self.lm_head = torch.nn.Linear(spec["hidden"], spec["vocab"], bias=False)

  def forward(self, x):
    return self.lm_head(self.model(x))


def llama(spec):
  from transformers import LlamaConfig, LlamaForCausalLM
  config = LlamaConfig(
      vocab_size=spec["vocab"], hidden_size=spec["hidden"], intermediate_size=spec["inter"],
      num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
      num_key_value_heads=spec["kv_heads"], rms_norm_eps=spec["rms_eps"],
      rope_theta=spec["rope_theta"], max_position_embeddings=64, tie_word_embeddings=False,
      attention_bias=False, mlp_bias=False)
  config._attn_implementation = "eager"
  return LlamaForCausalLM(config)


def base_model(spec, base_path, arch="toy"):
  model = llama(spec) if arch == "llama" else ToyLM(spec)
  model.load_state_dict(load_file(base_path), strict=True)
  return model.eval()


def run(model, x):
  inputs = torch.from_numpy(np.load(x))
  with torch.no_grad():
    if inputs.dtype in (torch.int32, torch.int64):  # token ids: a transformers causal LM
      return model(input_ids=inputs.long()).logits.numpy()
    return model(inputs).numpy()


def dora_modules(model):
  return sorted(name.removeprefix("base_model.model.") for name, module in model.named_modules()
                if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A)


def check_loaded(model, adapter_dir):
  """Every tensor of the adapter file equals the parameter PEFT loaded it into."""
  params = dict(model.named_parameters())
  for key, value in load_file(f"{adapter_dir}/adapter_model.safetensors").items():
    if key.endswith(".lora_magnitude_vector"):
      target = key + ".default.weight"
    else:
      target = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(
          ".lora_B.weight", ".lora_B.default.weight")
    if target not in params:
      raise AssertionError(f"PEFT has no parameter for {key} (looked for {target})")
    if not torch.equal(params[target].detach(), value):
      raise AssertionError(f"{target} differs from {key} after from_pretrained")


def job_load(spec, job):
  spec = job.get("spec", spec)
  model = base_model(spec, job["base"], job.get("arch", "toy"))
  y_base = run(model, job["x"])
  peft_model = PeftModel.from_pretrained(model, job["adapter"]).eval()
  check_loaded(peft_model, job["adapter"])
  y = run(peft_model, job["x"])
  np.savez(job["out"], base=y_base, adapted=y)
  if job.get("resave"):
    peft_model.save_pretrained(job["resave"])
  return {"modules": dora_modules(peft_model),
          "r": {n: int(m.r["default"]) for n, m in _lora_layers(peft_model)},
          "scaling": {n: float(m.scaling["default"]) for n, m in _lora_layers(peft_model)}}


def _lora_layers(model):
  for name, module in model.named_modules():
    if hasattr(module, "lora_magnitude_vector") and "default" in module.lora_A:
      yield name.removeprefix("base_model.model."), module


def job_make(spec, job):
  torch.manual_seed(job["seed"])
  spec = job.get("spec", spec)
  model = base_model(spec, job["base"], job.get("arch", "toy"))
  peft_model = get_peft_model(model, LoraConfig(use_dora=True, **job["config"]))
  with torch.no_grad():
    for _, module in _lora_layers(peft_model):
      module.lora_B["default"].weight.normal_(0.0, 0.3)
      mag = module.lora_magnitude_vector["default"].weight
      mag.mul_(1.0 + 0.2 * torch.randn_like(mag))
  peft_model.eval()
  peft_model.save_pretrained(job["adapter"])
  np.savez(job["out"], adapted=run(peft_model, job["x"]))
  return {"modules": dora_modules(peft_model)}


def main(path):
  with open(path) as f:
    request = json.load(f)
  spec = request["spec"]
  summary = []
  for job in request["jobs"]:
    summary.append({"load": job_load, "make": job_make}[job["kind"]](spec, job))
  print(json.dumps(summary))


if __name__ == "__main__":
  main(sys.argv[1])

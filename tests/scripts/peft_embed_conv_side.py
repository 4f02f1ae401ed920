"""The PyTorch/PEFT side of tests/test_embed_conv.py (run under a separate interpreter).

Usage: ``python peft_embed_conv_side.py JOBS.json``. The JSON file holds a list
of jobs, each ``{"kind": "embed" | "conv", "layer": {...}, "r", "alpha",
"rslora", "inputs": npz, "out": npz}``. The input ``.npz`` holds the base
weights and the DoRA adapter in PyTorch/PEFT layout (``weight``, ``bias``,
``lora_A``, ``lora_B``, ``magnitude``), the input ``x`` and a cotangent
``cot``. For every job this wraps a one-layer model with
``get_peft_model(LoraConfig(use_dora=True, ...))``, installs the adapter,
and writes to ``out``: the output ``y``, the gradients of ``Σ y ⊙ cot`` with
respect to ``lora_A``, ``lora_B``, ``magnitude`` (and ``x`` for convs), and
the output of the merged layer (``merge_and_unload``). The last stdout line
is a JSON list with, per job, the adapter's state-dict keys and shapes.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

torch.set_default_dtype(torch.float32)


class One(torch.nn.Module):
  def __init__(self, layer):
    super().__init__()
    self.layer = layer

  def forward(self, x):
    return self.layer(x)


def _base(job, data):
  spec = job["layer"]
  if job["kind"] == "embed":
    layer = torch.nn.Embedding(spec["num_embeddings"], spec["features"])
  else:
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[len(spec["kernel_size"])]
    layer = cls(spec["in_features"], spec["out_features"], tuple(spec["kernel_size"]),
                stride=tuple(spec["stride"]), padding=spec["padding"],
                bias="bias" in data)
  with torch.no_grad():
    layer.weight.copy_(torch.from_numpy(data["weight"]))
    if "bias" in data:
      layer.bias.copy_(torch.from_numpy(data["bias"]))
  return One(layer)


def run(job):
  data = dict(np.load(job["inputs"]))
  model = _base(job, data)
  config = LoraConfig(r=job["r"], lora_alpha=job["alpha"], use_rslora=job["rslora"],
                      use_dora=True, target_modules=["layer"], init_lora_weights=True)
  peft_model = get_peft_model(model, config)
  lora = peft_model.base_model.model.layer
  if job["kind"] == "embed":
    a_param = lora.lora_embedding_A["default"]
    b_param = lora.lora_embedding_B["default"]
  else:
    a_param = lora.lora_A["default"].weight
    b_param = lora.lora_B["default"].weight
  m_param = lora.lora_magnitude_vector["default"].weight
  with torch.no_grad():
    a_param.copy_(torch.from_numpy(data["lora_A"]))
    b_param.copy_(torch.from_numpy(data["lora_B"]))
    # PEFT keeps a conv magnitude as [1, out, 1, ...] (a keepdim norm, transposed).
    m_param.copy_(torch.from_numpy(data["magnitude"]).reshape(m_param.shape))
  if job["kind"] == "embed":
    x = torch.from_numpy(data["x"]).long()
  else:
    x = torch.from_numpy(data["x"]).requires_grad_(True)
  y = peft_model(x)
  (y * torch.from_numpy(data["cot"])).sum().backward()
  out = {"y": y.detach().numpy(), "d_lora_A": a_param.grad.numpy(),
         "d_lora_B": b_param.grad.numpy(), "d_magnitude": m_param.grad.numpy().reshape(-1)}
  if job["kind"] != "embed":
    out["d_x"] = x.grad.numpy()
  state = get_peft_model_state_dict(peft_model)
  keys = {k: list(v.shape) for k, v in state.items()}
  merged = peft_model.merge_and_unload()
  with torch.no_grad():
    out["y_merged"] = merged(x.detach() if x.is_floating_point() else x).numpy()
  np.savez(job["out"], **out)
  return keys


def main():
  jobs = json.loads(open(sys.argv[1]).read())
  summary = [run(job) for job in jobs]
  print(json.dumps(summary))


if __name__ == "__main__":
  main()

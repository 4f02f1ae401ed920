"""The PyTorch side of tests/test_llama.py (run under the PyTorch + PEFT interpreter).

Usage: ``python llama_torch_side.py JOBS.json``; the JSON holds ``{"jobs": [...]}``
and every job works in files only:

* ``{"kind": "checkpoint", "arch", "config", "seed", "dir", "ids", "out",
  "max_shard_size"}``: a random-init ``LlamaForCausalLM`` (or
  ``Qwen2ForCausalLM``) from ``config``, with the norm weights and biases
  randomised too (so a wrong mapping shows), ``save_pretrained(dir)``
  (safetensors, sharded when ``max_shard_size`` is set) and its float32 logits
  on ``ids`` (``[B, T]`` ``.npy``) written to ``out`` (``.npz``, key ``logits``).
* ``{"kind": "train", "dir", "lora", "seed", "adapter", "final_adapter",
  "batches", "adamw", "out"}``: load the checkpoint, ``get_peft_model`` with
  ``LoraConfig(use_dora=True, **lora)``, randomise ``lora_B`` (non-zero) and
  the magnitudes, ``save_pretrained(adapter)``; then for every batch of
  ``batches`` (``[steps, B, T]``) one ``torch.optim.AdamW(**adamw)`` step on
  the loss ``model(ids, labels=ids).loss``. Writes to ``out``: ``logits0``
  (the first batch, before any step), ``losses [steps]``, and ``grad/<key>``
  for every adapter tensor at the first step, keyed and laid out as in
  ``adapter_model.safetensors``; the trained adapter goes to ``final_adapter``.
* ``{"kind": "logits", "dir", "ids", "out"}``: ``from_pretrained(dir)`` (a
  checkpoint dora_jax wrote) and its logits on ``ids``.

A JSON summary is printed on the last line of stdout.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import torch

# One thread: on a shared CPU more threads made the tiny model's steps ~8x slower.
torch.set_num_threads(1)
torch.backends.cuda.matmul.allow_tf32 = False


def _model_classes(arch):
  from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
  return {"llama": (LlamaConfig, LlamaForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[arch]


def job_checkpoint(job):
  torch.manual_seed(job["seed"])
  config_cls, model_cls = _model_classes(job["arch"])
  config = config_cls(**job["config"])
  config._attn_implementation = "eager"
  model = model_cls(config).float().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.05 * torch.randn_like(p))
  kwargs = {"max_shard_size": job["max_shard_size"]} if job.get("max_shard_size") else {}
  model.save_pretrained(job["dir"], **kwargs)
  ids = torch.from_numpy(np.load(job["ids"])).long()
  with torch.no_grad():
    logits = model(input_ids=ids).logits
  np.savez(job["out"], logits=logits.numpy())
  return {"params": sum(p.numel() for p in model.parameters())}


def job_logits(job):
  from transformers import AutoModelForCausalLM
  model = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32,
                                               attn_implementation="eager").eval()
  ids = torch.from_numpy(np.load(job["ids"])).long()
  with torch.no_grad():
    np.savez(job["out"], logits=model(input_ids=ids).logits.numpy())
  return {"class": type(model).__name__}


def _adapter_key(name):
  """``named_parameters`` name -> the key ``save_pretrained`` writes (adapter name dropped)."""
  name = name.replace(".lora_A.default.weight", ".lora_A.weight")
  name = name.replace(".lora_B.default.weight", ".lora_B.weight")
  return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector")


def job_train(job):
  from peft import LoraConfig, get_peft_model
  from transformers import AutoModelForCausalLM
  torch.manual_seed(job["seed"])
  base = AutoModelForCausalLM.from_pretrained(job["dir"], dtype=torch.float32,
                                              attn_implementation="eager")
  model = get_peft_model(base, LoraConfig(use_dora=True, lora_dropout=0.0, **job["lora"]))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".lora_B." in name:
        p.normal_(0.0, job.get("b_std", 0.02))
      elif "lora_magnitude_vector" in name:
        p.mul_(1.0 + 0.1 * torch.randn_like(p))
  model.save_pretrained(job["adapter"])
  model.train()
  params = {n: p for n, p in model.named_parameters() if p.requires_grad}
  optimizer = torch.optim.AdamW(params.values(), **job["adamw"])
  batches = torch.from_numpy(np.load(job["batches"])).long()
  losses, out = [], {}
  start = time.perf_counter()
  for step, ids in enumerate(batches):
    optimizer.zero_grad(set_to_none=True)
    result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    if step == 0:
      out["logits0"] = result.logits.detach().numpy()
      for name, p in params.items():
        g = p.grad.detach().numpy()
        out["grad/" + _adapter_key(name)] = g
    optimizer.step()
    losses.append(float(result.loss.detach()))
  seconds = time.perf_counter() - start
  out["losses"] = np.asarray(losses, np.float64)
  np.savez(job["out"], **out)
  model.save_pretrained(job["final_adapter"])
  return {"steps": len(losses), "seconds": seconds,
          "adapted": sum(1 for n in params if ".lora_A." in n)}


def main(path):
  with open(path) as f:
    request = json.load(f)
  kinds = {"checkpoint": job_checkpoint, "logits": job_logits, "train": job_train}
  print(json.dumps([kinds[job["kind"]](job) for job in request["jobs"]]))


if __name__ == "__main__":
  main(sys.argv[1])

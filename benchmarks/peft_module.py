"""Hugging Face PEFT DoRA and LoRA on one projection (torch, CUDA events).

  python benchmarks/peft_module.py --configs CONFIGS.json --out RESULTS.json

Run by ``module_suite.py`` in its own process (so JAX's and torch's allocators
don't share the GPU); also runnable alone. ``CONFIGS.json`` is a list of
``{"d_in", "d_out", "rank", "tokens", "dtype"}``. For each config and for
``use_dora`` in (False, True): forward in training mode, forward+backward of
``Σ y ⊙ cot`` (random cotangent), and the peak extra memory of the step over
the weights (``torch.cuda.max_memory_allocated``); adapters in the activation
dtype (``autocast_adapter_dtype=False``, matching the JAX side); medians of CUDA-event timed
runs after warm-up, inputs rotated among three sets.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from peft import LoraConfig, get_peft_model

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class OneProjection(torch.nn.Module):
  def __init__(self, d_in, d_out, dtype):
    super().__init__()
    self.proj = torch.nn.Linear(d_in, d_out, bias=False, dtype=dtype)  # as the JAX side


def build(cfg, use_dora):
  dtype = DTYPES[cfg["dtype"]]
  torch.manual_seed(0)
  base = OneProjection(cfg["d_in"], cfg["d_out"], dtype).cuda()
  config = LoraConfig(r=cfg["rank"], lora_alpha=2 * cfg["rank"], target_modules=["proj"],
                      use_dora=use_dora, lora_dropout=0.0)
  # Adapters in the activation dtype, as on the JAX side (PEFT's default
  # autocast_adapter_dtype=True would keep them in float32 and run the adapter
  # matmuls and the DoRA norm in float32).
  model = get_peft_model(base, config, autocast_adapter_dtype=False)
  with torch.no_grad():  # never time on zeros: a trained-looking adapter
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.normal_(0, 0.01)
  model.train()
  return model


def cuda_time(fn, iters=20, reps=7):
  for _ in range(3):
    fn(0)
  torch.cuda.synchronize()
  samples = []
  for _ in range(reps):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
      fn(i)
    end.record()
    torch.cuda.synchronize()
    samples.append(start.elapsed_time(end) / iters)
  return statistics.median(samples)


def run_config(cfg):
  rows = []
  dtype = DTYPES[cfg["dtype"]]
  xs = [torch.randn(cfg["tokens"], cfg["d_in"], device="cuda", dtype=dtype, requires_grad=True)
        for _ in range(3)]
  cots = [torch.randn(cfg["tokens"], cfg["d_out"], device="cuda", dtype=dtype) for _ in range(3)]
  for use_dora in (False, True):
    model = build(cfg, use_dora)
    name = "peft_dora" if use_dora else "peft_lora"

    layer = model.base_model.model.proj  # the PEFT-wrapped Linear

    def fwd(i):
      with torch.no_grad():
        layer(xs[i % 3])

    trainable = [p for p in model.parameters() if p.requires_grad]

    def fwd_bwd(i):  # value and gradients w.r.t. x and the adapter, as on the JAX side
      y = layer(xs[i % 3])
      loss = (y * cots[i % 3]).float().sum()
      torch.autograd.grad(loss, [xs[i % 3]] + trainable)

    fwd_ms = cuda_time(fwd)
    fwd_bwd(0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated()
    fwd_bwd(0)
    torch.cuda.synchronize()
    peak_extra = torch.cuda.max_memory_allocated() - base_mem
    fb_ms = cuda_time(fwd_bwd)
    rows.append(dict(cfg, impl=name, framework="torch", mode="fwd", ms=fwd_ms))
    rows.append(dict(cfg, impl=name, framework="torch", mode="fwd_bwd", ms=fb_ms,
                     peak_extra_mb=peak_extra / 2**20))
    del model
    torch.cuda.empty_cache()
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--configs", required=True)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  with open(args.configs) as f:
    configs = json.load(f)
  rows = []
  for cfg in configs:
    rows.extend(run_config(cfg))
    for r in rows[-4:]:
      print(f"{r['impl']:<10} {r['d_in']}x{r['d_out']} r={r['rank']} T={r['tokens']} "
            f"{r['mode']:<8} {r['ms']:8.3f} ms", flush=True)
  import peft
  meta = dict(torch=torch.__version__, peft=peft.__version__,
              device=torch.cuda.get_device_name())
  with open(args.out, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

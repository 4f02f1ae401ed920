"""PEFT DoRA vs PEFT LoRA on one transformers ``LlamaDecoderLayer``: a full training step.

  python benchmarks/peft_decoder_layer.py --out RESULTS.json [--ranks 16,384] [--smoke] [--device cpu]

Run by ``decoder_layer.py`` in its own process. Adapters (bf16, like the JAX
side) on q, k, v, o, gate, up, down; one step = forward + backward of
``Σ y ⊙ cot`` + ``torch.optim.AdamW`` on the adapters; medians of CUDA-event
timed steps after warm-up; peak extra memory of a step
(``max_memory_allocated`` minus what was allocated before it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

FULL = dict(hidden=4096, mlp=14336, heads=32, kv_heads=8, seq=4096, batch=1)
SMOKE = dict(hidden=64, mlp=160, heads=4, kv_heads=2, seq=32, batch=2)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Block(torch.nn.Module):
  def __init__(self, cfg, dtype):
    super().__init__()
    self.config = LlamaConfig(hidden_size=cfg["hidden"], intermediate_size=cfg["mlp"],
                              num_attention_heads=cfg["heads"], num_key_value_heads=cfg["kv_heads"],
                              rope_theta=500000.0, attn_implementation="sdpa")
    self.layer = LlamaDecoderLayer(self.config, layer_idx=0).to(dtype)
    self.rope = LlamaRotaryEmbedding(self.config)

  def forward(self, x):
    pos = torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)
    out = self.layer(x, position_embeddings=self.rope(x, pos), position_ids=pos)
    return out[0] if isinstance(out, tuple) else out


def timed(fn, device, calls=10, repeats=7):
  for i in range(3):
    fn(i)
  samples = []
  for _ in range(repeats):
    if device == "cuda":
      start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
      start.record()
      for i in range(calls):
        fn(i)
      end.record()
      torch.cuda.synchronize()
      samples.append(start.elapsed_time(end) / calls)
    else:
      t0 = time.perf_counter()
      for i in range(calls):
        fn(i)
      samples.append((time.perf_counter() - t0) * 1e3 / calls)
  return statistics.median(samples)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--out", required=True)
  parser.add_argument("--ranks", default="16,384")
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--device", default="cuda")
  args = parser.parse_args()
  cfg = SMOKE if args.smoke else FULL
  dtype, device = torch.bfloat16, args.device
  rows = []
  xs = [torch.randn(cfg["batch"], cfg["seq"], cfg["hidden"], device=device, dtype=dtype) for _ in range(2)]
  cots = [torch.randn_like(xs[0]) for _ in range(2)]
  for rank in map(int, args.ranks.split(",")):
    for use_dora in (False, True):
      torch.manual_seed(0)
      model = get_peft_model(Block(cfg, dtype).to(device),
                             LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                        use_dora=use_dora, lora_dropout=0.0),
                             autocast_adapter_dtype=False)
      with torch.no_grad():
        for name, p in model.named_parameters():
          if "lora_B" in name:
            p.normal_(0, 0.01)
      model.train()
      opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

      def step(i):
        loss = (model(xs[i % 2]) * cots[i % 2]).float().sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

      ms = timed(step, device, calls=2 if args.smoke else 10, repeats=2 if args.smoke else 7)
      peak = None
      if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(0)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
      name = "peft_dora" if use_dora else "peft_lora"
      rows.append(dict(framework="torch", impl=name, rank=rank, ms=ms, peak_extra_mb=peak))
      print(f"torch {name:<9} r={rank:<4} step {ms:8.3f} ms" + (f"  peak extra {peak:8.1f} MiB" if peak else ""),
            flush=True)
      del model, opt
  import peft
  import transformers
  with open(args.out, "w") as f:
    json.dump(dict(meta=dict(torch=torch.__version__, peft=peft.__version__,
                             transformers=transformers.__version__), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

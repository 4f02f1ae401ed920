"""The PyTorch side of ``benchmarks/model_step.py``: PEFT DoRA/LoRA on transformers' Llama.

  python benchmarks/model_step_peft.py --shape '{"vocab": 128256, ...}' --rank 384 --seq 4096 [--dora]

Random init on the GPU in bf16, ``LoraConfig(r, lora_alpha=2r, target_modules=the seven
projections, use_dora=...)`` (PEFT keeps the adapters in float32 by default),
AdamW on the adapters, ``model(ids, labels=ids).loss``, SDPA attention, no
gradient checkpointing. Prints ``RESULT {json}``: the median step time in ms
(CUDA events, two warm-up steps, a fresh batch each step), the peak
``max_memory_allocated`` in GiB and the losses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class _Clock:
  """CUDA events around a step on the GPU (a synchronising host clock elsewhere)."""

  def __init__(self, device: str):
    self.device = device
    if device == "cuda":
      self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
      self.start.record()
    else:
      self.t0 = time.perf_counter()

  def ms(self) -> float:
    if self.device == "cuda":
      self.end.record()
      torch.cuda.synchronize()
      return self.start.elapsed_time(self.end)
    return (time.perf_counter() - self.t0) * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shape", required=True)
  p.add_argument("--rank", type=int, default=384)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--dora", action="store_true")
  args = p.parse_args()
  shape = json.loads(args.shape)
  torch.backends.cuda.matmul.allow_tf32 = False
  config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                       intermediate_size=shape["mlp"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       rope_theta=500000.0, max_position_embeddings=max(args.seq, 2048),
                       attn_implementation="sdpa")
  device = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU for smoke runs only
  with torch.device(device):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
  model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank,
                                           target_modules=TARGETS, use_dora=args.dora))
  with torch.no_grad():  # a trained adapter, not the zero init
    for name, param in model.named_parameters():
      if "lora_B" in name:
        param.normal_(0.0, 1e-3)
  model.train()
  optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-4)
  gen = torch.Generator(device=device).manual_seed(7)
  losses, times = [], []
  for i in range(args.steps + 2):
    ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), device=device, generator=gen)
    clock = _Clock(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if i >= 2:
      times.append(clock.ms())
    losses.append(float(loss))
  trainable = sum(q.numel() for q in model.parameters() if q.requires_grad)
  peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
  print("RESULT " + json.dumps(dict(ms=statistics.median(times), peak_gib=peak,
                                    losses=losses, trainable=trainable)), flush=True)


if __name__ == "__main__":
  main()

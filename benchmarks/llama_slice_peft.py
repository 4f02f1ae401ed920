"""Hugging Face PEFT DoRA training steps on a checkpoint: the PyTorch side of
``examples/finetune_llama.py``'s step timing (same checkpoint, shapes, rank,
targets and AdamW; loss ``model(ids, labels=ids).loss``).

  python benchmarks/llama_slice_peft.py CHECKPOINT --seq 4096 --batch 1 --rank 16 --steps 30

Prints the median step time (forward, backward, AdamW; synchronised) and the
peak GPU memory. ``--lora`` times plain LoRA instead of DoRA.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("checkpoint")
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--steps", type=int, default=30)
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
  p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
  p.add_argument("--lora", action="store_true", help="plain LoRA instead of DoRA")
  args = p.parse_args()
  torch.backends.cuda.matmul.allow_tf32 = False
  device = "cuda" if torch.cuda.is_available() else "cpu"
  dtype = getattr(torch, args.dtype)
  model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype,
                                               attn_implementation=args.attn).to(device)
  model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha,
                                           target_modules=TARGETS, use_dora=not args.lora))
  model.print_trainable_parameters()
  model.train()
  optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr,
                                weight_decay=0.0)
  rng = np.random.default_rng(0)
  vocab = model.config.vocab_size
  times = []
  for step in range(args.steps):
    ids = torch.from_numpy(rng.integers(0, min(vocab, 256), (args.batch, args.seq))).to(device)
    if device == "cuda":
      torch.cuda.synchronize()
    t = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if device == "cuda":
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
  steady = times[2:] if len(times) > 3 else times
  peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
  kind = "LoRA" if args.lora else "DoRA"
  print(f"PEFT {kind}: step time median {1e3 * float(np.median(steady)):.2f} ms over "
        f"{len(steady)} steps; {args.batch * args.seq / float(np.median(steady)):,.0f} tokens/s; "
        f"peak GPU memory {peak:,.0f} MiB; last loss {float(loss):.4f}")


if __name__ == "__main__":
  main()

"""DoRA fine-tuning of a Hugging Face Llama/Qwen2/Mistral checkpoint in Flax NNX.

1. Load ``CHECKPOINT`` (``config.json`` + safetensors) with
   :func:`dora_jax.models.load_hf_llama`; ``--init-random PRESET`` first writes a
   random checkpoint there (``tiny``, or ``llama3-8b`` shapes, sliced to
   ``--layers``) for smoke tests and timing.
2. Tokenize ``--data`` (a text file, or JSONL with a ``--text-field``) with the
   checkpoint's ``tokenizer.json`` (``tokenizers`` package) or, without one,
   as UTF-8 bytes (ids 0..255).
3. Add DoRA adapters to the projections matching ``--targets`` and train them
   only (AdamW with warm-up and cosine decay, gradient clipping), with a tqdm
   bar, periodic held-out evaluation and Orbax checkpoints of the adapters and
   optimizer (``--ckpt-dir``; ``--resume`` continues from the latest).
   ``--base-dtype nf4`` (or ``int4``, ``int8``, ``fp8``; ``--block-size``) is
   QDoRA: those projections' frozen weights are quantized in place first.
   ``--exact-grad`` trains with the exact DoRA gradient through the norm
   (``apply_dora(..., detach_norm=False)``) instead of PEFT's detached one.
4. Save the adapter in Hugging Face PEFT's format (``--out``), loadable with
   ``peft.PeftModel.from_pretrained``; ``--merged-out`` also writes the merged
   model as a Hugging Face checkpoint.

Run on a CPU with a tiny random checkpoint and any text::

  python examples/finetune_llama.py /tmp/tiny --init-random tiny --data README.md \\
      --steps 50 --out /tmp/tiny-adapter

QDoRA over an nf4 base (the adapter saved is a normal PEFT DoRA adapter;
``--merged-out`` writes the merged float model)::

  python examples/finetune_llama.py /tmp/tiny --init-random tiny --data README.md \\
      --steps 50 --base-dtype nf4 --out /tmp/tiny-qdora-adapter

A Llama-3-8B-shaped slice (two layers) on a GPU, bf16, timing the steps::

  python examples/finetune_llama.py /tmp/l3slice --init-random llama3-8b --layers 2 \\
      --dtype bfloat16 --data README.md --seq 4096 --batch 1 --rank 16 --steps 30 \\
      --eval-every 0

and the same steps with Hugging Face PEFT for comparison:
``python benchmarks/llama_slice_peft.py /tmp/l3slice --seq 4096 --batch 1 --rank 16 --steps 30``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import dora_jax
from dora_jax.models import (ALL_PROJECTIONS, LlamaConfig, causal_lm_loss, load_hf_llama,
                             random_llama, save_hf_llama)

PRESETS = {
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
                      rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                      rope_original_max_position_embeddings=8192,
                      max_position_embeddings=131072),
}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


# -- data ---------------------------------------------------------------------


def read_texts(path: Path, text_field: str) -> list[str]:
  """The documents of a text file (one) or a JSONL file (one per line, ``text_field``)."""
  if path.suffix in (".jsonl", ".json"):
    texts = []
    for i, line in enumerate(path.read_text("utf-8").splitlines()):
      if line.strip():
        record = json.loads(line)
        if text_field not in record:
          raise SystemExit(f"{path}:{i + 1}: no field {text_field!r} (see --text-field)")
        texts.append(str(record[text_field]))
    return texts
  return [path.read_text("utf-8", errors="replace")]


class Tokenizer:
  """``tokenizer.json`` through the ``tokenizers`` package, or UTF-8 bytes."""

  def __init__(self, checkpoint: Path, vocab_size: int, force_bytes: bool = False):
    path = checkpoint / "tokenizer.json"
    self.name, self.tok, self.eos = "bytes", None, None
    if path.is_file() and not force_bytes:
      try:
        from tokenizers import Tokenizer as HFTokenizer
      except ImportError:
        raise SystemExit(f"{path} needs the tokenizers package (pip install tokenizers), or "
                         "pass --byte-level to ignore it") from None
      self.tok, self.name = HFTokenizer.from_file(str(path)), "tokenizer.json"
      config = checkpoint / "tokenizer_config.json"
      eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
      eos = eos.get("content") if isinstance(eos, dict) else eos
      self.eos = self.tok.token_to_id(eos) if eos else None
    elif vocab_size < 256:
      raise SystemExit(f"byte-level tokens need vocab_size >= 256, the model has {vocab_size}")

  def encode(self, texts: list[str]) -> np.ndarray:
    """All documents' ids, concatenated (``eos`` or a blank line between documents)."""
    out = []
    for text in texts:
      if self.tok is None:
        out.append(np.frombuffer((text + "\n\n").encode("utf-8"), np.uint8).astype(np.int32))
      else:
        ids = self.tok.encode(text).ids + ([self.eos] if self.eos is not None else [])
        out.append(np.asarray(ids, np.int32))
    return np.concatenate(out) if out else np.zeros((0,), np.int32)


def split_tokens(tokens: np.ndarray, seq: int, eval_fraction: float
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(train, held-out) token streams; each long enough for one ``seq + 1`` window."""
  need = 2 * (seq + 1)
  if len(tokens) < need:
    reps = -(-need // max(len(tokens), 1))
    print(f"note: only {len(tokens)} tokens; repeating the data {reps}x")
    tokens = np.tile(tokens, reps)
  cut = min(max(int(len(tokens) * (1 - eval_fraction)), seq + 1), len(tokens) - seq - 1)
  return tokens[:cut], tokens[cut:]


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch: int, seq: int) -> np.ndarray:
  """``[batch, seq]`` random windows of ``data``."""
  starts = rng.integers(0, len(data) - seq + 1, size=batch)
  return np.stack([data[s:s + seq] for s in starts])


# -- training -----------------------------------------------------------------


@nnx.jit
def train_step(model: nnx.Module, optimizer: nnx.Optimizer, ids: jax.Array) -> jax.Array:
  def loss_fn(m):
    return causal_lm_loss(m(ids), ids)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def eval_loss(model: nnx.Module, ids: jax.Array) -> jax.Array:
  return causal_lm_loss(model(ids), ids)


def evaluate(model: nnx.Module, batches: list[np.ndarray]) -> float:
  model.eval()
  loss = float(np.mean([float(eval_loss(model, jnp.asarray(b))) for b in batches]))
  model.train()
  return loss


def latest_checkpoint(ckpt_dir: Path) -> tuple[int, Path] | None:
  steps = [(int(m.group(1)), p) for p in ckpt_dir.glob("step_*")
           if (m := re.fullmatch(r"step_(\d+)", p.name)) and p.is_dir()]
  return max(steps) if steps else None


def make_random_checkpoint(path: Path, preset: str, layers: int | None, dtype, seed: int) -> None:
  config = LlamaConfig(**PRESETS[preset])
  if layers:
    config = config.replace(num_hidden_layers=layers)
  print(f"writing a random {preset} checkpoint ({config.num_hidden_layers} layers) to {path}")
  save_hf_llama(random_llama(config, dtype=dtype, seed=seed), path)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory")
  p.add_argument("--data", type=Path, required=True, help="text file, or JSONL")
  p.add_argument("--text-field", default="text", help="JSONL field holding the text")
  p.add_argument("--byte-level", action="store_true", help="ignore tokenizer.json, use bytes")
  p.add_argument("--init-random", choices=sorted(PRESETS),
                 help="first write a random checkpoint of these shapes (if none is there)")
  p.add_argument("--layers", type=int, help="with --init-random: number of layers")
  p.add_argument("--targets", default=ALL_PROJECTIONS, help="regex over module paths")
  p.add_argument("--rank", type=int, default=16)
  p.add_argument("--alpha", type=float, default=32.0)
  p.add_argument("--dropout", type=float, default=0.0)
  p.add_argument("--base-dtype", choices=["nf4", "int4", "int8", "fp8"], default=None,
                 help="QDoRA: quantize the adapted projections' frozen weights to this type")
  p.add_argument("--block-size", type=int, default=None,
                 help="with --base-dtype: elements per scale along d_in (nf4/int4 default 64)")
  p.add_argument("--exact-grad", action="store_true",
                 help="the exact gradient through the norm (detach_norm=False), not PEFT's")
  p.add_argument("--steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=128)
  p.add_argument("--lr", type=float, default=2e-4)
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--weight-decay", type=float, default=0.0)
  p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip (0: off)")
  p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  p.add_argument("--attn", choices=["xla", "cudnn"], default=None,
                 help="jax.nn.dot_product_attention implementation (default: JAX's choice)")
  p.add_argument("--eval-every", type=int, default=50, help="0: evaluate at the end only")
  p.add_argument("--eval-batches", type=int, default=4)
  p.add_argument("--eval-fraction", type=float, default=0.1)
  p.add_argument("--ckpt-dir", type=Path, help="Orbax checkpoints of adapters + optimizer")
  p.add_argument("--save-every", type=int, default=100)
  p.add_argument("--resume", action="store_true", help="continue from the latest --ckpt-dir step")
  p.add_argument("--out", type=Path, help="PEFT adapter directory written at the end")
  p.add_argument("--merged-out", type=Path, help="also write the merged model (HF checkpoint)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  dtype = DTYPES[args.dtype]
  if args.init_random and not (args.checkpoint / "config.json").exists():
    make_random_checkpoint(args.checkpoint, args.init_random, args.layers, dtype, args.seed)
  t0 = time.perf_counter()
  model = load_hf_llama(args.checkpoint, dtype=dtype, attn_implementation=args.attn)
  cfg = model.config
  print(f"loaded {args.checkpoint} ({cfg.model_type}, {cfg.num_hidden_layers} layers, hidden "
        f"{cfg.hidden_size}, vocab {cfg.vocab_size}, {args.dtype}) in "
        f"{time.perf_counter() - t0:.1f}s")

  tokenizer = Tokenizer(args.checkpoint, cfg.vocab_size, args.byte_level)
  tokens = tokenizer.encode(read_texts(args.data, args.text_field))
  if tokens.size and int(tokens.max()) >= cfg.vocab_size:
    raise SystemExit(f"token id {int(tokens.max())} >= vocab_size {cfg.vocab_size}")
  train_data, held_out = split_tokens(tokens, args.seq, args.eval_fraction)
  print(f"data: {len(tokens):,} tokens ({tokenizer.name}); train {len(train_data):,}, "
        f"held-out {len(held_out):,}")
  eval_rng = np.random.default_rng(args.seed + 1)
  eval_batches = [sample_batch(eval_rng, held_out, args.batch, args.seq)
                  for _ in range(args.eval_batches)]

  frozen = lambda: sum(int(x.nbytes) for x in jax.tree.leaves(
      nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))))
  float_bytes = frozen()
  dora_jax.apply_dora(model, targets=args.targets, rank=args.rank, alpha=args.alpha,
                      dropout=args.dropout,
                      rngs=nnx.Rngs(params=args.seed + 2, dropout=args.seed + 3),
                      base_dtype=args.base_dtype, block_size=args.block_size,
                      detach_norm=not args.exact_grad)
  if args.base_dtype is None:  # quantized kernels carry their ‖Ŵ‖² already
    dora_jax.cache_base_norms(model)  # the base kernels stay frozen: ‖W‖² once, not per step
  else:
    print(f"QDoRA: {args.base_dtype} base; frozen weights {float_bytes / 2**20:.2f} MiB -> "
          f"{frozen() / 2**20:.2f} MiB (measured)")
  dora_jax.print_trainable_parameters(model, verbose=False)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, args.lr, min(args.warmup, max(args.steps - 1, 0)), max(args.steps, 1), 0.1 * args.lr)
  tx = optax.adamw(schedule, weight_decay=args.weight_decay)
  if args.clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(args.clip), tx)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

  start_step = 0
  if args.resume and args.ckpt_dir and (latest := latest_checkpoint(args.ckpt_dir)):
    start_step, path = latest
    dora_jax.restore_adapter_state(model, path, optimizer)
    print(f"resumed from {path} (step {start_step})")

  eval_every = args.eval_every if args.eval_every > 0 else None
  first_eval = evaluate(model, eval_batches)
  print(f"step {start_step}: held-out loss {first_eval:.4f}")
  model.train()
  times, loss, evals = [], float("nan"), [(start_step, first_eval)]
  bar = tqdm(range(start_step, args.steps), desc="DoRA", ncols=90, mininterval=1.0,
             file=sys.stdout)
  for step in bar:
    batch = sample_batch(np.random.default_rng([args.seed, step]), train_data, args.batch,
                         args.seq)
    t = time.perf_counter()
    loss = float(train_step(model, optimizer, jnp.asarray(batch)))  # float() waits for it
    times.append(time.perf_counter() - t)
    bar.set_postfix(loss=f"{loss:.3f}")
    done = step + 1
    if eval_every and done % eval_every == 0 and done < args.steps:
      evals.append((done, evaluate(model, eval_batches)))
      bar.write(f"step {done}: held-out loss {evals[-1][1]:.4f}")
    if args.ckpt_dir and (done % args.save_every == 0 or done == args.steps):
      dora_jax.save_adapter_state(model, args.ckpt_dir / f"step_{done}", optimizer,
                                  overwrite=True)
  bar.close()
  final_eval = evaluate(model, eval_batches)
  evals.append((args.steps, final_eval))
  steady = times[1:] if len(times) > 1 else times  # the first step compiles
  step_ms = 1e3 * float(np.median(steady)) if steady else float("nan")
  tokens_per_s = args.batch * args.seq / (step_ms / 1e3) if steady else float("nan")
  print(f"held-out loss {first_eval:.4f} -> {final_eval:.4f} after {args.steps} steps; "
        f"last train loss {loss:.4f}")
  if steady:
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = (f"; peak device memory {stats['peak_bytes_in_use'] / 2**20:,.0f} MiB"
            if "peak_bytes_in_use" in stats else "")
    print(f"step time: median {step_ms:.2f} ms over {len(steady)} steps (first step, with "
          f"compilation, {1e3 * times[0]:.0f} ms); {tokens_per_s:,.0f} tokens/s{peak}")
  if args.out:
    dora_jax.save_adapter(model, args.out, base_model_name_or_path=str(args.checkpoint),
                          task_type="CAUSAL_LM")
    print(f"PEFT adapter saved to {args.out}")
  if args.merged_out:
    save_hf_llama(dora_jax.merge(model), args.merged_out)
    print(f"merged model saved to {args.merged_out}")
  return {"evals": evals, "step_ms": step_ms, "final_loss": loss}


if __name__ == "__main__":
  main()

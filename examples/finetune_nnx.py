"""DoRA fine-tuning of a small byte-level transformer in Flax NNX, end to end on a CPU.

1. Pretrain a tiny decoder-only transformer on Python's standard library
   sources (the top-level modules), briefly.
2. Add DoRA adapters to the attention (``LinearGeneral``/``Einsum``) and MLP
   (``Linear``) projections with :func:`dora_jax.apply_dora`.
3. Fine-tune only the adapters (``nnx.Optimizer(..., wrt=nnx.LoRAParam)``, AdamW)
   on a different slice: the ``email`` package.
4. Compare the held-out loss on that slice before and after, merge the adapters
   into plain layers, check the merged and the cached-norm unmerged models
   agree, and generate text from the merged model with a jitted sampler.

Run:  python examples/finetune_nnx.py   (about two minutes on 2 idle CPU cores)
"""

from __future__ import annotations

import argparse
import glob
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

import dora_jax

# ---------------------------------------------------------------------------
# Data: bytes of the standard library's sources (offline, always present)
# ---------------------------------------------------------------------------


def read_bytes(paths: list[str], limit: int) -> np.ndarray:
  chunks, total = [], 0
  for path in sorted(paths):
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(np.frombuffer(data + b"\n\n", np.uint8))
    total += len(data)
    if total >= limit:
      break
  return np.concatenate(chunks)


def stdlib_slices(pretrain_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(pretraining text, fine-tuning text, fine-tuning held-out text)."""
  lib = os.path.dirname(os.__file__)
  pretrain = read_bytes(glob.glob(os.path.join(lib, "*.py")), pretrain_bytes)
  email = read_bytes(glob.glob(os.path.join(lib, "email", "*.py")), 1 << 30)
  cut = int(0.85 * len(email))
  return pretrain, email[:cut], email[cut:]


def sample_batch(rng: np.random.Generator, data: np.ndarray, batch: int, seq: int) -> np.ndarray:
  starts = rng.integers(0, len(data) - seq - 1, size=batch)
  return np.stack([data[s:s + seq + 1] for s in starts]).astype(np.int32)


def fixed_batches(data: np.ndarray, n: int, batch: int, seq: int, seed: int) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [sample_batch(rng, data, batch, seq) for _ in range(n)]


# ---------------------------------------------------------------------------
# Model: a tiny GPT; q/k/v are LinearGeneral, o is an Einsum, the MLP is Linear
# ---------------------------------------------------------------------------


class Block(nnx.Module):
  def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
    hd = d // heads
    self.ln1 = nnx.LayerNorm(d, rngs=rngs)
    self.q_proj = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.k_proj = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.v_proj = nnx.LinearGeneral(d, (heads, hd), use_bias=False, rngs=rngs)
    self.o_proj = nnx.Einsum("bthk,hkd->btd", (heads, hd, d), (d,), rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, rngs=rngs)
    self.up_proj = nnx.Linear(d, 4 * d, rngs=rngs)
    self.down_proj = nnx.Linear(4 * d, d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.ln1(x)
    q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)          # [B, T, H, hd]
    t = x.shape[1]
    logits = jnp.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    causal = jnp.tril(jnp.ones((t, t), bool))
    logits = jnp.where(causal, logits, -1e9)
    att = jnp.einsum("bhts,bshk->bthk", jax.nn.softmax(logits, axis=-1), v)
    x = x + self.o_proj(att)
    return x + self.down_proj(jax.nn.gelu(self.up_proj(self.ln2(x))))


class TinyGPT(nnx.Module):
  def __init__(self, *, d: int = 128, heads: int = 4, layers: int = 3, seq: int = 128,
               rngs: nnx.Rngs):
    self.embed = nnx.Embed(256, d, rngs=rngs)
    self.pos = nnx.Param(0.02 * jax.random.normal(rngs.params(), (seq, d)))
    self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
    self.ln_f = nnx.LayerNorm(d, rngs=rngs)
    self.head = nnx.Linear(d, 256, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    x = self.embed(tokens) + self.pos[: tokens.shape[1]]
    for block in self.blocks:
      x = block(x)
    return self.head(self.ln_f(x))


def loss_fn(model: nnx.Module, batch: jax.Array) -> jax.Array:
  logits = model(batch[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


@nnx.jit
def eval_step(model, batch):
  return loss_fn(model, batch)


def evaluate(model, batches) -> float:
  return float(np.mean([float(eval_step(model, jnp.asarray(b))) for b in batches]))


# ---------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------


@nnx.jit
def pretrain_step(model, optimizer, batch):
  loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def dora_step(model, optimizer, batch):
  # Differentiate the adapters only: no cotangent is computed for frozen kernels.
  diff = nnx.DiffState(0, nnx.LoRAParam)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, batch)
  optimizer.update(model, grads)
  return loss


def train(step, model, optimizer, data, *, steps, batch, seq, seed, desc):
  rng = np.random.default_rng(seed)
  bar = tqdm(range(steps), desc=desc, ncols=90, mininterval=1.0)
  ema = None
  for _ in bar:
    loss = float(step(model, optimizer, jnp.asarray(sample_batch(rng, data, batch, seq))))
    ema = loss if ema is None else 0.95 * ema + 0.05 * loss
    bar.set_postfix(loss=f"{ema:.3f}")
  return ema


# ---------------------------------------------------------------------------
# Generation: a jitted sampler over a fixed window (no KV cache; tiny model)
# ---------------------------------------------------------------------------


def make_sampler(model: nnx.Module, seq: int, new_tokens: int, temperature: float):
  graphdef, state = nnx.split(model)

  @jax.jit
  def sample(state, prompt, key):
    m = nnx.merge(graphdef, state)
    n = prompt.shape[0]
    buf = jnp.zeros((1, seq), jnp.int32).at[0, :n].set(prompt)

    def body(i, carry):
      buf, key = carry
      pos = n + i
      logits = m(buf)[0, pos - 1] / temperature
      key, sub = jax.random.split(key)
      tok = jax.random.categorical(sub, logits).astype(jnp.int32)
      return buf.at[0, pos].set(tok), key

    buf, _ = jax.lax.fori_loop(0, new_tokens, body, (buf, key))
    return buf[0]

  return lambda prompt, key: sample(state, prompt, key)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain-steps", type=int, default=300)
  parser.add_argument("--finetune-steps", type=int, default=150)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=16.0)
  parser.add_argument("--dropout", type=float, default=0.0)
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  t_start = time.time()

  pretrain, tune, held_out = stdlib_slices(pretrain_bytes=2_000_000)
  print(f"data: pretrain {len(pretrain):,} bytes (stdlib top-level modules), "
        f"fine-tune {len(tune):,} / held-out {len(held_out):,} bytes (email package)")
  eval_tune = fixed_batches(held_out, 8, args.batch, args.seq, seed=1)
  eval_pre = fixed_batches(pretrain, 8, args.batch, args.seq, seed=2)

  model = TinyGPT(seq=args.seq, layers=args.layers, rngs=nnx.Rngs(args.seed))
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, 3e-3, min(50, args.pretrain_steps // 4), max(args.pretrain_steps, 1), 3e-4)
  optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=0.01), wrt=nnx.Param)
  train(pretrain_step, model, optimizer, pretrain, steps=args.pretrain_steps,
        batch=args.batch, seq=args.seq, seed=args.seed, desc="pretrain")
  base_tune, base_pre = evaluate(model, eval_tune), evaluate(model, eval_pre)
  print(f"pretrained: held-out loss on email/ {base_tune:.4f} | on pretraining text "
        f"{base_pre:.4f} (nats/byte)")

  dora_jax.apply_dora(model, targets=r"blocks/\d+/(q|k|v|o|up|down)_proj", rank=args.rank,
                      alpha=args.alpha, dropout=args.dropout,
                      rngs=nnx.Rngs(params=args.seed + 1, dropout=args.seed + 2))
  dora_jax.print_trainable_parameters(model, verbose=False)
  print(f"adapted at init: held-out loss {evaluate(model, eval_tune):.4f} "
        "(the base model's, up to rounding)")

  optimizer = nnx.Optimizer(model, optax.adamw(2e-3, weight_decay=0.0), wrt=nnx.LoRAParam)
  model.train()
  train(dora_step, model, optimizer, tune, steps=args.finetune_steps, batch=args.batch,
        seq=args.seq, seed=args.seed + 3, desc="DoRA fine-tune")
  model.eval()
  tuned_tune, tuned_pre = evaluate(model, eval_tune), evaluate(model, eval_pre)
  print(f"fine-tuned: held-out loss on email/ {base_tune:.4f} -> {tuned_tune:.4f} "
        f"({tuned_tune - base_tune:+.4f}) | on pretraining text {base_pre:.4f} -> "
        f"{tuned_pre:.4f}")

  merged = dora_jax.merge(model)  # plain Linear/LinearGeneral/Einsum layers
  merged_tune = evaluate(merged, eval_tune)
  dora_jax.freeze_scales(model)   # unmerged inference, norm computed once per layer
  cached_tune = evaluate(model, eval_tune)
  print(f"merged model: held-out loss {merged_tune:.4f}; unmerged with cached norms "
        f"{cached_tune:.4f}")
  assert tuned_tune < base_tune, "fine-tuning did not lower the held-out loss"
  assert abs(merged_tune - tuned_tune) < 1e-3 and abs(cached_tune - tuned_tune) < 1e-3

  sample = make_sampler(merged, args.seq, new_tokens=80, temperature=0.7)
  prompt = jnp.asarray(np.frombuffer(b"from email.message import ", np.uint8).astype(np.int32))
  out = np.asarray(sample(prompt, jax.random.key(args.seed)))
  text = bytes(out[: len(prompt) + 80].astype(np.uint8)).decode("utf-8", errors="replace")
  print("sample from the merged model:\n" + "-" * 60 + f"\n{text}\n" + "-" * 60)
  print(f"total time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
  main()

"""DoRA fine-tuning of an existing Flax Linen model without editing its code.

A small byte-level MLP language model (a window of previous bytes -> the next
byte) written with plain ``nn.Dense`` is pretrained briefly on Python's
standard-library sources, then adapted with :func:`dora_jax.linen.intercept_dora`:
inside the context every matching ``nn.Dense`` runs as a DoRA layer whose
adapters live in the ``dora`` collection. Only that collection is trained
(optax AdamW); the ``params`` stay frozen by construction. Finally the adapters
are merged into plain ``params`` with :func:`dora_jax.linen.merge_params` and the
unmodified model is evaluated with them.

Run:  python examples/finetune_linen.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import glob
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from dora_jax.linen import intercept_dora, merge_params


def read_bytes(paths, limit):
  chunks, total = [], 0
  for path in sorted(paths):
    with open(path, "rb") as f:
      data = f.read()
    chunks.append(np.frombuffer(data + b"\n\n", np.uint8))
    total += len(data)
    if total >= limit:
      break
  return np.concatenate(chunks)


class ByteMLP(nn.Module):
  """Predicts byte t from the ``context`` bytes before it (plain Linen, no DoRA inside)."""

  context: int = 16
  embed: int = 32
  hidden: int = 256

  @nn.compact
  def __call__(self, window):                        # [B, context] int32
    x = nn.Embed(256, self.embed)(window).reshape(window.shape[0], -1)
    x = nn.gelu(nn.Dense(self.hidden, name="fc1")(x))
    x = nn.gelu(nn.Dense(self.hidden, name="fc2")(x))
    return nn.Dense(256, name="out")(x)


def batches(data, rng, batch, context):
  starts = rng.integers(0, len(data) - context - 1, size=batch)
  windows = np.stack([data[s:s + context + 1] for s in starts]).astype(np.int32)
  return jnp.asarray(windows[:, :-1]), jnp.asarray(windows[:, 1:].copy()[:, -1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--pretrain-steps", type=int, default=600)
  parser.add_argument("--finetune-steps", type=int, default=400)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--alpha", type=float, default=16.0)
  args = parser.parse_args()
  t_start = time.time()

  lib = os.path.dirname(os.__file__)
  pretrain = read_bytes(glob.glob(os.path.join(lib, "*.py")), 2_000_000)
  email = read_bytes(glob.glob(os.path.join(lib, "email", "*.py")), 1 << 30)
  tune, held_out = email[: int(0.85 * len(email))], email[int(0.85 * len(email)):]
  model = ByteMLP()
  rng = np.random.default_rng(0)
  eval_set = [batches(held_out, np.random.default_rng(1), 512, model.context) for _ in range(4)]

  def loss(variables, x, y):
    logits = model.apply(variables, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def evaluate(variables):
    return float(np.mean([float(jax.jit(loss)(variables, x, y)) for x, y in eval_set]))

  # 1. Pretrain all params.
  params = model.init(jax.random.key(0), eval_set[0][0])["params"]
  tx = optax.adamw(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def pretrain_step(params, opt_state, x, y):
    value, grads = jax.value_and_grad(lambda p: loss({"params": p}, x, y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  for _ in tqdm(range(args.pretrain_steps), desc="pretrain", ncols=80, mininterval=1.0):
    params, opt_state, _ = pretrain_step(params, opt_state, *batches(pretrain, rng, 128,
                                                                    model.context))
  before = evaluate({"params": params})
  print(f"pretrained: held-out loss on email/ {before:.4f} nats/byte")

  # 2. DoRA on the hidden layers of the unmodified model, adapters in "dora".
  dora = intercept_dora(r"fc1|fc2", rank=args.rank, alpha=args.alpha)
  with dora:
    _, adapters = model.apply({"params": params}, eval_set[0][0],
                              rngs={"params": jax.random.key(1)}, mutable=["dora"])
    adapters = adapters["dora"]
    n_adapter = sum(a.size for a in jax.tree.leaves(adapters))
    n_base = sum(a.size for a in jax.tree.leaves(params))
    print(f"adapters: {n_adapter:,} trainable of {n_adapter + n_base:,} "
          f"({100 * n_adapter / (n_adapter + n_base):.2f}%) in layers {sorted(adapters)}")
    print(f"adapted at init: held-out loss {evaluate({'params': params, 'dora': adapters}):.4f}")

    tx = optax.adamw(3e-3, weight_decay=0.0)
    opt_state = tx.init(adapters)

    @jax.jit
    def dora_step(adapters, opt_state, x, y):
      # Gradients of the "dora" collection only; the params are constants.
      value, grads = jax.value_and_grad(
          lambda ad: loss({"params": params, "dora": ad}, x, y))(adapters)
      updates, opt_state = tx.update(grads, opt_state, adapters)
      return optax.apply_updates(adapters, updates), opt_state, value

    for _ in tqdm(range(args.finetune_steps), desc="DoRA fine-tune", ncols=80, mininterval=1.0):
      adapters, opt_state, _ = dora_step(adapters, opt_state, *batches(tune, rng, 128,
                                                                      model.context))
    after = evaluate({"params": params, "dora": adapters})
  print(f"fine-tuned: held-out loss on email/ {before:.4f} -> {after:.4f} ({after - before:+.4f})")

  # 3. Merge into plain params and evaluate the unmodified model (no interception).
  merged = merge_params({"params": params}, {"dora": adapters}, alpha=args.alpha)
  merged_loss = evaluate(merged)
  print(f"merged params, plain nn.Dense model: held-out loss {merged_loss:.4f}")
  assert after < before and abs(merged_loss - after) < 1e-3
  print(f"total time {time.time() - t_start:.0f} s")


if __name__ == "__main__":
  main()

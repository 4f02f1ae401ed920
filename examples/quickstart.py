"""Quick start: DoRA on a small Flax NNX model, adapter-only training with optax.

  python examples/quickstart.py

Builds a 2-layer MLP, "pretrains" it on one regression task, then adds DoRA
adapters to both Linear layers and fine-tunes only the adapters on a shifted
task. Prints the loss, checks that the frozen kernels did not move, and merges
the adapters into plain Linear layers for serving.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dora_jax


def make_task(key, w_true, n=512):
  x = jax.random.normal(key, (n, w_true.shape[0]))
  return x, jnp.tanh(x @ w_true)


def train(model, x, y, *, steps, lr, wrt, log_every=0):
  optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss

  for i in range(steps):
    loss = step(model, optimizer, x, y)
    if log_every and (i % log_every == 0 or i == steps - 1):
      print(f"  step {i:4d}  loss {float(loss):.5f}")
  return float(loss)


def main():
  keys = jax.random.split(jax.random.key(0), 5)
  d = 32
  model = nnx.Sequential(nnx.Linear(d, 128, rngs=nnx.Rngs(0)), nnx.gelu,
                         nnx.Linear(128, d, rngs=nnx.Rngs(1)))

  w_pre = jax.random.normal(keys[0], (d, d)) / np.sqrt(d)
  x, y = make_task(keys[1], w_pre)
  print("pretraining the base model (all parameters)")
  pre_loss = train(model, x, y, steps=300, lr=3e-3, wrt=nnx.Param)
  print(f"  pretraining loss {pre_loss:.5f}")

  # A related task: the base model is a good start, not a solution.
  w_new = w_pre + 0.3 * jax.random.normal(keys[2], (d, d)) / np.sqrt(d)
  x_new, y_new = make_task(keys[3], w_new)
  base_loss = float(jnp.mean((model(x_new) - y_new) ** 2))

  dora_jax.apply_dora(model, targets=r"layers/\d+", rank=8, alpha=16, rngs=nnx.Rngs(2))
  dora_jax.print_trainable_parameters(model)
  kernels_before = [np.asarray(layer.kernel[...]) for layer in
                    (model.layers[0], model.layers[2])]
  print(f"fine-tuning the DoRA adapters only (loss of the base model: {base_loss:.5f})")
  final = train(model, x_new, y_new, steps=200, lr=3e-3, wrt=nnx.LoRAParam, log_every=25)

  for before, layer in zip(kernels_before, (model.layers[0], model.layers[2])):
    assert np.array_equal(before, np.asarray(layer.kernel[...])), "base kernel moved"
  merged = dora_jax.merge(model)
  gap = float(jnp.max(jnp.abs(merged(x_new) - model(x_new))))
  print(f"loss {base_loss:.5f} -> {final:.5f}; frozen kernels unchanged; "
        f"merged model max |diff| = {gap:.2e}")


if __name__ == "__main__":
  main()

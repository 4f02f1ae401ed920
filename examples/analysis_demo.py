"""Weight-decomposition analysis of a small real fine-tune: full FT vs LoRA vs DoRA.

Pre-trains a 6-layer NNX MLP on a toy regression, fine-tunes it on a related
task three ways (all kernels; LoRA; DoRA, both rank 4 on every kernel), saves
checkpoints at several steps (Orbax directories for FT and LoRA, .safetensors
for DoRA), then runs ``python -m dora_jax.analysis`` on each method and draws
the three panels side by side (``docs/analysis_example.png`` by default)::

  python examples/analysis_demo.py [--work DIR] [--png PATH] [--steps 400]

Runs on the CPU in well under a minute.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dora_jax
from dora_jax import analysis
from dora_jax.analysis import checkpoints, plot

WIDTHS = (16, 64, 64, 64, 64, 64, 8)
RANK = 4
SCALE = 1.0  # s = alpha / r with alpha = r: nnx.LoRALinear has no alpha, its scale is 1


class Mlp(nnx.Module):
  """``layers/i`` Dense layers with tanh in between."""

  def __init__(self, rngs: nnx.Rngs):
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(WIDTHS[:-1], WIDTHS[1:])])

  def __call__(self, x):
    for layer in self.layers[:-1]:
      x = jnp.tanh(layer(x))
    return self.layers[-1](x)


def adapt(model: Mlp, method: str, rngs: nnx.Rngs) -> Mlp:
  """LoRA (``nnx.LoRALinear``, scale 1) or DoRA (:func:`dora_jax.apply_dora`) on every layer."""
  if method == "dora":
    return dora_jax.apply_dora(model, targets=r"layers/\d+", rank=RANK, alpha=RANK * SCALE,
                               rngs=rngs)
  for i, base in enumerate(model.layers):
    d_in, d_out = base.kernel.shape
    layer = nnx.LoRALinear(d_in, d_out, lora_rank=RANK, rngs=rngs)
    layer.kernel[...] = base.kernel[...]
    layer.bias[...] = base.bias[...]
    model.layers[i] = layer
  return model


def teacher(key, shift: float):
  """A random tanh MLP ``x [N, 16] -> y [N, 8]``; ``shift`` perturbs it for the new task."""
  keys = jax.random.split(key, 2 * len(WIDTHS))
  ws = [jax.random.normal(keys[i], (a, b)) / np.sqrt(a) for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:]))]
  ws = [w + shift * jax.random.normal(keys[len(WIDTHS) + i], w.shape) / np.sqrt(w.shape[0])
        for i, w in enumerate(ws)]

  def f(x):
    for w in ws[:-1]:
      x = jnp.tanh(x @ w)
    return x @ ws[-1]

  return f


def train(model: Mlp, x, y, *, steps: int, lr: float, wrt, every: int = 0, save=None) -> float:
  """Adam on mean squared error; ``save(step, model)`` every ``every`` steps."""
  optimizer = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      return jnp.mean(jnp.square(model(xb) - yb))

    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
    optimizer.update(model, grads)
    return loss

  rng = np.random.default_rng(0)
  loss = float("nan")
  for t in range(1, steps + 1):
    idx = rng.integers(0, x.shape[0], 256)
    loss = float(step(model, optimizer, x[idx], y[idx]))
    if every and t % every == 0:
      save(t, model)
  return loss


def save_orbax(path: str, model: nnx.Module) -> None:
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.path.abspath(path), nnx.state(model, nnx.Param))
  ckpt.wait_until_finished()


def save_safetensors(path: str, model: nnx.Module) -> None:
  from safetensors.numpy import save_file

  flat = analysis.flatten_params(nnx.state(model, nnx.Param))
  save_file({k.replace("/", "."): np.asarray(v) for k, v in flat.items()}, path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work", default=None, help="checkpoint/output directory (default: a temp dir)")
  parser.add_argument("--png", default=os.path.normpath(os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "..", "docs", "analysis_example.png")))
  parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps per method")
  parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints per method")
  args = parser.parse_args(argv)
  work = args.work or tempfile.mkdtemp(prefix="dora_analysis_")
  os.makedirs(work, exist_ok=True)

  key_x, key_t = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (4096, WIDTHS[0]))
  y_pre, y_new = teacher(key_t, 0.0)(x), teacher(key_t, 0.6)(x)

  model = Mlp(nnx.Rngs(0))
  loss = train(model, x, y_pre, steps=1500, lr=3e-3, wrt=nnx.Param)
  print(f"pre-training loss {loss:.4f}")
  base = os.path.join(work, "base")
  save_orbax(base, model)
  pretrained = nnx.state(model)

  every = args.steps // args.checkpoints
  methods = {"FT": ("ft", nnx.Param, 1e-3), "LoRA": ("lora", nnx.LoRAParam, 3e-3),
             "DoRA": ("dora", nnx.LoRAParam, 3e-3)}
  groups = {}
  for title, (method, wrt, lr) in methods.items():
    tuned = Mlp(nnx.Rngs(0))
    nnx.update(tuned, pretrained)
    if method != "ft":
      tuned = adapt(tuned, method, nnx.Rngs(1))
    paths = []

    def save(step, model, method=method, paths=paths):
      path = os.path.join(work, method, f"step_{step}")
      if method == "dora":
        path += ".safetensors"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_safetensors(path, model)
      else:
        save_orbax(path, model)
      paths.append(path)

    loss = train(tuned, x, y_new, steps=args.steps, lr=lr, wrt=wrt, every=every, save=save)
    print(f"{title}: fine-tuning loss {loss:.4f}")
    out = os.path.join(work, f"{method}_analysis")
    cmd = [sys.executable, "-m", "dora_jax.analysis", base, *paths, "--layers", r"kernel$",
           "--out", out, "--title", title]
    if method != "ft":
      cmd += ["--scale", str(SCALE)]
    print("$ " + " ".join(cmd[1:]))
    subprocess.run(cmd, check=True)
    groups[title] = [row for path in paths
                     for row in analysis.compare(checkpoints.load(base), checkpoints.load(path),
                                                 layers=r"kernel$", scale=SCALE,
                                                 checkpoint=checkpoints.label(path))]
  print("wrote", plot.scatter_panels(groups, args.png))


if __name__ == "__main__":
  main()

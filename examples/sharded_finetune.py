"""Fine-tune a small NNX model with DoRA on a device mesh (FSDP × tensor parallel).

The mesh shape comes from the device count: ``(fsdp, tp) = (N/2, 2)`` for an
even N (8 devices: 4 × 2; 2 GPUs: 1 × 2), else ``(N, 1)``. Each residual MLP
block has a column-parallel up-projection (kernel ``P('fsdp', 'tp')``) and a
row-parallel down-projection (kernel ``P('tp', 'fsdp')``); the DoRA adapters
follow their kernels (:func:`dora_jax.sharding.shard_model`), the batch is
split over ``fsdp``.

The base model is random ("pretrained"); the targets come from a teacher that
is the base model with every kernel nudged by a random low-rank update, so
the adapters have something to learn.

On a CPU, simulate 8 devices::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/sharded_finetune.py

Prints the mesh, the adapter shardings of one layer, the loss per step and
the median step time (the first step, which compiles, excluded).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import dora_jax
from dora_jax import sharding as dsh

BATCH = P("fsdp", None, None)  # activations [batch, seq, features]: batch over fsdp


class Block(nnx.Module):
  """``x + down(gelu(up(norm(x))))``: up column-parallel, down row-parallel."""

  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.norm = nnx.LayerNorm(d_model, rngs=rngs)
    self.up = nnx.Linear(d_model, d_ff, rngs=rngs,
                         kernel_init=nnx.with_partitioning(init, ("fsdp", "tp")),
                         bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("tp",)))
    self.down = nnx.Linear(d_ff, d_model, rngs=rngs,
                           kernel_init=nnx.with_partitioning(init, ("tp", "fsdp")))

  def __call__(self, x):
    h = nnx.gelu(self.up(self.norm(x)))
    return jax.lax.with_sharding_constraint(x + self.down(h), BATCH)


class Model(nnx.Module):
  def __init__(self, d_model: int, d_ff: int, depth: int, *, rngs: nnx.Rngs):
    self.blocks = nnx.List([Block(d_model, d_ff, rngs=rngs) for _ in range(depth)])

  def __call__(self, x):
    x = jax.lax.with_sharding_constraint(x, BATCH)
    for block in self.blocks:
      x = block(x)
    return x


def mesh_for(n_devices: int):
  tp = 2 if n_devices % 2 == 0 else 1
  return dsh.make_mesh((n_devices // tp, tp), ("fsdp", "tp"))


def nudge_kernels(model: nnx.Module, key: jax.Array, rank: int = 4, size: float = 0.5) -> None:
  """Add a random rank-``rank`` update to every kernel (the teacher's weights)."""
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == "kernel":
      key, ka, kb = jax.random.split(key, 3)
      d_in, d_out = var.shape
      u = jax.random.normal(ka, (d_in, rank)) / jnp.sqrt(d_in)
      v = jax.random.normal(kb, (rank, d_out)) * size
      var[...] = var[...] + (u @ v).astype(var.dtype)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--d-model", type=int, default=256)
  parser.add_argument("--d-ff", type=int, default=1024)
  parser.add_argument("--depth", type=int, default=2)
  parser.add_argument("--rank", type=int, default=8)
  parser.add_argument("--batch", type=int, default=32, help="global batch (split over fsdp)")
  parser.add_argument("--seq", type=int, default=16)
  parser.add_argument("--lr", type=float, default=3e-3)
  args = parser.parse_args()

  mesh = mesh_for(jax.device_count())
  print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"mesh {dict(mesh.shape)}")

  with jax.set_mesh(mesh):
    teacher = Model(args.d_model, args.d_ff, args.depth, rngs=nnx.Rngs(0))
    model = Model(args.d_model, args.d_ff, args.depth, rngs=nnx.Rngs(0))  # same base weights
  nudge_kernels(teacher, jax.random.key(1))

  dora_jax.apply_dora(model, targets=r"blocks/\d+/(up|down)", rank=args.rank,
                      alpha=2 * args.rank, rngs=nnx.Rngs(2))
  dsh.shard_model(model, mesh)
  optimizer = dsh.shard_state(
      nnx.Optimizer(model, optax.adamw(args.lr), wrt=nnx.LoRAParam), mesh)
  dora_jax.print_trainable_parameters(model, verbose=False)
  up = model.blocks[0].up
  print("blocks/0/up: " + ", ".join(
      f"{name} {getattr(up, name)[...].sharding.spec}"
      for name in ("kernel", "lora_a", "lora_b", "magnitude")))
  down = model.blocks[0].down
  print("blocks/0/down: " + ", ".join(
      f"{name} {getattr(down, name)[...].sharding.spec}"
      for name in ("kernel", "lora_a", "lora_b", "magnitude")))

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
    optimizer.update(model, grads)
    dsh.constrain(model)      # keep the adapters and the moments where shard_model put them
    dsh.constrain(optimizer)
    return loss

  teacher_fn = nnx.jit(lambda m, x: m(x))
  batch_sharding = NamedSharding(mesh, BATCH)
  times, losses = [], []
  with jax.set_mesh(mesh):
    for step in range(args.steps):
      x = jax.random.normal(jax.random.key(1000 + step), (args.batch, args.seq, args.d_model))
      x = jax.device_put(x, batch_sharding)
      y = teacher_fn(teacher, x)
      start = time.perf_counter()
      loss = float(train_step(model, optimizer, x, y))
      times.append(time.perf_counter() - start)
      losses.append(loss)
      print(f"step {step:3d}  loss {loss:.5f}  {1e3 * times[-1]:8.1f} ms")
  steady = times[1:] or times
  print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f}; median step time "
        f"{1e3 * statistics.median(steady):.1f} ms (first step, with compilation, "
        f"{1e3 * times[0]:.0f} ms)")


if __name__ == "__main__":
  main()

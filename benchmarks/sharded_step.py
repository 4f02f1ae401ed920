"""Sharded training step: DoRA with the kernels per shard, DoRA on XLA, and plain LoRA.

One decoder block's projections (Llama-style: hidden 4096, MLP 14336, GQA with
32 query and 8 key/value heads of 128), every projection adapted (rank 16 and
384), bf16, on FSDP and FSDP × TP meshes of all local devices. Per (mesh,
rank, implementation): the median of ``--timed`` step times (inputs rotated
over ``--inputs`` distinct random batches, never zeros; after ``--warmup``
steps) and the compiled program's peak memory per device. Results are written
as JSON to ``--out``/sharded_step.json.

Implementations: ``dora_kernels`` (``backend="auto"``: the fused kernels per
shard by :mod:`dora_jax.kernels.partition` where they apply), ``dora_xla``
(``backend="xla"``) and ``lora`` (``x·W + s·(x·a)·b`` in plain JAX).

``--smoke``: tiny shapes on whatever devices exist (8 simulated CPU devices in
the tests) and kernels forced (``backend="pallas"``, interpret mode off the GPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import dora_jax
from dora_jax import sharding as dsh


@dataclasses.dataclass(frozen=True)
class Config:
  """Shapes and run lengths."""

  hidden: int = 4096
  mlp: int = 14336
  heads: int = 32
  kv_heads: int = 8
  head_dim: int = 128
  tokens: int = 8192       # global tokens per step
  ranks: tuple[int, ...] = (16, 384)
  warmup: int = 3
  timed: int = 10
  inputs: int = 3
  kernels_backend: str = "auto"
  full_block: bool = True  # False: the q and o projections only (smoke runs)

  def projections(self) -> dict[str, tuple[int, int]]:
    """name -> (d_in, d_out) of the block's projections."""
    h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
    if not self.full_block:
      return {"q": (h, q), "o": (q, h)}
    return {"q": (h, q), "k": (h, kv), "v": (h, kv), "o": (q, h),
            "gate": (h, self.mlp), "up": (h, self.mlp), "down": (self.mlp, h)}


SMOKE = Config(hidden=64, mlp=128, heads=4, kv_heads=2, head_dim=16, tokens=64, ranks=(4,),
               warmup=1, timed=2, inputs=2, kernels_backend="pallas", full_block=False)

#: mesh name -> (axis names, kernel spec of an "in" (column-parallel) and an "out"
#: (row-parallel) projection under it).
MESHES = {
    "fsdp": (("fsdp",), P("fsdp", None), P("fsdp", None)),
    "fsdp_tp": (("fsdp", "tp"), P("fsdp", "tp"), P("tp", "fsdp")),
}
_OUT_PROJECTIONS = ("o", "down")


def _mesh(name: str):
  n = jax.device_count()
  shape = (n,) if name == "fsdp" else (max(n // 2, 1), 2 if n > 1 else 1)
  return dsh.make_mesh(shape, MESHES[name][0])


def _params(cfg: Config, rank: int, mesh, mesh_name: str, key):
  """Frozen kernels and trainable adapters, placed by the adapters' rules."""
  frozen, train = {}, {}
  for i, (name, (d_in, d_out)) in enumerate(cfg.projections().items()):
    spec = MESHES[mesh_name][2 if name in _OUT_PROJECTIONS else 1]
    specs = dsh.adapter_partition_specs(spec)
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
    w = jax.random.normal(k[0], (d_in, d_out), jnp.bfloat16) / math.sqrt(d_in)
    frozen[name] = put(w, spec)
    train[name] = {
        "lora_a": put(jax.random.normal(k[1], (d_in, rank), jnp.bfloat16) / math.sqrt(d_in),
                      specs["lora_a"]),
        "lora_b": put(0.01 * jax.random.normal(k[2], (rank, d_out), jnp.bfloat16),
                      specs["lora_b"]),
        "magnitude": put(jnp.linalg.norm(w.astype(jnp.float32), axis=0), specs["magnitude"])}
  return frozen, train


def _block(cfg: Config, impl: str, frozen, train, x):
  """Attention projections and the gated MLP (no attention mixing: projections only)."""
  def proj(name, v):
    a, b = train[name]["lora_a"], train[name]["lora_b"]
    if impl == "lora":
      return v @ frozen[name] + 2.0 * ((v @ a) @ b)
    backend = cfg.kernels_backend if impl == "dora_kernels" else "xla"
    return dora_jax.dora_dense(v, frozen[name], a, b, train[name]["magnitude"], 2.0,
                               backend=backend)

  if not cfg.full_block:
    return x + proj("o", proj("q", x))
  q, k, v = proj("q", x), proj("k", x), proj("v", x)
  mix = q + jnp.tile(k + v, (1, cfg.heads // cfg.kv_heads))
  h = x + proj("o", mix)
  return h + proj("down", jax.nn.silu(proj("gate", h)) * proj("up", h))


def _step_fn(cfg: Config, impl: str, tx, shardings):
  def step(train, opt_state, frozen, x):
    def loss_fn(train):
      return jnp.mean(jnp.square(_block(cfg, impl, frozen, train, x).astype(jnp.float32)))

    loss, grads = jax.value_and_grad(loss_fn)(train)
    updates, opt_state = tx.update(grads, opt_state, train)
    return loss, optax.apply_updates(train, updates), opt_state

  # the updated state keeps the layout it came in (GSPMD would choose its own)
  return jax.jit(step, donate_argnums=(0, 1), out_shardings=(None, *shardings))


def run_one(cfg: Config, mesh_name: str, rank: int, impl: str) -> dict:
  mesh = _mesh(mesh_name)
  key = jax.random.key(rank)
  frozen, train = _params(cfg, rank, mesh, mesh_name, key)
  batch = NamedSharding(mesh, P(MESHES[mesh_name][0][0], None))
  xs = [jax.device_put(jax.random.normal(jax.random.fold_in(key, 100 + i),
                                         (cfg.tokens, cfg.hidden), jnp.bfloat16), batch)
        for i in range(cfg.inputs)]
  tx = optax.adamw(1e-4)
  with jax.set_mesh(mesh):
    opt_state = tx.init(train)
    shardings = jax.tree.map(lambda v: v.sharding, (train, opt_state))
    compiled = _step_fn(cfg, impl, tx, shardings).lower(train, opt_state, frozen, xs[0]).compile()
    mem = compiled.memory_analysis()
    times = []
    for i in range(cfg.warmup + cfg.timed):
      start = time.perf_counter()
      loss, train, opt_state = compiled(train, opt_state, frozen, xs[i % cfg.inputs])
      loss.block_until_ready()
      if i >= cfg.warmup:
        times.append(1e3 * (time.perf_counter() - start))
  peak = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
          - mem.alias_size_in_bytes) if mem is not None else 0
  return {"mesh": mesh_name, "mesh_shape": dict(mesh.shape), "rank": rank, "impl": impl,
          "step_ms": times, "step_ms_median": statistics.median(times),
          "peak_bytes_per_device": int(peak), "loss": float(loss)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, required=True, help="folder for sharded_step.json")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, kernels forced")
  parser.add_argument("--meshes", nargs="+", default=list(MESHES), choices=list(MESHES))
  parser.add_argument("--impls", nargs="+", default=["dora_kernels", "dora_xla", "lora"],
                      choices=["dora_kernels", "dora_xla", "lora"])
  parser.add_argument("--timed", type=int, default=None, help="timed steps (median reported)")
  args = parser.parse_args(argv)
  cfg = SMOKE if args.smoke else Config()
  if args.timed is not None:
    if args.timed < 1:
      parser.error(f"--timed must be >= 1, got {args.timed}")
    cfg = dataclasses.replace(cfg, timed=args.timed)
  rows = []
  for mesh_name in args.meshes:
    for rank in cfg.ranks:
      for impl in args.impls:
        row = run_one(cfg, mesh_name, rank, impl)
        print(f"{mesh_name:8s} r={rank:<4d} {impl:13s} {row['step_ms_median']:9.2f} ms  "
              f"{row['peak_bytes_per_device'] / 2**20:9.1f} MiB/device")
        rows.append(row)
  result = {"config": dataclasses.asdict(cfg), "devices": [str(d) for d in jax.devices()],
            "results": rows}
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "sharded_step.json").write_text(json.dumps(result, indent=1))
  return result


if __name__ == "__main__":
  main()

"""The column-scaled GEMM: the Mosaic GPU kernel vs cuBLAS and XLA.

Times, per shape (bf16, T tokens, kernel ``[d_in, d_out]``):

* forward: ``x·W`` alone (cuBLAS, the floor), ``(x·W) ⊙ g`` through XLA (a GEMM
  plus an elementwise pass), and :func:`dora_jax.kernels.scaled_matmul.scaled_matmul`
  for a few tilings; with a rank-16/32 term: LoRA's ``x·W + h·b`` and DoRA's
  ``(x·W + h·b) ⊙ g`` through XLA vs the fused kernel;
* backward: ``dy·Wᵀ`` alone (cuBLAS), ``(dy ⊙ g)·Wᵀ`` through XLA, and the
  kernel with ``W`` read transposed (``trans_w``, the ``dx`` GEMM), unit scale.

Each kernel's output is checked against its ``*_reference`` twin (max error
relative to the largest output). Needs a Hopper GPU; rerun with

  python benchmarks/scaled_matmul.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import harness  # noqa: E402
from dora_jax.kernels import scaled_matmul as sm  # noqa: E402

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672))

FORWARD_TILINGS = {
    "n128x128s4": sm.Tiles(),
    "n128x128s3": sm.Tiles(stages=3),
    "n128x128s4w16": sm.Tiles(snake=16),
    "n128x128s4m": sm.Tiles(snake_dim=0),
}


def _rel_err(out, ref):
  out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref)))


def _inputs(tokens, d_in, d_out, sets, seed):
  keys = jax.random.split(jax.random.key(seed), 4 * sets)
  out = []
  for i in range(sets):
    k = keys[4 * i:4 * i + 4]
    x = jax.random.normal(k[0], (tokens, d_in), jnp.bfloat16)
    w = (jax.random.normal(k[1], (d_in, d_out), jnp.float32) / d_in ** 0.5).astype(jnp.bfloat16)
    g = jax.random.uniform(k[2], (d_out,), jnp.float32, 0.5, 1.5)
    dy = jax.random.normal(k[3], (tokens, d_out), jnp.bfloat16)
    out.append((x, w, g, dy))
  return out


def run(tokens, shapes, sets, calls, repeats, only_tilings=None):
  rows = []
  for d_in, d_out in shapes:
    data = _inputs(tokens, d_in, d_out, sets, seed=d_in + d_out)
    fwd_args = [(x, w, g) for x, w, g, _ in data]
    bwd_args = [(dy, w, g) for _, w, g, dy in data]
    row = dict(d_in=d_in, d_out=d_out, tokens=tokens, forward={}, backward={}, errors={})
    t = lambda fn, args: harness.time_jitted(fn, args, calls=calls, repeats=repeats)
    row["forward"]["cublas_xW"] = t(jax.jit(lambda x, w, g: x @ w), fwd_args)
    row["forward"]["xla_scaled"] = t(jax.jit(sm.scaled_matmul_reference), fwd_args)
    row["backward"]["cublas_dyWt"] = t(
        jax.jit(lambda dy, w, g: lax.dot_general(dy, w, (((1,), (1,)), ((), ())))), bwd_args)
    row["backward"]["xla_scaled"] = t(jax.jit(lambda dy, w, g: lax.dot_general(
        (dy.astype(jnp.float32) * g).astype(dy.dtype), w, (((1,), (1,)), ((), ())))), bwd_args)
    for name, tiles in FORWARD_TILINGS.items():
      if only_tilings and name not in only_tilings:
        continue
      if not sm.supported(tokens, d_out, d_in, tiles):
        continue
      fn = jax.jit(lambda x, w, g, tiles=tiles: sm.scaled_matmul(x, w, g, tiles=tiles))
      try:
        row["errors"]["fwd_" + name] = _rel_err(fn(*fwd_args[0]),
                                                 sm.scaled_matmul_reference(*fwd_args[0]))
        row["forward"][name] = t(fn, fwd_args)
      except Exception as e:  # noqa: BLE001 - report and go on to the next tiling
        row["errors"]["fwd_" + name] = f"{type(e).__name__}: {str(e)[:300]}"
    wt_args = [(dy, w, jnp.ones((d_in,), jnp.float32)) for dy, w, _ in bwd_args]  # w: [N, K]
    if sm.supported(tokens, d_in, d_out, sm.FORWARD_TILES):
      fn = jax.jit(lambda dy, w, ones: sm.scaled_matmul(dy, w, ones, trans_w=True))
      try:
        row["errors"]["bwd_trans_w"] = _rel_err(
            fn(*wt_args[0]), sm.scaled_matmul_reference(*wt_args[0], trans_w=True))
        row["backward"]["trans_w"] = t(fn, wt_args)
      except Exception as e:  # noqa: BLE001
        row["errors"]["bwd_trans_w"] = f"{type(e).__name__}: {str(e)[:300]}"
    for rank in (16, 32):
      lr = [(x, w, g, (x[:, :rank] * 0.1).astype(x.dtype), (w[:rank] * 3).astype(x.dtype))
            for x, w, g, _ in data]
      row["forward"][f"xla_lora_r{rank}"] = t(
          jax.jit(lambda x, w, g, h, b: x @ w + h @ b), lr)
      row["forward"][f"xla_dora_r{rank}"] = t(
          jax.jit(lambda x, w, g, h, b: sm.scaled_matmul_reference(x, w, g, (h, b))), lr)
      fn = jax.jit(lambda x, w, g, h, b: sm.scaled_matmul(x, w, g, (h, b)))
      try:
        row["errors"][f"fwd_fused_r{rank}"] = _rel_err(
            fn(*lr[0]), sm.scaled_matmul_reference(*lr[0][:3], lr[0][3:]))
        row["forward"][f"fused_r{rank}"] = t(fn, lr)
      except Exception as e:  # noqa: BLE001
        row["errors"][f"fwd_fused_r{rank}"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--shapes", default=",".join(f"{a}x{b}" for a, b in SHAPES))
  parser.add_argument("--tilings", default="", help="comma list of tiling names (default: all)")
  parser.add_argument("--sets", type=int, default=3, help="input sets rotated (L2)")
  parser.add_argument("--calls", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  start = time.time()
  rows = run(args.tokens, shapes, args.sets, args.calls, args.repeats,
             [s for s in args.tilings.split(",") if s] or None)
  os.makedirs(args.out, exist_ok=True)
  meta = dict(device=harness.device_description(), wall_s=round(time.time() - start, 1),
              forward_tilings={k: dataclasses.asdict(v) for k, v in FORWARD_TILINGS.items()})
  with open(os.path.join(args.out, "scaled_matmul.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

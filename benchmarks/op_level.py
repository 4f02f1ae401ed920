"""The op-level (native-layout) DoRA path against ``dora_dense``, and the exact gradient's cost.

  python benchmarks/op_level.py --out DIR            # GPU: bf16, T = 4096, r = 16 and 384
  python benchmarks/op_level.py --out DIR --cpu      # CPU: float32, T = 512, r = 16 and 128
  python benchmarks/op_level.py --out DIR --smoke    # tiny shapes, any machine

For each projection shape ``d_in × d_out`` the same DoRA layer is timed as

  dense          dora_dense on kernel [d_in, d_out] (backend "auto": the fused kernels on Hopper)
  dense_exact    the same with detach_norm=False (the exact gradient through the norm)
  native         dora_jax.general.dora_einsum("btd,ndh->btnh") on the kernel stored
                 [N, d_in, H] (N·H = d_out, H = 128): gemma's q_einsum layout, XLA path
  native_exact   the same with detach_norm=False (the exact gradient through the norm)
  lora           plain JAX LoRA in the dense layout (the floor)

forward+backward of ``Σ y ⊙ cot`` with respect to x and the adapters (``‖W‖²``
cached where the path takes it), median of ``harness.time_jitted`` batches,
inputs rotated. Writes ``DIR/op_level.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
import dora_jax  # noqa: E402
from dora_jax import general  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336)]
RANKS = [16, 384]
HEAD = 128


def _grads(fn):
  # the frozen weights are arguments, as in a model (closed over, they would be
  # compile-time constants XLA may transform ahead of time)
  def loss(x, p, frozen, cot):
    return jnp.sum((fn(x, p, frozen) * cot).astype(jnp.float32))
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def run(d_in, d_out, rank, tokens, dtype, timing):
  heads = d_out // HEAD
  k = jax.random.split(jax.random.key(d_in + d_out + rank), 6)
  w2 = (jax.random.normal(k[0], (d_in, d_out)) / d_in ** 0.5).astype(dtype)
  w3 = w2.reshape(d_in, heads, HEAD).transpose(1, 0, 2)  # [N, D, H], the same weights
  layout = general.einsum_layout("btd,ndh->btnh", (1, tokens, d_in), w3.shape)
  a = (jax.random.normal(k[1], (d_in, rank)) / d_in ** 0.5).astype(dtype)
  b = (0.01 * jax.random.normal(k[2], (rank, d_out))).astype(dtype)
  m = jnp.sqrt(dora_jax.column_sq_norm(w2)).astype(dtype)
  sq2 = dora_jax.column_sq_norm(w2)
  sq3 = general.weight_sq_norm(w3, layout)
  b3 = b.reshape(rank, heads, HEAD)
  m3 = m.reshape(heads, HEAD)
  xs = [jax.random.normal(jax.random.fold_in(k[3], i), (1, tokens, d_in)).astype(dtype)
        for i in range(3)]
  cots = [jax.random.normal(jax.random.fold_in(k[4], i), (1, tokens, d_out)).astype(dtype)
          for i in range(3)]
  cots3 = [c.reshape(1, tokens, heads, HEAD) for c in cots]
  dense_frozen, native_frozen = dict(w=w2, sq=sq2), dict(w=w3, sq=sq3)
  impls = {
      "dense": (lambda x, p, f: dora_jax.dora_dense(x, f["w"], p["a"], p["b"], p["m"], 2.0,
                                                    base_sq_norm=f["sq"]),
                dict(a=a, b=b, m=m), dense_frozen, cots),
      "dense_exact": (lambda x, p, f: dora_jax.dora_dense(x, f["w"], p["a"], p["b"], p["m"], 2.0,
                                                          base_sq_norm=f["sq"], detach_norm=False),
                      dict(a=a, b=b, m=m), dense_frozen, cots),
      "native": (lambda x, p, f: general.dora_einsum("btd,ndh->btnh", x, f["w"], p["a"], p["b"],
                                                     p["m"], 2.0, base_sq_norm=f["sq"]),
                 dict(a=a, b=b3, m=m3), native_frozen, cots3),
      "native_exact": (lambda x, p, f: general.dora_einsum(
          "btd,ndh->btnh", x, f["w"], p["a"], p["b"], p["m"], 2.0, base_sq_norm=f["sq"],
          detach_norm=False), dict(a=a, b=b3, m=m3), native_frozen, cots3),
      "lora": (lambda x, p, f: x @ f["w"] + 2.0 * ((x @ p["a"]) @ p["b"]), dict(a=a, b=b),
               dense_frozen, cots),
  }
  rows = []
  for name, (fn, params, frozen, cs) in impls.items():
    step = _grads(fn)
    ms = harness.time_jitted(step, [(x, params, frozen, c) for x, c in zip(xs, cs)], **timing)
    rows.append(dict(d_in=d_in, d_out=d_out, rank=rank, tokens=tokens, impl=name, ms=ms))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--cpu", action="store_true", help="CPU-sized shapes in float32")
  args = p.parse_args()
  global HEAD
  if args.smoke:
    shapes, ranks, tokens, dtype = [(64, 96)], [4], 32, jnp.float32
    HEAD = 16
    timing = dict(calls=2, repeats=2, warmup=1)
  elif args.cpu:
    shapes, ranks, tokens, dtype = [(1024, 1024), (1024, 4096)], [16, 128], 512, jnp.float32
    timing = dict(calls=5, repeats=5, warmup=2)
  else:
    shapes, ranks, tokens, dtype = SHAPES, RANKS, 4096, jnp.bfloat16
    timing = dict(calls=10, repeats=5)
  rows = []
  for d_in, d_out in shapes:
    for rank in ranks:
      new = run(d_in, d_out, rank, tokens, dtype, timing)
      rows += new
      base = next(r["ms"] for r in new if r["impl"] == "lora")
      print(f"{d_in}x{d_out} r={rank:<4} " + "  ".join(
          f"{r['impl']} {r['ms']:.3f} ms ({r['ms'] / base:.2f}x LoRA)" for r in new), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    meta = dict(device=harness.device_description(), date=datetime.date.today().isoformat(),
                command="python benchmarks/op_level.py " + " ".join(sys.argv[1:]))
    with open(os.path.join(args.out, "op_level.json"), "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

"""Compiled temp memory and time of one module's forward+backward, XLA paths.

  python benchmarks/xla_memory.py [--shapes 8192x28672] [--rank 384] [--tokens 4096]

Prints, per implementation, XLA's temp bytes for the jitted forward+backward
(gradients w.r.t. x, a, b, m, bias; frozen kernel) and the median time.
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp

import harness
import implementations as impls

IMPLS = {
    "lora": impls.lora,
    "dora_jax_xla": impls.dora_jax_backend("xla"),
    "dora_factored_autodiff": impls.dora_factored_autodiff,
    "dora_naive_dense": impls.dora_naive_dense,
}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--shapes", default="8192x28672")
  parser.add_argument("--rank", type=int, default=384)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--no-time", action="store_true")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  results = []
  print(harness.device_description())
  for shape in args.shapes.split(","):
    d_in, d_out = map(int, shape.split("x"))
    kernel, p, xs, cots = impls.make_inputs(jax.random.key(0), d_in, d_out, args.rank, args.tokens,
                                      jnp.bfloat16, sets=2)
    scale = 2.0
    for name, impl in IMPLS.items():
      step = jax.jit(functools.partial(impls.train_grads(impl), scale=scale))
      temp = harness.temp_bytes(step, xs[0], p, kernel, cots[0])
      ms = None
      if not args.no_time:
        ms = harness.time_jitted(step, [(x, p, kernel, c) for x, c in zip(xs, cots)])
      row = dict(shape=shape, rank=args.rank, tokens=args.tokens, impl=name,
                 temp_mb=temp / 2**20, fwd_bwd_ms=ms)
      results.append(row)
      print(f"{shape:>12} r={args.rank:<4} {name:<24} temp {temp / 2**20:9.1f} MiB"
            + ("" if ms is None else f"   fwd+bwd {ms:7.3f} ms"), flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(device=harness.device_description(), results=results), f, indent=1)


if __name__ == "__main__":
  main()

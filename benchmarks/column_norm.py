"""The one-pass norm kernel vs the factored norm (XLA), per call on one GPU.

  python benchmarks/column_norm.py --out DIR            # one NVIDIA GPU
  python benchmarks/column_norm.py --out DIR --smoke    # tiny shapes, any machine

bf16 weights of the DESIGN.md projections at r = 16 and 384. For each tiling
in ``CONFIGS`` (:mod:`dora_jax.kernels.column_norm`) and for
``dora_jax.factored_norm`` with and without the cached ``‖W‖²``: summed GPU
kernel time per call from a profiler trace (benchmarks/step_profile.py), three
kernels rotated so that ``W`` is not served from L2. Writes
``DIR/column_norm.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
from step_profile import kernel_profile  # noqa: E402
import dora_jax  # noqa: E402
from dora_jax.kernels import column_norm as cn  # noqa: E402

C = cn.ColumnNormConfig
CONFIGS = {
    "default": C(),
    "m128_n128_w8": C(128, 128, 64, 264, 8, 3),
    "m64_n128_p528": C(64, 128, 64, 528, 4, 3),
    "m64_n256_w8": C(64, 256, 64, 264, 8, 3),
}
SCALE = 2.0


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--shapes", default="", help="d_inxd_outxr,... (default: 3 shapes × r 16, 384)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.smoke:
    configs = [(96, 160, 16)]
  else:
    configs = [(d_in, d_out, r) for d_in, d_out in ((4096, 4096), (4096, 14336), (8192, 28672))
               for r in (16, 384)]
  if args.shapes:
    configs = [tuple(int(v) for v in c.split("x")) for c in args.shapes.split(",")]
  rows = []
  print(harness.device_description(), flush=True)
  for d_in, d_out, r in configs:
    ks = jax.random.split(jax.random.key(d_in + d_out + r), 9)
    sets = []
    for i in range(3):
      w = (jax.random.normal(ks[i], (d_in, d_out)) / d_in**0.5).astype(jnp.bfloat16)
      a = (jax.random.normal(ks[3 + i], (d_in, r)) / d_in**0.5).astype(jnp.bfloat16)
      b = (0.01 * jax.random.normal(ks[6 + i], (r, d_out))).astype(jnp.bfloat16)
      sets.append((w, a, b, dora_jax.column_sq_norm(w)))
    fns = {
        "factored_cached": jax.jit(lambda w, a, b, q: dora_jax.factored_norm(
            w, a, b, SCALE, base_sq_norm=q)),
        "factored": jax.jit(lambda w, a, b, q: dora_jax.factored_norm(w, a, b, SCALE)),
    }
    for name, cfg in CONFIGS.items():
      fns[name] = jax.jit(lambda w, a, b, q, cfg=cfg: cn.column_norm(w, a, b, SCALE, config=cfg))
    line = []
    for name, fn in fns.items():
      try:
        prof = kernel_profile(fn, sets, steps=9)
        us = prof["kernel_us_per_step"]
      except Exception as err:  # noqa: BLE001 - record and go on
        rows.append(dict(d_in=d_in, d_out=d_out, rank=r, impl=name, error=str(err)[:300]))
        line.append(f"{name} error")
        continue
      tflops = 2 * d_in * d_out * r / (us * 1e-6) / 1e12
      rows.append(dict(d_in=d_in, d_out=d_out, rank=r, impl=name, kernel_us=us,
                       tflops=tflops, kernels=prof["kernels"][:6]))
      line.append(f"{name} {us:.1f}us")
    print(f"{d_in}x{d_out} r={r}: " + "  ".join(line), flush=True)
    with open(os.path.join(args.out, "column_norm.json"), "w") as f:
      json.dump(dict(device=harness.device_description(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

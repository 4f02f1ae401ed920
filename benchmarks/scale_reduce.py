"""The backward-prologue kernel (``dpre = dy ⊙ g``, ``Σ_T dy ⊙ pre``) vs XLA's two passes.

  python benchmarks/scale_reduce.py --out DIR            # one NVIDIA GPU
  python benchmarks/scale_reduce.py --out DIR --smoke    # tiny shapes, any machine

bf16, T = 4096, N = d_out of the DESIGN.md projections. For each tiling in
``CONFIGS`` and for XLA (the jitted ``scale_reduce_reference``): summed GPU
kernel time per call from a profiler trace (benchmarks/step_profile.py) and
the bandwidth it implies (``dy`` and ``pre`` read, ``dpre`` written).
Writes ``DIR/scale_reduce.json``.
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
from dora_jax.kernels import scale_reduce as sr  # noqa: E402

C = sr.ScaleReduceConfig
CONFIGS = {
    "default": C(),
    "t32_n256_w4_s3": C(32, 256, 512, 4, 3),
    "t64_n256_w8_s2": C(64, 256, 1024, 8, 2),
    "t16_n512_w4_s3": C(16, 512, 1024, 4, 3),
    "t64_n128_w4_s3": C(64, 128, 1024, 4, 3),
    "t128_n128_w8_p2048": C(128, 128, 2048, 8, 1),
    "t32_n128_w4_p4096": C(32, 128, 4096, 4, 1),
    "t16_n256_w4_p2048_s3": C(16, 256, 2048, 4, 3),
    "t32_n256_w8_p1024_s4": C(32, 256, 1024, 8, 4),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  tokens, widths = (64, [160]) if args.smoke else (4096, [4096, 14336, 28672])
  rows = []
  print(harness.device_description(), flush=True)
  for n in widths:
    ks = jax.random.split(jax.random.key(n), 9)
    sets = [(jax.random.normal(ks[i], (tokens, n)).astype(jnp.bfloat16),
             jax.random.normal(ks[3 + i], (tokens, n)).astype(jnp.bfloat16),
             jax.random.uniform(ks[6 + i], (n,), minval=0.5, maxval=2.0)) for i in range(3)]
    fns = {"xla": jax.jit(sr.scale_reduce_reference)}
    for name, cfg in CONFIGS.items():
      fns[name] = jax.jit(lambda dy, pre, g, cfg=cfg: sr.scale_reduce(dy, pre, g, config=cfg))
    line = []
    for name, fn in fns.items():
      try:
        prof = kernel_profile(fn, sets, steps=10)
        us = prof["kernel_us_per_step"]
      except Exception as err:  # noqa: BLE001 - record and go on
        rows.append(dict(tokens=tokens, n=n, impl=name, error=str(err)[:300]))
        line.append(f"{name} error")
        continue
      gbps = 3 * tokens * n * 2 / (us * 1e-6) / 1e9
      rows.append(dict(tokens=tokens, n=n, impl=name, kernel_us=us, gb_per_s=gbps,
                       kernels=prof["kernels"][:4]))
      line.append(f"{name} {us:.1f}us ({gbps:.0f} GB/s)")
    print(f"T={tokens} N={n}: " + "  ".join(line), flush=True)
  with open(os.path.join(args.out, "scale_reduce.json"), "w") as f:
    json.dump(dict(device=harness.device_description(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

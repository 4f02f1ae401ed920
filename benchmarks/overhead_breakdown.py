"""Where DoRA's time goes beyond LoRA's: each piece of the XLA path timed alone.

  python benchmarks/overhead_breakdown.py --out DIR            # one NVIDIA GPU
  python benchmarks/overhead_breakdown.py --out DIR --smoke    # tiny shapes, any machine

bf16, T = 4096, no bias, s = 2, for the DESIGN.md projection shapes and
r = 16, 384. Pieces (ms, median of batches of queued calls, inputs rotated):

  gemm            x·W alone
  lora_fwd        x·W + s·(x·a)·b (plain JAX LoRA)
  gemm_colscale   (x·W) ⊙ g: does XLA fuse a column scale into the GEMM?
  norm            factored_norm with ‖W‖² cached (what the layers pay per call)
  norm_cross      U = aᵀW alone
  norm_gb         G·b in float32 at HIGHEST precision (the Gram term)
  compose_train   forward_xla (y and the residual) given g
  compose_infer   forward_xla, y only
  dora_fwd        dora_dense(backend="xla"), ‖W‖² cached
  lora_step / dora_step   value and gradients (x, a, b[, m]) of Σ y ⊙ cot
  dx_plain / dx_scaled    dy·Wᵀ and (dy ⊙ g)·Wᵀ

Writes ``DIR/overhead_breakdown.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
import dora_jax  # noqa: E402
from dora_jax.compose import forward_xla  # noqa: E402

SCALE = 2.0


def pieces(x, w, a, b, m, w_sq, g, cot):
  """name -> (function, args) for one input set."""
  s = SCALE
  hp = lax.Precision.HIGHEST

  def lora_fwd(x, w, a, b):
    return x @ w + s * ((x @ a) @ b)

  def lora_loss(x, a, b, w, cot):
    return jnp.sum((lora_fwd(x, w, a, b) * cot).astype(jnp.float32))

  def dora_loss(x, a, b, m, w, w_sq, cot):
    y = dora_jax.dora_dense(x, w, a, b, m, s, base_sq_norm=w_sq, backend="xla")
    return jnp.sum((y * cot).astype(jnp.float32))

  gram = lambda a: lax.dot_general(a, a, (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)
  return {
      "gemm": (lambda x, w: x @ w, (x, w)),
      "lora_fwd": (lora_fwd, (x, w, a, b)),
      "gemm_colscale": (lambda x, w, g: ((x @ w).astype(jnp.float32) * g).astype(x.dtype),
                        (x, w, g)),
      "norm": (lambda w, a, b, q: dora_jax.factored_norm(w, a, b, s, base_sq_norm=q),
               (w, a, b, w_sq)),
      "norm_cross": (lambda a, w: lax.dot_general(a, w, (((0,), (0,)), ((), ())),
                                                  preferred_element_type=jnp.float32), (a, w)),
      "norm_gb": (lambda a, b: jnp.dot(gram(a), b.astype(jnp.float32), precision=hp), (a, b)),
      "compose_train": (lambda x, w, a, b, g: forward_xla(x, w, a, b, g, jnp.float32(s), None)[:2],
                        (x, w, a, b, g)),
      "compose_infer": (lambda x, w, a, b, g: forward_xla(x, w, a, b, g, jnp.float32(s), None)[0],
                        (x, w, a, b, g)),
      "dora_fwd": (lambda x, w, a, b, m, q: dora_jax.dora_dense(
          x, w, a, b, m, s, base_sq_norm=q, backend="xla"), (x, w, a, b, m, w_sq)),
      "lora_step": (jax.value_and_grad(lora_loss, argnums=(0, 1, 2)), (x, a, b, w, cot)),
      "dora_step": (jax.value_and_grad(dora_loss, argnums=(0, 1, 2, 3)),
                    (x, a, b, m, w, w_sq, cot)),
      "dx_plain": (lambda d, w: lax.dot_general(d, w, (((1,), (1,)), ((), ()))), (cot, w)),
      "dx_scaled": (lambda d, w, g: lax.dot_general((d.astype(jnp.float32) * g).astype(d.dtype), w,
                                                   (((1,), (1,)), ((), ()))), (cot, w, g)),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.smoke:
    shapes, ranks, tokens, kw = [(96, 160)], [4], 64, dict(calls=2, repeats=2, warmup=1)
  else:
    shapes, ranks, tokens, kw = ([(4096, 4096), (4096, 14336), (8192, 28672)], [16, 384], 4096,
                                 dict(calls=10, repeats=5))
  dtype = jnp.bfloat16
  rows = []
  print(harness.device_description(), flush=True)
  for d_in, d_out in shapes:
    for r in ranks:
      key = jax.random.key(d_in + 3 * d_out + r)
      ks = jax.random.split(key, 16)
      w = (jax.random.normal(ks[0], (d_in, d_out)) / d_in**0.5).astype(dtype)
      a = (jax.random.normal(ks[1], (d_in, r)) / d_in**0.5).astype(dtype)
      b = (0.01 * jax.random.normal(ks[2], (r, d_out))).astype(dtype)
      w_sq = dora_jax.column_sq_norm(w)
      m = jnp.sqrt(w_sq) * (1 + 0.01 * jax.random.normal(ks[3], (d_out,)))
      g = m / dora_jax.factored_norm(w, a, b, SCALE)
      sets = [pieces(jax.random.normal(ks[4 + i], (tokens, d_in)).astype(dtype), w, a, b, m, w_sq, g,
                     jax.random.normal(ks[8 + i], (tokens, d_out)).astype(dtype)) for i in range(3)]
      line = []
      for name in sets[0]:
        fn = jax.jit(sets[0][name][0])
        ms = harness.time_jitted(fn, [s[name][1] for s in sets], **kw)
        rows.append(dict(d_in=d_in, d_out=d_out, rank=r, tokens=tokens, piece=name, ms=ms))
        line.append(f"{name} {ms:.3f}")
      print(f"{d_in}x{d_out} r={r}: " + "  ".join(line), flush=True)
  with open(os.path.join(args.out, "overhead_breakdown.json"), "w") as f:
    json.dump(dict(device=harness.device_description(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

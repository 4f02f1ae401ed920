"""Gradient accumulation: DoRA's norm once per step instead of once per micro-batch.

  python benchmarks/grad_accum.py --out DIR            # one NVIDIA GPU
  python benchmarks/grad_accum.py --out DIR --smoke    # tiny shapes, any machine

One adapted projection (bf16, s = 2, no bias), a training step over k
micro-batches (``lax.scan``, gradients of x's adapter summed), three ways:

  lora          plain JAX LoRA
  dora_each     dora_dense per micro-batch: the norm is recomputed k times
  dora_once     the norm computed once per step with factored_norm and passed
                to every micro-batch through ``dora_dense(..., norm=...)``

The norm depends on the parameters only, so both DoRA variants give the same
gradients (checked here); ``dora_once`` pays the norm's ``aᵀW`` once per step
and its overhead over LoRA falls with k. Writes ``DIR/grad_accum.json``.
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
import dora_jax  # noqa: E402

SCALE = 2.0


def make_step(kind):
  """``(p, w, w_sq, xs [k, T, d_in], cots [k, T, d_out]) -> (loss, adapter grads, dxs)``.

  Each micro-batch returns its loss and ``dx`` too, as in a network (the loss
  value keeps LoRA's forward matmul alive: LoRA is linear in x, and gradients
  alone would let XLA drop it).
  """
  def loss(p, x, w, w_sq, norm, cot):
    if kind == "lora":
      y = x @ w + SCALE * ((x @ p["a"]) @ p["b"])
    else:
      y = dora_jax.dora_dense(x, w, p["a"], p["b"], p["m"], SCALE, base_sq_norm=w_sq, norm=norm)
    return jnp.sum((y * cot).astype(jnp.float32))

  def step(p, w, w_sq, xs, cots):
    norm = None
    if kind == "dora_once":
      norm = jax.lax.stop_gradient(dora_jax.factored_norm(w, p["a"], p["b"], SCALE,
                                                          base_sq_norm=w_sq))
    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1))

    def body(carry, batch):
      total, acc = carry
      x, cot = batch
      value, (gp, dx) = value_and_grad(p, x, w, w_sq, norm, cot)
      acc = jax.tree.map(lambda u, v: u + v.astype(jnp.float32), acc, gp)
      return (total + value, acc), dx

    zero = jax.tree.map(lambda v: jnp.zeros(v.shape, jnp.float32), p)
    (total, grads), dxs = jax.lax.scan(body, (jnp.float32(0), zero), (xs, cots))
    return total, grads, dxs

  return jax.jit(step)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--micro-tokens", type=int, default=1024)
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.smoke:
    shape, ranks, ks, t_mb, kw = (96, 160), [4], [1, 2], 32, dict(calls=2, repeats=2, warmup=1)
  else:
    shape, ranks, ks, t_mb, kw = ((4096, 14336), [16, 384], [1, 2, 4, 8], args.micro_tokens,
                                  dict(calls=5, repeats=5))
  d_in, d_out = shape
  dtype = jnp.bfloat16
  rows = []
  print(harness.device_description(), flush=True)
  for r in ranks:
    key = jax.random.key(r)
    kk = jax.random.split(key, 8)
    w = (jax.random.normal(kk[0], (d_in, d_out)) / d_in**0.5).astype(dtype)
    w_sq = dora_jax.column_sq_norm(w)
    p = {"a": (jax.random.normal(kk[1], (d_in, r)) / d_in**0.5).astype(dtype),
         "b": (0.01 * jax.random.normal(kk[2], (r, d_out))).astype(dtype),
         "m": (jnp.sqrt(w_sq) * (1 + 0.01 * jax.random.normal(kk[3], (d_out,)))).astype(dtype)}
    steps = {kind: make_step(kind) for kind in ("lora", "dora_each", "dora_once")}
    for k in ks:
      sets = []
      for i in range(2):
        xs = jax.random.normal(jax.random.fold_in(kk[4], 10 * k + i), (k, t_mb, d_in)).astype(dtype)
        cots = jax.random.normal(jax.random.fold_in(kk[5], 10 * k + i), (k, t_mb, d_out)).astype(dtype)
        sets.append((p, w, w_sq, xs, cots))
      each = steps["dora_each"](*sets[0])[1]
      once = steps["dora_once"](*sets[0])[1]
      agree = max(float(jnp.max(jnp.abs(each[n] - once[n])) / (jnp.max(jnp.abs(each[n])) + 1e-30))
                  for n in each)
      times = {kind: harness.time_jitted(fn, sets, **kw) for kind, fn in steps.items()}
      row = dict(d_in=d_in, d_out=d_out, rank=r, micro_tokens=t_mb, k=k, max_rel_diff=agree,
                 **{f"{kind}_ms": ms for kind, ms in times.items()},
                 each_over_lora=times["dora_each"] / times["lora"],
                 once_over_lora=times["dora_once"] / times["lora"])
      rows.append(row)
      print(f"r={r} k={k}: lora {times['lora']:.3f}  dora_each {times['dora_each']:.3f} "
            f"({row['each_over_lora']:.3f}x)  dora_once {times['dora_once']:.3f} "
            f"({row['once_over_lora']:.3f}x)  grads agree to {agree:.1e}", flush=True)
  with open(os.path.join(args.out, "grad_accum.json"), "w") as f:
    json.dump(dict(device=harness.device_description(), rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

"""GPU check and timing of the fused Pallas kernels against XLA and plain JAX LoRA.

Run on a machine with an NVIDIA GPU::

  python benchmarks/kernels_gpu.py --out DIR [--sweep] [--quick]

What it does, printing as it goes and writing ``DIR/results.json``:

1. Numerics: :func:`dual_matmul` on ragged shapes (bf16, fp32; outputs poisoned
   with NaN first) vs its jnp twin; ``dora_dense(backend="pallas")`` forward and
   gradients vs ``backend="xla"`` and a float64 numpy reference.
2. Timing (bf16, T=4096, shapes (4096,4096), (4096,14336), (8192,28672), r=16
   and 384): forward and forward+backward of ``dora_dense`` with
   ``backend="pallas"`` and ``"xla"`` (the norm computed inside the step, and
   with the norm passed in precomputed), and plain JAX LoRA, each the median of
   several batches of asynchronous calls after warm-up, inputs rotated among
   three sets (larger than L2 together).
3. With ``--sweep``: block configurations of the forward and ``dx`` launches vs
   the XLA GEMMs they replace.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import dora_jax  # noqa: E402
from dora_jax.kernels._common import MatmulConfig  # noqa: E402
from dora_jax.kernels.dual_matmul import dual_matmul, dual_matmul_reference  # noqa: E402

SHAPES = [(4096, 4096), (4096, 14336), (8192, 28672)]
RANKS = [16, 384]
TOKENS = 4096
NUMERIC_SHAPE = (1000, 1100, 1500)
SWEEP_SHAPES = (((8192, 28672), 384), ((4096, 14336), 16), ((4096, 4096), 16))
DUAL_SHAPES = ((1000, 1500, 1100, 40), (129, 300, 65, 1))
SCALE = 2.0
RESULTS: dict = {"device": None, "jax": jax.__version__, "numerics": [], "timing": [], "sweep": []}
LOG = None
HLO_DIR = None


def log(*args):
  line = " ".join(str(a) for a in args)
  print(line, flush=True)
  if LOG is not None:
    LOG.write(line + "\n")
    LOG.flush()


def rel(u, v) -> float:
  u = np.asarray(jnp.asarray(u, jnp.float32), np.float64)
  v = np.asarray(jnp.asarray(v, jnp.float32), np.float64) if not isinstance(v, np.ndarray) else v
  return float(np.linalg.norm(u - v) / max(np.linalg.norm(v), 1e-30))


def bench(fn, arg_sets, iters=10, reps=5):
  """Median ms per call: ``reps`` batches of ``iters`` asynchronous calls."""
  for args in arg_sets:
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = None
    for i in range(iters):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / iters * 1e3)
  return statistics.median(times), times


def make_layer(key, d_in, d_out, r, tokens, dtype=jnp.bfloat16, bias=False):
  k = jax.random.split(key, 7)
  x = jax.random.normal(k[0], (tokens, d_in), jnp.float32).astype(dtype)
  w = (jax.random.normal(k[1], (d_in, d_out)) / np.sqrt(d_in)).astype(dtype)
  a = (jax.random.uniform(k[2], (d_in, r), minval=-1, maxval=1) / np.sqrt(d_in)).astype(dtype)
  b = (0.05 * jax.random.normal(k[3], (r, d_out))).astype(dtype)
  m = (jnp.linalg.norm(w.astype(jnp.float32), axis=0)
       * (1 + 0.1 * jax.random.normal(k[4], (d_out,)))).astype(dtype)
  bb = (0.5 * jax.random.normal(k[5], (d_out,))).astype(dtype) if bias else None
  dy = jax.random.normal(k[6], (tokens, d_out), jnp.float32).astype(dtype)
  return x, w, a, b, m, bb, dy


# ----------------------------------------------------------------------------- numerics


def check_dual_matmul():
  key = jax.random.key(11)
  for dtype in (jnp.bfloat16, jnp.float32):
    for trans_b in (False, True):
      for (mm, nn, k1, k2) in DUAL_SHAPES:
        ks = jax.random.split(key, 8)
        key = ks[7]
        a1 = jax.random.normal(ks[0], (mm, k1)).astype(dtype)
        b1 = (jax.random.normal(ks[1], (nn, k1) if trans_b else (k1, nn)) / np.sqrt(k1)).astype(dtype)
        a2 = jax.random.normal(ks[2], (mm, k2)).astype(dtype)
        b2 = (jax.random.normal(ks[3], (nn, k2) if trans_b else (k2, nn)) / np.sqrt(k2)).astype(dtype)
        cscale = 1 + 0.1 * jax.random.normal(ks[5], (nn,))
        cbias = jax.random.normal(ks[6], (nn,))
        try:
          out, pre = jax.jit(lambda *v: dual_matmul(*v, col_scale=cscale,
                                                     col_bias=cbias, trans_b=trans_b,
                                                     want_pre=True, poison=True))(a1, b1, a2, b2)
          ref_out, ref_pre = dual_matmul_reference(a1, b1, a2, b2, col_scale=cscale,
                                                   col_bias=cbias, trans_b=trans_b, want_pre=True)
          a1s = np.asarray(a1.astype(jnp.float32), np.float64)
          bb1 = np.asarray(b1.astype(jnp.float32), np.float64)
          bb2 = np.asarray(b2.astype(jnp.float32), np.float64)
          acc64 = (a1s @ (bb1.T if trans_b else bb1)
                   + np.asarray(a2.astype(jnp.float32), np.float64) @ (bb2.T if trans_b else bb2))
          out64 = acc64 * np.asarray(cscale, np.float64) + np.asarray(cbias, np.float64)
          rec = dict(kind="dual_matmul", dtype=jnp.dtype(dtype).name, trans_b=trans_b,
                     shape=(mm, nn, k1, k2),
                     nan_out=int(jnp.isnan(out.astype(jnp.float32)).sum()),
                     nan_pre=int(jnp.isnan(pre.astype(jnp.float32)).sum()),
                     rel_vs_twin=rel(out, ref_out), rel_pre_vs_twin=rel(pre, ref_pre),
                     rel_vs_f64=rel(out, out64), twin_rel_vs_f64=rel(ref_out, out64))
        except Exception as e:  # noqa: BLE001
          rec = dict(kind="dual_matmul", dtype=jnp.dtype(dtype).name, trans_b=trans_b,
                     shape=(mm, nn, k1, k2), error=repr(e)[:2000])
          traceback.print_exc()
        log(json.dumps(rec))
        RESULTS["numerics"].append(rec)


def f64_dora(x, w, a, b, m, s, bias, dy):
  """Float64 numpy forward and gradients (norm detached)."""
  x, w, a, b, m, dy = (np.asarray(jnp.asarray(v, jnp.float32), np.float64) for v in (x, w, a, b, m, dy))
  n = np.sqrt(np.sum((w + s * a @ b) ** 2, axis=0))
  g = m / n
  h = x @ a
  pre = x @ w + s * h @ b
  y = g * pre
  if bias is not None:
    y = y + np.asarray(jnp.asarray(bias, jnp.float32), np.float64)
  dpre = dy * g
  t = dpre @ b.T
  grads = dict(x=dpre @ w.T + s * t @ a.T, lora_a=s * x.T @ t, lora_b=s * h.T @ dpre,
               magnitude=np.sum(dy * pre, axis=0) / n)
  if bias is not None:
    grads["bias"] = dy.sum(0)
  return y, grads


def check_dora(tokens, d_in, d_out, r, dtype, bias):
  x, w, a, b, m, bb, dy = make_layer(jax.random.key(d_in + r), d_in, d_out, r, tokens, dtype, bias)
  y64, g64 = f64_dora(x, w, a, b, m, SCALE, bb, dy)
  names = ["x", "lora_a", "lora_b", "magnitude"] + (["bias"] if bias else [])
  rec = dict(kind="dora_dense", dtype=jnp.dtype(dtype).name, shape=(tokens, d_in, d_out, r), bias=bias)
  for backend in ("xla", "pallas"):
    try:
      def f(x, a, b, m, bb, backend=backend):
        return dora_jax.dora_dense(x, w, a, b, m, SCALE, bb, backend=backend)

      def step(x, a, b, m, bb, dy):
        y, vjp = jax.vjp(f, x, a, b, m, bb)
        return y, vjp(dy)

      y, grads = jax.jit(step)(x, a, b, m, bb, dy)
      rec[f"{backend}_y"] = rel(y, y64)
      for name, gval in zip(names, grads):
        rec[f"{backend}_d{name}"] = rel(gval, g64[name])
      rec[f"{backend}_nan"] = int(sum(int(jnp.isnan(v.astype(jnp.float32)).sum())
                                      for v in (y, *[gv for gv in grads if gv is not None])))
    except Exception as e:  # noqa: BLE001
      rec[f"{backend}_error"] = repr(e)[:2000]
      traceback.print_exc()
  log(json.dumps(rec))
  RESULTS["numerics"].append(rec)


# ----------------------------------------------------------------------------- timing


def lora_forward(x, w, a, b):
  return jnp.dot(x, w) + SCALE * jnp.dot(jnp.dot(x, a), b)


def time_shape(d_in, d_out, r, quick):
  sets = [make_layer(jax.random.key(100 * i + r), d_in, d_out, r, TOKENS) for i in range(3)]
  norms = [dora_jax.factored_norm(w, a, b, SCALE) for (x, w, a, b, m, bb, dy) in sets]
  rec = dict(shape=(TOKENS, d_in, d_out, r), dtype="bfloat16")

  def dora_fwd(backend, cached):
    def f(x, w, a, b, m, dy, n):
      return dora_jax.dora_dense(x, w, a, b, m, SCALE, norm=n if cached else None, backend=backend)
    return f

  def dora_step(backend, cached, options=None):
    def f(x, w, a, b, m, dy, n):
      def fn(x, a, b, m):
        return dora_jax.dora_dense(x, w, a, b, m, SCALE, norm=n if cached else None, backend=backend,
                                   options=options)
      y, vjp = jax.vjp(fn, x, a, b, m)
      return y, vjp(dy)
    return f

  def lora_fwd(x, w, a, b, m, dy, n):
    return lora_forward(x, w, a, b)

  def lora_step(x, w, a, b, m, dy, n):
    y, vjp = jax.vjp(lambda x, a, b: lora_forward(x, w, a, b), x, a, b)
    return y, vjp(dy)

  def norm_only(x, w, a, b, m, dy, n):
    return dora_jax.factored_norm(w, a, b, SCALE)

  variants = {
      "lora_fwd": lora_fwd, "lora_step": lora_step,
      "xla_fwd": dora_fwd("xla", False), "xla_step": dora_step("xla", False),
      "pallas_fwd": dora_fwd("pallas", False), "pallas_step": dora_step("pallas", False),
      "pallas_step_dxkernel": dora_step("pallas", False, dora_jax.KernelOptions(pallas_dx=True)),
      "pallas_step_xladx": dora_step("pallas", False, dora_jax.KernelOptions(pallas_dx=False)),
  }
  if not quick:
    variants.update({
        "norm_only": norm_only,
        "xla_fwd_cachednorm": dora_fwd("xla", True), "xla_step_cachednorm": dora_step("xla", True),
        "pallas_fwd_cachednorm": dora_fwd("pallas", True),
        "pallas_step_cachednorm": dora_step("pallas", True),
    })
  args = [(x, w, a, b, m, dy, n) for (x, w, a, b, m, bb, dy), n in zip(sets, norms)]
  outs = {}
  for name, fn in variants.items():
    try:
      jf = jax.jit(fn)
      ms, all_ms = bench(jf, args)
      if HLO_DIR and name in ("pallas_fwd", "pallas_step", "xla_step") and (d_in, r) == (8192, 16):
        with open(os.path.join(HLO_DIR, f"hlo_{name}.txt"), "w") as fh:
          fh.write(jf.lower(*args[0]).compile().as_text())
      rec[name] = ms
      rec[name + "_all"] = all_ms
      if name in ("xla_step", "pallas_step", "xla_fwd", "pallas_fwd"):
        outs[name] = jf(*args[0])
    except Exception as e:  # noqa: BLE001
      rec[name + "_error"] = repr(e)[:2000]
      traceback.print_exc()
  # Agreement between the two DoRA backends on the timed shape.
  if "xla_step" in outs and "pallas_step" in outs:
    (yx, gx), (yp, gp) = outs["xla_step"], outs["pallas_step"]
    rec["rel_y_pallas_vs_xla"] = rel(yp, yx)
    for nm, u, v in zip(("x", "lora_a", "lora_b", "magnitude"), gp, gx):
      rec[f"rel_d{nm}_pallas_vs_xla"] = rel(u, v)
  for key in ("fwd", "step"):
    if f"pallas_{key}" in rec and f"xla_{key}" in rec:
      rec[f"{key}_pallas_over_xla"] = rec[f"pallas_{key}"] / rec[f"xla_{key}"]
      rec[f"{key}_pallas_over_lora"] = rec[f"pallas_{key}"] / rec[f"lora_{key}"]
      rec[f"{key}_xla_over_lora"] = rec[f"xla_{key}"] / rec[f"lora_{key}"]
  log(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                  if not k.endswith("_all")}))
  RESULTS["timing"].append(rec)
  del sets, norms, args, outs


# ----------------------------------------------------------------------------- sweep

FWD_CONFIGS = [
    MatmulConfig(128, 256, 64, None, 8, 8, 3),
    MatmulConfig(128, 256, 64, None, 8, 8, 4),
    MatmulConfig(128, 256, 64, None, 4, 8, 4),
    MatmulConfig(128, 256, 64, None, 16, 8, 4),
    MatmulConfig(256, 128, 64, None, 8, 8, 4),
]


def sweep_shape(d_in, d_out, r):
  """Kernel-level: forward and dx launches per config vs the XLA ops they replace."""
  x, w, a, b, m, bb, dy = make_layer(jax.random.key(7), d_in, d_out, r, TOKENS)
  sets = []
  for i in range(3):
    ks = jax.random.split(jax.random.key(1000 + i), 4)
    sets.append((jax.random.normal(ks[0], (TOKENS, d_in)).astype(jnp.bfloat16),
                 (jax.random.normal(ks[1], (d_in, d_out)) / np.sqrt(d_in)).astype(jnp.bfloat16),
                 jax.random.normal(ks[2], (TOKENS, r)).astype(jnp.bfloat16),
                 (0.05 * jax.random.normal(ks[3], (r, d_out))).astype(jnp.bfloat16),
                 jax.random.normal(ks[0], (TOKENS, d_out)).astype(jnp.bfloat16),
                 a))
  g = 1 + 0.1 * jax.random.normal(jax.random.key(3), (d_out,))
  rec = dict(shape=(TOKENS, d_in, d_out, r))

  def xla_gemm(x, w, hs, b, dy, a):
    return jnp.dot(x, w)

  def xla_fwd(x, w, hs, b, dy, a):
    acc = jnp.dot(x, w).astype(jnp.float32) + jnp.dot(hs, b).astype(jnp.float32)
    return (g * acc).astype(jnp.bfloat16), acc.astype(jnp.bfloat16)

  def xla_fwd_nopre(x, w, hs, b, dy, a):
    acc = jnp.dot(x, w).astype(jnp.float32) + jnp.dot(hs, b).astype(jnp.float32)
    return (g * acc).astype(jnp.bfloat16)

  def xla_dx(x, w, hs, b, dy, a):
    dpre = (dy.astype(jnp.float32) * g).astype(jnp.bfloat16)
    ts = hs  # stands in for s·t [T, r]
    return (jnp.dot(dpre, w.T).astype(jnp.float32) + jnp.dot(ts, a.T).astype(jnp.float32)).astype(jnp.bfloat16)

  for name, fn in (("xla_gemm", xla_gemm), ("xla_fwd", xla_fwd), ("xla_fwd_nopre", xla_fwd_nopre),
                   ("xla_dx", xla_dx)):
    rec[name] = bench(jax.jit(fn), sets)[0]
  log(json.dumps(rec))
  for cfg in FWD_CONFIGS:
    cfg_rec = dict(shape=rec["shape"], config=dataclasses.astuple(cfg))
    for kind in ("fwd", "fwd_nopre", "dx_nopro"):
      try:
        if kind == "fwd":
          def fn(x, w, hs, b, dy, a, cfg=cfg):
            return dual_matmul(x, w, hs, b, col_scale=g, want_pre=True, config=cfg)
        elif kind == "fwd_nopre":
          def fn(x, w, hs, b, dy, a, cfg=cfg):
            return dual_matmul(x, w, hs, b, col_scale=g, config=cfg)[0]
        else:
          def fn(x, w, hs, b, dy, a, cfg=cfg):
            dpre = (dy.astype(jnp.float32) * g).astype(jnp.bfloat16)
            return dual_matmul(dpre, w, hs, a, trans_b=True, config=cfg)[0]
        cfg_rec[kind] = bench(jax.jit(fn), sets)[0]
      except Exception as e:  # noqa: BLE001
        cfg_rec[kind + "_error"] = repr(e)[:1000]
        traceback.print_exc()
    log(json.dumps(cfg_rec))
    RESULTS["sweep"].append({**cfg_rec, "xla": rec})


def main():
  global LOG
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default=".")
  parser.add_argument("--sweep", action="store_true")
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--skip-numerics", action="store_true")
  parser.add_argument("--skip-timing", action="store_true")
  parser.add_argument("--smoke", action="store_true", help="tiny shapes (CPU check of the script)")
  opts = parser.parse_args()
  if opts.smoke:
    global SHAPES, RANKS, TOKENS, NUMERIC_SHAPE, DUAL_SHAPES, SWEEP_SHAPES
    SHAPES, RANKS, TOKENS, NUMERIC_SHAPE = [(70, 90)], [16], 37, (37, 70, 90)
    DUAL_SHAPES = ((37, 90, 70, 5),)
    SWEEP_SHAPES = (((70, 90), 16),)
  os.makedirs(opts.out, exist_ok=True)
  LOG = open(os.path.join(opts.out, "log.txt"), "a")
  global HLO_DIR
  HLO_DIR = opts.out
  dev = jax.devices()[0]
  RESULTS["device"] = f"{dev.device_kind} ({dev.platform})"
  log("device", RESULTS["device"], "jax", jax.__version__)
  t0 = time.time()
  try:
    if not opts.skip_numerics:
      check_dual_matmul()
      for dtype in (jnp.bfloat16, jnp.float32):
        for r, bias in ((1, True), (16, False), (384, True)):
          check_dora(*NUMERIC_SHAPE, r, dtype, bias)
      log(f"numerics done {time.time() - t0:.0f}s")
    if opts.sweep:
      for (d_in, d_out), r in SWEEP_SHAPES:
        sweep_shape(d_in, d_out, r)
      log(f"sweep done {time.time() - t0:.0f}s")
    if not opts.skip_timing:
      for d_in, d_out in SHAPES:
        for r in RANKS:
          time_shape(d_in, d_out, r, opts.quick)
      log(f"timing done {time.time() - t0:.0f}s")
  finally:
    with open(os.path.join(opts.out, "results.json"), "w") as fh:
      json.dump(RESULTS, fh, indent=1)
  log("summary (ms medians; ratios)")
  for rec in RESULTS["timing"]:
    log(rec["shape"], " ".join(f"{k}={rec[k]:.3f}" for k in (
        "lora_fwd", "xla_fwd", "pallas_fwd", "lora_step", "xla_step", "pallas_step",
        "pallas_step_dxkernel", "pallas_step_xladx", "norm_only", "xla_fwd_cachednorm",
        "pallas_fwd_cachednorm", "xla_step_cachednorm", "pallas_step_cachednorm") if k in rec),
        " ".join(f"{k}={rec[k]:.3f}" for k in rec if k.endswith("_over_xla") or k.endswith("_over_lora")))


if __name__ == "__main__":
  main()

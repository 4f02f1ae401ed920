"""Per-kernel GPU time of one training step: LoRA vs DoRA variants, from a profiler trace.

  python benchmarks/step_profile.py --out DIR            # one NVIDIA GPU
  python benchmarks/step_profile.py --out DIR --smoke    # tiny shapes, any machine

For each configuration (bf16, T = 4096, no bias, s = 2) and each step
function (value and gradients of ``Σ y ⊙ cot`` w.r.t. x, a, b, m), each
variant a ``dora_jax.KernelOptions`` (static: every function traces its own):

  lora                plain JAX LoRA
  dora_<backend>      dora_jax.dora_dense(backend=...) with ‖W‖² cached, keeping
                      ``pre`` as the dm residual (mosaic_residual="pre"; the
                      only residual of "xla" and "pallas")
  dora_mosaic_y       mosaic keeping the output ``y`` (its default)
  dora_<backend>_nonorm  dora_<backend> with the norm passed in (no norm work in the step)
  dora_<backend>_factored_norm  the backend's defaults with the factored norm
                      (XLA) instead of the one-pass norm kernel (norm_kernel=False)
  dora_mosaic_xla_prologue  mosaic with XLA's two passes for dpre and dm
                      (scale_reduce_max_width=0)
  dora_mosaic_xla_dx  mosaic with cuBLAS/XLA's dx and its add pass (mosaic_dx=False)
  dora_mosaic_y_xla_dx     the same keeping ``y``
  dora_mosaic_y_sr_wide    mosaic_y with the one-pass dpre/dm kernel at every
                      width (scale_reduce_max_width unbounded)

it records the step's median wall time (harness.time_jitted) and, from a
``jax.profiler`` trace of a few steps, the GPU kernels each step launches
with their summed durations, plus the busy fraction of the step's span
(gaps are host stalls, e.g. a ``lax.cond`` reading its predicate). It also
profiles the norm: ``factored_norm`` and its ``U = aᵀW`` as one GEMM, as
``(Wᵀa)ᵀ``, and split over ``d_in`` into ``c`` batched pieces (summed GPU
kernel time per call). Writes ``DIR/step_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
import dora_jax  # noqa: E402

SCALE = 2.0


def step_functions(backends):
  """name -> step(x, a, b, m, w, w_sq, norm, cot)."""
  s = SCALE

  def lora_loss(x, a, b, m, w, w_sq, norm, cot):
    y = x @ w + s * ((x @ a) @ b)
    return jnp.sum((y * cot).astype(jnp.float32))

  def dora_loss(backend, pass_norm, **options):
    options = dora_jax.KernelOptions(**options)

    def loss(x, a, b, m, w, w_sq, norm, cot):
      y = dora_jax.dora_dense(x, w, a, b, m, s, base_sq_norm=w_sq,
                              norm=norm if pass_norm else None, backend=backend,
                              options=options)
      return jnp.sum((y * cot).astype(jnp.float32))
    return loss

  pre = dict(mosaic_residual="pre")
  fns = {"lora": lora_loss}
  for backend in backends:
    fns[f"dora_{backend}"] = dora_loss(backend, False, **pre)
    fns[f"dora_{backend}_nonorm"] = dora_loss(backend, True, **pre)
    if backend != "xla":
      fns[f"dora_{backend}_factored_norm"] = dora_loss(backend, False, norm_kernel=False)
    if backend == "mosaic":
      fns["dora_mosaic_y"] = dora_loss(backend, False)
      fns["dora_mosaic_xla_prologue"] = dora_loss(backend, False, scale_reduce_max_width=0, **pre)
      fns["dora_mosaic_xla_dx"] = dora_loss(backend, False, mosaic_dx=False, **pre)
      fns["dora_mosaic_y_xla_dx"] = dora_loss(backend, False, mosaic_dx=False)
      fns["dora_mosaic_y_sr_wide"] = dora_loss(backend, False, scale_reduce_max_width=1 << 30)
  return {k: jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2, 3))) for k, f in fns.items()}


def cross_split(a, w, pieces):
  """``aᵀW [r, d_out]`` float32 as ``pieces`` batched partial products summed."""
  d_in, r = a.shape
  a3 = a.reshape(pieces, d_in // pieces, r)
  w3 = w.reshape(pieces, d_in // pieces, w.shape[1])
  part = lax.dot_general(a3, w3, (((1,), (1,)), ((0,), (0,))), preferred_element_type=jnp.float32)
  return jnp.sum(part, axis=0)


def _trace_events(log_dir):
  paths = glob.glob(os.path.join(log_dir, "**", "*.trace.json.gz"), recursive=True)
  paths += glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    return None, sorted(glob.glob(os.path.join(log_dir, "**", "*"), recursive=True))
  with gzip.open(paths[0], "rt") as f:
    data = json.load(f)
  return (data["traceEvents"] if isinstance(data, dict) else data), paths[0]


def kernel_profile(fn, arg_sets, steps=6):
  """Kernels of ``steps`` calls of ``fn``: per-name count and µs per step, busy fraction."""
  out = fn(*arg_sets[0])
  jax.block_until_ready(out)
  log_dir = tempfile.mkdtemp()
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    for i in range(steps):
      out = fn(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(out)
  events, where = _trace_events(log_dir)
  if events is None:
    return dict(error=f"no trace file; files: {where[:20]}")
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e.get("args", {}).get("name", "")
    if e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
  on_gpu = [e for e in events if e.get("ph") == "X" and "GPU" in procs.get(e.get("pid"), "")
            and "memcpy" not in e.get("name", "").lower()]
  kernels = [e for e in on_gpu if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
  kernels = kernels or on_gpu
  lines = collections.Counter(
      f"{procs.get(e['pid'])} | {threads.get((e['pid'], e.get('tid')))}" for e in events
      if e.get("ph") == "X")
  if not kernels:
    return dict(error="no GPU events", lines=dict(lines.most_common(12)))
  per = collections.defaultdict(lambda: [0, 0.0])
  for e in kernels:
    per[e["name"]][0] += 1
    per[e["name"]][1] += float(e.get("dur", 0.0))
  busy = sum(float(e.get("dur", 0.0)) for e in kernels)
  span = max(e["ts"] + e.get("dur", 0) for e in kernels) - min(e["ts"] for e in kernels)
  top = sorted(per.items(), key=lambda kv: -kv[1][1])
  return dict(lines=dict(lines.most_common(8)), kernel_us_per_step=busy / steps, span_us_per_step=span / steps,
              busy_fraction=busy / span if span else None,
              kernels=[dict(name=k[:120], calls_per_step=c / steps, us_per_step=t / steps)
                       for k, (c, t) in top[:25]],
              memcpy=[e["name"] for e in events if e.get("ph") == "X"
                      and "memcpy" in e.get("name", "").lower()][:10])


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--backends", default="xla,mosaic")
  parser.add_argument("--hlo", default="", help="comma-separated step names whose optimized "
                      "HLO to write to OUT/hlo_<name>_<d_in>x<d_out>_r<r>.txt")
  parser.add_argument("--shapes", default="", help="d_inxd_outxr,... (default: the three)")
  parser.add_argument("--norm-only", action="store_true", help="profile the norm variants only")
  parser.add_argument("--steps", default="", help="comma-separated step names (default: all)")
  parser.add_argument("--no-norm", action="store_true", help="skip the norm variants")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.smoke:
    configs, tokens, kw = [(128, 256, 16)], 128, dict(calls=2, repeats=2, warmup=1)
  else:
    configs, tokens, kw = ([(4096, 4096, 16), (4096, 14336, 16), (4096, 4096, 384)], 4096,
                           dict(calls=10, repeats=5))
  if args.shapes:
    configs = [tuple(int(v) for v in c.split("x")) for c in args.shapes.split(",")]
  backends = [b for b in args.backends.split(",") if b]
  dtype = jnp.bfloat16
  result = dict(device=harness.device_description(), configs=[])
  print(result["device"], flush=True)
  steps = step_functions(backends)
  for d_in, d_out, r in configs:
    ks = jax.random.split(jax.random.key(d_in + d_out + r), 12)
    w = (jax.random.normal(ks[0], (d_in, d_out)) / d_in**0.5).astype(dtype)
    a = (jax.random.normal(ks[1], (d_in, r)) / d_in**0.5).astype(dtype)
    b = (0.01 * jax.random.normal(ks[2], (r, d_out))).astype(dtype)
    w_sq = dora_jax.column_sq_norm(w)
    m = jnp.sqrt(w_sq) * (1 + 0.01 * jax.random.normal(ks[3], (d_out,)))
    norm = dora_jax.factored_norm(w, a, b, SCALE, base_sq_norm=w_sq)
    sets = [(jax.random.normal(ks[4 + i], (tokens, d_in)).astype(dtype), a, b, m, w, w_sq, norm,
             jax.random.normal(ks[8 + i], (tokens, d_out)).astype(dtype)) for i in range(3)]
    entry = dict(d_in=d_in, d_out=d_out, rank=r, tokens=tokens, steps={}, norm_ms={})
    chosen = {k: v for k, v in steps.items() if not args.steps or k in args.steps.split(",")}
    for name, fn in ({} if args.norm_only else chosen).items():
      try:
        ms = harness.time_jitted(fn, sets, **kw)
        prof = kernel_profile(fn, sets)
      except Exception as err:  # noqa: BLE001 - record and go on
        entry["steps"][name] = dict(error=f"{type(err).__name__}: {str(err)[:300]}")
        print(f"{d_in}x{d_out} r={r} {name}: {entry['steps'][name]['error']}", flush=True)
        continue
      entry["steps"][name] = dict(ms=ms, **prof)
      if name in args.hlo.split(","):
        text = fn.lower(*sets[0]).compile().as_text()
        with open(os.path.join(args.out, f"hlo_{name}_{d_in}x{d_out}_r{r}.txt"), "w") as f:
          f.write(text)
      print(f"{d_in}x{d_out} r={r} {name}: {ms:.3f} ms, kernels "
            f"{prof.get('kernel_us_per_step', float('nan')):.1f} us, span "
            f"{prof.get('span_us_per_step', float('nan')):.1f} us", flush=True)
    norm_fns = {"factored_norm": jax.jit(lambda w, a, b, q: dora_jax.factored_norm(
        w, a, b, SCALE, base_sq_norm=q)),
                "cross_wt_a": jax.jit(lambda w, a, b, q: lax.dot_general(
                    w, a, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32).T)}
    for pieces in (1, 2, 4, 8, 16):
      if d_in % pieces == 0:
        norm_fns[f"cross_split{pieces}"] = jax.jit(lambda w, a, b, q, p=pieces: cross_split(a, w, p))
    w_sets = [(w, a, b, w_sq)] + [((w + 0.0 * i).astype(dtype), a, b, w_sq) for i in (1, 2)]
    for name, fn in ({} if args.no_norm else norm_fns).items():
      prof = kernel_profile(fn, w_sets, steps=10)
      entry["norm_ms"][name] = dict(ms=harness.time_jitted(fn, w_sets, **kw),
                                    kernel_us=prof.get("kernel_us_per_step"),
                                    kernels=prof.get("kernels", [])[:6])
    print(f"{d_in}x{d_out} r={r} norm kernel us: " + "  ".join(
        f"{k} {v['kernel_us'] or float('nan'):.1f}" for k, v in entry["norm_ms"].items()),
          flush=True)
    result["configs"].append(entry)
    with open(os.path.join(args.out, "step_profile.json"), "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

"""Module-level benchmark suite: one adapted projection, every implementation.

  python benchmarks/module_suite.py --out benchmarks/results --benchmarks-md BENCHMARKS.md
                                                  # on one NVIDIA GPU: JSON, tables, plots
  python benchmarks/module_suite.py --out /tmp/smoke --smoke      # tiny shapes, any machine

Implementations, same device, same shapes, same process for JAX:
  lora            plain JAX LoRA (the floor)
  dora_auto/xla/pallas/mosaic   dora_jax.dora_dense with that backend
  dora_naive      JAX DoRA materialising a·b for the norm (a naive port)
  dora_cached     dora_jax inference with the norm computed once (cached scale)
and, in a separate process (torch), Hugging Face PEFT LoRA and DoRA.

Projections have no bias, as in the Llama/Mistral layers whose shapes are timed.
Modes: ``fwd`` (training-mode forward), ``fwd_bwd`` (value and gradients of
``Σ y ⊙ cot`` w.r.t. x and the adapter, random cotangent), ``infer`` (unmerged
inference, norm cached). Memory: XLA's compiled temp bytes of the fwd_bwd step
(JAX), ``max_memory_allocated`` over the weights (torch). Writes
``OUT/module_results.json``; ``benchmarks/report.py`` turns it into tables and
plots.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
import implementations as impls  # noqa: E402
import dora_jax  # noqa: E402

FULL_SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 8192), (8192, 28672)]
FULL_RANKS = [16, 64, 384]
FULL_TOKENS = [1, 16, 512, 4096, 16384]


def grid(smoke: bool):
  """The configurations: rank sweep at T=4096, token sweep, an fp32 subset."""
  if smoke:
    return ([dict(d_in=96, d_out=160, rank=r, tokens=64, dtype="float32", sweep="rank") for r in (4, 16)]
            + [dict(d_in=96, d_out=160, rank=8, tokens=t, dtype="float32", sweep="tokens") for t in (1, 64)])
  configs = [dict(d_in=i, d_out=o, rank=r, tokens=4096, dtype="bfloat16", sweep="rank")
             for (i, o) in FULL_SHAPES for r in FULL_RANKS]
  configs += [dict(d_in=4096, d_out=14336, rank=64, tokens=t, dtype="bfloat16", sweep="tokens")
              for t in FULL_TOKENS if t != 4096]
  configs += [dict(d_in=4096, d_out=4096, rank=r, tokens=4096, dtype="float32", sweep="fp32")
              for r in (16, 384)]
  return configs


def jax_impls(sweep: str, on_gpu: bool):
  out = {"lora": impls.lora, "dora_auto": impls.dora_jax_backend("auto")}
  if sweep != "tokens":
    out["dora_xla"] = impls.dora_jax_backend("xla")
    if on_gpu and sweep == "rank":  # float32 Pallas is never dispatched (6x slower, slow to compile)
      out["dora_pallas"] = impls.dora_jax_backend("pallas")
      out["dora_mosaic"] = impls.dora_jax_backend("mosaic")
    out["dora_naive"] = impls.dora_naive_dense
  return out


def inputs(cfg, sets=3):
  dtype = jnp.dtype(cfg["dtype"])
  key = jax.random.key(cfg["d_in"] * 7 + cfg["d_out"] + cfg["rank"])
  kernel, p, _, _ = impls.make_inputs(key, cfg["d_in"], cfg["d_out"], cfg["rank"], 1, dtype, 1)
  ks = jax.random.split(jax.random.fold_in(key, 1), 2 * sets)
  xs = [jax.random.normal(ks[i], (cfg["tokens"], cfg["d_in"])).astype(dtype) for i in range(sets)]
  cots = [jax.random.normal(ks[sets + i], (cfg["tokens"], cfg["d_out"])).astype(dtype)
          for i in range(sets)]
  return kernel, p, xs, cots


def run_jax(cfg, on_gpu, timing_kw):
  rows = []
  kernel, p, xs, cots = inputs(cfg)
  scale = 2.0
  for name, impl in jax_impls(cfg["sweep"], on_gpu).items():
    try:
      fwd = jax.jit(lambda x, p, k, impl=impl: impl(x, k, p, scale))
      ms = harness.time_jitted(fwd, [(x, p, kernel) for x in xs], **timing_kw)
      rows.append(dict(cfg, impl=name, framework="jax", mode="fwd", ms=ms))
      step = jax.jit(functools.partial(impls.train_grads(impl), scale=scale))
      compiled = step.lower(xs[0], p, kernel, cots[0]).compile()  # once: memory and timing
      temp = int(compiled.memory_analysis().temp_size_in_bytes)
      ms = harness.time_jitted(compiled, [(x, p, kernel, c) for x, c in zip(xs, cots)], **timing_kw)
      rows.append(dict(cfg, impl=name, framework="jax", mode="fwd_bwd", ms=ms,
                       temp_mb=temp / 2**20))
    except Exception as err:  # noqa: BLE001 - record and go on with the other implementations
      print(f"  {name} failed: {type(err).__name__}: {str(err)[:200]}", flush=True)
      rows.append(dict(cfg, impl=name, framework="jax", mode="error", ms=None,
                       error=f"{type(err).__name__}: {str(err)[:500]}"))
  norm = dora_jax.factored_norm(kernel, p["a"], p["b"], scale)
  cached = jax.jit(lambda x, p, k, n: dora_jax.dora_dense(x, k, p["a"], p["b"], p["m"], scale,
                                                           p["bias"], norm=n))
  ms = harness.time_jitted(cached, [(x, p, kernel, norm) for x in xs], **timing_kw)
  rows.append(dict(cfg, impl="dora_cached", framework="jax", mode="infer", ms=ms))
  return rows


def run_torch(configs, out_dir):
  cfg_path = os.path.join(out_dir, "peft_configs.json")
  res_path = os.path.join(out_dir, "peft_results.json")
  with open(cfg_path, "w") as f:
    json.dump([{k: c[k] for k in ("d_in", "d_out", "rank", "tokens", "dtype", "sweep")}
               for c in configs], f)
  proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peft_module.py"),
                         "--configs", cfg_path, "--out", res_path])
  if proc.returncode != 0 or not os.path.exists(res_path):
    print("PEFT side failed; continuing without it", flush=True)
    return [], {}
  with open(res_path) as f:
    data = json.load(f)
  return data["rows"], data["meta"]


def _without_commit(argv):
  """The command line as recorded: ``--commit X`` is bookkeeping, not part of it."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == "--commit":
      skip = True
    elif not arg.startswith("--commit="):
      out.append(arg)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats (CI)")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--only", default=None, choices=("rank", "tokens", "fp32"),
                      help="run one sweep of the grid")
  parser.add_argument("--torch-only", action="store_true", help="skip the JAX side")
  parser.add_argument("--commit", default=None,
                      help="commit to record in the results (default: git rev-parse HEAD)")
  parser.add_argument("--benchmarks-md", default=None,
                      help="also regenerate module.md, the plots and this file's tables "
                           "(benchmarks/report.py) from the JSON")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  on_gpu = jax.default_backend() == "gpu"
  configs = [c for c in grid(args.smoke) if args.only in (None, c["sweep"])]
  timing_kw = dict(calls=3, repeats=2, warmup=1) if args.smoke else dict(calls=10, repeats=5)
  start = time.time()
  rows = []
  print(harness.device_description(), flush=True)
  for i, cfg in enumerate([] if args.torch_only else configs):
    new = run_jax(cfg, on_gpu, timing_kw)
    rows.extend(new)
    summary = "  ".join(f"{r['impl']}/{r['mode']} {r['ms']:.3f}" for r in new if r["ms"])
    print(f"[{i + 1}/{len(configs)} {time.time() - start:5.0f}s] {cfg['d_in']}x{cfg['d_out']} "
          f"r={cfg['rank']} T={cfg['tokens']} {cfg['dtype']}: {summary}", flush=True)
    with open(os.path.join(args.out, "module_results.partial.json"), "w") as f:
      json.dump(dict(meta={}, rows=rows), f)  # survives an interrupted run
  torch_meta = {}
  if on_gpu and not args.no_torch:
    torch_rows, torch_meta = run_torch(configs, args.out)
    for r in torch_rows:
      r.setdefault("sweep", next(c["sweep"] for c in configs if all(
          c[k] == r[k] for k in ("d_in", "d_out", "rank", "tokens", "dtype"))))
    rows.extend(torch_rows)
  commit = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                         capture_output=True, text=True).stdout.strip() or "unknown"
  meta = dict(device=harness.device_description(), jax=jax.__version__,
              date=datetime.date.today().isoformat(), commit=commit,
              command="python benchmarks/module_suite.py " + " ".join(_without_commit(sys.argv[1:])),
              seconds=round(time.time() - start), **{f"torch_{k}": v for k, v in torch_meta.items()})
  path = os.path.join(args.out, "module_results.json")
  with open(path, "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)
  print(f"wrote {path} ({len(rows)} rows) in {time.time() - start:.0f}s", flush=True)
  if args.benchmarks_md:
    import report  # noqa: PLC0415 - matplotlib only when asked
    report.write_report(path, benchmarks_md=args.benchmarks_md)


if __name__ == "__main__":
  main()

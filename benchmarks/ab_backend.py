"""A/B of ``dora_dense`` between two checkouts of the package, on the same GPU.

  python benchmarks/ab_backend.py --out DIR --baseline PATH [--rounds 2]

``PATH`` is the root of another checkout (``git worktree add PATH COMMIT`` or
``git archive COMMIT | tar -x -C PATH``): its ``dora_jax`` is imported in one
child process, this checkout's in another, alternating for ``--rounds`` rounds
so that clock or thermal drift hits both alike. Each child times the
bias-free projection at the module suite's shapes (bf16, T = 4096,
``backend="auto"``, ``‖W‖²`` cached), forward and forward+backward, with
``harness.time_jitted`` (median of batches, inputs rotated). Writes
``DIR/ab_backend.json``; the table gives the median over rounds and the
new/baseline ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (8192, 28672)]
RANKS = [16, 384]


def child(tokens: int, smoke: bool, shapes=None) -> list[dict]:
  import functools
  import jax
  sys.path.insert(0, HERE)
  import harness
  import implementations as impls
  import dora_jax

  shapes = [(96, 160)] if smoke else (shapes or SHAPES)
  ranks = [4] if smoke else RANKS
  dtype = "float32" if smoke else "bfloat16"
  timing = dict(calls=2, repeats=2, warmup=1) if smoke else dict(calls=10, repeats=5)
  fn = impls.dora_jax_backend("auto")
  rows = []
  for d_in, d_out in shapes:
    for rank in ranks:
      kernel, p, xs, cots = impls.make_inputs(jax.random.key(d_in + d_out + rank), d_in, d_out,
                                              rank, tokens, jax.numpy.dtype(dtype), 3)
      fwd = jax.jit(lambda x, p, k: fn(x, k, p, 2.0))
      step = jax.jit(functools.partial(impls.train_grads(fn), scale=2.0))
      rows.append(dict(d_in=d_in, d_out=d_out, rank=rank, file=dora_jax.__file__,
                       fwd=harness.time_jitted(fwd, [(x, p, kernel) for x in xs], **timing),
                       fwd_bwd=harness.time_jitted(step, [(x, p, kernel, c)
                                                          for x, c in zip(xs, cots)], **timing)))
  return rows


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out")
  p.add_argument("--baseline")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--tokens", type=int, default=4096)
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--shapes", default=None, help="d_inxd_out,... (default: the module suite's)")
  p.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child is not None:
    sys.path.insert(0, args.child)
    shapes = None if args.shapes is None else [tuple(int(v) for v in s.split("x"))
                                               for s in args.shapes.split(",")]
    print("RESULT " + json.dumps(child(args.tokens, args.smoke, shapes)), flush=True)
    return
  new_root = os.path.dirname(HERE)
  runs = {"baseline": [], "new": []}
  for _ in range(args.rounds):
    for label, root in (("baseline", args.baseline), ("new", new_root)):
      cmd = [sys.executable, os.path.abspath(__file__), "--child", os.path.abspath(root),
             "--tokens", str(args.tokens)] + (["--smoke"] if args.smoke else [])
      cmd += [] if args.shapes is None else ["--shapes", args.shapes]
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.path.abspath(root)})
      lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
      if not lines:
        sys.exit(f"{label} child failed:\n{proc.stderr[-3000:]}")
      runs[label].append(json.loads(lines[-1][len("RESULT "):]))
  rows = []
  for i, base_row in enumerate(runs["baseline"][0]):
    row = {k: base_row[k] for k in ("d_in", "d_out", "rank")}
    for label in runs:
      for mode in ("fwd", "fwd_bwd"):
        row[f"{label}_{mode}"] = statistics.median(r[i][mode] for r in runs[label])
    rows.append(row)
    print(f"{row['d_in']}x{row['d_out']} r={row['rank']:<4} "
          + "  ".join(f"{mode} {row['baseline_' + mode]:.3f} -> {row['new_' + mode]:.3f} ms "
                      f"({row['new_' + mode] / row['baseline_' + mode]:.3f}x)"
                      for mode in ("fwd", "fwd_bwd")), flush=True)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "ab_backend.json"), "w") as f:
      json.dump(dict(command="python benchmarks/ab_backend.py " + " ".join(sys.argv[1:]),
                     files={k: v[0][0]["file"] for k, v in runs.items()}, rows=rows,
                     runs=runs), f, indent=1)


if __name__ == "__main__":
  main()

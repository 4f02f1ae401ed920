"""Training with the exact DoRA gradient (``detach_norm=False``) against PEFT's detached one.

  python benchmarks/exact_vs_detached.py --out DIR                 # 100 AdamW steps, CPU is fine
  python benchmarks/exact_vs_detached.py --out DIR --plot docs/exact_vs_detached.png
  python benchmarks/exact_vs_detached.py --out DIR --smoke         # a few steps, tiny model

A tiny random-init Llama (:func:`dora_jax.models.random_llama`), DoRA on all
seven projections (rank 8, alpha 16), the same seed, the same batches (token
sequences ``(start + i·stride) mod vocab``: learnable next-token structure) and
``optax.adamw`` for both runs; only ``apply_dora(..., detach_norm=)`` differs.
Writes ``DIR/exact_vs_detached.json`` (both loss curves, step times, the
configuration) and a plot of the two curves: a PNG with matplotlib when it is
importable, else an SVG written by hand (``--plot`` sets the file; its suffix
is replaced by ``.svg`` without matplotlib).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)
sys.path.insert(0, os.path.join(_ROOT, "examples"))

import dora_jax  # noqa: E402
from dora_jax.models import ALL_PROJECTIONS, LlamaConfig, random_llama  # noqa: E402
from finetune_llama import train_step  # noqa: E402  (the example's jitted AdamW step)

CONFIG = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
SMOKE_CONFIG = dict(CONFIG, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1)


def batches(steps: int, batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
  """``[steps, batch, length]`` int32 token ids ``(start + i·stride) mod vocab``."""
  rng = np.random.default_rng(seed)
  start = rng.integers(0, vocab, (steps, batch, 1))
  stride = rng.integers(1, 8, (steps, batch, 1))
  return ((start + stride * np.arange(length)) % vocab).astype(np.int32)


def train(config: LlamaConfig, data: np.ndarray, *, detach_norm: bool, lr: float, seed: int
          ) -> tuple[list[float], float]:
  """Per-step losses of one run and its mean step time (ms, after the first step)."""
  model = random_llama(config, seed=seed)
  dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=8, alpha=16.0, rngs=nnx.Rngs(seed),
                      detach_norm=detach_norm)
  opt = nnx.Optimizer(model, optax.adamw(lr, weight_decay=0.01), wrt=nnx.LoRAParam)
  losses, times = [], []
  for ids in data:
    start = time.perf_counter()
    losses.append(float(train_step(model, opt, jnp.asarray(ids))))
    times.append(time.perf_counter() - start)
  return losses, 1e3 * float(np.mean(times[1:])) if len(times) > 1 else float("nan")


def _svg(curves: dict[str, list[float]], title: str) -> str:
  """A minimal line plot of ``curves`` (step -> loss) as SVG text."""
  w, h, pad = 640, 400, 56
  values = [v for c in curves.values() for v in c]
  lo, hi = min(values), max(values)
  hi = hi if hi > lo else lo + 1.0
  n = max(len(c) for c in curves.values())
  sx = lambda i: pad + (w - 2 * pad) * i / max(n - 1, 1)
  sy = lambda v: h - pad - (h - 2 * pad) * (v - lo) / (hi - lo)
  colors = ["#1f77b4", "#d62728"]
  parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<text x="{w / 2}" y="20" text-anchor="middle">{title}</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 16}" text-anchor="middle">step</text>',
           f'<text x="{pad - 6}" y="{sy(lo):.1f}" text-anchor="end">{lo:.2f}</text>',
           f'<text x="{pad - 6}" y="{sy(hi):.1f}" text-anchor="end">{hi:.2f}</text>']
  for k, (name, curve) in enumerate(curves.items()):
    points = " ".join(f"{sx(i):.1f},{sy(v):.1f}" for i, v in enumerate(curve))
    parts.append(f'<polyline fill="none" stroke="{colors[k % 2]}" stroke-width="1.5" '
                 f'points="{points}"/>')
    parts.append(f'<text x="{w - pad - 4}" y="{pad + 16 * k}" text-anchor="end" '
                 f'fill="{colors[k % 2]}">{name}</text>')
  return "\n".join(parts + ["</svg>"]) + "\n"


def plot(curves: dict[str, list[float]], path: Path, title: str) -> Path:
  """The curves as a PNG (matplotlib) or, without matplotlib, an SVG; returns the file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  try:
    import matplotlib
  except ImportError:
    path = path.with_suffix(".svg")
    path.write_text(_svg(curves, title))
    return path
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
  for name, curve in curves.items():
    ax.plot(np.arange(len(curve)), curve, label=name, linewidth=1.2)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (next-token cross-entropy)")
  ax.set_title(title, fontsize=10)
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def _commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(argv: list[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="directory for exact_vs_detached.json")
  p.add_argument("--plot", help="plot file (default DIR/exact_vs_detached.png)")
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--smoke", action="store_true", help="tiny model, 6 steps")
  args = p.parse_args(argv)
  steps = 6 if args.smoke else args.steps
  if steps < 2:
    p.error(f"--steps must be at least 2, got {steps}")
  config = LlamaConfig(**(SMOKE_CONFIG if args.smoke else CONFIG))
  batch, length = (2, 8) if args.smoke else (8, 32)
  data = batches(steps, batch, length, config.vocab_size, args.seed)
  runs = {}
  for name, detach in (("detached (PEFT)", True), ("exact (detach_norm=False)", False)):
    losses, ms = train(config, data, detach_norm=detach, lr=args.lr, seed=args.seed)
    runs[name] = dict(detach_norm=detach, losses=losses, ms_per_step=ms)
    print(f"{name:28s} loss {losses[0]:.4f} -> {losses[-1]:.4f}  {ms:.1f} ms/step", flush=True)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  title = (f"tiny Llama, DoRA r=8 on all projections, AdamW lr={args.lr:g}, "
           f"{steps} steps, batch {batch}x{length}")
  figure = plot({k: v["losses"] for k, v in runs.items()},
                Path(args.plot) if args.plot else out / "exact_vs_detached.png", title)
  result = dict(meta=dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                          device=f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
                          commit=_commit(), command="python benchmarks/exact_vs_detached.py "
                          + " ".join(sys.argv[1:] if argv is None else argv),
                          config=dataclass_dict(config), batch=batch, length=length,
                          steps=steps, lr=args.lr, seed=args.seed, plot=figure.name),
                runs=runs)
  (out / "exact_vs_detached.json").write_text(json.dumps(result, indent=1) + "\n")
  return result


def dataclass_dict(config: LlamaConfig) -> dict:
  """The non-default fields of ``config`` (what :data:`CONFIG` set)."""
  return {k: getattr(config, k) for k in CONFIG}


if __name__ == "__main__":
  main()

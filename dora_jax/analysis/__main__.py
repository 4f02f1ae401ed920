"""``python -m dora_jax.analysis BASE TUNED [TUNED ...] --out DIR``: ΔM/ΔD table and plot.

Reads Orbax checkpoint directories or ``.safetensors`` files, prints one row per
layer and tuned checkpoint plus the Pearson correlation of ΔD and ΔM, and
writes ``DIR/delta_scatter.png`` (the plot) and ``DIR/delta_table.csv``.
Exit status 2 with a one-line ``error:`` message on bad input.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from dora_jax.analysis import checkpoints
from dora_jax.analysis.compare import compare, format_table, layer_pattern, rows_to_csv

PLOT_NAME = "delta_scatter.png"
CSV_NAME = "delta_table.csv"


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m dora_jax.analysis",
      description="DoRA weight-decomposition analysis: magnitude change ΔM and direction "
                  "change ΔD (1 - cos) per layer of fine-tuned checkpoints against a base.")
  parser.add_argument("base", help="base (pre-trained) checkpoint: Orbax directory or .safetensors")
  parser.add_argument("tuned", nargs="+", help="fine-tuned checkpoints, in order (e.g. by step)")
  parser.add_argument("--layers", default=None, metavar="REGEX",
                      help="keep layers whose '/'-joined path matches (re.search); default: all "
                           "2-D float tensors")
  parser.add_argument("--out", required=True, metavar="DIR",
                      help=f"output directory for {PLOT_NAME} and {CSV_NAME}")
  parser.add_argument("--scale", type=float, default=None,
                      help="LoRA scale s = alpha/r, needed when checkpoints hold unmerged "
                           "LoRA/DoRA adapters (lora_a, lora_b[, magnitude])")
  parser.add_argument("--labels", default=None,
                      help="comma-separated labels for the tuned checkpoints (default: file names)")
  parser.add_argument("--layout", choices=("flax", "torch"), default="flax",
                      help="flax: kernel [d_in, d_out] (default); torch: weight [d_out, d_in]")
  parser.add_argument("--title", default=None, help="plot title prefix")
  return parser


def run(args: argparse.Namespace) -> str:
  """Do the analysis for parsed ``args``; return the printed table."""
  labels = args.labels.split(",") if args.labels else [checkpoints.label(p) for p in args.tuned]
  if len(labels) != len(args.tuned):
    raise ValueError(f"--labels has {len(labels)} entries for {len(args.tuned)} tuned checkpoints")
  if len(set(labels)) != len(labels):
    labels = [os.fspath(p) for p in args.tuned]
  # Everything that can be checked is checked before anything large is loaded.
  try:
    layers = layer_pattern(args.layers)
  except ValueError as err:
    raise ValueError(f"--layers: {str(err).partition(': ')[2]}") from None
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    raise ValueError(f"--out {args.out}: exists and is not a directory")
  for path in (args.base, *args.tuned):
    if not os.path.exists(path):
      raise FileNotFoundError(f"checkpoint not found: {path}")
  from dora_jax.analysis import plot  # matplotlib only when the CLI runs

  plot.require_matplotlib()
  base = checkpoints.load(args.base)
  rows = []
  for label, path in zip(labels, args.tuned):
    rows += compare(base, checkpoints.load(path), layers=layers, checkpoint=label,
                    scale=args.scale, layout=args.layout)
  os.makedirs(args.out, exist_ok=True)
  png = plot.scatter(rows, os.path.join(args.out, PLOT_NAME), title=args.title)
  with open(os.path.join(args.out, CSV_NAME), "w", encoding="utf-8") as f:
    f.write(rows_to_csv(rows))
  return format_table(rows) + f"\nplot: {png}"


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    print(run(args))
  except (OSError, ValueError, TypeError, ImportError) as err:
    # Bad input, an unreadable checkpoint or a missing dependency: one line, status 2.
    message = re.sub(r"\s*\n\s*", " ", str(err)).strip() or type(err).__name__
    print(f"error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())

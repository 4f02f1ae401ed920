"""Tables and plots from ``module_results.json`` (written by ``module_suite.py``).

  python benchmarks/report.py benchmarks/results/module_results.json [--benchmarks-md BENCHMARKS.md]

Writes ``module.md`` (markdown tables) and ``time_vs_rank.png`` /
``time_vs_tokens.png`` beside the JSON; with ``--benchmarks-md`` it also
replaces the text between ``<!-- module:start -->`` and ``<!-- module:end -->``
in that file.
"""

from __future__ import annotations

import argparse
import collections
import json
import os

JAX_IMPLS = ["lora", "dora_auto", "dora_xla", "dora_pallas", "dora_mosaic", "dora_naive"]
TORCH_IMPLS = ["peft_lora", "peft_dora"]


def _index(rows):
  table = collections.defaultdict(dict)
  for r in rows:
    key = (r["d_in"], r["d_out"], r["rank"], r["tokens"], r["dtype"])
    table[key][(r["impl"], r["mode"])] = r
  return table


def _fmt(v, spec=".3f"):
  return "–" if v is None else format(v, spec)


def _ms(entry, impl, mode):
  r = entry.get((impl, mode))
  return None if r is None else r["ms"]


def rank_table(rows, mode, dtype):
  table = _index([r for r in rows if r.get("sweep") in ("rank", "fp32") and r["dtype"] == dtype])
  impls = [i for i in JAX_IMPLS + TORCH_IMPLS if any((i, mode) in e for e in table.values())]
  head = ["d_in×d_out", "r"] + impls + ["dora/lora (JAX)", "PEFT DoRA / dora"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (d_in, d_out, rank, tokens, _), e in sorted(table.items()):
    vals = [_ms(e, i, mode) for i in impls]
    lora, dora, peft = _ms(e, "lora", mode), _ms(e, "dora_auto", mode), _ms(e, "peft_dora", mode)
    ratio = None if not (lora and dora) else dora / lora
    speedup = None if not (peft and dora) else peft / dora
    lines.append("| " + " | ".join([f"{d_in}×{d_out}", str(rank)] + [_fmt(v) for v in vals]
                                   + [_fmt(ratio, ".2f") + "×", _fmt(speedup, ".2f") + "×"]) + " |")
  return "\n".join(lines)


def memory_table(rows, dtype):
  table = _index([r for r in rows if r.get("sweep") in ("rank", "fp32") and r["dtype"] == dtype])
  head = ["d_in×d_out", "r", "lora temp", "dora_auto temp", "dora_naive temp",
          "PEFT LoRA peak extra", "PEFT DoRA peak extra"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (d_in, d_out, rank, _, _), e in sorted(table.items()):
    get = lambda impl, field: (e.get((impl, "fwd_bwd")) or {}).get(field)
    vals = [get("lora", "temp_mb"), get("dora_auto", "temp_mb"), get("dora_naive", "temp_mb"),
            get("peft_lora", "peak_extra_mb"), get("peft_dora", "peak_extra_mb")]
    lines.append("| " + " | ".join([f"{d_in}×{d_out}", str(rank)] + [_fmt(v, ".0f") for v in vals]) + " |")
  return "\n".join(lines)


def token_table(rows):
  sel = [r for r in rows if r["dtype"] == "bfloat16" and r["d_in"] == 4096 and r["d_out"] == 14336
         and r["rank"] == 64]
  table = _index(sel)
  cols = [("lora", "fwd"), ("dora_auto", "fwd"), ("dora_cached", "infer"), ("peft_dora", "fwd"),
          ("lora", "fwd_bwd"), ("dora_auto", "fwd_bwd"), ("peft_lora", "fwd_bwd"), ("peft_dora", "fwd_bwd")]
  head = ["T"] + [f"{i} {m}" for i, m in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for key, e in sorted(table.items(), key=lambda kv: kv[0][3]):
    lines.append("| " + " | ".join([str(key[3])] + [_fmt(_ms(e, i, m)) for i, m in cols]) + " |")
  return "\n".join(lines)


def plots(rows, out_dir):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  shape = max({(r["d_in"], r["d_out"]) for r in rows if r.get("sweep") == "rank"},
              key=lambda s: s[0] * s[1], default=None)
  if shape is not None:
    _rank_plot(plt, rows, shape, out_dir)
  sweep = sorted({(r["d_in"], r["d_out"], r["rank"]) for r in rows if r.get("sweep") == "tokens"})
  if sweep:
    _tokens_plot(plt, rows, sweep[-1], out_dir)


def _rank_plot(plt, rows, shape, out_dir):
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
    for impl in JAX_IMPLS + TORCH_IMPLS:
      pts = sorted((r["rank"], r["ms"]) for r in rows if r.get("sweep") == "rank"
                   and (r["d_in"], r["d_out"]) == shape and r["impl"] == impl and r["mode"] == mode)
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl)
    ax.set(xscale="log", xlabel="rank", ylabel="ms", title=f"{mode}, {shape[0]}×{shape[1]}, T=4096")
    ranks = sorted({r["rank"] for r in rows if r.get("sweep") == "rank"})
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.minorticks_off()
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "time_vs_rank.png"), dpi=110)
  plt.close(fig)


def _tokens_plot(plt, rows, layer, out_dir):
  d_in, d_out, rank = layer
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, mode in zip(axes, ("fwd", "fwd_bwd")):
    for impl in JAX_IMPLS + TORCH_IMPLS + ["dora_cached"]:
      m = "infer" if impl == "dora_cached" else mode
      if impl == "dora_cached" and mode != "fwd":
        continue
      pts = sorted((r["tokens"], r["ms"]) for r in rows if r["impl"] == impl and r["mode"] == m
                   and (r["d_in"], r["d_out"], r["rank"]) == layer
                   and r.get("sweep") in ("tokens", "rank"))
      if pts:
        ax.plot(*zip(*pts), marker="o", label=impl if impl != "dora_cached" else "dora_cached (infer)")
    ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="ms",
           title=f"{mode}, {d_in}×{d_out}, r={rank}")
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "time_vs_tokens.png"), dpi=110)
  plt.close(fig)


def render(data, report_command: str) -> str:
  meta, rows = data["meta"], data["rows"]
  parts = [
      f"Device: {meta.get('device')}; torch {meta.get('torch_torch', '–')}, peft "
      f"{meta.get('torch_peft', '–')}; date {meta.get('date')}; commit {meta.get('commit')}; "
      f"suite wall time {meta.get('seconds')} s."
      + (f" PEFT: {meta['torch_note']}." if meta.get("torch_note") else "")
      + (f" Note: {meta['note']}." if meta.get("note") else "")
      + f"\n\nCommand: `{meta.get('command')}`, then `{report_command}`.",
      "### Forward (training mode), bf16, T=4096, ms (median)\n\n" + rank_table(rows, "fwd", "bfloat16"),
      "### Forward+backward, bf16, T=4096, ms (median)\n\n" + rank_table(rows, "fwd_bwd", "bfloat16"),
      "### Memory of the forward+backward step, bf16, T=4096, MiB\n\nJAX: XLA's compiled temp "
      "bytes of the jitted step. torch: `max_memory_allocated` during the step minus what was "
      "allocated before it (weights, inputs).\n\n" + memory_table(rows, "bfloat16"),
      "### Tokens sweep, bf16, 4096×14336, r=64, ms\n\n`dora_cached infer` is unmerged inference "
      "with the norm computed once (cached scale).\n\n" + token_table(rows),
      "### fp32, T=4096\n\nForward:\n\n" + rank_table(rows, "fwd", "float32")
      + "\n\nForward+backward:\n\n" + rank_table(rows, "fwd_bwd", "float32"),
      "![time vs rank](benchmarks/results/time_vs_rank.png)\n\n"
      "![time vs tokens](benchmarks/results/time_vs_tokens.png)",
  ]
  return "\n\n".join(parts) + "\n"


def write_report(results: str, extra=(), benchmarks_md: str | None = None) -> None:
  """Merge the result files, write ``module.md`` and the plots beside ``results``
  and, with ``benchmarks_md``, the tables between that file's markers."""
  with open(results) as f:
    data = json.load(f)
  for path in extra:
    with open(path) as f:
      more = json.load(f)
    data["rows"] += more["rows"]
    data["meta"].update({k: v for k, v in more["meta"].items() if k.startswith("torch_")})
  out_dir = os.path.dirname(os.path.abspath(results))
  text = render(data, "python benchmarks/report.py " + " ".join(
      os.path.relpath(p) for p in [results, *extra])
      + (f" --benchmarks-md {os.path.relpath(benchmarks_md)}" if benchmarks_md else ""))
  with open(os.path.join(out_dir, "module.md"), "w") as f:
    f.write(text)
  plots(data["rows"], out_dir)
  if benchmarks_md:
    with open(benchmarks_md) as f:
      doc = f.read()
    start, end = "<!-- module:start -->", "<!-- module:end -->"
    if start not in doc or end not in doc:
      raise SystemExit(f"{benchmarks_md} lacks the {start} ... {end} markers")
    head, rest = doc.split(start, 1)
    _, tail = rest.split(end, 1)
    with open(benchmarks_md, "w") as f:
      f.write(head + start + "\n" + text + end + tail)
  print(f"wrote {out_dir}/module.md and plots", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("results", help="module_results.json")
  parser.add_argument("extra", nargs="*", help="more result files to merge (e.g. a --torch-only run)")
  parser.add_argument("--benchmarks-md", default=None)
  args = parser.parse_args()
  write_report(args.results, args.extra, args.benchmarks_md)


if __name__ == "__main__":
  main()

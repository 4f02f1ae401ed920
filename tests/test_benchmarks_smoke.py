"""The benchmark suite runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_module_suite_and_report_smoke(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "module_suite.py"),
                        "--out", str(tmp_path), "--smoke"], capture_output=True, text=True,
                       timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  data = json.loads((tmp_path / "module_results.json").read_text())
  impls = {r["impl"] for r in data["rows"]}
  assert {"lora", "dora_auto", "dora_xla", "dora_naive", "dora_cached"} <= impls
  assert all(r["ms"] > 0 for r in data["rows"])
  doc = tmp_path / "BENCHMARKS.md"
  doc.write_text("# x\n<!-- module:start -->\nold\n<!-- module:end -->\ntail\n")
  rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"),
                        str(tmp_path / "module_results.json"), "--benchmarks-md", str(doc)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert rep.returncode == 0, rep.stderr[-3000:]
  text = doc.read_text()
  assert "old" not in text and "tail" in text and "Forward+backward" in text
  assert (tmp_path / "time_vs_rank.png").read_bytes()[:4] == b"\x89PNG"


def test_decoder_layer_smoke(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decoder_layer.py"),
                        "--out", str(tmp_path), "--smoke", "--ranks", "4"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((tmp_path / "decoder_results.json").read_text())["rows"]
  assert {r["impl"] for r in rows} == {"lora", "dora"}
  assert all(r["ms"] > 0 and r["temp_mb"] > 0 for r in rows)


def test_module_suite_regenerates_benchmarks_md(tmp_path):
  """The one-command form: suite, then module.md, plots and the doc's tables."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  doc = tmp_path / "BENCHMARKS.md"
  doc.write_text("# x\n<!-- module:start -->\nold\n<!-- module:end -->\ntail\n")
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "module_suite.py"),
                        "--out", str(tmp_path), "--smoke", "--only", "tokens",
                        "--commit", "abc1234", "--benchmarks-md", str(doc)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  text = doc.read_text()
  assert "old" not in text and "commit abc1234" in text and "--commit" not in text
  assert (tmp_path / "module.md").exists() and (tmp_path / "time_vs_tokens.png").exists()


def test_overhead_breakdown_and_grad_accum_smoke(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for script, result in (("overhead_breakdown.py", "overhead_breakdown.json"),
                         ("grad_accum.py", "grad_accum.json")):
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script),
                          "--out", str(tmp_path), "--smoke"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert run.returncode == 0, (script, run.stderr[-3000:])
    rows = json.loads((tmp_path / result).read_text())["rows"]
    assert rows and all(v > 0 for r in rows for k, v in r.items() if k.endswith("ms"))
  accum = json.loads((tmp_path / "grad_accum.json").read_text())["rows"]
  assert all(r["max_rel_diff"] < 1e-2 for r in accum)  # norm once == norm per micro-batch


def test_qdora_smoke(tmp_path):
  """QDoRA vs bf16 DoRA vs qwix QLoRA, and the frozen-weight memory table."""
  pytest.importorskip("qwix")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "qdora.py"),
                        "--out", str(tmp_path), "--smoke"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  data = json.loads((tmp_path / "qdora.json").read_text())
  impls = {r["impl"] for r in data["rows"]}
  assert impls == {"lora_bf16", "dora_bf16", "qdora_nf4", "qlora_nf4", "qdora_int8",
                   "qlora_int8", "qdora_fp8", "qlora_fp8"}
  assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in data["rows"])
  # QDoRA computes DoRA over the dequantized weight (bf16 rounding apart)
  assert all(r["rel_diff"] < 1e-2 for r in data["rows"] if r["impl"].startswith("qdora"))
  per_param = {r["qtype"]: r["bytes_per_param"] for r in data["memory"]}
  assert per_param["bf16"] == 2 and per_param["nf4"] < 0.6 and per_param["int8"] < 1.1

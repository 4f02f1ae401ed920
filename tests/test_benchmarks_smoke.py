"""The benchmark suite runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(script: str, *args: str, timeout: int = 600) -> None:
  """Run ``benchmarks/<script> *args`` on the CPU in a fresh interpreter; fail with its stderr."""
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args],
                       capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=ROOT)
  assert run.returncode == 0, (script, run.stderr[-3000:])


def test_module_suite_report_and_benchmarks_md(tmp_path):
  """The one-command form (suite, then module.md, plots and the doc's tables),
  and report.py rerun by hand on the suite's JSON."""
  doc = tmp_path / "BENCHMARKS.md"
  doc.write_text("# x\n<!-- module:start -->\nold\n<!-- module:end -->\ntail\n")
  run_benchmark("module_suite.py",
                "--out", str(tmp_path), "--smoke", "--commit", "abc1234", "--benchmarks-md", str(doc))
  data = json.loads((tmp_path / "module_results.json").read_text())
  impls = {r["impl"] for r in data["rows"]}
  assert {"lora", "dora_auto", "dora_xla", "dora_naive", "dora_cached"} <= impls
  assert all(r["ms"] > 0 for r in data["rows"])
  text = doc.read_text()
  assert "old" not in text and "tail" in text and "Forward+backward" in text
  assert "commit abc1234" in text and "--commit" not in text
  assert (tmp_path / "module.md").exists() and (tmp_path / "time_vs_tokens.png").exists()
  assert (tmp_path / "time_vs_rank.png").read_bytes()[:4] == b"\x89PNG"
  doc.write_text("# x\n<!-- module:start -->\nold\n<!-- module:end -->\ntail\n")
  run_benchmark("report.py", str(tmp_path / "module_results.json"),
                "--benchmarks-md", str(doc), timeout=300)
  text = doc.read_text()
  assert "old" not in text and "tail" in text and "Forward+backward" in text


def test_decoder_layer_smoke(tmp_path):
  run_benchmark("decoder_layer.py", "--out", str(tmp_path), "--smoke", "--ranks", "4")
  rows = json.loads((tmp_path / "decoder_results.json").read_text())["rows"]
  assert {r["impl"] for r in rows} == {"lora", "dora"}
  assert all(r["ms"] > 0 and r["temp_mb"] > 0 for r in rows)


def test_overhead_breakdown_and_grad_accum_smoke(tmp_path):
  for script, result in (("overhead_breakdown.py", "overhead_breakdown.json"),
                         ("grad_accum.py", "grad_accum.json")):
    run_benchmark(script, "--out", str(tmp_path), "--smoke")
    rows = json.loads((tmp_path / result).read_text())["rows"]
    assert rows and all(v > 0 for r in rows for k, v in r.items() if k.endswith("ms"))
  accum = json.loads((tmp_path / "grad_accum.json").read_text())["rows"]
  assert all(r["max_rel_diff"] < 1e-2 for r in accum)  # norm once == norm per micro-batch


def test_qdora_smoke(tmp_path):
  """QDoRA vs bf16 DoRA vs qwix QLoRA, and the frozen-weight memory table."""
  pytest.importorskip("qwix")
  run_benchmark("qdora.py", "--out", str(tmp_path), "--smoke")
  data = json.loads((tmp_path / "qdora.json").read_text())
  impls = {r["impl"] for r in data["rows"]}
  assert impls == {"lora_bf16", "dora_bf16", "qdora_nf4", "qlora_nf4", "qdora_int8",
                   "qlora_int8", "qdora_fp8", "qlora_fp8"}
  assert all(r["ms"] > 0 and r["peak_mib"] > 0 for r in data["rows"])
  # QDoRA computes DoRA over the dequantized weight (bf16 rounding apart)
  assert all(r["rel_diff"] < 1e-2 for r in data["rows"] if r["impl"].startswith("qdora"))
  per_param = {r["qtype"]: r["bytes_per_param"] for r in data["memory"]}
  assert per_param["bf16"] == 2 and per_param["nf4"] < 0.6 and per_param["int8"] < 1.1


def test_step_profile_variants_pass_their_options():
  """Each A/B step of benchmarks/step_profile.py traces, and its KernelOptions
  reach the kernels (traced only: no kernel runs)."""
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    import step_profile  # noqa: PLC0415
  finally:
    sys.path.remove(str(ROOT / "benchmarks"))
  sd = lambda *shape, dt=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
  f32 = jnp.float32
  args = (sd(128, 256), sd(256, 16), sd(16, 256), sd(256, dt=f32), sd(256, 256), sd(256, dt=f32),
          sd(256, dt=f32), sd(128, 256))
  kernels = {name: set(re.findall(r"name=(dora_\w+)", str(jax.make_jaxpr(fn)(*args))))
             for name, fn in step_profile.step_functions(["xla", "pallas", "mosaic"]).items()}
  assert kernels["lora"] == set() == kernels["dora_xla"]
  assert "dora_dual_matmul" in kernels["dora_pallas"]
  for backend in ("pallas", "mosaic"):
    assert "dora_column_norm" in kernels[f"dora_{backend}"]
    assert "dora_column_norm" not in kernels[f"dora_{backend}_factored_norm"]
    assert "dora_column_norm" not in kernels[f"dora_{backend}_nonorm"]
  assert "dora_flagged_dy_dot_pre" in kernels["dora_mosaic_y"]
  assert "dora_flagged_dy_dot_pre" not in kernels["dora_mosaic"]  # pre kept
  assert "dora_scale_reduce" not in kernels["dora_mosaic_xla_prologue"]
  assert "dora_scale_reduce" in kernels["dora_mosaic_y_sr_wide"]
  assert not any(k.startswith("dora_matmul_wt") for k in kernels["dora_mosaic_xla_dx"])
  assert any(k.startswith("dora_matmul_wt") for k in kernels["dora_mosaic"])


def test_model_step_smoke(tmp_path):
  """The model-level step benchmark (JAX sides; PEFT's needs a GPU or a torch env)."""
  run_benchmark("model_step.py", "--out", str(tmp_path), "--smoke", "--impls", "jax_dora,jax_lora")
  rows = json.loads((tmp_path / "model_step.json").read_text())["rows"]
  assert [r["impl"] for r in rows] == ["jax_dora", "jax_lora"]
  assert all(r["ms"] > 0 and r["trainable"] > 0 and len(r["losses"]) == 4 for r in rows)


def test_op_level_and_ab_backend_smoke(tmp_path):
  """The native-layout op benchmark, and the two-checkout A/B (this checkout against itself)."""
  run_benchmark("op_level.py", "--out", str(tmp_path), "--smoke")
  rows = json.loads((tmp_path / "op_level.json").read_text())["rows"]
  assert {r["impl"] for r in rows} == {"dense", "dense_exact", "native", "native_exact", "lora"}
  run_benchmark("ab_backend.py",
                "--smoke", "--out", str(tmp_path), "--baseline", str(ROOT), "--rounds", "1")
  data = json.loads((tmp_path / "ab_backend.json").read_text())
  assert all(r["new_fwd_bwd"] > 0 and r["baseline_fwd_bwd"] > 0 for r in data["rows"])


def test_exact_vs_detached_smoke(tmp_path):
  """The exact-vs-detached training script, in process (tiny model, a few steps): both
  runs start from the same loss, lower it, and the JSON and the plot are written."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "exact_vs_detached", ROOT / "benchmarks" / "exact_vs_detached.py")
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  result = script.main(["--out", str(tmp_path), "--smoke", "--lr", "1e-2"])
  runs = list(result["runs"].values())
  assert [r["detach_norm"] for r in runs] == [True, False]
  assert runs[0]["losses"][0] == runs[1]["losses"][0]  # same model, same data
  for run in runs:
    assert all(math.isfinite(v) for v in run["losses"]), run["losses"]
    assert run["losses"][-1] < run["losses"][0], run["losses"]
  saved = json.loads((tmp_path / "exact_vs_detached.json").read_text())
  assert saved["runs"] == json.loads(json.dumps(result["runs"]))
  plot = tmp_path / saved["meta"]["plot"]
  assert plot.read_bytes()[:4] in (b"\x89PNG", b"<svg")
  svg = script._svg({"a": [3.0, 2.0, 1.0], "b": [3.0, 2.5, 0.5]}, "t")
  assert svg.startswith("<svg") and svg.count("<polyline") == 2

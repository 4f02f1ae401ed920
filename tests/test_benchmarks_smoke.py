"""The benchmark suite runs end to end at tiny sizes (no timing assertions)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp

ROOT = Path(__file__).resolve().parents[1]


def test_module_suite_report_and_benchmarks_md(tmp_path):
  """The one-command form (suite, then module.md, plots and the doc's tables),
  and report.py rerun by hand on the suite's JSON."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  doc = tmp_path / "BENCHMARKS.md"
  doc.write_text("# x\n<!-- module:start -->\nold\n<!-- module:end -->\ntail\n")
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "module_suite.py"),
                        "--out", str(tmp_path), "--smoke", "--commit", "abc1234",
                        "--benchmarks-md", str(doc)],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
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
  rep = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "report.py"),
                        str(tmp_path / "module_results.json"), "--benchmarks-md", str(doc)],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
  assert rep.returncode == 0, rep.stderr[-3000:]
  text = doc.read_text()
  assert "old" not in text and "tail" in text and "Forward+backward" in text


def test_decoder_layer_smoke(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decoder_layer.py"),
                        "--out", str(tmp_path), "--smoke", "--ranks", "4"],
                       capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
  assert run.returncode == 0, run.stderr[-3000:]
  rows = json.loads((tmp_path / "decoder_results.json").read_text())["rows"]
  assert {r["impl"] for r in rows} == {"lora", "dora"}
  assert all(r["ms"] > 0 and r["temp_mb"] > 0 for r in rows)


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

"""Run a pytest module on 8 simulated CPU devices in a fresh interpreter; its JUnit results."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_on_eight_devices(script: Path, junit: Path, timeout: int = 900):
  """``(completed process, {test name: "passed" | "failed" | "skipped"})``."""
  flags = os.environ.get("XLA_FLAGS", "")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count=8".strip()}
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", str(script), "-q", "-p", "no:cacheprovider",
       f"--junitxml={junit}"],
      capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
  results: dict[str, str] = {}
  if junit.exists():
    for case in ET.parse(junit).getroot().iter("testcase"):
      status = "passed"
      for child in case:
        if child.tag in ("failure", "error"):
          status = "failed"
        elif child.tag == "skipped":
          status = "skipped"
      results[case.get("name")] = status
  return proc, results


def check_group(run, group: str) -> None:
  """Assert that every case of ``group`` (a test name, any parameters) in ``run`` passed."""
  proc, results = run
  tail = (proc.stdout + proc.stderr)[-4000:]
  cases = {n: s for n, s in results.items() if n == group or n.startswith(group + "[")}
  assert cases, f"no results for {group} (exit {proc.returncode}):\n{tail}"
  bad = {n: s for n, s in cases.items() if s != "passed"}
  assert not bad, f"{bad}\n{tail}"

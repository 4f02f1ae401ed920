"""Run a pytest module on 8 simulated CPU devices in a fresh interpreter; its JUnit results."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

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


def check_clean(run, groups) -> None:
  """Assert that ``run`` exited 0 and ran exactly the test functions ``groups``."""
  proc, results = run
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  covered = {name.split("[")[0] for name in results}
  assert covered == set(groups), covered ^ set(groups)


def eight_device_tests(script: str, groups, timeout: int = 900):
  """The fixture and tests of a module checking ``tests/scripts/<script>`` on 8 devices:
  ``(eight_device_run, test_on_eight_devices, test_eight_device_run_is_clean)``, to be
  bound to those names at the module's top level (one subprocess for all groups)."""

  @pytest.fixture(scope="module")
  def eight_device_run(tmp_path_factory):
    junit = tmp_path_factory.mktemp(Path(script).stem) / "junit.xml"
    return run_on_eight_devices(ROOT / "tests" / "scripts" / script, junit, timeout=timeout)

  @pytest.mark.slow
  @pytest.mark.parametrize("group", groups)
  def test_on_eight_devices(eight_device_run, group):
    check_group(eight_device_run, group)

  @pytest.mark.slow
  def test_eight_device_run_is_clean(eight_device_run):
    check_clean(eight_device_run, groups)

  return eight_device_run, test_on_eight_devices, test_eight_device_run_is_clean

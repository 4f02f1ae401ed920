"""The fused kernels per shard under a mesh: ``tests/scripts/mesh_kernel_checks.py`` on 8 devices.

JAX must start with 8 (simulated CPU) devices, so the checks run once in a
fresh interpreter (one subprocess for all of them) and each group below
asserts on its JUnit results.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.eight_devices import check_group, run_on_eight_devices

ROOT = Path(__file__).resolve().parents[1]

GROUPS = [
    "test_pallas_per_shard_matches_one_device",
    "test_norm_kernel_per_shard_communication",
    "test_factored_norm_communication",
    "test_mosaic_per_shard",
    "test_mosaic_untileable_shard_runs_xla_per_shard",
    "test_no_rule_falls_back_to_xla_once",
    "test_dora_einsum_uses_the_rules",
    "test_bad_input_names_the_argument",
    "test_benchmark_smoke",
]


@pytest.fixture(scope="module")
def eight_device_run(tmp_path_factory):
  junit = tmp_path_factory.mktemp("mesh_kernels") / "junit.xml"
  return run_on_eight_devices(ROOT / "tests" / "scripts" / "mesh_kernel_checks.py", junit,
                              timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("group", GROUPS)
def test_on_eight_devices(eight_device_run, group):
  check_group(eight_device_run, group)


@pytest.mark.slow
def test_eight_device_run_is_clean(eight_device_run):
  proc, results = eight_device_run
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
  assert {n.split("[")[0] for n in results} == set(GROUPS)

"""The fused kernels per shard under a mesh: ``tests/scripts/mesh_kernel_checks.py`` on 8 devices.

JAX must start with 8 (simulated CPU) devices, so the checks run once in a
fresh interpreter (one subprocess for all of them) and each group below
asserts on its JUnit results.
"""

from __future__ import annotations

from helpers.eight_devices import eight_device_tests

GROUPS = [
    "test_pallas_per_shard_matches_one_device",
    "test_norm_kernel_per_shard_communication",
    "test_norm_kernel_row_split_at_huge_scales",
    "test_factored_norm_communication",
    "test_mosaic_per_shard",
    "test_mosaic_untileable_shard_runs_xla_per_shard",
    "test_no_rule_falls_back_to_xla_once",
    "test_dora_einsum_uses_the_rules",
    "test_bad_input_names_the_argument",
    "test_benchmark_smoke",
]


eight_device_run, test_on_eight_devices, test_eight_device_run_is_clean = eight_device_tests(
    "mesh_kernel_checks.py", GROUPS, timeout=600)

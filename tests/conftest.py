"""Shared fixtures: a fresh PRNG key per test; GPU-only tests skipped off the GPU; xdist groups."""

from __future__ import annotations

import itertools
import os

# Off the GPU the tests compile hundreds of small XLA programs, and LLVM's
# optimisation of the CPU code is about 40% of the suite's time and none of
# what it tests: XLA's HLO passes (fusion, the programs the memory tests read)
# run as before. Set before JAX starts, so test subprocesses inherit it; GPU
# machines (an NVIDIA device node) compile as usual.
# Tests marked `default_opt` assert bit equality between two different compiled
# programs, which depends on the CPU code's optimisation: they are skipped here
# and run with DORA_JAX_TEST_DEFAULT_OPT=1 (XLA's default; a stage of .ci/run).
_UNOPTIMISED = "--xla_backend_optimization_level=0"
if not (os.path.exists("/dev/nvidiactl") or os.environ.get("DORA_JAX_TEST_DEFAULT_OPT") == "1"
        or "xla_backend_optimization_level" in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_UNOPTIMISED}".strip()
# (pytest-xdist's workers inherit the flag from the controller's environment)
DEFAULT_OPT = _UNOPTIMISED not in os.environ.get("XLA_FLAGS", "").split()

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest

_counter = itertools.count()

# On GPUs, float32 matmuls default to TF32 (~1e-3 relative); the float32 tests
# pin full-precision results, so they run with "highest" matmul precision.
if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "highest")


def gpu_available() -> bool:
  return jax.default_backend() == "gpu"


# Files whose tests share an expensive module fixture (an 8-device subprocess,
# a PyTorch subprocess): under pytest-xdist (`-n N`, `--dist loadgroup` set in
# pyproject.toml) each runs on one worker, so the fixture runs once.
_ONE_WORKER_FILES = ("test_sharding.py", "test_mesh_kernels.py", "test_peft_compat.py",
                     "test_llama.py", "test_embed_conv.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the group marks
def pytest_collection_modifyitems(config, items):
  loadgroup = getattr(config.option, "loadgroup", False)  # set in pytest-xdist's workers
  for item in items:
    if item.path.name in _ONE_WORKER_FILES:
      item.add_marker(pytest.mark.xdist_group(item.path.stem))
      if loadgroup and hasattr(item, "_id"):
        # pytest >= 9.2 reads a node's id from `_id`, not the `_nodeid` to which
        # pytest-xdist (3.8) appends the group: append it where it is read
        item._id = type(item._id).parse(f"{item.nodeid}@{item.path.stem}")
  if not DEFAULT_OPT:
    unoptimised = pytest.mark.skip(reason="bit equality of two programs at XLA's default CPU "
                                   "optimisation: run with DORA_JAX_TEST_DEFAULT_OPT=1")
    for item in items:
      if "default_opt" in item.keywords:
        item.add_marker(unoptimised)
  if gpu_available():
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def fresh_key(request):
  """A new PRNG key per test (and per call of the returned function)."""
  seed = hash(request.node.nodeid) % (2**31)

  def next_key():
    return jax.random.key(seed + 7919 * next(_counter))

  return next_key

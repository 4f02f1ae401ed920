"""Shared fixtures: a fresh PRNG key per test; GPU-only tests skipped off the GPU; xdist groups."""

from __future__ import annotations

import itertools

import jax
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

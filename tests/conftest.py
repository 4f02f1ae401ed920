"""Shared fixtures: fresh random DoRA layers and inputs (never zeros)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
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
_ONE_WORKER_FILES = ("test_sharding.py", "test_peft_compat.py", "test_llama.py",
                     "test_embed_conv.py")


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


def make_layer(key, d_in, d_out, rank, lead=(5,), *, dtype=jnp.float32, param_dtype=None,
               bias=True, b_scale=0.3):
  """Random ``(x, kernel, lora_a, lora_b, magnitude, bias, cotangent)``.

  ``lora_b`` is non-zero (``b_scale``) so the adapter changes the output, and the
  magnitude is perturbed from the column norms so ``g`` is not exactly 1.
  """
  param_dtype = dtype if param_dtype is None else param_dtype
  k = jax.random.split(key, 7)
  x = jax.random.normal(k[0], (*lead, d_in), jnp.float32).astype(dtype)
  kernel = (jax.random.normal(k[1], (d_in, d_out)) / jnp.sqrt(d_in)).astype(param_dtype)
  lora_a = (jax.random.uniform(k[2], (d_in, rank), minval=-1, maxval=1) / jnp.sqrt(d_in)).astype(param_dtype)
  lora_b = (b_scale * jax.random.normal(k[3], (rank, d_out))).astype(param_dtype)
  magnitude = (jnp.linalg.norm(kernel.astype(jnp.float32), axis=0)
               * (1.0 + 0.2 * jax.random.normal(k[4], (d_out,)))).astype(param_dtype)
  b = (0.5 * jax.random.normal(k[5], (d_out,))).astype(param_dtype) if bias else None
  cot = jax.random.normal(k[6], (*lead, d_out), jnp.float32).astype(dtype)
  return x, kernel, lora_a, lora_b, magnitude, b, cot

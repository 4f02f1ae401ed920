"""Framework-independent pieces shared by the Flax NNX and Linen DoRA layers.

Everything here works on the 2-D view of a layer (``kernel [d_in, d_out]``,
``lora_a [d_in, r]``, ``lora_b [r, d_out]``, ``magnitude [d_out]``); the
modules reshape their feature-shaped parameters to that view (a reshape, not a
copy) before calling in.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax._checks import check_real_scalar, precision_name
from dora_jax.dense import dora_dense
from dora_jax.norm import column_sq_norm, factored_norm

#: Length of the stamp stored next to a cached norm: two 32-bit checksums of the
#: adapter state plus a "valid" word (0 until the cache is first filled).
STAMP_SIZE = 3


def check_rank(rank: Any, d_in: int, d_out: int, where: str = "") -> None:
  """Raise ``ValueError`` unless ``1 <= rank <= min(d_in, d_out)``."""
  limit = min(d_in, d_out)
  at = f" for {where}" if where else ""
  if isinstance(rank, bool) or not isinstance(rank, int):
    raise TypeError(f"rank must be an int, got {type(rank).__name__}{at}")
  if rank < 1 or rank > limit:
    raise ValueError(
        f"rank must satisfy 1 <= rank <= min(d_in, d_out) = {limit}{at} "
        f"(d_in={d_in}, d_out={d_out}), got rank={rank}")


def check_dropout(rate: Any) -> float:
  """Return ``rate`` (any real scalar, see :func:`check_real_scalar`) as a float in ``[0, 1)``.

  Raises ``ValueError`` otherwise.
  """
  try:
    value = check_real_scalar("dropout", rate)
  except (TypeError, ValueError):
    value = math.nan
  if not 0.0 <= value < 1.0:
    raise ValueError(f"dropout must be a float in [0, 1), got {rate!r}")
  return value


def init_lora_a(key: jax.Array, shape: tuple[int, ...], d_in: int, dtype) -> jax.Array:
  """PEFT's ``lora_A`` init in Flax layout: ``U(-1/√d_in, 1/√d_in)``.

  PyTorch's ``kaiming_uniform_(a=√5)`` on ``[r, d_in]`` has gain ``√(2/(1+5))``
  and bound ``gain·√(3/fan_in) = 1/√d_in``; ``shape`` is ``[*in_shape, r]``.
  """
  return _uniform_init(key, tuple(shape), 1.0 / math.sqrt(d_in), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _uniform_init(key, shape, bound, dtype):
  # One compiled program instead of a dozen op-by-op dispatches per layer.
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


@jax.jit
def _column_norm(kernel2d: jax.Array) -> jax.Array:
  return jnp.sqrt(column_sq_norm(kernel2d))


def init_magnitude(kernel2d: jax.Array, dtype) -> jax.Array:
  """``‖W[:, j]‖₂`` ``[d_out]``: the magnitude at which DoRA starts (float32 math).

  Computed by a compiled reduction, the same fused square-and-sum the norm
  runs inside a jitted forward (op-by-op execution can round the sum
  differently), so that at init ``m`` equals the norm bit for bit.
  """
  return _column_norm(kernel2d).astype(dtype)


def _bits_u32(x: jax.Array) -> jax.Array:
  """The raw bits of ``x`` as a flat uint32 vector (64-bit values give two words)."""
  x = lax.stop_gradient(x)
  width = jnp.dtype(x.dtype).itemsize
  if width == 8:
    return lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
  uint = {4: jnp.uint32, 2: jnp.uint16, 1: jnp.uint8}[width]
  return lax.bitcast_convert_type(x, uint).reshape(-1).astype(jnp.uint32)


def fingerprint(*arrays: jax.Array) -> jax.Array:
  """A ``uint32 [3]`` stamp of the exact bits of ``arrays``: two checksums and a 1.

  Each checksum is ``Σ_i bits_i · w_i mod 2³²`` with odd, position-dependent
  weights ``w_i`` (the second on bit-mixed words), so changing any single
  element always changes the stamp, and an arbitrary change goes unnoticed
  only by a 64-bit coincidence. The cost is one read of the arrays (for the
  adapters, ``(d_in + d_out)·r`` elements), far below the ``O(d_in·d_out·r)``
  norm the stamp guards.
  """
  h1 = jnp.uint32(0)
  h2 = jnp.uint32(0)
  for salt, value in enumerate(arrays):
    bits = _bits_u32(value)
    idx = lax.iota(jnp.uint32, bits.shape[0])
    w1 = (idx * jnp.uint32(0x9E3779B1) + jnp.uint32(2 * salt + 0x6A09)) | jnp.uint32(1)
    w2 = (idx * jnp.uint32(0x85EBCA77) + jnp.uint32(7 * salt + 0xBB67)) | jnp.uint32(1)
    mixed = bits ^ (bits >> jnp.uint32(15))
    h1 = h1 + jnp.sum(bits * w1, dtype=jnp.uint32)
    h2 = h2 + jnp.sum(mixed * w2, dtype=jnp.uint32)
  return jnp.stack([h1, h2, jnp.uint32(1)])


#: ``column_sq_norm`` compiled once per shape, for the layers' eager cache fills.
column_sq_norm_jit = jax.jit(column_sq_norm)


def empty_stamp() -> jax.Array:
  """The stamp of an empty cache (its "valid" word is 0, so it never matches)."""
  return jnp.zeros((STAMP_SIZE,), jnp.uint32)


def cached_norm(kernel2d, lora_a2d, lora_b2d, scale: float, cache: jax.Array,
                stamp: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The DoRA norm ``[d_out]`` from ``cache`` when ``stamp`` still matches the adapters.

  Returns ``(norm, new_cache, new_stamp)``. The stamp covers ``lora_a``,
  ``lora_b`` and ``scale`` (what the norm depends on besides the frozen kernel);
  when it differs the norm is recomputed by :func:`dora_jax.factored_norm`
  inside a ``lax.cond``, so a stale cache is never used, and the caller may
  store ``new_cache``/``new_stamp`` so later calls are cheap again. The kernel
  itself is not stamped (reading it would cost as much as the layer at decode
  time): after replacing base weights, refresh the cache.
  """
  new_stamp = fingerprint(lora_a2d, lora_b2d, jnp.asarray(scale, jnp.float32))
  valid = jnp.all(new_stamp == stamp)
  a = lax.stop_gradient(lora_a2d)
  b = lax.stop_gradient(lora_b2d)
  norm = lax.cond(valid,
                  lambda: lax.stop_gradient(cache).astype(jnp.float32),
                  lambda: factored_norm(kernel2d, a, b, scale).astype(jnp.float32))
  return norm, norm, new_stamp


def precision_scope(precision):
  """Context applying a layer's ``precision`` to the matmuls traced inside it."""
  name = precision_name(precision)
  return contextlib.nullcontext() if name is None else jax.default_matmul_precision(name)


def dora_forward(x: jax.Array, kernel2d: jax.Array, lora_a2d: jax.Array,
                 lora_b2d: jax.Array, magnitude1d: jax.Array, scale: float,
                 bias1d: jax.Array | None, *, norm: jax.Array | None = None,
                 base_sq_norm: jax.Array | None = None,
                 x_dropped: jax.Array | None = None, precision=None,
                 detach_norm: bool = True) -> jax.Array:
  """DoRA forward for ``x [..., d_in]`` in the compute dtype, ``-> [..., d_out]``.

  Without dropout this is :func:`dora_jax.dora_dense`. With a dropped-out copy
  ``x̃`` of the input (PEFT applies dropout only on the adapter path)::

    y = x·W + bias + (g−1)⊙(x̃·W) + g⊙s·(x̃·a)·b
      = dora_dense(x̃) + (x − x̃)·W

  which costs one extra base matmul, as PEFT's formulation does. ``detach_norm``
  as :func:`dora_jax.dora_dense` (``False``: the exact gradient through the norm).

  Compiled as one ``jax.jit`` (inlined when called under a trace), so an eager
  call rounds the norm's reductions exactly as a jitted one does.
  """
  return _dora_forward_jit(x, kernel2d, lora_a2d, lora_b2d, magnitude1d, bias1d, norm,
                           base_sq_norm, x_dropped, scale=float(scale), precision=precision,
                           detach_norm=detach_norm)


@functools.partial(jax.jit, static_argnames=("scale", "precision", "detach_norm"))
def _dora_forward_jit(x, kernel2d, lora_a2d, lora_b2d, magnitude1d, bias1d, norm, base_sq_norm,
                      x_dropped, *, scale: float, precision, detach_norm: bool):
  kw = dict(norm=norm, base_sq_norm=base_sq_norm, precision=precision, detach_norm=detach_norm)
  with precision_scope(precision):
    if x_dropped is None:
      return dora_dense(x, kernel2d, lora_a2d, lora_b2d, magnitude1d, scale, bias1d, **kw)
    y = dora_dense(x_dropped, kernel2d, lora_a2d, lora_b2d, magnitude1d, scale, bias1d, **kw)
    rest = jnp.dot(x - x_dropped, kernel2d.astype(x.dtype))
    return (y.astype(jnp.promote_types(y.dtype, jnp.float32))
            + rest.astype(jnp.promote_types(rest.dtype, jnp.float32))).astype(y.dtype)

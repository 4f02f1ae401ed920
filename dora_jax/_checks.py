"""Argument validation shared by the public functions.

Every check raises ``ValueError`` (shapes, ranks) or ``TypeError`` (dtypes)
naming the offending argument and the shapes it saw, so a wrong layout
(for example a PyTorch ``[d_out, d_in]`` weight) fails loudly instead of
broadcasting into a silently wrong result.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


class DoraDims(NamedTuple):
  """Sizes of one adapted Dense layer: ``kernel [d_in, d_out]``, rank ``r``."""

  d_in: int
  d_out: int
  rank: int


def _shape(value) -> tuple[int, ...]:
  return tuple(np.shape(value))


def _dtype(value):
  return jnp.result_type(value)


def check_float(name: str, value) -> None:
  """Raise ``TypeError`` unless ``value`` has a floating dtype."""
  dtype = _dtype(value)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype (float16, bfloat16, float32 or "
        f"float64), got dtype {dtype} with shape {_shape(value)}"
    )


def check_weights(kernel, lora_a, lora_b) -> DoraDims:
  """Validate ``kernel [d_in, d_out]``, ``lora_a [d_in, r]``, ``lora_b [r, d_out]``."""
  for name, value in (("kernel", kernel), ("lora_a", lora_a), ("lora_b", lora_b)):
    if np.ndim(value) != 2:
      raise ValueError(
          f"{name} must be a 2-D array, got shape {_shape(value)}; expected "
          "kernel [d_in, d_out], lora_a [d_in, r], lora_b [r, d_out] (Flax layout)"
      )
    check_float(name, value)
  d_in, d_out = _shape(kernel)
  a_in, rank = _shape(lora_a)
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got lora_a with shape {_shape(lora_a)}")
  if a_in != d_in:
    raise ValueError(
        f"lora_a must be [d_in, r] = [{d_in}, r] to match kernel {_shape(kernel)}, "
        f"got lora_a {_shape(lora_a)}"
        + (" (is it in PyTorch's [r, d_in] layout?)" if rank == d_in else "")
    )
  if _shape(lora_b) != (rank, d_out):
    raise ValueError(
        f"lora_b must be [r, d_out] = [{rank}, {d_out}] to match kernel "
        f"{_shape(kernel)} and lora_a {_shape(lora_a)}, got lora_b {_shape(lora_b)}"
    )
  return DoraDims(d_in, d_out, rank)


def check_vector(name: str, value, d_out: int) -> None:
  """Validate a per-output-feature vector of shape ``[d_out]``."""
  if _shape(value) != (d_out,):
    raise ValueError(f"{name} must have shape [d_out] = [{d_out}], got {_shape(value)}")
  check_float(name, value)


def _is_traced(value) -> bool:
  return isinstance(value, jax.core.Tracer)


def _check_scalar_kind(name: str, value) -> None:
  """Raise unless ``value`` is a real scalar: a number, a numpy scalar or a 0-d int/float array."""
  if isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a real number, got a bool ({value!r})")
  if isinstance(value, numbers.Real):
    return
  if not hasattr(value, "shape") or not hasattr(value, "dtype"):
    raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r:.60})")
  if _shape(value) != ():
    raise ValueError(f"{name} must be a scalar (shape ()), got shape {_shape(value)}")
  dtype = _dtype(value)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
    raise TypeError(f"{name} must be a real scalar, got dtype {dtype}")


def check_real_scalar(name: str, value) -> float:
  """``value`` as a finite Python float, or an error naming ``name``.

  Accepts any real scalar: a Python ``int``/``float``, a numpy scalar
  (``np.float32(16)``, ``np.int64(8)``), or a 0-d numpy/JAX array of an integer
  or floating dtype (bfloat16 included). Refuses bools, complex numbers,
  strings, arrays with more than one element, traced values (the number is
  needed on the host) and NaN/±inf.

  Raises:
    TypeError: not a real scalar (or traced); ValueError: not 0-d, or not finite.
  """
  _check_scalar_kind(name, value)
  if _is_traced(value):
    raise TypeError(f"{name} must be a concrete number, got a traced value (pass a Python "
                    "number, not an argument of a jitted function)")
  try:
    number = float(value)
  except OverflowError:
    raise ValueError(f"{name} must be finite, got {value!r:.60} (too large for a float)") from None
  if not math.isfinite(number):
    raise ValueError(f"{name} must be finite, got {number}")
  return number


def check_scale(scale) -> None:
  """``scale`` must be a real scalar: a number or a 0-d array; finite unless traced."""
  _check_scalar_kind("scale", scale)
  if not _is_traced(scale):
    check_real_scalar("scale", scale)


def check_bool(name: str, value) -> bool:
  """``value`` if it is a Python ``bool``, else ``TypeError`` naming ``name``."""
  if not isinstance(value, bool):
    raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
  return value


def check_float_dtype(name: str, dtype) -> np.dtype:
  """``dtype`` as a ``numpy.dtype`` if it is a floating dtype, else ``TypeError`` naming ``name``."""
  try:
    dt = None if dtype is None else jnp.dtype(dtype)
  except TypeError:
    dt = None
  if dt is None or not jnp.issubdtype(dt, jnp.floating):
    raise TypeError(f"{name} must be a floating dtype (float16, bfloat16, float32 or float64), "
                    f"got {dt if dt is not None else repr(dtype)}")
  return dt


def check_input(x, d_in: int) -> None:
  """``x`` must be ``[..., d_in]`` with a floating dtype."""
  if np.ndim(x) < 1:
    raise ValueError(f"x must have at least one dimension [..., d_in], got shape {_shape(x)}")
  if _shape(x)[-1] != d_in:
    raise ValueError(
        f"x must be [..., d_in] with d_in = {d_in} (kernel's first axis), got x {_shape(x)}"
    )
  check_float("x", x)


def check_dora_args(x, kernel, lora_a, lora_b, magnitude, scale, bias=None) -> DoraDims:
  """Validate all arguments of :func:`dora_jax.dora_dense`; return the sizes."""
  dims = check_weights(kernel, lora_a, lora_b)
  if x is not None:
    check_input(x, dims.d_in)
  if magnitude is not None:
    check_vector("magnitude", magnitude, dims.d_out)
  if bias is not None:
    check_vector("bias", bias, dims.d_out)
  check_scale(scale)
  return dims


def accumulation_dtype(*values) -> jnp.dtype:
  """float32, or float64 when any input is float64 (with x64 enabled)."""
  dtype = jnp.float32
  for value in values:
    if value is not None and _dtype(value) == jnp.float64:
      dtype = jnp.float64
  return jnp.dtype(dtype)


def precision_name(precision) -> str | None:
  """Map a Flax/JAX ``precision`` setting to a ``jax.default_matmul_precision`` name."""
  if precision is None:
    return None
  if isinstance(precision, (tuple, list)):
    if len(set(precision)) != 1:
      raise ValueError(f"DoRA layers need one precision for both operands, got {precision!r}")
    precision = precision[0]
  if isinstance(precision, lax.Precision):
    return {lax.Precision.DEFAULT: "default", lax.Precision.HIGH: "high",
            lax.Precision.HIGHEST: "highest"}[precision]
  if isinstance(precision, str):
    if precision.lower() in ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"):
      return precision.lower()
    if precision.isupper():  # a dot algorithm name such as "BF16_BF16_F32_X3"
      return precision
  raise ValueError(f"precision must be None, a jax.lax.Precision or one of 'default', 'high', 'highest', got {precision!r}")

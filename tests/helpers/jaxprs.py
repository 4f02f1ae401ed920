"""Walking traced programs: which matmuls and primitives a jaxpr holds."""

from __future__ import annotations

import math
from collections import Counter

import jax
import jax.extend  # noqa: F401  (jax.extend.core.Jaxpr)


def sub_jaxprs(eqn):
  """The jaxprs nested in an equation's parameters (pjit, custom_vjp, loops, ...)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def dot_equations(closed_jaxpr) -> list:
  """Every dot_general equation in ``closed_jaxpr``, recursively."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn)
      for sub in sub_jaxprs(eqn):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return found


def dot_output_shapes(closed_jaxpr) -> list[tuple[int, ...]]:
  """The output shape of every dot_general in ``closed_jaxpr``, recursively."""
  return [tuple(out.aval.shape) for eqn in dot_equations(closed_jaxpr) for out in eqn.outvars]


def dense_shaped_dots(closed_jaxpr, d_in: int, d_out: int) -> list[str]:
  """Every dot_general (recursively) whose output has ``d_in·d_out`` or more elements."""
  return [f"dot_general -> {shape}" for shape in dot_output_shapes(closed_jaxpr)
          if math.prod(shape) >= d_in * d_out and {d_in, d_out} <= set(shape)]


def primitives_outside_kernels(jaxpr) -> set[str]:
  """Primitive names in ``jaxpr`` and its sub-jaxprs, not looking inside kernels."""
  names = set()
  for eqn in jaxpr.eqns:
    names.add(eqn.primitive.name)
    if eqn.primitive.name in ("pallas_call", "mpmd_map"):  # Triton / Mosaic GPU kernels
      continue
    for sub in sub_jaxprs(eqn):
      names |= primitives_outside_kernels(sub)
  return names


def float_outputs(closed):
  """``(primitive, shape)`` of every float value a (nested) jaxpr computes."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      for out in eqn.outvars:
        aval = out.aval
        if hasattr(aval, "dtype") and jax.numpy.issubdtype(aval.dtype, jax.numpy.floating):
          found.append((eqn.primitive.name, tuple(aval.shape)))
      for sub in sub_jaxprs(eqn):
        visit(sub)

  visit(closed.jaxpr)
  return found


def float_values_holding(closed, kernel_shape):
  """Float values holding all of the kernel's dimensions and at least its size."""
  want, size = Counter(kernel_shape), math.prod(kernel_shape)
  return sorted({(p, s) for p, s in float_outputs(closed)
                 if math.prod(s) >= size and not want - Counter(s)})


def largest_value_holding(closed, dims):
  """The largest float value (elements) whose shape holds all of ``dims``."""
  want = Counter(dims)
  return max((math.prod(s) for _, s in float_outputs(closed) if not want - Counter(s)),
             default=0)

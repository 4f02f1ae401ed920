"""Walking traced programs: which matmuls and primitives a jaxpr holds."""

from __future__ import annotations

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


def dense_shaped_dots(closed_jaxpr, d_in: int, d_out: int) -> list[str]:
  """Every dot_general (recursively) whose output has ``d_in·d_out`` or more elements."""
  found = []

  def visit(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        for out in eqn.outvars:
          shape = tuple(out.aval.shape)
          size = 1
          for s in shape:
            size *= s
          if size >= d_in * d_out and {d_in, d_out} <= set(shape):
            found.append(f"{eqn.primitive.name} -> {shape}")
      for sub in sub_jaxprs(eqn):
        visit(sub)

  visit(closed_jaxpr.jaxpr)
  return found


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

"""DoRA on one weight of a Linen module, at the contraction that consumes it.

Used by :func:`dora_jax.linen.intercept_dora` for modules whose contraction is
not known in advance (``nn.DenseGeneral``, ``nn.Einsum``, gemma's ``Einsum``,
custom modules): the model calls ``jnp.einsum(spec, x, w)`` or
``lax.dot_general(x, w, dims)`` on a param ``w`` of the module, and this
module runs :func:`dora_jax.general.dora_einsum` /
:func:`dora_jax.general.dora_dot_general` instead, with the adapters of ``w``
in the module's scope:

============== ================================================ ==============================
collection     name / shape                                     notes
============== ================================================ ==============================
``dora``       ``<w>/lora_a [*B, *C, r]``                       ``U(-1/√d_in, 1/√d_in)`` (PEFT)
``dora``       ``<w>/lora_b [*B, r, *O]``                       zeros
``dora``       ``<w>/magnitude [*B, *O]``                       ``‖W‖`` over ``C``, from the weight
``dora_cache`` ``<w>/norm``, ``<w>/stamp``                      with ``cache_norm=True``
``dora_cache`` ``<w>/base_sq_norm [*B, *O]``                    :func:`dora_jax.linen.cache_base_norms`
============== ================================================ ==============================

(``C``: the weight's axes contracted with the input, ``B``: batch axes shared by
input, weight and output, ``O``: output-only axes, each in the weight's own
order; ``d_in = prod(C)``; see :class:`dora_jax.general.WeightLayout`.)

QDoRA: a param that holds a quantized weight (:class:`dora_jax.quantized.QuantizedKernel`)
runs DoRA over it (its own part-by-part contractions, ``magnitude = ‖Ŵ‖``). With
``Settings.base_dtype``, a float param is quantized when its adapters are created
and written back to ``params`` (which must then be mutable): :func:`quantized_weight`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from dora_jax import _adapter, general
from dora_jax.dense import lora_scale
from dora_jax.linen._common import (ADAPTER_COLLECTION, ADAPTER_NAMES, CACHE_COLLECTION,
                                    check_settings)
from dora_jax.linen.dense import dropped_input


@dataclasses.dataclass(frozen=True)
class Settings:
  """One interception's DoRA configuration (hashable: it keys jit caches)."""

  rank: int
  alpha: float
  rslora: bool = False
  dropout: float = 0.0
  adapter_dtype: Any = jnp.dtype(jnp.float32)
  cache_norm: bool = False
  deterministic: bool | None = None
  base_dtype: str | None = None
  block_size: int | None = None
  detach_norm: bool = True  # False: the exact gradient through the norm

  @property
  def scale(self) -> float:
    return lora_scale(self.alpha, self.rank, rslora=self.rslora)


class WeightOp(NamedTuple):
  """One contraction of a weight as the model wrote it (static, hashable).

  ``kind`` is ``"einsum"`` (``spec``, the weight the second operand) or
  ``"dot_general"`` (``dimension_numbers``, the weight the rhs).
  """

  kind: str
  spec: str | None
  dimension_numbers: Any
  precision: Any
  preferred_element_type: Any

  @classmethod
  def einsum(cls, spec: str, precision=None, preferred_element_type=None) -> "WeightOp":
    return cls("einsum", spec.replace(" ", ""), None, _hashable(precision),
               preferred_element_type)

  @classmethod
  def dot_general(cls, dimension_numbers, precision=None,
                  preferred_element_type=None) -> "WeightOp":
    (lc, rc), (lb, rb) = dimension_numbers
    dims = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    return cls("dot_general", None, dims, _hashable(precision), preferred_element_type)

  def describe(self) -> str:
    if self.kind == "einsum":
      return f"jnp.einsum('{self.spec}')"
    return f"lax.dot_general({self.dimension_numbers})"

  def layout(self, x_shape, kernel_shape):
    """The weight's :class:`dora_jax.general.WeightLayout` in this op."""
    if self.kind == "einsum":
      return general.einsum_layout(self.spec, x_shape, kernel_shape)
    return general.dot_general_layout(self.dimension_numbers, x_shape, kernel_shape)

  def base(self, x, kernel):
    """The model's own contraction (the base output; over a quantized weight, the quantized op)."""
    if isinstance(kernel, general.QuantizedWeight):
      from dora_jax import quantized
      kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
      if self.kind == "einsum":
        return quantized.quantized_einsum(self.spec, x, kernel, **kw)
      return quantized.quantized_dot_general(x, kernel, self.dimension_numbers, **kw)
    if self.kind == "einsum":
      return jnp.einsum(self.spec, x, kernel, precision=self.precision,
                        preferred_element_type=self.preferred_element_type)
    return lax.dot_general(x, kernel, self.dimension_numbers, precision=self.precision,
                           preferred_element_type=self.preferred_element_type)

  def dora(self, x, kernel, lora_a, lora_b, magnitude, scale, norm, base_sq_norm,
           detach_norm: bool = True):
    kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type,
              norm=norm, base_sq_norm=base_sq_norm, detach_norm=detach_norm)
    if self.kind == "einsum":
      return general.dora_einsum(self.spec, x, kernel, lora_a, lora_b, magnitude, scale, **kw)
    return general.dora_dot_general(x, kernel, lora_a, lora_b, magnitude, scale,
                                    self.dimension_numbers, **kw)


def _hashable(precision):
  return tuple(precision) if isinstance(precision, list) else precision


@functools.partial(jax.jit, static_argnames=("op", "scale", "detach_norm"))
def _forward(x, kernel, lora_a, lora_b, magnitude, norm, base_sq_norm, x_dropped, *,
             op: WeightOp, scale: float, detach_norm: bool = True):
  """``op``'s DoRA output; with dropout ``dora(x̃) + op(x − x̃, W)`` (PEFT).

  One compiled program, so an eager call rounds the norm as a jitted model does.
  """
  if x_dropped is None:
    return _materialized(op.dora(x, kernel, lora_a, lora_b, magnitude, scale, norm,
                                 base_sq_norm, detach_norm))
  y = op.dora(x_dropped, kernel, lora_a, lora_b, magnitude, scale, norm, base_sq_norm,
              detach_norm)
  rest = op.base(x - x_dropped, kernel)
  acc = jnp.promote_types(y.dtype, jnp.float32)
  return _materialized((y.astype(acc) + rest.astype(acc)).astype(y.dtype))


@jax.custom_vjp
def _materialized(y):
  """``y``, written out before its consumers use it (forward only).

  XLA fuses the DoRA epilogue ``g ⊙ (base + s·h·b)`` into the layer's
  consumers (a residual add and an RMSNorm, say), which can change how those
  consumers' reductions are compiled and round: Gemma3's attention output
  (two contracted axes) came out 3.8e-6 off the base at init that way, although
  the layer's own output was bit-exact. Materialising ``y``, as the base op's
  output is, keeps the rest of the model compiled as in the base model. The
  cotangent passes through unchanged (no barrier in the backward).
  """
  return lax.optimization_barrier(y)


def _materialized_fwd(y):
  return lax.optimization_barrier(y), None


def _materialized_bwd(_, dy):
  return (dy,)


_materialized.defvjp(_materialized_fwd, _materialized_bwd)


@functools.partial(jax.jit, static_argnums=(1,))
def _base_sq_norm(kernel, layout):
  return general.weight_sq_norm(kernel, layout)


def base_sq_norm(kernel: jax.Array, layout) -> jax.Array:
  """``‖W‖²`` over the contracted axes, ``[*B, *O]`` float32 (compiled once per layout)."""
  return _base_sq_norm(kernel, layout)


def _cached_norm(kernel, lora_a, lora_b, scale, layout, cache, stamp, base_sq):
  """The norm ``[*B, *O]`` from ``cache`` while ``stamp`` matches the adapters, else recomputed.

  Returns ``(norm, new_cache, new_stamp)`` (see :func:`dora_jax._adapter.cached_norm`).
  """
  new_stamp = _adapter.fingerprint(lora_a, lora_b, jnp.asarray(scale, jnp.float32))
  valid = jnp.all(new_stamp == stamp)
  a, b = lax.stop_gradient(lora_a), lax.stop_gradient(lora_b)
  norm = lax.cond(valid, lambda: lax.stop_gradient(cache).astype(jnp.float32),
                  lambda: general.weight_norm(kernel, a, b, scale, layout,
                                                 base_sq_norm=base_sq).astype(jnp.float32))
  return norm, norm, new_stamp


def _adapters(module: nn.Module, name: str, layout, kernel, settings: Settings,
              where: str) -> Mapping[str, jax.Array]:
  """The adapter dict of weight ``name`` (created when ``dora`` is mutable and it is missing)."""
  scope = module.scope
  want = dict(zip(ADAPTER_NAMES, layout.adapter_shapes(settings.rank)))
  if scope.has_variable(ADAPTER_COLLECTION, name):
    group = scope.get_variable(ADAPTER_COLLECTION, name)
    got = ({k: tuple(jnp.shape(group[k])) for k in ADAPTER_NAMES if k in group}
           if isinstance(group, Mapping) else None)
    if got != want:
      raise ValueError(
          f"intercept_dora: the adapters at {where!r} have shapes {got}, but rank "
          f"{settings.rank} on this weight ({layout}) needs {want}")
    return group
  if not scope.is_mutable_collection(ADAPTER_COLLECTION):
    raise ValueError(
        f"intercept_dora: no DoRA adapters for {where!r} in the '{ADAPTER_COLLECTION}' "
        f"collection: create them by applying the model inside intercept_dora with "
        f"mutable=['{ADAPTER_COLLECTION}'] (or init) and a 'params' rng")
  check_settings(where, rank=settings.rank, alpha=settings.alpha, dropout=settings.dropout,
                 adapter_dtype=settings.adapter_dtype, d_in=layout.d_in, d_out=layout.d_out)
  a_shape, b_shape, _ = layout.adapter_shapes(settings.rank)
  dtype = jnp.dtype(settings.adapter_dtype)
  group = {
      "lora_a": _adapter.init_lora_a(scope.make_rng("params"), a_shape, layout.d_in, dtype),
      "lora_b": jnp.zeros(b_shape, dtype),
      "magnitude": general.init_magnitude(kernel, layout, dtype),
  }
  scope.put_variable(ADAPTER_COLLECTION, name, group)
  return group


def _norm_inputs(module: nn.Module, name: str, layout, kernel, group, settings: Settings,
                 where: str):
  """``(norm, base_sq_norm)`` from the ``dora_cache`` collection (either may be ``None``)."""
  scope = module.scope
  cache = (dict(scope.get_variable(CACHE_COLLECTION, name))
           if scope.has_variable(CACHE_COLLECTION, name) else {})
  shape = tuple(jnp.shape(group["magnitude"]))
  base_sq = cache.get("base_sq_norm")
  if base_sq is not None and tuple(jnp.shape(base_sq)) != shape:
    raise ValueError(f"intercept_dora: dora_cache at {where!r} holds base_sq_norm of shape "
                     f"{tuple(jnp.shape(base_sq))}, expected {shape}: redo cache_base_norms")
  if not settings.cache_norm:
    return None, base_sq
  mutable = scope.is_mutable_collection(CACHE_COLLECTION)
  if "norm" in cache:
    old, stamp = cache["norm"], cache["stamp"]
  elif mutable:
    old, stamp = jnp.zeros(shape, jnp.float32), _adapter.empty_stamp()
  else:
    return None, base_sq
  norm, new_cache, new_stamp = _cached_norm(kernel, group["lora_a"], group["lora_b"],
                                            settings.scale, layout, old, stamp, base_sq)
  if mutable:
    scope.put_variable(CACHE_COLLECTION, name, {**cache, "norm": new_cache, "stamp": new_stamp})
  return norm, base_sq


def quantized_weight(module: nn.Module, name: str, kernel, layout, settings: Settings,
                     where: str):
  """The weight the DoRA op runs over: ``kernel`` itself when it is quantized or no
  ``base_dtype`` is set; else param ``name`` quantized now in ``layout`` (written back
  to ``params``, which must be mutable), cast as ``kernel`` is."""
  qtype = settings.base_dtype
  if isinstance(kernel, general.QuantizedWeight):
    if qtype is not None and kernel.qtype != qtype:
      raise ValueError(f"intercept_dora(base_dtype={qtype!r}): {where!r} is quantized as "
                       f"{kernel.qtype} in 'params'; it is quantized once (drop base_dtype, or "
                       "quantize the float params)")
    return kernel
  if qtype is None:
    return kernel
  from dora_jax import quantized
  scope = module.scope
  if not scope.is_mutable_collection("params"):
    raise ValueError(
        f"intercept_dora(base_dtype={qtype!r}): {where!r} is a float weight; quantize the "
        "params once: create the adapters with mutable=['dora', 'params'] (or init), and "
        "use the 'params' that call returns (they hold the quantized weights)")
  stored = scope.get_variable("params", name)
  value = stored.unbox() if isinstance(stored, nn.meta.AxisMetadata) else stored
  if tuple(jnp.shape(value)) != layout.shape:
    raise NotImplementedError(
        f"intercept_dora(base_dtype={qtype!r}): {where!r} is stored as "
        f"{tuple(jnp.shape(value))} but enters its op as {layout.shape}; quantizing it is "
        "not supported")
  try:
    qk = quantized.quantize_kernel(value, qtype, block_size=settings.block_size, layout=layout)
  except ValueError as err:
    raise ValueError(f"{err} ({where})") from None
  scope.put_variable("params", name,
                     stored.replace_boxed(qk) if isinstance(stored, nn.meta.AxisMetadata) else qk)
  return qk.astype(kernel.dtype)


def adapted_op(module: nn.Module, name: str, op: WeightOp, x: jax.Array, kernel: jax.Array,
               settings: Settings, *, where: str):
  """DoRA in place of ``op(x, kernel)``, ``kernel`` being (a cast of) param ``name``.

  Returns ``(y, layout)``: ``y`` has the base op's shape and dtype.
  """
  layout = op.layout(jnp.shape(x), jnp.shape(kernel))
  kernel = quantized_weight(module, name, kernel, layout, settings, where)
  group = _adapters(module, name, layout, kernel, settings, where)
  norm, base_sq = _norm_inputs(module, name, layout, kernel, group, settings, where)
  x_dropped = None
  if settings.dropout > 0.0:
    deterministic = settings.deterministic
    if deterministic is None:
      deterministic = getattr(module, "deterministic", None)
    if deterministic is None:
      raise ValueError(f"intercept_dora: dropout > 0 needs deterministic=True/False "
                       f"(no 'deterministic' on {where!r})")
    if not deterministic:
      x_dropped = dropped_input(module, x, settings.dropout)
  y = _forward(x, kernel, group["lora_a"], group["lora_b"], group["magnitude"], norm, base_sq,
               x_dropped, op=op, scale=float(settings.scale), detach_norm=settings.detach_norm)
  return y, layout

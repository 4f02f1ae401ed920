"""What every NNX DoRA layer shares: the adapter Variable types, the site protocol and
the wrapper base class.

A *site* is one adapted weight: a frozen base kernel ``W`` (an ``nnx.Param``)
entering one contraction with the input, described by a
:class:`dora_jax.general.WeightLayout` (which kernel axes are contracted, which
are batch axes of the op, which reach only the output), plus its adapters:

========== ============================== ==============================================
name       shape                          init (Hugging Face PEFT's)
========== ============================== ==============================================
lora_a     ``[*batch, *in_shape, r]``     ``U(-1/√d_in, 1/√d_in)`` (torch ``kaiming_uniform_(a=√5)``)
lora_b     ``[*batch, r, *out_shape]``    zeros
magnitude  ``[*batch, *out_shape]``       norms ``‖W_j‖₂`` over the contracted axes
========== ============================== ==============================================

``in_shape``/``out_shape`` are the contracted/output axes' sizes in the kernel's
own axis order, ``d_in = prod(in_shape)``, ``d_out = prod(out_shape)``. Layers
without a batch axis expose the 2-D views ``lora_a [d_in, r]``, ``lora_b [r,
d_out]``, ``magnitude [d_out]`` (:meth:`AdapterSite.adapter_views`, reshapes),
which is how adapters are exported to PEFT.

Cached-norm inference (``cache_norm``, see :func:`dora_jax.surgery.freeze_scales`)
keeps the norm ``[*batch, d_out]`` in a :class:`DoRACache` with a ``uint32 [3]``
stamp of the adapter bits, reused while the stamp matches.
"""

from __future__ import annotations

import abc
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dora_jax import _adapter, general
from dora_jax._checks import check_bool, check_float_dtype
from dora_jax.dense import lora_scale, merge_kernel
from dora_jax.norm import column_sq_norm, factored_norm


class DoRAParam(nnx.LoRAParam):
  """A trainable DoRA adapter parameter (``lora_a``, ``lora_b`` or ``magnitude``).

  A subclass of :class:`flax.nnx.LoRAParam`, so ``wrt=nnx.LoRAParam`` selects it.
  """


class DoRACache(nnx.Variable):
  """Non-trainable state of cached-norm inference: the norm and its stamp (and the
  frozen kernel's cached ``‖W_j‖²``)."""


def matrix_layout(shape: tuple[int, ...], n_in: int = 1) -> general.WeightLayout:
  """The layout of a kernel stored as ``[*in (n_in axes), *out]`` entering ``x·W``."""
  n = len(shape)
  return general.WeightLayout(shape=tuple(int(d) for d in shape),
                              contracted=tuple(range(n_in)), batch=(),
                              output=tuple(range(n_in, n)))


def check_config(rank: Any, dropout: Any, layout: general.WeightLayout, where: str) -> float:
  """The one validation of an adapter configuration: ``rank`` within ``[1, min(d_in,
  d_out)]`` and ``dropout`` in ``[0, 1)``; returns the dropout rate as a float."""
  _adapter.check_rank(rank, layout.d_in, layout.d_out, where)
  return _adapter.check_dropout(dropout)


# -- numerics on one site (compiled once per shape/layout) -----------------------
#
# Rule: a site is computed either by dora_dense on its [d_in, d_out] view
# (``native=False``: Dense, Embed, Conv) or by the native-layout ops of
# dora_jax.general (``native=True``: LinearGeneral, Einsum, op-level sites). Its
# magnitude init, norm, cached norms and merge use the same family, so that at
# init m equals the norm the forward computes bit for bit (g = 1 exactly).


def _norm_value(kernel, lora_a, lora_b, scale, layout, base_sq, native):
  """``‖W + s·a·b‖`` as ``[*batch, d_out]`` float32 (the factored norm)."""
  if native:
    sq = None if base_sq is None else base_sq.reshape(*layout.batch_shape, *layout.out_shape)
    norm = general.weight_norm(kernel, lora_a, lora_b, scale, layout, base_sq_norm=sq)
  else:
    k2, a2, b2 = (kernel.reshape(layout.d_in, layout.d_out),
                  lora_a.reshape(layout.d_in, -1), lora_b.reshape(-1, layout.d_out))
    sq = None if base_sq is None else base_sq.reshape(layout.d_out)
    norm = factored_norm(k2, a2, b2, scale, base_sq_norm=sq)
  return norm.astype(jnp.float32).reshape(*layout.batch_shape, layout.d_out)


@functools.partial(jax.jit, static_argnames=("scale", "layout", "native"))
def norm_and_stamp(kernel, lora_a, lora_b, base_sq=None, *, scale: float,
                   layout: general.WeightLayout, native: bool):
  """``(norm [*batch, d_out] float32, stamp uint32 [3])`` of the current adapters."""
  norm = _norm_value(kernel, lora_a, lora_b, scale, layout, base_sq, native)
  return norm, _adapter.fingerprint(lora_a, lora_b, jnp.asarray(scale, jnp.float32))


@functools.partial(jax.jit, static_argnames=("layout", "native"))
def base_sq_norm(kernel, *, layout: general.WeightLayout, native: bool) -> jax.Array:
  """``‖W_j‖²`` of the frozen kernel, ``[*batch, d_out]`` float32."""
  if native:
    sq = general.weight_sq_norm(kernel, layout)
  else:
    sq = column_sq_norm(kernel.reshape(layout.d_in, layout.d_out))
  return sq.astype(jnp.float32).reshape(*layout.batch_shape, layout.d_out)


def init_magnitude(kernel, *, layout: general.WeightLayout, dtype, native: bool) -> jax.Array:
  """``m = ‖W_j‖ [*batch, *out_shape]``: a compiled reduction, the one the forward's
  norm runs, so that at init ``m`` equals the norm bit for bit (``g = 1``)."""
  if native:
    return general.init_magnitude(kernel, layout, jnp.dtype(dtype))
  m = _adapter.init_magnitude(kernel.reshape(layout.d_in, layout.d_out), dtype)
  return m.reshape(*layout.batch_shape, *layout.out_shape)


def init_adapters(kernel: jax.Array, layout: general.WeightLayout, rank: int, param_dtype,
                  key: jax.Array, *, native: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
  """PEFT's initial ``(lora_a, lora_b, magnitude)`` for ``kernel`` in ``layout``."""
  a_shape, b_shape, _ = layout.adapter_shapes(rank)
  lora_a = _adapter.init_lora_a(key, tuple(a_shape), layout.d_in, param_dtype)
  lora_b = jnp.zeros(tuple(b_shape), param_dtype)
  return lora_a, lora_b, init_magnitude(kernel, layout=layout, dtype=jnp.dtype(param_dtype),
                                        native=native)


def cached_norm(kernel, lora_a, lora_b, scale: float, layout: general.WeightLayout, cache,
                stamp, base_sq=None, *, native: bool):
  """The norm ``[*batch, d_out]`` from ``cache`` while ``stamp`` matches the adapters.

  Returns ``(norm, new_cache, new_stamp)``; a stale cache is never used (the norm is
  recomputed inside a ``lax.cond``). The kernel is not stamped: refresh the cache
  after replacing base weights.
  """
  if not native and base_sq is None:
    k2 = kernel.reshape(layout.d_in, layout.d_out)
    return _adapter.cached_norm(k2, lora_a.reshape(layout.d_in, -1),
                                lora_b.reshape(-1, layout.d_out), scale, cache, stamp)
  new_stamp = _adapter.fingerprint(lora_a, lora_b, jnp.asarray(scale, jnp.float32))
  valid = jnp.all(new_stamp == stamp)
  a, b = lax.stop_gradient(lora_a), lax.stop_gradient(lora_b)
  norm = lax.cond(valid, lambda: lax.stop_gradient(cache).astype(jnp.float32),
                  lambda: _norm_value(kernel, a, b, scale, layout, base_sq, native))
  return norm, norm, new_stamp


def merged_kernel(kernel, lora_a, lora_b, magnitude, scale: float,
                  layout: general.WeightLayout, *, native: bool) -> jax.Array:
  """``g ⊙ (W + s·a·b)`` in the kernel's shape and dtype."""
  if native:
    return general.merge_weight(kernel, lora_a, lora_b, magnitude, scale, layout)
  k2 = kernel.reshape(layout.d_in, layout.d_out)
  merged = merge_kernel(k2, lora_a.reshape(layout.d_in, -1), lora_b.reshape(-1, layout.d_out),
                        magnitude.reshape(layout.d_out), scale)
  return merged.reshape(kernel.shape)


def views_2d(lora_a, lora_b, magnitude, layout: general.WeightLayout, rank: int, where: str):
  """``(lora_a [d_in, r], lora_b [r, d_out], magnitude [d_out])``; refused for a batched layout."""
  if layout.batch:
    raise NotImplementedError(
        f"{where}: the kernel {layout.shape} has batch axes {layout.batch} (one DoRA norm per "
        "batch entry, block-diagonal); a PEFT adapter is one [d_in, d_out] matrix per module "
        "and cannot express it, so it has no 2-D adapter view (it cannot be saved in PEFT's "
        "format)")
  return (lora_a.reshape(layout.d_in, rank), lora_b.reshape(rank, layout.d_out),
          magnitude.reshape(layout.d_out))


# -- the site protocol -----------------------------------------------------------


class AdapterSite(abc.ABC):
  """One adapted weight, as model-level code (surgery, I/O, sharding) sees it.

  Implemented by the wrapper layers (:class:`DoRALayer`) and by the per-weight views
  of op-level adapted modules (:class:`dora_jax.nnx.op.OpSite`).

  Attributes: ``kernel`` (the base ``nnx.Param``), ``lora_a``/``lora_b``/``magnitude``
  (:class:`DoRAParam`), ``norm_cache``/``norm_stamp``/``base_sq_norm``
  (:class:`DoRACache` or ``None``), ``layout``, ``in_shape``, ``out_shape``,
  ``d_in``, ``d_out``, ``rank``, ``alpha``, ``rslora``, ``scale``,
  ``dropout_rate``, ``cache_norm``, ``detach_norm`` (``True``: PEFT's gradient,
  the norm a constant; ``False``: the exact gradient through the norm).
  """

  layout: general.WeightLayout
  #: Which numerics family computes the site (see the rule above).
  native: bool = True

  @abc.abstractmethod
  def norm_kernel(self) -> jax.Array:
    """The kernel as the site's op sees it (its norms are taken over this)."""

  @abc.abstractmethod
  def _store_base_sq(self, value: jax.Array) -> None:
    """Keep ``‖W_j‖²`` in a new :class:`DoRACache` Variable named ``base_sq_norm``."""

  @abc.abstractmethod
  def describe(self) -> str:
    """One line: base type, ``d_in -> d_out``, rank, scale."""

  def adapter_views(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lora_a [d_in, r], lora_b [r, d_out], magnitude [d_out])`` (reshapes).

    Raises ``NotImplementedError`` for a layout with batch axes (PEFT cannot express it).
    """
    return views_2d(self.lora_a[...], self.lora_b[...], self.magnitude[...], self.layout,
                    self.rank, self.describe())

  def weight_norm(self) -> jax.Array:
    """``‖W + s·a·b‖`` per output column, ``[*batch, d_out]`` float32, computed now."""
    return norm_and_stamp(self.norm_kernel(), self.lora_a[...], self.lora_b[...],
                          scale=self.scale, layout=self.layout, native=self.native)[0]

  def refresh_cache(self) -> None:
    """Recompute the cached norm and its stamp from the current adapters (and the
    kernel's column norms, when they are cached)."""
    self.norm_cache[...], self.norm_stamp[...] = norm_and_stamp(
        self.norm_kernel(), self.lora_a[...], self.lora_b[...], scale=self.scale,
        layout=self.layout, native=self.native)
    if self.base_sq_norm is not None:
      self.base_sq_norm[...] = base_sq_norm(self.norm_kernel(), layout=self.layout,
                                            native=self.native)

  def cache_base_norm(self) -> None:
    """Store ``‖W_j‖² [*batch, d_out]`` of the frozen kernel; recompute after replacing it."""
    value = base_sq_norm(self.norm_kernel(), layout=self.layout, native=self.native)
    if self.base_sq_norm is None:
      self._store_base_sq(value)
    else:
      self.base_sq_norm[...] = value

  def cache_is_fresh(self) -> jax.Array:
    """Whether the cached norm was computed from the current ``lora_a``/``lora_b``/scale."""
    stamp = _adapter.fingerprint(self.lora_a[...], self.lora_b[...],
                                 jnp.asarray(self.scale, jnp.float32))
    return jnp.all(stamp == self.norm_stamp[...])


class DoRALayer(nnx.Module, AdapterSite):
  """Base of the NNX DoRA wrapper layers (``DoRADense``, ``DoRAEinsum``, ...).

  A wrapper replaces its base layer in the model and keeps the base layer's weight
  Variables (the same objects, at the same attribute names, still typed
  ``nnx.Param``), so the model's state paths for the base weights do not change.

  Attributes:
    kernel: the base layer's frozen ``nnx.Param`` in its own layout (``layout``).
    bias: the base layer's ``nnx.Param`` or ``None``.
    lora_a, lora_b, magnitude: :class:`DoRAParam` (shapes in the module docstring).
    norm_cache: :class:`DoRACache` ``[*batch, d_out]`` float32, the cached norm.
    norm_stamp: :class:`DoRACache` ``[3]`` uint32, what the cache was computed from.
    base_sq_norm: :class:`DoRACache` ``[*batch, d_out]`` float32, the frozen
      kernel's ``‖W_j‖²`` when :func:`dora_jax.surgery.cache_base_norms` stored
      them (then every call skips re-reading the kernel for them), else ``None``.
    layout, in_shape, out_shape, d_in, d_out, rank, alpha, rslora, scale,
      dropout_rate, cache_norm, detach_norm: configuration (``scale`` is ``alpha /
      rank``, or ``alpha / √rank`` with rsLoRA; ``detach_norm=False``: the exact
      DoRA gradient through the norm, see :func:`dora_jax.dora_dense`; the cached
      norm of cached-norm inference is a constant either way).
  """

  kernel: nnx.Param
  lora_a: DoRAParam
  lora_b: DoRAParam
  magnitude: DoRAParam

  #: Whether ``apply_dora(targets="all-linear")`` selects this wrapper's base type.
  all_linear = True
  #: ``True``: the native-layout ops of :mod:`dora_jax.general`; ``False``:
  #: ``dora_dense`` on the ``[d_in, d_out]`` view (see the rule above).
  native = True

  @classmethod
  def wraps_subclass(cls, base: nnx.Module, registered: type) -> bool:
    """Whether this wrapper reproduces ``base``, an instance of a subclass of the
    registered type ``registered``: it must not override the call path the wrapper
    reimplements (otherwise the op-level layer adapts it, see :mod:`dora_jax.nnx.op`)."""
    return type(base).__call__ is registered.__call__

  @classmethod
  def check_base(cls, base: nnx.Module, registered: type) -> None:
    """Raise ``TypeError`` unless ``base`` is a ``registered`` this wrapper reproduces."""
    if not isinstance(base, registered):
      raise TypeError(f"{cls.__name__} wraps an nnx.{registered.__name__}, got "
                      f"{type(base).__name__}")
    if type(base) is not registered and not cls.wraps_subclass(base, registered):
      raise TypeError(
          f"{cls.__name__} cannot wrap {type(base).__name__}: it subclasses "
          f"nnx.{registered.__name__} but overrides its call, which the wrapper would drop; "
          "apply_dora adapts such layers at the op level (pass example_inputs=)")

  def _init_config(self, base: nnx.Module, *, layout: general.WeightLayout, rank: int,
                   alpha: float, rslora: bool, dropout: float, path: str = "",
                   detach_norm: bool = True) -> None:
    """Sizes, validated rank/dropout/detach_norm, scale and the base layer's type and graphdef."""
    self.detach_norm = check_bool("detach_norm", detach_norm)
    self.layout = layout
    self.in_shape = tuple(layout.in_shape)
    self.out_shape = tuple(layout.out_shape)
    self.d_in = int(layout.d_in)
    self.d_out = int(layout.d_out)
    self.dropout_rate = check_config(rank, dropout, layout, path or type(base).__name__)
    self.rank = rank
    self.alpha = float(alpha)
    self.rslora = bool(rslora)
    self.scale = lora_scale(alpha, rank, rslora=rslora)
    self.cache_norm = False
    self.base_graphdef = nnx.graphdef(base)
    self.base_type = type(base)

  def _init_adapters(self, base: nnx.Module, *, layout: general.WeightLayout, rank: int,
                     alpha: float, rslora: bool, dropout: float, param_dtype,
                     rngs: nnx.Rngs, path: str = "", detach_norm: bool = True) -> None:
    self._init_config(base, layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                      dropout=dropout, path=path, detach_norm=detach_norm)
    # The base weights: the very same Variables, not copies.
    self.kernel = base.kernel
    self.bias = base.bias if getattr(base, "bias", None) is not None else nnx.data(None)
    self.dtype = base.dtype
    self.precision = base.precision
    self.preferred_element_type = base.preferred_element_type
    self.param_dtype = check_float_dtype("param_dtype", param_dtype)
    a, b, m = init_adapters(self.kernel[...], layout, rank, self.param_dtype, rngs.params(),
                            native=self.native)
    self.lora_a, self.lora_b, self.magnitude = DoRAParam(a), DoRAParam(b), DoRAParam(m)
    self._init_cache()
    self.dropout = (nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate > 0
                    else nnx.data(None))

  def _init_cache(self) -> None:
    shape = (*self.layout.batch_shape, self.d_out)
    self.norm_cache = DoRACache(jnp.zeros(shape, jnp.float32))
    self.norm_stamp = DoRACache(_adapter.empty_stamp())
    self.base_sq_norm = nnx.data(None)

  # -- views ------------------------------------------------------------------

  def _kernel2d(self) -> jax.Array:
    """``kernel`` as ``[d_in, d_out]`` (a reshape; matrix layouts only)."""
    return self.kernel[...].reshape(self.d_in, self.d_out)

  def norm_kernel(self) -> jax.Array:
    return self.kernel[...]

  def _store_base_sq(self, value: jax.Array) -> None:
    self.base_sq_norm = DoRACache(value)

  def _base_sq(self) -> jax.Array | None:
    return None if self.base_sq_norm is None else self.base_sq_norm[...]

  def _norm_for_call(self) -> jax.Array | None:
    """The cached norm ``[*batch, d_out]`` in cached-norm mode (refreshed if stale), else None."""
    if not self.cache_norm:
      return None
    norm, new_cache, new_stamp = cached_norm(
        self.kernel[...], self.lora_a[...], self.lora_b[...], self.scale, self.layout,
        self.norm_cache[...], self.norm_stamp[...], self._base_sq(), native=self.native)
    if getattr(self.norm_cache, "_can_update", True):
      self.norm_cache[...] = new_cache
      self.norm_stamp[...] = new_stamp
    return norm

  def set_view(self, cache_norm: bool | None = None):
    """For ``nnx.view(model, cache_norm=True)``: toggles cached-norm inference."""
    if cache_norm is not None:
      self.cache_norm = bool(cache_norm)

  # -- forward helpers ----------------------------------------------------------

  def _compute_dtype(self, x: jax.Array):
    if self.dtype is not None:
      return jnp.dtype(self.dtype)
    parts = [x, self.kernel[...]] + ([] if self.bias is None else [self.bias[...]])
    return jnp.result_type(*parts)

  def _dropped(self, x: jax.Array, deterministic: bool | None, rngs) -> jax.Array | None:
    """A dropped-out copy of ``x`` for the adapter path, or ``None`` (no dropout now)."""
    if self.dropout is None:
      return None
    x_dropped = self.dropout(x, deterministic=deterministic, rngs=rngs)
    return None if x_dropped is x else x_dropped

  def _op_norms(self) -> tuple[jax.Array | None, jax.Array | None]:
    """``(norm, base_sq_norm)`` shaped ``[*batch, *out_shape]`` for the general ops."""
    shape = (*self.layout.batch_shape, *self.out_shape)
    norm = self._norm_for_call()
    sq = self._base_sq()
    return (None if norm is None else norm.reshape(shape),
            None if sq is None else sq.reshape(shape))

  # -- back to plain layers -------------------------------------------------------

  def merged_kernel(self) -> jax.Array:
    """``g ⊙ (W + s·a·b)`` in the kernel's shape and dtype (see :func:`dora_jax.merge_kernel`)."""
    return merged_kernel(self.kernel[...], self.lora_a[...], self.lora_b[...],
                         self.magnitude[...], self.scale, self.layout, native=self.native)

  def _rebuild(self, kernel_value: jax.Array) -> nnx.Module:
    state = {"kernel": self.kernel.replace(kernel_value)}
    if self.bias is not None:
      state["bias"] = self.bias.replace(self.bias[...])
    return nnx.merge(self.base_graphdef, nnx.State(state))

  def merged_layer(self) -> nnx.Module:
    """A new plain base-type layer (``nnx.Linear``, ...) with the merged kernel."""
    return self._rebuild(self.merged_kernel())

  def base_layer(self) -> nnx.Module:
    """A new plain base-type layer with the original (frozen, unmodified) kernel."""
    return self._rebuild(self.kernel[...])

  def describe(self) -> str:
    """One line: base type, ``d_in -> d_out``, rank, scale."""
    batch = (f" x{math.prod(self.layout.batch_shape)} blocks" if self.layout.batch else "")
    return (f"{self.base_type.__name__}({self.d_in} -> {self.d_out}{batch}) rank={self.rank} "
            f"alpha={self.alpha:g} scale={self.scale:g}"
            + (" rslora" if self.rslora else "")
            + (f" dropout={self.dropout_rate:g}" if self.dropout_rate else ""))


def derived_class(cache: dict, mixin: type, base_type: type, prefix: str, doc: str) -> type:
  """``<prefix><Base>(mixin, base_type)``, made once per base type (kept in ``cache``)."""
  cls = cache.get(base_type)
  if cls is None:
    cls = type(f"{prefix}{base_type.__name__}", (mixin, base_type),
               {"__module__": base_type.__module__, "__doc__": doc})
    cache[base_type] = cls
  return cls


def check_dtype_promotion(base: nnx.Module) -> None:
  """Refuse a base layer with a custom ``promote_dtype`` (the wrappers run Flax's)."""
  from flax.nnx.nn import dtypes
  if getattr(base, "promote_dtype", dtypes.promote_dtype) is not dtypes.promote_dtype:
    raise NotImplementedError(
        f"{type(base).__name__} with a custom promote_dtype cannot be wrapped by DoRA")

"""DoRA layers for Flax NNX: wrappers around a frozen ``Linear``, ``LinearGeneral`` or ``Einsum``.

Each wrapper keeps the base layer's ``kernel`` and ``bias`` Variables (the same
objects, still typed :class:`flax.nnx.Param`, at the same attribute names, so a
model's state paths for the base weights do not change) and adds three
trainable adapter parameters typed :class:`DoRAParam`, a subclass of
:class:`flax.nnx.LoRAParam`:

========== ======================= ==============================================
name       shape                   init (Hugging Face PEFT's)
========== ======================= ==============================================
lora_a     ``[*in_shape, r]``      ``U(-1/√d_in, 1/√d_in)`` (torch ``kaiming_uniform_(a=√5)``)
lora_b     ``[r, *out_shape]``     zeros
magnitude  ``[*out_shape]``        column norms ``‖W[:, j]‖₂`` of the base kernel
========== ======================= ==============================================

``d_in = prod(in_shape)`` and ``d_out = prod(out_shape)``; the layer runs on the
2-D view ``kernel [d_in, d_out]`` (a reshape, never a transpose of the kernel)
through :func:`dora_jax.dora_dense`. Train the adapters only with
``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` and
``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))``.

Dropout (``dropout > 0``) follows PEFT: it applies to the adapter path only, is
active in training mode and off after ``model.eval()`` (or
``nnx.view(model, deterministic=True)``); its key comes from the ``dropout``
stream of the ``rngs`` given at construction, or from ``rngs`` passed to the call.

Cached-norm inference: with ``cache_norm=True`` (see
:func:`dora_jax.surgery.freeze_scales`) the norm ``‖W + s·a·b‖ [d_out]`` is
kept in two :class:`DoRACache` Variables (the norm and a ``uint32 [3]`` stamp of
the adapter bits) and reused while the stamp matches, so a decode step does
not redo the ``O(d_in·d_out·r)`` norm. Any change to ``lora_a``/``lora_b`` (an
optimizer step, a restore) changes the stamp; the next call recomputes the norm
and, when the Variables may be written in the current trace (eagerly, or inside
``nnx.jit``), stores it. The base kernel is not stamped: after replacing base
weights call :func:`dora_jax.surgery.refresh_scales`.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from dora_jax import _adapter
from dora_jax._checks import check_float_dtype
from dora_jax.dense import lora_scale, merge_kernel
from dora_jax.norm import factored_norm


# Compiled once per shape: used eagerly (cache refresh), where op-by-op
# dispatch would cost a dozen small compilations per layer.
@functools.partial(jax.jit, static_argnames=("scale",))
def _norm_and_stamp(kernel2d, lora_a2d, lora_b2d, *, scale: float):
  norm = factored_norm(kernel2d, lora_a2d, lora_b2d, scale).astype(jnp.float32)
  return norm, _adapter.fingerprint(lora_a2d, lora_b2d, jnp.asarray(scale, jnp.float32))


class DoRAParam(nnx.LoRAParam):
  """A trainable DoRA adapter parameter (``lora_a``, ``lora_b`` or ``magnitude``).

  A subclass of :class:`flax.nnx.LoRAParam`, so ``wrt=nnx.LoRAParam`` selects it.
  """


class DoRACache(nnx.Variable):
  """Non-trainable state of cached-norm inference: the norm ``[d_out]`` and its stamp."""


def _check_dtype_promotion(base: nnx.Module) -> None:
  from flax.nnx.nn import dtypes
  if base.promote_dtype is not dtypes.promote_dtype:
    raise NotImplementedError(
        f"{type(base).__name__} with a custom promote_dtype cannot be wrapped by DoRA")


class DoRALayer(nnx.Module):
  """Shared machinery of the NNX DoRA wrappers (not instantiated directly).

  Subclasses set ``in_shape``/``out_shape`` and the base-layer specifics, then
  call :meth:`_init_adapters`.

  Attributes:
    kernel: the base layer's frozen ``nnx.Param``, ``[*in_shape, *out_shape]``
      (Einsum: the kernel in its own axis order, contracted axes first).
    bias: the base layer's ``nnx.Param`` or ``None``.
    lora_a: :class:`DoRAParam` ``[*in_shape, r]``.
    lora_b: :class:`DoRAParam` ``[r, *out_shape]``.
    magnitude: :class:`DoRAParam` ``[*out_shape]``.
    norm_cache: :class:`DoRACache` ``[d_out]`` float32, the cached norm.
    norm_stamp: :class:`DoRACache` ``[3]`` uint32, what the cache was computed from.
    base_sq_norm: :class:`DoRACache` ``[d_out]`` float32, the frozen kernel's
      column norms ``‖W_j‖²`` when :func:`dora_jax.surgery.cache_base_norms`
      stored them (then every call skips re-reading the kernel for them), else ``None``.
    rank, alpha, rslora, scale, dropout_rate, cache_norm: adapter configuration
      (``scale`` is ``alpha / rank``, or ``alpha / √rank`` with rsLoRA).
  """

  kernel: nnx.Param
  lora_a: DoRAParam
  lora_b: DoRAParam
  magnitude: DoRAParam

  def _init_config(self, base: nnx.Module, *, in_shape: tuple[int, ...],
                   out_shape: tuple[int, ...], rank: int, alpha: float, rslora: bool,
                   dropout: float, path: str = "") -> None:
    """Sizes, validated rank/dropout, scale and the base layer's type and graphdef."""
    self.in_shape = tuple(int(d) for d in in_shape)
    self.out_shape = tuple(int(d) for d in out_shape)
    self.d_in = int(math.prod(self.in_shape))
    self.d_out = int(math.prod(self.out_shape))
    _adapter.check_rank(rank, self.d_in, self.d_out, path or type(base).__name__)
    self.rank = rank
    self.alpha = float(alpha)
    self.rslora = bool(rslora)
    self.scale = lora_scale(alpha, rank, rslora=rslora)
    self.dropout_rate = _adapter.check_dropout(dropout)
    self.cache_norm = False
    self.base_graphdef = nnx.graphdef(base)
    self.base_type = type(base)

  def _init_adapters(self, base: nnx.Module, *, in_shape: tuple[int, ...],
                     out_shape: tuple[int, ...], rank: int, alpha: float, rslora: bool,
                     dropout: float, param_dtype, rngs: nnx.Rngs, path: str = "") -> None:
    self._init_config(base, in_shape=in_shape, out_shape=out_shape, rank=rank, alpha=alpha,
                      rslora=rslora, dropout=dropout, path=path)
    # The base weights: the very same Variables, not copies.
    self.kernel = base.kernel
    self.bias = base.bias if base.bias is not None else nnx.data(None)
    self.dtype = base.dtype
    self.precision = base.precision
    self.preferred_element_type = base.preferred_element_type
    self.param_dtype = check_float_dtype("param_dtype", param_dtype)

    kernel2d = self._kernel2d()
    self.lora_a = DoRAParam(_adapter.init_lora_a(
        rngs.params(), (*self.in_shape, rank), self.d_in, self.param_dtype))
    self.lora_b = DoRAParam(jnp.zeros((rank, *self.out_shape), self.param_dtype))
    self.magnitude = DoRAParam(
        _adapter.init_magnitude(kernel2d, self.param_dtype).reshape(self.out_shape))
    self.norm_cache = DoRACache(jnp.zeros((self.d_out,), jnp.float32))
    self.norm_stamp = DoRACache(_adapter.empty_stamp())
    self.dropout = (nnx.Dropout(self.dropout_rate, rngs=rngs) if self.dropout_rate > 0
                    else nnx.data(None))
    self.base_sq_norm = nnx.data(None)

  # -- 2-D views -------------------------------------------------------------

  def _kernel2d(self) -> jax.Array:
    """``kernel`` as ``[d_in, d_out]`` (a reshape)."""
    return self.kernel[...].reshape(self.d_in, self.d_out)

  def _bias1d(self) -> jax.Array | None:
    """``bias`` as ``[d_out]`` in the kernel's output-axis order, or ``None``."""
    return None if self.bias is None else self.bias[...].reshape(self.d_out)

  def adapter_views(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(lora_a [d_in, r], lora_b [r, d_out], magnitude [d_out])`` (reshapes)."""
    return (self.lora_a[...].reshape(self.d_in, self.rank),
            self.lora_b[...].reshape(self.rank, self.d_out),
            self.magnitude[...].reshape(self.d_out))

  # -- norm and its cache ----------------------------------------------------

  def weight_norm(self) -> jax.Array:
    """``‖W + s·a·b‖`` per output column, ``[d_out]`` float32, computed now."""
    a, b, _ = self.adapter_views()
    return _norm_and_stamp(self._kernel2d(), a, b, scale=self.scale)[0]

  def refresh_cache(self) -> None:
    """Recompute the cached norm and its stamp from the current adapters (and the
    kernel's column norms, when they are cached)."""
    a, b, _ = self.adapter_views()
    self.norm_cache[...], self.norm_stamp[...] = _norm_and_stamp(
        self._kernel2d(), a, b, scale=self.scale)
    if getattr(self, "base_sq_norm", None) is not None:
      self.base_sq_norm[...] = _adapter.column_sq_norm_jit(self._kernel2d())

  def cache_base_norm(self) -> None:
    """Store ``‖W_j‖² [d_out]`` of the frozen kernel; recompute after replacing it."""
    value = _adapter.column_sq_norm_jit(self._kernel2d())
    if getattr(self, "base_sq_norm", None) is None:
      self.base_sq_norm = DoRACache(value)
    else:
      self.base_sq_norm[...] = value

  def cache_is_fresh(self) -> jax.Array:
    """Whether the cached norm was computed from the current ``lora_a``/``lora_b``/scale."""
    a, b, _ = self.adapter_views()
    stamp = _adapter.fingerprint(a, b, jnp.asarray(self.scale, jnp.float32))
    return jnp.all(stamp == self.norm_stamp[...])

  def _norm_for_call(self, kernel2d, a, b) -> jax.Array | None:
    if not self.cache_norm:
      return None
    norm, new_cache, new_stamp = _adapter.cached_norm(
        kernel2d, a, b, self.scale, self.norm_cache[...], self.norm_stamp[...])
    if getattr(self.norm_cache, "_can_update", True):
      self.norm_cache[...] = new_cache
      self.norm_stamp[...] = new_stamp
    return norm

  def set_view(self, cache_norm: bool | None = None):
    """For ``nnx.view(model, cache_norm=True)``: toggles cached-norm inference."""
    if cache_norm is not None:
      self.cache_norm = bool(cache_norm)

  # -- forward ---------------------------------------------------------------

  def _compute_dtype(self, x: jax.Array):
    if self.dtype is not None:
      return jnp.dtype(self.dtype)
    parts = [x, self.kernel[...]] + ([] if self.bias is None else [self.bias[...]])
    return jnp.result_type(*parts)

  def _apply_2d(self, x: jax.Array, *, deterministic: bool | None,
                rngs: nnx.Rngs | jax.Array | None) -> jax.Array:
    """The DoRA layer on ``x [..., d_in]`` (any dtype) ``-> [..., d_out]``."""
    x = x.astype(self._compute_dtype(x))
    kernel2d = self._kernel2d()
    a, b, m = self.adapter_views()
    norm = self._norm_for_call(kernel2d, a, b)
    x_dropped = None
    if self.dropout is not None:
      x_dropped = self.dropout(x, deterministic=deterministic, rngs=rngs)
      if x_dropped is x:
        x_dropped = None
    base_sq = getattr(self, "base_sq_norm", None)
    y = _adapter.dora_forward(x, kernel2d, a, b, m, self.scale, self._bias1d(), norm=norm,
                              base_sq_norm=None if base_sq is None else base_sq[...],
                              x_dropped=x_dropped, precision=self.precision)
    if self.preferred_element_type is not None:
      y = y.astype(self.preferred_element_type)
    return y

  # -- back to plain layers --------------------------------------------------

  def merged_kernel(self) -> jax.Array:
    """``g ⊙ (W + s·a·b)`` in the kernel's shape and dtype (see :func:`dora_jax.merge_kernel`)."""
    a, b, m = self.adapter_views()
    merged = merge_kernel(self._kernel2d(), a, b, m, self.scale)
    return merged.reshape(self.kernel.shape)

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
    return (f"{self.base_type.__name__}({self.d_in} -> {self.d_out}) rank={self.rank} "
            f"alpha={self.alpha:g} scale={self.scale:g}"
            + (" rslora" if self.rslora else "")
            + (f" dropout={self.dropout_rate:g}" if self.dropout_rate else ""))


class DoRADense(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Linear` (``kernel [d_in, d_out]``).

  ``y = m / ‖W + s·a·b‖ ⊙ (x·W + s·(x·a)·b) + bias`` for ``x [..., d_in]``;
  PEFT's semantics (the norm is detached). The base layer's ``dtype``
  (compute dtype; ``None`` promotes ``x`` with the kernel and bias as
  ``nnx.Linear`` does), ``precision`` (applied to the forward matmuls) and
  ``preferred_element_type`` (output dtype) are honoured; a custom
  ``dot_general`` is not supported.

  Example:
    >>> from flax import nnx
    >>> import jax.numpy as jnp
    >>> from dora_jax.nnx import DoRADense
    >>> base = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    >>> layer = DoRADense(base, rank=4, alpha=8, rngs=nnx.Rngs(1))
    >>> layer.lora_a.shape, layer.lora_b.shape, layer.magnitude.shape
    ((16, 4), (4, 8), (8,))
    >>> x = jnp.ones((2, 16))
    >>> bool(jnp.allclose(layer(x), base(x), rtol=1e-6))  # at init: the base layer
    True

  Args:
    base: the layer to adapt; its Variables are reused, not copied.
    rank: ``r``, with ``1 <= r <= min(d_in, d_out)``.
    alpha: LoRA alpha; the scale is ``alpha / r`` (``alpha / √r`` with ``rslora``).
    rslora: use rank-stabilised scaling.
    dropout: dropout rate on the adapter path (PEFT's ``lora_dropout``).
    param_dtype: dtype of the adapter parameters (default float32, as PEFT's
      ``autocast_adapter_dtype``).
    rngs: ``params`` stream for ``lora_a``, ``dropout`` stream for dropout.
  """

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = ""):
    if type(base) is not nnx.Linear:
      raise TypeError(f"DoRADense wraps an nnx.Linear, got {type(base).__name__}")
    if base.dot_general is not lax.dot_general:
      raise NotImplementedError("DoRADense does not support a custom dot_general")
    _check_dtype_promotion(base)
    self._init_adapters(base, in_shape=(base.in_features,), out_shape=(base.out_features,),
                        rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                        param_dtype=param_dtype, rngs=rngs, path=path)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x [..., d_in] -> [..., d_out]``.

    ``deterministic``/``rngs`` override the dropout mode and key for this call.
    """
    if x.shape[-1] != self.d_in:
      raise ValueError(f"x must be [..., {self.d_in}], got {x.shape}")
    return self._apply_2d(x, deterministic=deterministic, rngs=rngs)


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


class DoRALinearGeneral(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.LinearGeneral`.

  The contracted axes (``in_features``) form ``d_in``, the ``out_features`` form
  ``d_out``; ``kernel [*in_features, *out_features]`` is viewed as
  ``[d_in, d_out]`` by a reshape. ``magnitude`` has shape ``out_features``.
  The input's contracted axes (``axis``) are moved to the end when they are
  not already trailing (an activation transpose; the kernel is never
  transposed). Supported: any ``axis``/``in_features``/``out_features`` without
  ``batch_axis``; not supported: ``batch_axis``, a custom ``dot_general``.
  Arguments as :class:`DoRADense`.
  """

  def __init__(self, base: nnx.LinearGeneral, *, rank: int, alpha: float,
               rslora: bool = False, dropout: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs, path: str = ""):
    if type(base) is not nnx.LinearGeneral:
      raise TypeError(f"DoRALinearGeneral wraps an nnx.LinearGeneral, got {type(base).__name__}")
    if base.batch_axis:
      raise NotImplementedError(
          "DoRALinearGeneral does not support batch_axis (a batched kernel has one "
          "DoRA norm per batch entry); adapt such layers per entry instead")
    if base.dot_general is not None or base.dot_general_cls is not None:
      raise NotImplementedError("DoRALinearGeneral does not support a custom dot_general")
    _check_dtype_promotion(base)
    self.axis = tuple(base.axis)
    self._init_adapters(base, in_shape=base.in_features, out_shape=base.out_features,
                        rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                        param_dtype=param_dtype, rngs=rngs, path=path)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x [..., in_features at axis ...] -> [..., *out_features]`` (as ``LinearGeneral``)."""
    axes = _normalize_axes(self.axis, x.ndim)
    if tuple(x.shape[ax] for ax in axes) != self.in_shape:
      raise ValueError(f"x's axes {self.axis} must have sizes {self.in_shape}, got {x.shape}")
    rest = tuple(ax for ax in range(x.ndim) if ax not in axes)
    perm = rest + axes
    if perm != tuple(range(x.ndim)):
      x = jnp.transpose(x, perm)
    lead = tuple(x.shape[: len(rest)])
    y = self._apply_2d(x.reshape(*lead, self.d_in), deterministic=deterministic, rngs=rngs)
    return y.reshape(*lead, *self.out_shape)


class _EinsumSpec:
  """The parsed ``einsum_str`` of an adaptable Einsum (see :class:`DoRAEinsum`)."""

  def __init__(self, einsum_str: str, kernel_shape: tuple[int, ...]):
    eq = einsum_str.replace(" ", "")
    if "->" not in eq or eq.count(",") != 1:
      raise ValueError(f"einsum_str must be explicit with two operands, got {einsum_str!r}")
    ins, out = eq.split("->")
    lhs, rhs = ins.split(",")
    if "." in rhs:
      raise NotImplementedError(f"an ellipsis in the kernel operand is not supported: {einsum_str!r}")
    if ("..." in lhs) != ("..." in out):
      raise NotImplementedError(f"an ellipsis must appear in both the input and output: {einsum_str!r}")
    for name, part in (("input", lhs), ("kernel", rhs), ("output", out)):
      letters = part.replace("...", "")
      if len(set(letters)) != len(letters):
        raise NotImplementedError(f"repeated index in the {name} of {einsum_str!r}")
    lhs_l, out_l = set(lhs.replace("...", "")), set(out.replace("...", ""))
    contracted = [c for c in rhs if c in lhs_l and c not in out_l]
    outputs = [c for c in rhs if c in out_l and c not in lhs_l]
    shared = [c for c in rhs if c in lhs_l and c in out_l]
    summed = [c for c in rhs if c not in lhs_l and c not in out_l]
    dropped = [c for c in lhs_l if c not in rhs and c not in out_l]
    problems = []
    if shared:
      problems.append(f"kernel indices {shared} also index the input and output (a batched "
                      "kernel: one DoRA norm per entry)")
    if summed:
      problems.append(f"kernel indices {summed} are summed away")
    if dropped:
      problems.append(f"input indices {sorted(dropped)} are summed away without the kernel")
    if not contracted or not outputs:
      problems.append("the kernel needs at least one contracted and one output index")
    if problems:
      raise NotImplementedError(f"Einsum {einsum_str!r} is not adaptable: " + "; ".join(problems))
    if list(rhs) != contracted + outputs:
      raise NotImplementedError(
          f"Einsum {einsum_str!r}: the kernel's axes must be ordered [contracted..., "
          f"output...] = {''.join(contracted + outputs)!r} so it reshapes to [d_in, d_out] "
          f"without a transpose; got {rhs!r}. Transposing the frozen kernel on every call "
          "would cost a full copy of it, so this layout is refused")
    self.lhs, self.rhs, self.out = lhs, rhs, out
    self.contracted, self.outputs = contracted, outputs
    sizes = dict(zip(rhs, kernel_shape))
    self.in_shape = tuple(sizes[c] for c in contracted)
    self.out_shape = tuple(sizes[c] for c in outputs)
    self.sizes = sizes
    self._key = (eq, tuple(kernel_shape))

  def __eq__(self, other) -> bool:
    return isinstance(other, _EinsumSpec) and self._key == other._key

  def __hash__(self) -> int:
    return hash(self._key)

  def expand(self, ndim: int) -> tuple[str, str]:
    """``(lhs, out)`` with the ellipsis replaced by fresh letters for an ``ndim`` input."""
    if "..." not in self.lhs:
      return self.lhs, self.out
    n = ndim - (len(self.lhs) - 3)
    if n < 0:
      raise ValueError(f"input rank {ndim} too small for {self.lhs!r}")
    used = set(self.lhs + self.rhs + self.out)
    fresh = "".join([c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
                     if c not in used][:n])
    return self.lhs.replace("...", fresh), self.out.replace("...", fresh)


class DoRAEinsum(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Einsum`.

  The kernel's indices that appear in the input but not the output are
  contracted (``d_in``); those that appear in the output but not the input are
  output features (``d_out``); ``magnitude`` has the output-feature shape in the
  kernel's axis order. Supported: equations whose kernel axes are ordered
  ``[contracted..., output...]`` (so the kernel reshapes to ``[d_in, d_out]``
  without a copy), e.g. ``'btd,dhk->bthk'`` (Q/K/V projections) and
  ``'btnh,nhd->btd'`` (attention output), with the input and output in any
  order (activations are transposed when needed) and an ellipsis in the input
  and output. Refused with a clear error: other kernel layouts (they would need a
  kernel transpose per call), kernel indices shared with the input and output
  (batched kernels), indices summed away, ``einsum_str`` given at call time,
  a custom ``einsum_op``. Arguments as :class:`DoRADense`.
  """

  def __init__(self, base: nnx.Einsum, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = ""):
    if type(base) is not nnx.Einsum:
      raise TypeError(f"DoRAEinsum wraps an nnx.Einsum, got {type(base).__name__}")
    if base.einsum_op is not jnp.einsum:
      raise NotImplementedError("DoRAEinsum does not support a custom einsum_op")
    _check_dtype_promotion(base)
    spec = _EinsumSpec(base.einsum_str, tuple(base.kernel.shape))
    self.einsum_str = base.einsum_str
    self.spec = spec
    if base.bias is not None and math.prod(base.bias.shape) != math.prod(spec.out_shape):
      raise NotImplementedError(
          f"Einsum bias of shape {base.bias.shape} does not cover the output features "
          f"{spec.out_shape}")
    self._init_adapters(base, in_shape=spec.in_shape, out_shape=spec.out_shape, rank=rank,
                        alpha=alpha, rslora=rslora, dropout=dropout,
                        param_dtype=param_dtype, rngs=rngs, path=path)

  def _bias1d(self) -> jax.Array | None:
    # nnx.Einsum lays its bias out in the order the output indices appear in the
    # output string; the 2-D view needs the kernel's order.
    if self.bias is None:
      return None
    out_order = [c for c in self.spec.out.replace("...", "") if c in self.spec.outputs]
    bias = self.bias[...].reshape([self.spec.sizes[c] for c in out_order])
    perm = [out_order.index(c) for c in self.spec.outputs]
    return jnp.transpose(bias, perm).reshape(self.d_out)

  def __call__(self, x: jax.Array, einsum_str: str | None = None, *,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x -> einsum(einsum_str, x, kernel)`` with the DoRA adapter, same shapes as ``nnx.Einsum``."""
    if einsum_str is not None and einsum_str.replace(" ", "") != self.einsum_str:
      raise NotImplementedError("DoRAEinsum runs the equation it was built with only")
    spec = self.spec
    lhs, out = spec.expand(x.ndim)
    if len(lhs) != x.ndim:
      raise ValueError(f"input of rank {x.ndim} does not match {lhs!r}")
    batch = [c for c in lhs if c not in spec.contracted]
    perm = [lhs.index(c) for c in batch + spec.contracted]
    if perm != list(range(x.ndim)):
      x = jnp.transpose(x, perm)
    lead = tuple(x.shape[: len(batch)])
    if tuple(x.shape[len(batch):]) != self.in_shape:
      raise ValueError(f"contracted input axes must have sizes {self.in_shape}, got {x.shape}")
    y = self._apply_2d(x.reshape(*lead, self.d_in), deterministic=deterministic, rngs=rngs)
    y = y.reshape(*lead, *self.out_shape)
    labels = batch + spec.outputs
    out_perm = [labels.index(c) for c in out]
    if out_perm != list(range(len(out_perm))):
      y = jnp.transpose(y, out_perm)
    return y


#: Base layer type -> its DoRA wrapper.
WRAPPERS: dict[type, type[DoRALayer]] = {
    nnx.Linear: DoRADense,
    nnx.LinearGeneral: DoRALinearGeneral,
    nnx.Einsum: DoRAEinsum,
}


def wrap(base: nnx.Module, **kwargs: Any) -> DoRALayer:
  """The DoRA wrapper for ``base`` (exact type ``Linear``, ``LinearGeneral`` or ``Einsum``)."""
  cls = WRAPPERS.get(type(base))
  if cls is None:
    raise TypeError(
        f"cannot adapt {type(base).__name__}: DoRA supports "
        + ", ".join(f"nnx.{t.__name__}" for t in WRAPPERS))
  return cls(base, **kwargs)

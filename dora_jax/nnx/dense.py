"""DoRA wrappers of :class:`flax.nnx.Linear` and :class:`flax.nnx.LinearGeneral`.

Both keep the base layer's ``kernel``/``bias`` Variables and compute the base
contraction exactly as the base layer does (same operands, precision and
``preferred_element_type``), so at PEFT's init the output is the base layer's bit
for bit. ``DoRADense`` runs :func:`dora_jax.dora_dense` on ``kernel [d_in,
d_out]`` (its fused GPU kernels included); ``DoRALinearGeneral`` runs
:func:`dora_jax.general.dora_dot_general` with the layer's own dimension
numbers, ``batch_axis`` included (one norm per batch entry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes
from jax import lax

from dora_jax import _adapter, general
from dora_jax.nnx.base import DoRALayer, check_dtype_promotion, matrix_layout


def _normalize_axes(axes: tuple[int, ...], ndim: int) -> tuple[int, ...]:
  return tuple(ax if ax >= 0 else ndim + ax for ax in axes)


def add_dropout_rest(y: jax.Array, rest: jax.Array) -> jax.Array:
  """``y + rest`` accumulated in float32 (the dropout split ``dora(x̃) + base(x − x̃)``)."""
  acc = jnp.promote_types(y.dtype, jnp.float32)
  return (y.astype(acc) + rest.astype(acc)).astype(y.dtype)


class DoRADense(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Linear` (``kernel [d_in, d_out]``).

  ``y = m / ‖W + s·a·b‖ ⊙ (x·W + s·(x·a)·b) + bias`` for ``x [..., d_in]``;
  PEFT's semantics (the norm is detached). The base layer's ``dtype``
  (compute dtype; ``None`` promotes ``x`` with the kernel and bias as
  ``nnx.Linear`` does), ``precision`` (applied to the forward matmuls) and
  ``preferred_element_type`` (output dtype) are honoured; a custom
  ``dot_general`` is not supported. Subclasses of ``nnx.Linear`` that keep its
  ``__call__`` are wrapped too (and merge back to their own type).

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
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact DoRA gradient through the norm (see
      :func:`dora_jax.dora_dense`; one more product with the kernel per step).
  """

  native = False  # dora_dense on kernel [d_in, d_out] (its fused GPU kernels)

  def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = "", detach_norm: bool = True):
    self.check_base(base, nnx.Linear)
    if base.dot_general is not lax.dot_general:
      raise NotImplementedError("DoRADense does not support a custom dot_general")
    check_dtype_promotion(base)
    self._init_adapters(base, layout=matrix_layout(tuple(base.kernel.shape)), rank=rank,
                        alpha=alpha, rslora=rslora, dropout=dropout, param_dtype=param_dtype,
                        rngs=rngs, path=path, detach_norm=detach_norm)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x [..., d_in] -> [..., d_out]``.

    ``deterministic``/``rngs`` override the dropout mode and key for this call.
    """
    if x.shape[-1] != self.d_in:
      raise ValueError(f"x must be [..., {self.d_in}], got {x.shape}")
    x = x.astype(self._compute_dtype(x))
    a, b, m = self.adapter_views()
    norm = self._norm_for_call()
    x_dropped = self._dropped(x, deterministic, rngs)
    y = _adapter.dora_forward(x, self._kernel2d(), a, b, m, self.scale,
                              None if self.bias is None else self.bias[...], norm=norm,
                              base_sq_norm=self._base_sq(), x_dropped=x_dropped,
                              precision=self.precision, detach_norm=self.detach_norm)
    if self.preferred_element_type is not None:
      y = y.astype(self.preferred_element_type)
    return y


class DoRALinearGeneral(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.LinearGeneral`.

  ``kernel [*batch_features, *in_features, *out_features]``: the contracted axes
  (``in_features``, input ``axis``) form ``d_in``, the ``out_features`` form
  ``d_out``; ``magnitude`` has shape ``[*batch_features, *out_features]``. The
  contraction is the base layer's ``dot_general`` with its own dimension numbers
  (no transpose of the kernel or the input); with ``batch_axis`` every batch
  entry has its own norm (such a layer has no PEFT 2-D view). A custom
  ``dot_general`` is not supported. Arguments as :class:`DoRADense`.
  """

  def __init__(self, base: nnx.LinearGeneral, *, rank: int, alpha: float,
               rslora: bool = False, dropout: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs, path: str = "", detach_norm: bool = True):
    self.check_base(base, nnx.LinearGeneral)
    if base.dot_general is not None or base.dot_general_cls is not None:
      raise NotImplementedError("DoRALinearGeneral does not support a custom dot_general")
    check_dtype_promotion(base)
    self.axis = tuple(base.axis)
    self.batch_axis = dict(base.batch_axis)
    self.out_features = tuple(base.out_features)
    nb, na = len(self.batch_axis), len(self.axis)
    kernel_shape = tuple(base.kernel.shape)
    # The kernel's layout from the dimension numbers the base layer uses (the input's
    # own axes only decide which of its axes pair with the kernel's).
    dummy_x = kernel_shape[: nb + na]
    dn = ((tuple(range(nb, nb + na)), tuple(range(nb, nb + na))),
          (tuple(range(nb)), tuple(range(nb))))
    layout = general.dot_general_layout(dn, dummy_x, kernel_shape)
    self._init_adapters(base, layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                        dropout=dropout, param_dtype=param_dtype, rngs=rngs, path=path,
                        detach_norm=detach_norm)

  def __call__(self, x: jax.Array, *, deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``x [..., in_features at axis ...] -> [..., *out_features]`` (as ``LinearGeneral``).

    ``deterministic``/``rngs`` override the dropout mode and key for this call.
    """
    ndim = x.ndim
    nb = len(self.batch_axis)
    axes = _normalize_axes(self.axis, ndim)
    batch_axes = _normalize_axes(tuple(self.batch_axis), ndim)
    if tuple(x.shape[ax] for ax in axes) != self.in_shape:
      raise ValueError(f"x's axes {self.axis} must have sizes {self.in_shape}, got {x.shape}")
    expanded_batch_shape = tuple(x.shape[ax] if ax in batch_axes else 1
                                 for ax in range(ndim) if ax not in axes)
    dn = ((axes, tuple(range(nb, nb + len(axes)))), (batch_axes, tuple(range(nb))))
    bias = None if self.bias is None else self.bias[...]
    x, kernel, bias = dtypes.promote_dtype((x, self.kernel[...], bias), dtype=self.dtype)
    norm, base_sq = self._op_norms()
    x_dropped = self._dropped(x, deterministic, rngs)
    op_kwargs = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
    out = general.dora_dot_general(
        x if x_dropped is None else x_dropped, kernel, self.lora_a[...], self.lora_b[...],
        self.magnitude[...], self.scale, dn, norm=norm, base_sq_norm=base_sq,
        detach_norm=self.detach_norm, **op_kwargs)
    if x_dropped is not None:
      out = add_dropout_rest(out, lax.dot_general(x - x_dropped, kernel, dn, **op_kwargs))
    if bias is not None:
      out += jnp.reshape(bias, (*expanded_batch_shape, *self.out_features))
    return out

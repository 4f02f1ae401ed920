"""DoRA for convolutions: the functional core (the Flax NNX wrapper of ``nnx.Conv`` is
:class:`dora_jax.nnx.DoRAConv`, in :mod:`dora_jax.nnx.conv`).

Semantics are Hugging Face PEFT's DoRA conv layers (``DoraConv1dLayer``,
``DoraConv2dLayer``, ``DoraConv3dLayer``) in Flax layout. For a kernel
``W [*window, in, out]`` (channels last, ``nnx.Conv``'s layout):

========== ========================== ===============================================
name       shape                      PEFT tensor
========== ========================== ===============================================
lora_a     ``[*window, in, r]``       ``lora_A.weight [r, in, *window]`` (a conv in → r)
lora_b     ``[r, out]``               ``lora_B.weight [out, r, 1, ...]`` (a 1×1 conv r → out)
magnitude  ``[out]``                  ``lora_magnitude_vector [1, out, 1, ...]``
========== ========================== ===============================================

The low-rank update is the conv ``A`` (same window, strides, padding and
dilations as the base) followed by the 1×1 conv ``B``, which on channels-last
activations is a matmul over the channel axis. Because a conv is linear in
its kernel, ``B(A(x)) = conv(x, ΔW)`` with ``ΔW`` the ``[*window, in, out]``
reshape of ``a₂·b``, where ``a₂ [prod(window)·in, r]`` is ``lora_a`` reshaped;
likewise ``W₂ [prod(window)·in, out]`` is ``W`` reshaped (no copy). PEFT's norm
(per output channel, over the flattened ``in × window``) is therefore
``factored_norm(W₂, a₂, b, s)``::

  n = ‖W₂ + s·a₂·b‖ per output channel        [out], float32, detached
  g = m / n
  y = g ⊙ (conv(x, W) + s·conv(x, A)·b) + bias
  (dropout p > 0, training: y = conv(x, W) + bias + (g−1)⊙conv(x̃, W) + g⊙s·conv(x̃, A)·b)

With ``detach_norm=False`` the norm is differentiated too (the exact DoRA
gradient): plain autodiff through the factored terms of ``conv_norm``, one
more product of ``W₂`` with an ``[r, out]`` cotangent (for ``lora_a``), no
``ΔW``-sized temporary.

Supported: 1-D/2-D/3-D ``nnx.Conv`` with any strides, padding (``SAME``,
``VALID``, explicit, ``CIRCULAR``, ``REFLECT``, ``CAUSAL``), input and kernel
dilation, bias. Refused with a clear error: ``feature_group_count > 1`` (PEFT
gives such layers an ungrouped ``lora_A``, so the update is not a grouped
kernel: PEFT cannot merge it either, and its norm reshapes an unrelated
product), a ``mask``, a custom ``conv_general_dilated`` or ``promote_dtype``.

Dilation: dora_jax applies the base layer's kernel dilation to ``A`` too, so the
adapted layer equals its merged kernel. PEFT builds ``lora_A`` without the
base's dilation, which makes its unmerged output differ from its own merge
(or fail on a shape mismatch); adapters of dilated convs are not
interchangeable with PEFT's.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax._checks import accumulation_dtype, check_bool, check_float, check_scale
from dora_jax.norm import NORM_EPS, factored_norm

PaddingLike = Any


def _tuple(value, n: int, name: str) -> tuple[int, ...]:
  if value is None:
    value = 1
  if isinstance(value, int):
    return (value,) * n
  value = tuple(int(v) for v in value)
  if len(value) != n:
    raise ValueError(f"{name} must be an int or {n} ints for a {n}-D conv, got {value}")
  return value


def canonical_padding(padding: PaddingLike, n: int):
  """A hashable form of Flax's conv ``padding`` (a string, or ``n`` ``(lo, hi)`` pairs)."""
  if isinstance(padding, str):
    return padding
  if isinstance(padding, int):
    return ((padding, padding),) * n
  if isinstance(padding, Sequence) and len(padding) == n:
    pads = tuple((p, p) if isinstance(p, int) else tuple(int(q) for q in p) for p in padding)
    if all(len(p) == 2 for p in pads):
      return pads
  raise ValueError(f"padding must be a string, an int or {n} ints/(lo, hi) pairs, got {padding!r}")


def _pad_input(x, padding, window, kernel_dilation):
  """Flax's input padding for ``CIRCULAR``/``REFLECT``/``CAUSAL``; returns ``(x, lax padding)``."""
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(window, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    return jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]), "VALID"
  if padding == "CAUSAL":
    if len(window) != 1:
      raise ValueError("padding='CAUSAL' is only implemented for 1-D convolutions")
    return jnp.pad(x, [(0, 0), (kernel_dilation[0] * (window[0] - 1), 0), (0, 0)]), "VALID"
  return x, padding


def _conv(x, kernel, strides, padding, input_dilation, kernel_dilation, precision, acc):
  nd = x.ndim
  lhs = (0, nd - 1) + tuple(range(1, nd - 1))
  rhs = (nd - 1, nd - 2) + tuple(range(0, nd - 2))
  return lax.conv_general_dilated(
      x, kernel, strides, padding, lhs_dilation=input_dilation, rhs_dilation=kernel_dilation,
      dimension_numbers=lax.ConvDimensionNumbers(lhs, rhs, lhs), precision=precision,
      preferred_element_type=acc)


def _check_conv(x, kernel, lora_a, lora_b, magnitude, scale, bias):
  for name, value in (("kernel", kernel), ("lora_a", lora_a), ("lora_b", lora_b),
                      ("magnitude", magnitude)):
    check_float(name, value)
  check_scale(scale)
  if jnp.ndim(kernel) < 3:
    raise ValueError(f"kernel must be [*window, in, out] with 1-3 window dims, got {jnp.shape(kernel)}")
  *lead, d_out = jnp.shape(kernel)
  if jnp.ndim(lora_b) != 2:
    raise ValueError(f"lora_b must be [r, out], got {jnp.shape(lora_b)}")
  rank = jnp.shape(lora_b)[0]
  if tuple(jnp.shape(lora_a)) != (*lead, rank):
    raise ValueError(f"lora_a must be [*window, in, r] = {(*lead, rank)} to match kernel "
                     f"{jnp.shape(kernel)} and lora_b {jnp.shape(lora_b)}, got {jnp.shape(lora_a)}")
  if tuple(jnp.shape(lora_b)) != (rank, d_out):
    raise ValueError(f"lora_b must be [r, out] = {(rank, d_out)}, got {jnp.shape(lora_b)}")
  if tuple(jnp.shape(magnitude)) != (d_out,):
    raise ValueError(f"magnitude must be [out] = [{d_out}], got {jnp.shape(magnitude)}")
  if bias is not None and tuple(jnp.shape(bias)) != (d_out,):
    raise ValueError(f"bias must be [out] = [{d_out}], got {jnp.shape(bias)}")
  n_window = len(lead) - 1
  if x is not None:
    check_float("x", x)
    if jnp.ndim(x) < n_window + 1 or jnp.shape(x)[-1] != lead[-1]:
      raise ValueError(f"x must be [*batch, *spatial({n_window}), in={lead[-1]}], got {jnp.shape(x)}")
  return int(math.prod(lead)), d_out, rank


def conv_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale) -> jax.Array:
  """PEFT's conv DoRA norm ``[out]``: per output channel over the flattened ``[*window, in]``.

  ``factored_norm`` on the reshaped kernel ``[prod(window)·in, out]`` and
  ``lora_a [prod(window)·in, r]``: no ``ΔW`` is formed.
  """
  d_in, d_out, rank = (int(math.prod(kernel.shape[:-1])), kernel.shape[-1], lora_b.shape[0])
  return factored_norm(kernel.reshape(d_in, d_out), lora_a.reshape(d_in, rank), lora_b, scale)


def dora_conv(x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
              magnitude: jax.Array, scale, bias: jax.Array | None = None, *,
              strides: int | Sequence[int] = 1, padding: PaddingLike = "SAME",
              input_dilation: int | Sequence[int] = 1,
              kernel_dilation: int | Sequence[int] = 1, precision=None,
              norm: jax.Array | None = None, x_dropped: jax.Array | None = None,
              dtype=None, preferred_element_type=None, detach_norm: bool = True) -> jax.Array:
  """DoRA convolution ``g ⊙ (conv(x, W) + s·conv(x, A)·b) + bias`` (PEFT's conv DoRA).

  Args:
    x: ``[*batch, *spatial, in]`` channels last (batch dims flattened and
      restored; none: one example), as ``nnx.Conv``.
    kernel: frozen ``W [*window, in, out]``.
    lora_a: ``[*window, in, r]``, the kernel of the conv ``A``.
    lora_b: ``[r, out]``, the 1×1 conv ``B``.
    magnitude: ``[out]``.
    scale: LoRA scale ``s``.
    bias: optional ``[out]``, not scaled by ``g``.
    strides, padding, input_dilation, kernel_dilation, precision: as ``nnx.Conv``
      (applied to both ``W`` and ``A``).
    norm: optional precomputed :func:`conv_norm` ``[out]`` (a constant when ``detach_norm``).
    x_dropped: a dropped-out copy of ``x`` for the adapter path (PEFT's dropout).
    dtype: compute dtype (default: ``x``, kernel and bias promoted).
    preferred_element_type: output dtype (default: the compute dtype).
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact gradient through the norm (module doc).

  Returns:
    ``[*batch, *spatial_out, out]``. Differentiable in ``x``, ``lora_a``,
    ``lora_b``, ``magnitude``, ``bias`` (and ``kernel``); the norm is detached
    unless ``detach_norm=False``.
  """
  _check_conv(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  check_bool("detach_norm", detach_norm)
  n = kernel.ndim - 2
  window = tuple(kernel.shape[:n])
  strides = _tuple(strides, n, "strides")
  input_dilation = _tuple(input_dilation, n, "input_dilation")
  kernel_dilation = _tuple(kernel_dilation, n, "kernel_dilation")
  padding = canonical_padding(padding, n)
  acc = accumulation_dtype(x, kernel, lora_a, lora_b, magnitude)
  if norm is None:
    norm = conv_norm(kernel, lora_a, lora_b, scale)
  norm = norm.astype(acc)
  if detach_norm:
    norm = lax.stop_gradient(norm)
  g = magnitude.astype(acc) / jnp.maximum(norm, NORM_EPS)
  s = jnp.asarray(scale, acc)
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *[v for v in (x, kernel, bias) if v is not None])

  n_batch = x.ndim - (n + 1)
  batch_shape = x.shape[:n_batch]

  def prepare(v):
    v = v.astype(cdt)
    if n_batch != 1:
      v = v.reshape((-1,) + v.shape[n_batch:])
    return _pad_input(v, padding, window, kernel_dilation)

  conv = functools.partial(_conv, strides=strides, input_dilation=input_dilation,
                           kernel_dilation=kernel_dilation, precision=precision, acc=acc)
  xp, pad_lax = prepare(x)
  w = kernel.astype(cdt)
  base = conv(xp, w, padding=pad_lax)
  xa = xp if x_dropped is None else prepare(x_dropped)[0]
  h = conv(xa, lora_a.astype(cdt), padding=pad_lax)
  low = jnp.dot(h, lora_b.astype(acc), precision=lax.Precision.HIGHEST, preferred_element_type=acc)
  if x_dropped is None:
    y = g * (base + s * low)
  else:
    y = base + (g - 1.0) * conv(xa, w, padding=pad_lax) + g * s * low
  if bias is not None:
    y = y + bias.astype(cdt).astype(acc)
  if n_batch != 1:
    y = y.reshape(batch_shape + y.shape[1:])
  out_dtype = cdt if preferred_element_type is None else jnp.dtype(preferred_element_type)
  return y.astype(out_dtype)


def conv_merge_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                      magnitude: jax.Array, scale) -> jax.Array:
  """Merged conv kernel ``g ⊙ (W + s·ΔW)`` ``[*window, in, out]`` in ``kernel.dtype``."""
  from dora_jax.dense import merge_kernel
  _check_conv(None, kernel, lora_a, lora_b, magnitude, scale, None)
  d_in, d_out, rank = (int(math.prod(kernel.shape[:-1])), kernel.shape[-1], lora_b.shape[0])
  merged = merge_kernel(kernel.reshape(d_in, d_out), lora_a.reshape(d_in, rank), lora_b,
                        magnitude, scale)
  return merged.reshape(kernel.shape)


_STATIC = ("scale", "strides", "padding", "input_dilation", "kernel_dilation", "precision",
           "dtype", "preferred_element_type", "detach_norm")
# One compiled program per configuration: eager calls round the norm as jitted ones do.
_dora_conv_jit = jax.jit(dora_conv, static_argnames=_STATIC)


def check_conv_base(base: Any, *, where: str) -> None:
  """Raise ``NotImplementedError`` for ``nnx.Conv``/``nn.Conv`` settings DoRA cannot adapt."""
  groups = getattr(base, "feature_group_count", 1)
  if groups != 1:
    raise NotImplementedError(
        f"{where}: feature_group_count={groups} is not supported. PEFT gives a grouped conv an "
        "ungrouped lora_A (in -> r) and a grouped lora_B, so the update is not a grouped kernel: "
        "it cannot be merged (PEFT refuses too) and PEFT's norm reshapes a product that is not "
        "the layer's weight. Adapt only convs with feature_group_count=1")
  if getattr(base, "mask", None) is not None:
    raise NotImplementedError(f"{where}: a masked conv (mask=...) is not supported by DoRA")
  if getattr(base, "conv_general_dilated", lax.conv_general_dilated) is not lax.conv_general_dilated:
    raise NotImplementedError(f"{where}: a custom conv_general_dilated is not supported by DoRA")




def __getattr__(name: str):
  # ``from dora_jax.conv import DoRAConv`` keeps working (the layer lives in dora_jax.nnx).
  if name == "DoRAConv":
    from dora_jax.nnx.conv import DoRAConv
    return DoRAConv
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

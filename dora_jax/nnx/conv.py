"""The Flax NNX DoRA wrapper of :class:`flax.nnx.Conv` (formulas in :mod:`dora_jax.conv`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax.conv import _dora_conv_jit, _tuple, canonical_padding, check_conv_base
from dora_jax.nnx.base import DoRALayer, check_dtype_promotion, matrix_layout


class DoRAConv(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Conv` (1-D/2-D/3-D), PEFT's conv DoRA.

  Keeps the base ``kernel [*window, in, out]`` and ``bias [out]`` Variables and
  adds :class:`dora_jax.nnx.DoRAParam` ``lora_a [*window, in, r]`` (PEFT's
  kaiming-uniform init, bound ``1/√(prod(window)·in)``), ``lora_b [r, out]``
  (zeros) and ``magnitude [out]`` (``‖W[..., j]‖₂``). ``d_in = prod(window)·in``,
  ``d_out = out``; merge, cached norms and the I/O 2-D view work as for
  :class:`dora_jax.nnx.DoRADense`. See :mod:`dora_jax.conv` for the formulas
  and what is refused.

  Args:
    base: the ``nnx.Conv`` to adapt.
    rank: ``r``, ``1 <= r <= min(prod(window)·in, out)``.
    alpha, rslora, dropout, param_dtype, rngs, detach_norm: as
      :class:`dora_jax.nnx.DoRADense`.
  """

  #: ``apply_dora(targets="all-linear")`` does not select convs (as PEFT).
  native = False  # the [d_in, d_out] view (factored_norm, merge_kernel)
  all_linear = False

  def __init__(self, base: nnx.Conv, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = "", detach_norm: bool = True):
    self.check_base(base, nnx.Conv)
    where = path or "Conv"
    check_conv_base(base, where=where)
    check_dtype_promotion(base)
    window = tuple(int(k) for k in base.kernel_size)
    if not 1 <= len(window) <= 3:
      raise NotImplementedError(f"{where}: DoRA supports 1-D, 2-D and 3-D convs, got window {window}")
    n = len(window)
    self.kernel_size = window
    self.strides = _tuple(base.strides, n, "strides")
    self.padding = canonical_padding(base.padding, n)
    self.input_dilation = _tuple(base.input_dilation, n, "input_dilation")
    self.kernel_dilation = _tuple(base.kernel_dilation, n, "kernel_dilation")
    self.in_features = int(base.in_features)
    self.out_features = int(base.out_features)
    layout = matrix_layout(tuple(base.kernel.shape), n_in=n + 1)
    self._init_adapters(base, layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                        dropout=dropout, param_dtype=param_dtype, rngs=rngs, path=path,
                        detach_norm=detach_norm)

  def __call__(self, inputs: jax.Array, out_sharding: Any = None, *,
               deterministic: bool | None = None,
               rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
    """``[*batch, *spatial, in] -> [*batch, *spatial_out, out]`` (as ``nnx.Conv``).

    ``deterministic``/``rngs`` override the dropout mode and key for this call.
    """
    if out_sharding is not None:
      raise NotImplementedError("DoRAConv does not support out_sharding")
    if inputs.ndim < len(self.kernel_size) + 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs must be [*batch, *spatial({len(self.kernel_size)}), "
                       f"{self.in_features}], got {inputs.shape}")
    cdt = self._compute_dtype(inputs)
    x = inputs.astype(cdt)
    norm = self._norm_for_call()
    x_dropped = self._dropped(x, deterministic, rngs)
    return _dora_conv_jit(
        x, self.kernel[...], self.lora_a[...], self.lora_b[...], self.magnitude[...],
        scale=self.scale, bias=None if self.bias is None else self.bias[...],
        strides=self.strides, padding=self.padding, input_dilation=self.input_dilation,
        kernel_dilation=self.kernel_dilation, precision=self.precision, norm=norm,
        x_dropped=x_dropped, dtype=cdt, detach_norm=self.detach_norm,
        preferred_element_type=(None if self.preferred_element_type is None
                                else jnp.dtype(self.preferred_element_type)))

  def describe(self) -> str:
    return (f"Conv{len(self.kernel_size)}D({self.in_features} -> {self.out_features}, "
            f"window {self.kernel_size}) rank={self.rank} alpha={self.alpha:g} "
            f"scale={self.scale:g}" + (" rslora" if self.rslora else "")
            + (f" dropout={self.dropout_rate:g}" if self.dropout_rate else ""))

  # -- PEFT tensors (for an I/O hook) -----------------------------------------

  def peft_tensors(self) -> dict[str, jax.Array]:
    """PEFT's tensors: ``lora_A.weight [r, in, *window]``, ``lora_B.weight [out, r, 1, ...]``,
    ``lora_magnitude_vector [1, out, 1, ...]`` (PEFT keeps a conv magnitude with the
    kernel's rank, as its keepdim norm)."""
    n = len(self.kernel_size)
    a = jnp.transpose(self.lora_a[...], (n + 1, n, *range(n)))
    b = self.lora_b[...].T.reshape(self.out_features, self.rank, *(1,) * n)
    m = self.magnitude[...].reshape(1, self.out_features, *(1,) * n)
    return {".lora_A.weight": a, ".lora_B.weight": b, ".lora_magnitude_vector": m}

  def load_peft_tensors(self, tensors: dict[str, Any]) -> None:
    """Set the adapters from PEFT-layout arrays (the inverse of :meth:`peft_tensors`)."""
    n = len(self.kernel_size)
    want = {".lora_A.weight": (self.rank, self.in_features, *self.kernel_size),
            ".lora_B.weight": (self.out_features, self.rank, *(1,) * n),
            ".lora_magnitude_vector": (1, self.out_features, *(1,) * n)}
    for suffix, shape in want.items():
      got = None if suffix not in tensors else tuple(jnp.shape(tensors[suffix]))
      if got != shape:
        raise ValueError(f"{suffix} must have shape {shape}, got {got}")
    a = jnp.transpose(jnp.asarray(tensors[".lora_A.weight"]), (*range(2, n + 2), 1, 0))
    self.lora_a[...] = a.astype(self.lora_a.dtype)
    b = jnp.asarray(tensors[".lora_B.weight"]).reshape(self.out_features, self.rank).T
    self.lora_b[...] = b.astype(self.lora_b.dtype)
    self.magnitude[...] = jnp.asarray(tensors[".lora_magnitude_vector"]).reshape(
        self.out_features).astype(self.magnitude.dtype)


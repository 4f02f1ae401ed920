"""The Linen drop-in ``nn.Conv`` with a DoRA adapter (PEFT's conv DoRA, 1-D/2-D/3-D).

``params``: ``kernel [*window, in, features]`` and ``bias`` (``nn.Conv``'s
names); ``dora``: ``lora_a [*window, in, r]`` (PEFT's kaiming-uniform),
``lora_b [r, features]`` (zeros), ``magnitude [features]``. Runs
:func:`dora_jax.conv.dora_conv`, as the NNX wrapper does. Not covered:
``feature_group_count > 1``, masked convs, cached-norm inference.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike

from dora_jax import _adapter
from dora_jax.conv import _dora_conv_jit, _tuple, canonical_padding, check_conv_base
from dora_jax.dense import lora_scale
from dora_jax.linen._common import ADAPTER_COLLECTION, check_settings
from dora_jax.linen.dense import dropped_input


class DoRAConv(nn.Module):
  """Drop-in ``nn.Conv`` with a DoRA adapter (PEFT's conv DoRA, 1-D/2-D/3-D).

  ``kernel [*window, in, features]`` and ``bias`` in ``params``; ``lora_a
  [*window, in, r]`` (PEFT's kaiming-uniform), ``lora_b [r, features]`` (zeros),
  ``magnitude [features]`` in ``dora``. See :mod:`dora_jax.conv`.

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as
      ``nn.Conv``. ``feature_group_count`` must be 1 and ``mask`` ``None``.
    rank, alpha, rslora, dropout, adapter_dtype, deterministic, detach_norm: as
      :class:`dora_jax.linen.DoRADense`.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] | None = 1
  padding: Any = "SAME"
  input_dilation: int | Sequence[int] | None = 1
  kernel_dilation: int | Sequence[int] | None = 1
  feature_group_count: int = 1
  use_bias: bool = True
  mask: Any = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  adapter_dtype: Dtype = jnp.float32
  deterministic: bool | None = None
  detach_norm: bool = True

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``[*batch, *spatial, in] -> [*batch, *spatial_out, features]``."""
    where = "/".join(self.path) or "DoRAConv"
    check_conv_base(self, where=where)
    window = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    d_in_ch = jnp.shape(inputs)[-1]
    d_in = int(math.prod(window)) * d_in_ch
    rate = check_settings(where, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          adapter_dtype=self.adapter_dtype, d_in=d_in, d_out=self.features,
                          detach_norm=self.detach_norm)
    kernel = self.param("kernel", self.kernel_init, (*window, d_in_ch, self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    lora_a = self.variable(ADAPTER_COLLECTION, "lora_a", lambda: _adapter.init_lora_a(
        self.make_rng("params"), (*window, d_in_ch, self.rank), d_in, self.adapter_dtype)).value
    lora_b = self.variable(ADAPTER_COLLECTION, "lora_b", lambda: jnp.zeros(
        (self.rank, self.features), self.adapter_dtype)).value
    magnitude = self.variable(ADAPTER_COLLECTION, "magnitude", lambda: _adapter.init_magnitude(
        jnp.asarray(kernel).reshape(d_in, self.features), self.adapter_dtype)).value
    cdt = jnp.dtype(self.dtype) if self.dtype is not None else jnp.result_type(
        *[v for v in (inputs, kernel, bias) if v is not None])
    x = jnp.asarray(inputs).astype(cdt)
    x_dropped = None
    if rate > 0.0:
      deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
      if not deterministic:
        x_dropped = dropped_input(self, x, rate)
    n = len(window)
    return _dora_conv_jit(
        x, kernel, lora_a, lora_b, magnitude,
        scale=lora_scale(self.alpha, self.rank, rslora=self.rslora), bias=bias,
        strides=_tuple(self.strides, n, "strides"), padding=canonical_padding(self.padding, n),
        input_dilation=_tuple(self.input_dilation, n, "input_dilation"),
        kernel_dilation=_tuple(self.kernel_dilation, n, "kernel_dilation"),
        precision=self.precision, x_dropped=x_dropped, dtype=cdt, detach_norm=self.detach_norm)

"""The Linen drop-in ``nn.Dense`` with a DoRA adapter, and the computation it shares
with an intercepted ``nn.Dense``.

Variables of one adapted Dense layer (``d_in`` = the input's last axis):

============== ============================ =========================================
collection     name / shape                 notes
============== ============================ =========================================
``params``     ``kernel [d_in, d_out]``     the frozen base weights, ``nn.Dense``'s names
``params``     ``bias [d_out]``             (when ``use_bias``)
``dora``       ``lora_a [d_in, r]``         trainable; ``U(-1/√d_in, 1/√d_in)`` (PEFT)
``dora``       ``lora_b [r, d_out]``        trainable; zeros
``dora``       ``magnitude [d_out]``        trainable; ``‖kernel[:, j]‖₂`` when created
``dora_cache`` ``norm [d_out]``, ``stamp``  only with ``cache_norm=True``
``dora_cache`` ``base_sq_norm [d_out]``     written by :func:`dora_jax.linen.cache_base_norms`
============== ============================ =========================================
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.typing import Dtype, Initializer, PrecisionLike

from dora_jax import _adapter, general
from dora_jax.dense import lora_scale
from dora_jax.linen._common import ADAPTER_COLLECTION, CACHE_COLLECTION, check_settings


def dropped_input(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """``x`` after inverted dropout at ``rate``, with ``module``'s ``dropout`` rng."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
  return jax.lax.select(mask, x / keep, jnp.zeros_like(x))


def _dropout_input(module: nn.Module, x: jax.Array, rate: float, deterministic):
  """The adapter path's dropped-out input, or ``None`` (no dropout, or deterministic)."""
  if rate <= 0.0:
    return None
  deterministic = nn.merge_param("deterministic", module.deterministic
                                 if hasattr(module, "deterministic") else None, deterministic)
  return None if deterministic else dropped_input(module, x, rate)


def dense_call(module: nn.Module, inputs: jax.Array, *, features: int, use_bias: bool,
               dtype, param_dtype, precision, kernel_init, bias_init, rank: int,
               alpha: float, rslora: bool, dropout: float, adapter_dtype,
               cache_norm: bool, deterministic: bool | None, base_dtype: str | None = None,
               block_size: int | None = None, detach_norm: bool = True) -> jax.Array:
  """The DoRA Dense computation inside ``module``'s scope (a Dense or DoRADense).

  ``inputs [..., d_in] -> [..., features]``; creates the adapters (from the
  current kernel) when the ``dora`` collection is mutable and they are missing.
  A quantized ``kernel`` (or, with ``base_dtype``, the float one quantized now, see
  :func:`dora_jax.linen.ops.quantized_weight`) runs :func:`_quantized_call`.
  ``detach_norm=False``: the exact gradient through the norm.
  """
  d_in = jnp.shape(inputs)[-1]
  path = "/".join(module.path) or type(module).__name__
  rate = check_settings(path, rank=rank, alpha=alpha, dropout=dropout,
                        adapter_dtype=adapter_dtype, d_in=d_in, d_out=features,
                        detach_norm=detach_norm)
  kernel = module.param("kernel", kernel_init, (d_in, features), param_dtype)
  bias = module.param("bias", bias_init, (features,), param_dtype) if use_bias else None
  if base_dtype is not None or isinstance(kernel, general.QuantizedWeight):
    return _quantized_call(module, inputs, kernel, bias, path, dtype=dtype, precision=precision,
                           rank=rank, alpha=alpha, rslora=rslora, rate=rate,
                           adapter_dtype=adapter_dtype, cache_norm=cache_norm,
                           deterministic=deterministic, base_dtype=base_dtype,
                           block_size=block_size, detach_norm=detach_norm)

  def init_a():
    return _adapter.init_lora_a(module.make_rng("params"), (d_in, rank), d_in, adapter_dtype)

  lora_a = module.variable(ADAPTER_COLLECTION, "lora_a", init_a).value
  lora_b = module.variable(ADAPTER_COLLECTION, "lora_b",
                           lambda: jnp.zeros((rank, features), adapter_dtype)).value
  magnitude = module.variable(
      ADAPTER_COLLECTION, "magnitude",
      lambda: _adapter.init_magnitude(jnp.asarray(kernel), adapter_dtype)).value
  scale = lora_scale(alpha, rank, rslora=rslora)

  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *[v for v in (inputs, kernel, bias) if v is not None])
  x = jnp.asarray(inputs).astype(cdt)

  norm = None
  if cache_norm:
    if module.has_variable(CACHE_COLLECTION, "norm"):
      norm_var = module.variable(CACHE_COLLECTION, "norm")
      stamp_var = module.variable(CACHE_COLLECTION, "stamp")
      norm, new_cache, new_stamp = _adapter.cached_norm(
          kernel, lora_a, lora_b, scale, norm_var.value, stamp_var.value)
      if module.is_mutable_collection(CACHE_COLLECTION):
        norm_var.value, stamp_var.value = new_cache, new_stamp
    elif module.is_mutable_collection(CACHE_COLLECTION):
      norm, new_cache, new_stamp = _adapter.cached_norm(
          kernel, lora_a, lora_b, scale, jnp.zeros((features,), jnp.float32),
          _adapter.empty_stamp())
      module.variable(CACHE_COLLECTION, "norm", lambda: new_cache)
      module.variable(CACHE_COLLECTION, "stamp", lambda: new_stamp)

  base_sq = None  # the frozen kernel's ‖W_j‖², when cache_base_norms stored them
  if module.has_variable(CACHE_COLLECTION, "base_sq_norm"):
    base_sq = module.variable(CACHE_COLLECTION, "base_sq_norm").value

  x_dropped = _dropout_input(module, x, rate, deterministic)
  return _adapter.dora_forward(x, kernel, lora_a, lora_b, magnitude, scale, bias, norm=norm,
                               base_sq_norm=base_sq, x_dropped=x_dropped, precision=precision,
                               detach_norm=detach_norm)


def _quantized_call(module: nn.Module, inputs, kernel, bias, path: str, *, dtype, precision,
                    rank: int, alpha: float, rslora: bool, rate: float, adapter_dtype,
                    cache_norm: bool, deterministic, base_dtype, block_size,
                    detach_norm: bool) -> jax.Array:
  """QDoRA Dense: DoRA over the quantized ``kernel [d_in, features]`` (its own
  part-by-part contraction; ``magnitude = ‖Ŵ‖``), adapters and caches as the float path."""
  from dora_jax.linen import ops
  d_in, features = int(jnp.shape(kernel)[0]), int(jnp.shape(kernel)[1])
  layout = general.WeightLayout((d_in, features), (0,), (), (1,))
  settings = ops.Settings(rank=rank, alpha=float(alpha), rslora=bool(rslora), dropout=rate,
                          adapter_dtype=jnp.dtype(adapter_dtype), cache_norm=bool(cache_norm),
                          deterministic=deterministic, base_dtype=base_dtype,
                          block_size=block_size, detach_norm=detach_norm)
  kernel = ops.quantized_weight(module, "kernel", kernel, layout, settings, f"{path}/kernel")
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *[v for v in (inputs, kernel.dtype, bias) if v is not None])
  x = jnp.asarray(inputs).astype(cdt)
  kernel = kernel.astype(cdt)

  def init_a():
    return _adapter.init_lora_a(module.make_rng("params"), (d_in, rank), d_in, adapter_dtype)

  lora_a = module.variable(ADAPTER_COLLECTION, "lora_a", init_a).value
  lora_b = module.variable(ADAPTER_COLLECTION, "lora_b",
                           lambda: jnp.zeros((rank, features), adapter_dtype)).value
  magnitude = module.variable(ADAPTER_COLLECTION, "magnitude",
                              lambda: general.init_magnitude(kernel, layout, adapter_dtype)).value
  scale = settings.scale
  base_sq = None
  if module.has_variable(CACHE_COLLECTION, "base_sq_norm"):
    base_sq = module.variable(CACHE_COLLECTION, "base_sq_norm").value
  norm = None
  if cache_norm and (module.has_variable(CACHE_COLLECTION, "norm")
                     or module.is_mutable_collection(CACHE_COLLECTION)):
    if module.has_variable(CACHE_COLLECTION, "norm"):
      old, stamp = (module.variable(CACHE_COLLECTION, "norm").value,
                    module.variable(CACHE_COLLECTION, "stamp").value)
    else:
      old, stamp = jnp.zeros((features,), jnp.float32), _adapter.empty_stamp()
    norm, new_cache, new_stamp = ops._cached_norm(kernel, lora_a, lora_b, scale, layout, old,
                                                  stamp, base_sq)
    if module.is_mutable_collection(CACHE_COLLECTION):
      module.put_variable(CACHE_COLLECTION, "norm", new_cache)
      module.put_variable(CACHE_COLLECTION, "stamp", new_stamp)
  x_dropped = _dropout_input(module, x, rate, deterministic)
  op = ops.WeightOp.dot_general((((x.ndim - 1,), (0,)), ((), ())), precision)
  y = ops._forward(x, kernel, lora_a, lora_b, magnitude, norm, base_sq, x_dropped, op=op,
                   scale=float(scale), detach_norm=detach_norm)
  if bias is not None:
    y += jnp.reshape(jnp.asarray(bias, cdt), (1,) * (y.ndim - 1) + (-1,))
  return y


class DoRADense(nn.Module):
  """Drop-in replacement for ``nn.Dense`` with a DoRA adapter (PEFT semantics).

  ``y = m / ‖W + s·a·b‖ ⊙ (x·W + s·(x·a)·b) + bias`` for ``x [..., d_in]``, with
  ``kernel [d_in, features]`` and ``bias [features]`` in ``params`` (``nn.Dense``'s
  names and initialisers) and ``lora_a [d_in, r]``, ``lora_b [r, features]``,
  ``magnitude [features]`` in the ``dora`` collection.

  Attributes:
    features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init:
      as ``nn.Dense``. ``precision`` applies to the forward matmuls.
    rank: LoRA rank ``r`` (``1 <= r <= min(d_in, features)``).
    alpha: LoRA alpha; scale ``alpha / r`` (``alpha / √r`` with ``rslora``).
    rslora: rank-stabilised scaling.
    dropout: dropout rate on the adapter path (PEFT's ``lora_dropout``); needs a
      ``dropout`` rng and ``deterministic=False`` in training.
    adapter_dtype: dtype of the adapter variables (default float32).
    cache_norm: reuse the norm stored in ``dora_cache`` while a stamp of the
      adapters matches; recompute (and store, when ``dora_cache`` is mutable)
      otherwise. For unmerged inference.
    deterministic: default for the call argument (dropout off when True).
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact DoRA gradient through the norm (see
      :func:`dora_jax.dora_dense`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.linen import DoRADense
    >>> layer = DoRADense(features=8, rank=4, alpha=8)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 16)))
    >>> sorted(variables), variables["dora"]["lora_a"].shape
    (['dora', 'params'], (16, 4))
  """

  features: int
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  adapter_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  cache_norm: bool = False
  deterministic: bool | None = None
  detach_norm: bool = True

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``inputs [..., d_in] -> [..., features]``."""
    return dense_call(
        self, inputs, features=self.features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision, kernel_init=self.kernel_init,
        bias_init=self.bias_init, rank=self.rank, alpha=self.alpha, rslora=self.rslora,
        dropout=self.dropout, adapter_dtype=self.adapter_dtype, cache_norm=self.cache_norm,
        deterministic=deterministic if deterministic is not None else self.deterministic,
        detach_norm=self.detach_norm)

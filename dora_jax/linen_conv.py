"""DoRA embeddings and convolutions for Flax Linen: drop-in ``nn.Embed`` and ``nn.Conv``.

Same layout as :mod:`dora_jax.linen`: the frozen base weights keep the Linen
layer's names in ``params`` (``embedding``; ``kernel``, ``bias``) and the
adapters live in the ``dora`` collection (:data:`dora_jax.linen.ADAPTER_COLLECTION`):

============ ======================================= ==================================
module       ``dora`` variables                      semantics
============ ======================================= ==================================
DoRAEmbed    ``lora_a [num_embeddings, r]`` (zeros),  :func:`dora_jax.embed.dora_embed`,
             ``lora_b [r, features]`` (N(0, 1)),      :func:`dora_jax.embed.dora_attend`
             ``magnitude [features]``
DoRAConv     ``lora_a [*window, in, r]``,             :func:`dora_jax.conv.dora_conv`
             ``lora_b [r, features]`` (zeros),
             ``magnitude [features]``
============ ======================================= ==================================

Both run the same functions as the NNX wrappers, so NNX and Linen agree given
the same parameters. :func:`merge_params` folds the adapters into the plain
model's ``params`` (Dense, Conv and Embed alike).

Not covered (use the NNX wrappers for these): intercepting an existing model's
``nn.Embed``/``nn.Conv`` (``dora_jax.linen.intercept_dora`` handles ``nn.Dense``
only), cached-norm inference, ``feature_group_count > 1`` and masked convs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict, unfreeze
from flax.linen.linear import default_embed_init
from flax.typing import Dtype, Initializer, PrecisionLike

from dora_jax import _adapter
from dora_jax.conv import (_dora_conv_jit, _tuple, canonical_padding, check_conv_base,
                           conv_merge_kernel)
from dora_jax.dense import lora_scale, merge_kernel
from dora_jax.embed import _attend_jit, _embed_jit
from dora_jax.linen import ADAPTER_COLLECTION


class DoRAEmbed(nn.Module):
  """Drop-in ``nn.Embed`` with a DoRA adapter (PEFT's embedding DoRA).

  ``__call__(ids [...]) -> [..., features]`` and ``attend(query [..., features])
  -> [..., num_embeddings]`` use the adapted table ``g ⊙ (E + s·a·b)``
  without forming it (see :mod:`dora_jax.embed`). Needs a ``params`` rng at
  init (``lora_b``'s normal init).

  Attributes:
    num_embeddings, features, dtype, param_dtype, embedding_init: as ``nn.Embed``.
    rank: ``1 <= r <= min(num_embeddings, features)``.
    alpha, rslora: scale ``alpha / r`` (``alpha / √r``).
    adapter_dtype: dtype of the ``dora`` variables (default float32).
  """

  num_embeddings: int
  features: int
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  adapter_dtype: Dtype = jnp.float32
  embedding_init: Initializer = default_embed_init

  def setup(self):
    _adapter.check_rank(self.rank, self.num_embeddings, self.features,
                        "/".join(self.path) or "DoRAEmbed")
    self.embedding = self.param("embedding", self.embedding_init,
                                (self.num_embeddings, self.features), self.param_dtype)
    self.lora_a = self.variable(ADAPTER_COLLECTION, "lora_a", lambda: jnp.zeros(
        (self.num_embeddings, self.rank), self.adapter_dtype))
    self.lora_b = self.variable(ADAPTER_COLLECTION, "lora_b", lambda: jax.random.normal(
        self.make_rng("params"), (self.rank, self.features), jnp.float32).astype(
            self.adapter_dtype))
    self.magnitude = self.variable(ADAPTER_COLLECTION, "magnitude", lambda: (
        _adapter.init_magnitude(jnp.asarray(self.embedding), self.adapter_dtype)))

  @property
  def scale(self) -> float:
    return lora_scale(self.alpha, self.rank, rslora=self.rslora)

  def _dtype(self):
    return jnp.dtype(self.dtype) if self.dtype is not None else jnp.dtype(self.param_dtype)

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """``ids [...] -> [..., features]``."""
    return _embed_jit(inputs, self.embedding, self.lora_a.value, self.lora_b.value,
                      self.magnitude.value, scale=self.scale, dtype=self._dtype())

  def attend(self, query: jax.Array) -> jax.Array:
    """``query [..., features] -> [..., num_embeddings]`` against the adapted table."""
    return _attend_jit(query, self.embedding, self.lora_a.value, self.lora_b.value,
                       self.magnitude.value, scale=self.scale,
                       dtype=jnp.result_type(query, self._dtype()))


class DoRAConv(nn.Module):
  """Drop-in ``nn.Conv`` with a DoRA adapter (PEFT's conv DoRA, 1-D/2-D/3-D).

  ``kernel [*window, in, features]`` and ``bias`` in ``params``; ``lora_a
  [*window, in, r]`` (PEFT's kaiming-uniform), ``lora_b [r, features]`` (zeros),
  ``magnitude [features]`` in ``dora``. See :mod:`dora_jax.conv`.

  Attributes:
    features, kernel_size, strides, padding, input_dilation, kernel_dilation,
    use_bias, dtype, param_dtype, precision, kernel_init, bias_init: as
      ``nn.Conv``. ``feature_group_count`` must be 1 and ``mask`` ``None``.
    rank, alpha, rslora, dropout, adapter_dtype, deterministic: as
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

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``[*batch, *spatial, in] -> [*batch, *spatial_out, features]``."""
    where = "/".join(self.path) or "DoRAConv"
    check_conv_base(self, where=where)
    window = (self.kernel_size,) if isinstance(self.kernel_size, int) else tuple(self.kernel_size)
    d_in_ch = jnp.shape(inputs)[-1]
    d_in = int(math.prod(window)) * d_in_ch
    _adapter.check_rank(self.rank, d_in, self.features, where)
    rate = _adapter.check_dropout(self.dropout)
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
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        x_dropped = jax.lax.select(mask, x / keep, jnp.zeros_like(x))
    n = len(window)
    return _dora_conv_jit(
        x, kernel, lora_a, lora_b, magnitude,
        scale=lora_scale(self.alpha, self.rank, rslora=self.rslora), bias=bias,
        strides=_tuple(self.strides, n, "strides"), padding=canonical_padding(self.padding, n),
        input_dilation=_tuple(self.input_dilation, n, "input_dilation"),
        kernel_dilation=_tuple(self.kernel_dilation, n, "kernel_dilation"),
        precision=self.precision, x_dropped=x_dropped, dtype=cdt)


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _walk(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def merge_params(params: Mapping[str, Any], adapters: Mapping[str, Any], *, alpha: float,
                 rslora: bool = False) -> dict:
  """Merged ``params`` for the plain model (``nn.Dense``, ``nn.Conv``, ``nn.Embed``).

  Each adapted layer's ``kernel`` (``[*in_shape, out]``: Dense or Conv) or
  ``embedding`` (``[num_embeddings, features]``) becomes ``g ⊙ (W + s·a·b)``
  on its ``[prod(in_shape), out]`` view. ``params``/``adapters`` may be the
  collections or variables dicts holding them; the inputs are not modified.

  Raises:
    ValueError: no adapters, or adapters without a ``kernel``/``embedding`` beside them.
  """
  wrapped = "params" in params
  tree = unfreeze(params["params"] if wrapped else params)
  tree = jax.tree.map(lambda v: v, tree)
  ad = adapters.get(ADAPTER_COLLECTION, adapters)
  ad = unfreeze(ad) if isinstance(ad, FrozenDict) else ad
  paths = sorted({p[:-1] for p, _ in _walk(ad) if p[-1] == "magnitude"})
  if not paths:
    raise ValueError("merge_params: no DoRA adapters (lora_a/lora_b/magnitude) found")
  for path in paths:
    node_a, node_p = ad, tree
    for k in path:
      node_a = node_a[k]
      node_p = node_p.get(k, {}) if isinstance(node_p, Mapping) else {}
    name = "kernel" if "kernel" in node_p else "embedding" if "embedding" in node_p else None
    if name is None:
      raise ValueError(f"merge_params: adapters at {'/'.join(path)!r} have no kernel or "
                       "embedding in params")
    a, b, m = node_a["lora_a"], node_a["lora_b"], node_a["magnitude"]
    scale = lora_scale(alpha, int(a.shape[-1]), rslora=rslora)
    w = node_p[name]
    if name == "kernel" and w.ndim >= 3:
      node_p[name] = conv_merge_kernel(w, a, b, m, scale)
    else:
      node_p[name] = merge_kernel(w, a, b, m, scale)
  return {"params": tree} if wrapped else tree

"""The Linen drop-in ``nn.Embed`` with a DoRA adapter (PEFT's embedding DoRA).

``params/embedding [num_embeddings, features]`` (``nn.Embed``'s name) and, in
the ``dora`` collection, ``lora_a [num_embeddings, r]`` (zeros), ``lora_b [r,
features]`` (N(0, 1)), ``magnitude [features]``; the same functions as the NNX
wrapper (:func:`dora_jax.embed.dora_embed`, :func:`dora_jax.embed.dora_attend`),
so NNX and Linen agree given the same parameters.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.linear import default_embed_init
from flax.typing import Dtype, Initializer

from dora_jax import _adapter
from dora_jax.dense import lora_scale
from dora_jax.embed import _attend_jit, _embed_jit
from dora_jax.linen._common import ADAPTER_COLLECTION, check_settings


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
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact DoRA gradient through the norm.
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
  detach_norm: bool = True

  def setup(self):
    check_settings("/".join(self.path) or "DoRAEmbed", rank=self.rank, alpha=self.alpha,
                   adapter_dtype=self.adapter_dtype, d_in=self.num_embeddings,
                   d_out=self.features, detach_norm=self.detach_norm)
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
                      self.magnitude.value, scale=self.scale, dtype=self._dtype(),
                      detach_norm=self.detach_norm)

  def attend(self, query: jax.Array) -> jax.Array:
    """``query [..., features] -> [..., num_embeddings]`` against the adapted table."""
    return _attend_jit(query, self.embedding, self.lora_a.value, self.lora_b.value,
                       self.magnitude.value, scale=self.scale,
                       dtype=jnp.result_type(query, self._dtype()), detach_norm=self.detach_norm)

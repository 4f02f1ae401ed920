"""The Flax NNX DoRA wrapper of :class:`flax.nnx.Embed` (formulas in :mod:`dora_jax.embed`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax.embed import _attend_jit, _embed_jit
from dora_jax.nnx.base import (DoRALayer, DoRAParam, check_dtype_promotion,
                               init_magnitude, matrix_layout)


class DoRAEmbed(DoRALayer):
  """DoRA around a frozen :class:`flax.nnx.Embed` (PEFT's embedding DoRA).

  Keeps the base layer's ``embedding`` Variable (same object, same attribute
  name, so state paths do not change) and adds ``lora_a [num_embeddings, r]``
  (zeros), ``lora_b [r, features]`` (``N(0, 1)``) and ``magnitude [features]``
  as :class:`dora_jax.nnx.DoRAParam` (PEFT's init: ``lora_embedding_A`` zeros,
  ``lora_embedding_B`` normal, so the layer starts as the base layer).
  ``__call__(ids)`` and ``attend(query)`` match ``nnx.Embed``'s; see
  :mod:`dora_jax.embed` for the formulas. Cached-norm inference
  (:func:`dora_jax.surgery.freeze_scales`) works as for the Dense wrappers.

  Args:
    base: the ``nnx.Embed`` to adapt (a custom ``promote_dtype`` is refused).
    rank: ``r``, ``1 <= r <= min(num_embeddings, features)``.
    alpha, rslora: scale ``alpha / r`` (``alpha / √r`` with rsLoRA).
    dropout: recorded only (PEFT applies no dropout to embedding adapters).
    param_dtype: adapter dtype (default float32).
    rngs: ``params`` stream initialises ``lora_b``.
    detach_norm: as :class:`dora_jax.nnx.DoRADense` (``False``: the exact gradient).
  """

  #: ``apply_dora(targets="all-linear")`` does not select embeddings (as PEFT).
  native = False  # the [d_in, d_out] view (factored_norm, merge_kernel)
  all_linear = False

  def __init__(self, base: nnx.Embed, *, rank: int, alpha: float, rslora: bool = False,
               dropout: float = 0.0, param_dtype=jnp.float32, rngs: nnx.Rngs,
               path: str = "", detach_norm: bool = True):
    self.check_base(base, nnx.Embed)
    check_dtype_promotion(base)
    layout = matrix_layout((int(base.num_embeddings), int(base.features)))
    self._init_config(base, layout=layout, rank=rank, alpha=alpha, rslora=rslora,
                      dropout=dropout, path=path or "Embed", detach_norm=detach_norm)
    self.embedding = base.embedding
    self.bias = nnx.data(None)
    self.dtype = base.dtype
    self.precision = None
    self.preferred_element_type = None
    self.param_dtype = jnp.dtype(param_dtype)
    self.lora_a = DoRAParam(jnp.zeros((self.d_in, rank), self.param_dtype))
    self.lora_b = DoRAParam(
        jax.random.normal(rngs.params(), (rank, self.d_out), jnp.float32).astype(self.param_dtype))
    self.magnitude = DoRAParam(
        init_magnitude(self.embedding[...], layout=layout, dtype=self.param_dtype,
                       native=False))
    self._init_cache()
    self.dropout = nnx.data(None)

  @property
  def kernel(self) -> nnx.Param:
    """The frozen table ``[num_embeddings, features]`` (the 2-D view of the base weight)."""
    return self.embedding

  @property
  def num_embeddings(self) -> int:
    return self.d_in

  @property
  def features(self) -> int:
    return self.d_out

  @classmethod
  def wraps_subclass(cls, base: nnx.Module, registered: type) -> bool:
    return (type(base).__call__ is registered.__call__
            and type(base).attend is registered.attend)

  def _norm(self) -> jax.Array | None:
    return self._norm_for_call()

  def __call__(self, inputs: jax.Array, out_sharding: Any = None) -> jax.Array:
    """``ids [...] (integers) -> [..., features]`` in ``dtype`` (as ``nnx.Embed``)."""
    if out_sharding is not None:
      raise NotImplementedError("DoRAEmbed does not support out_sharding")
    a, b, m = self.adapter_views()
    return _embed_jit(inputs, self._kernel2d(), a, b, m, scale=self.scale, norm=self._norm(),
                      dtype=jnp.dtype(self.dtype), detach_norm=self.detach_norm)

  def attend(self, query: jax.Array, out_sharding: Any = None) -> jax.Array:
    """``query [..., features] -> [..., num_embeddings]`` with the adapted table (tied heads)."""
    if out_sharding is not None:
      raise NotImplementedError("DoRAEmbed.attend does not support out_sharding")
    a, b, m = self.adapter_views()
    return _attend_jit(query, self._kernel2d(), a, b, m, scale=self.scale, norm=self._norm(),
                       dtype=jnp.result_type(query, self.dtype), detach_norm=self.detach_norm)

  def _rebuild(self, kernel_value: jax.Array) -> nnx.Module:
    state = {"embedding": self.embedding.replace(kernel_value)}
    return nnx.merge(self.base_graphdef, nnx.State(state))

  def describe(self) -> str:
    return (f"Embed({self.d_in} x {self.d_out}) rank={self.rank} alpha={self.alpha:g} "
            f"scale={self.scale:g}" + (" rslora" if self.rslora else ""))

  # -- PEFT tensors (for an I/O hook) -----------------------------------------

  def peft_tensors(self) -> dict[str, jax.Array]:
    """This layer's adapter as PEFT names it: ``{suffix: array}`` in torch layout."""
    a, b, m = self.adapter_views()
    return {".lora_embedding_A": a.T, ".lora_embedding_B": b.T, ".lora_magnitude_vector": m}

  def load_peft_tensors(self, tensors: dict[str, Any]) -> None:
    """Set ``lora_a``/``lora_b``/``magnitude`` from :meth:`peft_tensors`-style arrays."""
    want = {".lora_embedding_A": (self.rank, self.d_in),
            ".lora_embedding_B": (self.d_out, self.rank), ".lora_magnitude_vector": (self.d_out,)}
    for suffix, shape in want.items():
      if suffix not in tensors or tuple(jnp.shape(tensors[suffix])) != shape:
        got = None if suffix not in tensors else tuple(jnp.shape(tensors[suffix]))
        raise ValueError(f"{suffix} must have shape {shape}, got {got}")
    self.lora_a[...] = jnp.asarray(tensors[".lora_embedding_A"]).T.astype(self.lora_a.dtype)
    self.lora_b[...] = jnp.asarray(tensors[".lora_embedding_B"]).T.astype(self.lora_b.dtype)
    self.magnitude[...] = jnp.asarray(tensors[".lora_magnitude_vector"]).astype(
        self.magnitude.dtype)


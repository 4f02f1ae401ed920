"""DoRA for embedding tables: the functional core (the Flax NNX wrapper of ``nnx.Embed`` is
:class:`dora_jax.nnx.DoRAEmbed`, in :mod:`dora_jax.nnx.embed`).

Semantics are Hugging Face PEFT's ``DoraEmbeddingLayer`` in Flax layout. The
table ``E [num_embeddings, features]`` plays the role of a Dense kernel with
``d_in = num_embeddings`` (a lookup is ``onehot(ids)·E``) and
``d_out = features``:

========== ============================ ==========================================
name       shape                        PEFT tensor (init)
========== ============================ ==========================================
lora_a     ``[num_embeddings, r]``      ``lora_embedding_A [r, num_embeddings]``ᵀ (zeros)
lora_b     ``[r, features]``            ``lora_embedding_B [features, r]``ᵀ (``N(0, 1)``)
magnitude  ``[features]``               ``lora_magnitude_vector`` (``‖E[:, j]‖₂``)
========== ============================ ==========================================

The norm is taken per feature over the vocabulary (PEFT's embedding layer
normalises the transposed weight ``[features, num_embeddings]`` over its rows),
computed by :func:`dora_jax.factored_norm` on ``E`` itself: the intermediates
are ``[r, features]`` and ``[r, r]``, never a second ``[num_embeddings,
features]`` table. For integer ids ``x [...]``::

  n = ‖E + s·a·b‖ per feature column           [features], float32, detached (PEFT)
  g = m / n                                      [features]
  y = g ⊙ (E[x] + s·a[x]·b)                      [..., features]

With ``detach_norm=False`` the norm is differentiated too (the exact DoRA
gradient): plain autodiff through :func:`dora_jax.factored_norm`'s factored
terms, which adds one product of ``E`` with an ``[r, features]`` cotangent
(for ``lora_a``) and no ``[num_embeddings, features]`` temporary.

``attend`` (the tied output projection, ``q·Eᵀ`` in ``nnx.Embed``) uses the same
adapted table ``E' = g ⊙ (E + s·a·b)`` without forming it::

  attend(q) = (q ⊙ g)·Eᵀ + s·((q ⊙ g)·bᵀ)·aᵀ    [..., num_embeddings]

so a model that ties its output head to the embedding sees the adapter in both
places, exactly as after :func:`dora_jax.merge` (PEFT's tied ``lm_head`` keeps
the base weight until merged; dora_jax is consistent before and after merging).
PEFT applies no dropout to embedding adapters: ``dropout`` is recorded (so an
adapter config stays uniform) but has no effect.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax._checks import (accumulation_dtype, check_bool, check_scale, check_vector,
                              check_weights)
from dora_jax.norm import NORM_EPS, factored_norm


def _check_table(table, lora_a, lora_b, magnitude, scale):
  dims = check_weights(table, lora_a, lora_b)
  check_vector("magnitude", magnitude, dims.d_out)
  check_scale(scale)
  return dims


def embed_scale(table: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                magnitude: jax.Array, scale, *, norm: jax.Array | None = None,
                detach_norm: bool = True) -> jax.Array:
  """``g = m / ‖E + s·a·b‖`` per feature, ``[features]`` float32 (float64 for float64 inputs).

  ``detach_norm=True`` (PEFT): differentiable with respect to ``magnitude`` only,
  the norm is a constant. ``False``: the norm is differentiated too (with respect
  to ``table``, ``lora_a``, ``lora_b``; a given ``norm`` passes its cotangent to
  what computed it). ``norm`` may pass a precomputed (cached) ``[features]`` norm.
  """
  dims = _check_table(table, lora_a, lora_b, magnitude, scale)
  check_bool("detach_norm", detach_norm)
  acc = accumulation_dtype(table, lora_a, lora_b, magnitude)
  if norm is None:
    norm = factored_norm(table, lora_a, lora_b, scale)
  else:
    check_vector("norm", norm, dims.d_out)
  norm = norm.astype(acc)
  if detach_norm:
    norm = lax.stop_gradient(norm)
  return magnitude.astype(acc) / jnp.maximum(norm, NORM_EPS)


def _lookup_ids(ids: jax.Array, num_embeddings: int) -> jax.Array:
  if not jnp.issubdtype(jnp.result_type(ids), jnp.integer):
    raise ValueError(f"ids must be an integer array, got dtype {jnp.result_type(ids)}")
  # nnx.Embed broadcasts a one-row table whatever the ids are.
  return jnp.zeros_like(ids) if num_embeddings == 1 else ids


def dora_embed(ids: jax.Array, table: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
               magnitude: jax.Array, scale, *, norm: jax.Array | None = None,
               dtype=None, detach_norm: bool = True) -> jax.Array:
  """DoRA embedding lookup ``g ⊙ (E[ids] + s·a[ids]·b)``.

  Args:
    ids: integer array ``[...]`` (negative ids count from the end, out-of-range
      ids give NaN rows, as ``nnx.Embed``'s ``jnp.take``).
    table: frozen embedding ``E [num_embeddings, features]``.
    lora_a: ``[num_embeddings, r]`` (PEFT's ``lora_embedding_A`` transposed).
    lora_b: ``[r, features]`` (PEFT's ``lora_embedding_B`` transposed).
    magnitude: ``[features]``.
    scale: LoRA scale ``s``.
    norm: optional precomputed ``‖E + s·a·b‖ [features]`` (a constant when ``detach_norm``).
    dtype: output dtype (default: the table's dtype, as ``nnx.Embed``).
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact gradient through the norm (see the module doc).

  Returns:
    ``[..., features]``. Gradients flow to ``lora_a`` (rows selected by ``ids``;
    every row, through the norm, when ``detach_norm=False``), ``lora_b`` and
    ``magnitude`` (and the table if asked).
  """
  num_embeddings = table.shape[0] if jnp.ndim(table) == 2 else -1
  g = embed_scale(table, lora_a, lora_b, magnitude, scale, norm=norm, detach_norm=detach_norm)
  ids = _lookup_ids(ids, num_embeddings)
  acc = g.dtype
  out_dtype = jnp.dtype(dtype) if dtype is not None else table.dtype
  base = jnp.take(table.astype(out_dtype), ids, axis=0).astype(acc)
  h = jnp.take(lora_a, ids, axis=0)
  low = jnp.dot(h.astype(acc), lora_b.astype(acc), precision=lax.Precision.HIGHEST,
                preferred_element_type=acc)
  return (g * (base + jnp.asarray(scale, acc) * low)).astype(out_dtype)


def dora_attend(query: jax.Array, table: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                magnitude: jax.Array, scale, *, norm: jax.Array | None = None,
                dtype=None, precision=None, detach_norm: bool = True) -> jax.Array:
  """Tied output projection with the adapted table: ``q·E'ᵀ``, ``E' = g ⊙ (E + s·a·b)``.

  Computed as ``(q⊙g)·Eᵀ + s·((q⊙g)·bᵀ)·aᵀ``: no ``[num_embeddings, features]``
  temporary. ``query [..., features] -> [..., num_embeddings]``; the large
  product runs in ``dtype`` (default: ``query`` promoted with the table, as
  ``nnx.Embed.attend``) with float32 accumulation. ``detach_norm`` as :func:`dora_embed`.
  """
  dims = _check_table(table, lora_a, lora_b, magnitude, scale)
  if jnp.ndim(query) < 1 or jnp.shape(query)[-1] != dims.d_out:
    raise ValueError(f"query must be [..., features] = [..., {dims.d_out}], got {jnp.shape(query)}")
  g = embed_scale(table, lora_a, lora_b, magnitude, scale, norm=norm, detach_norm=detach_norm)
  acc = g.dtype
  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(query, table)
  qg = query.astype(acc) * g
  base = jnp.dot(qg.astype(cdt), table.astype(cdt).T, precision=precision,
                 preferred_element_type=acc)
  hq = jnp.dot(qg, lora_b.astype(acc).T, precision=lax.Precision.HIGHEST,
               preferred_element_type=acc)
  low = jnp.dot(hq, lora_a.astype(acc).T, precision=lax.Precision.HIGHEST,
                preferred_element_type=acc)
  return (base + jnp.asarray(scale, acc) * low).astype(cdt)


# Compiled once per shape: an eager call then rounds the norm's reductions as a
# jitted one does (so at init ``m`` equals the norm bit for bit, g = 1 exactly).
_embed_jit = jax.jit(dora_embed, static_argnames=("scale", "dtype", "detach_norm"))
_attend_jit = jax.jit(dora_attend, static_argnames=("scale", "dtype", "precision", "detach_norm"))




def __getattr__(name: str):
  # ``from dora_jax.embed import DoRAEmbed`` keeps working (the layer lives in dora_jax.nnx).
  if name == "DoRAEmbed":
    from dora_jax.nnx.embed import DoRAEmbed
    return DoRAEmbed
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""A compact Llama/Qwen2/Mistral-style decoder in Flax NNX, laid out like Hugging Face's.

Module paths mirror ``LlamaForCausalLM``'s module names with ``'/'`` for
``'.'``, so Hugging Face checkpoints load by name (:mod:`dora_jax.models.hf_loader`)
and DoRA adapters save under PEFT's names with the default map of
:mod:`dora_jax.io.naming` (``model/layers/0/self_attn/q_proj`` ->
``base_model.model.model.layers.0.self_attn.q_proj``)::

  model/embed_tokens                       nnx.Embed  embedding [vocab, hidden]
  model/layers/{i}/input_layernorm         RMSNorm    weight [hidden]
  model/layers/{i}/self_attn/q_proj        nnx.Linear kernel [hidden, heads * head_dim]
  model/layers/{i}/self_attn/k_proj        nnx.Linear kernel [hidden, kv_heads * head_dim]
  model/layers/{i}/self_attn/v_proj        nnx.Linear kernel [hidden, kv_heads * head_dim]
  model/layers/{i}/self_attn/o_proj        nnx.Linear kernel [heads * head_dim, hidden]
  model/layers/{i}/post_attention_layernorm RMSNorm   weight [hidden]
  model/layers/{i}/mlp/gate_proj           nnx.Linear kernel [hidden, intermediate]
  model/layers/{i}/mlp/up_proj             nnx.Linear kernel [hidden, intermediate]
  model/layers/{i}/mlp/down_proj           nnx.Linear kernel [intermediate, hidden]
  model/norm                               RMSNorm    weight [hidden]
  lm_head                                  nnx.Linear kernel [hidden, vocab] (absent when tied)

Numerics follow ``transformers``' eager implementation: RMSNorm in float32 and
cast back, RoPE with the ``rotate_half`` convention (cos/sin computed in
float32, cast to the activation dtype), attention logits and softmax in
float32, SwiGLU MLP. Float32 logits agree with ``transformers`` to ~1e-6.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

#: ``targets`` for :func:`dora_jax.apply_dora` selecting the seven projections of every layer.
ALL_PROJECTIONS = r"model/layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"
#: ``targets`` selecting the attention projections only.
ATTENTION_PROJECTIONS = r"model/layers/\d+/self_attn/(q|k|v|o)_proj"

ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture hyper-parameters (the fields of Hugging Face's ``LlamaConfig`` that matter).

  Hashable (it is static metadata of the modules). RoPE scaling is flattened:
  ``rope_type`` ``"default"``, ``"linear"`` (``rope_factor``) or ``"llama3"``
  (``rope_factor``, ``rope_low_freq_factor``, ``rope_high_freq_factor``,
  ``rope_original_max_position_embeddings``).

  Attributes:
    o_proj_bias: bias on ``o_proj``; ``None`` follows ``attention_bias`` (Llama);
      Qwen2 has biases on q/k/v but not on o.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_hidden_layers: int
  num_attention_heads: int
  num_key_value_heads: int | None = None
  head_dim: int | None = None
  rms_norm_eps: float = 1e-6
  rope_theta: float = 10000.0
  rope_type: str = "default"
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position_embeddings: int | None = None
  attention_bias: bool = False
  o_proj_bias: bool | None = None
  mlp_bias: bool = False
  tie_word_embeddings: bool = False
  hidden_act: str = "silu"
  max_position_embeddings: int = 2048
  initializer_range: float = 0.02
  model_type: str = "llama"

  def __post_init__(self):
    if self.num_key_value_heads is None:
      object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
    if self.head_dim is None:
      if self.hidden_size % self.num_attention_heads:
        raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                         f"num_attention_heads {self.num_attention_heads}; give head_dim")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
    if self.num_attention_heads % self.num_key_value_heads:
      raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                       f"num_key_value_heads {self.num_key_value_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.hidden_act not in ("silu", "swish"):
      raise NotImplementedError(f"hidden_act {self.hidden_act!r}: only SwiGLU ('silu') is "
                                "implemented")
    if self.rope_type not in ROPE_TYPES:
      raise NotImplementedError(
          f"rope_type {self.rope_type!r} is not implemented (supported: {', '.join(ROPE_TYPES)})")

  @property
  def o_bias(self) -> bool:
    """Whether ``o_proj`` has a bias."""
    return self.attention_bias if self.o_proj_bias is None else self.o_proj_bias

  def replace(self, **changes: Any) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)


# -- RoPE -------------------------------------------------------------------


def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
  """Inverse frequencies ``[head_dim // 2]`` float32, as ``transformers`` computes them."""
  dim = config.head_dim
  inv_freq = (1.0 / (np.float32(config.rope_theta)
                     ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))).astype(np.float32)
  if config.rope_type == "linear":
    inv_freq = inv_freq / np.float32(config.rope_factor)
  elif config.rope_type == "llama3":
    factor = config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    old_len = config.rope_original_max_position_embeddings or config.max_position_embeddings
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq)
    smooth = (np.float32(old_len) / wavelen - np.float32(low)) / np.float32(high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    inv_freq = np.where(medium, smoothed, scaled)
  return inv_freq.astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray, dtype) -> tuple[jax.Array, jax.Array]:
  """``cos, sin [B, T, head_dim]`` in ``dtype`` for integer ``positions [B, T]``."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)[None, None, :]
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rotate_half(x: jax.Array) -> jax.Array:
  """``[x1, x2] -> [-x2, x1]`` over the last axis (Hugging Face's convention)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """RoPE on ``x [B, T, heads, head_dim]`` with ``cos, sin [B, T, head_dim]``."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin


# -- layers -----------------------------------------------------------------


class RMSNorm(nnx.Module):
  """``weight ⊙ x / sqrt(mean(x²) + eps)``, normalised in float32 (``weight [dim]``)."""

  def __init__(self, dim: int, *, eps: float = 1e-6, dtype=jnp.float32):
    self.weight = nnx.Param(jnp.ones((dim,), dtype))
    self.eps = float(eps)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [..., dim] -> [..., dim]``."""
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.weight[...] * h.astype(x.dtype)


def _linear(d_in: int, d_out: int, bias: bool, config: LlamaConfig, dtype, rngs: nnx.Rngs
            ) -> nnx.Linear:
  return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype,
                    kernel_init=nnx.initializers.normal(config.initializer_range),
                    rngs=rngs)


class LlamaAttention(nnx.Module):
  """Grouped-query causal self-attention with RoPE.

  ``attn_implementation`` is passed to :func:`jax.nn.dot_product_attention`
  (``None``/``"xla"``, or ``"cudnn"`` for cuDNN flash attention on GPUs).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32,
               attn_implementation: str | None = None, rngs: nnx.Rngs):
    h, d = config.hidden_size, config.head_dim
    nq, nkv = config.num_attention_heads, config.num_key_value_heads
    self.q_proj = _linear(h, nq * d, config.attention_bias, config, dtype, rngs)
    self.k_proj = _linear(h, nkv * d, config.attention_bias, config, dtype, rngs)
    self.v_proj = _linear(h, nkv * d, config.attention_bias, config, dtype, rngs)
    self.o_proj = _linear(nq * d, h, config.o_bias, config, dtype, rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = nq, nkv, d
    self.attn_implementation = attn_implementation

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """``x [B, T, hidden] -> [B, T, hidden]``.

    Args:
      cos, sin: ``[B, T, head_dim]`` from :func:`rope_cos_sin`.
      mask: optional boolean ``[B, 1, T, T]`` (True: attend), combined with
        the causal mask.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                       scale=self.head_dim ** -0.5,
                                       implementation=self.attn_implementation)
    return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim))


class LlamaMLP(nnx.Module):
  """SwiGLU: ``down_proj(silu(gate_proj(x)) ⊙ up_proj(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    h, i = config.hidden_size, config.intermediate_size
    self.gate_proj = _linear(h, i, config.mlp_bias, config, dtype, rngs)
    self.up_proj = _linear(h, i, config.mlp_bias, config, dtype, rngs)
    self.down_proj = _linear(i, h, config.mlp_bias, config, dtype, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [..., hidden] -> [..., hidden]``."""
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32,
               attn_implementation: str | None = None, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(config, dtype=dtype, attn_implementation=attn_implementation,
                                    rngs=rngs)
    self.mlp = LlamaMLP(config, dtype=dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)
    self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                            dtype=dtype)

  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array,
               mask: jax.Array | None = None) -> jax.Array:
    """``x [B, T, hidden] -> [B, T, hidden]``."""
    x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
    return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nnx.Module):
  """The decoder stack: embeddings, layers, final norm (Hugging Face's ``LlamaModel``)."""

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32,
               attn_implementation: str | None = None, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=dtype,
        embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs)
    self.layers = nnx.List([
        LlamaDecoderLayer(config, dtype=dtype, attn_implementation=attn_implementation,
                          rngs=rngs)
        for _ in range(config.num_hidden_layers)])
    self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Hidden states ``[B, T, hidden]`` for ``input_ids [B, T]``.

    Args:
      attention_mask: optional ``[B, T]`` (1/True: a real token, 0: padding);
        padded keys are not attended to.
      positions: optional ``[B, T]`` RoPE positions (default ``0..T-1``).
    """
    b, t = input_ids.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    x = self.embed_tokens(input_ids)
    cos, sin = rope_cos_sin(positions, rope_inv_freq(self.config), x.dtype)
    mask = None
    if attention_mask is not None:
      mask = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
      mask = jnp.broadcast_to(mask, (b, 1, t, t))
    for layer in self.layers:
      x = layer(x, cos, sin, mask)
    return self.norm(x)


class LlamaForCausalLM(nnx.Module):
  """Decoder plus language-model head (Hugging Face's ``LlamaForCausalLM``).

  Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from dora_jax.models import LlamaConfig, LlamaForCausalLM
    >>> cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
    ...                   num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2)
    >>> LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 5), jnp.int32)).shape
    (2, 5, 32)

  Args:
    config: the architecture.
    dtype: parameter and activation dtype (e.g. ``jnp.bfloat16``); norms,
      attention softmax and RoPE tables are computed in float32 regardless.
    attn_implementation: see :class:`LlamaAttention`.
    rngs: random init (normal with ``config.initializer_range``, as
      ``transformers``; norms start at one).
  """

  def __init__(self, config: LlamaConfig, *, dtype=jnp.float32,
               attn_implementation: str | None = None, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, dtype=dtype, attn_implementation=attn_implementation,
                            rngs=rngs)
    self.lm_head = (nnx.data(None) if config.tie_word_embeddings else
                    _linear(config.hidden_size, config.vocab_size, False, config, dtype, rngs))

  def __call__(self, input_ids: jax.Array, *, attention_mask: jax.Array | None = None,
               positions: jax.Array | None = None) -> jax.Array:
    """Logits ``[B, T, vocab]`` (in the model dtype) for ``input_ids [B, T]``."""
    h = self.model(input_ids, attention_mask=attention_mask, positions=positions)
    if self.lm_head is None:
      return self.model.embed_tokens.attend(h)
    return self.lm_head(h)


def random_llama(config: LlamaConfig, *, dtype=jnp.float32, seed: int = 0,
                 attn_implementation: str | None = None) -> LlamaForCausalLM:
  """A randomly initialised :class:`LlamaForCausalLM`, generated on the host.

  Weights ``normal(0, config.initializer_range)``, norms one, biases zero (as
  ``transformers`` initialises). The model is built abstractly and filled from
  NumPy's generator: no compilation and no op-by-op dispatch, which dominate
  the cost of ``LlamaForCausalLM(config, rngs=...)`` for small models on a CPU.
  """
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(
      config, dtype=dtype, attn_implementation=attn_implementation, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  std = np.float32(config.initializer_range)
  filled = []
  for path, var in nnx.to_flat_state(state):
    if path[-1] == "weight":  # RMSNorm
      value = np.ones(var.shape, np.float32)
    elif path[-1] == "bias":
      value = np.zeros(var.shape, np.float32)
    else:
      value = rng.standard_normal(var.shape, np.float32) * std
    filled.append((path, var.replace(jnp.asarray(value, dtype))))
  return nnx.merge(graphdef, nnx.from_flat_state(filled))


def causal_lm_loss(logits: jax.Array, input_ids: jax.Array,
                   mask: jax.Array | None = None) -> jax.Array:
  """Mean next-token cross-entropy, float32 (``transformers``' loss with ``labels=input_ids``).

  Position ``t`` predicts ``input_ids[:, t + 1]``.

  Args:
    logits: ``[B, T, vocab]``.
    input_ids: ``[B, T]``.
    mask: optional ``[B, T]``; targets where it is 0 are ignored (as label ``-100``).

  Returns:
    A scalar: the mean over the ``B * (T - 1)`` (unmasked) targets.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = input_ids[:, 1:]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  if mask is None:
    return jnp.mean(nll)
  weights = jnp.asarray(mask)[:, 1:].astype(jnp.float32)
  return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

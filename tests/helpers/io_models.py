"""A small Llama-named Flax NNX model for the I/O tests, and helpers around it.

``ToyLM`` mirrors ``ToyLM`` in ``peft_side.py`` (PyTorch): the same module
names under the default map (``layers/0/self_attn/q_proj`` ->
``model.layers.0.self_attn.q_proj``) and the same function, with the
projections deliberately of different Flax types so every 2-D view is
exercised: ``q_proj``/``o_proj`` are ``LinearGeneral`` (head axes), ``k_proj``
an ``Einsum``, the rest ``Linear``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dora_jax
from dora_jax.io import naming

SPEC = {"hidden": 16, "heads": 2, "head_dim": 4, "inter": 24, "vocab": 10, "layers": 2}


class Attention(nnx.Module):
  def __init__(self, spec, rngs):
    h, n, d = spec["hidden"], spec["heads"], spec["head_dim"]
    self.q_proj = nnx.LinearGeneral(h, (n, d), use_bias=False, rngs=rngs)
    self.k_proj = nnx.Einsum("btd,dhk->bthk", (h, n, d), rngs=rngs)
    self.v_proj = nnx.Linear(h, n * d, use_bias=False, rngs=rngs)
    self.o_proj = nnx.LinearGeneral((n, d), h, axis=(-2, -1), use_bias=True,
                                    bias_init=nnx.initializers.normal(0.5), rngs=rngs)
    self.heads, self.head_dim = n, d

  def __call__(self, x):
    v = self.v_proj(x).reshape(*x.shape[:-1], self.heads, self.head_dim)
    return self.o_proj(self.q_proj(x) * jnp.tanh(self.k_proj(x)) + v)


class MLP(nnx.Module):
  def __init__(self, spec, rngs, bias=True):
    h, i = spec["hidden"], spec["inter"]
    self.gate_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(i, h, use_bias=bias, bias_init=nnx.initializers.normal(0.5),
                                rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Layer(nnx.Module):
  def __init__(self, spec, rngs):
    self.self_attn = Attention(spec, rngs)
    self.mlp = MLP(spec, rngs)

  def __call__(self, x):
    x = x + self.self_attn(x)
    return x + self.mlp(x)


class ToyLM(nnx.Module):
  def __init__(self, spec=SPEC, *, seed=0):
    rngs = nnx.Rngs(seed)
    self.layers = nnx.List([Layer(spec, rngs) for _ in range(spec["layers"])])
    self.lm_head = nnx.Linear(spec["hidden"], spec["vocab"], use_bias=False, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(x)


def randomize(model, key, *, b_scale=0.3, m_jitter=0.2):
  """Random non-zero ``lora_b``, a fresh ``lora_a`` and a magnitude away from the norm."""
  for path, layer in dora_jax.surgery.dora_layers(model):
    key, ka, kb, km = jax.random.split(key, 4)
    layer.lora_a[...] = (jax.random.uniform(ka, layer.lora_a.shape, minval=-1, maxval=1)
                         / np.sqrt(layer.d_in)).astype(layer.lora_a.dtype)
    layer.lora_b[...] = (b_scale * jax.random.normal(kb, layer.lora_b.shape)).astype(
        layer.lora_b.dtype)
    m = layer.magnitude[...] * (1.0 + m_jitter * jax.random.normal(km, layer.magnitude.shape))
    layer.magnitude[...] = m.astype(layer.magnitude.dtype)


def torch_base_weights(model) -> dict[str, np.ndarray]:
  """The base weights as a PyTorch state dict would hold them (``weight [d_out, d_in]``).

  Works on adapted or plain models (the base kernels of DoRA layers are the
  originals). LinearGeneral/Einsum kernels use their 2-D view ``[d_in, d_out]``.
  """
  out = {}
  plain = dora_jax.unmerge(model) if dora_jax.surgery.dora_layers(model) else model
  for path, module in (("/".join(map(str, p)), m) for p, m in nnx.iter_modules(plain)):
    if type(module) not in (nnx.Linear, nnx.LinearGeneral, nnx.Einsum):
      continue
    kernel = np.asarray(module.kernel[...])
    name = naming.default_module_name(path)
    # The wrapper knows the layer's [d_in, d_out] view (the toy model's biases are
    # already in the kernel's output-axis order).
    layer = dora_jax.nnx.wrap(module, rank=1, alpha=1.0, rngs=nnx.Rngs(0))
    out[name + ".weight"] = np.ascontiguousarray(kernel.reshape(layer.d_in, layer.d_out).T)
    if module.bias is not None:
      out[name + ".bias"] = np.asarray(module.bias[...]).reshape(layer.d_out)
  return out


def inputs(key, spec=SPEC, lead=(2, 5)):
  return jax.random.normal(key, (*lead, spec["hidden"]), jnp.float32)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# -- a tiny Llama, to check against transformers' LlamaForCausalLM -------------

LLAMA_SPEC = {"vocab": 50, "hidden": 32, "inter": 64, "layers": 2, "heads": 4, "kv_heads": 2,
              "rms_eps": 1e-6, "rope_theta": 10000.0}


def _rotate_half(x):
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


class LlamaAttention(nnx.Module):
  def __init__(self, spec, rngs):
    h, n, kv = spec["hidden"], spec["heads"], spec["kv_heads"]
    d = h // n
    self.q_proj = nnx.Linear(h, n * d, use_bias=False, rngs=rngs)
    self.k_proj = nnx.Linear(h, kv * d, use_bias=False, rngs=rngs)
    self.v_proj = nnx.Linear(h, kv * d, use_bias=False, rngs=rngs)
    self.o_proj = nnx.Linear(n * d, h, use_bias=False, rngs=rngs)
    self.n, self.kv, self.d, self.theta = n, kv, d, spec["rope_theta"]

  def __call__(self, x):
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.n, self.d)
    k = self.k_proj(x).reshape(b, t, self.kv, self.d)
    v = self.v_proj(x).reshape(b, t, self.kv, self.d)
    inv_freq = 1.0 / (self.theta ** (jnp.arange(0, self.d, 2, dtype=jnp.float32) / self.d))
    angles = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([angles, angles], axis=-1)
    cos, sin = jnp.cos(emb)[:, None, :], jnp.sin(emb)[:, None, :]
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    k = jnp.repeat(k, self.n // self.kv, axis=2)
    v = jnp.repeat(v, self.n // self.kv, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.d)
    mask = jnp.tril(jnp.ones((t, t), bool))
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.n * self.d)
    return self.o_proj(out)


class LlamaLayer(nnx.Module):
  def __init__(self, spec, rngs):
    h = spec["hidden"]
    self.input_layernorm = nnx.RMSNorm(h, epsilon=spec["rms_eps"],
                                       scale_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.self_attn = LlamaAttention(spec, rngs)
    self.post_attention_layernorm = nnx.RMSNorm(h, epsilon=spec["rms_eps"],
                                                scale_init=nnx.initializers.normal(1.0), rngs=rngs)
    self.mlp = MLP({"hidden": h, "inter": spec["inter"]}, rngs, bias=False)

  def __call__(self, x):
    x = x + self.self_attn(self.input_layernorm(x))
    return x + self.mlp(self.post_attention_layernorm(x))


class TinyLlama(nnx.Module):
  """Llama with Hugging Face's module names at the Flax root (``embed_tokens``, ``layers``, ``norm``, ``lm_head``)."""

  def __init__(self, spec=LLAMA_SPEC, *, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed_tokens = nnx.Embed(spec["vocab"], spec["hidden"], rngs=rngs)
    self.layers = nnx.List([LlamaLayer(spec, rngs) for _ in range(spec["layers"])])
    self.norm = nnx.RMSNorm(spec["hidden"], epsilon=spec["rms_eps"], rngs=rngs)
    self.lm_head = nnx.Linear(spec["hidden"], spec["vocab"], use_bias=False, rngs=rngs)

  def __call__(self, ids):
    x = self.embed_tokens(ids)
    for layer in self.layers:
      x = layer(x)
    return self.lm_head(self.norm(x))


def torch_llama_weights(model) -> dict[str, np.ndarray]:
  """``LlamaForCausalLM``'s state dict from a (plain or adapted) :class:`TinyLlama`."""
  out = torch_base_weights(model)
  out["model.embed_tokens.weight"] = np.asarray(model.embed_tokens.embedding[...])
  out["model.norm.weight"] = np.asarray(model.norm.scale[...])
  for i, layer in enumerate(model.layers):
    for name in ("input_layernorm", "post_attention_layernorm"):
      out[f"model.layers.{i}.{name}.weight"] = np.asarray(getattr(layer, name).scale[...])
  return out


class EmbedConvNet(nnx.Module):
  """ids ``[B, H, W]`` -> Embed ``[B, H, W, 8]`` -> 3x3 Conv ``[B, H, W, 6]`` -> Linear ``[B, H, W, 5]``.

  Mirrors ``EmbedConvNet`` in ``peft_io_embed_conv_side.py`` (PyTorch, NCHW).
  """

  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.embed = nnx.Embed(12, 8, rngs=rngs)
    self.conv = nnx.Conv(8, 6, (3, 3), padding="SAME", use_bias=True,
                         bias_init=nnx.initializers.normal(0.5), rngs=rngs)
    self.head = nnx.Linear(6, 5, rngs=rngs)

  def __call__(self, ids):
    return self.head(jnp.tanh(self.conv(self.embed(ids))))

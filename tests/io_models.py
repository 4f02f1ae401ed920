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
  def __init__(self, spec, rngs):
    h, i = spec["hidden"], spec["inter"]
    self.gate_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(h, i, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(i, h, bias_init=nnx.initializers.normal(0.5), rngs=rngs)

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
  for path in dora_jax.surgery.adaptable_paths(plain):
    module = dict((("/".join(map(str, p)), m) for p, m in nnx.iter_modules(plain)))[path]
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

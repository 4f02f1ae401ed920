"""A small jnp stand-in for ``dora_jax.general`` (the op-level core), used by the Linen
tests until that module exists; :func:`install` does nothing once it does.

Plain jnp, norm detached with ``stop_gradient``, no custom_vjp.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import string
import sys
import types

import jax
import jax.numpy as jnp
from jax import lax


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  shape: tuple
  contracted: tuple
  batch: tuple = ()
  output: tuple = ()

  in_shape = property(lambda s: tuple(s.shape[i] for i in s.contracted))
  out_shape = property(lambda s: tuple(s.shape[i] for i in s.output))
  batch_shape = property(lambda s: tuple(s.shape[i] for i in s.batch))
  d_in = property(lambda s: math.prod(s.in_shape))
  d_out = property(lambda s: math.prod(s.out_shape))
  is_matrix = property(lambda s: not s.batch and s.contracted + s.output == tuple(range(len(s.shape))))

  def adapter_shapes(self, rank):
    return ((*self.batch_shape, *self.in_shape, rank), (*self.batch_shape, rank, *self.out_shape),
            (*self.batch_shape, *self.out_shape))

  def _k(self):
    return string.ascii_letters[:len(self.shape)]

  def to_matrix(self, kernel):
    k = self._k()
    perm = "".join(k[i] for i in self.batch + self.contracted + self.output)
    return jnp.einsum(f"{k}->{perm}", kernel).reshape(*self.batch_shape, self.d_in, self.d_out)

  def from_matrix(self, matrix):
    k = self._k()
    perm = "".join(k[i] for i in self.batch + self.contracted + self.output)
    full = matrix.reshape(*self.batch_shape, *self.in_shape, *self.out_shape)
    return jnp.einsum(f"{perm}->{k}", full)


def _expand(spec, x_ndim, k_ndim):
  lhs, out = spec.replace(" ", "").split("->")
  xs, ks = lhs.split(",")
  free = [c for c in string.ascii_letters if c not in spec]
  if "..." in xs:
    n = x_ndim - (len(xs) - 3)
    dots = "".join(free[:n])
    xs, out = xs.replace("...", dots), out.replace("...", dots)
  assert "..." not in ks
  return xs, ks, out


def einsum_layout(spec, x_shape, kernel_shape):
  xs, ks, out = _expand(spec, len(x_shape), len(kernel_shape))
  role = lambda c: "b" if c in xs and c in out else "c" if c in xs else "o"
  return WeightLayout(tuple(kernel_shape), tuple(i for i, c in enumerate(ks) if role(c) == "c"),
                      tuple(i for i, c in enumerate(ks) if role(c) == "b"),
                      tuple(i for i, c in enumerate(ks) if role(c) == "o"))


def dot_general_layout(dimension_numbers, x_shape, kernel_shape):
  (_, rc), (_, rb) = dimension_numbers
  n = len(kernel_shape)
  return WeightLayout(tuple(kernel_shape), tuple(rc), tuple(rb),
                      tuple(i for i in range(n) if i not in rc and i not in rb))


def _labels(layout):
  k = string.ascii_letters[:len(layout.shape)]
  c = "".join(k[i] for i in layout.contracted)
  b = "".join(k[i] for i in layout.batch)
  o = "".join(k[i] for i in layout.output)
  return k, b, c, o, "R"


def weight_sq_norm(kernel, layout):
  k, b, c, o, _ = _labels(layout)
  w = kernel.astype(jnp.float32)
  return jnp.einsum(f"{k},{k}->{b}{o}", w, w, precision=lax.Precision.HIGHEST)


def weight_norm(kernel, lora_a, lora_b, scale, layout, *, base_sq_norm=None):
  k, b, c, o, r = _labels(layout)
  hi = lax.Precision.HIGHEST
  w = kernel.astype(jnp.float32)
  a, bb = lora_a.astype(jnp.float32), lora_b.astype(jnp.float32)
  sq = weight_sq_norm(kernel, layout) if base_sq_norm is None else base_sq_norm
  u = jnp.einsum(f"{b}{c}{r},{k}->{b}{r}{o}", a, w, precision=hi)
  g = jnp.einsum(f"{b}{c}{r},{b}{c}Q->{b}{r}Q", a, a, precision=hi)
  gb = jnp.einsum(f"{b}{r}Q,{b}Q{o}->{b}{r}{o}", g, bb, precision=hi)
  n2 = sq + 2 * scale * jnp.sum(bb * u, axis=len(b)) + scale ** 2 * jnp.sum(bb * gb, axis=len(b))
  return jnp.sqrt(jnp.maximum(n2, 0.0))


def merge_weight(kernel, lora_a, lora_b, magnitude, scale, layout):
  k, b, c, o, r = _labels(layout)
  w = kernel.astype(jnp.float32) + scale * jnp.einsum(
      f"{b}{c}{r},{b}{r}{o}->{k}", lora_a.astype(jnp.float32), lora_b.astype(jnp.float32))
  n = jnp.sqrt(jnp.einsum(f"{k},{k}->{b}{o}", w, w))
  g = magnitude.astype(jnp.float32) / jnp.maximum(n, 1e-12)
  g = jnp.einsum(f"{b}{o}->{''.join(ch for ch in k if ch not in c)}", g)
  return (w * jnp.expand_dims(g, layout.contracted)).astype(kernel.dtype)


def _dora(x, kernel, lora_a, lora_b, magnitude, scale, ks, y, xs, out, layout, norm,
          base_sq_norm):
  bs, cs, os_ = ("".join(ks[i] for i in axes) for axes in (layout.batch, layout.contracted,
                                                           layout.output))
  if norm is None:
    norm = weight_norm(kernel, lax.stop_gradient(lora_a), lax.stop_gradient(lora_b), scale,
                       layout, base_sq_norm=base_sq_norm)
  g = magnitude.astype(jnp.float32) / jnp.maximum(lax.stop_gradient(norm), 1e-12)
  cdt = jnp.result_type(x, kernel)
  kept = "".join(ch for ch in xs if ch not in cs)
  h = jnp.einsum(f"{xs},{bs}{cs}R->{kept}R", x.astype(cdt), lora_a.astype(cdt))
  low = jnp.einsum(f"{kept}R,{bs}R{os_}->{out}", h, lora_b.astype(cdt))
  gb = jnp.einsum(f"{bs}{os_}->{''.join(ch for ch in out if ch in bs + os_)}", g)
  gb = gb.reshape([d if ch in bs + os_ else 1 for ch, d in zip(out, y.shape)])
  return (gb * (y.astype(jnp.float32) + scale * low.astype(jnp.float32))).astype(y.dtype)


def dora_einsum(spec, x, kernel, lora_a, lora_b, magnitude, scale, *, precision=None,
                preferred_element_type=None, norm=None, base_sq_norm=None, backend=None):
  xs, ks, out = _expand(spec, x.ndim, kernel.ndim)
  y = jnp.einsum(spec, x, kernel, precision=precision, preferred_element_type=preferred_element_type)
  layout = einsum_layout(spec, x.shape, kernel.shape)
  return _dora(x, kernel, lora_a, lora_b, magnitude, scale, ks, y, xs, out, layout, norm,
               base_sq_norm)


def dora_dot_general(x, kernel, lora_a, lora_b, magnitude, scale, dimension_numbers, *,
                     precision=None, preferred_element_type=None, norm=None, base_sq_norm=None,
                     backend=None):
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter(string.ascii_letters)
  xs = [next(letters) for _ in range(x.ndim)]
  ks = [None] * kernel.ndim
  for i, j in zip(lc, rc):
    ks[j] = xs[i]
  for i, j in zip(lb, rb):
    ks[j] = xs[i]
  ks = [ch or next(letters) for ch in ks]
  out = ([xs[i] for i in lb] + [xs[i] for i in range(x.ndim) if i not in lc and i not in lb]
         + [ks[j] for j in range(kernel.ndim) if j not in rc and j not in rb])
  y = lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                      preferred_element_type=preferred_element_type)
  layout = dot_general_layout(dimension_numbers, x.shape, kernel.shape)
  return _dora(x, kernel, lora_a, lora_b, magnitude, scale, "".join(ks), y, "".join(xs),
               "".join(out), layout, norm, base_sq_norm)


def install() -> None:
  """Register this module as ``dora_jax.general`` unless the real one exists."""
  if "dora_jax.general" in sys.modules or importlib.util.find_spec("dora_jax.general"):
    return
  module = types.ModuleType("dora_jax.general")
  for name in ("WeightLayout", "einsum_layout", "dot_general_layout", "weight_sq_norm",
               "weight_norm", "merge_weight", "dora_einsum", "dora_dot_general"):
    setattr(module, name, globals()[name])
  sys.modules["dora_jax.general"] = module
  import dora_jax
  dora_jax.general = module

"""TEMPORARY jnp stand-in for ``dora_jax.general`` (the op-level core), used by the
test suite only until the real module exists; delete with it.

Same API as the real module; plain autodiff, ``to_matrix`` copies everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import string

import jax
import jax.numpy as jnp
from jax import lax

NORM_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  shape: tuple[int, ...]
  contracted: tuple[int, ...]
  batch: tuple[int, ...]
  output: tuple[int, ...]

  @property
  def in_shape(self):
    return tuple(self.shape[i] for i in self.contracted)

  @property
  def out_shape(self):
    return tuple(self.shape[i] for i in self.output)

  @property
  def batch_shape(self):
    return tuple(self.shape[i] for i in self.batch)

  @property
  def d_in(self):
    return math.prod(self.in_shape)

  @property
  def d_out(self):
    return math.prod(self.out_shape)

  @property
  def is_matrix(self):
    n = len(self.contracted)
    return (not self.batch and self.contracted == tuple(range(n))
            and self.output == tuple(range(n, len(self.shape))))

  def adapter_shapes(self, rank):
    return ((*self.batch_shape, *self.in_shape, rank), (*self.batch_shape, rank, *self.out_shape),
            (*self.batch_shape, *self.out_shape))

  def to_matrix(self, kernel):
    k = jnp.transpose(kernel, (*self.batch, *self.contracted, *self.output))
    return k.reshape(*self.batch_shape, self.d_in, self.d_out)

  def from_matrix(self, matrix):
    perm = (*self.batch, *self.contracted, *self.output)
    k = matrix.reshape(*self.batch_shape, *self.in_shape, *self.out_shape)
    inv = [perm.index(i) for i in range(len(perm))]
    return jnp.transpose(k, inv)


def _parse(spec, x_ndim):
  spec = spec.replace(" ", "")
  ins, out = spec.split("->")
  lhs, rhs = ins.split(",")
  if "..." in lhs:
    used = set(spec) - set(".,->")
    n = x_ndim - (len(lhs) - 3)
    fresh = "".join([c for c in string.ascii_letters if c not in used][:n])
    lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
  return lhs, rhs, out


def einsum_layout(spec, x_shape, kernel_shape):
  lhs, rhs, out = _parse(spec, len(x_shape))
  contracted = tuple(i for i, c in enumerate(rhs) if c in lhs and c not in out)
  batch = tuple(i for i, c in enumerate(rhs) if c in lhs and c in out)
  output = tuple(i for i, c in enumerate(rhs) if c not in lhs and c in out)
  if len(contracted) + len(batch) + len(output) != len(rhs):
    raise ValueError(f"kernel indices summed away in {spec!r}")
  return WeightLayout(tuple(kernel_shape), contracted, batch, output)


def dot_general_layout(dimension_numbers, x_shape, kernel_shape):
  (_, rc), (_, rb) = dimension_numbers
  rc, rb = tuple(rc), tuple(rb)
  output = tuple(i for i in range(len(kernel_shape)) if i not in rc and i not in rb)
  return WeightLayout(tuple(kernel_shape), tuple(sorted(rc)), rb, output)


def weight_sq_norm(kernel, layout):
  k = kernel.astype(jnp.promote_types(kernel.dtype, jnp.float32))
  sq = jnp.sum(jnp.square(k), axis=layout.contracted)
  # sum over contracted leaves [*batch, *output] in kernel order of the rest
  rest = [i for i in range(len(layout.shape)) if i not in layout.contracted]
  perm = [rest.index(i) for i in (*layout.batch, *layout.output)]
  return jnp.transpose(sq, perm)


def weight_norm(kernel, lora_a, lora_b, scale, layout, *, base_sq_norm=None):
  acc = jnp.promote_types(kernel.dtype, jnp.float32)
  sq = weight_sq_norm(kernel, layout) if base_sq_norm is None else base_sq_norm
  w = layout.to_matrix(kernel).astype(acc)
  nb = len(layout.batch)
  a = lora_a.astype(acc).reshape(*layout.batch_shape, layout.d_in, -1)
  b = lora_b.astype(acc).reshape(*layout.batch_shape, -1, layout.d_out)
  u = jnp.einsum("...ir,...io->...ro", a, w, precision="highest")
  g = jnp.einsum("...ir,...is->...rs", a, a, precision="highest")
  cross = jnp.sum(b * u, axis=-2)
  quad = jnp.sum(b * jnp.einsum("...rs,...so->...ro", g, b, precision="highest"), axis=-2)
  n2 = sq.reshape(*layout.batch_shape, layout.d_out) + 2 * scale * cross + scale**2 * quad
  del nb
  return jnp.sqrt(jnp.maximum(n2, 0.0)).reshape(*layout.batch_shape, *layout.out_shape)


def _keep(lhs, contracted_letters):
  return "".join(c for c in lhs if c not in contracted_letters)


def _compose(spec, x, base, layout, lora_a, lora_b, magnitude, scale, norm, base_sq_norm,
             kernel):
  """g ⊙ (base + s·(x·a)·b) with ``base`` in the output order of ``spec``."""
  lhs, rhs, out = _parse(spec, x.ndim)
  acc = jnp.promote_types(base.dtype, jnp.float32)
  if norm is None:
    norm = weight_norm(kernel, lax.stop_gradient(lora_a), lax.stop_gradient(lora_b), scale,
                       layout, base_sq_norm=base_sq_norm)
  norm = lax.stop_gradient(norm).astype(acc)
  g = magnitude.astype(acc) / jnp.maximum(norm, NORM_EPS)
  bl = "".join(rhs[i] for i in layout.batch)
  il = "".join(rhs[i] for i in layout.contracted)
  ol = "".join(rhs[i] for i in layout.output)
  r = next(c for c in string.ascii_letters if c not in lhs + rhs + out)
  h = jnp.einsum(f"{lhs},{bl}{il}{r}->{_keep(lhs, il)}{r}", x.astype(acc), lora_a.astype(acc),
                 precision="highest")
  low = jnp.einsum(f"{_keep(lhs, il)}{r},{bl}{r}{ol}->{out}", h, lora_b.astype(acc),
                   precision="highest")
  pre = base.astype(acc) + scale * low
  y = jnp.einsum(f"{out},{bl}{ol}->{out}", pre, g)
  return y.astype(base.dtype)


def dora_einsum(spec, x, kernel, lora_a, lora_b, magnitude, scale, *, precision=None,
                preferred_element_type=None, norm=None, base_sq_norm=None, backend=None):
  del backend
  layout = einsum_layout(spec, x.shape, kernel.shape)
  base = jnp.einsum(spec, x, kernel, precision=precision,
                    preferred_element_type=preferred_element_type)
  return _compose(spec, x, base, layout, lora_a, lora_b, magnitude, scale, norm, base_sq_norm,
                  kernel)


def dot_general_spec(dimension_numbers, x_ndim, k_ndim):
  (lc, rc), (lb, rb) = dimension_numbers
  letters = iter(string.ascii_letters)
  xl = [next(letters) for _ in range(x_ndim)]
  kl = [None] * k_ndim
  for i, j in zip(lc, rc):
    kl[j] = xl[i]
  for i, j in zip(lb, rb):
    kl[j] = xl[i]
  for j in range(k_ndim):
    if kl[j] is None:
      kl[j] = next(letters)
  out = ([xl[i] for i in lb] + [c for i, c in enumerate(xl) if i not in lc and i not in lb]
         + [kl[j] for j in range(k_ndim) if j not in rc and j not in rb])
  return f"{''.join(xl)},{''.join(kl)}->{''.join(out)}"


def dora_dot_general(x, kernel, lora_a, lora_b, magnitude, scale, dimension_numbers, *,
                     precision=None, preferred_element_type=None, norm=None, base_sq_norm=None,
                     backend=None):
  del backend
  layout = dot_general_layout(dimension_numbers, x.shape, kernel.shape)
  spec = dot_general_spec(dimension_numbers, x.ndim, kernel.ndim)
  base = lax.dot_general(x, kernel, dimension_numbers, precision=precision,
                         preferred_element_type=preferred_element_type)
  return _compose(spec, x, base, layout, lora_a, lora_b, magnitude, scale, norm, base_sq_norm,
                  kernel)


def merge_weight(kernel, lora_a, lora_b, magnitude, scale, layout):
  acc = jnp.promote_types(kernel.dtype, jnp.float32)
  w = layout.to_matrix(kernel).astype(acc)
  a = lora_a.astype(acc).reshape(*layout.batch_shape, layout.d_in, -1)
  b = lora_b.astype(acc).reshape(*layout.batch_shape, -1, layout.d_out)
  full = w + scale * jnp.einsum("...ir,...ro->...io", a, b, precision="highest")
  n = jnp.linalg.norm(full, axis=-2, keepdims=True)
  m = magnitude.astype(acc).reshape(*layout.batch_shape, 1, layout.d_out)
  return layout.from_matrix(full * (m / jnp.maximum(n, NORM_EPS))).astype(kernel.dtype)

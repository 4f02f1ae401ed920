"""Float64 references for ``detach_norm=False``: DoRA with the norm differentiated.

The merged kernel ``g ⊙ (W + s·a·b)`` is formed densely (what the library never
does) in the kernel's own layout and autodiff runs through the norm: a model
whose adapted kernels are replaced by it computes the adapted model's output,
and ``jax.grad`` of that is the exact DoRA gradient.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import dora_jax
from dora_jax.nnx import DoRAEmbed, OpSite, registry
from helpers.layers import device, normal, rng


def dense_merged(kernel, layout, lora_a, lora_b, magnitude, scale):
  """``g ⊙ (W + s·a·b)`` in ``kernel``'s shape, the norm NOT detached.

  ``layout``: a batch-free :class:`dora_jax.general.WeightLayout` (contracted and
  output axes of ``kernel``); the adapters are in any shape with ``d_in·r``,
  ``r·d_out`` and ``d_out`` elements.
  """
  assert not layout.batch
  perm = tuple(layout.contracted) + tuple(layout.output)
  w2 = jnp.transpose(kernel, perm).reshape(layout.d_in, layout.d_out)
  rank = lora_a.size // layout.d_in
  dense = w2 + scale * lora_a.reshape(layout.d_in, rank) @ lora_b.reshape(rank, layout.d_out)
  norm = jnp.sqrt(jnp.sum(dense * dense, axis=0))
  merged = (magnitude.reshape(layout.d_out) / norm) * dense
  merged = merged.reshape([kernel.shape[i] for i in perm])
  return jnp.transpose(merged, tuple(np.argsort(perm)))


def site_weight_name(site) -> str:
  """The attribute that holds a site's base weight in the plain (unadapted) module."""
  if isinstance(site, OpSite):
    return site.spec.param
  return "embedding" if isinstance(site, DoRAEmbed) else "kernel"


def random_adapters(model: nnx.Module, key, *, b_scale: float = 0.5) -> dict[str, tuple]:
  """``{site path: (lora_a, lora_b, magnitude)}``: fresh normal ``a``/``b`` and the
  initial magnitude ``‖W_j‖`` times ``U(0.7, 1.3)`` (so that ``g`` is not 1), in each
  site's dtype."""
  g = rng(key)
  out = {}
  for path, site in dora_jax.surgery.dora_layers(model):
    a, b, m = site.lora_a[...], site.lora_b[...], site.magnitude[...]
    out[path] = (normal(g, a.shape, a.dtype, 1.0 / np.sqrt(site.d_in)),
                 normal(g, b.shape, b.dtype, b_scale),
                 device(np.asarray(m, np.float64) * g.uniform(0.7, 1.3, m.shape), m.dtype))
  return out


def adapter_loss(model: nnx.Module, call: Callable[[nnx.Module], Any]) -> Callable:
  """``loss(adapters)``: ``call(model)`` with the sites' adapters set to ``adapters``."""
  graphdef, state = nnx.split(model)

  def loss(adapters):
    m = nnx.merge(graphdef, state, copy=True)
    for path, site in dora_jax.surgery.dora_layers(m):
      site.lora_a[...], site.lora_b[...], site.magnitude[...] = adapters[path]
    return call(m)

  return loss


def reference_loss(plain: nnx.Module, model: nnx.Module, call: Callable[[nnx.Module], Any]
                   ) -> Callable:
  """``loss(adapters)``: ``call(plain)`` with each adapted kernel replaced by
  :func:`dense_merged` (``plain``: the model before ``apply_dora``, same paths)."""
  sites = [(path, site_weight_name(site), site.layout, site.scale)
           for path, site in dora_jax.surgery.dora_layers(model)]
  graphdef, state = nnx.split(plain)

  def loss(adapters):
    m = nnx.merge(graphdef, state, copy=True)
    modules = dict(registry.walk(m))
    for path, name, layout, scale in sites:
      var = getattr(modules[path], name)
      var[...] = dense_merged(var[...], layout, *adapters[path], scale)
    return call(m)

  return loss


def grads_program(loss: Callable, references: tuple[Callable, ...], eps: float = 1e-6
                  ) -> Callable:
  """``run(params, direction) -> (grad loss, [grad r for r in references], fd)``, one
  compiled program (one compilation instead of several, reused for more points of the
  same shapes): ``fd`` is the central difference of ``loss`` along ``direction``
  (``None``: no finite difference, ``fd`` is ``None``)."""
  def run(p, d):
    fd = None
    if d is not None:
      shifted = lambda t: loss(jax.tree.map(lambda a, b: a + t * b, p, d))
      fd = (shifted(eps) - shifted(-eps)) / (2 * eps)
    return jax.grad(loss)(p), [jax.grad(r)(p) for r in references], fd

  return jax.jit(run)


def grads_and_fd(loss: Callable, references: tuple[Callable, ...], params, direction=None):
  """:func:`grads_program` run once at ``params``."""
  return grads_program(loss, references)(params, direction)


def initial_adapters(model: nnx.Module) -> dict[str, tuple]:
  """``{site path: (lora_a, lora_b, magnitude)}`` as ``apply_dora`` left them (PEFT's
  init: ``lora_b = 0``, ``m = ‖W‖``, where ``∂n/∂b ≠ 0`` but ``√`` of zero sums lurk)."""
  return {path: (site.lora_a[...], site.lora_b[...], site.magnitude[...])
          for path, site in dora_jax.surgery.dora_layers(model)}


def check_fd(fd, grads, direction, tol: float = 1e-7) -> None:
  """``fd`` (see :func:`grads_and_fd`) agrees with ``⟨grads, direction⟩`` to ``tol``
  relative to ``max(1, |⟨grads, direction⟩|)``."""
  analytic = float(sum(jnp.sum(g * d) for g, d in zip(jax.tree.leaves(grads),
                                                       jax.tree.leaves(direction))))
  assert abs(float(fd) - analytic) <= tol * max(1.0, abs(analytic)), (float(fd), analytic)


def random_like(tree, key):
  """A normal tree shaped like ``tree`` (a finite-difference direction)."""
  g = rng(key)
  return jax.tree.map(lambda leaf: normal(g, leaf.shape, leaf.dtype), tree)

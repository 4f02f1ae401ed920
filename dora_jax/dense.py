"""``dora_dense``: the DoRA Dense layer as one differentiable function.

Semantics are Hugging Face PEFT's DoRA (``LoraConfig(use_dora=True)``) in Flax
layout. For ``x [..., d_in]``::

  n = ‖W + s·a·b‖ per output column        [d_out], float32, a constant (detached)
  g = m / n                                  [d_out]
  y = g ⊙ (x·W + s·(x·a)·b) + bias           [..., d_out], x's dtype

The backward is a ``jax.custom_vjp`` that keeps as residuals only ``x``,
``h = x·a [T, r]``, one ``[T, d_out]`` activation when the magnitude is
differentiated (``pre = x·W + s·h·b``; on the ``"mosaic"`` backend without a
bias, the output ``y`` itself, which a network's next layer holds anyway) and
two ``[d_out]`` float32 vectors, and that skips every cotangent nobody asked for
(the frozen kernel's ``xᵀ·dpre`` in particular is never computed unless the
kernel itself is differentiated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import ad

from dora_jax import backend as backend_lib
from dora_jax._checks import (accumulation_dtype, check_dora_args, check_real_scalar,
                              check_scale, check_vector, check_weights, precision_name)
from dora_jax.backend import KernelOptions
from dora_jax.compose import Residuals, Wants
from dora_jax.kernels import column_norm, dispatch
from dora_jax.kernels._common import default_interpret
from dora_jax.norm import NORM_EPS, factored_norm


def lora_scale(alpha: float, rank: int, *, rslora: bool = False) -> float:
  """The LoRA scale ``s``: ``alpha / rank``, or ``alpha / √rank`` with rsLoRA (PEFT's rules)."""
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  return check_real_scalar("alpha", alpha) / (math.sqrt(rank) if rslora else rank)


class _Config(NamedTuple):
  """Static (hashable) part of a call: the implementation, matmul precision, kernel
  options, and whether the kernels run per shard under a mesh."""

  impl: str
  precision: str | None
  options: KernelOptions  # interpret resolved to a bool
  partitioned: bool = False  # kernels.partition's rules (a kernel backend under a mesh)

  def scope(self):
    """The matmul-precision context for tracing the forward or the backward."""
    if self.precision is None:
      return contextlib.nullcontext()
    return jax.default_matmul_precision(self.precision)

  @property
  def implementation(self) -> backend_lib.Implementation:
    return backend_lib.implementation(self.impl, self.partitioned)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Meta:
  """Static (leafless) part of the residuals: the wanted cotangents and their dtypes."""

  wants: Wants
  magnitude_dtype: jnp.dtype | None  # None: the magnitude is not differentiated
  bias_dtype: jnp.dtype | None
  norm: bool = False  # the norm is differentiated (detach_norm=False)


def _scale_vectors(magnitude, norm, acc):
  """``(g, 1/n)``. ``g = m / n`` is a true division so that ``m == n`` gives
  exactly 1 (``m · (1/n)`` can round to 1 − 2⁻²⁴), keeping PEFT's init exact."""
  safe = jnp.maximum(norm.astype(acc), NORM_EPS)
  return magnitude.astype(acc) / safe, 1.0 / safe


def _core(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm):
  g, _ = _scale_vectors(magnitude, norm, scale.dtype)
  with cfg.scope():  # nothing is differentiated: no residual is written
    return cfg.implementation.forward(x2, kernel, lora_a, lora_b, g, scale, bias,
                                      want_pre=False, options=cfg.options)[0]


def _keeps_output(cfg: _Config, wants: Wants, bias, dtype) -> bool:
  """Whether the output ``y`` (rather than ``pre``) is the ``dm`` residual: on the
  ``"mosaic"`` backend by default (one ``[T, d_out]`` store less; zero magnitudes
  get ``pre`` recomputed on the device by :mod:`dora_jax.kernels.flagged_columns`),
  bias-free layers only (``y = g ⊙ pre``), never float16 (``g ⊙ pre`` could leave
  its range), and not per shard under a mesh (the zero-magnitude recompute would
  need whole rows of ``W`` where ``d_in`` is split). The other backends keep
  ``pre``: recovering it there would need a ``lax.cond`` whose predicate XLA's
  GPU runtime reads on the host."""
  return (cfg.impl == "mosaic" and cfg.options.mosaic_residual == "output" and wants.magnitude
          and bias is None and dtype != jnp.float16 and not cfg.partitioned)


def _core_fwd(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm):
  # The norm's cotangent is −g ⊙ dm (y = (m/n) ⊙ pre): the backward computes
  # dm when either is differentiated.
  wants = Wants(
      x=x2.perturbed, kernel=kernel.perturbed, lora_a=lora_a.perturbed,
      lora_b=lora_b.perturbed, magnitude=magnitude.perturbed or norm.perturbed,
      scale=scale.perturbed, bias=bias is not None and bias.perturbed)
  m_perturbed, norm_perturbed = magnitude.perturbed, norm.perturbed
  x2, kernel, lora_a, lora_b, magnitude, scale, norm = (
      v.value for v in (x2, kernel, lora_a, lora_b, magnitude, scale, norm))
  bias = None if bias is None else bias.value
  meta = _Meta(wants, magnitude.dtype if m_perturbed else None,
               None if bias is None else bias.dtype, norm_perturbed)
  g, inv_norm = _scale_vectors(magnitude, norm, scale.dtype)
  keep_y = _keeps_output(cfg, wants, bias, x2.dtype)
  with cfg.scope():
    y, pre, h = cfg.implementation.forward(x2, kernel, lora_a, lora_b, g, scale, bias,
                                           want_pre=wants.magnitude and not keep_y,
                                           options=cfg.options)
  res = Residuals(x2, kernel, lora_a, lora_b, h, pre, y if keep_y else None, g, inv_norm, scale)
  return y, (res, meta)


def _core_bwd(cfg, saved, dy):
  res, meta = saved
  with cfg.scope():  # the backward is traced later, outside any caller's context
    grads = cfg.implementation.backward(res, dy, meta.wants, options=cfg.options)

  def cast(value, dtype):
    return None if value is None or dtype is None else value.astype(dtype)

  return (cast(grads.x, res.x2.dtype), cast(grads.kernel, res.kernel.dtype),
          cast(grads.lora_a, res.lora_a.dtype), cast(grads.lora_b, res.lora_b.dtype),
          cast(grads.magnitude, meta.magnitude_dtype), cast(grads.scale, res.scale.dtype),
          cast(grads.bias, meta.bias_dtype),
          -res.g * grads.magnitude if meta.norm else None)  # None: detached (PEFT)


_dora_core = jax.custom_vjp(_core, nondiff_argnums=(0,))
_dora_core.defvjp(_core_fwd, _core_bwd, symbolic_zeros=True)


class Resolved(NamedTuple):
  """How one call runs: its implementation, whether the kernels run per shard under
  a mesh (:mod:`dora_jax.kernels.partition`), whether the norm uses its kernel."""

  impl: str
  partitioned: bool = False
  norm_kernel: bool = False


def _resolve(backend: str | None, options: KernelOptions, x2, kernel, lora_a, *others,
             cached: bool = False) -> Resolved:
  """The call's :class:`Resolved`; ``cached``: ``‖W‖²`` is given."""
  choice = backend_lib.check_backend(backend)
  if choice == "xla":
    return Resolved(choice)
  requested = choice != "auto"
  device = dispatch.Device.current()
  if choice == "auto":
    choice = dispatch.choose(x2.shape[0], kernel.shape, lora_a.shape[1], x2.dtype, device)
  elif choice == "mosaic":
    choice = dispatch.mosaic_or_xla(x2.shape[0], kernel.shape, x2.dtype, device)
  # Pallas is not partitioned by GSPMD: per shard by kernels.partition's rules under a
  # mesh, the XLA path where no rule applies (logged once).
  impl, partitioned = dispatch.placement(choice, x2.shape[0], kernel.shape, x2, kernel, lora_a,
                                         *others, requested=requested)
  return Resolved(impl, partitioned, options.norm_kernel and dispatch.norm_kernel_allowed(
      impl, not requested, kernel.shape, lora_a.shape[1], cached, kernel, lora_a, *others,
      device=device, ruled=partitioned))


def _weight_norm(use_kernel: bool, partitioned: bool, kernel, lora_a, lora_b, scale,
                 base_sq_norm, interpret):
  """DoRA's norm ``[d_out]``: the one-pass kernel
  (:mod:`dora_jax.kernels.column_norm`; per shard by its partition rule when
  ``partitioned``) where allowed and its dtypes fit, else :func:`factored_norm`
  (with the cached ``‖W‖²`` if given), which is also the one differentiated when
  the norm is not detached (the kernel has no VJP)."""
  if use_kernel and column_norm.supported(kernel, lora_a, lora_b):
    if partitioned:
      from dora_jax.kernels import partition  # the rules import the kernel modules
      return partition.column_norm(kernel, lora_a, lora_b, scale, interpret=interpret)
    return column_norm.column_norm(kernel, lora_a, lora_b, scale, interpret=interpret)
  return factored_norm(kernel, lora_a, lora_b, scale,
                       base_sq_norm=None if base_sq_norm is None
                       else lax.stop_gradient(base_sq_norm))


_FORWARD_MODE = (
    "dora_dense is differentiable in reverse mode only (jax.grad, jax.vjp, jax.jacrev, and "
    "forward-over-reverse such as jax.jvp of jax.grad): its derivative is a jax.custom_vjp "
    "(LoRA-sized residuals, cotangents skipped where unused), which JAX does not run in "
    "forward mode (jax.jvp, jax.jacfwd, jax.linearize). Use jax.jacrev for a Jacobian. "
    "Forward mode would need a jax.custom_jvp rule of its own, with the norm n held constant: "
    "ẏ = (ṁ/n) ⊙ pre + g ⊙ (ẋ·W + x·Ẇ + s·(ẋ·a + x·ȧ)·b + s·(x·a)·ḃ + ṡ·(x·a)·b) + ḃias.")


def _check_reverse_mode(*values) -> None:
  """Refuse forward-mode tracing (``jax.jvp``, ``jax.jacfwd``) with :data:`_FORWARD_MODE`."""
  if any(isinstance(v, ad.JVPTracer) for v in values):
    raise TypeError(_FORWARD_MODE)


def dora_dense(x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
               magnitude: jax.Array, scale, bias: jax.Array | None = None, *,
               norm: jax.Array | None = None, base_sq_norm: jax.Array | None = None,
               precision=None, backend: str | None = None,
               options: KernelOptions | None = None, detach_norm: bool = True) -> jax.Array:
  """DoRA Dense layer: ``(m / ‖W + s·a·b‖) ⊙ (x·W + s·(x·a)·b) + bias``.

  Args:
    x: activations ``[..., d_in]`` (any leading dims); sets the compute dtype.
    kernel: frozen base kernel ``[d_in, d_out]``.
    lora_a: ``[d_in, r]``.
    lora_b: ``[r, d_out]``.
    magnitude: ``[d_out]``, the trained column magnitudes ``m``.
    scale: LoRA scale ``s`` (see :func:`lora_scale`): Python number or 0-d array.
    bias: optional ``[d_out]``, added after the DoRA scaling (not scaled).
    norm: optional precomputed ``[d_out]`` ``factored_norm(kernel, lora_a, lora_b,
      scale)``. The norm depends on parameters only, so a step over k
      micro-batches can compute it once and pass it to each (it is treated as a
      constant either way).
    base_sq_norm: optional ``column_sq_norm(kernel)`` ``[d_out]``. The kernel is
      frozen, so its column norms can be computed once (the layers do after
      :func:`dora_jax.cache_base_norms` / :func:`dora_jax.linen.cache_base_norms`)
      instead of re-reading the whole kernel every call. Ignored when ``norm`` is given
      and where the norm comes from the one-pass kernel
      (:mod:`dora_jax.kernels.column_norm`, which needs no ``‖W‖²``; see
      :func:`dora_jax.kernels.dispatch.norm_kernel_allowed`).
    precision: matmul precision of the layer's matmuls, forward and backward
      (``None``, a ``jax.lax.Precision`` or ``"default"``/``"high"``/``"highest"``,
      as Flax's ``precision``); ``None`` follows ``jax.default_matmul_precision``.
      The norm's own matmuls always run at full float32 precision.
    backend: ``"auto"``, ``"xla"``, ``"pallas"``, ``"mosaic"`` or ``None`` (process default, see
      :mod:`dora_jax.backend`).
    options: what the kernel backends run (:class:`dora_jax.KernelOptions`;
      ``None``: the defaults, measured fastest). Static, like ``backend``.
    detach_norm: ``True`` (PEFT's semantics, the DoRA paper's §4.3 memory
      trick): the norm is a constant in the backward. ``False``: the exact
      gradient of DoRA as defined: the norm's cotangent ``−g ⊙ dm`` flows back
      through :func:`factored_norm`'s terms ``‖W‖² + 2s⟨aᵀW, b⟩ + s²⟨b, aᵀa·b⟩``
      (one more product of ``W`` with an ``[r, d_out]`` cotangent for
      ``lora_a``, ``[r, r]``-sized work otherwise; no ``[d_in, d_out]``
      temporary); a given ``norm`` then passes its cotangent to whatever
      computed it.

  Returns:
    ``[..., d_out]`` in ``x.dtype``. Differentiable in reverse mode with
    respect to ``x``, ``lora_a``, ``lora_b``, ``magnitude``, ``bias`` (and
    ``kernel``/``scale`` if asked), to any order; the norm is held constant as
    in PEFT unless ``detach_norm=False``. Forward mode (``jax.jvp``,
    ``jax.jacfwd``) raises ``TypeError``.

  Example:
    >>> import jax, jax.numpy as jnp, dora_jax
    >>> k = jax.random.split(jax.random.key(0), 4)
    >>> x = jax.random.normal(k[0], (2, 5, 16))
    >>> w = jax.random.normal(k[1], (16, 8))
    >>> a = jax.random.normal(k[2], (16, 4))
    >>> b = jax.random.normal(k[3], (4, 8))
    >>> m = jnp.linalg.norm(w, axis=0)
    >>> dora_jax.dora_dense(x, w, a, b, m, 0.5).shape
    (2, 5, 8)
  """
  dims = check_dora_args(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  if options is None:
    options = KernelOptions()
  elif not isinstance(options, KernelOptions):
    raise TypeError(f"options must be a dora_jax.KernelOptions or None, got "
                    f"{type(options).__name__}")
  _check_reverse_mode(x, kernel, lora_a, lora_b, magnitude, scale, bias)
  if options.interpret is None:
    options = dataclasses.replace(options, interpret=default_interpret())
  acc = accumulation_dtype(x, kernel, lora_a, lora_b, magnitude)
  lead = x.shape[:-1]
  x2 = x.reshape(-1, dims.d_in)
  how = _resolve(backend, options, x2, kernel, lora_a, lora_b, magnitude, bias,
                 cached=base_sq_norm is not None)
  if not isinstance(detach_norm, bool):
    raise TypeError(f"detach_norm must be a bool, got {type(detach_norm).__name__}")
  if norm is None:
    norm = _weight_norm(how.norm_kernel and detach_norm, how.partitioned, kernel, lora_a, lora_b,
                        scale, base_sq_norm, options.interpret)
  else:
    check_vector("norm", norm, dims.d_out)
  norm = norm.astype(acc)
  if detach_norm:
    norm = lax.stop_gradient(norm)
  scale = jnp.asarray(scale, acc)
  cfg = _Config(how.impl, precision_name(precision), options, how.partitioned)
  try:
    y2 = _dora_core(cfg, x2, kernel, lora_a, lora_b, magnitude, scale, bias, norm)
  except TypeError as err:  # forward mode the check above could not see (under jax.vmap, say)
    if "forward-mode" in str(err):
      raise TypeError(_FORWARD_MODE) from err
    raise
  return y2.reshape(*lead, dims.d_out)


def dora_norm_scale(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                    magnitude: jax.Array, scale, *, norm: jax.Array | None = None
                    ) -> jax.Array:
  """``g = m / ‖W + s·a·b‖`` ``[d_out]`` float32, the per-column DoRA scale.

  Differentiable with respect to ``magnitude`` only (the norm is detached).
  Used to cache the scale for unmerged inference.
  """
  dims = check_weights(kernel, lora_a, lora_b)
  check_vector("magnitude", magnitude, dims.d_out)
  check_scale(scale)
  acc = accumulation_dtype(kernel, lora_a, lora_b, magnitude)
  if norm is None:
    norm = factored_norm(kernel, lora_a, lora_b, scale)
  g, _ = _scale_vectors(magnitude, lax.stop_gradient(norm), acc)
  return g


def merge_kernel(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                 magnitude: jax.Array, scale) -> jax.Array:
  """The merged kernel ``W' = g ⊙ (W + s·a·b)`` ``[d_in, d_out]`` in ``kernel.dtype``.

  ``x·W' + bias`` equals :func:`dora_dense` up to rounding. The composition
  runs in float32 (float64 for float64 inputs) and is cast back once.
  """
  dims = check_weights(kernel, lora_a, lora_b)
  check_vector("magnitude", magnitude, dims.d_out)
  check_scale(scale)
  acc = accumulation_dtype(kernel, lora_a, lora_b, magnitude)
  g = dora_norm_scale(kernel, lora_a, lora_b, magnitude, scale)
  delta = jnp.dot(lora_a.astype(acc), lora_b.astype(acc), precision=lax.Precision.HIGHEST)
  merged = (kernel.astype(acc) + jnp.asarray(scale, acc) * delta) * g.astype(acc)
  return merged.astype(kernel.dtype)

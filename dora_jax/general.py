"""DoRA on a weight in its native layout: any ``einsum`` / ``dot_general`` with a kernel operand.

A model zoo's projections rarely hold a ``[d_in, d_out]`` kernel: gemma's
``q_einsum`` is ``BTD,NDH->BTNH`` over a ``[N, D, H]`` weight, the attention
output contracts two axes, a gated MLP stacks its two kernels on an axis of
their own. DoRA needs no matrix view of them. For a kernel whose axes are

* contracted with the input (``C``, ``d_in = prod``),
* batch axes shared by input, kernel and output (``B``: a block-diagonal
  weight; one DoRA layer per entry, so one norm per entry),
* output-only (``O``, ``d_out = prod``),

the adapters are ``lora_a [*B, *C, r]``, ``lora_b [*B, r, *O]`` and
``magnitude [*B, *O]`` (each in the kernel's own axis order) and::

  n   = ‖W + s·a·b‖ over C, per (B, O) entry     float32, detached (PEFT)
  g   = m / n
  y   = g ⊙ (op(x, W) + s·op(x, a)·b)             g broadcast over the output's (B, O) axes

where ``op(x, W)`` is the base contraction itself (same equation, precision
and ``preferred_element_type``), so at PEFT's init (``b = 0``, ``m = ‖W‖``)
the result is the base output bit for bit. The norm's terms ``‖W‖²``,
``aᵀW [*B, r, *O]`` and ``aᵀa [*B, r, r]`` are contractions over ``C`` of the
kernel as stored: no ``[d_in, d_out]`` view, no transpose of the kernel by
this code (what XLA does with an operand's layout inside one dot is its own).

Where the op is a plain ``x·W`` on a ``[*C, *O]`` kernel (a free reshape to
``[d_in, d_out]``) it runs :func:`dora_jax.dora_dense`, and with it the fused
GPU kernels. With several contracted axes it does so only where a kernel
backend runs: XLA on CPU rounds a multi-axis ``dot_general`` differently from
its reshaped matrix product, which would break the exact init.

The kernel may also be a :class:`QuantizedWeight` (QDoRA: a frozen weight
stored quantized, :mod:`dora_jax.quantized`). Every product with it, the base
term, the norm's ``aᵀW`` and the backward's ``dx``, then goes through the
weight's own :meth:`QuantizedWeight.contract`, and ``‖W‖²`` is the one it
cached: no float copy of the whole weight is formed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import string
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import custom_vjp_primal_tree_values

from dora_jax._checks import accumulation_dtype, check_float, check_scale
from dora_jax.backend import KernelOptions
from dora_jax.dense import _resolve, dora_dense
from dora_jax.norm import (NORM_EPS, _bf16_cross, _combine as _combine_terms, _gram_times_b,
                           _halves_summed, _low_rank_columns, _overflow_limit, _split_bf16,
                           gram, refine_cancelled)

_HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_HIGHEST = lax.Precision.HIGHEST


# -- layout ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WeightLayout:
  """How a weight enters one contraction: which of its axes play which part.

  Attributes:
    shape: the kernel's shape as stored.
    contracted: kernel axes contracted with the input (``C``), in kernel order.
    batch: kernel axes that are batch axes of the op (``B``: shared by input,
      kernel and output); DoRA keeps one norm per batch entry.
    output: kernel axes that reach only the output (``O``), in kernel order.
  """

  shape: tuple[int, ...]
  contracted: tuple[int, ...]
  batch: tuple[int, ...] = ()
  output: tuple[int, ...] = ()

  def __post_init__(self):
    axes = sorted(self.contracted + self.batch + self.output)
    if axes != list(range(len(self.shape))):
      raise ValueError(
          f"WeightLayout: contracted {self.contracted}, batch {self.batch} and output "
          f"{self.output} must partition the kernel's axes 0..{len(self.shape) - 1}")
    if not self.contracted or not self.output:
      raise ValueError(
          f"WeightLayout: a kernel of shape {self.shape} needs at least one contracted and "
          f"one output axis, got contracted {self.contracted}, output {self.output}")

  @property
  def in_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.contracted)

  @property
  def out_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.output)

  @property
  def batch_shape(self) -> tuple[int, ...]:
    return tuple(self.shape[i] for i in self.batch)

  @property
  def d_in(self) -> int:
    return math.prod(self.in_shape)

  @property
  def d_out(self) -> int:
    return math.prod(self.out_shape)

  @property
  def is_matrix(self) -> bool:
    """Whether the kernel is ``[*C, *O]`` with no batch axis (a free reshape to ``[d_in, d_out]``)."""
    return not self.batch and self.contracted + self.output == tuple(range(len(self.shape)))

  def adapter_shapes(self, rank: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """``(lora_a, lora_b, magnitude)`` shapes: ``[*B, *C, r]``, ``[*B, r, *O]``, ``[*B, *O]``."""
    return ((*self.batch_shape, *self.in_shape, rank),
            (*self.batch_shape, rank, *self.out_shape),
            (*self.batch_shape, *self.out_shape))

  def to_matrix(self, kernel: jax.Array) -> jax.Array:
    """The kernel as ``[*B, d_in, d_out]`` (a transposed copy: references, merge, export only)."""
    self._check_kernel(kernel)
    perm = self.batch + self.contracted + self.output
    return jnp.transpose(kernel, perm).reshape(*self.batch_shape, self.d_in, self.d_out)

  def from_matrix(self, matrix: jax.Array) -> jax.Array:
    """Inverse of :meth:`to_matrix`: ``[*B, d_in, d_out]`` back to the kernel's layout."""
    expected = (*self.batch_shape, self.d_in, self.d_out)
    if tuple(matrix.shape) != expected:
      raise ValueError(f"matrix must have shape {expected}, got {tuple(matrix.shape)}")
    perm = self.batch + self.contracted + self.output
    full = matrix.reshape(*(self.shape[i] for i in perm))
    return jnp.transpose(full, np.argsort(perm))

  def _check_kernel(self, kernel) -> None:
    if tuple(np.shape(kernel)) != self.shape:
      raise ValueError(f"kernel must have shape {self.shape} (the layout's), got {np.shape(kernel)}")


class QuantizedWeight:
  """A frozen weight stored quantized that computes its own contractions (QDoRA's base).

  The DoRA ops never ask it for the weight as one float array; they use:

  * ``layout`` (:class:`WeightLayout` of the float weight ``Ŵ`` it stands for),
    ``dtype`` (the float dtype ``Ŵ`` is computed in), ``shape``/``ndim`` (``Ŵ``'s);
  * ``sq_norm``: ``‖Ŵ‖²`` over the contracted axes, ``[*B, *O]``, computed once;
  * :meth:`contract`: ``einsum(spec, lhs, Ŵ)`` computed part by part.

  :meth:`dequantize` (the whole ``Ŵ``) is for merging and export only.
  :class:`dora_jax.quantized.QuantizedKernel` implements it.
  """

  layout: WeightLayout
  dtype: Any
  sq_norm: jax.Array

  @property
  def shape(self) -> tuple[int, ...]:
    return self.layout.shape

  @property
  def ndim(self) -> int:
    return len(self.layout.shape)

  def contract(self, spec: str, lhs: jax.Array, piece, init=None, init_scale=None) -> jax.Array:
    """``einsum(spec, lhs, Ŵ)`` as ``piece(lhs_part, Ŵ_part)`` over parts of ``Ŵ``.

    ``spec`` names the weight's axes in its own order (explicit labels, no
    ellipsis); ``piece`` computes that einsum on a part of ``Ŵ`` (and the
    matching part of ``lhs`` where a split axis is contracted) and must
    accumulate in float32 when parts are summed. ``init`` (optional, the
    output's shape): ``init + einsum`` (``init_scale·init + einsum`` with a
    0-d ``init_scale``), the parts written onto ``init`` in place (the output
    in the dtype ``init`` and the parts promote to). Differentiable with
    respect to ``lhs`` (and ``init``, ``init_scale``) only.
    """
    raise NotImplementedError

  def dequantize(self) -> jax.Array:
    """``Ŵ`` as one float array in ``dtype`` (merge and export only)."""
    raise NotImplementedError


def _check_quantized(kernel, layout: WeightLayout) -> None:
  if isinstance(kernel, QuantizedWeight) and kernel.layout != layout:
    raise ValueError(
        f"kernel was quantized for {kernel.layout} (contracted axes {kernel.layout.contracted}, "
        f"batch {kernel.layout.batch}, output {kernel.layout.output}), but is used with "
        f"{layout}: quantize it with the layout of this contraction "
        "(einsum_layout / dot_general_layout)")


@dataclasses.dataclass(frozen=True)
class _Labels:
  """One contraction as einsum labels: input ``x``, kernel ``k``, output ``out``; ``r`` is free."""

  x: str
  k: str
  out: str
  r: str

  @property
  def c(self) -> str:
    return "".join(l for l in self.k if l in self.x and l not in self.out)

  @property
  def b(self) -> str:
    return "".join(l for l in self.k if l in self.x and l in self.out)

  @property
  def o(self) -> str:
    return "".join(l for l in self.k if l in self.out and l not in self.x)

  @property
  def a(self) -> str:  # lora_a [*B, *C, r]
    return self.b + self.c + self.r

  @property
  def lb(self) -> str:  # lora_b [*B, r, *O]
    return self.b + self.r + self.o

  @property
  def m(self) -> str:  # magnitude, norm [*B, *O]
    return self.b + self.o

  @property
  def h(self) -> str:  # x·a: the input's kept axes, then r
    return "".join(l for l in self.x if l in self.out) + self.r

  def layout(self, kernel_shape) -> WeightLayout:
    pos = {l: i for i, l in enumerate(self.k)}
    return WeightLayout(tuple(int(d) for d in kernel_shape),
                        tuple(pos[l] for l in self.c), tuple(pos[l] for l in self.b),
                        tuple(pos[l] for l in self.o))


def _fresh(used: str, n: int) -> str:
  free = [l for l in string.ascii_letters if l not in used]
  if len(free) < n:
    raise ValueError("einsum equation uses too many labels to add DoRA's rank label")
  return "".join(free[:n])


def _validated(labels: _Labels, where: str) -> _Labels:
  for name, part in (("input", labels.x), ("kernel", labels.k), ("output", labels.out)):
    if len(set(part)) != len(part):
      raise ValueError(f"{where}: repeated index in the {name} (a trace/diagonal is not a projection)")
  summed_k = [l for l in labels.k if l not in labels.x and l not in labels.out]
  summed_x = [l for l in labels.x if l not in labels.k and l not in labels.out]
  missing = [l for l in labels.out if l not in labels.x and l not in labels.k]
  problems = []
  if summed_k:
    problems.append(f"kernel indices {summed_k} are summed away")
  if summed_x:
    problems.append(f"input indices {summed_x} are summed away without the kernel")
  if missing:
    problems.append(f"output indices {missing} are in neither operand")
  if not labels.c:
    problems.append("no kernel axis is contracted with the input")
  if not labels.o:
    problems.append("no kernel axis reaches the output alone")
  if problems:
    raise ValueError(f"{where} is not a DoRA-adaptable projection: " + "; ".join(problems))
  return labels


def _einsum_labels(spec: str, x_ndim: int, k_ndim: int) -> _Labels:
  eq = spec.replace(" ", "")
  if "->" not in eq or eq.count("->") != 1:
    raise ValueError(f"spec must be an explicit two-operand einsum 'x,w->out', got {spec!r}")
  ins, out = eq.split("->")
  if ins.count(",") != 1:
    raise ValueError(f"spec must have exactly two operands (input, kernel), got {spec!r}")
  lhs, rhs = ins.split(",")
  if "." in rhs:
    raise ValueError(f"spec {spec!r}: an ellipsis in the kernel operand is not supported")
  if ("..." in lhs) != ("..." in out):
    raise ValueError(f"spec {spec!r}: an ellipsis must appear in both the input and the output")
  for part in (lhs, rhs, out):
    if not all(c in string.ascii_letters or c == "." for c in part):
      raise ValueError(f"spec {spec!r}: only letters and '...' are allowed")
  if "..." in lhs:
    n = x_ndim - (len(lhs) - 3)
    if n < 0:
      raise ValueError(f"spec {spec!r}: input of rank {x_ndim} is too small for {lhs!r}")
    fresh = _fresh(lhs + rhs + out, n)
    lhs, out = lhs.replace("...", fresh), out.replace("...", fresh)
  if len(lhs) != x_ndim:
    raise ValueError(f"spec {spec!r}: input has rank {x_ndim}, the equation names {len(lhs)} axes")
  if len(rhs) != k_ndim:
    raise ValueError(f"spec {spec!r}: kernel has rank {k_ndim}, the equation names {len(rhs)} axes")
  return _validated(_Labels(lhs, rhs, out, _fresh(lhs + rhs + out, 1)), f"einsum {spec!r}")


def _dot_general_labels(dimension_numbers, x_ndim: int, k_ndim: int) -> _Labels:
  try:
    (lc, rc), (lb, rb) = dimension_numbers
    lc, rc, lb, rb = (tuple(int(a) for a in v) for v in (lc, rc, lb, rb))
  except (TypeError, ValueError):
    raise ValueError(
        "dimension_numbers must be ((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch)), "
        f"got {dimension_numbers!r}") from None
  norm = lambda axes, nd: tuple(a % nd if -nd <= a < nd else nd for a in axes)
  lc, lb = norm(lc, x_ndim), norm(lb, x_ndim)
  rc, rb = norm(rc, k_ndim), norm(rb, k_ndim)
  if (len(lc) != len(rc) or len(lb) != len(rb) or x_ndim in lc + lb or k_ndim in rc + rb
      or len(set(lc + lb)) != len(lc + lb) or len(set(rc + rb)) != len(rc + rb)):
    raise ValueError(f"dimension_numbers {dimension_numbers!r} do not fit an input of rank "
                     f"{x_ndim} and a kernel of rank {k_ndim}")
  pool = string.ascii_letters
  x = list(pool[:x_ndim])
  k = [""] * k_ndim
  for i, j in zip(lc + lb, rc + rb):
    k[j] = x[i]
  extra = iter(pool[x_ndim:])
  k = [l or next(extra) for l in k]
  x_free = [x[i] for i in range(x_ndim) if i not in lc + lb]
  k_free = [k[j] for j in range(k_ndim) if j not in rc + rb]
  out = "".join([x[i] for i in lb] + x_free + k_free)
  labels = _Labels("".join(x), "".join(k), out, next(extra))
  return _validated(labels, f"dot_general {dimension_numbers!r}")


def einsum_layout(spec: str, x_shape: Sequence[int], kernel_shape: Sequence[int]) -> WeightLayout:
  """The :class:`WeightLayout` of ``kernel`` in ``jnp.einsum(spec, x, kernel)``.

  Raises ``ValueError`` for equations that are not projections of ``x`` by the
  kernel (an index summed away, a trace, no contracted or no output axis).
  """
  return _einsum_labels(spec, len(x_shape), len(kernel_shape)).layout(kernel_shape)


def dot_general_layout(dimension_numbers, x_shape: Sequence[int],
                       kernel_shape: Sequence[int]) -> WeightLayout:
  """The :class:`WeightLayout` of the rhs ``kernel`` in ``lax.dot_general(x, kernel, dimension_numbers)``."""
  return _dot_general_labels(dimension_numbers, len(x_shape), len(kernel_shape)).layout(kernel_shape)


# -- norm and merge -------------------------------------------------------------


def _check_adapters(layout: WeightLayout, lora_a, lora_b, magnitude=None) -> int:
  """Validate adapter shapes/dtypes against ``layout``; return the rank."""
  a_shape = tuple(np.shape(lora_a))
  if len(a_shape) != len(layout.batch_shape) + len(layout.in_shape) + 1:
    raise ValueError(f"lora_a must be [*batch, *in, r] = {layout.adapter_shapes('r')[0]}, "
                     f"got {a_shape}")
  rank = a_shape[-1]
  want_a, want_b, want_m = layout.adapter_shapes(rank)
  for name, value, want in (("lora_a", lora_a, want_a), ("lora_b", lora_b, want_b),
                            ("magnitude", magnitude, want_m)):
    if value is None:
      continue
    if tuple(np.shape(value)) != want:
      raise ValueError(f"{name} must have shape {want} for a kernel of shape {layout.shape} "
                       f"(contracted axes {layout.contracted}, batch {layout.batch}, output "
                       f"{layout.output}), got {tuple(np.shape(value))}")
    check_float(name, value)
  if rank < 1:
    raise ValueError(f"rank must be >= 1, got lora_a of shape {a_shape}")
  return rank


def _labels_for(layout: WeightLayout) -> _Labels:
  """Canonical labels for a layout alone (no input): kernel axes lettered in order."""
  k = string.ascii_letters[:len(layout.shape)]
  x = "".join(k[i] for i in layout.batch + layout.contracted)
  out = "".join(k[i] for i in layout.batch + layout.output)
  return _Labels(x, k, out, _fresh(k, 1))


def weight_sq_norm(kernel: jax.Array, layout: WeightLayout) -> jax.Array:
  """``‖W_j‖²`` over the contracted axes, ``[*B, *O]`` float32 (float64 for float64).

  Frozen, it can be cached and passed as ``base_sq_norm``. Initialise the
  magnitude with :func:`init_magnitude` (its square root, compiled so that it
  matches the norm bit for bit), not with an eager ``sqrt`` of this.
  """
  layout._check_kernel(kernel)
  check_float("kernel", kernel)
  _check_quantized(kernel, layout)
  if isinstance(kernel, QuantizedWeight):
    return lax.stop_gradient(kernel.sq_norm)  # cached when the weight was quantized
  acc = accumulation_dtype(kernel)
  sq = jnp.sum(jnp.square(kernel.astype(acc)), axis=layout.contracted)
  # the remaining axes are (B, O) in kernel order; magnitude wants B first
  rest = [i for i in range(len(layout.shape)) if i not in layout.contracted]
  perm = [rest.index(i) for i in layout.batch + layout.output]
  return sq if perm == sorted(perm) else jnp.transpose(sq, perm)


def init_magnitude(kernel: jax.Array, layout: WeightLayout, dtype=None) -> jax.Array:
  """PEFT's initial magnitude ``‖W_j‖`` ``[*B, *O]`` (in ``dtype``, default float32).

  A compiled reduction, the same fused square-and-sum the norm runs inside a
  jitted call (op-by-op execution can round the sum differently), so that at
  init ``m`` equals the norm bit for bit and the layer reproduces the base.
  """
  layout._check_kernel(kernel)
  return _init_magnitude(kernel, layout).astype(jnp.float32 if dtype is None else dtype)


@functools.partial(jax.jit, static_argnums=(1,))
def _init_magnitude(kernel, layout):
  return jnp.sqrt(weight_sq_norm(kernel, layout))


def _sorted_dot_general(lhs, rhs, dimension_numbers, precision=None,
                        preferred_element_type=None, **kwargs):
  """``lax.dot_general`` with several contracted axes paired in ascending order of
  the larger operand's axes.

  ``jnp.einsum`` lists them in reverse (``btnh,anh->bta`` contracts
  ``((3, 2), (2, 1))``), and a compiler that does not sort them back (XLA:CPU)
  first copies the operand into that order: a transpose of ``dy``-, ``x``- or
  kernel-sized arrays on every call. Only the summation order changes.
  """
  (lc, rc), batch = dimension_numbers
  if len(lc) > 1:
    key = lc if math.prod(np.shape(lhs)) >= math.prod(np.shape(rhs)) else rc
    order = sorted(range(len(lc)), key=lambda i: key[i])
    lc, rc = tuple(lc[i] for i in order), tuple(rc[i] for i in order)
  return lax.dot_general(lhs, rhs, ((lc, rc), batch), precision,
                         preferred_element_type=preferred_element_type, **kwargs)


def _einsum(spec: str, lhs, rhs, **kwargs):
  """``jnp.einsum`` whose contractions take the larger operand's axes in stored order."""
  return jnp.einsum(spec, lhs, rhs, _dot_general=_sorted_dot_general, **kwargs)


def _contract(spec: str, lhs, rhs, acc, precision=None):
  """``jnp.einsum(spec, lhs, rhs)`` accumulated in ``acc`` (contracted axes in the
  larger operand's stored order: :func:`_sorted_dot_general`).

  On the CPU, half-precision operands are upcast first: XLA:CPU has no
  bf16 x bf16 -> f32 dot for every operand layout, and the products of two
  bf16 numbers are exact in float32 either way.
  """
  if jax.default_backend() == "cpu":
    lhs, rhs = (v.astype(acc) if v.dtype in _HALF else v for v in (lhs, rhs))
  return _einsum(spec, lhs, rhs, precision=precision, preferred_element_type=acc)


def _cross(lora_a, kernel, labels: _Labels, acc) -> jax.Array:
  """``U = aᵀW [*B, r, *O]`` in ``acc`` (the routes of :func:`dora_jax.norm` in native layout)."""
  spec = f"{labels.a},{labels.k}->{labels.lb}"
  rank = lora_a.shape[-1]
  if kernel.dtype == jnp.bfloat16 and acc == jnp.float32 and (
      (lora_a.dtype == kernel.dtype and rank > 1) or lora_a.dtype == jnp.float32):
    return _cross_bf16(labels.a, labels.k, labels.lb, len(labels.b))(lora_a, kernel)
  if kernel.dtype in _HALF and lora_a.dtype == kernel.dtype and rank > 1:
    return _contract(spec, lora_a, kernel, acc)
  if kernel.dtype == jnp.bfloat16 and lora_a.dtype in (jnp.float32, jnp.float64):
    return _cross_split(spec, len(labels.b), lora_a, kernel, acc)
  return _einsum(spec, lora_a.astype(acc), kernel.astype(acc), precision=_HIGHEST,
                 preferred_element_type=acc)


def _cross_split(spec: str, r_axis: int, lora_a, kernel, acc):
  """``aᵀW`` for a bf16 kernel and a float32/64 ``a``: ``a_hi + a_lo`` as bf16
  terms side by side on the rank axis, one pass over ``W``."""
  u = _contract(spec, _split_bf16(lora_a, 2, axis=-1), kernel, acc)
  return _halves_summed(u, lora_a.shape[-1], r_axis)


@functools.cache
def _cross_bf16(a: str, k: str, lb: str, r_axis: int):
  """``U = aᵀW`` (float32) for a bf16 kernel, ``a`` bf16 or float32, with a bf16
  transpose: ``∂a`` contracts ``∂U``, split in two bf16 terms on the rank axis,
  with ``W`` in one bf16 product (as :func:`dora_jax.norm._cross_bf16` does for
  ``[d_in, d_out]``; autodiff's is a float32 product over ``W`` upcast, and it
  rounds a float32 ``a``'s cotangent through the bf16 split)."""
  spec = f"{a},{k}->{lb}"

  def forward(lora_a, kernel):
    if lora_a.dtype == jnp.float32:
      return _cross_split(spec, r_axis, lora_a, kernel, jnp.float32)
    return _contract(spec, lora_a, kernel, jnp.float32)

  def da_of(kernel, du):
    da2 = _contract(f"{lb},{k}->{a}", _split_bf16(du, 2, axis=r_axis), kernel, jnp.float32)
    return _halves_summed(da2, du.shape[r_axis], da2.ndim - 1)

  def dk_of(lora_a, du):
    return _einsum(f"{a},{lb}->{k}", lora_a.astype(jnp.float32), du, precision=_HIGHEST,
                   preferred_element_type=jnp.float32)

  return _bf16_cross(forward, da_of, dk_of)


def _terms(base_sq, u, lora_a, lora_b, layout: WeightLayout, acc) -> jax.Array:
  """The factored norm's five sums per ``(B, O)`` entry, ``[5, n]`` (``n = prod(B)·d_out``,
  entries in ``[*B, *O]`` order): ``‖W‖²``, ``Σ_r b⊙U``, ``Σ_r b⊙G·b`` and the
  last two's magnitudes (as :func:`dora_jax.norm.factored_norm` forms them)."""
  nb = math.prod(layout.batch_shape)
  rank = lora_a.shape[-1]
  a3 = lora_a.reshape(nb, layout.d_in, rank)  # free reshapes: adapters are [*B, *C, r] etc.
  b3 = lora_b.reshape(nb, rank, layout.d_out)
  u3 = u.reshape(nb, rank, layout.d_out)

  def one(a2, b2, u2):
    b2f = b2.astype(acc)
    bu, bgb = b2f * u2, b2f * _gram_times_b(gram(a2).astype(acc), b2, acc)
    return jnp.stack([jnp.sum(bu, axis=0), jnp.sum(bgb, axis=0),
                      jnp.sum(jnp.abs(bu), axis=0), jnp.sum(jnp.abs(bgb), axis=0)])

  sums = jax.vmap(one)(a3, b3, u3) if nb > 1 else one(a3[0], b3[0], u3[0])[None]
  sums = jnp.moveaxis(sums, 1, 0).reshape(4, nb * layout.d_out)
  return jnp.concatenate([base_sq.astype(acc).reshape(1, -1), sums])


def _exact_sq_columns(kernel, lora_a, lora_b, layout: WeightLayout, inv_c, t, acc):
  """``idx [K] -> Σ_C (W_j/c_j + t_j·(a·b)_j)²`` for flat ``(B, O)`` entries ``idx``:
  the cancelled columns formed densely from ``K`` gathered kernel columns."""
  nb, rank = math.prod(layout.batch_shape), lora_a.shape[-1]
  kept = layout.batch + layout.output  # kernel axes indexed per column, in [*B, *O] order
  pos = sorted(kept)
  # numpy's rule: adjacent advanced indices stay in place, separated ones go first
  at = (pos[0] - sum(1 for ax in range(pos[0]) if ax in kept)
        if pos == list(range(pos[0], pos[0] + len(pos))) else 0)

  def columns(idx):
    multi = jnp.unravel_index(idx, layout.batch_shape + layout.out_shape)
    index = [slice(None)] * len(layout.shape)
    for axis, i in zip(kept, multi):
      index[axis] = i
    w = jnp.moveaxis(kernel[tuple(index)], at, 0).reshape(idx.shape[0], layout.d_in)
    b_idx, o_idx = jnp.divmod(idx, layout.d_out)
    b_cols = lora_b.reshape(nb, rank, layout.d_out)[b_idx, :, o_idx]  # [K, r]
    if nb == 1:
      low = _low_rank_columns(lora_a.reshape(layout.d_in, rank), b_cols.T, acc).T
    else:
      a_cols = lora_a.reshape(nb, layout.d_in, rank)[b_idx].astype(acc)  # [K, d_in, r]
      low = jnp.einsum("kir,kr->ki", a_cols, b_cols.astype(acc), precision=_HIGHEST)
    v = w.astype(acc) * inv_c[idx][:, None] + t[idx][:, None] * low
    return jnp.sum(v * v, axis=1)

  return columns


def weight_norm(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale,
                layout: WeightLayout, *, base_sq_norm: jax.Array | None = None) -> jax.Array:
  """``‖W + s·a·b‖`` over the contracted axes per ``(B, O)`` entry, ``[*B, *O]`` float32.

  Factored (:mod:`dora_jax.norm`) in the kernel's layout: ``‖W‖²`` (or the
  given ``base_sq_norm``, treated as a constant), ``aᵀW`` and ``aᵀa``; float32
  accumulation (float64 for float64 inputs), clamped at 0 before the square
  root. Differentiable as written: its VJP with respect to ``lora_a`` is one
  more contraction of ``W`` with an ``[r, *O]`` cotangent, never ``[d_in, d_out]``.
  """
  layout._check_kernel(kernel)
  check_float("kernel", kernel)
  _check_quantized(kernel, layout)
  _check_adapters(layout, lora_a, lora_b)
  check_scale(scale)
  acc = accumulation_dtype(kernel, lora_a, lora_b)
  labels = _labels_for(layout)
  want = layout.adapter_shapes(1)[2]
  if base_sq_norm is None:
    base_sq = weight_sq_norm(kernel, layout)
  elif tuple(np.shape(base_sq_norm)) != want:
    raise ValueError(f"base_sq_norm must have shape {want}, got {tuple(np.shape(base_sq_norm))}")
  else:
    base_sq = lax.stop_gradient(base_sq_norm)  # a cache of the frozen kernel's
  if isinstance(kernel, QuantizedWeight):
    # aᵀŴ through the weight's own contraction, aᵀ as r extra tokens
    u = kernel.contract(f"{labels.a},{labels.k}->{labels.lb}", lora_a,
                        functools.partial(_cross, labels=labels, acc=acc))
  else:
    u = _cross(lora_a, kernel, labels, acc)
  scale = jnp.asarray(scale, acc)
  # as factored_norm: rescaled where a summand could overflow, and the columns
  # whose update cancels them (W_j ≈ −s(ab)_j) recomputed from gathered columns.
  # A quantized weight keeps the factored value there: gathering its columns
  # means decoding it across the output axis, a pass over W on every GPU call.
  combined = _combine_terms(_terms(base_sq, u, lora_a, lora_b, layout, acc), scale,
                            _overflow_limit(acc))
  sq = combined.sq
  if not isinstance(kernel, QuantizedWeight):
    sq = refine_cancelled(sq, combined.bound, _exact_sq_columns(
        kernel, lora_a, lora_b, layout, 1.0 / combined.c, combined.t, acc))
  norm = combined.c * jnp.sqrt(jnp.maximum(sq, 0.0))
  return norm.reshape(layout.adapter_shapes(1)[2])


def _lay_out(vec, src: str, dst: str):
  """``vec`` with axes labelled ``src`` laid out to broadcast against ``dst``
  (its axes reordered as they appear in ``dst``, size 1 on ``dst``'s other axes)."""
  order = [l for l in dst if l in src]
  perm = [src.index(l) for l in order]
  vec = jnp.transpose(vec, perm) if perm != sorted(perm) else vec
  return vec.reshape([vec.shape[order.index(l)] if l in src else 1 for l in dst])


def merge_weight(kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                 magnitude: jax.Array, scale, layout: WeightLayout) -> jax.Array:
  """The merged kernel ``g ⊙ (W + s·a·b)`` in the kernel's shape and dtype.

  For a :class:`QuantizedWeight` the result is the float kernel (``W`` its
  dequantized weight, in its ``dtype``).

  ``op(x, W')`` equals :func:`dora_einsum` up to rounding; the composition runs
  in float32 (float64 for float64 inputs) and is cast back once.
  """
  layout._check_kernel(kernel)
  _check_quantized(kernel, layout)
  _check_adapters(layout, lora_a, lora_b, magnitude)
  acc = accumulation_dtype(kernel, lora_a, lora_b, magnitude)
  labels = _labels_for(layout)
  norm = lax.stop_gradient(weight_norm(kernel, lora_a, lora_b, scale, layout))
  if isinstance(kernel, QuantizedWeight):
    kernel = kernel.dequantize()  # a merged model is a float model
  g = magnitude.astype(acc) / jnp.maximum(norm.astype(acc), NORM_EPS)
  delta = jnp.einsum(f"{labels.a},{labels.lb}->{labels.k}", lora_a.astype(acc),
                     lora_b.astype(acc), precision=_HIGHEST)
  merged = (kernel.astype(acc) + jnp.asarray(scale, acc) * delta) * _lay_out(g, labels.m, labels.k)
  return merged.astype(kernel.dtype)


# -- the op ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Op:
  """Static part of one call: the contraction and how its base term is computed."""

  labels: _Labels
  kind: str  # "einsum" (spec) or "dot_general" (dimension_numbers)
  spec: Any
  precision: Any
  preferred_element_type: Any
  quantized: bool = False  # the kernel is a QuantizedWeight

  def base(self, x, kernel):
    """The base op exactly as the model computes it (a quantized weight: by its parts)."""
    if self.quantized:
      lab = self.labels
      return kernel.contract(f"{lab.x},{lab.k}->{lab.out}", x, self._float_base)
    return self._float_base(x, kernel)

  def base_onto(self, x, kernel, init, init_scale):
    """``init_scale·init + base`` for a quantized weight: its parts (each in the base
    op's dtype, as :meth:`base` computes it) added onto ``init`` in place."""
    lab = self.labels
    return kernel.contract(f"{lab.x},{lab.k}->{lab.out}", x, self._float_base, init,
                           init_scale)

  def base_transpose(self, dpre, kernel, x, acc, init=None):
    """``dpre`` through the base op's transpose: a contraction with the weight as stored
    (``init +`` it when given: a quantized weight adds its parts onto ``init`` in place)."""
    if self.quantized:
      lab = self.labels
      spec = f"{lab.out},{lab.k}->{lab.x}"
      return kernel.contract(spec, dpre, functools.partial(_contract, spec, acc=acc,
                                                           precision=self.precision), init)
    (dx,) = jax.linear_transpose(lambda x_: self.base(x_, kernel), x)(dpre)
    return dx if init is None else init + dx

  def _float_base(self, x, kernel):
    if self.kind == "einsum":
      return jnp.einsum(self.spec, x, kernel, precision=self.precision,
                        preferred_element_type=self.preferred_element_type)
    return lax.dot_general(x, kernel, self.spec, precision=self.precision,
                           preferred_element_type=self.preferred_element_type)

  def g_to_out(self, g):
    """``g [*B, *O]`` laid out to multiply the output (size 1 elsewhere)."""
    return _lay_out(g, self.labels.m, self.labels.out)

  def hidden(self, x, lora_a, cdt):
    """``h = x·a``: ``[*kept input axes, r]`` in the compute dtype (float32 accumulation)."""
    lab = self.labels
    acc = jnp.promote_types(jnp.float32, cdt)
    return _contract(f"{lab.x},{lab.a}->{lab.h}", x.astype(cdt), lora_a.astype(cdt), acc,
                     self.precision).astype(cdt)

  def lowrank(self, h, lora_b, cdt, acc):
    lab = self.labels
    return _contract(f"{lab.h},{lab.lb}->{lab.out}", h, lora_b.astype(cdt), acc, self.precision)

  def reduce_to_m(self, v):
    """Sum ``v [out]`` over every axis but ``(B, O)`` and lay it out as ``[*B, *O]``."""
    lab = self.labels
    kept = [l for l in lab.out if l in lab.m]
    summed = tuple(i for i, l in enumerate(lab.out) if l not in lab.m)
    v = jnp.sum(v, axis=summed) if summed else v
    perm = [kept.index(l) for l in lab.m]
    return jnp.transpose(v, perm) if perm != sorted(perm) else v


def _compute_dtype(x, kernel):
  return jnp.result_type(x, kernel)


def _native_primal(op: _Op, x, kernel, lora_a, lora_b, magnitude, scale, norm):
  y, _ = _native_forward(op, x, kernel, lora_a, lora_b, magnitude, scale, norm)
  return y


def _scale_vectors(magnitude, norm, acc):
  # a true division, so that m == n gives exactly 1 (the exact init)
  safe = jnp.maximum(norm.astype(acc), NORM_EPS)
  return magnitude.astype(acc) / safe, 1.0 / safe


def _native_forward(op: _Op, x, kernel, lora_a, lora_b, magnitude, scale, norm):
  cdt = _compute_dtype(x, kernel)
  acc = scale.dtype
  g, inv_norm = _scale_vectors(magnitude, norm, acc)
  h = op.hidden(x, lora_a, cdt)
  if op.quantized:
    # the base op's parts added onto s·h·b in place: pre without a [*out] buffer of
    # the base op's besides (the same sum, base.astype(acc) + s·h·b, element by element)
    out_dtype = jax.eval_shape(op.base, x, kernel).dtype
    pre = op.base_onto(x, kernel, op.lowrank(h, lora_b, cdt, acc).astype(acc), scale)
  else:
    base = op.base(x, kernel)
    out_dtype = base.dtype
    pre = base.astype(acc) + scale * op.lowrank(h, lora_b, cdt, acc).astype(acc)
  y = (op.g_to_out(g) * pre).astype(out_dtype)
  return y, (h, pre.astype(out_dtype), g, inv_norm)


def _native_fwd(op: _Op, x, kernel, lora_a, lora_b, magnitude, scale, norm):
  wants = tuple(any(leaf.perturbed for leaf in jax.tree.leaves(v))
                for v in (x, kernel, lora_a, lora_b, magnitude, scale, norm))
  if op.quantized and wants[1]:
    raise TypeError("kernel: a quantized weight is frozen and has no gradient; differentiate "
                    "the adapters (and x) only")
  x, kernel, lora_a, lora_b, magnitude, scale, norm = (
      custom_vjp_primal_tree_values(v)
      for v in (x, kernel, lora_a, lora_b, magnitude, scale, norm))
  y, (h, pre, g, inv_norm) = _native_forward(op, x, kernel, lora_a, lora_b, magnitude, scale,
                                             norm)
  if not (wants[4] or wants[6]):
    pre = None  # only dm and the norm's cotangent need it
  res = _NativeResiduals(x, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale,
                         jnp.zeros((), magnitude.dtype), _Static(wants))
  return y, res


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _Static:
  """Which primal inputs are differentiated: x, kernel, lora_a, lora_b, magnitude, scale, norm."""

  wants: tuple[bool, ...]


class _NativeResiduals(NamedTuple):
  """What the backward keeps: the inputs it contracts with, ``h = x·a``, ``pre``
  (only when ``dm`` or the norm's cotangent is wanted), the float32 vectors ``g`` and ``1/n``."""

  x: jax.Array
  kernel: jax.Array
  lora_a: jax.Array
  lora_b: jax.Array
  h: jax.Array
  pre: jax.Array | None
  g: jax.Array
  inv_norm: jax.Array
  scale: jax.Array
  m_proto: jax.Array  # 0-d, the magnitude's dtype
  static: _Static


def _native_bwd(op: _Op, res, dy):
  x, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, m_proto, static = res
  want_x, want_k, want_a, want_b, want_m, want_s, want_n = static.wants
  lab = op.labels
  cdt = _compute_dtype(x, kernel)
  acc = g.dtype
  dpre = (dy.astype(acc) * op.g_to_out(g)).astype(dy.dtype)
  need_t = want_x or want_a or want_s
  t = (_contract(f"{lab.out},{lab.lb}->{lab.h}", dpre.astype(cdt), lora_b.astype(cdt), acc,
                 op.precision) if need_t else None)
  dx = dk = da = db = dm = ds = dn = None
  if want_x:
    dx_lora = _contract(f"{lab.h},{lab.a}->{lab.x}", (scale * t).astype(cdt),
                        lora_a.astype(cdt), acc, op.precision)
    if op.quantized:
      # the base op's own transpose, its parts (acc) added onto dx_lora in place: one
      # [*x] accumulator, not a second one of zeros beside dx_lora
      dx = op.base_transpose(dpre, kernel, x, acc, init=dx_lora).astype(x.dtype)
    else:
      # the base op's own transpose: a contraction of dpre with W as stored
      dx_base = op.base_transpose(dpre, kernel, x, acc)
      dx = (dx_base.astype(acc) + dx_lora).astype(x.dtype)
  if want_a:
    da = scale * _contract(f"{lab.x},{lab.h}->{lab.a}", x.astype(cdt), t.astype(cdt), acc,
                           op.precision)
  if want_b:
    db = scale * _contract(f"{lab.h},{lab.out}->{lab.lb}", h, dpre.astype(cdt), acc,
                           op.precision)
  if want_m or want_n:
    dm = op.reduce_to_m(dy.astype(acc) * pre.astype(acc)) * inv_norm
    # y = (m / n) ⊙ pre: ∂L/∂n = −(m / n²)·Σ dy ⊙ pre = −g ⊙ dm (the undetached norm)
    dn = -g * dm if want_n else None
  if want_s:
    ds = jnp.sum(h.astype(acc) * t)
  if want_k:
    (dk,) = jax.linear_transpose(lambda k_: op.base(x, k_), kernel)(dpre)

  def cast(v, like):
    return None if v is None else v.astype(like.dtype)

  return (cast(dx, x), cast(dk, kernel), cast(da, lora_a), cast(db, lora_b),
          cast(dm, m_proto) if want_m else None, cast(ds, scale), dn)


_native_core = jax.custom_vjp(_native_primal, nondiff_argnums=(0,))
_native_core.defvjp(_native_fwd, _native_bwd, symbolic_zeros=True)


def _routes_to_dense(op: _Op, x, kernel, lora_a, lora_b, magnitude, backend, options) -> bool:
  """Whether the op is a plain ``x·W`` that :func:`dora_dense` computes with the same bits."""
  if op.quantized:
    return False
  lab = op.labels
  layout = lab.layout(kernel.shape)
  free = "".join(l for l in lab.x if l not in lab.k)
  if not (layout.is_matrix and lab.x == free + lab.c and lab.out == free + lab.o):
    return False
  if x.dtype != kernel.dtype or op.preferred_element_type not in (None, x.dtype):
    return False
  if len(layout.contracted) == 1:
    return True
  # several contracted axes: only where a kernel backend runs (see the module doc)
  x2 = x.reshape(-1, layout.d_in)
  how = _resolve(backend, options, x2, kernel.reshape(layout.d_in, layout.d_out),
                 lora_a.reshape(layout.d_in, -1), lora_b, magnitude)
  return how.impl != "xla"  # per shard under a mesh by the same rules as dora_dense


def _dora_op(op: _Op, x, kernel, lora_a, lora_b, magnitude, scale, *, norm, base_sq_norm,
             backend, options, detach_norm) -> jax.Array:
  check_float("x", x)
  check_float("kernel", kernel)
  check_scale(scale)
  layout = op.labels.layout(kernel.shape)
  _check_quantized(kernel, layout)
  rank = _check_adapters(layout, lora_a, lora_b, magnitude)
  want = layout.adapter_shapes(rank)[2]
  for name, value in (("norm", norm), ("base_sq_norm", base_sq_norm)):
    if value is not None and tuple(np.shape(value)) != want:
      raise ValueError(f"{name} must have shape {want}, got {tuple(np.shape(value))}")
  if not isinstance(detach_norm, bool):
    raise TypeError(f"detach_norm must be a bool, got {type(detach_norm).__name__}")
  if options is None:
    options = KernelOptions()
  elif not isinstance(options, KernelOptions):
    raise TypeError(f"options must be a dora_jax.KernelOptions or None, got "
                    f"{type(options).__name__}")
  return _compute(op, backend, options, detach_norm, x, kernel, lora_a, lora_b, magnitude, scale,
                  norm, base_sq_norm)


# One compiled program per call structure (inlined under an outer trace): an
# eager call rounds exactly as a jitted one, so the exact init holds eagerly too.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _compute(op: _Op, backend, options: KernelOptions, detach_norm: bool, x, kernel, lora_a,
             lora_b, magnitude, scale, norm, base_sq_norm):
  layout = op.labels.layout(kernel.shape)
  rank = lora_a.shape[-1]
  if _routes_to_dense(op, x, kernel, lora_a, lora_b, magnitude, backend, options):
    lead = x.shape[:len(x.shape) - len(layout.contracted)]
    flat = lambda v, shape: None if v is None else v.reshape(shape)
    y = dora_dense(x.reshape(*lead, layout.d_in), kernel.reshape(layout.d_in, layout.d_out),
                   lora_a.reshape(layout.d_in, rank), lora_b.reshape(rank, layout.d_out),
                   magnitude.reshape(layout.d_out), scale,
                   norm=flat(norm, (layout.d_out,)),
                   base_sq_norm=flat(base_sq_norm, (layout.d_out,)),
                   precision=op.precision, backend=backend, options=options,
                   detach_norm=detach_norm)
    return y.reshape(*lead, *layout.out_shape)
  acc = accumulation_dtype(x, kernel, lora_a, lora_b, magnitude)
  if norm is None:
    norm = weight_norm(kernel, lora_a, lora_b, scale, layout, base_sq_norm=base_sq_norm)
  norm = norm.astype(acc)
  if detach_norm:
    norm = lax.stop_gradient(norm)
  return _native_core(op, x, kernel, lora_a, lora_b, magnitude, jnp.asarray(scale, acc), norm)


def dora_einsum(spec: str, x: jax.Array, kernel: jax.Array, lora_a: jax.Array,
                lora_b: jax.Array, magnitude: jax.Array, scale, *, precision=None,
                preferred_element_type=None, norm: jax.Array | None = None,
                base_sq_norm: jax.Array | None = None, backend: str | None = None,
                options: KernelOptions | None = None, detach_norm: bool = True) -> jax.Array:
  """DoRA on ``jnp.einsum(spec, x, kernel)``, in the kernel's own layout.

  Args:
    spec: a two-operand equation ``"x,kernel->out"`` (an ellipsis in the input
      and output is allowed), as the base layer calls it.
    x: the input.
    kernel: the frozen weight, as stored; its axes are contracted (``C``),
      batch (``B``) or output-only (``O``) as the equation says
      (:func:`einsum_layout`). A :class:`QuantizedWeight` (QDoRA,
      :func:`dora_jax.quantized.quantize_kernel` with this layout) runs every
      product with it through its own contraction.
    lora_a: ``[*B, *C, r]``.
    lora_b: ``[*B, r, *O]``.
    magnitude: ``[*B, *O]``.
    scale: LoRA scale ``s`` (Python number or 0-d array).
    precision, preferred_element_type: as the base call passes them to
      ``jnp.einsum``; the base term is computed exactly so.
    norm: optional precomputed :func:`weight_norm` ``[*B, *O]`` (a constant
      when ``detach_norm``; otherwise its cotangent flows to what computed it).
    base_sq_norm: optional cached :func:`weight_sq_norm` ``[*B, *O]`` (a constant).
    backend, options: as :func:`dora_jax.dora_dense` (used where the op routes there).
    detach_norm: ``True`` (PEFT's semantics, the DoRA paper's §4.3 memory
      trick): the norm is a constant in the backward. ``False``: the exact
      gradient of DoRA as defined, through ``n = ‖W + s·a·b‖`` in factored
      form (``∂L/∂n = −g ⊙ dm`` back through ``‖W‖² + 2s⟨aᵀW, b⟩ + s²⟨b, aᵀa·b⟩``):
      one more contraction of ``W`` with an ``[r, *O]`` cotangent for
      ``lora_a``, ``[r, r]``-sized work otherwise, no ``[d_in, d_out]`` temporary.

  Returns:
    ``g ⊙ (einsum(x, W) + s·einsum(einsum(x, a), b))`` with ``g = m / ‖W + s·a·b‖``
    broadcast over the output's ``(B, O)`` axes, in the base op's dtype.
    Differentiable (custom VJP; the norm detached as in PEFT unless
    ``detach_norm=False``): the frozen kernel's cotangent is computed only when
    the kernel is differentiated, and no ``[d_in, d_out]`` temporary is formed.
  """
  labels = _einsum_labels(spec, np.ndim(x), np.ndim(kernel))
  op = _Op(labels, "einsum", spec, precision, preferred_element_type,
           isinstance(kernel, QuantizedWeight))
  return _dora_op(op, x, kernel, lora_a, lora_b, magnitude, scale, norm=norm,
                  base_sq_norm=base_sq_norm, backend=backend, options=options,
                  detach_norm=detach_norm)


def dora_dot_general(x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array,
                     magnitude: jax.Array, scale, dimension_numbers, *, precision=None,
                     preferred_element_type=None, norm: jax.Array | None = None,
                     base_sq_norm: jax.Array | None = None,
                     backend: str | None = None, options: KernelOptions | None = None,
                     detach_norm: bool = True) -> jax.Array:
  """DoRA on ``lax.dot_general(x, kernel, dimension_numbers)`` (the kernel is the rhs).

  Output axes follow ``dot_general``'s order (batch, the input's free axes,
  the kernel's output axes). Everything else as :func:`dora_einsum`.
  """
  labels = _dot_general_labels(dimension_numbers, np.ndim(x), np.ndim(kernel))
  dn = tuple(tuple(tuple(int(a) for a in v) for v in pair) for pair in dimension_numbers)
  op = _Op(labels, "dot_general", dn, precision, preferred_element_type,
           isinstance(kernel, QuantizedWeight))
  return _dora_op(op, x, kernel, lora_a, lora_b, magnitude, scale, norm=norm,
                  base_sq_norm=base_sq_norm, backend=backend, options=options,
                  detach_norm=detach_norm)


__all__ = ["QuantizedWeight", "WeightLayout", "dora_dot_general", "dora_einsum", "dot_general_layout",
           "einsum_layout", "init_magnitude", "merge_weight", "weight_norm", "weight_sq_norm"]

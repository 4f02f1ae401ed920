"""QDoRA: DoRA over a quantized frozen weight, with no float copy of the whole weight.

:func:`quantize_kernel` turns a float kernel (any :class:`WeightLayout`: a
Dense ``[d_in, d_out]``, gemma's ``[N, D, H]``, ...) into a
:class:`QuantizedKernel` of one of these types (float32 scales):

* ``nf4``: NormalFloat-4 indices, two per byte, one scale per block of
  ``block_size`` (default 64) along the last contracted axis (``d_in``);
* ``int4``: symmetric 4-bit integers, two per byte, blockwise likewise;
* ``int8``: symmetric 8-bit integers, one scale per output (or per block);
* ``fp8``: ``float8_e4m3fn``, one scale per output (or per block).

The rounding is qwix's (:mod:`dora_jax._qwix_compat`); the codes are stored
by this module (4-bit codes packed two per byte: qwix keeps them one per
byte). ``Ŵ``, the weight the layer computes with, is the dequantized kernel:
``codebook(code) · scale`` in float32, cast to ``dtype`` (the float kernel's
dtype by default). ``‖Ŵ‖²`` over the contracted axes (``[*B, *O]``) is
computed once, here, and kept in float32.

Every product with ``Ŵ`` (the layer's ``x·Ŵ``, DoRA's norm cross term
``aᵀŴ``, the backward's ``dpre·Ŵᵀ``) is :meth:`QuantizedKernel.contract`:
the weight is dequantized one part of its output axis at a time inside a
``lax.scan`` (at most ``chunk_bytes`` per part, and at most half the weight)
and each part is contracted at once, so the program never holds ``Ŵ`` whole.
The DoRA ops of :mod:`dora_jax.general` accept a :class:`QuantizedKernel` as
their kernel::

  qk = quantize_kernel(w, "nf4", block_size=64)                 # w [d_in, d_out]
  m = init_magnitude(qk)                                        # ‖Ŵ‖, PEFT's QDoRA init
  y = general.dora_einsum("...d,df->...f", x, qk, a, b, m, s)   # == quantized_einsum at init
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax import lax
from jax.custom_derivatives import custom_vjp_primal_tree_values

from dora_jax import general
from dora_jax.general import QuantizedWeight, WeightLayout

#: The quantized types.
QTYPES = ("nf4", "int4", "int8", "fp8")
_FOUR_BIT = ("nf4", "int4")
#: ``block_size`` of the 4-bit types when none is given (QLoRA's); int8 and
#: fp8 default to one scale per output (``block_size=None``).
DEFAULT_BLOCK_SIZE = 64
#: Bound on one dequantized part of a weight inside a contraction (bytes).
DEQUANT_CHUNK_BYTES = 32 * 2**20
#: Parts a contraction splits a weight into at least (when its output axes allow).
MIN_PARTS = 2
#: Float elements quantized at once by :func:`quantize_kernel` (qwix's nf4
#: rounding holds 16 distances per element).
QUANTIZE_CHUNK_ELEMENTS = 2**22
_FLOATS = tuple(jnp.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32, jnp.float64))


def _compat():
  from dora_jax import _qwix_compat  # imported on first use: qwix is an optional extra
  return _qwix_compat


@functools.cache
def _nf4_codebook() -> np.ndarray:
  return _compat().nf4_codebook()


# -- parts ----------------------------------------------------------------------


class _Parts(NamedTuple):
  """``count`` parts of ``size`` along kernel axis ``axis``, then one of ``rest``."""

  axis: int
  size: int
  count: int
  rest: int

  @property
  def whole(self) -> bool:
    return self.count == 1 and self.rest == 0


def _parts(shape, axes, itemsize: int, budget: int, min_parts: int) -> _Parts:
  """How to split a weight along one of ``axes``: the fewest parts of at most
  ``budget`` bytes (one index of the axis at least) and at least ``min_parts``
  where the axis allows."""
  total = math.prod(shape) * itemsize
  best = None
  for ax in axes:
    n = shape[ax]
    size = min(max(1, budget // (total // n)), -(-n // min_parts))
    if size > 128:  # whole GEMM tiles
      size = size // 128 * 128
    size = -(-n // -(-n // size))  # the same number of parts, evened out
    count, rest = divmod(n, size)
    key = (count + (rest > 0), ax)  # fewest parts, then the outermost axis
    if best is None or key < best[0]:
      best = (key, _Parts(ax, size, count, rest))
  return best[1]


# -- codes ----------------------------------------------------------------------


def _pack(nibbles: jax.Array, axis: int) -> jax.Array:
  """Two 4-bit codes per byte: element ``2i`` in the low nibble, ``2i+1`` in the high one."""
  k = nibbles.shape[axis]
  lo = lax.slice_in_dim(nibbles, 0, k, stride=2, axis=axis)
  hi = lax.slice_in_dim(nibbles, 1, k, stride=2, axis=axis)
  return lo | (hi << 4)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
  both = jnp.stack([packed & 15, packed >> 4], axis=axis + 1)
  shape = list(packed.shape)
  shape[axis] *= 2
  return both.reshape(shape)


def _store(qvalue: jax.Array, qtype: str, axis: int) -> jax.Array:
  """qwix's codes as stored here (4-bit ones packed along ``axis``)."""
  if qtype == "nf4":
    return _pack(qvalue.astype(jnp.uint8), axis)
  if qtype == "int4":  # two's-complement nibbles
    return _pack(qvalue.astype(jnp.int8).astype(jnp.uint8) & 15, axis)
  return qvalue


def _values(codes: jax.Array, qtype: str, axis: int) -> jax.Array:
  """The codes' values before scaling, float32."""
  if qtype == "nf4":
    return jnp.asarray(_nf4_codebook())[_unpack(codes, axis)]
  if qtype == "int4":
    return ((_unpack(codes, axis).astype(jnp.int8) ^ 8) - 8).astype(jnp.float32)
  return codes.astype(jnp.float32)


def _decode(codes, scale, qtype: str, axis: int, block: int | None, dtype,
            storage=None) -> jax.Array:
  """``values · scale`` (float32, the scale repeated over its block), cast to ``dtype``
  (rounded to ``storage`` first, when given)."""
  values = _values(codes, qtype, axis)
  if block is None:
    out = values * scale
  else:
    shape = values.shape
    nb = shape[axis] // block
    v = values.reshape(*shape[:axis], nb, block, *shape[axis + 1:])
    s = scale.reshape(*scale.shape[:axis], nb, 1, *scale.shape[axis + 1:])
    out = (v * s).reshape(shape)
  if storage is not None:
    # the barrier keeps the round trip: XLA's GPU compiler drops a convert pair
    # (f32 -> storage -> f32) under its default excess-precision rule
    out = lax.optimization_barrier(out.astype(storage))
  return out.astype(dtype)


# -- the weight -------------------------------------------------------------------


@struct.dataclass
class QuantizedKernel(QuantizedWeight):
  """A frozen kernel stored quantized (a pytree; :func:`quantize_kernel` makes it).

  Attributes:
    codes: the quantized values, the kernel's shape (``uint8`` with the last
      contracted axis halved for nf4/int4: two codes per byte; ``int8``;
      ``float8_e4m3fn``).
    scale: float32, the kernel's rank: one per block of ``block_size`` along
      the last contracted axis (``block_size=None``: one over all contracted
      axes), per batch and output index.
    sq_norm: ``‖Ŵ‖²`` over the contracted axes, ``[*B, *O]`` float32.
    qtype: ``"nf4"``, ``"int4"``, ``"int8"`` or ``"fp8"``.
    block_size: elements per scale along the last contracted axis, or ``None``.
    layout: the float kernel's :class:`WeightLayout`.
    dtype: the float dtype ``Ŵ`` is computed in (the float kernel's).
    chunk_bytes: bound on one dequantized part inside a contraction.
    storage_dtype: ``None``, or (after :meth:`astype`) the dtype ``Ŵ`` is
      rounded to before it is cast to ``dtype``: the weight as a float layer
      holding ``Ŵ`` in its own dtype would cast it for its contraction.
  """

  codes: jax.Array
  scale: jax.Array
  sq_norm: jax.Array
  qtype: str = struct.field(pytree_node=False)
  block_size: int | None = struct.field(pytree_node=False)
  layout: WeightLayout = struct.field(pytree_node=False)
  dtype: Any = struct.field(pytree_node=False)
  chunk_bytes: int = struct.field(pytree_node=False, default=DEQUANT_CHUNK_BYTES)
  storage_dtype: Any = struct.field(pytree_node=False, default=None)

  @property
  def blocked_axis(self) -> int:
    """The kernel axis the blocks (and 4-bit byte pairs) run along: the last contracted one."""
    return self.layout.contracted[-1]

  @property
  def nbytes(self) -> int:
    """Bytes of the frozen weight: codes and scales (the cached ``sq_norm`` apart)."""
    return int(self.codes.nbytes + self.scale.nbytes)

  def parts(self) -> _Parts:
    """How contractions split ``Ŵ`` (along one output axis)."""
    return _parts(self.layout.shape, self.layout.output, jnp.dtype(self.dtype).itemsize,
                  self.chunk_bytes, MIN_PARTS)

  def dequantize(self) -> jax.Array:
    """``Ŵ``, the whole dequantized kernel in ``dtype`` (merge, export and tests only)."""
    return _dequantize(self)

  def dequantize_part(self, axis: int, start, size: int) -> jax.Array:
    """``Ŵ[..., start:start + size, ...]`` along output ``axis`` (``start`` may be traced)."""
    codes = lax.dynamic_slice_in_dim(self.codes, start, size, axis)
    scale = lax.dynamic_slice_in_dim(self.scale, start, size, axis)
    return _decode(codes, scale, self.qtype, self.blocked_axis, self.block_size, self.dtype,
                   self.storage_dtype)

  # -- array-like behaviour, as a model's code treats its kernel ----------------------

  def astype(self, dtype) -> "QuantizedKernel":
    """The same weight computed in ``dtype`` (the codes shared): ``Ŵ`` in its own
    dtype, then cast, as a float layer casts its kernel for the contraction."""
    dtype = jnp.dtype(dtype)
    if dtype not in _FLOATS:
      raise TypeError(f"dtype: a quantized weight is computed in a float dtype, got {dtype}")
    if dtype == jnp.dtype(self.dtype):
      return self
    storage = jnp.dtype(self.dtype if self.storage_dtype is None else self.storage_dtype)
    return self.replace(dtype=dtype, storage_dtype=None if dtype == storage else storage)

  def __getitem__(self, key):
    if key is Ellipsis or key == ():
      return self
    raise TypeError(f"a quantized weight cannot be indexed (got {key!r}): it is frozen, and "
                    "enters its layer's contraction whole")

  def reshape(self, *shape) -> "QuantizedKernel":
    shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
    if tuple(int(d) for d in shape) == tuple(self.shape):
      return self
    raise NotImplementedError(
        f"a quantized weight cannot be reshaped from {tuple(self.shape)} to {tuple(shape)}: "
        "it was quantized in the shape of its contraction")

  def __jax_array__(self):
    raise TypeError(
        f"a {self.qtype} QuantizedKernel of shape {tuple(self.shape)} entered an operation "
        "other than jnp.einsum / jax.lax.dot_general (or a dtype cast); a quantized weight is "
        "never converted to a float array whole. Contract it with jnp.einsum or "
        "jax.lax.dot_general, or leave the layer out of base_dtype")

  def contract(self, spec: str, lhs: jax.Array, piece: Callable, init=None,
               init_scale=None) -> jax.Array:
    """``einsum(spec, lhs, Ŵ)`` as ``piece(lhs_part, Ŵ_part)`` over the parts of :meth:`parts`.

    ``piece`` must be linear in its first argument and close over no traced
    value. Where the split axis reaches the output, each part writes its
    slice of it; where ``spec`` contracts it, the parts (float32) are added.
    ``init`` (optional, the output's shape): the result is ``init + einsum``
    (``init_scale·init + einsum`` with a 0-d ``init_scale``), the parts
    written onto (or added to) ``init`` itself, which serves as the output
    buffer (in the dtype ``init`` and the parts promote to): a term the
    caller adds to the product anyway costs no second buffer.
    Differentiable with respect to ``lhs``, ``init`` and ``init_scale`` (the
    backward runs part by part too); the quantized weight has no gradient.
    """
    plan = _plan(spec, self, piece)
    if init is None and init_scale is not None:
      raise ValueError("init_scale scales init: pass init too")
    if init_scale is not None and jnp.ndim(init_scale) != 0:
      raise ValueError(f"init_scale must be a scalar (0-d), got shape {jnp.shape(init_scale)}")
    return _contract(plan, lhs, self, init, init_scale)

  def to_qarray(self):
    """The weight as a qwix ``QArray`` (codes unpacked: one per byte, qwix's layout)."""
    t = self.blocked_axis
    if self.qtype == "nf4":
      codes = _unpack(self.codes, t).astype(jnp.uint4)
    elif self.qtype == "int4":
      codes = ((_unpack(self.codes, t).astype(jnp.int8) ^ 8) - 8).astype(jnp.int4)
    else:
      codes = self.codes
    return _compat().qarray(codes, self.scale, self.qtype)


@jax.jit
def _dequantize(weight: QuantizedKernel) -> jax.Array:
  return _decode(weight.codes, weight.scale, weight.qtype, weight.blocked_axis,
                 weight.block_size, weight.dtype, weight.storage_dtype)


# -- contraction part by part -------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """A contraction's static part: ``spec``, the per-part function and the split."""

  spec: str
  piece: Callable
  parts: _Parts
  out_axis: int | None  # where the split axis reaches the output, or
  lhs_axis: int | None  # where the lhs holds it (the spec contracts it)


def _plan(spec: str, weight: QuantizedKernel, piece: Callable) -> _Plan:
  eq = spec.replace(" ", "")
  try:
    ins, out = eq.split("->")
    lhs, kern = ins.split(",")
  except ValueError:
    raise ValueError(f"spec must be an explicit two-operand einsum 'lhs,weight->out', "
                     f"got {spec!r}") from None
  if len(kern) != weight.ndim:
    raise ValueError(f"spec {spec!r} names {len(kern)} weight axes, the weight has "
                     f"{weight.ndim} (shape {weight.shape})")
  parts = weight.parts()
  label = kern[parts.axis]
  if label in out:
    return _Plan(eq, piece, parts, out.index(label), None)
  if label in lhs:
    return _Plan(eq, piece, parts, None, lhs.index(label))
  raise ValueError(f"spec {spec!r} sums the weight's axis {parts.axis} away")


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class _LhsType:
  shape: tuple[int, ...]
  dtype: Any


def _run(plan: _Plan, lhs, weight: QuantizedKernel, init=None, init_scale=None):
  """``init_scale·init + einsum(plan.spec, lhs, Ŵ)`` part by part (``init`` may be
  ``None``, ``init_scale`` ``None``: 1)."""
  def scaled(v):
    return v if init_scale is None else init_scale * v

  if plan.parts.whole:
    out = plan.piece(lhs, weight.dequantize())
    return out if init is None else scaled(init) + out
  p = plan.parts

  def part(start, size):
    w = weight.dequantize_part(p.axis, start, size)
    if plan.lhs_axis is not None:
      lhs_part = lax.dynamic_slice_in_dim(lhs, start, size, plan.lhs_axis)
    else:
      lhs_part = lhs
    return plan.piece(lhs_part, w)

  proto = jax.eval_shape(lambda: part(0, p.size))
  starts = jnp.arange(p.count) * p.size
  tail = p.count * p.size
  if plan.out_axis is not None:  # each part writes its slice of the output
    shape = list(proto.shape)
    shape[plan.out_axis] = weight.shape[p.axis]
    ax = plan.out_axis
    if init is None:
      def slice_of(out, start, size):
        return part(start, size)
      out = jnp.zeros(shape, proto.dtype)
    else:  # each part added to its slice of init, in place
      def slice_of(out, start, size):
        return scaled(lax.dynamic_slice_in_dim(out, start, size, ax)) + part(start, size)
      out = _as_init(init, shape, proto.dtype)

    def write(out, start):
      return lax.dynamic_update_slice_in_dim(out, slice_of(out, start, p.size), start, ax), None

    out, _ = lax.scan(write, out, starts)
    if p.rest:
      out = lax.dynamic_update_slice_in_dim(out, slice_of(out, tail, p.rest), tail, ax)
    return out

  def add(total, start):  # the spec contracts the split axis: add the parts
    return total + part(start, p.size), None

  total = (jnp.zeros(proto.shape, proto.dtype) if init is None
           else scaled(_as_init(init, proto.shape, proto.dtype)))
  out, _ = lax.scan(add, total, starts)
  return out + part(tail, p.rest) if p.rest else out


def _as_init(init, shape, dtype):
  """``init`` as the buffer the parts are written onto: the output's shape, the
  dtype it and the parts promote to."""
  if tuple(init.shape) != tuple(shape):
    raise ValueError(f"init must have the contraction's output shape {tuple(shape)}, got "
                     f"{tuple(init.shape)}")
  return init.astype(jnp.result_type(init.dtype, dtype))


def _contract_primal(plan, lhs, weight, init, init_scale):
  return _run(plan, lhs, weight, init, init_scale)


def _contract_fwd(plan, lhs, weight, init, init_scale):
  if any(leaf.perturbed for leaf in jax.tree.leaves(weight)):
    raise TypeError("weight: a quantized weight is frozen and has no gradient; differentiate "
                    "the adapters (and the input) only")
  scale_perturbed = any(leaf.perturbed for leaf in jax.tree.leaves(init_scale))
  lhs, weight, init, init_scale = custom_vjp_primal_tree_values((lhs, weight, init, init_scale))
  init_type = None if init is None else _LhsType(init.shape, init.dtype)
  # init itself is kept only for init_scale's cotangent, when that is wanted
  init_res = (init_scale, init if scale_perturbed else None)
  return (_run(plan, lhs, weight, init, init_scale),
          (weight, _LhsType(lhs.shape, lhs.dtype), init_type, init_res))


def _contract_bwd(plan, res, ct):
  """``lhs``'s cotangent, part by part: each part's ``piece`` transposed (it is linear);
  ``init``'s is ``init_scale·ct``, ``init_scale``'s ``Σ ct ⊙ init``."""
  weight, lhs_type, init_type, (init_scale, init) = res
  d_init = d_scale = None
  if init_type is not None:
    d_init = (ct if init_scale is None else init_scale * ct).astype(init_type.dtype)
  if init is not None:
    d_scale = jnp.sum(ct * init).astype(init_scale.dtype)
  p = plan.parts

  def part_vjp(start, size, ct_part):
    w = weight.dequantize() if p.whole else weight.dequantize_part(p.axis, start, size)
    shape = list(lhs_type.shape)
    if plan.lhs_axis is not None and not p.whole:
      shape[plan.lhs_axis] = size
    out, vjp = jax.vjp(lambda l: plan.piece(l, w), jnp.zeros(shape, lhs_type.dtype))
    return vjp(ct_part.astype(out.dtype))[0]  # the part's own dtype (init may promote it)

  if p.whole:
    return part_vjp(0, 0, ct), None, d_init, d_scale
  starts = jnp.arange(p.count) * p.size
  tail = p.count * p.size
  if plan.out_axis is not None:  # parts wrote output slices: their lhs cotangents add up
    def add(total, start):
      ct_part = lax.dynamic_slice_in_dim(ct, start, p.size, plan.out_axis)
      return total + part_vjp(start, p.size, ct_part).astype(jnp.float32), None

    dl, _ = lax.scan(add, jnp.zeros(lhs_type.shape, jnp.float32), starts)
    if p.rest:
      ct_tail = lax.slice_in_dim(ct, tail, ct.shape[plan.out_axis], axis=plan.out_axis)
      dl = dl + part_vjp(tail, p.rest, ct_tail).astype(jnp.float32)
    return dl.astype(lhs_type.dtype), None, d_init, d_scale

  def write(dl, start):  # parts took lhs slices: each writes its slice of the cotangent
    return lax.dynamic_update_slice_in_dim(dl, part_vjp(start, p.size, ct), start,
                                           plan.lhs_axis), None

  dl, _ = lax.scan(write, jnp.zeros(lhs_type.shape, lhs_type.dtype), starts)
  if p.rest:
    dl = lax.dynamic_update_slice_in_dim(dl, part_vjp(tail, p.rest, ct), tail, plan.lhs_axis)
  return dl, None, d_init, d_scale


_contract = jax.custom_vjp(_contract_primal, nondiff_argnums=(0,))
_contract.defvjp(_contract_fwd, _contract_bwd, symbolic_zeros=True)


# -- quantizing -------------------------------------------------------------------


def _dtype_of(value) -> np.dtype:
  return jnp.dtype(value.dtype) if hasattr(value, "dtype") else np.asarray(value).dtype


def _resolve_layout(kernel_shape, layout) -> WeightLayout:
  if layout is None:
    if len(kernel_shape) != 2:
      raise ValueError(
          f"layout: a kernel of shape {kernel_shape} needs its WeightLayout (which axes are "
          "contracted with the input): pass layout=dora_jax.general.einsum_layout(spec, "
          "x.shape, kernel.shape); only a 2-D [d_in, d_out] kernel has a default")
    return WeightLayout(kernel_shape, (0,), (), (1,))
  if not isinstance(layout, WeightLayout):
    raise TypeError(f"layout must be a dora_jax.general.WeightLayout, got {type(layout).__name__}")
  if layout.shape != kernel_shape:
    raise ValueError(f"layout is for a kernel of shape {layout.shape}, the kernel has shape "
                     f"{kernel_shape}")
  return layout


def _resolve_block(qtype: str, block_size, layout: WeightLayout) -> int | None:
  if block_size is None:
    block_size = DEFAULT_BLOCK_SIZE if qtype in _FOUR_BIT else None
    if block_size is None:
      return None
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
      or block_size < 1:
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
  block_size = int(block_size)
  axis = layout.contracted[-1]
  size = layout.shape[axis]
  where = ("d_in" if len(layout.contracted) == 1
           else f"the last contracted axis (axis {axis})")
  if size % block_size:
    raise ValueError(f"block_size={block_size} must divide {where}, which has size {size} "
                     f"(kernel shape {layout.shape})")
  if qtype in _FOUR_BIT and block_size % 2:
    raise ValueError(f"block_size={block_size} must be even for {qtype} (two 4-bit codes "
                     "per byte, paired within a block)")
  return block_size


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_part(part, qtype: str, block: int | None, layout: WeightLayout, dtype):
  """Codes, scale and ``‖Ŵ‖²`` of one slice (along an output axis) of the kernel."""
  axis = layout.contracted[-1]
  qa = _compat().quantize(part.astype(jnp.float32), qtype,
                          channelwise_axes=layout.batch + layout.output,
                          tiled_axes={axis: block} if block else {})
  # ‖Ŵ‖² must be of the stored codes: without the barrier XLA's GPU compiler
  # folds fp8's convert pair (f32 -> e4m3 -> f32) and sums unrounded values
  codes = lax.optimization_barrier(_store(qa.qvalue, qtype, axis))
  scale = qa.scale.astype(jnp.float32)
  sq = general.weight_sq_norm(_decode(codes, scale, qtype, axis, block, dtype), layout)
  return codes, scale, sq


def quantize_kernel(kernel: jax.Array, qtype: str = "nf4", *, block_size: int | None = None,
                    layout: WeightLayout | None = None, dtype=None,
                    chunk_bytes: int = DEQUANT_CHUNK_BYTES,
                    quantize_chunk: int = QUANTIZE_CHUNK_ELEMENTS) -> QuantizedKernel:
  """Quantize a frozen float kernel for QDoRA (qwix's symmetric absmax rounding).

  Args:
    kernel: the float weight as the layer stores it.
    qtype: ``"nf4"`` (NormalFloat-4), ``"int4"``, ``"int8"`` or ``"fp8"`` (e4m3).
    block_size: elements per scale along the last contracted axis (``d_in``
      for a Dense kernel); must divide it (and be even for the 4-bit types).
      ``None``: 64 for nf4/int4, one scale per output for int8/fp8.
    layout: the kernel's :class:`WeightLayout`; ``None`` for a 2-D
      ``[d_in, d_out]`` kernel.
    dtype: the float dtype the dequantized weight ``Ŵ`` is computed in
      (default: the kernel's).
    chunk_bytes: bound on one dequantized part of the weight inside a contraction.
    quantize_chunk: float elements quantized at once here (the kernel is
      quantized slice by slice along an output axis; the codes do not depend on it).

  Returns:
    A :class:`QuantizedKernel` with ``‖Ŵ‖²`` computed from the dequantized weight.

  Raises:
    ValueError: unknown ``qtype``, a ``block_size`` that does not divide
      ``d_in`` (or is odd for a 4-bit type), a ``layout`` missing or not the kernel's.
    TypeError: a kernel that is already quantized (a :class:`QuantizedWeight`,
      a qwix ``QArray``, or integer/fp8 values).
  """
  if isinstance(kernel, QuantizedWeight):
    raise TypeError(f"kernel is already quantized ({type(kernel).__name__}, qtype "
                    f"{getattr(kernel, 'qtype', '?')!r}): quantize the float weight, once")
  if not isinstance(qtype, str) or qtype not in QTYPES:
    raise ValueError(f"qtype must be one of {', '.join(map(repr, QTYPES))}, got {qtype!r}")
  if isinstance(kernel, _compat().QArray):
    raise TypeError("kernel is already quantized (a qwix QArray): pass the float weight")
  kernel_dtype = _dtype_of(kernel)
  if kernel_dtype not in _FLOATS:
    hint = (" (its values look quantized already: pass the float weight)"
            if kernel_dtype.itemsize <= 1 or jnp.issubdtype(kernel_dtype, jnp.integer) else "")
    raise TypeError(f"kernel must be a float16/bfloat16/float32/float64 weight to quantize, "
                    f"got dtype {kernel_dtype}{hint}")
  layout = _resolve_layout(tuple(int(d) for d in np.shape(kernel)), layout)
  block = _resolve_block(qtype, block_size, layout)
  dtype = kernel_dtype if dtype is None else jnp.dtype(dtype)
  if dtype not in _FLOATS:
    raise TypeError(f"dtype must be a float dtype (the dequantized weight's), got {dtype}")
  if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
    raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
  if isinstance(quantize_chunk, bool) or not isinstance(quantize_chunk, int) or quantize_chunk < 1:
    raise ValueError(f"quantize_chunk must be a positive int, got {quantize_chunk!r}")

  # slices along an output axis (blocks run along a contracted one): bounded temporaries
  p = _parts(layout.shape, layout.output, 1, quantize_chunk, 1)
  starts = [i * p.size for i in range(p.count)] + ([p.count * p.size] if p.rest else [])
  pieces = []
  for start in starts:
    size = min(p.size, layout.shape[p.axis] - start)
    part = lax.slice_in_dim(kernel, start, start + size, axis=p.axis)
    shape = list(layout.shape)
    shape[p.axis] = size
    part_layout = dataclasses.replace(layout, shape=tuple(shape))
    pieces.append(_quantize_part(part, qtype, block, part_layout, dtype))
  codes, scale, sq = (jnp.concatenate(v, axis=a) if len(v) > 1 else v[0]
                      for v, a in zip(zip(*pieces), (p.axis, p.axis,
                                                     (layout.batch + layout.output).index(p.axis))))
  return QuantizedKernel(codes, scale, sq, qtype, block, layout, dtype, chunk_bytes)


# -- the quantized base op, magnitude and merge ---------------------------------------------


@functools.partial(jax.jit, static_argnums=(0,))
def _base(op, x, weight):
  return op.base(x, weight)


def quantized_einsum(spec: str, x: jax.Array, weight: QuantizedKernel, *, precision=None,
                     preferred_element_type=None) -> jax.Array:
  """The quantized base layer: ``jnp.einsum(spec, x, Ŵ)`` without ``Ŵ`` ever whole.

  The same computation as the base term of :func:`dora_jax.general.dora_einsum`
  on ``weight`` (so a QDoRA layer at init reproduces it bit for bit).
  Differentiable with respect to ``x``.
  """
  labels = general._einsum_labels(spec, np.ndim(x), weight.ndim)
  return _quantized_op(labels, "einsum", spec, x, weight, precision, preferred_element_type)


def quantized_dot_general(x: jax.Array, weight: QuantizedKernel, dimension_numbers, *,
                          precision=None, preferred_element_type=None) -> jax.Array:
  """The quantized base layer ``lax.dot_general(x, Ŵ, dimension_numbers)`` (see :func:`quantized_einsum`)."""
  labels = general._dot_general_labels(dimension_numbers, np.ndim(x), weight.ndim)
  dn = tuple(tuple(tuple(int(a) for a in v) for v in pair) for pair in dimension_numbers)
  return _quantized_op(labels, "dot_general", dn, x, weight, precision, preferred_element_type)


def _quantized_op(labels, kind, spec, x, weight, precision, preferred_element_type):
  if not isinstance(weight, QuantizedWeight):
    raise TypeError(f"weight must be a QuantizedKernel (quantize_kernel), got "
                    f"{type(weight).__name__}")
  general._check_quantized(weight, labels.layout(weight.shape))
  op = general._Op(labels, kind, spec, precision, preferred_element_type, True)
  return _base(op, x, weight)


def init_magnitude(weight: QuantizedKernel, dtype=None) -> jax.Array:
  """PEFT's QDoRA init ``m = ‖Ŵ‖`` ``[*B, *O]`` from the cached ``‖Ŵ‖²`` (``dtype``, default float32)."""
  return general.init_magnitude(weight, weight.layout, dtype)


@functools.partial(jax.jit, static_argnums=(4,))
def _merge_weight(weight, lora_a, lora_b, magnitude, scale: float):
  return general.merge_weight(weight, lora_a, lora_b, magnitude, scale, weight.layout)


def merge_weight(weight: QuantizedKernel, lora_a: jax.Array, lora_b: jax.Array,
                 magnitude: jax.Array, scale, *, requantize: bool = False
                 ) -> jax.Array | QuantizedKernel:
  """The merged float kernel ``g ⊙ (Ŵ + s·a·b)`` in ``weight.dtype`` (serving).

  ``requantize=True`` quantizes it again with the same qtype, block size and
  layout (the merged model then carries the quantization error of the
  merged weight).
  """
  merged = _merge_weight(weight, lora_a, lora_b, magnitude, float(scale))
  if not requantize:
    return merged
  return quantize_kernel(merged, weight.qtype, block_size=weight.block_size,
                         layout=weight.layout, chunk_bytes=weight.chunk_bytes)


__all__ = ["DEFAULT_BLOCK_SIZE", "DEQUANT_CHUNK_BYTES", "QTYPES", "QuantizedKernel",
           "init_magnitude", "merge_weight", "quantize_kernel", "quantized_dot_general",
           "quantized_einsum"]

"""Partition rules: the fused kernels per shard under a device mesh.

``pallas_call`` has no partitioning rule of its own, so GSPMD would gather its
operands onto every device. The kernel backends' ``forward``, ``backward`` and
the one-pass norm are therefore wrapped in ``jax.experimental.custom_partitioning``
ops: once propagation has chosen the operands' shardings, :func:`layout_of`
reads them, the partitioner reshards the operands to the rule's layout, and
each device runs the kernels on its blocks, with the rule's collectives.

Why ``custom_partitioning`` and not a ``shard_map`` built at trace time: under
``jax.jit`` on an ``Auto`` mesh the operands are tracers whose shardings are
not known until propagation runs after tracing, so a trace-time ``shard_map``
would have to guess its ``in_specs`` (and force reshards when it guessed
wrong). ``custom_partitioning`` is the hook where the partitioner hands the
chosen shardings back, and its rule may still ask for a different layout.

Dimensions (``x2 [T, d_in]``, ``kernel W [d_in, d_out]``) and the rule, per
mesh axis of the kernel's and the activations' specs:

* an axis of ``W``'s ``d_out`` (column-parallel): kept; every shard is a
  complete DoRA layer on its columns; the backward's ``dx``, ``da`` (and
  ``ds``) contract ``d_out`` and are summed over it.
* an axis of ``W``'s ``d_in`` that does not split ``T`` (row-parallel): kept;
  the shards' ``x·W + s·(x·a)·b`` are partial sums, reduced with one
  all-reduce of ``y = g ⊙ pre`` (``g`` is linear, so it is applied before the
  reduction; after it when ``pre`` is kept, ``y = g ⊙ pre + bias`` then being
  elementwise), ``h = x·a`` with one of ``[T, r]``.
* an axis of ``W`` that also splits ``T`` (FSDP): ``W`` is gathered over it
  (the base layer's own all-gather for ``x·W``) and the kernels run on the
  gathered block; the reductions over ``T`` are summed over it.
* an axis splitting ``T`` only (data parallel): kept; reductions over ``T``
  (``db``, ``dm``, ``dbias``, ``dW``, ``da``, ``ds``) are summed over it.

The norm (:func:`column_norm`): every axis of ``W``'s ``d_in`` stays split;
each shard's partial ``Σ_i (W + s·a·b)²`` is reduced with one all-reduce of
``d_out`` elements; none when ``d_in`` is not split.

Shapes a shard's tiles do not divide run the XLA twin on that shard (logged
once); calls :func:`no_rule` refuses at trace time run the XLA path.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dora_jax import backend as backend_lib
from dora_jax.backend import KernelOptions
from dora_jax.compose import Grads, Residuals, Wants, magnitude_grad
from dora_jax.kernels._common import resolve_interpret

_log = logging.getLogger("dora_jax")
_tile_fallbacks_logged: set[str] = set()  # log each per-shard fallback once per process

Axes = tuple[str, ...]


def _axes(entry) -> Axes:
  """The mesh axes of one ``PartitionSpec`` entry."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(axes: Axes):
  """``axes`` as one ``PartitionSpec`` entry."""
  return None if not axes else axes[0] if len(axes) == 1 else axes


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a call's dimensions are split, per mesh axis (each axis in one field at most).

  ``tokens`` split ``T`` (the activations' rows); ``rows`` split ``d_in`` and
  stay split (partial products); ``cols`` split ``d_out``; ``gathered`` split
  the caller's ``W`` but are gathered for the kernels (they also split ``T``).
  """

  tokens: Axes = ()
  rows: Axes = ()
  cols: Axes = ()
  gathered: Axes = ()

  def spec(self, *dims: Axes) -> P:
    return P(*(_entry(d) for d in dims))

  def shard_shape(self, mesh: Mesh, tokens: int, d_in: int, d_out: int) -> tuple[int, int, int]:
    """``(T, d_in, d_out)`` of one shard's blocks."""
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    return tokens // size(self.tokens), d_in // size(self.rows), d_out // size(self.cols)


def layout_of(x_spec: P, kernel_spec: P) -> Layout:
  """The rule's :class:`Layout` from the shardings propagation gave ``x2`` and ``W``."""
  x_spec, kernel_spec = tuple(x_spec) + (None,) * 2, tuple(kernel_spec) + (None,) * 2
  tokens = _axes(x_spec[0])
  w_in, w_out = _axes(kernel_spec[0]), _axes(kernel_spec[1])
  gathered = tuple(a for a in w_in + w_out if a in tokens)
  return Layout(tokens=tokens, rows=tuple(a for a in w_in if a not in tokens),
                cols=tuple(a for a in w_out if a not in tokens), gathered=gathered)


def no_rule(tokens: int, d_in: int, d_out: int, *, devices: int = 1) -> str | None:
  """Why a call traced under the current mesh has no partition rule, or ``None``.

  The rules need an ``Auto`` mesh (no manual axes: inside ``jax.shard_map``
  the kernels already run per shard) whose device count (``devices`` outside
  any mesh context: the inputs' placement) divides ``T``, ``d_in`` and
  ``d_out`` (any layout then splits them evenly).
  """
  for name, size in (("tokens", tokens), ("d_in", d_in), ("d_out", d_out), ("devices", devices)):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f"{name} must be a positive int, got {size!r}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _uneven(tokens, d_in, d_out, devices)
  kinds = {name: kind for name, size, kind in zip(mesh.axis_names, mesh.axis_sizes,
                                                  mesh.axis_types) if size > 1}
  manual = [n for n, k in kinds.items() if k == AxisType.Manual]
  if manual:
    return (f"mesh axes {manual} are manual and {[n for n in kinds if n not in manual]} are not "
            "(no partition rule for partly manual meshes)")
  explicit = [n for n, k in kinds.items() if k == AxisType.Explicit]
  if explicit:
    return f"mesh axes {explicit} are Explicit (the partition rules need AxisType.Auto axes)"
  return _uneven(tokens, d_in, d_out, math.prod(mesh.axis_sizes))


def _uneven(tokens: int, d_in: int, d_out: int, devices: int) -> str | None:
  for name, size in (("T", tokens), ("d_in", d_in), ("d_out", d_out)):
    if size % devices:
      return (f"{name}={size} is not a multiple of the {devices} devices "
              "(no partition rule for uneven shards)")
  return None


def _mesh_axes(mesh: Mesh, axes: Axes) -> Axes:
  return tuple(a for a in axes if mesh.shape[a] > 1)


def _psum(value, axes: Axes):
  return value if value is None or not axes else lax.psum(value, axes)


def _shard_impl(impl: str, mesh: Mesh, layout: Layout, shape: tuple[int, int, int]) -> str:
  """``impl``, or ``"xla"`` where one shard's blocks are not whole tiles (logged once)."""
  supported = backend_lib.implementation(impl).shapes_supported
  local = layout.shard_shape(mesh, *shape)
  if supported is None or supported(*local):
    return impl
  key = f"{impl}:{local}"
  if key not in _tile_fallbacks_logged:
    _tile_fallbacks_logged.add(key)
    _log.warning("dora_jax: backend=%r cannot tile one shard's blocks T=%d, d_in=%d, d_out=%d; "
                 "using the XLA path on each shard", impl, *local)
  return impl if supported is None else "xla"


def _interpreted_mosaic(impl: str, options: KernelOptions) -> bool:
  """Whether ``impl`` is ``"mosaic"`` in interpret mode. Mosaic GPU's interpreter
  runs its kernels through ordered ``io_callback``s, whose effect tokens the
  per-shard lowering of ``custom_partitioning`` does not thread (jax 0.11.2:
  ``KeyError: OrderedIOEffect``): there the GEMM kernels (``scaled_matmul``)
  run XLA on each shard; the Pallas (Triton) ones still run per shard."""
  if impl != "mosaic" or not resolve_interpret(options.interpret):
    return False
  if "mosaic-interpret" not in _tile_fallbacks_logged:
    _tile_fallbacks_logged.add("mosaic-interpret")
    _log.warning("dora_jax: Mosaic GPU's interpreter does not lower inside a partitioned "
                 "program; its GEMMs run XLA on each shard (interpret mode only)")
  return True


def _named(mesh: Mesh, specs: Sequence[P]) -> tuple[NamedSharding, ...]:
  return tuple(NamedSharding(mesh, s) for s in specs)


def _rule(operands: str, results: str) -> str:
  return f"{operands} -> {results}"


# -- forward ------------------------------------------------------------------------

@functools.cache
def _forward_op(impl: str, options: KernelOptions, want_pre: bool, has_bias: bool):
  """``(x2, W, a, b, g, scale[, bias]) -> (y[, pre], h)`` as a custom-partitioned op."""

  def run(name, x2, kernel, lora_a, lora_b, g, scale, bias):
    fwd = backend_lib.implementation(name).forward
    y, pre, h = fwd(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre=want_pre,
                    options=options)
    return (y, pre, h) if want_pre else (y, h)

  @custom_partitioning
  def op(x2, kernel, lora_a, lora_b, g, scale, *bias):
    return run(impl, x2, kernel, lora_a, lora_b, g, scale, bias[0] if bias else None)

  def partition(mesh, arg_shapes, result_shape):
    layout = layout_of(arg_shapes[0].sharding.spec, arg_shapes[1].sharding.spec)
    tokens, d_in = arg_shapes[0].shape
    name = _shard_impl(impl, mesh, layout, (tokens, d_in, arg_shapes[1].shape[1]))
    name = "xla" if _interpreted_mosaic(name, options) else name
    rows = _mesh_axes(mesh, layout.rows)
    t, k, n = layout.tokens, layout.rows, layout.cols

    def lower(x2, kernel, lora_a, lora_b, g, scale, *bias):
      bias = bias[0] if bias else None
      if not rows:
        return run(name, x2, kernel, lora_a, lora_b, g, scale, bias)
      # partial sums over the split d_in: g is linear, the bias is added once
      if want_pre:
        _, pre, h = run(name, x2, kernel, lora_a, lora_b, g, scale, None)
        pre, h = lax.psum((pre, h), rows)
        y = g * pre.astype(g.dtype)
        y = (y if bias is None else y + bias.astype(g.dtype)).astype(x2.dtype)
        return y, pre, h
      y, h = run(name, x2, kernel, lora_a, lora_b, g, scale, None)
      y, h = lax.psum((y, h), rows)
      if bias is not None:
        y = (y.astype(g.dtype) + bias.astype(g.dtype)).astype(x2.dtype)
      return y, h

    args = [layout.spec(t, k), layout.spec(k, n), layout.spec(k, ()), layout.spec((), n),
            layout.spec(n), P()] + [layout.spec(n)] * has_bias
    results = [layout.spec(t, n)] * (2 if want_pre else 1) + [layout.spec(t, ())]
    return mesh, lower, _named(mesh, results), _named(mesh, args)

  outs = "t n, t n, t r" if want_pre else "t n, t r"
  op.def_partition(partition, sharding_rule=_rule(
      "t k, w n, w r, r n, n, " + ", n" * has_bias, outs))
  return op


def forward(impl: str):
  """The partitioned ``forward`` of backend ``impl`` (signature of
  :func:`dora_jax.compose.forward_xla`)."""

  def forward_partitioned(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True,
                          options: KernelOptions = KernelOptions()):
    op = _forward_op(impl, options, want_pre, bias is not None)
    out = op(x2, kernel, lora_a, lora_b, g, scale, *(() if bias is None else (bias,)))
    return (out[0], out[1], out[2]) if want_pre else (out[0], None, out[1])

  forward_partitioned.__name__ = f"forward_{impl}_partitioned"
  return forward_partitioned


# -- backward -----------------------------------------------------------------------

_RES_FACTORS = ("t k", "w n", "w r", "r n", "t r", "t n", "t n", "n", "n", "")
_GRAD_FACTORS = ("t k", "w n", "w r", "r n", "n", "", "n")


@functools.cache
def _backward_op(impl: str, options: KernelOptions, wants: Wants, present: tuple[bool, ...]):
  """``(*residuals present, dy) -> wanted grads`` as a custom-partitioned op.

  ``present[i]``: the ``i``-th field of :class:`Residuals` is an array (``pre``
  or ``y`` may be ``None``); the results are the fields of :class:`Grads` that
  ``wants`` asks for, in order.
  """
  wanted = tuple(wants)

  def residuals(arrays):
    it = iter(arrays)
    return Residuals(*(next(it) if p else None for p in present))

  def run(name, arrays, dy):
    grads = backend_lib.implementation(name).backward(residuals(arrays), dy, wants,
                                                      options=options)
    return tuple(v for v, w in zip(grads, wanted) if w)

  # see _interpreted_mosaic: the Mosaic dx GEMM off, the Pallas scale_reduce kept
  shard_options = options
  if impl == "mosaic" and resolve_interpret(options.interpret):
    shard_options = dataclasses.replace(options, mosaic_dx=False)

  @custom_partitioning
  def op(*arrays):
    return run(impl, arrays[:-1], arrays[-1])

  def partition(mesh, arg_shapes, result_shape):
    layout = layout_of(arg_shapes[0].sharding.spec, arg_shapes[1].sharding.spec)
    tokens, d_in = arg_shapes[0].shape
    name = _shard_impl(impl, mesh, layout, (tokens, d_in, arg_shapes[1].shape[1]))
    t, k, n = layout.tokens, layout.rows, layout.cols
    tokens_axes, cols, rows = (_mesh_axes(mesh, a) for a in (t, n, k))
    # what each cotangent is summed over: d_out for those built from t = dpre·bᵀ, T for the rest
    summed = {"x": cols, "kernel": tokens_axes, "lora_a": cols + tokens_axes,
              "lora_b": tokens_axes, "magnitude": tokens_axes, "scale": cols + tokens_axes,
              "bias": tokens_axes}

    def lower(*arrays):
      res, dy = residuals(arrays[:-1]), arrays[-1]
      if rows and wants.magnitude and res.pre is None:
        grads = _row_split_y_residual(name, res, dy, wants, shard_options, rows)
      else:
        grads = backend_lib.implementation(name).backward(res, dy, wants, options=shard_options)
      by_axes: dict[Axes, list[str]] = {}
      for field in Grads._fields:
        if getattr(grads, field) is not None:
          by_axes.setdefault(summed[field], []).append(field)
      values = grads._asdict()
      for axes, fields in by_axes.items():  # one all-reduce per set of axes
        for field, value in zip(fields, _psum(tuple(values[f] for f in fields), axes)):
          values[field] = value
      return tuple(values[f] for f, w in zip(Grads._fields, wanted) if w)

    res_specs = [layout.spec(t, k), layout.spec(k, n), layout.spec(k, ()), layout.spec((), n),
                 layout.spec(t, ()), layout.spec(t, n), layout.spec(t, n), layout.spec(n),
                 layout.spec(n), P()]
    args = [s for s, p in zip(res_specs, present) if p] + [layout.spec(t, n)]
    grad_specs = [layout.spec(t, k), layout.spec(k, n), layout.spec(k, ()), layout.spec((), n),
                  layout.spec(n), P(), layout.spec(n)]
    results = [s for s, w in zip(grad_specs, wanted) if w]
    return mesh, lower, _named(mesh, results), _named(mesh, args)

  operands = ", ".join(f for f, p in zip(_RES_FACTORS, present) if p) + ", t n"
  results = ", ".join(f for f, w in zip(_GRAD_FACTORS, wanted) if w)
  op.def_partition(partition, sharding_rule=_rule(operands, results))
  return op


def _row_split_y_residual(name: str, res: Residuals, dy, wants: Wants, options, rows: Axes):
  """The backward on one row block when ``y`` is the ``dm`` residual: the zero-magnitude
  columns' ``Σ_T dy ⊙ pre`` needs the whole ``x·W``, summed over ``rows`` here."""
  grads = backend_lib.implementation(name).backward(res, dy, wants._replace(magnitude=False),
                                                    options=options)
  acc = res.g.dtype

  def recompute(flags):
    cdt = res.x2.dtype
    base = jnp.dot(res.x2, res.kernel.astype(cdt), preferred_element_type=acc)
    lora = jnp.dot(res.h, res.lora_b.astype(cdt), preferred_element_type=acc)
    dy32 = dy.astype(acc)
    total = lax.psum(jnp.sum(dy32 * base, axis=0), rows) + res.scale * jnp.sum(dy32 * lora, axis=0)
    return jnp.where(flags, total, 0.0)

  return grads._replace(magnitude=magnitude_grad(res, dy, recompute_flagged=recompute))


def backward(impl: str):
  """The partitioned ``backward`` of backend ``impl`` (signature of
  :func:`dora_jax.compose.backward_xla`)."""

  def backward_partitioned(res: Residuals, dy, wants: Wants, *,
                           options: KernelOptions = KernelOptions()) -> Grads:
    present = tuple(v is not None for v in res)
    op = _backward_op(impl, options, Wants(*wants), present)
    out = iter(op(*(v for v in res if v is not None), dy))
    return Grads(*(next(out) if w else None for w in wants))

  backward_partitioned.__name__ = f"backward_{impl}_partitioned"
  return backward_partitioned


# -- the one-pass norm ----------------------------------------------------------------

#: Shard norms from this size up are squared in units of ``2**(2·_BIG_SHIFT)``:
#: a float32 square overflows from 2**64 (about 1.8e19), and the kernel's own
#: per-column rescale (above 2**48) keeps a shard's norm finite to 3.4e38.
_BIG_NORM = 2.0**60
_BIG_SHIFT = 70


def _combine_row_norms(norm: jax.Array, rows: Axes) -> jax.Array:
  """``√Σ_shards norm²`` over the mesh axes ``rows`` without overflow.

  The squares go in two bins, one all-reduce of ``[2, d_out]``: norms below
  2**60 as they are (at most 2**120 each), the others times 2**-70 first (at
  most 2**116 each: room for 2**11 shards). A max-scaled sum would need a
  ``pmax`` before the ``psum``, two dependent all-reduces.
  """
  big = norm >= _BIG_NORM
  shrunk = norm * 2.0**-_BIG_SHIFT
  bins = jnp.stack([jnp.where(big, 0.0, jnp.square(norm)), jnp.where(big, jnp.square(shrunk), 0.0)])
  small, large = lax.psum(bins, rows)
  # small·2**-140 in two steps: the constant alone is below float32's normal range
  scaled = 2.0**_BIG_SHIFT * jnp.sqrt(large + small * 2.0**-_BIG_SHIFT * 2.0**-_BIG_SHIFT)
  return jnp.where(large > 0, scaled, jnp.sqrt(small))

@functools.cache
def _column_norm_op(interpret: bool):
  from dora_jax.kernels import column_norm as column_norm_lib

  def run(kernel, lora_a, lora_b, scale):
    return column_norm_lib.column_norm(kernel, lora_a, lora_b, scale, interpret=interpret)

  @custom_partitioning
  def op(kernel, lora_a, lora_b, scale):
    return run(kernel, lora_a, lora_b, scale)

  def partition(mesh, arg_shapes, result_shape):
    spec = tuple(arg_shapes[0].sharding.spec) + (None,) * 2
    k, n = _axes(spec[0]), _axes(spec[1])
    rows = _mesh_axes(mesh, k)

    def lower(kernel, lora_a, lora_b, scale):
      norm = run(kernel, lora_a, lora_b, scale)
      return _combine_row_norms(norm, rows) if rows else norm

    layout = Layout()
    args = [layout.spec(k, n), layout.spec(k, ()), layout.spec((), n), P()]
    return mesh, lower, NamedSharding(mesh, layout.spec(n)), _named(mesh, args)

  op.def_partition(partition, sharding_rule=_rule("k n, k r, r n, ", "n"),
                   reduction_factors=("k",))
  return op


def column_norm(kernel, lora_a, lora_b, scale, *, interpret: bool) -> jax.Array:
  """:func:`dora_jax.kernels.column_norm.column_norm` ``[d_out]`` float32, partitioned."""
  return _column_norm_op(bool(interpret))(
      lax.stop_gradient(kernel), lax.stop_gradient(lora_a), lax.stop_gradient(lora_b),
      lax.stop_gradient(jnp.asarray(scale, jnp.float32)))


__all__ = ["Layout", "backward", "column_norm", "forward", "layout_of", "no_rule"]

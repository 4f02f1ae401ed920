"""Sharded DoRA: adapter shardings derived from the base kernel's, and mesh placement.

DoRA runs under ``jax.jit`` on a device mesh like any Flax layer: the XLA path
is partitioned by GSPMD. The only question is where the adapters live. The
rule is positional, from the kernel's ``PartitionSpec``
``kernel [*in_shape, *out_shape] -> P(*in_axes, *out_axes)``::

  lora_a     [*in_shape, r]    P(*in_axes, None)    shards with the kernel's rows
  lora_b     [r, *out_shape]   P(None, *out_axes)   shards with the kernel's columns
  magnitude  [*out_shape]      P(*out_axes)         one entry per output column

so every adapter block sits on the devices that hold the matching kernel block:

=============== ===================== =================== ================ ==============
layout          kernel                lora_a              lora_b           magnitude
=============== ===================== =================== ================ ==============
column-parallel ``P(None, 'tp')``     ``P(None, None)``   ``P(None, 'tp')`` ``P('tp')``
row-parallel    ``P('tp', None)``     ``P('tp', None)``   ``P(None, None)`` ``P(None)``
FSDP            ``P('fsdp', None)``   ``P('fsdp', None)`` ``P(None, None)`` ``P(None)``
FSDP × TP       ``P('fsdp', 'tp')``   ``P('fsdp', None)`` ``P(None, 'tp')`` ``P('tp')``
=============== ===================== =================== ================ ==============

With the kernel split over ``d_in`` (row-parallel, FSDP), the factored norm's
terms ``‖W‖² [d_out]``, ``aᵀW [r, d_out]`` and ``aᵀa [r, r]`` are partial sums
on each device and GSPMD adds them with one all-reduce of
``O(d_out·r + r²)`` elements; no ``[d_in, d_out]`` value (``W`` gathered, or
``a·b``) is formed for the norm. (FSDP's own all-gather of ``W`` for ``x·W``
is the base layer's, not DoRA's.) With the kernel split over ``d_out``
(column-parallel) the norm needs no communication at all.

Typical use::

  mesh = dora_jax.sharding.make_mesh((4, 2), ("fsdp", "tp"))
  with jax.set_mesh(mesh):
    model = Model(rngs=nnx.Rngs(0))   # kernels built with nnx.with_partitioning(...)
  dora_jax.apply_dora(model, targets=..., rank=16, alpha=32, rngs=nnx.Rngs(1))
  dora_jax.sharding.shard_model(model, mesh)      # adapters annotated and placed
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)  # sharded moments
  with jax.set_mesh(mesh):
    loss = train_step(model, optimizer, batch)    # an nnx.jit step

Requirements: mesh axes of type ``AxisType.Auto`` (GSPMD; :func:`make_mesh`
builds such a mesh). Under explicit-axes meshes JAX asks every contraction
over a sharded axis for an ``out_sharding``, which the layers do not pass.
Call sharded steps inside ``jax.set_mesh(mesh)``: that is how
``backend="pallas"``/``"mosaic"``/``"auto"`` see at trace time that the call
is partitioned and run the fused kernels per shard by the partition rules of
:mod:`dora_jax.kernels.partition` for the layouts above (XLA where no rule
applies; see :mod:`dora_jax.kernels.dispatch`).
"""

from __future__ import annotations

import math
import re
from typing import Any, NamedTuple, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dora_jax.nnx import DoRALayer

#: One entry of a ``PartitionSpec``: a mesh (or logical) axis name, a tuple of
#: them, or ``None`` (replicated along that dimension).
AxisEntry = str | tuple[str, ...] | None

#: The adapter Variables whose shardings :func:`adapter_partition_specs` derives.
ADAPTER_NAMES = ("lora_a", "lora_b", "magnitude")


def _spec_entries(spec: PartitionSpec | Sequence[AxisEntry] | None) -> tuple[AxisEntry, ...]:
  """The entries of a kernel spec, each ``None``, an axis name or a tuple of names."""
  if spec is None:
    return ()
  if isinstance(spec, (str, bytes)):
    raise TypeError(f"kernel_spec must be a PartitionSpec or a sequence of axis entries, got the "
                    f"string {spec!r} (for one sharded dimension write P({spec!r}) or "
                    f"P(None, {spec!r}))")
  try:
    entries = tuple(spec)
  except TypeError:
    raise TypeError(f"kernel_spec must be a PartitionSpec, a sequence of axis entries or None, "
                    f"got {type(spec).__name__}") from None
  for entry in entries:
    names = entry if isinstance(entry, tuple) else (entry,)
    if (entry is not None and entry is not PartitionSpec.UNCONSTRAINED
        and not all(isinstance(n, str) for n in names)):
      raise TypeError(f"kernel_spec entries must be None, an axis name or a tuple of axis "
                      f"names, got {entry!r} in {spec!r}")
  return entries


def _entries(spec: PartitionSpec | Sequence[AxisEntry] | None, ndim: int) -> tuple[AxisEntry, ...]:
  """``spec`` as a tuple of exactly ``ndim`` entries (trailing ``None`` padding)."""
  entries = _spec_entries(spec)
  if len(entries) > ndim:
    raise ValueError(f"kernel spec {spec} has more entries than the kernel's {ndim} dims")
  return entries + (None,) * (ndim - len(entries))


def adapter_partition_specs(kernel_spec: PartitionSpec | Sequence[AxisEntry] | None, *,
                            in_ndim: int = 1, out_ndim: int | None = None
                            ) -> dict[str, PartitionSpec]:
  """The ``PartitionSpec`` of each DoRA adapter, from the base kernel's.

  Args:
    kernel_spec: the kernel's spec, ``[*in_shape, *out_shape]`` (e.g. a Dense
      kernel ``[d_in, d_out]``): a ``PartitionSpec``, a tuple of axis names
      (mesh axes or logical names; they are carried over verbatim) or ``None``
      (replicated). Missing trailing entries mean ``None``.
    in_ndim: how many leading kernel dims are contracted (``len(in_shape)``).
    out_ndim: how many trailing kernel dims are outputs; default: the rest of
      ``kernel_spec`` (at least 1).

  Returns:
    ``{"lora_a": P(*in_axes, None), "lora_b": P(None, *out_axes),
    "magnitude": P(*out_axes)}`` for ``lora_a [*in_shape, r]``,
    ``lora_b [r, *out_shape]`` and ``magnitude [*out_shape]``.

  Example:
    >>> from jax.sharding import PartitionSpec as P
    >>> specs = adapter_partition_specs(P(None, "tp"))   # column-parallel
    >>> specs["lora_a"], specs["lora_b"], specs["magnitude"]
    (PartitionSpec(None, None), PartitionSpec(None, 'tp'), PartitionSpec('tp',))
  """
  if in_ndim < 1:
    raise ValueError(f"in_ndim must be >= 1, got {in_ndim}")
  given = len(_spec_entries(kernel_spec))
  if out_ndim is None:
    out_ndim = max(given - in_ndim, 1)
  if out_ndim < 1:
    raise ValueError(f"out_ndim must be >= 1, got {out_ndim}")
  entries = _entries(kernel_spec, in_ndim + out_ndim)
  in_axes, out_axes = entries[:in_ndim], entries[in_ndim:]
  return {
      "lora_a": PartitionSpec(*in_axes, None),
      "lora_b": PartitionSpec(None, *out_axes),
      "magnitude": PartitionSpec(*out_axes),
  }


def _flat_out_spec(out_axes: tuple[AxisEntry, ...]) -> PartitionSpec:
  """Spec of a ``[d_out]`` vector flattened from ``out_shape``: exact only when the
  leading output axis alone is sharded (row-major flattening keeps its blocks)."""
  if all(e is None for e in out_axes[1:]):
    return PartitionSpec(out_axes[0])
  return PartitionSpec(None)


def kernel_partition_spec(layer: DoRALayer) -> tuple[AxisEntry, ...]:
  """The kernel's spec entries, one per axis as stored: its ``out_sharding``
  metadata (possibly logical names), else the spec of its current
  ``NamedSharding``, else replicated."""
  ndim = len(layer.kernel.get_value().shape)
  meta = layer.kernel.get_metadata()
  spec = meta.get("out_sharding")
  if not spec:
    sharding = getattr(layer.kernel[...], "sharding", None)
    spec = sharding.spec if isinstance(sharding, NamedSharding) else None
  return _entries(spec, ndim)


def _operand_entries(entries: tuple[AxisEntry, ...], chain) -> tuple[AxisEntry, ...] | None:
  """The stored kernel's entries carried to the op's kernel operand through the
  ops between them (an op-level site's ``chain``): dtype casts keep them, a
  transpose permutes them; a reshape mixes axes (``None``: not derivable)."""
  for kind, arg in chain:
    if kind == "transpose":
      entries = tuple(entries[i] for i in arg)
    elif kind == "reshape":
      return None
  return entries


def layer_partition_specs(layer: DoRALayer) -> dict[str, PartitionSpec]:
  """The spec of each adapter Variable of one adapted weight, plus its norm cache
  (and its cached kernel column norms, when stored), in any kernel layout.

  With the layout's kernel axes split into batch ``B``, contracted ``C`` and
  output ``O`` axes (in kernel order), ``lora_a [*B, *C, r]`` takes
  ``P(*B, *C, None)``, ``lora_b [*B, r, *O]`` ``P(*B, None, *O)``, ``magnitude
  [*B, *O]`` ``P(*B, *O)`` and the norms ``[*B, d_out]`` ``P(*B, o)`` (``o``:
  the leading output axis's entry when it alone is sharded, else ``None``). A
  weight reshaped between its storage and its op gets replicated adapters.
  """
  layout = layer.layout
  chain = getattr(getattr(layer, "spec", None), "chain", ())
  entries = _operand_entries(kernel_partition_spec(layer), chain)
  if entries is None or len(entries) != len(layout.shape):
    entries = (None,) * len(layout.shape)
  pick = lambda axes: tuple(entries[i] for i in axes)
  batch, inputs, outputs = pick(layout.batch), pick(layout.contracted), pick(layout.output)
  flat = _flat_out_spec(outputs)
  specs = {"lora_a": PartitionSpec(*batch, *inputs, None),
           "lora_b": PartitionSpec(*batch, None, *outputs),
           "magnitude": PartitionSpec(*batch, *outputs),
           "norm_cache": PartitionSpec(*batch, *flat)}
  specs["norm_stamp"] = PartitionSpec(None)
  if getattr(layer, "base_sq_norm", None) is not None:  # see surgery.cache_base_norms
    specs["base_sq_norm"] = specs["norm_cache"]
  return specs


def annotate_adapters(model: nnx.Module, mesh: Mesh | None = None) -> dict[str, dict[str, PartitionSpec]]:
  """Give every DoRA layer's adapters ``out_sharding`` metadata derived from its kernel.

  The metadata is what :func:`flax.nnx.get_partition_spec` reads, so it also
  shards anything built from the adapters later (``nnx.Optimizer`` copies it
  onto its moment Variables). The kernel's ``sharding_rules`` metadata (logical
  axis rules), if any, is copied along; ``mesh`` (if given) is recorded as the
  Variables' ``mesh`` metadata so Flax can place derived Variables outside a
  ``jax.set_mesh`` context. In place; the values are not moved (see
  :func:`shard_model`).

  Returns:
    ``{layer path: {variable name: spec}}`` (path ``""`` when ``model`` is itself
    a DoRA layer).
  """
  from dora_jax.surgery import dora_layers  # surgery imports the layers; avoid a cycle
  out = {}
  for path, layer in dora_layers(model):
    specs = layer_partition_specs(layer)
    rules = layer.kernel.get_metadata().get("sharding_rules")
    for name, spec in specs.items():
      extra: dict[str, Any] = {}
      if rules is not None:
        extra["sharding_rules"] = rules
      if mesh is not None:
        extra["mesh"] = mesh
      getattr(layer, name).set_metadata(out_sharding=tuple(spec), **extra)
    out[path] = specs
  return out


def check_mesh(mesh: Mesh) -> None:
  """Raise ``ValueError`` unless every axis of ``mesh`` is ``AxisType.Auto`` (GSPMD)."""
  bad = [n for n, t in zip(mesh.axis_names, mesh.axis_types) if t != AxisType.Auto]
  if bad:
    raise ValueError(
        f"mesh axes {bad} are not AxisType.Auto: DoRA layers are partitioned by GSPMD; "
        "build the mesh with axis_types=(jax.sharding.AxisType.Auto, ...) "
        "(dora_jax.sharding.make_mesh does)")


def make_mesh(shape: Sequence[int], axis_names: Sequence[str], *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """``jax.make_mesh`` with ``AxisType.Auto`` axes (GSPMD), e.g. ``((4, 2), ("fsdp", "tp"))``.

  Raises:
    TypeError: ``axis_names`` is a bare string or holds non-strings.
    ValueError: repeated axis names, or ``shape`` and ``axis_names`` of different lengths.
  """
  if isinstance(axis_names, (str, bytes)):
    raise TypeError(f"axis_names must be a sequence of names, got the string {axis_names!r} "
                    f"(for one axis write ({axis_names!r},))")
  names = tuple(axis_names)
  if not all(isinstance(n, str) and n for n in names):
    raise TypeError(f"axis_names must be non-empty strings, got {names!r}")
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f"axis_names must be distinct, got {names!r} ({', '.join(map(repr, repeated))} "
                     "repeated)")
  shape = tuple(shape)
  if len(shape) != len(names):
    raise ValueError(f"shape {shape} has {len(shape)} axes but axis_names {names!r} has {len(names)}")
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=devices)


def state_shardings(node: Any, mesh: Mesh):
  """``NamedSharding`` tree of ``nnx.state(node)`` from the Variables' ``out_sharding``
  metadata (unannotated Variables: replicated)."""
  return nnx.get_named_sharding(nnx.state(node), mesh)


def shard_state(node: Any, mesh: Mesh) -> Any:
  """Place every Variable of an NNX object (model, optimizer) per its sharding metadata.

  Uses ``jax.device_put`` and ``nnx.update``; Variables without ``out_sharding``
  metadata are replicated over ``mesh``. In place; returns ``node``.
  """
  state = nnx.state(node)
  placed = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  nnx.update(node, placed)
  return node


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
  """Annotate the DoRA adapters from their kernels' shardings and place the model on ``mesh``.

  :func:`annotate_adapters` then :func:`shard_state`: kernels (and any other
  annotated Variable) go where their ``out_sharding`` metadata says, the
  adapters follow their kernels (:func:`adapter_partition_specs`), and the rest
  is replicated. Build an ``nnx.Optimizer`` afterwards: its moments inherit the
  adapters' shardings. In place; returns ``model``.

  Raises:
    ValueError: ``mesh`` has non-``Auto`` axes (see :func:`check_mesh`).
  """
  check_mesh(mesh)
  annotate_adapters(model, mesh)
  return shard_state(model, mesh)


def constrain(node: Any) -> Any:
  """Pin every annotated Variable of an NNX object to its sharding, inside a jitted step.

  ``jax.lax.with_sharding_constraint`` on the value of each Variable that has
  ``out_sharding`` metadata (``NamedSharding`` over its ``mesh`` metadata when
  set, else the bare ``PartitionSpec``, which needs ``jax.set_mesh``). Call it
  on the model and the optimizer at the end of a training step: GSPMD chooses
  the shardings of a jitted step's outputs itself, and without the constraint
  an updated adapter can come back sharded differently from the one that went
  in (e.g. a replicated ``lora_b`` split by the reduce-scatter of its
  gradient), which recompiles the next step and drifts from the layout. In
  place; returns ``node``.

  Example::

    @nnx.jit
    def train_step(model, optimizer, x, y):
      loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model, x, y)
      optimizer.update(model, grads)
      dora_jax.sharding.constrain(model)
      dora_jax.sharding.constrain(optimizer)
      return loss
  """
  for _, var in nnx.iter_graph(node):
    if not isinstance(var, nnx.Variable) or not var.get_metadata().get("out_sharding"):
      continue
    value = var.get_value()
    if not hasattr(value, "shape"):
      continue
    spec = nnx.spmd.get_var_pspec(var)
    mesh = var.get_metadata().get("mesh")
    target = NamedSharding(mesh, spec) if mesh is not None else spec
    var.set_value(jax.lax.with_sharding_constraint(value, target))
  return node


# -- HLO diagnostics -----------------------------------------------------------

class Collective(NamedTuple):
  """One collective of a compiled (per-device) HLO module."""

  op: str                              #: all-gather, all-reduce, reduce-scatter, ...
  name: str                            #: the instruction name
  shapes: tuple[tuple[int, ...], ...]  #: per-device result shapes (several if combined)

  @property
  def elements(self) -> int:
    """Elements of the largest result (for an async ``*-start``, the gathered side)."""
    return max((math.prod(s) for s in self.shapes), default=0)


_COLLECTIVE = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+"
    r"(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute|"
    r"ragged-all-to-all|collective-broadcast)(?:-start)?\(", re.M)
_ARRAY = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo_text: str) -> list[Collective]:
  """The collectives of a compiled HLO module's text (``compiled.as_text()``).

  Combined collectives (one all-reduce over a tuple) list every result shape.
  Example: ``[c for c in collectives(text) if c.op == "all-gather" and
  c.elements >= d_in * d_out]`` finds gathers of a whole kernel.
  """
  found = []
  for m in _COLLECTIVE.finditer(hlo_text):
    shapes = tuple(tuple(int(d) for d in dims.split(",") if d)
                   for dims in _ARRAY.findall(m.group("type")))
    found.append(Collective(m.group("op"), m.group("name"), shapes))
  return found


class Product(NamedTuple):
  """One matmul of a compiled (per-device) HLO module."""

  name: str
  shape: tuple[int, ...]  #: the per-device result shape

  @property
  def elements(self) -> int:
    return math.prod(self.shape)


_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<type>.*?)\s+(?P<op>[a-z][\w\-]*)\((?P<rest>.*)$",
    re.M)


def products(hlo_text: str) -> list[Product]:
  """Every matmul result of a compiled HLO module's text, fused computations included.

  ``dot`` instructions, and ``custom-call`` matmuls (cuBLAS/oneDNN ``gemm``/
  ``matmul`` targets, whose first result is the product). Example:
  ``[p for p in products(text) if p.elements >= kernel_shard_elements]`` finds a
  materialised dense ``a·b`` (or any product as large as the local kernel).
  """
  found = []
  for m in _INSTRUCTION.finditer(hlo_text):
    op = m.group("op")
    if op == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', m.group("rest"))
      if not target or not re.search(r"gemm|matmul", target.group(1), re.I):
        continue
    elif op != "dot":
      continue
    arrays = _ARRAY.findall(m.group("type"))
    if arrays:
      found.append(Product(m.group("name"), tuple(int(d) for d in arrays[0].split(",") if d)))
  return found

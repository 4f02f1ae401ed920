"""The op-level DoRA layer: DoRA on any NNX module whose own weight enters a
``jax.numpy.einsum`` or ``jax.lax.dot_general`` with the input.

:func:`adapt` changes a module in place: the object stays where it is in the model
(so every state path is unchanged), its class becomes ``DoRA<Base>``, a subclass of
its own class whose ``__call__`` runs the base ``__call__`` with the contractions
intercepted (:mod:`dora_jax.nnx.intercept`), and the adapters are added beside
each adapted weight:

=============================== ==================================================
one adapted weight              ``lora_a``, ``lora_b``, ``magnitude``
several (or a name is taken)    ``<weight>_lora_a``, ``<weight>_lora_b``, ``<weight>_magnitude``
=============================== ==================================================

typed :class:`~dora_jax.nnx.DoRAParam` (shapes as in :mod:`dora_jax.nnx.base`, for
the kernel as the op sees it), plus :class:`~dora_jax.nnx.DoRACache` Variables
``<prefix>norm_cache``/``<prefix>norm_stamp`` and, with dropout, an ``nnx.Dropout``
at ``dora_dropout``. All configuration is one static attribute, ``_dora``
(:class:`OpConfig`); nothing else on the module changes, so the base class's own
attributes and methods keep their meaning.

Each call, the intercepted op whose kernel is an adapted weight (found by
:func:`dora_jax.nnx.trace.contractions` for this call's signature, cached) runs as
:func:`dora_jax.general.dora_einsum` / :func:`~dora_jax.general.dora_dot_general`
on the very operands the base code passed, with the same ``precision`` and
``preferred_element_type``, so at PEFT's init the module's output is the base
output bit for bit. With dropout (PEFT's: adapter path only) the op is
``dora(x̃) + op(x − x̃, W)``. Only ``__call__`` is adapted.

Quantized weights (QDoRA, :mod:`dora_jax.nnx.quantize`): a module whose adapted weights
hold quantized values needs no trace per call: the op whose kernel operand is one of them
(by its codes) runs DoRA over it (:class:`QuantizedApplier`), the dropout rest through
the quantized base op. :func:`strip` leaves such a module a ``Quantized<Base>``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import _adapter, general
from dora_jax._checks import check_bool
from dora_jax.dense import lora_scale
from dora_jax.nnx import base as _base
from dora_jax.nnx import intercept
from dora_jax.nnx import quantize as _quant
from dora_jax.nnx import trace as _trace
from dora_jax.nnx.base import AdapterSite, DoRACache, DoRAParam

#: The adapter Variables' base names (prefixed by ``<weight>_`` where needed).
ADAPTER_NAMES = ("lora_a", "lora_b", "magnitude", "norm_cache", "norm_stamp", "base_sq_norm")
DROPOUT_NAME = "dora_dropout"


@dataclasses.dataclass(frozen=True)
class SiteSpec:
  """One adapted weight of an op-level adapted module (static, hashable).

  Attributes:
    param: attribute name of the weight (``nnx.Param``).
    prefix: ``""`` or ``"<param>_"``: the adapters are ``<prefix>lora_a`` etc.
    layout: the kernel operand's layout (as the op sees it).
    chain: ops from the stored weight to the kernel operand (see
      :class:`dora_jax.nnx.trace.Contraction`).
  """

  param: str
  prefix: str
  layout: general.WeightLayout
  chain: tuple[tuple[str, Any], ...]

  def name(self, what: str) -> str:
    return self.prefix + what


@dataclasses.dataclass(frozen=True)
class OpConfig:
  """The static DoRA configuration of an op-level adapted module."""

  base_type: type
  sites: tuple[SiteSpec, ...]
  rank: int
  alpha: float
  rslora: bool
  scale: float
  dropout_rate: float
  cache_norm: bool = False
  detach_norm: bool = True  # False: the exact gradient through the norm

  def site(self, param: str) -> SiteSpec:
    return next(s for s in self.sites if s.param == param)


class DoRAOp(nnx.Module):
  """Mixin of the op-level adapted classes ``DoRA<Base>(DoRAOp, Base)`` (see :func:`adapt`).

  Defines ``__call__`` only; the configuration is ``self._dora``.
  """

  _dora: OpConfig

  def __call__(self, *args, **kwargs):
    return run(self, args, kwargs)


_CLASSES: dict[type, type] = {}


def adapted_class(base_type: type) -> type:
  """``DoRA<Base>``: ``base_type`` with :class:`DoRAOp`'s ``__call__`` (one class per base)."""
  return _base.derived_class(_CLASSES, DoRAOp, base_type, "DoRA",
                             f"{base_type.__name__} adapted with DoRA at the op level "
                             "(dora_jax.nnx.op).")


def is_adapted(module: Any) -> bool:
  return isinstance(module, DoRAOp)


def config(module: DoRAOp) -> OpConfig:
  return vars(module)["_dora"]


def _set_config(module: DoRAOp, cfg: OpConfig) -> None:
  vars(module)["_dora"] = cfg


# -- building ----------------------------------------------------------------------


def site_specs(module: nnx.Module, found: dict[str, _trace.Contraction]) -> tuple[SiteSpec, ...]:
  """Adapter names for the weights in ``found`` (``{param: contraction}``): plain names
  for one weight whose names are free, ``<param>_`` prefixes otherwise."""
  taken = set(vars(module))
  plain_free = len(found) == 1 and not taken & set(ADAPTER_NAMES)
  specs = []
  for param, c in sorted(found.items()):
    prefix = "" if plain_free else f"{param}_"
    clash = [prefix + n for n in ADAPTER_NAMES if prefix + n in taken]
    if clash:
      raise ValueError(f"cannot add DoRA adapters to {type(module).__name__}: attribute(s) "
                       f"{clash} already exist")
    specs.append(SiteSpec(param, prefix, c.layout, c.chain))
  return tuple(specs)


def kernel_view(module: nnx.Module, spec: SiteSpec, *, casts: bool = True) -> jax.Array:
  """The adapted weight as its op sees it (``casts=False``: stored dtype)."""
  return _trace.apply_chain(getattr(module, spec.param)[...], spec.chain, casts=casts)


def validate(module: nnx.Module, specs: tuple[SiteSpec, ...], rank: int, dropout: float,
             where: str) -> None:
  """The one validation of an op-level configuration (raises before anything changes)."""
  for spec in specs:
    _base.check_config(rank, dropout, spec.layout, f"{where} (weight {spec.param!r})")
  if dropout > 0 and DROPOUT_NAME in vars(module):
    raise ValueError(f"{where}: attribute {DROPOUT_NAME!r} already exists (needed for dropout)")


def adapt(module: nnx.Module, specs: tuple[SiteSpec, ...], *, rank: int, alpha: float,
          rslora: bool, dropout: float, param_dtype, rngs: nnx.Rngs, where: str,
          detach_norm: bool = True) -> DoRAOp:
  """Add adapters for ``specs`` to ``module`` and make it a ``DoRA<Base>``, in place.

  ``detach_norm=False``: the adapted ops run with the exact gradient through the norm."""
  validate(module, specs, rank, dropout, where)
  check_bool("detach_norm", detach_norm)
  param_dtype = jnp.dtype(param_dtype)
  for spec in specs:
    a, b, m = _base.init_adapters(kernel_view(module, spec), spec.layout, rank, param_dtype,
                                  rngs.params(), native=True)
    setattr(module, spec.name("lora_a"), DoRAParam(a))
    setattr(module, spec.name("lora_b"), DoRAParam(b))
    setattr(module, spec.name("magnitude"), DoRAParam(m))
    shape = (*spec.layout.batch_shape, spec.layout.d_out)
    setattr(module, spec.name("norm_cache"), DoRACache(jnp.zeros(shape, jnp.float32)))
    setattr(module, spec.name("norm_stamp"), DoRACache(_adapter.empty_stamp()))
    setattr(module, spec.name("base_sq_norm"), nnx.data(None))
  dropout = float(dropout)
  if dropout > 0:
    setattr(module, DROPOUT_NAME, nnx.Dropout(dropout, rngs=rngs))
  cfg = OpConfig(type(module), specs, rank, float(alpha), bool(rslora),
                 lora_scale(alpha, rank, rslora=rslora), dropout, detach_norm=detach_norm)
  module.__class__ = adapted_class(type(module))
  _set_config(module, cfg)
  return module


def strip(module: DoRAOp) -> nnx.Module:
  """Remove the adapters and restore the base class, in place (the weights untouched)."""
  cfg = config(module)
  for spec in cfg.sites:
    for what in ADAPTER_NAMES:
      if spec.name(what) in vars(module):
        delattr(module, spec.name(what))
  if DROPOUT_NAME in vars(module):
    delattr(module, DROPOUT_NAME)
  del vars(module)["_dora"]
  module.__class__ = cfg.base_type
  # quantized weights stay quantized: the module computes the quantized base
  return _quant.settle(module, tuple((s.param, s.layout) for s in cfg.sites))


def merge_in_place(module: DoRAOp, *, requantize: bool = False) -> nnx.Module:
  """Write ``g ⊙ (W + s·a·b)`` into each adapted weight, then :func:`strip` (in place).

  A quantized weight becomes the float merged weight (``Ŵ`` its dequantized value, in
  its float dtype), or, with ``requantize=True``, that merged weight quantized again
  with the same type and block size.
  """
  for site in sites(module):
    var = site.kernel
    stored = var.get_value()
    if _quant.is_quantized(stored):
      from dora_jax import quantized
      merged = site.merged_weight()
      if requantize:
        merged = quantized.quantize_kernel(merged, stored.qtype, block_size=stored.block_size,
                                           layout=stored.layout, chunk_bytes=stored.chunk_bytes)
      var.set_value(merged)
    else:
      var[...] = site.merged_weight()
  return strip(module)


# -- the sites, as model-level code sees them ------------------------------------------


class OpSite(AdapterSite):
  """One adapted weight of an op-level adapted module (a view, not a Variable holder).

  Implements the :class:`~dora_jax.nnx.base.AdapterSite` protocol on the module's
  own Variables: ``kernel`` is the base weight (as stored), ``lora_a`` etc. its
  adapters; the norms are those of the kernel as its op sees it.
  """

  def __init__(self, module: DoRAOp, spec: SiteSpec):
    self.module = module
    self.spec = spec

  def __repr__(self) -> str:
    return f"OpSite({type(self.module).__name__}.{self.spec.param}: {self.describe()})"

  # configuration
  @property
  def config(self) -> OpConfig:
    return config(self.module)

  layout = property(lambda self: self.spec.layout)
  in_shape = property(lambda self: tuple(self.spec.layout.in_shape))
  out_shape = property(lambda self: tuple(self.spec.layout.out_shape))
  d_in = property(lambda self: int(self.spec.layout.d_in))
  d_out = property(lambda self: int(self.spec.layout.d_out))
  rank = property(lambda self: self.config.rank)
  alpha = property(lambda self: self.config.alpha)
  rslora = property(lambda self: self.config.rslora)
  scale = property(lambda self: self.config.scale)
  dropout_rate = property(lambda self: self.config.dropout_rate)
  detach_norm = property(lambda self: self.config.detach_norm)
  base_type = property(lambda self: self.config.base_type)

  @property
  def cache_norm(self) -> bool:
    return self.config.cache_norm

  @cache_norm.setter
  def cache_norm(self, value: bool) -> None:
    _set_config(self.module, dataclasses.replace(self.config, cache_norm=bool(value)))

  # Variables
  def _var(self, what: str):
    return getattr(self.module, self.spec.name(what))

  kernel = property(lambda self: getattr(self.module, self.spec.param))
  lora_a = property(lambda self: self._var("lora_a"))
  lora_b = property(lambda self: self._var("lora_b"))
  magnitude = property(lambda self: self._var("magnitude"))
  norm_cache = property(lambda self: self._var("norm_cache"))
  norm_stamp = property(lambda self: self._var("norm_stamp"))

  @property
  def base_sq_norm(self):
    return getattr(self.module, self.spec.name("base_sq_norm"), None)

  def kernel_view(self) -> jax.Array:
    return kernel_view(self.module, self.spec)

  norm_kernel = kernel_view

  def _store_base_sq(self, value: jax.Array) -> None:
    setattr(self.module, self.spec.name("base_sq_norm"), DoRACache(value))

  def merged_weight(self) -> jax.Array:
    """The merged weight in its stored shape and dtype (shape ops of the chain undone)."""
    stored = self.kernel[...]
    view = kernel_view(self.module, self.spec, casts=False)
    if _quant.is_quantized(view):  # g ⊙ (Ŵ + s·a·b), one compiled program per shape
      from dora_jax import quantized
      return quantized.merge_weight(view, self.lora_a[...], self.lora_b[...],
                                    self.magnitude[...], self.scale)
    merged = _base.merged_kernel(view, self.lora_a[...], self.lora_b[...],
                                 self.magnitude[...], self.scale, self.layout, native=True)
    return _trace.invert_chain(merged, self.spec.chain, stored.shape).astype(stored.dtype)

  def describe(self) -> str:
    batch = (f" x{math.prod(self.layout.batch_shape)} blocks" if self.layout.batch else "")
    cfg = self.config
    quant = _quant.describe_weight(self.kernel.get_value())
    return (f"{cfg.base_type.__name__}.{self.spec.param}({self.d_in} -> {self.d_out}{batch}"
            f"{quant}) "
            f"rank={cfg.rank} alpha={cfg.alpha:g} scale={cfg.scale:g}"
            + (" rslora" if cfg.rslora else "")
            + (f" dropout={cfg.dropout_rate:g}" if cfg.dropout_rate else ""))


def sites(module: DoRAOp) -> list[OpSite]:
  return [OpSite(module, spec) for spec in config(module).sites]


# -- the call ------------------------------------------------------------------------


def _norms(site: OpSite, kernel: jax.Array):
  """``(norm, base_sq_norm)`` shaped ``[*batch, *out]`` for this call (cached mode aware)."""
  layout = site.layout
  shape = (*layout.batch_shape, *layout.out_shape)
  sq = site.base_sq_norm
  sq = None if sq is None else sq[...]
  norm = None
  if site.cache_norm:
    norm, new_cache, new_stamp = _base.cached_norm(
        kernel, site.lora_a[...], site.lora_b[...], site.scale, layout, site.norm_cache[...],
        site.norm_stamp[...], sq, native=True)
    if getattr(site.norm_cache, "_can_update", True):
      site.norm_cache[...] = new_cache
      site.norm_stamp[...] = new_stamp
    norm = norm.reshape(shape)
  return norm, None if sq is None else sq.reshape(shape)


class Applier:
  """Handler running the planned contractions of one call as DoRA ops."""

  def __init__(self, module: DoRAOp, plan: tuple[_trace.Contraction, ...], where: str):
    self.module = module
    self.plan = {c.index: c for c in plan}
    self.where = where
    self.count = 0
    self.done: set[int] = set()

  def __call__(self, op: str, arguments: dict[str, Any]) -> Any:
    index, self.count = self.count, self.count + 1
    entry = self.plan.get(index)
    if entry is None:
      return intercept.call_original(op, arguments)
    if not entry.matches(op, arguments):
      raise RuntimeError(
          f"{self.where}: intercepted call #{index} is a {op} unlike the traced one "
          f"({entry.op} {entry.equation or entry.dimension_numbers} on a kernel "
          f"{entry.kernel_shape}): the module's call is not a function of its signature")
    self.done.add(index)
    cfg = config(self.module)
    spec = cfg.site(entry.param)
    if spec.layout != entry.layout or spec.chain != entry.chain:
      raise RuntimeError(
          f"{self.where}: weight {entry.param!r} enters its op in layout {entry.layout} "
          f"(via {entry.chain}) in this call, but was adapted for {spec.layout} (via "
          f"{spec.chain})")
    x, kernel = _quant.operands(op, arguments)
    if op == "einsum":
      rest = lambda d: intercept.call_original("einsum", {**arguments, "operands": (d, kernel)})
    else:
      rest = lambda d: intercept.call_original("dot_general", {**arguments, "lhs": d})
    return _site_call(self.module, cfg, spec, op, arguments, x, kernel, rest)

  def check_done(self) -> None:
    missing = sorted(set(self.plan) - self.done)
    if missing:
      raise RuntimeError(f"{self.where}: traced contraction(s) {missing} did not run")


def _site_call(module: DoRAOp, cfg: OpConfig, spec: SiteSpec, op: str,
               arguments: dict[str, Any], x, kernel, rest):
  """The DoRA op on ``kernel`` (the operand the base code passed) for one intercepted call;
  with dropout, ``dora(x̃) + rest(x − x̃)`` (``rest``: the base op)."""
  site = OpSite(module, spec)
  kw = dict(precision=arguments["precision"],
            preferred_element_type=arguments["preferred_element_type"],
            detach_norm=cfg.detach_norm)
  if op == "einsum":
    equation = arguments["subscripts"].replace(" ", "")
    dora = lambda x_: general.dora_einsum(equation, x_, kernel, *adapters, cfg.scale,
                                          norm=norm, base_sq_norm=sq, **kw)
  else:
    dn = arguments["dimension_numbers"]
    dora = lambda x_: general.dora_dot_general(x_, kernel, *adapters, cfg.scale, dn,
                                               norm=norm, base_sq_norm=sq, **kw)
  adapters = (site.lora_a[...], site.lora_b[...], site.magnitude[...])
  norm, sq = _norms(site, kernel)
  x_dropped = None
  dropout = getattr(module, DROPOUT_NAME, None) if cfg.dropout_rate > 0 else None
  if dropout is not None:
    x_dropped = dropout(x)
    if x_dropped is x:
      x_dropped = None
  if x_dropped is None:
    return dora(x)
  y = dora(x_dropped)
  acc = jnp.promote_types(y.dtype, jnp.float32)
  return (y.astype(acc) + rest(x - x_dropped).astype(acc)).astype(y.dtype)


class QuantizedApplier:
  """Handler of an op-level adapted module whose adapted weights are quantized
  (:mod:`dora_jax.nnx.quantize`): the op whose kernel operand is one of them (as stored,
  or a dtype cast of it) runs as DoRA over it; no trace is needed to find it."""

  def __init__(self, module: DoRAOp, where: str):
    self.module = module
    self.where = where
    self.done: set[str] = set()

  def __call__(self, op: str, arguments: dict[str, Any]) -> Any:
    _quant.check_call(op, arguments, self.where)
    pair = _quant.operands(op, arguments)
    if pair is None or not _quant.is_quantized(pair[1]):
      return intercept.call_original(op, arguments)
    x, kernel = pair
    cfg = config(self.module)
    name = _quant.owner(self.module, kernel, [s.param for s in cfg.sites])
    if name is None:
      raise RuntimeError(f"{self.where}: a quantized weight that is not one of the adapted "
                         f"weights {[s.param for s in cfg.sites]} enters {op}")
    spec = cfg.site(name)
    layout = _quant.op_layout(op, arguments, x, kernel)
    if layout != spec.layout:
      raise RuntimeError(f"{self.where}: weight {name!r} enters {op} in layout {layout}, but "
                         f"was adapted for {spec.layout}")
    self.done.add(name)
    rest = lambda d: _quant.quantized_op(op, arguments, d, kernel)
    return _site_call(self.module, cfg, spec, op, arguments, x, kernel, rest)


def run(module: DoRAOp, args: tuple, kwargs: dict) -> Any:
  """One call of an op-level adapted module (its base ``__call__`` with DoRA ops)."""
  cfg = config(module)
  call = cfg.base_type.__call__
  where = f"DoRA{cfg.base_type.__name__}"
  if any(_quant.is_quantized(_quant.param_value(module, s.param)) for s in cfg.sites):
    applier = QuantizedApplier(module, where)
    with (intercept.active(applier), intercept.swapped_functions(module),
          _quant.passthrough()):
      out = call(module, *args, **kwargs)
    if not applier.done:
      raise RuntimeError(
          f"{where}: none of the adapted (quantized) weights {sorted(s.param for s in cfg.sites)} "
          "entered a jnp.einsum / lax.dot_general in this call; DoRA would do nothing, so the "
          "call is refused")
    return out
  plan = _trace.contractions(module, call, args, kwargs, where=where)
  adapted = {s.param for s in cfg.sites}
  plan = tuple(c for c in plan if c.param in adapted)
  if not plan:
    raise RuntimeError(
        f"{where}: none of the adapted weights {sorted(adapted)} enters a contraction in "
        "this call (the module takes another path for these arguments); DoRA would do "
        "nothing, so the call is refused")
  applier = Applier(module, plan, where)
  with intercept.active(applier), intercept.swapped_functions(module):
    out = call(module, *args, **kwargs)
  applier.check_done()
  return out

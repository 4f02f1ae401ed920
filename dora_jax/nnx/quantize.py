"""Quantized frozen weights inside NNX modules (QDoRA's base), without a float copy.

A quantized weight replaces the value of its ``nnx.Param`` in place: the
Variable (and so the state path, ``.../kernel``) stays, its value becomes a
:class:`dora_jax.quantized.QuantizedKernel` of the weight as its contraction
uses it (its :class:`~dora_jax.general.WeightLayout`). The module's own code
still runs: while it runs,

* ``jax.numpy.asarray`` passes a quantized weight through (``asarray(w, dtype)``
  is ``w.astype(dtype)``), so the usual promotions (Flax's ``promote_dtype``,
  ``jnp.asarray(kernel, self.dtype)``) hand it on; ``w[...]`` and ``w.astype``
  work on it as on an array;
* the ``jnp.einsum``/``lax.dot_general`` call that receives it as the second
  operand (:mod:`dora_jax.nnx.intercept`) runs the quantized op
  (:func:`dora_jax.quantized.quantized_einsum`) or, in a DoRA-adapted module,
  the DoRA op over it (:mod:`dora_jax.nnx.op`), in the same precision and
  ``preferred_element_type``; the weight is recognised by its codes (a dtype
  cast shares them);
* anything else done to it (``x @ w``, ``jnp.dot``, slicing) raises a
  ``TypeError``: a quantized weight is never turned into a float array whole.

A module whose weights are quantized and that has no adapters (what
:func:`dora_jax.unmerge` returns for a QDoRA model, or
:func:`dora_jax.quantize_base`) becomes ``Quantized<Base>``, a subclass of its own
class (:class:`QuantizedModule`), whose configuration is the static attribute
``_dora_quantized`` (:class:`QuantConfig`). Its output is the quantized base
model's: what a QDoRA layer reproduces bit for bit at init.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from dora_jax import general
from dora_jax.general import QuantizedWeight
from dora_jax.nnx import intercept

CONFIG_ATTR = "_dora_quantized"


def check_base_dtype(base_dtype, block_size) -> str | None:
  """Validate the ``base_dtype``/``block_size`` arguments: the quantization type, or
  ``None`` (a float base), with which ``block_size`` is an error."""
  from dora_jax.quantized import QTYPES
  if base_dtype is None:
    if block_size is not None:
      raise ValueError(f"block_size={block_size!r} is the quantization block of base_dtype; "
                       f"pass base_dtype= (one of {', '.join(map(repr, QTYPES))}) with it")
    return None
  if not isinstance(base_dtype, str) or base_dtype not in QTYPES:
    raise ValueError(f"base_dtype must be one of {', '.join(map(repr, QTYPES))} (or None: "
                     f"a float base), got {base_dtype!r}")
  if block_size is not None and (isinstance(block_size, bool)
                                 or not isinstance(block_size, int) or block_size < 1):
    raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
  return base_dtype


def is_quantized(value: Any) -> bool:
  """Whether ``value`` is a quantized weight (a :class:`~dora_jax.general.QuantizedWeight`)."""
  return isinstance(value, QuantizedWeight)


def param_value(module: nnx.Module, name: str) -> Any:
  """The value of the module's Variable ``name`` (an array or a quantized weight)."""
  return getattr(module, name).get_value()


def quantized_params(module: nnx.Module) -> dict[str, QuantizedWeight]:
  """``{name: weight}`` of the module's own ``nnx.Param``\\ s that hold quantized weights."""
  return {name: v.get_value() for name, v in vars(module).items()
          if isinstance(v, nnx.Param) and is_quantized(v.get_value())}


def describe_weight(value: Any) -> str:
  """``" nf4/64"``, ``" int8"``, ... for a quantized weight, ``""`` otherwise."""
  if not is_quantized(value):
    return ""
  block = getattr(value, "block_size", None)
  return f" {value.qtype}" + (f"/{block}" if block else "")


# -- the base code's view of a quantized weight ------------------------------------

_lock = threading.Lock()
_users = 0
_saved: dict[str, Any] = {}


def _asarray_proxy(original):
  def asarray(a, dtype=None, *args, **kwargs):
    if is_quantized(a):
      return a if dtype is None else a.astype(dtype)
    return original(a, dtype, *args, **kwargs)

  asarray.__wrapped__ = original
  asarray.__doc__ = original.__doc__
  return asarray


@contextlib.contextmanager
def passthrough() -> Iterator[None]:
  """``jax.numpy.asarray`` passes quantized weights through inside the block (see the
  module docstring); installed while any thread is inside one, then put back."""
  global _users
  with _lock:
    if _users == 0:
      _saved["asarray"] = jnp.asarray
      jnp.asarray = _asarray_proxy(jnp.asarray)
    _users += 1
  try:
    yield
  finally:
    with _lock:
      _users -= 1
      if _users == 0:
        jnp.asarray = _saved.pop("asarray")


def operands(op: str, arguments: dict[str, Any]) -> tuple[Any, Any] | None:
  """``(x, kernel)`` of an intercepted two-operand call, else ``None``."""
  if op == "einsum":
    ops = arguments["operands"]
    return tuple(ops) if len(ops) == 2 else None
  return arguments["lhs"], arguments["rhs"]


def op_layout(op: str, arguments: dict[str, Any], x, kernel) -> general.WeightLayout:
  """The kernel's layout in an intercepted call."""
  if op == "einsum":
    return general.einsum_layout(arguments["subscripts"].replace(" ", ""), x.shape, kernel.shape)
  return general.dot_general_layout(arguments["dimension_numbers"], x.shape, kernel.shape)


def check_call(op: str, arguments: dict[str, Any], where: str) -> None:
  """Refuse what a quantized weight's op cannot honour (``out_sharding``, a custom
  ``_dot_general``, an implicit einsum); a quantized weight as the first operand."""
  pair = operands(op, arguments)
  if pair is None or (op == "einsum" and not isinstance(arguments["subscripts"], str)):
    if any(is_quantized(v) for v in arguments.get("operands", ())):
      raise NotImplementedError(f"{where}: a quantized weight enters an einsum of more than "
                                "two operands (or without a subscripts string)")
    return
  x, kernel = pair
  if is_quantized(x):
    raise NotImplementedError(f"{where}: a quantized weight is the first operand of {op}; "
                              "only op(x, W) with the weight second is supported")
  if not is_quantized(kernel):
    return
  bad = [k for k in ("out", "out_sharding") if arguments.get(k) is not None]
  if op == "einsum":
    if arguments.get("_dot_general") is not intercept.ORIGINALS["dot_general"][1]:
      bad.append("_dot_general")
    if "->" not in arguments["subscripts"]:
      bad.append("an implicit output (no '->')")
  if bad:
    raise NotImplementedError(f"{where}: a quantized weight enters a {op} with "
                              f"{', '.join(bad)} set (not supported)")


def quantized_op(op: str, arguments: dict[str, Any], x, kernel):
  """The quantized base op on an intercepted call's operands."""
  from dora_jax import quantized
  kw = dict(precision=arguments["precision"],
            preferred_element_type=arguments["preferred_element_type"])
  if op == "einsum":
    return quantized.quantized_einsum(arguments["subscripts"].replace(" ", ""), x, kernel, **kw)
  return quantized.quantized_dot_general(x, kernel, arguments["dimension_numbers"], **kw)


def owner(module: nnx.Module, kernel: QuantizedWeight, names) -> str | None:
  """Which of the module's params ``names`` ``kernel`` is (or is a dtype cast of)."""
  codes = getattr(kernel, "codes", None)
  for name in names:
    value = param_value(module, name)
    if is_quantized(value) and (value is kernel or getattr(value, "codes", False) is codes):
      return name
  return None


# -- quantized modules without adapters -------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """The static configuration of a ``Quantized<Base>`` module.

  Attributes:
    base_type: the module's own class.
    sites: ``(param, layout)`` of every quantized weight (its layout in its op).
  """

  base_type: type
  sites: tuple[tuple[str, general.WeightLayout], ...]

  def layout(self, param: str) -> general.WeightLayout:
    return dict(self.sites)[param]


class _BaseHandler:
  """Runs the quantized weights' contractions of one call as the quantized ops."""

  def __init__(self, module: nnx.Module, cfg: QuantConfig, where: str):
    self.module, self.cfg, self.where = module, cfg, where

  def __call__(self, op: str, arguments: dict[str, Any]) -> Any:
    check_call(op, arguments, self.where)
    pair = operands(op, arguments)
    if pair is None or not is_quantized(pair[1]):
      return intercept.call_original(op, arguments)
    x, kernel = pair
    name = owner(self.module, kernel, [p for p, _ in self.cfg.sites])
    if name is None:
      raise RuntimeError(f"{self.where}: a quantized weight that is not one of this module's "
                         f"({[p for p, _ in self.cfg.sites]}) enters {op}")
    layout = op_layout(op, arguments, x, kernel)
    if layout != self.cfg.layout(name):
      raise RuntimeError(f"{self.where}: weight {name!r} enters {op} in layout {layout}, but "
                         f"was quantized for {self.cfg.layout(name)}")
    return quantized_op(op, arguments, x, kernel)


class QuantizedModule(nnx.Module):
  """Mixin of ``Quantized<Base>(QuantizedModule, Base)``: the base module's own call with
  its quantized weights contracted by the quantized ops (see the module docstring)."""

  def __call__(self, *args, **kwargs):
    cfg = config(self)
    where = f"Quantized{cfg.base_type.__name__}"
    handler = _BaseHandler(self, cfg, where)
    with intercept.active(handler), intercept.swapped_functions(self), passthrough():
      return cfg.base_type.__call__(self, *args, **kwargs)


_CLASSES: dict[type, type] = {}


def quantized_class(base_type: type) -> type:
  """``Quantized<Base>`` (one class per base type)."""
  from dora_jax.nnx.base import derived_class
  return derived_class(_CLASSES, QuantizedModule, base_type, "Quantized",
                       f"{base_type.__name__} with quantized frozen weights "
                       "(dora_jax.nnx.quantize).")


def is_quantized_module(module: Any) -> bool:
  return isinstance(module, QuantizedModule)


def config(module: QuantizedModule) -> QuantConfig:
  return vars(module)[CONFIG_ATTR]


def mark(module: nnx.Module, sites: tuple[tuple[str, general.WeightLayout], ...]) -> nnx.Module:
  """Make ``module`` (whose ``sites`` params hold quantized weights) a ``Quantized<Base>``, in place."""
  base_type = config(module).base_type if is_quantized_module(module) else type(module)
  module.__class__ = quantized_class(base_type)
  vars(module)[CONFIG_ATTR] = QuantConfig(base_type, tuple(sites))
  return module


def unmark(module: nnx.Module) -> nnx.Module:
  """Give a ``Quantized<Base>`` its own class back (the weights stay as they are), in place."""
  if is_quantized_module(module):
    cfg = vars(module).pop(CONFIG_ATTR)
    module.__class__ = cfg.base_type
  return module


def settle(module: nnx.Module, sites) -> nnx.Module:
  """After adapters are removed: ``Quantized<Base>`` if any of ``sites`` (``(param,
  layout)``) still holds a quantized weight, the plain class otherwise."""
  kept = tuple((p, l) for p, l in sites if is_quantized(param_value(module, p)))
  return mark(module, kept) if kept else unmark(module)


# -- quantizing weights in place ------------------------------------------------------


def check_quantizable(value: Any, layout: general.WeightLayout, qtype: str, block_size,
                      where: str) -> None:
  """Raise (naming ``where`` and the argument) unless ``value`` can be quantized as asked."""
  from dora_jax import quantized
  if is_quantized(value):
    raise ValueError(
        f"base_dtype={qtype!r}: {where} is already quantized ({value.qtype}"
        + (f", block_size={value.block_size}" if getattr(value, "block_size", None) else "")
        + "); quantize the float weights once (drop base_dtype to adapt the quantized model)")
  dtype = jnp.dtype(value.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"base_dtype={qtype!r}: {where} has dtype {dtype}; only float weights "
                    "are quantized")
  if tuple(value.shape) != layout.shape:
    raise NotImplementedError(
        f"base_dtype={qtype!r}: {where} is stored as {tuple(value.shape)} but enters its "
        f"contraction as {layout.shape} (reshaped or transposed); quantizing it is not "
        "supported")
  try:
    quantized._resolve_block(qtype, block_size, layout)
  except ValueError as err:
    raise ValueError(f"{err} ({where})") from None


def quantize_params(module: nnx.Module, layouts: dict[str, general.WeightLayout], qtype: str,
                    block_size) -> None:
  """Replace each param's value by its quantized weight in ``layouts[param]``, in place."""
  from dora_jax import quantized
  for name, layout in layouts.items():
    var = getattr(module, name)
    var.set_value(quantized.quantize_kernel(var.get_value(), qtype, block_size=block_size,
                                            layout=layout))


# -- the registered layer types, seen as op-level modules --------------------------------


def registered_layout(module: nnx.Module, where: str
                      ) -> tuple[general.WeightLayout, tuple[tuple[str, Any], ...]]:
  """``(layout, chain)`` of the ``kernel`` of an ``nnx.Linear``/``LinearGeneral``/``Einsum``
  in its own contraction (``chain``: the dtype cast its call applies, if fixed)."""
  from dora_jax.nnx.base import check_dtype_promotion, matrix_layout
  from dora_jax.nnx.einsum import einsum_kernel_layout
  check_dtype_promotion(module)
  shape = tuple(int(d) for d in module.kernel.shape)
  if isinstance(module, nnx.Linear):
    if module.dot_general is not jax.lax.dot_general:
      raise NotImplementedError(f"{where}: nnx.Linear with a custom dot_general cannot have a "
                                "quantized kernel")
    layout = matrix_layout(shape)
  elif isinstance(module, nnx.LinearGeneral):
    if module.dot_general is not None or module.dot_general_cls is not None:
      raise NotImplementedError(f"{where}: nnx.LinearGeneral with a custom dot_general cannot "
                                "have a quantized kernel")
    nb, na = len(module.batch_axis), len(module.axis)
    dn = ((tuple(range(nb, nb + na)), tuple(range(nb, nb + na))),
          (tuple(range(nb)), tuple(range(nb))))
    layout = general.dot_general_layout(dn, shape[: nb + na], shape)  # as DoRALinearGeneral's
  elif isinstance(module, nnx.Einsum):
    if module.einsum_op is not jnp.einsum or module.einsum_str is None:
      raise NotImplementedError(f"{where}: nnx.Einsum with a custom einsum_op or no "
                                "einsum_str cannot have a quantized kernel")
    layout = einsum_kernel_layout(module.einsum_str.replace(" ", ""), shape)
  else:  # pragma: no cover - callers check the type
    raise TypeError(f"{where}: {type(module).__name__} is not a linear layer type")
  dtype = getattr(module, "dtype", None)
  chain = ((("convert", jnp.dtype(dtype).name),)
           if dtype is not None and jnp.dtype(dtype) != jnp.dtype(module.kernel.dtype) else ())
  return layout, chain


#: The registered layer types whose kernels can be quantized (their calls are contractions).
LINEAR_TYPES = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)

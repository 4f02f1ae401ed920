"""``DoraProvider``: DoRA wherever qwix's LoRA goes (NNX and Linen).

qwix (Google's quantization and LoRA library, used by Tunix and MaxText)
intercepts ``jax.lax.dot_general`` / ``jax.numpy.einsum`` (and ``jnp.dot``) inside
the model and hands each call to a provider. :class:`DoraProvider` is a
``qwix.LoraProvider`` whose :class:`DoraRule`\\ s run the op whose second operand is a
module weight as DoRA through :mod:`dora_jax.general`, in the weight's own layout::

  y = m / ‖W + s·a·b‖ ⊙ (op(x, W) + s·op(x, a)·b)        (norm detached, as PEFT)

with the base term computed by the very op qwix intercepted (same precision and
``preferred_element_type``), so at PEFT's init (``b = 0``, ``m = ‖W‖``) the model
reproduces its base bit for bit (``DoraRule(detach_norm=False)``: the exact gradient
through the norm instead of PEFT's detached one). Per adapted weight ``<w>`` the
module gets (qwix's naming) ``<w>_lora_a [*B, *C, r]`` (PEFT's ``U(-1/√d_in, 1/√d_in)``),
``<w>_lora_b [*B, r, *O]`` (zeros) and ``<w>_magnitude [*B, *O]`` (``‖W‖``): NNX
:class:`dora_jax.nnx.DoRAParam` (an ``nnx.LoRAParam``), Linen entries of the
``params`` collection, as qwix's LoRA adapters are.

Rules without DoRA (plain ``qwix.LoraRule``\\ s, quantization rules) behave exactly as
in ``qwix.LoraProvider``. Linen einsum layers work (qwix 0.1.8's own
``LoraProvider.einsum`` sets an attribute on the frozen Linen module and fails;
DoRA rules never take that path). Dropout is qwix's (``make_rng('dropout')``,
always on when ``dropout > 0``), applied as PEFT does: adapter path only.

QDoRA: a :class:`DoraRule` with ``weight_qtype=`` (``"nf4"``, ``jnp.int4``/``"int4"``,
``jnp.int8``/``"int8"``, ``jnp.float8_e4m3fn``; ``tile_size=`` an int block size along
``d_in``) quantizes each matched weight the first time its op runs (the NNX model's
first call, Linen's ``init``), as qwix's QLoRA does, but into a
:class:`dora_jax.quantized.QuantizedKernel` (the same qwix rounding, 4-bit codes packed
two per byte) that replaces the weight in the module; the op then runs DoRA over it
(:meth:`DoraProvider.quantized_base`): the base term, ``aᵀŴ`` and ``dx`` through its
part-by-part contraction, ``magnitude = ‖Ŵ‖`` (PEFT's QDoRA init: the output at init is
the quantized base op's, bit for bit). A weight qwix itself quantized (a ``QArray``) is
refused: it holds one code per byte and qwix's op dequantizes it whole.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import qwix
from flax import linen as nn
from flax import nnx
from jax import lax

from dora_jax import _adapter, general
from dora_jax._checks import check_bool
from dora_jax.dense import lora_scale
from dora_jax.nnx.base import DoRAParam
from dora_jax.qwix import _private

#: The adapter params' suffixes, after the weight's name.
SUFFIXES = ("_lora_a", "_lora_b", "_magnitude")


class AdaptedWeight(NamedTuple):
  """How one weight was adapted: its op's kernel layout and the LoRA scale."""

  layout: general.WeightLayout
  scale: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class DoraRule(qwix.LoraRule):
  """A qwix LoRA rule that makes the matched ops DoRA.

  Attributes (besides ``module_path``, ``op_names``, ``rank``, ``alpha``,
  ``dropout`` of ``qwix.LoraRule``):
    rslora: scale ``alpha / √rank`` instead of ``alpha / rank``.
    param_dtype: the adapters' dtype (PEFT keeps them in float32).
    lora_a_initializer: ``None`` (default) for PEFT's ``U(-1/√d_in, 1/√d_in)``, or
      a ``(key, shape, dtype) -> array`` initializer.
    detach_norm: ``True`` (PEFT's semantics): the norm is a constant in the
      backward. ``False``: the exact DoRA gradient through the norm (see
      :func:`dora_jax.dora_dense`).
  """

  rslora: bool = False
  param_dtype: Any = jnp.float32
  lora_a_initializer: Callable[..., jax.Array] | None = None
  detach_norm: bool = True

  def __post_init__(self):
    check_bool("detach_norm", self.detach_norm)


#: qwix ``weight_qtype`` names -> dora_jax's quantization types.
QTYPES = {"nf4": "nf4", "int4": "int4", "int8": "int8", "float8_e4m3fn": "fp8", "fp8": "fp8"}


def _qtype_of(rule: DoraRule, name: str) -> tuple[str, int | None]:
  """``(qtype, block_size)`` for ``rule``'s ``weight_qtype``/``tile_size`` (errors name them)."""
  q = rule.weight_qtype
  key = q if isinstance(q, str) else getattr(jnp.dtype(q), "name", str(q))
  if key not in QTYPES:
    raise NotImplementedError(
        f"DoRA on weight {name!r}: weight_qtype={q!r} is not a QDoRA type (supported: "
        "'nf4', 'int4' / jnp.int4, 'int8' / jnp.int8, jnp.float8_e4m3fn)")
  if rule.act_qtype is not None:
    raise NotImplementedError(f"DoRA on weight {name!r}: act_qtype={rule.act_qtype!r} "
                              "(quantized activations) is not supported with QDoRA")
  if rule.weight_calibration_method != "absmax":
    raise NotImplementedError(
        f"DoRA on weight {name!r}: weight_calibration_method="
        f"{rule.weight_calibration_method!r}; QDoRA quantizes with absmax")
  tile = rule.tile_size
  if tile is not None and (isinstance(tile, bool) or not isinstance(tile, int)):
    raise NotImplementedError(f"DoRA on weight {name!r}: tile_size={tile!r}; QDoRA takes "
                              "the block size along d_in as an int")
  return QTYPES[key], tile


def _op_kwargs(precision, preferred_element_type) -> dict[str, Any]:
  return dict(precision=precision, preferred_element_type=preferred_element_type)


class DoraProvider(qwix.LoraProvider):
  """qwix provider for DoRA: ``qwix.apply_lora_to_model(model, DoraProvider(...), *inputs)``.

  Usage::

    provider = dora_jax.qwix.DoraProvider(module_path=r".*(q|kv)_einsum|.*mlp.*",
                                          rank=8, alpha=16.0)
    model = qwix.apply_lora_to_model(model, provider, tokens, rngs=nnx.Rngs(0))  # NNX
    # Linen: qwix.apply_lora_to_model(linen_model, provider), then .init / .apply

  or with a list of rules (``DoraRule``\\ s and any other qwix rules), as
  ``qwix.LoraProvider``.

  Attributes:
    adapted: ``{(module path, weight name): AdaptedWeight}`` for every adapted weight
      seen so far (filled during the first call / ``init``), used by
      :func:`dora_jax.qwix.merge` and :func:`dora_jax.qwix.merge_params`.
  """

  def __init__(self, rules=None, *, disable_jit: bool = False, **kwargs):
    if rules is None:
      rules = [DoraRule(**kwargs)]
    elif kwargs:
      raise ValueError("pass either rules or the keyword arguments of one DoraRule, not both")
    super().__init__(rules=rules, disable_jit=disable_jit)
    self.adapted: dict[tuple[tuple[Any, ...], str], AdaptedWeight] = {}

  # -- the intercepted ops -------------------------------------------------------------

  def _dora_rule(self, op_name: str) -> DoraRule | None:
    rule = self._get_current_rule_and_op_id(op_name, only_rule=True)[0]
    return rule if isinstance(rule, DoraRule) else None

  def dot_general(self, lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None):
    """DoRA ``dot_general`` where a :class:`DoraRule` matches and ``rhs`` is a weight."""
    rule = self._dora_rule("dot_general")
    name = None if rule is None else self._weight_name(rhs)
    if name is None:
      return super().dot_general(lhs, rhs, dimension_numbers, precision,
                                 preferred_element_type, out_sharding=out_sharding)
    self._get_current_rule_and_op_id("dot_general")  # counts the op, as qwix's providers do
    if out_sharding is not None:
      raise NotImplementedError(f"DoRA on weight {name!r}: out_sharding is not supported")
    dn = tuple(tuple(tuple(int(i) for i in v) for v in pair) for pair in dimension_numbers)
    kw = _op_kwargs(precision, preferred_element_type)
    if (rule.weight_qtype is not None or isinstance(rhs, _private.WithAux)
        or isinstance(rhs, general.QuantizedWeight)):
      return self.quantized_base(rule, name, "dot_general", lhs, rhs, dn, kw)
    layout = general.dot_general_layout(dn, lhs.shape, rhs.shape)
    return self._dora(
        rule, name, layout, lhs, rhs,
        lambda x, a, b, m, s, **o: general.dora_dot_general(x, rhs, a, b, m, s, dn, **kw, **o),
        lambda d: lax.dot_general(d, rhs, dn, **kw))

  def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
             _dot_general=lax.dot_general, out_sharding=None):
    """DoRA ``einsum`` where a :class:`DoraRule` matches and the second operand is a weight."""
    rule = self._dora_rule("einsum")
    name = None
    if rule is not None and len(operands) == 2 and isinstance(einsum_str, str):
      name = self._weight_name(operands[1])
    if name is None:
      return super().einsum(einsum_str, *operands, precision=precision,
                            preferred_element_type=preferred_element_type,
                            _dot_general=_dot_general, out_sharding=out_sharding)
    self._get_current_rule_and_op_id("einsum")
    if out_sharding is not None or _dot_general is not lax.dot_general:
      raise NotImplementedError(
          f"DoRA on weight {name!r}: out_sharding / a custom _dot_general are not supported")
    lhs, rhs = operands
    spec = einsum_str.replace(" ", "")
    kw = _op_kwargs(precision, preferred_element_type)
    if (rule.weight_qtype is not None or isinstance(rhs, _private.WithAux)
        or isinstance(rhs, general.QuantizedWeight)):
      return self.quantized_base(rule, name, "einsum", lhs, rhs, spec, kw)
    layout = general.einsum_layout(spec, lhs.shape, rhs.shape)
    return self._dora(
        rule, name, layout, lhs, rhs,
        lambda x, a, b, m, s, **o: general.dora_einsum(spec, x, rhs, a, b, m, s, **kw, **o),
        lambda d: jnp.einsum(spec, d, rhs, **kw))

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    if self._dora_rule("conv_general_dilated") is not None and _private.find_param(
        rhs, _private.WithAux) is not None:
      raise NotImplementedError(
          "DoRA on convolutions through qwix is not implemented: exclude them from the "
          "DoraRule (module_path / op_names), or adapt nnx.Conv with dora_jax.apply_dora")
    return super().conv_general_dilated(lhs, rhs, *args, **kwargs)

  def quantized_base(self, rule: DoraRule, name: str, op_name: str, lhs, rhs, dims, kw):
    """QDoRA: DoRA over the quantized weight ``name`` (quantized here, from the float
    weight, on the first call that sees it, and kept in the module in its place).

    ``dims`` is the einsum spec or the ``dot_general`` dimension numbers, ``kw`` the
    op's ``precision``/``preferred_element_type``. The base term, ``aᵀŴ`` and ``dx``
    go through the weight's part-by-part contraction; ``magnitude = ‖Ŵ‖``.
    """
    from dora_jax import quantized
    if isinstance(rhs, _private.WithAux):
      raise NotImplementedError(
          f"DoRA on weight {name!r} ({op_name}): the weight was quantized by qwix (a "
          "QArray, one code per byte, dequantized whole by qwix's op); QDoRA quantizes the "
          "float weight itself: give the DoraRule weight_qtype= and the float model")
    if op_name == "einsum":
      layout = general.einsum_layout(dims, lhs.shape, rhs.shape)
    else:
      layout = general.dot_general_layout(dims, lhs.shape, rhs.shape)
    if isinstance(rhs, general.QuantizedWeight):
      weight = rhs
      if rule.weight_qtype is not None and _qtype_of(rule, name)[0] != rhs.qtype:
        raise ValueError(f"DoRA on weight {name!r}: it is quantized as {rhs.qtype}, but the "
                         f"rule has weight_qtype={rule.weight_qtype!r}")
    elif rule.weight_qtype is None:  # pragma: no cover - routed here only when quantized
      raise TypeError(f"DoRA on weight {name!r}: not quantized")
    else:
      weight = self._quantize_weight(rule, name, layout, rhs)
    if op_name == "einsum":
      dora = lambda x, a, b, m, s, **o: general.dora_einsum(dims, x, weight, a, b, m, s, **kw, **o)
      base = lambda d: quantized.quantized_einsum(dims, d, weight, **kw)
    else:
      dora = lambda x, a, b, m, s, **o: general.dora_dot_general(x, weight, a, b, m, s, dims,
                                                                 **kw, **o)
      base = lambda d: quantized.quantized_dot_general(d, weight, dims, **kw)
    return self._dora(rule, name, layout, lhs, weight, dora, base)

  def _quantize_weight(self, rule: DoraRule, name: str, layout: general.WeightLayout, rhs):
    """Quantize the module's float weight ``name`` in ``layout`` and put the quantized
    weight in its place (NNX: the ``nnx.Param``'s value; Linen: ``params``, which must
    be mutable: ``init``). Returns it cast as ``rhs`` (the op's operand) is."""
    from dora_jax import quantized
    qtype, block = _qtype_of(rule, name)
    module = _private.get_current_module()
    where = "/".join(map(str, module.path if isinstance(module, nn.Module)
                         else getattr(module, "qwix_path", ()))) or "<root>"
    if isinstance(module, nn.Module):
      if not module.is_mutable_collection("params"):
        raise ValueError(
            f"DoRA on weight {name!r} at {where}: the weight is float but the rule has "
            f"weight_qtype={rule.weight_qtype!r}; it is quantized when the model is "
            "initialised (init, or apply with mutable=['params']): use the params that "
            "returns")
      stored = module.get_variable("params", name)
    else:
      stored = getattr(module, name)
    value = stored.get_value() if isinstance(stored, nnx.Variable) else (
        stored.unbox() if isinstance(stored, nn.meta.AxisMetadata) else stored)
    if tuple(value.shape) != layout.shape:
      raise NotImplementedError(
          f"DoRA on weight {name!r} at {where}: stored as {tuple(value.shape)} but it enters "
          f"its op as {layout.shape}; quantizing it is not supported")
    try:
      qk = quantized.quantize_kernel(value, qtype, block_size=block, layout=layout)
    except ValueError as err:
      raise ValueError(f"DoRA on weight {name!r} at {where} (tile_size={block!r}): {err}") \
          from None
    if isinstance(module, nn.Module):
      module.put_variable("params", name, stored.replace_boxed(qk)
                          if isinstance(stored, nn.meta.AxisMetadata) else qk)
    else:
      stored.set_value(qk)
    return qk.astype(rhs.dtype)

  # -- a quantized weight passes through the model's code unchanged ---------------------

  def _weight_name(self, x) -> str | None:
    """The current module's weight ``x`` is (a quantized one by its codes), else ``None``."""
    if isinstance(x, general.QuantizedWeight):
      module = _private.get_current_module()
      if isinstance(module, nn.Module):
        items = [(n, v.unbox() if isinstance(v, nn.meta.AxisMetadata) else v)
                 for n, v in module.variables.get("params", {}).items()]
      else:
        items = [(n, v.get_value()) for n, v in vars(module).items()
                 if isinstance(v, nnx.Param)]
      codes = getattr(x, "codes", None)
      for n, v in items:
        if isinstance(v, general.QuantizedWeight) and (v is x or getattr(v, "codes", 0) is codes):
          return n
      return None
    return _private.find_param(x, _private.WithAux)

  def nn_param(self, module: nn.Module, name: str, *args, **kwargs):
    """Linen ``param``: a quantized param is returned as it is (no shape check)."""
    if module.has_variable("params", name):
      value = module.get_variable("params", name)
      inner = value.unbox() if isinstance(value, nn.meta.AxisMetadata) else value
      if isinstance(inner, general.QuantizedWeight):
        return inner
    return super().nn_param(module, name, *args, **kwargs)

  def promote_dtype(self, *args, **kwargs):
    """``promote_dtype`` with quantized weights cast by ``astype`` (as arrays are)."""
    nnx_style = len(args) == 1 and isinstance(args[0], (tuple, list))
    values = list(args[0]) if nnx_style else list(args)
    if not any(isinstance(v, general.QuantizedWeight) for v in values):
      return super().promote_dtype(*args, **kwargs)
    dtype = kwargs.get("dtype")
    if dtype is None:
      dtype = jnp.result_type(*[v.dtype if isinstance(v, general.QuantizedWeight) else v
                                for v in values if v is not None])
      if kwargs.get("inexact", True) and not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.promote_types(jnp.float32, dtype)
    out = [None if v is None else v.astype(dtype) if isinstance(v, general.QuantizedWeight)
           else jnp.asarray(v, dtype) for v in values]
    return tuple(out) if nnx_style else out

  def asarray(self, a, dtype=None, order=None, **kwargs):
    """``jnp.asarray``: a quantized weight is passed through (``astype`` for a dtype)."""
    if isinstance(a, general.QuantizedWeight):
      return a if dtype is None else a.astype(dtype)
    return super().asarray(a, dtype=dtype, order=order, **kwargs)

  # -- the DoRA op ---------------------------------------------------------------------

  def _adapters(self, rule: DoraRule, name: str, layout: general.WeightLayout, weight):
    a_shape, b_shape, _ = layout.adapter_shapes(rule.rank)
    dtype = jnp.dtype(rule.param_dtype)

    def init_a(key):
      if rule.lora_a_initializer is not None:
        return rule.lora_a_initializer(key, a_shape, dtype)
      return _adapter.init_lora_a(key, a_shape, layout.d_in, dtype)

    make = lambda suffix, init: _private.get_or_create_param(
        name + suffix, init, nnx_param_type=DoRAParam, need_rng=True)
    return (make("_lora_a", init_a),
            make("_lora_b", lambda key: jnp.zeros(b_shape, dtype)),
            make("_magnitude", lambda key: general.init_magnitude(weight, layout, dtype)))

  def _dora(self, rule: DoraRule, name: str, layout: general.WeightLayout, lhs, rhs,
            dora: Callable[..., jax.Array], base: Callable[[jax.Array], jax.Array]):
    module = _private.get_current_module()
    path = tuple(module.path if isinstance(module, nn.Module) else module.qwix_path)
    scale = lora_scale(rule.alpha, rule.rank, rslora=rule.rslora)
    prior = self.adapted.setdefault((path, name), AdaptedWeight(layout, scale))
    if prior != (layout, scale):
      raise NotImplementedError(
          f"{'/'.join(map(str, path))}: weight {name!r} enters ops in two layouts "
          f"({prior.layout} and {layout}); one DoRA adapter cannot serve both")
    a, b, m = self._adapters(rule, name, layout, rhs)
    if rule.dropout <= 0:
      return dora(lhs, a, b, m, scale, detach_norm=rule.detach_norm)
    dropped = nnx.Dropout(rule.dropout, deterministic=False)(
        lhs, rngs=_private.make_rng("dropout"))
    y = dora(dropped, a, b, m, scale, detach_norm=rule.detach_norm)
    acc = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(acc) + base(lhs - dropped).astype(acc)).astype(y.dtype)

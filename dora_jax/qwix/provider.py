"""``DoraProvider``: DoRA wherever qwix's LoRA goes (NNX and Linen).

qwix (Google's quantization and LoRA library, used by Tunix and MaxText)
intercepts ``jax.lax.dot_general`` / ``jax.numpy.einsum`` (and ``jnp.dot``) inside
the model and hands each call to a provider. :class:`DoraProvider` is a
``qwix.LoraProvider`` whose :class:`DoraRule`\\ s run the op whose second operand is a
module weight as DoRA through :mod:`dora_jax.general`, in the weight's own layout::

  y = m / ‖W + s·a·b‖ ⊙ (op(x, W) + s·op(x, a)·b)        (norm detached, as PEFT)

with the base term computed by the very op qwix intercepted (same precision and
``preferred_element_type``), so at PEFT's init (``b = 0``, ``m = ‖W‖``) the model
reproduces its base bit for bit. Per adapted weight ``<w>`` the module gets (qwix's
naming) ``<w>_lora_a [*B, *C, r]`` (PEFT's ``U(-1/√d_in, 1/√d_in)``),
``<w>_lora_b [*B, r, *O]`` (zeros) and ``<w>_magnitude [*B, *O]`` (``‖W‖``): NNX
:class:`dora_jax.nnx.DoRAParam` (an ``nnx.LoRAParam``), Linen entries of the
``params`` collection, as qwix's LoRA adapters are.

Rules without DoRA (plain ``qwix.LoraRule``\\ s, quantization rules) behave exactly as
in ``qwix.LoraProvider``. Linen einsum layers work (qwix 0.1.8's own
``LoraProvider.einsum`` sets an attribute on the frozen Linen module and fails;
DoRA rules never take that path). Dropout is qwix's (``make_rng('dropout')``,
always on when ``dropout > 0``), applied as PEFT does: adapter path only.

Quantized base weights (``weight_qtype=``, QDoRA) are not implemented: a
:class:`DoraRule` with ``weight_qtype`` raises in :meth:`DoraProvider.quantized_base`,
the one place a quantized base op would plug in.
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
  """

  rslora: bool = False
  param_dtype: Any = jnp.float32
  lora_a_initializer: Callable[..., jax.Array] | None = None


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
    name = None if rule is None else _private.find_param(rhs, _private.WithAux)
    if name is None:
      return super().dot_general(lhs, rhs, dimension_numbers, precision,
                                 preferred_element_type, out_sharding=out_sharding)
    self._get_current_rule_and_op_id("dot_general")  # counts the op, as qwix's providers do
    if out_sharding is not None:
      raise NotImplementedError(f"DoRA on weight {name!r}: out_sharding is not supported")
    if rule.weight_qtype is not None or isinstance(rhs, _private.WithAux):
      return self.quantized_base(rule, name, "dot_general", lhs, rhs)
    dn = tuple(tuple(tuple(int(i) for i in v) for v in pair) for pair in dimension_numbers)
    layout = general.dot_general_layout(dn, lhs.shape, rhs.shape)
    kw = _op_kwargs(precision, preferred_element_type)
    return self._dora(
        rule, name, layout, lhs, rhs,
        lambda x, a, b, m, s: general.dora_dot_general(x, rhs, a, b, m, s, dn, **kw),
        lambda d: lax.dot_general(d, rhs, dn, **kw))

  def einsum(self, einsum_str, *operands, precision=None, preferred_element_type=None,
             _dot_general=lax.dot_general, out_sharding=None):
    """DoRA ``einsum`` where a :class:`DoraRule` matches and the second operand is a weight."""
    rule = self._dora_rule("einsum")
    name = None
    if rule is not None and len(operands) == 2 and isinstance(einsum_str, str):
      name = _private.find_param(operands[1], _private.WithAux)
    if name is None:
      return super().einsum(einsum_str, *operands, precision=precision,
                            preferred_element_type=preferred_element_type,
                            _dot_general=_dot_general, out_sharding=out_sharding)
    self._get_current_rule_and_op_id("einsum")
    if out_sharding is not None or _dot_general is not lax.dot_general:
      raise NotImplementedError(
          f"DoRA on weight {name!r}: out_sharding / a custom _dot_general are not supported")
    lhs, rhs = operands
    if rule.weight_qtype is not None or isinstance(rhs, _private.WithAux):
      return self.quantized_base(rule, name, "einsum", lhs, rhs)
    spec = einsum_str.replace(" ", "")
    layout = general.einsum_layout(spec, lhs.shape, rhs.shape)
    kw = _op_kwargs(precision, preferred_element_type)
    return self._dora(
        rule, name, layout, lhs, rhs,
        lambda x, a, b, m, s: general.dora_einsum(spec, x, rhs, a, b, m, s, **kw),
        lambda d: jnp.einsum(spec, d, rhs, **kw))

  def conv_general_dilated(self, lhs, rhs, *args, **kwargs):
    if self._dora_rule("conv_general_dilated") is not None and _private.find_param(
        rhs, _private.WithAux) is not None:
      raise NotImplementedError(
          "DoRA on convolutions through qwix is not implemented: exclude them from the "
          "DoraRule (module_path / op_names), or adapt nnx.Conv with dora_jax.apply_dora")
    return super().conv_general_dilated(lhs, rhs, *args, **kwargs)

  def quantized_base(self, rule: DoraRule, name: str, op_name: str, lhs, rhs):
    """Hook for DoRA on a quantized base (QDoRA): the base op would run on qwix's
    quantized weight and the norm's ``‖W‖²``/``aᵀW`` on the same. Not implemented."""
    raise NotImplementedError(
        f"DoRA on weight {name!r} ({op_name}) with a quantized base (weight_qtype="
        f"{rule.weight_qtype!r}) is not implemented yet (QDoRA)")

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
      return dora(lhs, a, b, m, scale)
    dropped = nnx.Dropout(rule.dropout, deterministic=False)(
        lhs, rngs=_private.make_rng("dropout"))
    y = dora(dropped, a, b, m, scale)
    acc = jnp.promote_types(y.dtype, jnp.float32)
    return (y.astype(acc) + base(lhs - dropped).astype(acc)).astype(y.dtype)

"""Model surgery for Flax NNX: add DoRA adapters to a model, merge them, remove them.

Typical use::

  model = apply_dora(model, targets=r".*(q|k|v|o)_proj", rank=16, alpha=32,
                     rngs=nnx.Rngs(0))
  print_trainable_parameters(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
  ...  # train with nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
  served = merge(model)            # plain Flax layers, merged kernels
  freeze_scales(model)             # or: unmerged inference with a cached norm

Third-party layers (MaxText's ``DenseGeneral``, Tunix-style ``Einsum`` modules, any
module whose own weight enters ``jnp.einsum``/``lax.dot_general`` with the input)
are adapted at the op level from a trace of the model's call arguments::

  apply_dora(model, targets=r".*(query|key|value|out|wi_0|wi_1|wo)", rank=8, alpha=16,
             rngs=nnx.Rngs(0), example_inputs=(tokens, positions))

Paths are the ``'/'``-joined attribute path of a layer from the model root,
e.g. ``layers/0/mlp/up_proj`` (list indices and dict keys included).

Resuming training: :func:`merge` never touches the adapted model (it returns a
new one that shares the unchanged arrays), so keep the adapted model, or its
``nnx.state(model, nnx.LoRAParam)``, to continue training after serving a merged
copy. :func:`unmerge` drops the adapters and returns the original layers, whose
kernels were never modified (bit-identical), so there is no PEFT-style
``W'/g − s·a·b`` round trip and no rounding drift.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib

from dora_jax import _adapter
from dora_jax._checks import check_bool, check_float_dtype, check_real_scalar
from dora_jax.nnx import discover as _discover
from dora_jax.nnx import op as _op
from dora_jax.nnx import quantize as _quant
from dora_jax.nnx import registry
from dora_jax.nnx import trace as _trace
from dora_jax.nnx.base import AdapterSite, DoRALayer

#: ``targets``: a regular expression (full match against the path) or a predicate.
Targets = Union[str, "re.Pattern[str]", Callable[[str, nnx.Module], bool]]

#: ``targets`` value that selects every layer of a registered type whose wrapper
#: declares ``all_linear = True`` (``Linear``, ``LinearGeneral``, ``Einsum``: as PEFT's
#: ``"all-linear"``, but output heads are not excluded), and, with ``example_inputs``,
#: every other module whose own weight enters a contraction with the input.
ALL_LINEAR = "all-linear"


def _owns_params(module: nnx.Module) -> bool:
  """Whether the module holds base weights of its own (a layer, not a pure container)."""
  return bool(_trace.own_params(module))


def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """``(path, module)`` for every module below the root, excluding DoRA internals."""
  return [(p, m) for p, m in registry.walk(model) if p]


def adaptable_paths(model: nnx.Module, *, example_inputs: tuple | None = None,
                    example_kwargs: dict | None = None) -> list[str]:
  """Paths of the layers :func:`apply_dora` can adapt: registered types (``Linear``,
  ``LinearGeneral``, ``Einsum``, ``Embed``, ``Conv``, :func:`dora_jax.nnx.register`\\ ed)
  and, with ``example_inputs``, every module whose own weight enters a contraction in
  ``model(*example_inputs, **example_kwargs)``."""
  paths = {p for p, m in _modules(model) if registry.wrapper_for(m) is not None
           or _quant.is_quantized_module(m)}
  if example_inputs is not None:
    others = [(p, m) for p, m in _modules(model)
              if p not in paths and not registry.is_adapted(m) and _owns_params(m)]
    if others:
      found = _discover.contractions_of(model, others, example_inputs, example_kwargs)
      paths |= {p for p, c in found.items() if c}
  return sorted(paths)


def dora_layers(model: nnx.Module) -> list[tuple[str, AdapterSite]]:
  """``(path, site)`` for every adapted weight of ``model``, sorted by path (``""``: the root).

  A wrapper layer is its own site; an op-level adapted module gives one site per
  adapted weight (at its path, or ``<path>/<weight>`` when it has several).
  """
  return registry.sites(model)


def adapted_paths(model: nnx.Module) -> list[str]:
  """Paths of the adapted weights (:func:`dora_layers`)."""
  return [p for p, _ in dora_layers(model)]


def _adapted_modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  return [(p, m) for p, m in registry.walk(model) if registry.is_adapted(m)]


def _matcher(targets: Targets) -> Callable[[str, nnx.Module], bool]:
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return targets
  if targets == ALL_LINEAR:
    return lambda path, module: getattr(registry.wrapper_for(module), "all_linear", False)
  if isinstance(targets, str):
    try:
      pattern = re.compile(targets)
    except re.error as err:
      raise ValueError(f"targets is not a valid regular expression: {targets!r} ({err})") from err
  elif isinstance(targets, re.Pattern):
    pattern = targets
  else:
    raise TypeError(
        "targets must be a regex string, a compiled pattern, 'all-linear' or a callable "
        f"(path, module) -> bool, got {type(targets).__name__}")
  return lambda path, module: pattern.fullmatch(path) is not None


def _replace_modules(root: nnx.Module, replacements: dict[int, nnx.Module]) -> None:
  """Swap every reference to a replaced module (shared references included)."""
  for parent_path, node in list(nnx.iter_graph(root)):
    impl = graphlib.get_node_impl(node) if graphlib.is_node(node) else None
    if impl is None or isinstance(node, nnx.Variable):
      continue
    for key, child in list(impl.node_dict(node).items()):
      new = replacements.get(id(child))
      if new is None:
        continue
      set_key = getattr(impl, "set_key", None)
      if set_key is not None:
        set_key(node, key, new)
      elif isinstance(node, (list, dict)):
        node[key] = new
      else:
        where = "/".join(str(p) for p in (*parent_path, key))
        raise TypeError(
            f"cannot replace the layer at {where!r}: its container "
            f"{type(node).__name__} is immutable; use nnx.List/nnx.Dict or a list")


# -- QDoRA: quantized frozen weights ------------------------------------------------


class _Weight(NamedTuple):
  """How a weight enters its contraction (what :func:`dora_jax.nnx.op.site_specs` reads)."""

  layout: Any
  chain: tuple


def _quantizable_type(module: nnx.Module, where: str, qtype: str) -> None:
  """Refuse, naming the layer kind, a registered layer whose weight cannot be quantized."""
  from dora_jax.nnx import DoRAConv, DoRAEmbed
  wrapper = registry.wrapper_for(module)
  if isinstance(module, _quant.LINEAR_TYPES) and wrapper in (
      registry.WRAPPERS[nnx.Linear], registry.WRAPPERS[nnx.LinearGeneral],
      registry.WRAPPERS[nnx.Einsum]):
    return
  if wrapper is DoRAEmbed:
    why = ("nnx.Embed layers cannot have a quantized base: DoRA on an embedding gathers "
           "rows of the table, which a quantized weight's contraction does not do")
  elif wrapper is DoRAConv:
    why = "nnx.Conv layers cannot have a quantized base (no quantized convolution here)"
  else:
    why = (f"{type(module).__name__} is adapted by the registered wrapper "
           f"{getattr(wrapper, '__name__', wrapper)}, which has no quantized form")
  raise NotImplementedError(
      f"base_dtype={qtype!r}: {why} (layer {where or '<root>'!r}). Leave it out of targets "
      "(adapt it in another apply_dora call without base_dtype)")


def _quantized_plan(wrapped, traced, found, quantized, qtype, block_size):
  """With ``base_dtype``: every matched layer becomes an op-level site of a quantized
  weight (registered types from their own layout, traced modules from the trace); matched
  ``Quantized<Base>`` modules are adapted from their configuration. Validates it all
  (nothing is changed here). Returns ``(wrapped, traced, found)``."""
  traced, found = dict(traced), dict(found)
  if qtype:
    for key, (path, module) in wrapped.items():
      _quantizable_type(module, path, qtype)
      layout, chain = _quant.registered_layout(module, path or "<root>")
      traced[key] = (path, module)
      found[path] = {"kernel": _Weight(layout, chain)}
    wrapped = {}
  for key, (path, module) in quantized.items():
    traced[key] = (path, module)
    found[path] = {p: _Weight(layout, ()) for p, layout in _quant.config(module).sites}
  if qtype:
    for key, (path, module) in traced.items():
      for param, weight in found[path].items():
        where = f"{path or '<root>'}/{param}"
        if any(kind != "convert" for kind, _ in weight.chain):
          raise NotImplementedError(
              f"base_dtype={qtype!r}: {where} is reshaped or transposed between its storage "
              f"and its contraction ({weight.chain}); quantizing it is not supported")
        _quant.check_quantizable(_quant.param_value(module, param), weight.layout, qtype,
                                 block_size, where)
  return wrapped, traced, found


def _quantize_in_place(traced, specs, quantized, qtype, block_size) -> None:
  """Quantize the traced modules' adapted weights (``qtype``), and give the matched
  ``Quantized<Base>`` modules their own class back, before they are adapted."""
  for key, (_, module) in traced.items():
    if key in quantized:
      _quant.unmark(module)
    elif qtype:
      _quant.quantize_params(module, {s.param: s.layout for s in specs[key]}, qtype,
                             block_size)


def quantize_base(model: nnx.Module, *, targets: Targets, base_dtype: str = "nf4",
                  block_size: int | None = None, example_inputs: tuple | None = None,
                  example_kwargs: dict | None = None) -> nnx.Module:
  """Quantize the frozen weights of the matching layers in place, without adapters.

  The layers :func:`apply_dora` would adapt with ``base_dtype`` (same ``targets``,
  ``block_size``, ``example_inputs``) keep their Variables, whose values become
  quantized weights, and become ``Quantized<Base>`` modules computing the quantized
  base model (:mod:`dora_jax.nnx.quantize`). :func:`apply_dora` then adapts them
  (QDoRA over a quantized base), and :func:`dora_jax.load_adapter` loads a PEFT
  adapter into them. In place; returns ``model`` (a bare layer: itself).

  Raises:
    as :func:`apply_dora` with ``base_dtype``.
  """
  if base_dtype is None:
    raise ValueError("base_dtype must be a quantization type for quantize_base, got None")
  before = {id(m) for _, m in _adapted_modules(model)}
  # the same selection, validation and quantization as apply_dora, then the (rank-1,
  # throwaway) adapters removed again
  out = apply_dora(model, targets=targets, rank=1, alpha=1.0, rngs=nnx.Rngs(0),
                   example_inputs=example_inputs, example_kwargs=example_kwargs,
                   base_dtype=base_dtype, block_size=block_size)
  for _, module in _adapted_modules(out):
    if id(module) not in before:
      _op.strip(module)
  return out


def _detach_kwargs(wrapper: type, detach_norm: bool) -> dict[str, bool]:
  """``{"detach_norm": False}`` for the exact gradient, else ``{}`` (so wrappers registered
  with the older signature keep working); ``TypeError`` if ``wrapper`` cannot take it."""
  if detach_norm:
    return {}
  if "detach_norm" not in inspect.signature(wrapper.__init__).parameters:
    raise TypeError(f"apply_dora(detach_norm=False): the registered wrapper {wrapper.__name__} "
                    "takes no detach_norm argument; add detach_norm: bool = True to its "
                    "__init__ and pass it to DoRALayer._init_config")
  return {"detach_norm": False}


def apply_dora(model: nnx.Module, *, targets: Targets, rank: int, alpha: float,
               rslora: bool = False, dropout: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs, example_inputs: tuple | None = None,
               example_kwargs: dict | None = None, base_dtype: str | None = None,
               block_size: int | None = None, detach_norm: bool = True) -> nnx.Module:
  """Adapt the matching layers of ``model`` with DoRA, in place.

  Registered layer types (``Linear``, ``LinearGeneral``, ``Einsum`` in any layout,
  ``Embed``, ``Conv``, subclasses that keep their ``__call__``, and types given to
  :func:`dora_jax.nnx.register`) are replaced by their wrappers. Every other
  matching module that holds ``nnx.Param``\\ s of its own is adapted at the op level
  (:mod:`dora_jax.nnx.op`): ``model(*example_inputs, **example_kwargs)`` is traced
  abstractly (no FLOPs) to find which of its weights enter a ``jnp.einsum`` or
  ``lax.dot_general`` with the input, and how; the module stays in place.

  Every base weight keeps its Variable and state path (``.../kernel``); the adapters
  (:class:`dora_jax.nnx.DoRAParam`) are added beside it. At PEFT's init (Kaiming-
  uniform ``A``, zero ``B``, ``m = ‖W‖``) the model computes exactly what it computed
  before.

  Args:
    model: an NNX module.
    targets: a regex matched in full against each layer's ``'/'``-joined path
      (e.g. ``r"layers/\\d+/mlp/(up|down)_proj"``), ``"all-linear"`` (see
      :data:`ALL_LINEAR`), or a predicate ``(path, module) -> bool``. Matching
      modules that hold no weights of their own (containers) are ignored.
    rank: LoRA rank ``r``, ``1 <= r <= min(d_in, d_out)`` for every adapted weight.
    alpha: LoRA alpha (scale ``alpha / r``, or ``alpha / √r`` with ``rslora``).
    rslora: rank-stabilised scaling.
    dropout: PEFT's ``lora_dropout`` on the adapter path.
    param_dtype: adapter parameter dtype (default float32).
    rngs: ``params`` stream initialises ``lora_a``; ``dropout`` stream for dropout.
    example_inputs: the model's positional call arguments (a tuple of arrays or
      other values), needed to adapt modules that are not of a registered type.
    example_kwargs: the model's keyword call arguments for that trace.
    base_dtype: QDoRA: ``"nf4"``, ``"int4"`` (blockwise along ``d_in``), ``"int8"`` or
      ``"fp8"`` (e4m3, one scale per output) quantizes the frozen weight of every
      adapted layer in place (:func:`dora_jax.quantize_kernel`; the adapters stay in
      ``param_dtype``) and starts the magnitude at the norm of the dequantized
      weight ``‖Ŵ‖`` (PEFT's QDoRA), so the model at init computes what the quantized
      base model (:func:`unmerge`) computes, bit for bit. The quantized layers are
      adapted at the op level (:mod:`dora_jax.nnx.quantize`); ``Embed`` and ``Conv``
      layers cannot be quantized (an error names them). ``None``: a float base
      (already quantized layers, e.g. from :func:`quantize_base`, are adapted as they are).
    block_size: elements per scale along ``d_in`` for nf4/int4 (default 64; must divide
      every adapted layer's ``d_in``), or per block for int8/fp8 (default: one scale per
      output). Only with ``base_dtype``.
    detach_norm: ``True`` (default, PEFT's semantics and the DoRA paper's §4.3):
      the norm ``‖W + s·a·b‖`` is a constant in the backward. ``False``: every
      adapted layer takes the exact DoRA gradient through the norm, in factored
      form (:func:`dora_jax.dora_dense`; one more product with each kernel per
      step, no ``[d_in, d_out]`` temporary). The forward is the same either way;
      :func:`dora_jax.io.save_adapter` records it.

  Returns:
    ``model``, modified in place (for a bare registered layer passed as ``model``
    whose empty path matches, e.g. ``"all-linear"``, its new wrapper; with
    ``base_dtype``, the layer itself, adapted in place).

  Raises:
    ValueError: nothing adaptable matched (the message lists the adaptable paths),
      a rank outside ``[1, min(d_in, d_out)]``, a matched layer is already adapted,
      an unknown ``base_dtype``, a ``block_size`` that does not divide a layer's
      ``d_in``, or ``base_dtype`` on layers that are already quantized.
    TypeError: a matched module of an unregistered type and no ``example_inputs``.
    NotImplementedError: a matched module whose weight never enters a contraction in
      the trace, or enters one DoRA cannot adapt (the message names it and why); a
      layer kind that cannot be quantized (``Embed``, ``Conv``) with ``base_dtype``.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  _adapter.check_dropout(dropout)
  check_bool("detach_norm", detach_norm)
  alpha = check_real_scalar("alpha", alpha)
  param_dtype = check_float_dtype("param_dtype", param_dtype)
  if example_inputs is not None and not isinstance(example_inputs, tuple):
    raise TypeError("example_inputs must be a tuple of the model's positional call "
                    f"arguments, got {type(example_inputs).__name__}")
  qtype = _quant.check_base_dtype(base_dtype, block_size)
  all_linear = isinstance(targets, str) and targets == ALL_LINEAR
  match = _matcher(targets)
  wrapped: dict[int, tuple[str, nnx.Module]] = {}
  traced: dict[int, tuple[str, nnx.Module]] = {}
  quantized: dict[int, tuple[str, nnx.Module]] = {}  # Quantized<Base> modules (no adapters)
  already = []
  for path, module in _modules(model):
    if registry.is_adapted(module):
      if match(path, module) or (all_linear and _op.is_adapted(module)):
        already.append(path)
      continue
    if _quant.is_quantized_module(module):
      if match(path, module) or all_linear:
        quantized.setdefault(id(module), (path, module))
      continue
    if match(path, module) and registry.wrapper_for(module) is not None:
      wrapped.setdefault(id(module), (path, module))
    elif (registry.wrapper_for(module) is None and _owns_params(module)
          and (match(path, module) if not all_linear else example_inputs is not None)):
      traced.setdefault(id(module), (path, module))
  if already:
    raise ValueError(
        "DoRA is already applied to: " + ", ".join(already)
        + ". Applying it twice would stack adapters; merge(model) or unmerge(model) first")
  root_wrapper = registry.wrapper_for(model)
  if _quant.is_quantized_module(model) and not wrapped and not traced and not quantized and (
      match("", model) or all_linear):
    quantized[id(model)] = ("", model)  # a bare quantized layer: adapted in place
  if qtype and not wrapped and not traced and root_wrapper is not None and match("", model):
    wrapped[id(model)] = ("", model)  # a bare layer to quantize: adapted in place
  if (not wrapped and not traced and not quantized and root_wrapper is not None
      and match("", model)):
    # A bare layer: nothing holds it, so the wrapper is returned (not in place).
    return root_wrapper(model, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                        param_dtype=param_dtype, rngs=rngs,
                        **_detach_kwargs(root_wrapper, detach_norm))
  if (not wrapped and not traced and not quantized and root_wrapper is None
      and _owns_params(model) and not registry.is_adapted(model)
      and not _quant.is_quantized_module(model)
      and (match("", model) or (all_linear and example_inputs is not None))):
    # A bare custom layer: adapted in place at the op level.
    traced[id(model)] = ("", model)
  if traced and example_inputs is None:
    listed = ", ".join(f"{p or '<root>'} ({type(m).__name__})" for p, m in traced.values())
    raise TypeError(
        "targets matched layers DoRA cannot adapt without a trace: " + listed
        + ". These are not of a registered type (" + ", ".join(
            f"nnx.{t.__name__}" for t in registry.WRAPPERS)
        + "); pass example_inputs=(...) (the model's call arguments) so apply_dora can "
        "trace which of their weights enter a contraction, or register a wrapper with "
        "dora_jax.nnx.register")

  found = {}
  if traced:
    found = _discover.contractions_of(model, list(traced.values()), example_inputs,
                                      example_kwargs)
    if not all_linear:
      idle = [f"{p or '<root>'} ({type(m).__name__})" for p, m in traced.values()
              if not found.get(p)]
      if idle:
        raise NotImplementedError(
            "targets matched modules whose weights never enter a contraction with the "
            "input in model(*example_inputs): " + ", ".join(idle)
            + ". DoRA adapts weights that enter jnp.einsum / lax.dot_general (norms, "
            "embeddings looked up with take, and modules not called are not adaptable); "
            "narrow targets")
    traced = {k: (p, m) for k, (p, m) in traced.items() if found.get(p)}
  if not wrapped and not traced and not quantized:
    available = adaptable_paths(model, example_inputs=example_inputs,
                                example_kwargs=example_kwargs)
    hint = "" if example_inputs is not None else (
        " (modules of other types need example_inputs= to be found)")
    raise ValueError(
        f"targets {targets!r} matched no adaptable layer. Adaptable paths: "
        + (", ".join(available) if available else "(none)") + hint)

  if qtype or quantized:  # quantized weights: every such layer is adapted at the op level
    wrapped, traced, found = _quantized_plan(wrapped, traced, found, quantized, qtype, block_size)

  # Validate every layer first (rank bounds, layouts, names), then adapt: all or nothing.
  specs = {}
  for key, (path, module) in sorted(traced.items(), key=lambda kv: kv[1][0]):
    specs[key] = _op.site_specs(module, found[path])
    _op.validate(module, specs[key], rank, dropout, path or "<root>")
  wrappers: dict[int, nnx.Module] = {}
  for key, (path, module) in sorted(wrapped.items(), key=lambda kv: kv[1][0]):
    wrapper = registry.wrapper_for(module)
    wrappers[key] = wrapper(module, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                            param_dtype=param_dtype, rngs=rngs, path=path,
                            **_detach_kwargs(wrapper, detach_norm))
  _quantize_in_place(traced, specs, quantized, qtype, block_size)
  for key, (path, module) in sorted(traced.items(), key=lambda kv: kv[1][0]):
    _op.adapt(module, specs[key], rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
              param_dtype=param_dtype, rngs=rngs, where=path or "<root>",
              detach_norm=detach_norm)
  _replace_modules(model, wrappers)
  return model


def _require_adapted(model: nnx.Module, what: str) -> list[tuple[str, AdapterSite]]:
  layers = dora_layers(model)
  if not layers:
    raise ValueError(
        f"{what}: the model has no DoRA layers (call apply_dora first). "
        f"Adaptable paths: {', '.join(adaptable_paths(model)) or '(none)'}")
  return layers


def _swap(model: nnx.Module, inplace: bool, what: str, merged: bool,
          requantize: bool = False) -> nnx.Module:
  _require_adapted(model, what)
  if isinstance(model, DoRALayer):  # the root itself: nothing to replace it in
    return model.merged_layer() if merged else model.base_layer()
  target = model if inplace else nnx.clone(model)
  replacements = {}
  for _, module in _adapted_modules(target):
    if isinstance(module, DoRALayer):
      replacements[id(module)] = module.merged_layer() if merged else module.base_layer()
    elif merged:
      _op.merge_in_place(module, requantize=requantize)
    else:
      _op.strip(module)
  _replace_modules(target, replacements)
  return target


def merge(model: nnx.Module, *, inplace: bool = False, requantize: bool = False) -> nnx.Module:
  """Return ``model`` with every DoRA layer replaced by a plain layer of its base type.

  The new layer's kernel is ``g ⊙ (W + s·a·b)`` (:func:`dora_jax.merge_kernel`),
  its bias the base bias; ``x·W' + bias`` equals the adapted output up to
  rounding. Op-level adapted modules get their class back with merged weights. By
  default the adapted model is left untouched (the result is a copy sharing its
  unchanged arrays), so training can resume from it.

  Layers with a quantized base (QDoRA) get the float merged weight
  ``g ⊙ (Ŵ + s·a·b)`` in the weight's float dtype (bf16 for a bf16 model), or, with
  ``requantize=True``, that weight quantized again with the same type and block size
  (the layer then computes the quantized base op over it; it carries the
  quantization error of the merged weight).

  Raises:
    ValueError: the model has no DoRA layers.
  """
  return _swap(model, inplace, "merge", merged=True, requantize=bool(requantize))


def unmerge(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
  """Return ``model`` with the adapters removed: each DoRA layer becomes its original layer.

  The kernels are bit-identical to the ones :func:`apply_dora` wrapped (they are
  frozen and :func:`merge` never writes them), so this is exact. Quantized layers
  (QDoRA) become ``Quantized<Base>`` modules holding the same quantized weights: the
  quantized base model. Keep
  ``nnx.state(model, nnx.LoRAParam)`` first if the adapters are still needed.

  Raises:
    ValueError: the model has no DoRA layers.
  """
  return _swap(model, inplace, "unmerge", merged=False)


def freeze_scales(model: nnx.Module) -> nnx.Module:
  """Turn on cached-norm inference in every DoRA layer and fill the caches now.

  Each layer then reuses its norm while a stamp of its adapters matches (cheap to
  check), and recomputes and re-stores it after the adapters change, so a stale
  norm is never used. In place; returns ``model``.
  """
  for _, layer in _require_adapted(model, "freeze_scales"):
    layer.cache_norm = True
    layer.refresh_cache()
  return model


def refresh_scales(model: nnx.Module) -> nnx.Module:
  """Recompute every DoRA layer's cached norm, and the cached kernel column norms
  where :func:`cache_base_norms` stored them (e.g. after replacing base kernels)."""
  for _, layer in _require_adapted(model, "refresh_scales"):
    layer.refresh_cache()
  return model


def cache_base_norms(model: nnx.Module) -> nnx.Module:
  """Store the frozen kernels' column norms ``‖W_j‖²`` in every DoRA layer, so each
  training call skips re-reading its kernel for them (one full read of ``W`` per call).

  The kernels are frozen, so the values stay valid while training the
  adapters. The rule for changing a kernel (loading other base weights into
  an adapted model, say): call :func:`refresh_scales` (or this function)
  afterwards; layers built by :func:`unmerge` start without the cache. In
  place; returns ``model``.

  Example:
    >>> import jax.numpy as jnp, dora_jax
    >>> from flax import nnx
    >>> model = nnx.Sequential(nnx.Linear(16, 8, rngs=nnx.Rngs(0)))
    >>> model = dora_jax.apply_dora(model, targets=".*", rank=4, alpha=8, rngs=nnx.Rngs(1))
    >>> layer = dora_jax.cache_base_norms(model).layers[0]
    >>> bool(jnp.allclose(layer.base_sq_norm[...], jnp.sum(layer.kernel[...] ** 2, axis=0)))
    True
  """
  for _, layer in _require_adapted(model, "cache_base_norms"):
    if hasattr(layer, "cache_base_norm"):
      layer.cache_base_norm()
  return model


def unfreeze_scales(model: nnx.Module) -> nnx.Module:
  """Turn cached-norm inference off: every call recomputes the norm (training mode)."""
  for _, layer in _require_adapted(model, "unfreeze_scales"):
    layer.cache_norm = False
  return model


class ParamSummary(NamedTuple):
  """What :func:`print_trainable_parameters` reports."""

  trainable: int
  total: int
  layers: list[tuple[str, str]]

  @property
  def fraction(self) -> float:
    return self.trainable / self.total if self.total else 0.0


def _count(state) -> int:
  """Parameters in ``state`` (a quantized weight counts its float shape's elements)."""
  total = 0
  for _, var in nnx.to_flat_state(state):
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    if _quant.is_quantized(value):
      total += math.prod(value.shape)
    else:
      total += sum(x.size for x in jax.tree.leaves(value))
  return int(total)


def print_trainable_parameters(model: nnx.Module, *, verbose: bool = True,
                               print_fn: Callable[[str], Any] = print) -> ParamSummary:
  """Print the adapted layers and the trainable (``nnx.LoRAParam``) / total parameter counts.

  ``total`` counts every ``nnx.Param`` (the adapters included, the norm caches
  and RNG state not). Returns the numbers as a :class:`ParamSummary`.
  """
  trainable = _count(nnx.state(model, nnx.LoRAParam))
  total = _count(nnx.state(model, nnx.Param))
  layers = [(p, layer.describe()) for p, layer in dora_layers(model)]
  if verbose:
    for path, desc in layers:
      print_fn(f"  {path}: {desc}")
  summary = ParamSummary(trainable, total, layers)
  print_fn(f"DoRA layers: {len(layers)} | trainable params: {trainable:,} || "
           f"all params: {total:,} || trainable%: {100 * summary.fraction:.4f}")
  return summary

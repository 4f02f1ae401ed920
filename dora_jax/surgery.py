"""Model surgery for Flax NNX: add DoRA adapters to a model, merge them, remove them.

Typical use::

  model = apply_dora(model, targets=r".*(q|k|v|o)_proj", rank=16, alpha=32,
                     rngs=nnx.Rngs(0))
  print_trainable_parameters(model)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
  ...  # train with nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))
  served = merge(model)            # plain Flax layers, merged kernels
  freeze_scales(model)             # or: unmerged inference with a cached norm

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

import re
from typing import Any, Callable, NamedTuple, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import graphlib

from dora_jax import _adapter
from dora_jax._checks import check_float_dtype, check_real_scalar
from dora_jax.nnx import WRAPPERS, DoRALayer

#: ``targets``: a regular expression (full match against the path) or a predicate.
Targets = Union[str, "re.Pattern[str]", Callable[[str, nnx.Module], bool]]

#: ``targets`` value that selects every ``Linear``/``LinearGeneral``/``Einsum`` layer
#: and registered wrappers that declare ``all_linear = True`` (as PEFT's
#: ``"all-linear"``, but output heads are not excluded: pass a regex or predicate
#: to skip them).
ALL_LINEAR = "all-linear"


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def _owns_variables(module: nnx.Module) -> bool:
  """Whether the module holds Variables directly (a layer, not a pure container)."""
  return any(isinstance(v, nnx.Variable) for v in vars(module).values())


def _modules(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """``(path, module)`` for every module below the root, excluding DoRA internals."""
  out = []
  dora_prefixes: list[str] = []
  for path, module in nnx.iter_modules(model):
    if not path:
      continue
    p = _path_str(path)
    out.append((p, module))
    if isinstance(module, DoRALayer):
      dora_prefixes.append(p + "/")
  return [(p, m) for p, m in out if not any(p.startswith(q) for q in dora_prefixes)]


def adaptable_paths(model: nnx.Module) -> list[str]:
  """Paths of the layers :func:`apply_dora` can adapt (``Linear``, ``LinearGeneral``,
  ``Einsum`` and any type registered in :data:`dora_jax.nnx.WRAPPERS`)."""
  return sorted(p for p, m in _modules(model) if type(m) in WRAPPERS)


def adapted_paths(model: nnx.Module) -> list[str]:
  """Paths of the layers that carry DoRA adapters."""
  return sorted(p for p, m in _modules(model) if isinstance(m, DoRALayer))


def dora_layers(model: nnx.Module) -> list[tuple[str, DoRALayer]]:
  """``(path, layer)`` for every DoRA layer of ``model``, sorted by path (``""``: the root)."""
  if isinstance(model, DoRALayer):
    return [("", model)]
  return sorted(((p, m) for p, m in _modules(model) if isinstance(m, DoRALayer)),
                key=lambda pm: pm[0])


def _matcher(targets: Targets) -> Callable[[str, nnx.Module], bool]:
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return targets
  if targets == ALL_LINEAR:
    return lambda path, module: getattr(WRAPPERS.get(type(module)), "all_linear",
                                        type(module) in WRAPPERS)
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
        where = _path_str((*parent_path, key))
        raise TypeError(
            f"cannot replace the layer at {where!r}: its container "
            f"{type(node).__name__} is immutable; use nnx.List/nnx.Dict or a list")


def apply_dora(model: nnx.Module, *, targets: Targets, rank: int, alpha: float,
               rslora: bool = False, dropout: float = 0.0, param_dtype=jnp.float32,
               rngs: nnx.Rngs) -> nnx.Module:
  """Wrap the matching ``Linear``/``LinearGeneral``/``Einsum`` layers of ``model`` with DoRA.

  Works in place and returns ``model``. Every layer's base Variables are reused
  (state paths ``.../kernel``, ``.../bias`` unchanged); the adapters
  ``lora_a``, ``lora_b``, ``magnitude`` (:class:`dora_jax.nnx.DoRAParam`) are
  added next to them. At init the model computes what it computed before.

  Args:
    model: an NNX module.
    targets: a regex matched in full against each layer's ``'/'``-joined path
      (e.g. ``r"layers/\\d+/mlp/(up|down)_proj"``), ``"all-linear"`` for every
      ``Linear``/``LinearGeneral``/``Einsum`` layer, or a predicate ``(path, module) -> bool``. Matching
      modules that hold no Variables of their own (containers such as a
      block or a list) are ignored; matching layers of another type are an error.
    rank: LoRA rank ``r``, ``1 <= r <= min(d_in, d_out)`` for every matched layer.
    alpha: LoRA alpha (scale ``alpha / r``, or ``alpha / √r`` with ``rslora``).
    rslora: rank-stabilised scaling.
    dropout: PEFT's ``lora_dropout`` on the adapter path.
    param_dtype: adapter parameter dtype (default float32).
    rngs: ``params`` stream initialises ``lora_a``; ``dropout`` stream for dropout.

  Returns:
    ``model``, modified in place (for a bare ``Linear``/... passed as ``model``
    whose empty path matches, e.g. ``"all-linear"``, its new wrapper).

  Raises:
    ValueError: nothing matched (the message lists the adaptable paths), a
      rank outside ``[1, min(d_in, d_out)]``, or a matched layer is already
      adapted.
    TypeError: a matched layer is not of a supported type.
  """
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive int, got {rank!r}")
  _adapter.check_dropout(dropout)
  alpha = check_real_scalar("alpha", alpha)
  param_dtype = check_float_dtype("param_dtype", param_dtype)
  match = _matcher(targets)
  selected: dict[int, tuple[str, nnx.Module]] = {}
  already, unsupported = [], []
  for path, module in _modules(model):
    if not match(path, module):
      continue
    if isinstance(module, DoRALayer):
      already.append(path)
    elif type(module) in WRAPPERS:
      selected.setdefault(id(module), (path, module))
    elif _owns_variables(module):
      unsupported.append(f"{path} ({type(module).__name__})")
  if already:
    raise ValueError(
        "DoRA is already applied to: " + ", ".join(already)
        + ". Applying it twice would stack adapters; merge(model) or unmerge(model) first")
  if unsupported:
    raise TypeError(
        "targets matched layers DoRA cannot adapt: " + ", ".join(unsupported)
        + ". Supported types: " + ", ".join(f"nnx.{t.__name__}" for t in WRAPPERS))
  if not selected and type(model) in WRAPPERS and match("", model):
    # A bare layer: nothing holds it, so the wrapper is returned (not in place).
    return WRAPPERS[type(model)](model, rank=rank, alpha=alpha, rslora=rslora,
                                 dropout=dropout, param_dtype=param_dtype, rngs=rngs)
  if not selected:
    available = adaptable_paths(model)
    raise ValueError(
        f"targets {targets!r} matched no adaptable layer. Adaptable paths: "
        + (", ".join(available) if available else "(none: the model has no "
           "nnx.Linear/LinearGeneral/Einsum layers)"))

  wrappers: dict[int, nnx.Module] = {}
  # Validate every layer first (rank bounds, layouts), then wrap: all or nothing.
  for key, (path, module) in sorted(selected.items(), key=lambda kv: kv[1][0]):
    cls = WRAPPERS[type(module)]
    wrappers[key] = cls(module, rank=rank, alpha=alpha, rslora=rslora, dropout=dropout,
                        param_dtype=param_dtype, rngs=rngs, path=path)
  _replace_modules(model, wrappers)
  return model


def _require_adapted(model: nnx.Module, what: str) -> list[tuple[str, DoRALayer]]:
  layers = dora_layers(model)
  if not layers:
    raise ValueError(
        f"{what}: the model has no DoRA layers (call apply_dora first). "
        f"Adaptable paths: {', '.join(adaptable_paths(model)) or '(none)'}")
  return layers


def _swap(model: nnx.Module, inplace: bool, what: str,
          build: Callable[[DoRALayer], nnx.Module]) -> nnx.Module:
  _require_adapted(model, what)
  if isinstance(model, DoRALayer):  # the root itself: nothing to replace it in
    return build(model)
  target = model if inplace else nnx.clone(model)
  replacements = {id(layer): build(layer) for _, layer in dora_layers(target)}
  _replace_modules(target, replacements)
  return target


def merge(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
  """Return ``model`` with every DoRA layer replaced by a plain layer of its base type.

  The new layer's kernel is ``g ⊙ (W + s·a·b)`` (:func:`dora_jax.merge_kernel`),
  its bias the base bias; ``x·W' + bias`` equals the adapted output up to
  rounding. By default the adapted model is left untouched (the result is a
  copy sharing its unchanged arrays), so training can resume from it.

  Raises:
    ValueError: the model has no DoRA layers.
  """
  return _swap(model, inplace, "merge", lambda layer: layer.merged_layer())


def unmerge(model: nnx.Module, *, inplace: bool = False) -> nnx.Module:
  """Return ``model`` with the adapters removed: each DoRA layer becomes its original layer.

  The kernels are bit-identical to the ones :func:`apply_dora` wrapped (they are
  frozen and :func:`merge` never writes them), so this is exact. Keep
  ``nnx.state(model, nnx.LoRAParam)`` first if the adapters are still needed.

  Raises:
    ValueError: the model has no DoRA layers.
  """
  return _swap(model, inplace, "unmerge", lambda layer: layer.base_layer())


def freeze_scales(model: nnx.Module) -> nnx.Module:
  """Turn on cached-norm inference in every DoRA layer and fill the caches now.

  Each layer then reuses its norm ``[d_out]`` while a stamp of its adapters
  matches (cheap to check), and recomputes and re-stores it after the adapters
  change, so a stale norm is never used. In place; returns ``model``.
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
  """Store the frozen kernels' column norms ``‖W_j‖² [d_out]`` in every DoRA
  Dense/LinearGeneral/Einsum layer, so each training call skips re-reading its
  kernel for them (one full read of ``W`` per call).

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
  return int(sum(x.size for x in jax.tree.leaves(state)))


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

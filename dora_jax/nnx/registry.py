"""Which wrapper adapts which layer type, and the one walk over a model's modules.

:data:`WRAPPERS` maps a base layer type to the :class:`~dora_jax.nnx.DoRALayer`
subclass that replaces it. A module is matched by ``isinstance``, most specific
registered type first (its class's MRO); an instance of a *subclass* is wrapped
only if the wrapper reproduces it (:meth:`DoRALayer.wraps_subclass`: by default,
when the subclass keeps the registered type's ``__call__``); otherwise, and for
every unregistered type, :func:`dora_jax.apply_dora` adapts the module at the op
level (:mod:`dora_jax.nnx.op`) from a trace of ``example_inputs``.

:func:`register` is the hook for layer types that need special handling (a
hand-written wrapper for a custom layer).
"""

from __future__ import annotations

from typing import Any, Iterator

from flax import nnx

from dora_jax.nnx import op as _op
from dora_jax.nnx.base import AdapterSite, DoRALayer
from dora_jax.nnx.conv import DoRAConv
from dora_jax.nnx.dense import DoRADense, DoRALinearGeneral
from dora_jax.nnx.einsum import DoRAEinsum
from dora_jax.nnx.embed import DoRAEmbed

#: Base layer type -> its DoRA wrapper.
WRAPPERS: dict[type, type[DoRALayer]] = {
    nnx.Linear: DoRADense,
    nnx.LinearGeneral: DoRALinearGeneral,
    nnx.Einsum: DoRAEinsum,
    nnx.Embed: DoRAEmbed,
    nnx.Conv: DoRAConv,
}


def register(layer_type: type, wrapper: type[DoRALayer]) -> None:
  """Adapt ``layer_type`` (and subclasses it reproduces) with ``wrapper`` from now on.

  ``wrapper`` is a :class:`~dora_jax.nnx.DoRALayer` subclass constructed as
  ``wrapper(base, *, rank, alpha, rslora, dropout, param_dtype, rngs, path)`` that
  keeps the base layer's weight Variables at their attribute names (see
  :class:`~dora_jax.nnx.DoRADense` for the pattern). Registering a type that is
  already registered replaces its wrapper.

  Example::

    class DoRAMyProj(dora_jax.nnx.DoRALayer):
      def __init__(self, base, *, rank, alpha, rslora=False, dropout=0.0,
                   param_dtype=jnp.float32, rngs, path=""):
        ...
    dora_jax.nnx.register(MyProj, DoRAMyProj)
  """
  if not isinstance(layer_type, type) or not issubclass(layer_type, nnx.Module):
    raise TypeError(f"layer_type must be an nnx.Module subclass, got {layer_type!r}")
  if not isinstance(wrapper, type) or not issubclass(wrapper, DoRALayer):
    raise TypeError(f"wrapper must be a dora_jax.nnx.DoRALayer subclass, got {wrapper!r}")
  WRAPPERS[layer_type] = wrapper


def registered_type(module: Any) -> type | None:
  """The most specific registered type ``module`` is an instance of, or ``None``."""
  for cls in type(module).__mro__:
    if cls in WRAPPERS:
      return cls
  return None


def wrapper_for(module: Any) -> type[DoRALayer] | None:
  """The wrapper that adapts ``module``, or ``None`` (op level, or not adaptable)."""
  if is_adapted(module):
    return None
  cls = registered_type(module)
  if cls is None:
    return None
  wrapper = WRAPPERS[cls]
  if type(module) is cls or wrapper.wraps_subclass(module, cls):
    return wrapper
  return None


def wrap(base: nnx.Module, **kwargs: Any) -> DoRALayer:
  """The DoRA wrapper for ``base`` (a registered layer type: ``Linear``, ``LinearGeneral``,
  ``Einsum``, ``Embed``, ``Conv``, their reproducible subclasses, or :func:`register`\\ ed)."""
  wrapper = wrapper_for(base)
  if wrapper is None:
    cls = registered_type(base)
    extra = (f" ({type(base).__name__} subclasses {cls.__name__} but overrides its call: "
             "adapt it with dora_jax.apply_dora(..., example_inputs=...))") if cls else ""
    raise TypeError(
        f"cannot adapt {type(base).__name__} with a wrapper{extra}: registered types are "
        + ", ".join(t.__name__ for t in WRAPPERS))
  return wrapper(base, **kwargs)


def is_adapted(module: Any) -> bool:
  """Whether ``module`` carries DoRA adapters (a wrapper, or an op-level adapted module)."""
  return isinstance(module, DoRALayer) or _op.is_adapted(module)


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(p) for p in path)


def walk(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """``(path, module)`` for every module of ``model`` (the root is ``""``), in graph order,
  each shared module once, without DoRA internals (a wrapper's submodules, an op-level
  module's dropout).

  Paths are the ``'/'``-joined attribute path from the root (list indices and dict keys
  included), e.g. ``layers/0/mlp/up_proj``.
  """
  modules = [(_path_str(path), path, module) for path, module in nnx.iter_modules(model)]
  internal: list[str] = []  # DoRA-internal modules: skipped with their descendants
  for _, path, module in modules:
    if isinstance(module, DoRALayer):
      internal.extend(_path_str((*path, k)) for k, v in vars(module).items()
                      if isinstance(v, nnx.Module))
    elif _op.is_adapted(module) and _op.DROPOUT_NAME in vars(module):
      internal.append(_path_str((*path, _op.DROPOUT_NAME)))
  for p, _, module in modules:
    if not any(p == q or p.startswith(q + "/") for q in internal):
      yield p, module


def sites(model: nnx.Module) -> list[tuple[str, AdapterSite]]:
  """``(path, site)`` for every adapted weight, sorted by path.

  A wrapper is its own site (at its path); an op-level adapted module with one adapted
  weight gives one site at its path, one with several weights one site per weight at
  ``<path>/<weight>``.
  """
  out = []
  for path, module in walk(model):
    if isinstance(module, DoRALayer):
      out.append((path, module))
    elif _op.is_adapted(module):
      found = _op.sites(module)
      if len(found) == 1:
        out.append((path, found[0]))
      else:
        out.extend((f"{path}/{s.spec.param}" if path else s.spec.param, s) for s in found)
  return sorted(out, key=lambda ps: ps[0])


def lookup(model: nnx.Module) -> dict[str, Any]:
  """``{path: module}`` for every module (:func:`walk`), op-level adapted modules replaced
  by their sites (:func:`sites` paths): what I/O resolves PEFT module names against."""
  out: dict[str, Any] = {}
  for path, module in walk(model):
    if _op.is_adapted(module):
      found = _op.sites(module)
      if len(found) == 1:
        out[path] = found[0]
      else:
        out.update({(f"{path}/{s.spec.param}" if path else s.spec.param): s for s in found})
    else:
      out[path] = module
  return out

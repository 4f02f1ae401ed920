"""Find, from one abstract run of the model on ``example_inputs``, which weights of the
candidate modules enter which contraction.

The candidates' classes are swapped for recording subclasses for the duration of a
``jax.eval_shape`` of ``model(*example_inputs, **example_kwargs)`` (no FLOPs, nothing
written to the model): each call of a candidate is traced by
:func:`dora_jax.nnx.trace.contractions`. Classes are restored whatever happens.
"""

from __future__ import annotations


import jax
import numpy as np
from flax import nnx

from dora_jax.nnx import trace as _trace

_PROBE_ATTR = "_dora_probe"
_PROBES: dict[type, type] = {}


class _Probe(nnx.Module):
  """Mixin recording the contractions of each call (see :func:`contractions_of`)."""

  def __call__(self, *args, **kwargs):
    path, records = vars(self)[_PROBE_ATTR]
    base = _PROBE_BASES[type(self)]
    records.setdefault(path, []).append(
        _trace.contractions(self, base.__call__, args, kwargs, where=path or "<root>"))
    return base.__call__(self, *args, **kwargs)


_PROBE_BASES: dict[type, type] = {}


def _probe_class(base: type) -> type:
  cls = _PROBES.get(base)
  if cls is None:
    cls = type(base.__name__, (_Probe, base), {"__module__": base.__module__})
    _PROBES[base], _PROBE_BASES[cls] = cls, base
  return cls


class _Records(dict):
  """``{path: [contractions of each call]}``; hashable by identity (a static attribute)."""

  __hash__ = object.__hash__

  def __eq__(self, other):
    return self is other


def contractions_of(model: nnx.Module, candidates: list[tuple[str, nnx.Module]],
                    example_inputs: tuple, example_kwargs: dict | None
                    ) -> dict[str, dict[str, _trace.Contraction]]:
  """``{path: {weight: contraction}}`` for the candidates called by
  ``model(*example_inputs, **example_kwargs)`` (uncalled candidates are absent).

  Raises:
    NotImplementedError: a weight enters a contraction DoRA cannot adapt (see
      :mod:`dora_jax.nnx.trace`), or enters several contractions in different layouts,
      or is sliced/stacked between its storage and the op (scanned layers).
  """
  if not isinstance(example_inputs, tuple):
    raise TypeError("example_inputs must be a tuple of the model's positional call "
                    f"arguments, got {type(example_inputs).__name__}")
  example_kwargs = dict(example_kwargs or {})
  records = _Records()
  swapped = []
  try:
    for path, module in candidates:
      original = type(module)
      module.__class__ = _probe_class(original)
      vars(module)[_PROBE_ATTR] = (path, records)
      swapped.append((module, original))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten((example_inputs, example_kwargs))
    dynamic = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

    def run(state, values):
      filled = list(leaves)
      for i, v in zip(dynamic, values):
        filled[i] = v
      args, kwargs = jax.tree.unflatten(tree, filled)
      out = nnx.merge(graphdef, state)(*args, **kwargs)
      return [x for x in jax.tree.leaves(out) if isinstance(x, jax.Array)]

    jax.eval_shape(run, state, [leaves[i] for i in dynamic])
  finally:
    for module, original in swapped:
      module.__class__ = original
      vars(module).pop(_PROBE_ATTR, None)

  stored = {path: module for path, module in candidates}
  out: dict[str, dict[str, _trace.Contraction]] = {}
  for path, calls in records.items():
    per_weight: dict[str, _trace.Contraction] = {}
    for found in calls:
      for c in found:
        prior = per_weight.get(c.param)
        if prior is not None and (prior.layout != c.layout or prior.chain != c.chain):
          raise NotImplementedError(
              f"{path}: weight {c.param!r} enters contractions in different layouts "
              f"({prior.layout} and {c.layout}); one adapter cannot serve both")
        per_weight.setdefault(c.param, c)
    for name, c in per_weight.items():
      weight = getattr(stored[path], name)
      want = jax.eval_shape(lambda w, c=c: _trace.apply_chain(w, c.chain),
                            jax.ShapeDtypeStruct(weight.shape, weight.dtype)).shape
      if tuple(want) != c.kernel_shape:
        raise NotImplementedError(
            f"{path}: weight {name!r} is stored as {getattr(stored[path], name).shape} but "
            f"enters its op as {c.kernel_shape} (sliced or stacked, e.g. scanned layers): "
            "not supported; build the model with unstacked layers")
    out[path] = per_weight
  return out

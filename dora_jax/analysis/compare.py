"""ΔM/ΔD of every matching kernel of a model, one table row per layer.

Parameter trees are nested dicts/lists of arrays, ``nnx.State`` or an
``nnx.Module``; leaves are named by their ``'/'``-joined path (``layers/0/kernel``).
A trailing ``/value`` (how Orbax stores an ``nnx.Variable``) is dropped.

Which tensors are layers: every 2-D floating-point leaf, except LoRA factors.
A module (a path prefix) that holds ``kernel`` next to ``lora_a``/``lora_b``
(siblings, or in a child ``lora`` as in ``nnx.LoRALinear``) is merged first:

* with a ``magnitude`` sibling (DoRA): ``g ⊙ (W + s·a·b)`` (:func:`dora_jax.merge_kernel`);
* without (LoRA): ``W + s·a·b``.

``s`` (``alpha / r``) is not stored in the parameters: pass ``scale``.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax._checks import accumulation_dtype, check_weights
from dora_jax.analysis.decompose import Decomposition, check_kernel_pair, decompose
from dora_jax.dense import merge_kernel

Scale = float | Callable[[str], float]
Layout = Literal["flax", "torch"]

_ADAPTER_LEAVES = ("lora_a", "lora_b")
_MAX_LISTED = 60


@dataclasses.dataclass(frozen=True)
class LayerRow:
  """One kernel of one tuned checkpoint against the base.

  Attributes:
    checkpoint: label of the tuned checkpoint (a step, a file name).
    layer: ``'/'``-joined path of the kernel, e.g. ``layers/0/kernel``.
    shape: ``(d_in, d_out)`` in the Flax layout.
    source: how the tuned kernel was obtained: ``"kernel"`` (as stored: full
      fine-tune or merged adapter), ``"lora"`` or ``"dora"`` (merged here).
    delta_m: ΔM, mean over the ``d_out`` columns of ``|m_j − m0_j|`` (paper eq. 4).
    delta_d: ΔD, mean over the columns of ``1 − cos(W_j, W0_j)`` (paper eq. 5).
    base_magnitude: mean base column norm ``mean_j m0_j`` (the scale of ΔM).
    columns: the per-column vectors (numpy ``[d_out]``), see :class:`Decomposition`.
  """

  checkpoint: str
  layer: str
  shape: tuple[int, int]
  source: str
  delta_m: float
  delta_d: float
  base_magnitude: float
  columns: Decomposition = dataclasses.field(repr=False, compare=False)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten_params(params: Any) -> dict[str, Any]:
  """``{'/'-joined path: array}`` for a nested dict/list, ``nnx.State`` or ``nnx.Module``."""
  from flax import nnx

  if isinstance(params, nnx.Module):
    params = nnx.state(params)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  flat: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [_key_name(k) for k in path]
    if len(names) > 1 and names[-1] == "value":
      names = names[:-1]
    flat["/".join(names)] = leaf
  return flat


def _is_float_matrix(value) -> bool:
  if np.ndim(value) != 2:
    return False
  try:
    return bool(jnp.issubdtype(jnp.result_type(value), jnp.floating))
  except TypeError:
    return False


def _join(prefix: str, name: str) -> str:
  return f"{prefix}/{name}" if prefix else name


def _adapter(flat: Mapping[str, Any], module: str):
  """``(lora_a, lora_b, magnitude | None)`` of the module at ``module``, or ``None``."""
  for holder in (module, _join(module, "lora")):
    a, b = flat.get(_join(holder, "lora_a")), flat.get(_join(holder, "lora_b"))
    if a is not None and b is not None:
      return a, b, flat.get(_join(module, "magnitude"))
  return None


def _scale_for(scale: Scale | None, module: str) -> float:
  if scale is None:
    raise ValueError(
        f"{module or '<root>'!r} holds LoRA/DoRA adapters (lora_a, lora_b): pass "
        "scale= (alpha / r, or alpha / sqrt(r) with rsLoRA) to merge them"
    )
  return float(scale(module) if callable(scale) else scale)


def _check_layout(layout: str) -> None:
  if layout not in ("flax", "torch"):
    raise ValueError(f"layout must be 'flax' or 'torch', got {layout!r}")


def layer_names(flat: Mapping[str, Any]) -> list[str]:
  """Sorted paths of the candidate layers of a flat tree: 2-D float leaves, LoRA factors excepted."""
  return sorted(p for p, v in flat.items()
                if p.rsplit("/", 1)[-1] not in _ADAPTER_LEAVES and _is_float_matrix(v))


def effective_kernel(flat: Mapping[str, Any], path: str, *, scale: Scale | None = None,
                     layout: Layout = "flax") -> tuple[jax.Array, str]:
  """``(kernel [d_in, d_out], source)`` of the layer at ``path`` of a flat tree, adapters merged.

  Args:
    flat: ``{path: array}`` as from :func:`flatten_params`.
    path: one of :func:`layer_names` of ``flat``.
    scale: the LoRA scale ``s`` for merging adapters: a number, or a function
      of the module path (the kernel's path without ``/kernel``).
    layout: ``"flax"`` (``[d_in, d_out]``, the default) or ``"torch"``
      (``weight [d_out, d_in]``: the matrix is transposed; adapters are not
      merged in this layout).

  Returns:
    The kernel (merged in float32, float64 for float64 inputs, where adapters
    were found) and its source: ``"kernel"``, ``"lora"`` or ``"dora"``.
  """
  _check_layout(layout)
  value = flat[path]
  if layout == "torch":
    return jnp.asarray(value).T, "kernel"
  leaf = path.rsplit("/", 1)[-1]
  module = path[: -len(leaf)].rstrip("/")
  adapter = _adapter(flat, module) if leaf == "kernel" else None
  if adapter is None:
    return jnp.asarray(value), "kernel"
  a, b, magnitude = adapter
  s = _scale_for(scale, module)
  kernel = jnp.asarray(value)  # float64 only with x64 enabled
  kernel = kernel.astype(accumulation_dtype(kernel))
  if magnitude is not None:
    return merge_kernel(kernel, jnp.asarray(a), jnp.asarray(b), jnp.asarray(magnitude), s), "dora"
  check_weights(kernel, a, b)
  delta = jnp.dot(jnp.asarray(a).astype(kernel.dtype), jnp.asarray(b).astype(kernel.dtype),
                  precision=jax.lax.Precision.HIGHEST)
  return kernel + s * delta, "lora"


def effective_kernels(params: Any, *, scale: Scale | None = None,
                      layout: Layout = "flax") -> dict[str, tuple[jax.Array, str]]:
  """``{path: (kernel, source)}`` for every layer of a tree (see :func:`effective_kernel`)."""
  flat = flatten_params(params)
  return {p: effective_kernel(flat, p, scale=scale, layout=layout) for p in layer_names(flat)}


def _listing(names: Sequence[str]) -> str:
  names = sorted(names)
  shown = ", ".join(names[:_MAX_LISTED])
  more = len(names) - _MAX_LISTED
  return shown + (f", ... ({more} more)" if more > 0 else "") if names else "(none)"


def compare(base_params: Any, tuned_params: Any, *, layers: str | re.Pattern | None = None,
            checkpoint: str = "tuned", scale: Scale | None = None,
            layout: Layout = "flax") -> list[LayerRow]:
  """ΔM and ΔD of every matching kernel of ``tuned_params`` against ``base_params``.

  Works for full fine-tunes (tuned kernels as stored), merged LoRA/DoRA
  checkpoints (likewise) and unmerged LoRA/DoRA adapters (merged here, see the
  module docstring); the base may itself be an adapter tree (at init it merges
  to its kernel).

  Args:
    base_params: pre-trained parameters (a tree, ``nnx.State`` or flat dict).
    tuned_params: fine-tuned parameters with the same layer paths.
    layers: a regular expression searched (``re.search``) in each layer path;
      ``None`` keeps every 2-D float leaf of the base.
    checkpoint: the label stored in each row (a step, a file name).
    scale: LoRA scale ``s`` for merging adapters (number or ``path -> number``).
    layout: ``"flax"`` ``[d_in, d_out]`` or ``"torch"`` ``[d_out, d_in]``.

  Returns:
    One :class:`LayerRow` per matching layer, sorted by path.

  Raises:
    ValueError: ``layers`` is not a valid regular expression, no layer matches
      it (the message lists the available names), a matching layer is missing
      from the tuned tree or is not a 2-D float tensor there (its dtype and
      shape are named), a shape differs (the message names the tensor and both
      shapes), a kernel holds NaN/inf, or adapters need ``scale``.
  """
  _check_layout(layout)
  pattern = layer_pattern(layers)
  base, tuned = flatten_params(base_params), flatten_params(tuned_params)
  available = layer_names(base)
  names = [p for p in available if pattern is None or pattern.search(p)]
  if not names:
    others = [p for p in base if p not in available and pattern is not None and pattern.search(p)]
    raise ValueError(
        f"no layer matches {pattern.pattern if pattern else None!r}; "
        f"available 2-D tensors: {_listing(available)}"
        + (f"; matching but not 2-D floating point: {_described(base, others)}" if others else "")
    )
  tuned_names = set(layer_names(tuned))
  unfit = [p for p in names if p not in tuned_names and p in tuned]
  if unfit:
    raise ValueError(f"checkpoint {checkpoint!r} holds {_described(tuned, unfit)}: not 2-D "
                     "floating point, as in the base")
  missing = [p for p in names if p not in tuned_names]
  if missing:
    raise ValueError(
        f"checkpoint {checkpoint!r} lacks {_listing(missing)}; "
        f"it has: {_listing(list(tuned_names))}"
    )
  rows = []
  for path in names:  # one layer at a time: only the selected ones are merged
    w0, _ = effective_kernel(base, path, scale=scale, layout=layout)
    w, source = effective_kernel(tuned, path, scale=scale, layout=layout)
    check_kernel_pair(w0, w, name=path)
    for which, kernel in (("the base", w0), (f"checkpoint {checkpoint!r}", w)):
      bad = int(np.size(kernel) - jnp.sum(jnp.isfinite(kernel)))
      if bad:
        raise ValueError(f"{which}: {path} has {bad} non-finite value(s) (NaN/inf) out of "
                         f"{np.size(kernel)}; its ΔM and ΔD are undefined")
    cols = jax.tree.map(np.asarray, decompose(w0, w))
    rows.append(LayerRow(checkpoint=checkpoint, layer=path, shape=tuple(w0.shape), source=source,
                         delta_m=float(cols.delta_m), delta_d=float(cols.delta_d),
                         base_magnitude=float(np.mean(cols.base_magnitude)), columns=cols))
  return rows


def layer_pattern(layers: str | re.Pattern | None) -> re.Pattern | None:
  """``layers`` compiled; an invalid regular expression raises ``ValueError`` saying so."""
  if layers is None or isinstance(layers, re.Pattern):
    return layers
  if not isinstance(layers, str):
    raise TypeError(f"layers must be a regular expression (str or re.Pattern) or None, "
                    f"got {type(layers).__name__}")
  try:
    return re.compile(layers)
  except re.error as err:
    raise ValueError(f"layers: {layers!r} is not a valid regular expression ({err})") from None


def _described(flat: Mapping[str, Any], names: Sequence[str]) -> str:
  """``name (dtype, shape)`` for each of ``names``."""
  def one(name):
    value = flat[name]
    try:
      dtype = jnp.result_type(value)
    except TypeError:
      dtype = type(value).__name__
    return f"{name} ({dtype}, shape {tuple(np.shape(value))})"
  return ", ".join(one(n) for n in sorted(names)[:_MAX_LISTED])


def pearson(rows: Sequence[LayerRow]) -> float:
  """Pearson correlation of ΔD and ΔM over ``rows`` (float64); NaN if undefined.

  Undefined means fewer than two rows or a constant ΔD or ΔM.
  """
  if len(rows) < 2:
    return math.nan
  dd = np.array([r.delta_d for r in rows], np.float64)
  dm = np.array([r.delta_m for r in rows], np.float64)
  dd, dm = dd - dd.mean(), dm - dm.mean()
  denom = math.sqrt(float(np.sum(dd * dd)) * float(np.sum(dm * dm)))
  return float(np.sum(dd * dm) / denom) if denom > 0 else math.nan


_COLUMNS = ("checkpoint", "layer", "shape", "source", "delta_M", "delta_D", "mean_M0")


def _cells(row: LayerRow) -> tuple[str, ...]:
  return (row.checkpoint, row.layer, "x".join(map(str, row.shape)), row.source,
          f"{row.delta_m:.4e}", f"{row.delta_d:.4e}", f"{row.base_magnitude:.4e}")


def format_table(rows: Sequence[LayerRow]) -> str:
  """Plain-text table (aligned columns, numbers right-aligned) plus the correlations.

  The footer gives the Pearson correlation of ΔD and ΔM over all rows (layers ×
  checkpoints, as in the paper) and, with several checkpoints, over the layers
  of each checkpoint alone.
  """
  cells = [_COLUMNS] + [_cells(r) for r in rows]
  widths = [max(len(c[i]) for c in cells) for i in range(len(_COLUMNS))]
  numeric = {4, 5, 6}
  lines = []
  for n, line in enumerate(cells):
    parts = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))]
    lines.append("  ".join(parts).rstrip())
    if n == 0:
      lines.append("  ".join("-" * w for w in widths))
  lines.append(f"pearson(delta_D, delta_M) = {pearson(rows):+.4f} over {len(rows)} points")
  labels = list(dict.fromkeys(r.checkpoint for r in rows))
  if len(labels) > 1:  # across layers only, without the growth with training time
    within = [f"{label} {pearson([r for r in rows if r.checkpoint == label]):+.4f}"
              for label in labels]
    lines.append("  within each checkpoint (across layers): " + ", ".join(within))
  return "\n".join(lines)


def rows_to_csv(rows: Sequence[LayerRow]) -> str:
  """CSV text (header + one line per row) of the per-matrix values, full precision."""
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(("checkpoint", "layer", "d_in", "d_out", "source", "delta_m", "delta_d",
                   "base_magnitude"))
  for r in rows:
    writer.writerow((r.checkpoint, r.layer, r.shape[0], r.shape[1], r.source,
                     repr(r.delta_m), repr(r.delta_d), repr(r.base_magnitude)))
  return buf.getvalue()

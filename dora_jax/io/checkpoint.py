"""Orbax checkpoints of the adapter state alone, or of the whole training state.

:func:`save_adapter_state` writes, in one Orbax checkpoint directory:

* ``adapter``: ``nnx.state(model, nnx.LoRAParam)`` as a pure dict (the
  ``lora_a``/``lora_b``/``magnitude`` arrays, bit for bit, in their dtypes);
* ``optimizer`` (when given): ``nnx.state(optimizer)``, i.e. the step count
  and the optax state (e.g. Adam's moments);
* ``rng`` (by default): the model's ``nnx.RngState`` (dropout key and counter),
  PRNG keys stored as their raw ``uint32`` data, so dropout masks continue
  where they stopped;
* ``dora_jax`` (JSON): every DoRA layer's path, rank, alpha, rsLoRA, dropout and
  ``detach_norm``, checked on restore.

Restoring into a model built the same way (same base model, same
:func:`dora_jax.apply_dora` calls, any random init) and an optimizer built with
the same ``optax`` transformation continues training bit-identically.
Base weights are not saved (they are frozen: reload them from where they came
from).

Crash safety: the checkpoint is written beside ``directory`` and swapped in by
rename once complete and fsync'ed (:func:`dora_jax.io.atomic.replace_directory`),
so after any interruption ``directory`` holds the previous checkpoint or the
new one, complete (with ``overwrite=True`` too: the old one is deleted only
after the new one is in place). An interrupted swap is finished by the next
save or restore. Restores read under the directory's shared lock, so they never
overlap a save of it. (A checkpoint saved by several JAX processes is written
by Orbax directly, as before: Orbax's own temporary directory and rename.)

Needs ``orbax-checkpoint`` (``pip install 'dora_jax[io]'``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dora_jax import surgery
from dora_jax.io import atomic

_FORMAT = 1
#: Orbax's JSON metadata files (checked before Orbax parses them).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")


def _ocp():
  try:
    import orbax.checkpoint as ocp
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("Orbax checkpoints need orbax-checkpoint: pip install 'dora_jax[io]'") from err
  return ocp


def _is_key(x: Any) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _flat(tree: Any) -> dict[str, Any]:
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _layer_info(model: nnx.Module) -> dict[str, dict[str, Any]]:
  return {path: {"rank": layer.rank, "alpha": layer.alpha, "rslora": layer.rslora,
                 "dropout": layer.dropout_rate, "detach_norm": layer.detach_norm}
          for path, layer in surgery.dora_layers(model)}


def _with_defaults(layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Saved layer entries with ``detach_norm`` (absent from older checkpoints: PEFT's ``True``)."""
  return {path: {"detach_norm": True, **info} for path, info in layers.items()}


def _items(model: nnx.Module, optimizer: nnx.Optimizer | None, include_rng: bool
           ) -> dict[str, Any]:
  items = {"adapter": nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))}
  if optimizer is not None:
    items["optimizer"] = nnx.to_pure_dict(nnx.state(optimizer))
  if include_rng:
    rng = nnx.to_pure_dict(nnx.state(model, nnx.RngState))
    if jax.tree.leaves(rng):  # models without RNG streams (no dropout) have nothing to save
      items["rng"] = jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, rng)
  return items


def save_adapter_state(model: nnx.Module, directory: str | os.PathLike,
                       optimizer: nnx.Optimizer | None = None, *,
                       include_rng: bool = True, overwrite: bool = False) -> Path:
  """Save the DoRA adapters (and optionally the optimizer and RNG state) with Orbax.

  Args:
    model: an NNX model with DoRA layers.
    directory: checkpoint directory (must not exist unless ``overwrite``).
    optimizer: an ``nnx.Optimizer`` over the adapters, for resumable training.
    include_rng: also save the model's RNG streams (dropout keys and counters).
    overwrite: replace an existing checkpoint at ``directory``.

  Returns:
    The checkpoint directory (absolute).
  """
  ocp = _ocp()
  info = _layer_info(model)
  if not info:
    raise ValueError("save_adapter_state: the model has no DoRA layers")
  items = _items(model, optimizer, include_rng)
  meta = {"format": _FORMAT, "layers": info, "items": sorted(items)}
  args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
  args["dora_jax"] = ocp.args.JsonSave(meta)
  directory = Path(directory).absolute()
  if os.path.lexists(directory) and not directory.is_dir():
    raise NotADirectoryError(f"{directory}: exists and is not a directory")
  composite = ocp.args.Composite(**args)
  if jax.process_count() > 1:  # every process writes its shards: Orbax coordinates
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(directory, composite, force=overwrite)
    return directory
  with atomic.replace_directory(directory, managed=None, overwrite=overwrite) as staging:
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
      ckpt.save(staging, composite)
  return directory


def _compare(name: str, saved: Any, target: Any, directory: Path) -> None:
  """Raise ``ValueError`` listing missing/unexpected paths and shape/dtype mismatches."""
  s, t = _flat(saved), _flat(target)
  problems = []
  if set(s) - set(t):
    problems.append("in the checkpoint but not the model: " + ", ".join(sorted(set(s) - set(t))))
  if set(t) - set(s):
    problems.append("in the model but not the checkpoint: " + ", ".join(sorted(set(t) - set(s))))
  for key in sorted(set(s) & set(t)):
    have = tuple(getattr(s[key], "shape", ()))
    want = tuple(np.shape(t[key]))
    if have != want:
      problems.append(f"{key}: checkpoint shape {have}, model shape {want}")
    sd, td = getattr(s[key], "dtype", None), getattr(t[key], "dtype", None)
    if sd is not None and td is not None and np.dtype(sd) != np.dtype(td):
      problems.append(f"{key}: checkpoint dtype {np.dtype(sd)}, model dtype {np.dtype(td)}")
  if problems:
    raise ValueError(f"{directory}: the {name} state does not fit: " + "; ".join(problems))


def restore_adapter_state(model: nnx.Module, directory: str | os.PathLike,
                          optimizer: nnx.Optimizer | None = None, *,
                          include_rng: bool = True) -> None:
  """Restore what :func:`save_adapter_state` wrote into ``model`` (and ``optimizer``), in place.

  The model must already carry the same DoRA layers (same paths, ranks,
  alphas, rsLoRA, dropout, ``detach_norm``; a checkpoint from before
  ``detach_norm`` was recorded counts as ``True``) and the optimizer the same optax state structure.
  Everything is checked against the checkpoint before anything is written.

  Raises:
    ValueError: a different adapter layout, missing items (e.g. an optimizer
      requested but not saved), or shape/dtype mismatches, with the paths.
  """
  ocp = _ocp()
  directory = Path(directory).absolute()
  with atomic.reading(directory, managed=None):
    _restore(ocp, model, directory, optimizer, include_rng)


def _check_metadata_files(directory: Path) -> None:
  """Every JSON metadata file Orbax keeps must be UTF-8 JSON; else an error naming the file.

  (Orbax itself raises bare ``UnicodeDecodeError``/``JSONDecodeError``/``KeyError``
  without a path for a corrupt one.)
  """
  for here, _, names in os.walk(directory):
    for name in names:
      path = Path(here) / name
      if name not in _JSON_FILES and path.parent.name != "array_metadatas":
        continue
      try:
        json.loads(path.read_bytes().decode("utf-8"))
      except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt checkpoint metadata, not UTF-8 JSON ({err})") from None


def _orbax_call(directory: Path, what: str, fn, *args):
  """``fn(*args)``; an Orbax failure becomes ``ValueError`` naming the checkpoint."""
  try:
    return fn(*args)
  except Exception as err:  # orbax raises assorted types for corrupt or foreign directories
    raise ValueError(f"{directory}: {what} ({type(err).__name__}: {err})") from err


def _restore(ocp, model, directory: Path, optimizer, include_rng: bool) -> None:
  if os.path.lexists(directory) and not directory.is_dir():
    raise NotADirectoryError(f"{directory}: not a directory (a checkpoint is a directory)")
  if not directory.is_dir():
    raise FileNotFoundError(f"{directory}: no such checkpoint directory")
  _check_metadata_files(directory)
  with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as ckpt:
    meta = _orbax_call(directory, "not a dora_jax adapter checkpoint", ckpt.restore, directory,
                       ocp.args.Composite(dora_jax=ocp.args.JsonRestore()))
  meta = meta["dora_jax"]
  if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
    raise ValueError(f"{directory}: unknown checkpoint format "
                     f"{meta.get('format') if isinstance(meta, dict) else meta!r}")
  if (not isinstance(meta.get("layers"), dict)
      or not all(isinstance(v, dict) for v in meta["layers"].values())
      or not isinstance(meta.get("items"), list)
      or not all(isinstance(v, str) for v in meta["items"])):
    raise ValueError(f"{directory / 'dora_jax' / 'metadata'}: corrupt checkpoint metadata "
                     "(expected 'layers' and 'items')")
  saved_layers = _with_defaults(meta["layers"])
  have_layers = _layer_info(model)
  if saved_layers != have_layers:
    diff = sorted(p for p in set(saved_layers) | set(have_layers)
                  if saved_layers.get(p) != have_layers.get(p))
    raise ValueError(
        f"{directory}: the model's DoRA layers differ from the checkpoint's at "
        + "; ".join(f"{p}: checkpoint {saved_layers.get(p)}, model {have_layers.get(p)}"
                    for p in diff))
  targets = _items(model, optimizer, include_rng)
  if include_rng and "rng" in meta["items"] and "rng" not in targets:
    raise ValueError(f"{directory}: the checkpoint holds RNG state but the model has no RNG "
                     "streams (built without dropout?); pass include_rng=False to skip it")
  absent = sorted(set(targets) - set(meta["items"]))
  if absent:
    raise ValueError(f"{directory}: the checkpoint has no {', '.join(absent)} state "
                     f"(saved: {', '.join(meta['items'])})")
  handler = ocp.CompositeCheckpointHandler(
      dora_jax=ocp.JsonCheckpointHandler(),
      **{name: ocp.StandardCheckpointHandler() for name in meta["items"]})
  with ocp.Checkpointer(handler) as ckpt:
    item_meta = _orbax_call(directory, "cannot read the checkpoint's metadata", ckpt.metadata,
                            directory)
    item_meta = getattr(item_meta, "item_metadata", item_meta)
    for name, target in targets.items():
      saved = item_meta[name]
      _compare(name, getattr(saved, "tree", saved), target, directory)
    # Restore to host arrays, then place them like the arrays they replace: an
    # uncommitted array stays uncommitted (a committed one would make every jitted
    # step recompile), a sharded one keeps its sharding.
    host = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), targets)
    restored = _orbax_call(directory, "cannot read the checkpoint", ckpt.restore, directory,
                           ocp.args.Composite(**{name: ocp.args.StandardRestore(tree)
                                                 for name, tree in host.items()}))
  restored = {name: jax.tree.map(_place, targets[name], restored[name]) for name in targets}

  _update(model, nnx.LoRAParam, restored["adapter"])
  if optimizer is not None:
    state = nnx.state(optimizer)
    nnx.replace_by_pure_dict(state, restored["optimizer"])
    nnx.update(optimizer, state)
  if "rng" in targets:
    current = nnx.to_pure_dict(nnx.state(model, nnx.RngState))
    rng = jax.tree.map(
        lambda cur, new: jax.random.wrap_key_data(new, impl=jax.random.key_impl(cur))
        if _is_key(cur) else new, current, restored["rng"])
    _update(model, nnx.RngState, rng)


def _place(current: Any, new: np.ndarray) -> Any:
  """``new`` as a JAX array placed like ``current`` (committed/sharded only if it was)."""
  if isinstance(current, jax.Array) and getattr(current, "_committed", False):
    return jax.device_put(new, current.sharding)
  return jnp.asarray(new, dtype=getattr(current, "dtype", None))


def _update(model: nnx.Module, kind, pure: dict) -> None:
  state = nnx.state(model, kind)
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)

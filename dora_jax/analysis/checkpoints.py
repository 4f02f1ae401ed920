"""Load parameter checkpoints for the analysis: Orbax directories and ``.safetensors`` files.

Both come back as a flat ``{'/'-joined path: numpy array}`` dict, which
:func:`dora_jax.analysis.compare` accepts directly.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from dora_jax.analysis.compare import flatten_params
from dora_jax.io import safetensors_format

# Files of a saved pytree item (a CheckpointManager step directory has only
# _CHECKPOINT_METADATA and one sub-directory per item).
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt", "checkpoint")


def _is_orbax_dir(path: Path) -> bool:
  return any((path / marker).exists() for marker in _ORBAX_MARKERS)


def _orbax_dir(path: Path) -> Path:
  """``path``, or its single item sub-directory (a ``CheckpointManager`` step with one item)."""
  if _is_orbax_dir(path):
    return path
  subdirs = [p for p in path.iterdir() if p.is_dir() and _is_orbax_dir(p)]
  if len(subdirs) == 1:
    return subdirs[0]
  raise ValueError(
      f"{path} is a directory but not an Orbax checkpoint (no _METADATA or "
      "manifest.ocdbt inside, nor a single item sub-directory holding one)"
  )


def load_orbax(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Restore an Orbax checkpoint directory as host numpy arrays, no target needed.

  Reads directories written by ``orbax.checkpoint`` ``StandardCheckpointer`` or
  ``PyTreeCheckpointer`` (including saved ``nnx.State``; the ``/value`` level is
  dropped). Arrays are restored as numpy, so sharding and device topology of
  the writer do not matter.
  """
  try:
    import orbax.checkpoint as ocp
  except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("reading Orbax checkpoints needs orbax-checkpoint: "
                      "pip install 'dora_jax[analysis]'") from err
  directory = _orbax_dir(Path(path).absolute())
  checkpointer = ocp.PyTreeCheckpointer()
  try:
    metadata = checkpointer.metadata(directory)
    metadata = getattr(metadata, "item_metadata", metadata)
    metadata = getattr(metadata, "tree", metadata)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    tree = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  except Exception as err:  # orbax raises assorted types for corrupt or foreign directories
    raise ValueError(f"{directory}: cannot read the Orbax checkpoint "
                     f"({type(err).__name__}: {err})") from err
  return {k: np.asarray(v) for k, v in flatten_params(tree).items()}


def load_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Read a ``.safetensors`` file; tensor names have ``.`` replaced by ``/``.

  So ``layers.0.kernel`` and ``layers/0/kernel`` both become ``layers/0/kernel``.
  Read by :mod:`dora_jax.io.safetensors_format` (bfloat16 included; a
  truncated or corrupt file raises :class:`~dora_jax.io.SafetensorsError`, a
  ``ValueError`` naming the file).
  """
  tensors, _ = safetensors_format.read(path)
  return {name.replace(".", "/"): value for name, value in tensors.items()}


def load(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Load a checkpoint: an Orbax directory or a ``.safetensors`` file.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: ``path`` is neither an Orbax directory nor a ``.safetensors`` file, or
      it is unreadable (truncated, corrupt), naming the path.
  """
  p = Path(path)
  if not p.exists():
    raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)}")
  if p.is_dir():
    return load_orbax(p)
  if p.suffix == ".safetensors":
    return load_safetensors(p)
  raise ValueError(
      f"{os.fspath(path)}: expected an Orbax checkpoint directory or a .safetensors file"
  )


def label(path: str | os.PathLike) -> str:
  """A short label for a checkpoint path: its name without ``.safetensors``."""
  name = Path(os.fspath(path).rstrip("/\\")).name
  return name[: -len(".safetensors")] if name.endswith(".safetensors") else name

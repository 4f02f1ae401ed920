"""Crash-safe file writes: a temporary name in the same directory, fsync, ``os.replace``.

:func:`write_file` replaces one file atomically. :func:`write_files` replaces a
set of files that only make sense together (an adapter's weights and its
config) so that a crash at any point leaves either the old complete set or no
loadable set:

1. every file is written under a temporary name in the target directory and
   fsync'ed (a crash here leaves the old files untouched);
2. when there are several files, the *commit file* (the one a reader opens
   first, e.g. ``adapter_config.json``) is removed, so the old set stops being
   loadable;
3. the other files are moved into place, the commit file last; the directory
   is fsync'ed after each step.

A reader that requires the commit file therefore sees old-and-complete, nothing,
or new-and-complete. Temporary files are removed when the write fails with an
exception; after a hard crash they may remain (names starting with
``.tmp-``), which readers ignore.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Mapping

TEMP_PREFIX = ".tmp-"


def fsync_dir(directory: str | os.PathLike) -> None:
  """fsync a directory so renames in it are durable (a no-op where unsupported)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # pragma: no cover - e.g. Windows
    return
  try:
    os.fsync(fd)
  except OSError:  # pragma: no cover
    pass
  finally:
    os.close(fd)


def _write_temp(directory: Path, name: str, data: bytes) -> Path:
  """Write ``data`` to a fresh temporary file next to ``directory/name`` and fsync it."""
  tmp = directory / f"{TEMP_PREFIX}{secrets.token_hex(6)}-{name}"
  with open(tmp, "xb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  return tmp


def _replace(src: Path, dst: Path) -> None:
  os.replace(src, dst)


def write_files(directory: str | os.PathLike, files: Mapping[str, bytes],
                commit: str | None = None) -> list[Path]:
  """Write ``{name: bytes}`` into ``directory`` (created if needed), crash-safely.

  Args:
    directory: target directory.
    files: file names (no separators) and their contents.
    commit: the file whose presence marks a complete set; moved into place
      last, and (with several files) removed first if it exists. Defaults to
      the last name given. A single file is replaced atomically: old or new,
      never missing.

  Returns:
    The final paths, in the order of ``files``.
  """
  directory = Path(directory)
  names = list(files)
  if not names:
    raise ValueError("nothing to write")
  for name in names:
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
      raise ValueError(f"invalid file name {name!r}")
  commit = names[-1] if commit is None else commit
  if commit not in files:
    raise ValueError(f"commit file {commit!r} is not among {names}")
  if not directory.is_dir():
    directory.mkdir(parents=True, exist_ok=True)
    fsync_dir(directory.parent)
  temps: dict[str, Path] = {}
  try:
    for name in names:
      temps[name] = _write_temp(directory, name, files[name])
    target = directory / commit
    if len(names) > 1 and target.exists():
      target.unlink()
      fsync_dir(directory)
    for name in [n for n in names if n != commit] + [commit]:
      _replace(temps[name], directory / name)
      del temps[name]
      fsync_dir(directory)
  finally:
    for tmp in temps.values():
      try:
        tmp.unlink()
      except FileNotFoundError:
        pass
  return [directory / name for name in names]


def write_file(path: str | os.PathLike, data: bytes) -> Path:
  """Replace the file at ``path`` with ``data`` atomically (temp name, fsync, ``os.replace``)."""
  path = Path(path)
  return write_files(path.parent, {path.name: data})[0]

"""Crash-safe writes: files replaced by rename, directories swapped by rename.

Files. :func:`write_file` replaces one file atomically (a temporary name in the
same directory, fsync, ``os.replace``). :func:`write_files` writes a set of
files into an existing directory in place, commit file last; it is what
remains for targets that cannot be swapped (a mount point).

Directories. :func:`replace_directory` (and :func:`write_directory` on top of
it) replaces a whole directory ``D`` so that ``D`` holds the old complete
version or the new complete one at every instant, whatever kills the process:

1. under an exclusive lock (see below), a leftover of an earlier interrupted
   replace is recovered;
2. the new version is written beside ``D`` as ``.D.dora-tmp-<token>``; every
   file and directory in it is fsync'ed, then it is renamed
   ``.D.dora-new-<token>`` (complete; the parent is fsync'ed);
3. it is swapped with ``D``: on Linux in one ``renameat2(RENAME_EXCHANGE)``
   (``D`` is never missing); where that is unsupported, ``D`` is renamed
   ``.D.dora-old-<token>`` and the new version renamed ``D`` (``D`` is missing
   between the two renames; the next load or save finishes the swap);
4. entries of the old version that the new one does not manage (e.g. a
   ``README.md`` beside an adapter's files) are moved into ``D``, and the old
   version is deleted.

Recovery (at the next save, and at the next load of ``D``): a ``tmp`` sibling
is deleted; if ``D`` is missing, the complete ``new`` sibling (else the
``old`` one) is renamed ``D``; every remaining ``new``/``old`` sibling then has
its unmanaged entries moved into ``D`` and is deleted. Which of the two a
sibling holds after an exchange does not matter: the managed entries in ``D``
are always one complete version, and only unmanaged ones are carried over.

Readers (:func:`reading`) take the lock shared, so a load never overlaps a
swap; writers hold it exclusively for the whole save, so concurrent saves of
one directory run one after the other (the last one wins). The lock is an
advisory ``flock`` on ``.D.dora-lock`` beside ``D``; the last holder removes
the file, so it exists only while the directory is in use (or after a holder
was killed, until the next use). Where the platform has no ``flock``, or the
file cannot be created or opened, no lock is taken.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path
from typing import Callable, Collection, Iterator, Mapping

try:
  import fcntl
except ImportError:  # pragma: no cover - not POSIX
  fcntl = None

TEMP_PREFIX = ".tmp-"
#: Name parts of the siblings of a directory ``D`` being replaced: ``.D.dora-<kind>-<token>``.
SIBLING_TAG = ".dora-"
LOCK_SUFFIX = ".dora-lock"
_TOKEN = r"[0-9a-f]{16}-[0-9a-f]{8}"
_SIBLING = re.compile(rf"(?P<kind>new|old)-(?P<token>{_TOKEN})|tmp-{_TOKEN}(\..*)?")

logger = logging.getLogger("dora_jax")


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


def _fsync_file(path: Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
  """fsync every regular file and directory under ``root`` (``root`` included), bottom-up."""
  for here, _, names in os.walk(root, topdown=False):
    for name in names:
      path = Path(here) / name
      if path.is_file() and not path.is_symlink():
        _fsync_file(path)
    fsync_dir(here)


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


def _check_names(names: list[str]) -> None:
  if not names:
    raise ValueError("nothing to write")
  for name in names:
    if os.sep in name or (os.altsep and os.altsep in name) or name in ("", ".", ".."):
      raise ValueError(f"invalid file name {name!r}")


def write_files(directory: str | os.PathLike, files: Mapping[str, bytes],
                commit: str | None = None) -> list[Path]:
  """Write ``{name: bytes}`` into ``directory`` (created if needed), in place.

  Every file is written under a temporary name and fsync'ed first; then, with
  several files, the *commit file* (the one a reader needs first) is removed,
  the others are moved into place and the commit file last (the directory is
  fsync'ed after each step). A crash leaves the old complete set, the new one,
  or a set without its commit file (which readers refuse). Prefer
  :func:`write_directory`, which always leaves a complete set.

  Args:
    directory: target directory.
    files: file names (no separators) and their contents.
    commit: the file whose presence marks a complete set (default: the last).

  Returns:
    The final paths, in the order of ``files``.
  """
  directory = Path(directory)
  names = list(files)
  _check_names(names)
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


# -- directory swap --------------------------------------------------------------


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _load_renameat2():
  if not sys.platform.startswith("linux"):
    return None
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):  # pragma: no cover - glibc < 2.28, musl
    return None
  fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
  fn.restype = ctypes.c_int
  return fn


_RENAMEAT2 = _load_renameat2()


def _exchange(a: Path, b: Path) -> bool:
  """Swap the entries ``a`` and ``b`` atomically; ``False`` where the system cannot."""
  if _RENAMEAT2 is None:
    return False
  if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
    return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
    return False
  raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


def _rename(src: Path, dst: Path) -> None:
  os.rename(src, dst)


def _rmtree(path: Path) -> None:
  shutil.rmtree(path, ignore_errors=True)


def resolve(directory: str | os.PathLike) -> Path:
  """The absolute real path of ``directory`` (symlinks resolved: the real directory is swapped)."""
  return Path(os.path.realpath(os.fspath(directory)))


def _sibling(target: Path, kind: str, token: str) -> Path:
  return target.parent / f".{target.name}{SIBLING_TAG}{kind}-{token}"


def _lock_path(target: Path) -> Path:
  return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _siblings(target: Path) -> tuple[list[Path], list[tuple[str, str, Path]]]:
  """``(tmp, [(kind, token, path)])``: the leftovers of interrupted replaces of ``target``."""
  prefix = f".{target.name}{SIBLING_TAG}"
  try:
    names = os.listdir(target.parent)
  except OSError:
    return [], []
  tmp, done = [], []
  for name in names:
    if not name.startswith(prefix):
      continue
    m = _SIBLING.fullmatch(name[len(prefix):])
    if m is None:
      continue
    if m.group("kind"):
      done.append((m.group("kind"), m.group("token"), target.parent / name))
    else:
      tmp.append(target.parent / name)
  return tmp, sorted(done, key=lambda t: t[1])


def _acquire(path: Path, exclusive: bool, blocking: bool) -> int | None:
  """An fd of the lock file ``path`` holding the lock, or ``None`` (busy, or no lock possible).

  The file is created if needed. A holder removes it when it is the last one
  (:func:`_release`), so after taking the lock the file is checked to still be
  the one at ``path``; if it was removed meanwhile, the current one is taken.
  """
  flags = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
  while True:
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError:  # no write access beside the directory: an existing lock file, or none
      try:
        fd = os.open(path, os.O_RDONLY)
      except OSError:
        return None
    try:
      fcntl.flock(fd, flags)
    except OSError:  # busy (non-blocking), or a file system without flock
      os.close(fd)
      return None
    try:
      here = os.stat(path)
      mine = os.fstat(fd)
      if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)


def _release(path: Path, fd: int) -> None:
  """Release the lock; the last holder (the one that can take it exclusively) removes the file."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    here, mine = os.stat(path), os.fstat(fd)
    if (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino):
      os.unlink(path)
  except OSError:  # others hold it (they remove it), or it is gone already
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def _locked(target: Path, *, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
  """Hold the lock of ``target`` (``.NAME.dora-lock`` beside it, present only while held);
  yields whether it is held (``False``: busy with ``blocking=False``, or no lock possible)."""
  if fcntl is None:  # pragma: no cover
    yield False
    return
  path = _lock_path(target)
  fd = _acquire(path, exclusive, blocking)
  if fd is None:
    yield False
    return
  try:
    yield True
  finally:
    _release(path, fd)


def _carry(source: Path, target: Path, managed: Collection[str] | None) -> None:
  """Move the entries of ``source`` that are not ``managed`` (and not in ``target``) into it."""
  if managed is None:
    return
  moved = False
  for name in sorted(os.listdir(source)):
    if name in managed or os.path.lexists(target / name):
      continue
    _rename(source / name, target / name)
    moved = True
  if moved:
    fsync_dir(target)


def recover(directory: str | os.PathLike, *, managed: Collection[str] | None) -> bool:
  """Finish an interrupted :func:`replace_directory` of ``directory``; call under its lock.

  Returns whether anything was left over.
  """
  target = resolve(directory)
  tmp, done = _siblings(target)
  for path in tmp:
    _rmtree(path)
  if not os.path.lexists(target) and done:
    complete = [p for kind, _, p in done if kind == "new"] or [p for _, _, p in done]
    _rename(complete[-1], target)
    fsync_dir(target.parent)
    done = [d for d in done if d[2] != complete[-1]]
  for _, _, path in done:
    if target.is_dir() and path.is_dir():
      _carry(path, target, managed)
    _rmtree(path)
  if tmp or done:
    fsync_dir(target.parent)
  return bool(tmp or done)


def _swap_in(new: Path, target: Path, token: str, managed: Collection[str] | None) -> None:
  """Make the complete directory ``new`` be ``target``; the old version is retired."""
  if not os.path.lexists(target):
    _rename(new, target)
    fsync_dir(target.parent)
    return
  os.chmod(new, stat.S_IMODE(os.stat(target).st_mode))
  here = os.getcwd() if _is_cwd(target) else None
  if _exchange(new, target):
    old = new  # now holds the previous version
    fsync_dir(target.parent)
  else:
    old = _sibling(target, "old", token)
    _rename(target, old)
    fsync_dir(target.parent)
    _rename(new, target)
    fsync_dir(target.parent)
  if here is not None:  # the process was inside the old directory: follow the name
    os.chdir(target)
  _carry(old, target, managed)
  _rmtree(old)
  fsync_dir(target.parent)


def _is_cwd(target: Path) -> bool:
  try:
    return os.path.realpath(os.getcwd()) == os.fspath(target)
  except OSError:
    return False


def _prepare_target(target: Path) -> None:
  """Refuse a target that is not a directory; create its parent directories."""
  if os.path.lexists(target) and not target.is_dir():
    raise NotADirectoryError(f"{target}: exists and is not a directory")
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise NotADirectoryError(f"{target}: a parent path exists and is not a directory") from None


@contextlib.contextmanager
def replace_directory(directory: str | os.PathLike, *, managed: Collection[str] | None,
                      overwrite: bool = True) -> Iterator[Path]:
  """Write a new version of ``directory`` beside it, then swap it in (see the module docstring).

  Yields the path (not yet existing) where the caller writes the complete new
  version, as a directory; when the block ends normally it replaces
  ``directory``. When the block raises, ``directory`` is left as it was.

  Args:
    directory: the directory to create or replace (symlinks are resolved).
    managed: names of the entries the new version owns; other entries of the
      old version are moved into the new one. ``None``: the new version
      replaces everything (nothing is carried over).
    overwrite: with ``False``, an existing ``directory`` raises ``FileExistsError``.

  Raises:
    NotADirectoryError: ``directory`` (or a parent) exists and is not a directory.
    FileExistsError: ``directory`` exists and ``overwrite`` is false.
  """
  target = resolve(directory)
  _prepare_target(target)
  with _locked(target, exclusive=True):
    recover(target, managed=managed)
    if not overwrite and os.path.lexists(target):
      raise FileExistsError(f"{target}: exists (pass overwrite=True to replace it)")
    token = f"{time.time_ns():016x}-{secrets.token_hex(4)}"
    staging = _sibling(target, "tmp", token)
    try:
      yield staging
      if not staging.is_dir():
        raise RuntimeError(f"the new version of {target} was not written to {staging}")
      fsync_tree(staging)
      new = _sibling(target, "new", token)
      _rename(staging, new)
      fsync_dir(target.parent)
    except BaseException:
      _rmtree(staging)
      for name in os.listdir(target.parent):  # temporaries of the writer's own (Orbax's)
        if name.startswith(staging.name + "."):
          _rmtree(target.parent / name)
      raise
    try:
      _swap_in(new, target, token, managed)
    except BaseException:
      recover(target, managed=managed)
      raise


def write_directory(directory: str | os.PathLike, files: Mapping[str, bytes]) -> Path:
  """Replace ``files`` (``{name: bytes}``) in ``directory`` as one crash-safe swap.

  After any interruption ``directory`` holds either its previous files or the
  new ones, never a mixture (see :func:`replace_directory`); its other entries
  are kept. A ``directory`` that is a mount point, or whose parent is not
  writable, cannot be swapped: the files are then written in place by
  :func:`write_files` (old set, new set, or no loadable set after a crash),
  with a logged warning.

  Returns:
    ``directory`` resolved (absolute, symlinks followed).
  """
  names = list(files)
  _check_names(names)
  target = resolve(directory)
  if target.is_dir() and (os.path.ismount(target) or not os.access(target.parent, os.W_OK)):
    logger.warning("%s cannot be swapped (a mount point, or its parent is not writable): "
                   "writing %s in place (a crash may leave no loadable set)", target,
                   ", ".join(names))
    write_files(target, files, commit=names[-1])
    return target
  with replace_directory(target, managed=set(names)) as staging:
    staging.mkdir()
    for name in names:
      with open(staging / name, "xb") as f:
        f.write(files[name])
  return target


@contextlib.contextmanager
def reading(directory: str | os.PathLike, *, managed: Collection[str] | None
            ) -> Iterator[Path]:
  """Context for reading ``directory``: an interrupted replace is recovered first, and the
  lock is held shared (where it can be taken) so no swap happens meanwhile.

  Yields ``directory`` resolved. Recovery needs write access to the parent;
  without it (or while a writer holds the lock) a present ``directory`` is read
  as it is.
  """
  target = resolve(directory)
  tmp, done = _siblings(target)
  if tmp or done:
    missing = not os.path.lexists(target)
    try:
      with _locked(target, exclusive=True, blocking=missing) as held:
        if held:
          recover(target, managed=managed)
    except OSError as err:
      if not os.path.lexists(target):
        raise FileNotFoundError(
            f"{target}: missing; an interrupted save left {done[-1][2] if done else tmp[0]}, "
            f"which could not be moved into place ({err})") from err
  with _locked(target, exclusive=False):
    yield target


def read_files(directory: str | os.PathLike, names: Collection[str]) -> dict[str, bytes | None]:
  """``{name: bytes, or None if absent}`` of files read from one version of ``directory``.

  The files are opened relative to one handle on the directory, so they come
  from the same version even if it is swapped meanwhile (the read is repeated
  when a swap removed a file before it was opened).
  """
  target = resolve(directory)
  if os.open not in os.supports_dir_fd:  # pragma: no cover - e.g. Windows
    return {name: (target / name).read_bytes() if (target / name).is_file() else None
            for name in names}
  for _ in range(5):
    fd = os.open(target, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
      out: dict[str, bytes | None] = {}
      for name in names:
        try:
          f = os.open(name, os.O_RDONLY, dir_fd=fd)
        except FileNotFoundError:
          out[name] = None
          continue
        with os.fdopen(f, "rb") as file:
          out[name] = file.read()
      try:
        same = os.fstat(fd).st_ino == os.stat(target).st_ino
      except FileNotFoundError:
        same = False
    finally:
      os.close(fd)
    if same or all(v is not None for v in out.values()):
      return out
  return out

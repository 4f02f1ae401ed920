"""Saves killed with SIGKILL at random instants, and concurrent writers with a reader.

A warm server process (``crash_child.py``) forks one child per save; the
child overwrites an adapter directory that holds a complete old version, and
is SIGKILLed after a random delay drawn uniformly from ``[0, 1.5·T]``, ``T``
the save's duration from the fork (measured beforehand, refined by the saves
that complete), so the kills span the whole save, a third landing after it. Each directory must then load to exactly the old or
exactly the new values, with the leftovers of the interrupted swap cleared by
that load and, for PEFT adapters, the directory's other files kept. Half of
the trials use the two-rename swap (where ``renameat2(RENAME_EXCHANGE)`` is
unavailable), half the exchange.

Then two writers save different versions of one directory in a loop while
this process loads it over and over: every load is exactly one saved version.
"""

from __future__ import annotations

import collections
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

import crash_child
import dora_jax
from dora_jax.io import atomic

CHILD = Path(crash_child.__file__)
VERSIONS = crash_child.VERSIONS
KINDS = ("peft", "orbax")
TRIALS = {"peft": 30, "orbax": 20}

# One worker runs the whole file under pytest-xdist: the server is started once.
pytestmark = pytest.mark.xdist_group("test_crash_safety")


class Server:
  """The saving server: ``save`` forks a child, ``wait`` collects what it reported."""

  def __init__(self, scratch: Path):
    self.log = open(scratch / "server.log", "w")
    self.proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(scratch)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1,
        env=dict(os.environ, JAX_PLATFORMS="cpu"))
    self.lines: queue.Queue[list[str]] = queue.Queue()
    self.reports: dict[int, dict] = collections.defaultdict(
        lambda: {"done": [], "exit": None, "error": None})
    self.order: list[tuple[int, int]] = []  # (pid, version) of every completed save, in order
    self.cond = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()
    if self._next(timeout=240) != ["ready"]:
      raise RuntimeError(f"the saving server did not start: {self._log()}")

  def _log(self) -> str:
    self.log.flush()
    return Path(self.log.name).read_text()[-3000:]

  def _read(self):
    for line in self.proc.stdout:
      words = line.split()
      if words[:1] in (["done"], ["exit"], ["error"]):
        with self.cond:
          report = self.reports[int(words[1])]
          if words[0] == "done":
            report["done"].append(float(words[3]))
            self.order.append((int(words[1]), int(words[2])))
          elif words[0] == "exit":
            report["exit"] = int(words[2])
          else:
            report["error"] = " ".join(words[2:])
          self.cond.notify_all()
      else:
        self.lines.put(words)
    self.lines.put(["eof"])

  def _next(self, timeout: float) -> list[str]:
    try:
      return self.lines.get(timeout=timeout)
    except queue.Empty:
      raise RuntimeError(f"no answer from the saving server: {self._log()}") from None

  def save(self, kind: str, versions, target: Path, *, exchange: bool = True, repeat: int = 1,
           kill_after: float = -1.0) -> int:
    versions = ",".join(str(v) for v in np.atleast_1d(versions))
    self.proc.stdin.write(f"save {kind} {versions} {target} {int(exchange)} {repeat} "
                          f"{kill_after:.6f}\n")
    self.proc.stdin.flush()
    words = self._next(timeout=60)
    assert words[0] == "pid", words
    return int(words[1])

  def wait(self, pid: int, timeout: float = 120) -> dict:
    with self.cond:
      if not self.cond.wait_for(lambda: self.reports[pid]["exit"] is not None, timeout):
        state = {p: _proc_state(p) for p in (self.proc.pid, pid)}
        raise RuntimeError(f"save {pid} did not end (process states {state}): {self._log()}")
      return dict(self.reports[pid])

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()
      self.proc.wait()
    self.log.close()


_READER: list[nnx.Module] = []


def _proc_state(pid: int) -> str:
  try:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return " ".join(line for line in status if line.startswith(("State", "Threads")))
  except OSError:
    return "gone"


def _values(kind: str, directory: Path) -> dict[str, np.ndarray]:
  """The adapter values a directory loads to (PEFT) or restores (Orbax).

  Both overwrite every adapter value of one reused model with the server's layout.
  """
  if not _READER:
    _READER.append(crash_child.build())
  model = _READER[0]
  if kind == "peft":
    dora_jax.load_adapter(model, directory)
  else:
    dora_jax.restore_adapter_state(model, directory)
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def _which(values: dict, refs: list[dict]) -> int | None:
  hits = [v for v, ref in enumerate(refs)
          if sorted(ref) == sorted(values) and all(np.array_equal(ref[k], values[k]) for k in ref)]
  return hits[0] if len(hits) == 1 else None


def _leftovers(target: Path) -> list[str]:
  """Siblings of ``target`` left by a save (staged versions, the lock file)."""
  return sorted(p for p in os.listdir(target.parent)
                if p.startswith(f".{target.name}{atomic.SIBLING_TAG}"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  scratch = tmp_path_factory.mktemp("crash")
  srv = Server(scratch)
  srv.refs = {}  # kind -> (ref dirs, values) of every version, saved by the server's children
  try:
    for kind in KINDS:
      dirs = [scratch / f"ref-{kind}-{v}" for v in range(VERSIONS)]
      for v, d in enumerate(dirs):
        report = srv.wait(srv.save(kind, v, d))
        assert report["exit"] == 0 and report["error"] is None, report
      values = [_values(kind, d) for d in dirs]
      assert all(_which(values[v], values) == v for v in range(VERSIONS))  # all distinct
      srv.refs[kind] = (dirs, values)
    yield srv
  finally:
    srv.close()


def _old_copy(server: Server, kind: str, target: Path) -> None:
  shutil.copytree(server.refs[kind][0][0], target)
  if kind == "peft":  # a file of the user's beside the adapter: it must survive
    (target / "README.md").write_text("the user's notes")


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_random_instants_of_an_overwrite_leaves_old_or_new(server, tmp_path, kind):
  refs = server.refs[kind][1]
  durations = []
  for i in range(2):  # the save's duration (from the fork), over an old version as in the trials
    target = tmp_path / f"timing{i}" / "a"
    _old_copy(server, kind, target)
    report = server.wait(server.save(kind, 1, target, exchange=i % 2 == 0))
    assert report["exit"] == 0, report
    durations += report["done"]
  rng = random.Random()
  outcomes = collections.Counter()
  during = 0
  for trial in range(TRIALS[kind]):
    target = tmp_path / f"trial{trial}" / "a"
    _old_copy(server, kind, target)
    span = 1.5 * statistics.median(durations)  # completed trial saves refine the estimate
    delay = rng.uniform(0.0, span)
    report = server.wait(server.save(kind, 1, target, exchange=trial % 2 == 0, kill_after=delay))
    assert report["error"] is None, report
    killed = report["exit"] == -9
    during += killed and not report["done"]
    got = _which(_values(kind, target), refs)
    assert got in (0, 1), f"trial {trial} (killed after {delay * 1e3:.1f} ms): neither old nor new"
    if report["done"]:
      assert got == 1, f"trial {trial}: the save completed but the old version loads"
      durations += report["done"]
    outcomes["old" if got == 0 else "new"] += 1
    assert _leftovers(target) == [], (trial, _leftovers(target))
    if kind == "peft":
      assert (target / "README.md").read_text() == "the user's notes"
  print(f"\n{kind}: {TRIALS[kind]} SIGKILLs over 0-{span * 1e3:.1f} ms (median save "
        f"{statistics.median(durations) * 1e3:.1f} ms): {dict(outcomes)}, {during} during the save")
  assert during >= TRIALS[kind] // 4, (during, outcomes)
  assert outcomes["old"] >= 1 and outcomes["new"] >= 1, outcomes


@pytest.mark.parametrize("kind", KINDS)
def test_two_writers_and_a_reader(server, tmp_path, kind):
  dirs, refs = server.refs[kind]
  target = tmp_path / "shared" / "a"
  _old_copy(server, kind, target)
  repeat = 12 if kind == "peft" else 3
  writers = [server.save(kind, (1, 2), target, exchange=True, repeat=repeat),
             server.save(kind, (2, 1), target, exchange=False, repeat=repeat)]
  seen = collections.Counter()
  while any(server.reports[w]["exit"] is None for w in writers) or not seen:
    got = _which(_values(kind, target), refs)
    assert got is not None, "a load during concurrent saves gave no saved version"
    seen[got] += 1
  reports = [server.wait(w) for w in writers]
  assert all(r["exit"] == 0 and r["error"] is None and len(r["done"]) == repeat
             for r in reports), reports
  last = [v for pid, v in server.order if pid in writers][-1]
  assert _which(_values(kind, target), refs) == last  # the last save to finish wins
  assert _leftovers(target) == []
  print(f"\n{kind}: {sum(seen.values())} loads during {2 * repeat} saves saw versions {dict(seen)}")
  assert sum(seen.values()) >= 3

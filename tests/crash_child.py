"""A warm saving process for ``test_crash_safety.py``: forks one child per save, on request.

Started once per test module (``python tests/crash_child.py``). It imports
dora_jax, builds ``VERSIONS`` adapted models (the same base, different random
adapters) and warms the PEFT save, then serves commands read from stdin, one per
line, answering on stdout:

* ``save KIND VERSIONS TARGET EXCHANGE REPEAT KILL_AFTER`` forks a child that
  saves ``REPEAT`` times to ``TARGET``, cycling through the comma-separated
  model ``VERSIONS``; KIND ``peft`` (:func:`dora_jax.save_adapter`) or ``orbax``
  (:func:`dora_jax.save_adapter_state` with ``overwrite=True``); ``EXCHANGE 0``
  makes the swap use two renames instead of ``renameat2(RENAME_EXCHANGE)``.
  With ``KILL_AFTER`` >= 0 this process SIGKILLs the child that many seconds
  after the fork (unless it has ended: only a child not yet reaped is killed).
  Answers ``pid PID`` at once; the child prints ``done PID VERSION SECONDS``
  after each save; ``exit PID STATUS`` follows when it is reaped (``STATUS`` as
  ``os.waitstatus_to_exitcode``: ``-9`` when killed).
* ``quit``.

Forking a warm process makes a killed save cost milliseconds instead of a
fresh interpreter with JAX. The parent has used no tensorstore (Orbax aborts a
forked child if its parent has), and JAX runs synchronously
(``jax_cpu_enable_async_dispatch`` off) with nothing in flight at the fork.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import warnings
from pathlib import Path

import jax
from flax import nnx

import dora_jax
from dora_jax.io import atomic

VERSIONS = 3
TARGETS = r"layers/\d+|lm_head"


class Tiny(nnx.Module):
  """Three Dense layers and a head: PEFT names ``model.layers.<i>``, ``lm_head``."""

  def __init__(self):
    rngs = nnx.Rngs(0)
    self.layers = nnx.List([nnx.Linear(16, 16, rngs=rngs) for _ in range(3)])
    self.lm_head = nnx.Linear(16, 8, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = jax.nn.gelu(layer(x))
    return self.lm_head(x)


def build(version: int | None = None) -> nnx.Module:
  """The adapted model; ``version`` sets random adapters (``None``: the init ones)."""
  model = Tiny()
  dora_jax.apply_dora(model, targets=TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(1))
  if version is not None:
    key = jax.random.key(1000 + version)
    for _, layer in dora_jax.surgery.dora_layers(model):
      key, ka, kb, km = jax.random.split(key, 4)
      layer.lora_a[...] = jax.random.normal(ka, layer.lora_a.shape) / 4
      layer.lora_b[...] = 0.3 * jax.random.normal(kb, layer.lora_b.shape)
      layer.magnitude[...] = layer.magnitude[...] * (1 + 0.2 * jax.random.normal(km, layer.magnitude.shape))
  return model


def _save(kind: str, model, target: str) -> None:
  if kind == "peft":
    dora_jax.save_adapter(model, target)
  elif kind == "orbax":
    dora_jax.save_adapter_state(model, target, overwrite=True)
  else:
    raise ValueError(f"unknown kind {kind!r}")


def _child(kind: str, models, versions: list[int], target: str, exchange: bool,
           repeat: int) -> None:
  if not exchange:
    atomic._exchange = lambda a, b: False
  for i in range(repeat):
    version = versions[i % len(versions)]
    start = time.perf_counter()
    _save(kind, models[version], target)
    print(f"done {os.getpid()} {version} {time.perf_counter() - start:.6f}", flush=True)


def main() -> None:
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
  models = [build(v) for v in range(VERSIONS)]
  scratch = Path(sys.argv[1])
  for i in range(2):  # compile the save's reshapes once, before any fork
    dora_jax.save_adapter(models[i], scratch / "warm")
  print("ready", flush=True)
  running: set[int] = set()
  deadlines: dict[int, float] = {}
  while True:
    for pid in list(running):
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        running.discard(pid)
        deadlines.pop(pid, None)
        print(f"exit {pid} {os.waitstatus_to_exitcode(status)}", flush=True)
    now = time.perf_counter()
    for pid, when in list(deadlines.items()):
      if when <= now:  # still running and not reaped: the pid is this child's
        os.kill(pid, signal.SIGKILL)
        del deadlines[pid]
    wait = min([0.002] + [max(w - now, 0.0) for w in deadlines.values()])
    if not select.select([sys.stdin], [], [], wait)[0]:
      continue
    line = sys.stdin.readline()
    if not line or line.strip() == "quit":
      return
    _, kind, versions, target, exchange, repeat, kill_after = line.split()
    pid = os.fork()
    if pid == 0:
      code = 0
      try:
        _child(kind, models, [int(v) for v in versions.split(",")], target, exchange == "1",
               int(repeat))
      except BaseException as err:  # reported, then the child ends without cleanup
        print(f"error {os.getpid()} {type(err).__name__}: {err}", flush=True)
        code = 1
      os._exit(code)
    start = time.perf_counter()
    running.add(pid)
    if float(kill_after) >= 0:
      deadlines[pid] = start + float(kill_after)
    print(f"pid {pid}", flush=True)


if __name__ == "__main__":
  main()

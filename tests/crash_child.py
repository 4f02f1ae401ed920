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
  after each save (``SECONDS`` since the fork, the clock of ``KILL_AFTER``); ``exit PID STATUS`` follows when it is reaped (``STATUS`` as
  ``os.waitstatus_to_exitcode``: ``-9`` when killed).
* ``quit``.

Forking a warm process makes a killed save cost milliseconds instead of a
fresh interpreter with JAX. The models' adapters are numpy arrays, so a child
runs no JAX computation (its parent's XLA threads do not exist in it); the
parent has used no tensorstore (Orbax aborts a forked child if its parent
has), and ran its last JAX computation before the first fork.
"""

from __future__ import annotations

import gc
import os
import select
import signal
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
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


def build(version: int | None = None, *, host: bool = False) -> nnx.Module:
  """The adapted model; ``version`` sets random adapters (``None``: the init ones).

  With ``host`` the adapters are numpy arrays, so that saving them runs no JAX
  computation (what a forked child must avoid: the XLA threads of its parent
  are not there).
  """
  model = Tiny()
  dora_jax.apply_dora(model, targets=TARGETS, rank=4, alpha=8, rngs=nnx.Rngs(1))
  key = jax.random.key(1000 + (version or 0))
  for _, layer in dora_jax.surgery.dora_layers(model):
    if version is not None:
      key, ka, kb, km = jax.random.split(key, 4)
      layer.lora_a[...] = jax.random.normal(ka, layer.lora_a.shape) / 4
      layer.lora_b[...] = 0.3 * jax.random.normal(kb, layer.lora_b.shape)
      layer.magnitude[...] = layer.magnitude[...] * (1 + 0.2 * jax.random.normal(km, layer.magnitude.shape))
    if host:
      for var in (layer.lora_a, layer.lora_b, layer.magnitude):
        var.set_value(np.asarray(var.get_value()))
  return model


def _save(kind: str, model, target: str) -> None:
  if kind == "peft":
    dora_jax.save_adapter(model, target)
  elif kind == "orbax":
    dora_jax.save_adapter_state(model, target, overwrite=True)
  else:
    raise ValueError(f"unknown kind {kind!r}")


def _say(line: str) -> None:
  """One line on stdout in one write (a child killed mid-line must not leave half of it)."""
  os.write(sys.stdout.fileno(), (line + "\n").encode())


def _child(kind: str, models, versions: list[int], target: str, exchange: bool,
           repeat: int, forked: float) -> None:
  if not exchange:
    atomic._exchange = lambda a, b: False
  for i in range(repeat):
    version = versions[i % len(versions)]
    with jax.transfer_guard("disallow"):  # a JAX computation here would be an error, not a hang
      _save(kind, models[version], target)
    _say(f"done {os.getpid()} {version} {time.perf_counter() - forked:.6f}")


def main() -> None:
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
  models = [build(v, host=True) for v in range(VERSIONS)]
  gc.collect()  # the JAX arrays replaced by numpy ones are freed now, not in a child
  scratch = Path(sys.argv[1])
  for i in range(2):  # compile the save's reshapes once, before any fork
    dora_jax.save_adapter(models[i], scratch / "warm")
  _say("ready")
  running: set[int] = set()
  deadlines: dict[int, float] = {}
  while True:
    for pid in list(running):
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        running.discard(pid)
        deadlines.pop(pid, None)
        _say(f"exit {pid} {os.waitstatus_to_exitcode(status)}")
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
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
      code = 0
      try:
        _child(kind, models, [int(v) for v in versions.split(",")], target, exchange == "1",
               int(repeat), start)
      except BaseException as err:  # reported, then the child ends without cleanup
        _say(f"error {os.getpid()} {type(err).__name__}: " + " ".join(str(err).split()))
        code = 1
      os._exit(code)
    running.add(pid)
    if float(kill_after) >= 0:
      deadlines[pid] = start + float(kill_after)
    _say(f"pid {pid}")


if __name__ == "__main__":
  main()

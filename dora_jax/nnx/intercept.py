"""Routing ``jax.lax.dot_general`` and ``jax.numpy.einsum`` calls to a handler while an
op-level adapted module runs its own call.

Rules:

* Interception exists only inside :func:`active`: the two functions are replaced
  on their modules (``jax.lax``, ``jax.numpy``) when the first handler becomes
  active in any thread and put back when the last one ends, so no patch is left
  in place between adapted calls.
* Handlers are per thread (a stack): a call made in a thread with no active
  handler, or made by a handler itself (the DoRA op calling the base op), goes
  straight to the original function.
* Only calls that look the functions up on their modules at call time are seen
  (``lax.dot_general(...)``, ``jnp.einsum(...)``); a module attribute holding the
  original function (``nnx.Linear.dot_general``) is swapped for the duration of
  the call by :func:`swapped_functions`. Anything else (``x @ w``, ``jnp.matmul``,
  a reference bound at import) is not intercepted: the contraction analysis
  (:mod:`dora_jax.nnx.trace`) detects a weight entering such an op and refuses it.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
from jax import lax

#: The intercepted functions: name -> (module, the original function).
ORIGINALS: dict[str, tuple[Any, Callable[..., Any]]] = {
    "dot_general": (jax.lax, lax.dot_general),
    "einsum": (jax.numpy, jnp.einsum),
}
_SIGNATURES = {name: inspect.signature(fn) for name, (_, fn) in ORIGINALS.items()}

#: A handler: ``(op name, {argument name: value}) -> result``; its arguments are bound
#: to the original function's signature with defaults applied.
Handler = Callable[[str, dict[str, Any]], Any]

_local = threading.local()
_lock = threading.Lock()
_users = 0
_saved: dict[str, Any] = {}


def bind(name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
  """``{argument: value}`` of a call to the original ``name`` (defaults applied)."""
  bound = _SIGNATURES[name].bind(*args, **kwargs)
  bound.apply_defaults()
  return dict(bound.arguments)


def call_original(name: str, arguments: dict[str, Any]) -> Any:
  """Run the original function on bound ``arguments``."""
  sig = _SIGNATURES[name]
  bound = inspect.BoundArguments(sig, arguments)
  return ORIGINALS[name][1](*bound.args, **bound.kwargs)


def _stack() -> list[Handler]:
  stack = getattr(_local, "handlers", None)
  if stack is None:
    stack = _local.handlers = []
  return stack


def _make_proxy(name: str) -> Callable[..., Any]:
  original = ORIGINALS[name][1]

  def proxy(*args, **kwargs):
    stack = _stack()
    if not stack or getattr(_local, "busy", False):
      return original(*args, **kwargs)
    _local.busy = True
    try:
      return stack[-1](name, bind(name, args, kwargs))
    finally:
      _local.busy = False

  proxy.__name__ = proxy.__qualname__ = name
  proxy.__doc__ = original.__doc__
  proxy.__wrapped__ = original
  return proxy


PROXIES = {name: _make_proxy(name) for name in ORIGINALS}


def _install() -> None:
  global _users
  with _lock:
    if _users == 0:
      for name, (module, _) in ORIGINALS.items():
        _saved[name] = getattr(module, name)
        setattr(module, name, PROXIES[name])
    _users += 1


def _uninstall() -> None:
  global _users
  with _lock:
    _users -= 1
    if _users == 0:
      for name, (module, _) in ORIGINALS.items():
        setattr(module, name, _saved.pop(name))


def is_installed() -> bool:
  """Whether any handler is active (in any thread), i.e. the proxies are in place."""
  with _lock:
    return _users > 0


@contextlib.contextmanager
def active(handler: Handler) -> Iterator[None]:
  """Route this thread's intercepted calls to ``handler`` inside the block.

  Nested blocks stack (an adapted module called inside another one gets its own
  handler); the handler's own calls to the intercepted functions run the originals.
  """
  _install()
  stack = _stack()
  stack.append(handler)
  busy, _local.busy = getattr(_local, "busy", False), False
  try:
    yield
  finally:
    _local.busy = busy
    stack.pop()
    _uninstall()


@contextlib.contextmanager
def swapped_functions(module: Any) -> Iterator[None]:
  """Point ``module``'s attributes that hold an original function at its proxy.

  Written to the instance ``__dict__`` directly (this is a temporary change of a
  static attribute, legal in any trace) and restored on exit.
  """
  by_id = {id(fn): PROXIES[name] for name, (_, fn) in ORIGINALS.items()}
  attrs = vars(module)
  swapped = {k: v for k, v in attrs.items() if id(v) in by_id and callable(v)}
  for key, value in swapped.items():
    attrs[key] = by_id[id(value)]
  try:
    yield
  finally:
    attrs.update(swapped)

"""DoRA on an existing Linen model without editing it: :func:`intercept_dora`.

Inside ``with intercept_dora(targets, rank=..., alpha=...) as dora:`` every
module whose path matches ``targets`` runs its weights as DoRA:

* an exact ``nn.Dense`` runs :func:`dora_jax.linen.dense.dense_call` (the
  computation of :class:`dora_jax.linen.DoRADense`; adapters beside the kernel);
* any other module (``nn.DenseGeneral``, ``nn.Einsum``, gemma's ``Einsum``, a
  custom module) runs its own code, and each ``jnp.einsum(spec, x, w)`` /
  ``jax.lax.dot_general(x, w, dims)`` it calls on one of its own params ``w``
  (or a dtype cast of it) becomes DoRA on ``w`` in ``w``'s layout
  (:mod:`dora_jax.linen.ops`; adapters under ``dora/<module path>/<w>/``).

How: ``nn.intercept_methods`` tracks which module is running; while the
outermost intercepted call runs, the functions in :data:`INTERCEPTED_OPS` are
replaced by wrappers that look at the innermost running module. The
interception's configuration is also a ``jax.make_user_context`` value, so
``jax.jit`` caches, ``nn.jit``'s included (gemma's ``Transformer.__call__`` is
``nn.jit``-decorated), never serve a trace made with different (or no)
interception.

QDoRA (``base_dtype=``): the adapted weights are quantized when their adapters
are created and written back to ``params``, and later calls run DoRA over the
quantized weights found there (:func:`dora_jax.linen.ops.quantized_weight`).
While a model runs, ``nn.Module.param`` returns a quantized param as it is
(Flax would check its codes' shape against the float weight's) and
``jnp.asarray`` passes it through (``promote_dtype``), see :data:`QUANTIZED_PASSTHROUGH`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
import threading
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes as linen_dtypes
from jax import lax

from dora_jax import general
from dora_jax.linen import ops
from dora_jax.linen._common import ADAPTER_COLLECTION, check_settings, join
from dora_jax.linen.dense import dense_call

#: The functions replaced while an intercepted model runs: name -> (module, attribute).
#: Only calls through these attributes (``jnp.einsum(...)``, ``jax.lax.dot_general(...)``,
#: ``lax.dot_general(...)`` with ``from jax import lax``) are seen; ``x @ w``,
#: ``jnp.dot`` and names imported directly (``from jax.numpy import einsum``) are not.
INTERCEPTED_OPS = {
    "einsum": (jnp, "einsum"),
    "dot_general": (lax, "dot_general"),
}

#: Primitives through which an op's operand still counts as the param it came from
#: (under a trace): dtype casts and sharding annotations, never a change of values.
#: Also replaced while an intercepted model runs, so that model code hands a quantized
#: param on unchanged: ``nn.Module.param`` (no shape check of a quantized param) and
#: ``jnp.asarray`` (``asarray(w, dtype)`` is ``w.astype(dtype)``).
QUANTIZED_PASSTHROUGH = {
    "param": (nn.Module, "param"),
    "asarray": (jnp, "asarray"),
}

_CAST_PRIMITIVES = frozenset({"convert_element_type", "sharding_constraint", "copy", "copy_p"})

_EINSUM_KWARGS = frozenset({"precision", "preferred_element_type", "optimize"})


class _Local(threading.local):
  def __init__(self):
    self.session: Interception | None = None
    self.suspended = 0


_local = _Local()
_user_context: list = []
_lock = threading.Lock()


def _jit_context():
  """The ``jax.make_user_context`` carrying the active interception (made on first use)."""
  with _lock:
    if not _user_context:
      _user_context.append(jax.make_user_context(None))
    return _user_context[0]


class _Patches:
  """Installs the :data:`INTERCEPTED_OPS` wrappers while any thread runs an intercepted model."""

  def __init__(self):
    self.count = 0
    self.originals: dict[str, Callable] = {}

  def acquire(self) -> None:
    with _lock:
      if self.count == 0:
        for name, (owner, attr) in {**INTERCEPTED_OPS, **QUANTIZED_PASSTHROUGH}.items():
          original = getattr(owner, attr)
          self.originals[name] = original
          setattr(owner, attr, _WRAPPERS[name](original))
      self.count += 1

  def release(self) -> None:
    with _lock:
      self.count -= 1
      if self.count == 0:
        for name, (owner, attr) in {**INTERCEPTED_OPS, **QUANTIZED_PASSTHROUGH}.items():
          setattr(owner, attr, self.originals.pop(name))


_patches = _Patches()


def _einsum_wrapper(original):
  def einsum(*args, **kwargs):
    session = _local.session
    if session is None or _local.suspended or not session._frames:
      return original(*args, **kwargs)
    return session.on_einsum(original, args, kwargs)
  einsum.__wrapped__ = original
  return einsum


def _dot_general_wrapper(original):
  signature = inspect.signature(original)

  def dot_general(*args, **kwargs):
    session = _local.session
    if session is None or _local.suspended or not session._frames:
      return original(*args, **kwargs)
    return session.on_dot_general(original, signature, args, kwargs)
  dot_general.__wrapped__ = original
  return dot_general


def _param_wrapper(original):
  def param(self, name, init_fn, *init_args, unbox=True, **init_kwargs):
    scope = self.scope
    if scope is not None and scope.has_variable("params", name):
      value = scope.get_variable("params", name)
      inner = value.unbox() if isinstance(value, nn.meta.AxisMetadata) else value
      if isinstance(inner, general.QuantizedWeight):
        return inner if unbox else value
    return original(self, name, init_fn, *init_args, unbox=unbox, **init_kwargs)
  param.__wrapped__ = original
  return param


def _asarray_wrapper(original):
  from dora_jax.nnx.quantize import _asarray_proxy
  return _asarray_proxy(original)


_WRAPPERS = {"einsum": _einsum_wrapper, "dot_general": _dot_general_wrapper,
             "param": _param_wrapper, "asarray": _asarray_wrapper}


@contextlib.contextmanager
def _suspended() -> Iterator[None]:
  """Our own code runs the original ops (the DoRA functions call ``jnp.einsum`` too)."""
  _local.suspended += 1
  try:
    yield
  finally:
    _local.suspended -= 1


# -- finding the param an operand comes from ----------------------------------------


def _own_params(module: nn.Module) -> dict[str, jax.Array]:
  """The module's own params (not its children's), unboxed."""
  out = {}
  for name, value in module.variables.get("params", {}).items():
    if isinstance(value, nn.meta.AxisMetadata):
      value = value.unbox()
    if not isinstance(value, Mapping) and hasattr(value, "shape"):
      out[name] = value
  return out


def _sources(x) -> Iterator[Any]:
  """``x``, then what it was cast from, through :data:`_CAST_PRIMITIVES` (traced values)."""
  yield x
  while isinstance(x, jax.core.Tracer):
    eqn = getattr(x, "parent", None)  # the equation that made a traced value (JAX internals)
    prim = getattr(getattr(eqn, "primitive", None), "name", None)
    ins = getattr(eqn, "in_tracers", None)
    if prim not in _CAST_PRIMITIVES or not ins or len(ins) != 1:
      return
    x = ins[0]
    yield x


def find_param(module: nn.Module, x) -> str | None:
  """Name of the param of ``module`` that ``x`` is (or is a dtype cast of), else ``None``.

  Traced values are followed back through casts; a concrete array that is not
  the param object itself must equal exactly one same-shaped param's values. A
  quantized weight is the param whose codes it shares (a dtype cast shares them).
  """
  if isinstance(x, general.QuantizedWeight):
    codes = getattr(x, "codes", None)
    for n, v in _own_params(module).items():
      if isinstance(v, general.QuantizedWeight) and (v is x or getattr(v, "codes", 0) is codes):
        return n
    return None
  if not hasattr(x, "shape") or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    return None
  params = _own_params(module)
  by_id = {id(v): n for n, v in params.items()}
  for source in _sources(x):
    if id(source) in by_id:
      return by_id[id(source)]
  if isinstance(x, jax.core.Tracer):
    return None
  equal = [n for n, v in params.items()
           if not isinstance(v, jax.core.Tracer) and tuple(v.shape) == tuple(x.shape)
           and bool(jnp.array_equal(jnp.asarray(v).astype(x.dtype), x))]
  return equal[0] if len(equal) == 1 else None


# -- the interception --------------------------------------------------------------


@dataclasses.dataclass
class _Frame:
  module: nn.Module
  path: str
  matched: bool


@dataclasses.dataclass
class _Run:
  """What one outermost intercepted call saw (a jit cache hit runs none: the
  interception keys the caches, so a hit was checked when it was traced)."""

  adapted: list = dataclasses.field(default_factory=list)
  candidates: dict = dataclasses.field(default_factory=dict)
  matched: dict = dataclasses.field(default_factory=dict)


def _key(frame: _Frame, name: str) -> str:
  """``"<module path>/<param>"`` (the param's name alone at the root)."""
  return join((frame.path, name)) if frame.path else name


def _is_entry_point(module: nn.Module, method_name: str) -> bool:
  """Whether a call can be the model's outermost one: a method of the module's class,
  not a lazy ``setup``, an attribute lookup or a Flax internal (e.g. its setup check)."""
  if method_name == "setup" or (method_name.startswith("__") and method_name != "__call__"):
    return False
  return hasattr(type(module), method_name)


def _matcher(targets) -> tuple[Callable[[str, nn.Module], bool], re.Pattern | None]:
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return targets, None
  pattern = re.compile(targets) if isinstance(targets, str) else targets
  if not isinstance(pattern, re.Pattern):
    raise TypeError(f"targets must be a regex or a callable (path, module) -> bool, "
                    f"got {targets!r}")
  return (lambda path, module: pattern.fullmatch(path) is not None), pattern


class Interception:
  """The active :func:`intercept_dora` context (what ``with ... as dora`` binds).

  Attributes:
    layouts: ``{"<module path>/<param>": WeightLayout}`` of every weight adapted
      at the op level so far: pass it to :func:`dora_jax.linen.merge_params` /
      :func:`dora_jax.linen.cache_base_norms` (``layouts=dora.layouts``).
    adapted: paths of everything adapted so far (intercepted ``nn.Dense`` by
      module path, other weights as ``"<module path>/<param>"``), sorted.
  """

  def __init__(self, targets, settings: ops.Settings):
    self.targets = targets
    self.settings = settings
    self._match, self._pattern = _matcher(targets)
    self.layouts: dict[str, Any] = {}
    self._adapted: set[str] = set()
    self._frames: list[_Frame] = []
    self._run: _Run | None = None
    try:
      hash(targets)
    except TypeError as err:
      raise TypeError(f"targets must be hashable (it keys jit caches), got {targets!r}") from err
    self.jit_key = ("dora_jax.linen.intercept_dora", targets, settings)

  @property
  def adapted(self) -> list[str]:
    return sorted(self._adapted)

  def _wants(self, frame: _Frame, name: str) -> bool:
    if frame.matched:
      return True
    return self._pattern is not None and self._pattern.fullmatch(_key(frame, name)) is not None

  def _record(self, key: str, layout) -> None:
    old = self.layouts.get(key)
    if old is not None and old != layout:
      raise ValueError(f"intercept_dora: {key!r} enters two contractions with different "
                       f"layouts ({old} and {layout}); one adapter cannot serve both")
    self.layouts[key] = layout
    self._adapted.add(key)
    self._run.adapted.append(key)

  # nn.intercept_methods hook
  def on_method(self, next_fun, args, kwargs, context):
    if _local.suspended:
      return next_fun(*args, **kwargs)
    module = context.module
    path = join(module.path)
    matched = bool(self._match(path, module))
    if (type(module) is nn.Dense and context.method_name == "__call__"
        and (matched or self._wants(_Frame(module, path, False), "kernel"))):
      if self._frames:
        return self._dense(module, path, args, kwargs)
      _patches.acquire()  # a bare nn.Dense: the quantized passthrough is needed too
      try:
        return self._dense(module, path, args, kwargs)
      finally:
        _patches.release()
    frame = _Frame(module, path, matched)
    root = not self._frames
    if root and not _is_entry_point(module, context.method_name):
      return next_fun(*args, **kwargs)
    if root:
      self._run = _Run()
      _patches.acquire()
    if matched:
      self._run.matched.setdefault(path or "<root>", type(module).__name__)
    self._frames.append(frame)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      self._frames.pop()
      if root:
        _patches.release()
    if root:
      run, self._run = self._run, None
      self._check(module, run)
    return out

  def _dense(self, module: nn.Dense, path: str, args, kwargs):
    if module.dot_general is not None or module.dot_general_cls is not None:
      raise NotImplementedError(f"intercept_dora: {path}: nn.Dense with a custom dot_general "
                                "is not supported")
    if module.promote_dtype is not linen_dtypes.promote_dtype:
      raise NotImplementedError(f"intercept_dora: {path}: nn.Dense with a custom "
                                "promote_dtype is not supported")
    inputs = args[0] if args else kwargs["inputs"]
    s = self.settings
    with _suspended():
      y = dense_call(module, inputs, features=module.features, use_bias=module.use_bias,
                     dtype=module.dtype, param_dtype=module.param_dtype,
                     precision=module.precision, kernel_init=module.kernel_init,
                     bias_init=module.bias_init, rank=s.rank, alpha=s.alpha, rslora=s.rslora,
                     dropout=s.dropout, adapter_dtype=s.adapter_dtype, cache_norm=s.cache_norm,
                     deterministic=s.deterministic, base_dtype=s.base_dtype,
                     block_size=s.block_size, detach_norm=s.detach_norm)
    self._adapted.add(path)
    if self._run is not None:
      self._run.adapted.append(path)
    return y

  # op hooks
  def _weight(self, frame: _Frame, x, w, what: str) -> str | None:
    """The param name of ``w`` when it is to be adapted (raises for a matched lhs weight)."""
    name = find_param(frame.module, w)
    if name is None:
      lhs = find_param(frame.module, x)
      if lhs is not None and self._wants(frame, lhs):
        raise NotImplementedError(
            f"intercept_dora: {_key(frame, lhs)!r} enters {what} "
            "as the first operand; DoRA adapts a weight that is the second (rhs) operand")
      alike = [n for n, v in _own_params(frame.module).items()
               if tuple(v.shape) == tuple(jnp.shape(w)) and self._wants(frame, n)]
      if alike:
        raise NotImplementedError(
            f"intercept_dora: {_key(frame, alike[0])!r}: the second operand of {what} has its "
            f"shape {tuple(jnp.shape(w))} but is neither the param nor a dtype cast of it "
            "(computed from it, e.g. scaled, or cast outside jax.jit); DoRA adapts the param "
            "as it enters the contraction")
      return None
    key = _key(frame, name)
    self._run.candidates.setdefault(key, f"{what} in {type(frame.module).__name__}")
    return name if self._wants(frame, name) else None

  def _adapt(self, frame: _Frame, name: str, op: ops.WeightOp, x, w):
    key = _key(frame, name)
    with _suspended():
      y, layout = ops.adapted_op(frame.module, name, op, x, w, self.settings, where=key)
    self._record(key, layout)
    return y

  def _intercepted(self, original, args, kwargs, x, w, what: str, unsupported: list,
                   make_op):
    """DoRA in place of the call when ``w`` is a targeted weight, else the call itself."""
    frame = self._frames[-1]
    name = self._weight(frame, x, w, what)
    if name is None:
      return original(*args, **kwargs)
    if unsupported:
      raise NotImplementedError(f"intercept_dora: {_key(frame, name)!r}: {what} with "
                                f"{', '.join(unsupported)} is not supported")
    return self._adapt(frame, name, make_op(), x, w)

  def on_einsum(self, original, args, kwargs):
    if len(args) != 3 or not isinstance(args[0], str):
      return original(*args, **kwargs)
    spec, x, w = args
    unsupported = [f"{k}=" for k, v in sorted(kwargs.items())
                   if k not in _EINSUM_KWARGS and v is not None]
    if "->" not in spec:
      unsupported.append("an implicit output (no '->')")
    return self._intercepted(
        original, args, kwargs, x, w, f"jnp.einsum('{spec}')", unsupported,
        lambda: ops.WeightOp.einsum(spec, kwargs.get("precision"),
                                    kwargs.get("preferred_element_type")))

  def on_dot_general(self, original, signature, args, kwargs):
    try:
      call = signature.bind(*args, **kwargs).arguments
    except TypeError:
      return original(*args, **kwargs)
    names = list(signature.parameters)
    x, w, dims = (call.get(n) for n in names[:3])
    unsupported = [f"{k}=" for k, v in call.items()
                   if k not in (*names[:3], "precision", "preferred_element_type")
                   and v is not None]
    return self._intercepted(
        original, args, kwargs, x, w, f"lax.dot_general({dims})", unsupported,
        lambda: ops.WeightOp.dot_general(dims, call.get("precision"),
                                         call.get("preferred_element_type")))

  def _check(self, root: nn.Module, run: _Run) -> None:
    """No silent no-op: a run that could create or use adapters but adapted nothing raises."""
    if run.adapted:
      return
    mutable = root.is_mutable_collection(ADAPTER_COLLECTION)
    # given adapters, none used: a mismatch only if adaptable weights ran (a method
    # without projections, e.g. a cache initialiser, legitimately adapts nothing)
    given = bool(run.candidates) and bool(root.variables.get(ADAPTER_COLLECTION))
    if not (mutable or given):
      return
    lines = [f"intercept_dora: targets {self.targets!r} adapted nothing in "
             f"{type(root).__name__} (the '{ADAPTER_COLLECTION}' collection is "
             f"{'mutable' if mutable else 'given'})."]
    if run.candidates:
      listed = [f"  {k}: {v}" for k, v in sorted(run.candidates.items())]
      lines.append("Weights that can be adapted (match a module path or '<path>/<param>'):")
      lines += listed[:40] + ([f"  ... and {len(listed) - 40} more"] if len(listed) > 40 else [])
    else:
      lines.append("No module param entered jnp.einsum / jax.lax.dot_general as the second "
                   "operand, and no nn.Dense ran.")
    if run.matched:
      lines.append("Matched modules with no adaptable weight: " + ", ".join(
          f"{p} ({t})" for p, t in sorted(run.matched.items())) + " (DoRA needs the weight as "
          "the second operand of jnp.einsum or jax.lax.dot_general, called through those "
          "names; x @ w and jnp.dot are not intercepted)")
    raise ValueError("\n".join(lines))


@contextlib.contextmanager
def intercept_dora(targets, *, rank: int, alpha: float, rslora: bool = False,
                   dropout: float = 0.0, adapter_dtype=jnp.float32, cache_norm: bool = False,
                   deterministic: bool | None = None, base_dtype: str | None = None,
                   block_size: int | None = None,
                   detach_norm: bool = True) -> Iterator[Interception]:
  """Run the weights of matching modules of any Linen model as DoRA (PEFT semantics).

  Inside the context, for every module whose path (``'/'``-joined names from
  the root, e.g. ``layer_0/attn/q_einsum``) fully matches ``targets``:

  * an ``nn.Dense`` computes the DoRA output with its own ``kernel``/``bias``
    and ``lora_a [d_in, r]``, ``lora_b [r, d_out]``, ``magnitude [d_out]`` in the
    ``dora`` collection of its scope (as :class:`DoRADense`);
  * any other module runs its own code, and every ``jnp.einsum(spec, x, w)`` or
    ``jax.lax.dot_general(x, w, dims)`` on one of its params ``w`` (or a dtype
    cast of it) runs as DoRA on ``w`` in its native layout
    (:func:`dora_jax.general.dora_einsum`), with ``lora_a [*B, *C, r]``,
    ``lora_b [*B, r, *O]``, ``magnitude [*B, *O]`` under ``dora/<path>/<w>/``.
    A regex ``targets`` may also name one weight: ``<module path>/<w>``.

  Adapters are created, from the weights as they are, when the ``dora``
  collection is mutable (``init``, or ``apply(..., mutable=["dora"])`` with a
  ``params`` rng): PEFT's init (``lora_a`` Kaiming-uniform, ``lora_b = 0``,
  ``m = ‖W‖``), so the adapted model reproduces the base bit for bit.

  Raises (at the end of the outermost call) when a call that creates adapters
  (or is given some and runs adaptable weights) adapts nothing, listing the
  weights that could be adapted.
  Jitted functions (``jax.jit``, ``nn.jit``) traced outside the context, or
  under another configuration, are retraced inside it (the configuration is a
  ``jax.make_user_context`` value), and traces made inside are not reused
  outside. Contexts cannot be nested.

  Args:
    targets: a regex, or a predicate ``(path, module) -> bool``.
    rank, alpha, rslora, dropout, adapter_dtype, cache_norm, detach_norm: as
      :class:`DoRADense` (``detach_norm=False``: the exact gradient through the norm).
    deterministic: dropout mode for every adapted layer (required when
      ``dropout > 0``, unless the module has a ``deterministic`` attribute).
    base_dtype: QDoRA: ``"nf4"``, ``"int4"``, ``"int8"`` or ``"fp8"``. The call that
      creates the adapters (``init``, or ``apply(..., mutable=["dora", "params"])``)
      quantizes each adapted weight (:func:`dora_jax.quantize_kernel`, in the layout
      of its op) and returns it in ``params``, with ``magnitude = ‖Ŵ‖`` (PEFT's QDoRA
      init: the output is the quantized base model's, bit for bit); later calls take
      the quantized ``params`` and run DoRA over them. Params that hold quantized
      weights run as QDoRA without it too.
    block_size: the quantization block along ``d_in`` (nf4/int4 default 64; it must
      divide each adapted weight's ``d_in``). Only with ``base_dtype``.

  Yields:
    An :class:`Interception`: ``.layouts`` for :func:`merge_params`, ``.adapted``.

  Example (gemma's ``gm.nn.Transformer``; ``params`` its base params)::

    with dora_jax.linen.intercept_dora(r"layer_\\d+/(attn/.*_einsum|mlp)", rank=8,
                                       alpha=16) as dora:
      _, adapters = model.apply({"params": params}, tokens, rngs={"params": key},
                                mutable=["dora"])
      out = model.apply({"params": params, **adapters}, tokens)
    merged = dora_jax.linen.merge_params(params, adapters, alpha=16, layouts=dora.layouts)
  """
  dtype = jnp.dtype(adapter_dtype) if _is_dtype(adapter_dtype) else adapter_dtype
  rate = check_settings("intercept_dora", rank=rank, alpha=alpha, dropout=dropout,
                        adapter_dtype=dtype, detach_norm=detach_norm)
  from dora_jax.nnx.quantize import check_base_dtype
  qtype = check_base_dtype(base_dtype, block_size)
  settings = ops.Settings(rank=rank, alpha=float(alpha), rslora=bool(rslora), dropout=rate,
                          adapter_dtype=dtype, cache_norm=bool(cache_norm),
                          deterministic=deterministic, base_dtype=qtype, block_size=block_size,
                          detach_norm=detach_norm)
  session = Interception(targets, settings)
  if _local.session is not None:
    raise RuntimeError("intercept_dora: contexts cannot be nested")
  _local.session = session
  try:
    with _jit_context()(session.jit_key), nn.intercept_methods(session.on_method):
      yield session
  finally:
    _local.session = None


def _is_dtype(value) -> bool:
  try:
    jnp.dtype(value)
    return True
  except TypeError:
    return False

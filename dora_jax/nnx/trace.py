"""Which of a module's own weights enter which contraction, found by tracing one call.

:func:`contractions` traces ``call(module, *args, **kwargs)`` abstractly
(``jax.make_jaxpr`` on shape-only inputs: no FLOPs, no effect on the module)
with every ``jax.lax.dot_general``/``jax.numpy.einsum`` call recorded by
:mod:`dora_jax.nnx.intercept`, then follows the data flow in the jaxpr: a
recorded call whose second operand is one of the module's own ``nnx.Param``\\ s
(directly, or through value-preserving ops: dtype casts, reshapes, transposes,
sharding constraints) is a :class:`Contraction`. The result depends only on the
call's signature (shapes, dtypes, static arguments), so it is cached.

Rules (each violation raises ``NotImplementedError`` naming the module and weight):

* the weight is the second operand (``einsum(spec, x, W)``, ``dot_general(x, W, ...)``);
* a weight must not reach a ``dot_general`` the interceptor did not see
  (``x @ W``, ``jnp.matmul``, ``jnp.dot``, a bound reference), nor a convolution;
* ``out_sharding`` and a custom ``_dot_general`` are not supported on an adapted op.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from dora_jax import general
from dora_jax.nnx import intercept

#: Primitives that pass a value through unchanged (up to dtype and shape).
_IDENTITY = frozenset({"copy", "copy_p", "sharding_constraint", "device_put", "reshard",
                       "mesh_cast", "optimization_barrier", "pvary"})
_RESHAPES = frozenset({"reshape", "squeeze", "expand_dims"})
_CALLS = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "checkpoint",
                    "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
#: Contractions a weight could reach without being intercepted.
_CONTRACTIONS = frozenset({"dot_general"})
_REFUSED = frozenset({"conv_general_dilated", "ragged_dot", "ragged_dot_general"})


@dataclasses.dataclass(frozen=True)
class Contraction:
  """One intercepted op whose kernel (second operand) is a module's own weight.

  Attributes:
    index: ordinal of the op among the intercepted calls of the module's own call.
    op: ``"einsum"`` or ``"dot_general"``.
    param: attribute name of the module's ``nnx.Param``.
    equation: the einsum equation (spaces removed), or ``None``.
    dimension_numbers: the ``dot_general`` dimension numbers (tuples), or ``None``.
    x_shape, kernel_shape: the operands' shapes as the op sees them.
    layout: the kernel operand's :class:`~dora_jax.general.WeightLayout`.
    chain: ops from the stored weight to the kernel operand, in order:
      ``("convert", dtype name)``, ``("reshape", shape)``, ``("transpose", perm)``.
  """

  index: int
  op: str
  param: str
  equation: str | None
  dimension_numbers: tuple | None
  x_shape: tuple[int, ...]
  kernel_shape: tuple[int, ...]
  layout: general.WeightLayout
  chain: tuple[tuple[str, Any], ...]

  def matches(self, op: str, arguments: dict[str, Any]) -> bool:
    """Whether an intercepted call at this ordinal is the same op (equation, shapes)."""
    if op != self.op:
      return False
    if op == "einsum":
      operands = arguments["operands"]
      return (len(operands) == 2 and _equation(arguments["subscripts"]) == self.equation
              and tuple(np.shape(operands[1])) == self.kernel_shape)
    return (_dimension_numbers(arguments["dimension_numbers"]) == self.dimension_numbers
            and tuple(np.shape(arguments["rhs"])) == self.kernel_shape)


def _equation(subscripts: Any) -> str | None:
  return subscripts.replace(" ", "") if isinstance(subscripts, str) else None


def _dimension_numbers(dn) -> tuple:
  (lc, rc), (lb, rb) = dn
  return ((tuple(int(i) for i in lc), tuple(int(i) for i in rc)),
          (tuple(int(i) for i in lb), tuple(int(i) for i in rb)))


def own_params(module: nnx.Module) -> dict[str, nnx.Param]:
  """The module's own base weights: ``nnx.Param`` attributes (adapters excluded)."""
  return {name: value for name, value in vars(module).items()
          if isinstance(value, nnx.Param) and not isinstance(value, nnx.LoRAParam)}


def apply_chain(value: jax.Array, chain: tuple[tuple[str, Any], ...], *,
                casts: bool = True) -> jax.Array:
  """The kernel operand from the stored weight (``casts=False``: shapes only)."""
  for kind, arg in chain:
    if kind == "convert":
      value = value.astype(arg) if casts else value
    elif kind == "reshape":
      value = value.reshape(arg)
    else:
      value = jnp.transpose(value, arg)
  return value


def invert_chain(value: jax.Array, chain: tuple[tuple[str, Any], ...],
                 stored_shape: tuple[int, ...]) -> jax.Array:
  """The stored weight's layout from a kernel-operand-shaped value (shape ops undone)."""
  shapes = [tuple(stored_shape)]
  for kind, arg in chain:
    if kind == "reshape":
      shapes.append(tuple(arg))
    elif kind == "transpose":
      shapes.append(tuple(shapes[-1][i] for i in arg))
    else:
      shapes.append(shapes[-1])
  for (kind, arg), before in zip(reversed(chain), reversed(shapes[:-1])):
    if kind == "reshape":
      value = value.reshape(before)
    elif kind == "transpose":
      value = jnp.transpose(value, np.argsort(arg))
  return value


# -- jaxpr data flow ----------------------------------------------------------------


def _is_var(v) -> bool:
  return isinstance(v, jcore.Var)


def _sub_jaxpr(eqn) -> jcore.Jaxpr | None:
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    sub = eqn.params.get(key)
    if isinstance(sub, jcore.ClosedJaxpr):
      return sub.jaxpr
    if isinstance(sub, jcore.Jaxpr):
      return sub
  return None


def _view_step(eqn, out_index: int):
  """``(input var, op or None)`` when ``eqn``'s output ``out_index`` is a view of one input."""
  name = eqn.primitive.name
  if name in _IDENTITY:
    return eqn.invars[out_index if len(eqn.invars) == len(eqn.outvars) else 0], None
  if name == "convert_element_type":
    return eqn.invars[0], ("convert", jnp.dtype(eqn.params["new_dtype"]).name)
  if name in _RESHAPES:
    return eqn.invars[0], ("reshape", tuple(eqn.outvars[0].aval.shape))
  if name == "broadcast_in_dim":
    if int(np.prod(eqn.outvars[0].aval.shape)) == int(np.prod(eqn.invars[0].aval.shape)):
      return eqn.invars[0], ("reshape", tuple(eqn.outvars[0].aval.shape))
    return None
  if name == "transpose":
    return eqn.invars[0], ("transpose", tuple(int(i) for i in eqn.params["permutation"]))
  return None


def _trace_back(jaxpr: jcore.Jaxpr, var) -> tuple[Any, list] | None:
  """Follow views back from ``var`` to an invar of ``jaxpr``: ``(invar, ops, last first)``."""
  producers = {}
  for eqn in jaxpr.eqns:
    for i, out in enumerate(eqn.outvars):
      producers[out] = (eqn, i)
  invars = set(jaxpr.invars)
  ops: list = []
  while _is_var(var):
    if var in invars:
      return var, ops
    if var not in producers:
      return None
    eqn, i = producers[var]
    sub = _sub_jaxpr(eqn)
    if eqn.primitive.name in _CALLS and sub is not None and len(sub.invars) == len(eqn.invars):
      inner = _trace_back(sub, sub.outvars[i])
      if inner is None:
        return None
      inner_var, inner_ops = inner
      ops.extend(inner_ops)
      var = eqn.invars[sub.invars.index(inner_var)]
      continue
    step = _view_step(eqn, i)
    if step is None:
      return None
    var, op = step
    if op is not None:
      ops.append(op)
  return None


def _derived_uses(jaxpr: jcore.Jaxpr, seeds: dict[Any, str]) -> collections.Counter:
  """``Counter[(weight, primitive)]`` of contraction-like ops fed by views of each weight."""
  derived = dict(seeds)
  uses: collections.Counter = collections.Counter()
  for eqn in jaxpr.eqns:
    fed = {derived[v] for v in eqn.invars if _is_var(v) and v in derived}
    if not fed:
      continue
    name = eqn.primitive.name
    if name in _CONTRACTIONS or name in _REFUSED:
      for weight in fed:
        uses[(weight, name)] += 1
      continue
    sub = _sub_jaxpr(eqn)
    if sub is not None and len(sub.invars) <= len(eqn.invars):
      offset = len(eqn.invars) - len(sub.invars)
      inner = {sub.invars[k - offset]: derived[v] for k, v in enumerate(eqn.invars)
               if k >= offset and _is_var(v) and v in derived}
      uses.update(_derived_uses(sub, inner))
      continue
    for i in range(len(eqn.outvars)):
      step = _view_step(eqn, i)
      if step is not None and _is_var(step[0]) and step[0] in derived:
        derived[eqn.outvars[i]] = derived[step[0]]
  return uses


# -- the traced call --------------------------------------------------------------


class Recorder:
  """Handler that runs the original ops and keeps their arguments, in call order."""

  def __init__(self):
    self.calls: list[tuple[str, dict[str, Any]]] = []

  def __call__(self, op: str, arguments: dict[str, Any]) -> Any:
    self.calls.append((op, arguments))
    return intercept.call_original(op, arguments)


def _is_array(x) -> bool:
  return isinstance(x, (jax.Array, np.ndarray, np.generic)) or hasattr(x, "aval")


def _abstract(x):
  return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x) if not hasattr(x, "dtype")
                              else x.dtype)


def _operands(op: str, arguments: dict[str, Any]):
  if op == "einsum":
    ops = arguments["operands"]
    return tuple(ops) if len(ops) == 2 and isinstance(arguments["subscripts"], str) else None
  return arguments["lhs"], arguments["rhs"]


_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 512


def contractions(module: nnx.Module, call: Callable[..., Any], args: tuple, kwargs: dict, *,
                 where: str = "") -> tuple[Contraction, ...]:
  """The module's own weights' contractions in ``call(module, *args, **kwargs)``.

  ``call`` is the base class's ``__call__`` (unadapted). Raises
  ``NotImplementedError`` for the cases the module docstring lists.
  """
  where = where or type(module).__name__
  params = own_params(module)
  graphdef, state = nnx.split(module)
  state_leaves, state_tree = jax.tree_util.tree_flatten_with_path(state)
  param_of_leaf = {}
  for i, (path, _) in enumerate(state_leaves):
    if len(path) == 2 and getattr(path[0], "key", None) in params:
      param_of_leaf[i] = path[0].key
  call_leaves, call_tree = jax.tree.flatten((args, kwargs))
  dynamic = [i for i, x in enumerate(call_leaves) if _is_array(x)]
  static = tuple((i, x) for i, x in enumerate(call_leaves) if i not in set(dynamic))
  abstract_state = [_abstract(x) for _, x in state_leaves]
  abstract_args = [_abstract(call_leaves[i]) for i in dynamic]
  key = None
  try:
    key = (type(module), call, graphdef, state_tree, tuple(abstract_state), call_tree,
           tuple(dynamic), tuple(abstract_args), static, where)
    hash(key)
  except TypeError:
    key = None
  if key is not None and key in _CACHE:
    _CACHE.move_to_end(key)
    return _CACHE[key]

  recorder = Recorder()

  def traced(state_values, arg_values):
    st = jax.tree.unflatten(state_tree, state_values)
    clone = nnx.merge(graphdef, st)
    leaves = list(call_leaves)
    for i, v in zip(dynamic, arg_values):
      leaves[i] = v
    a, kw = jax.tree.unflatten(call_tree, leaves)
    with intercept.active(recorder), intercept.swapped_functions(clone):
      out = call(clone, *a, **kw)
    outs = [x for x in jax.tree.leaves(out) if _is_array(x)]
    seen = []
    for op, arguments in recorder.calls:
      pair = _operands(op, arguments)
      seen.extend(pair if pair is not None else ())
    return outs, seen

  closed = jax.make_jaxpr(traced)(abstract_state, abstract_args)
  jaxpr = closed.jaxpr
  n_out = len(jaxpr.outvars) - sum(
      2 for op, a in recorder.calls if _operands(op, a) is not None)
  operand_vars = iter(jaxpr.outvars[n_out:])
  weight_invars = {jaxpr.invars[i]: name for i, name in param_of_leaf.items()}

  found: list[Contraction] = []
  problems: list[str] = []
  for index, (op, arguments) in enumerate(recorder.calls):
    pair = _operands(op, arguments)
    if pair is None:
      continue
    x_var, w_var = next(operand_vars), next(operand_vars)
    x_src, w_src = _trace_back(jaxpr, x_var), _trace_back(jaxpr, w_var)
    if x_src is not None and x_src[0] in weight_invars:
      problems.append(f"weight {weight_invars[x_src[0]]!r} is the first operand of a {op} "
                      "(only op(x, W) with the weight second is adapted)")
      continue
    if w_src is None or w_src[0] not in weight_invars:
      continue
    name = weight_invars[w_src[0]]
    x, w = pair
    chain = tuple(reversed(w_src[1]))
    shapes = tuple(np.shape(x)), tuple(np.shape(w))
    bad = [k for k in ("out", "out_sharding") if arguments.get(k) is not None]
    if op == "einsum":
      if arguments.get("_dot_general") is not intercept.ORIGINALS["dot_general"][1]:
        bad.append("_dot_general")
      equation, dn = _equation(arguments["subscripts"]), None
    else:
      equation, dn = None, _dimension_numbers(arguments["dimension_numbers"])
    if bad:
      problems.append(f"weight {name!r} enters a {op} with {', '.join(bad)} set (not "
                      "supported on an adapted op)")
      continue
    layout = (general.einsum_layout(equation, *shapes) if op == "einsum"
              else general.dot_general_layout(dn, *shapes))
    found.append(Contraction(index, op, name, equation, dn, *shapes, layout, chain))

  uses = _derived_uses(jaxpr, weight_invars)
  for (name, prim), count in sorted(uses.items()):
    if prim in _REFUSED:
      problems.append(f"weight {name!r} enters {prim} (adapt convolutions as nnx.Conv, or "
                      "register a wrapper with dora_jax.nnx.register)")
    elif count > sum(1 for c in found if c.param == name):
      problems.append(
          f"weight {name!r} enters {count - sum(1 for c in found if c.param == name)} "
          f"{prim} op(s) not made through jax.numpy.einsum / jax.lax.dot_general (e.g. x @ W, "
          "jnp.matmul, jnp.dot or a reference to lax.dot_general bound elsewhere), which "
          "DoRA cannot intercept; call einsum/dot_general, or register a wrapper with "
          "dora_jax.nnx.register")
  if problems:
    raise NotImplementedError(f"{where} ({type(module).__name__}): " + "; ".join(problems))
  result = tuple(found)
  if key is not None:
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
      _CACHE.popitem(last=False)
  return result

"""DoRA for Flax Linen: a drop-in ``nn.Dense`` and a way to adapt an existing model.

Variables of one adapted Dense layer (``d_in`` = the input's last axis):

============== ============================ =========================================
collection     name / shape                 notes
============== ============================ =========================================
``params``     ``kernel [d_in, d_out]``     the frozen base weights, ``nn.Dense``'s names
``params``     ``bias [d_out]``             (when ``use_bias``)
``dora``       ``lora_a [d_in, r]``         trainable; ``U(-1/√d_in, 1/√d_in)`` (PEFT)
``dora``       ``lora_b [r, d_out]``        trainable; zeros
``dora``       ``magnitude [d_out]``        trainable; ``‖kernel[:, j]‖₂`` when created
``dora_cache`` ``norm [d_out]``, ``stamp``  only with ``cache_norm=True``
============== ============================ =========================================

The adapters live in their own collection, :data:`ADAPTER_COLLECTION`
(``"dora"``), so the base stays frozen by construction: differentiate and
optimise ``variables["dora"]`` only. The collection maps to
:class:`dora_jax.nnx.DoRAParam` in Flax's Linen↔NNX bridge.

Two ways to use it:

1. Write :class:`DoRADense` where the model had ``nn.Dense`` (same fields and
   parameter names, plus ``rank``, ``alpha``, ...).
2. Adapt an existing model without editing it: inside
   ``with intercept_dora(targets, rank=..., alpha=...):`` every ``nn.Dense``
   whose path (``'/'``-joined module names, e.g. ``Block_0/Dense_1``) matches
   ``targets`` runs as DoRA. Create the adapters from the (pretrained) params::

     with intercept_dora(r".*Dense_\\d+", rank=8, alpha=16):
       _, adapters = model.apply(variables, x, rngs={"params": key}, mutable=["dora"])
       y = model.apply({**variables, **adapters}, x)

   and serve the plain model with ``merge_params(variables, adapters, alpha=16)``.

Both paths run the same function as the NNX layers, :func:`dora_jax.dora_dense`,
so NNX and Linen agree given the same parameters.
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Callable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict, unfreeze
from flax.linen import dtypes as linen_dtypes
from flax.typing import Dtype, Initializer, PrecisionLike

from dora_jax import _adapter
from dora_jax.dense import lora_scale, merge_kernel

#: Linen collection holding the trainable adapters ``lora_a``, ``lora_b``, ``magnitude``.
ADAPTER_COLLECTION = "dora"
#: Linen collection holding the cached norm and its stamp (``cache_norm=True``).
CACHE_COLLECTION = "dora_cache"


def _register_bridge_name() -> None:
  """Map the ``dora`` collection to :class:`dora_jax.nnx.DoRAParam` in the Linen↔NNX bridge."""
  from flax.nnx import variablelib
  from dora_jax.nnx import DoRAParam
  if ADAPTER_COLLECTION not in variablelib.VariableTypeCache:
    variablelib.register_variable_name(ADAPTER_COLLECTION, DoRAParam)


_register_bridge_name()


def _dora_dense_call(module: nn.Module, inputs: jax.Array, *, features: int, use_bias: bool,
                     dtype, param_dtype, precision, kernel_init, bias_init, rank: int,
                     alpha: float, rslora: bool, dropout: float, adapter_dtype,
                     cache_norm: bool, deterministic: bool | None) -> jax.Array:
  """The DoRA Dense computation inside ``module``'s scope (a Dense or DoRADense)."""
  d_in = jnp.shape(inputs)[-1]
  path = "/".join(module.path) or type(module).__name__
  _adapter.check_rank(rank, d_in, features, path)
  rate = _adapter.check_dropout(dropout)
  kernel = module.param("kernel", kernel_init, (d_in, features), param_dtype)
  bias = module.param("bias", bias_init, (features,), param_dtype) if use_bias else None

  def init_a():
    return _adapter.init_lora_a(module.make_rng("params"), (d_in, rank), d_in, adapter_dtype)

  lora_a = module.variable(ADAPTER_COLLECTION, "lora_a", init_a).value
  lora_b = module.variable(ADAPTER_COLLECTION, "lora_b",
                           lambda: jnp.zeros((rank, features), adapter_dtype)).value
  magnitude = module.variable(
      ADAPTER_COLLECTION, "magnitude",
      lambda: _adapter.init_magnitude(jnp.asarray(kernel), adapter_dtype)).value
  scale = lora_scale(alpha, rank, rslora=rslora)

  cdt = jnp.dtype(dtype) if dtype is not None else jnp.result_type(
      *[v for v in (inputs, kernel, bias) if v is not None])
  x = jnp.asarray(inputs).astype(cdt)

  norm = None
  if cache_norm:
    if module.has_variable(CACHE_COLLECTION, "norm"):
      norm_var = module.variable(CACHE_COLLECTION, "norm")
      stamp_var = module.variable(CACHE_COLLECTION, "stamp")
      norm, new_cache, new_stamp = _adapter.cached_norm(
          kernel, lora_a, lora_b, scale, norm_var.value, stamp_var.value)
      if module.is_mutable_collection(CACHE_COLLECTION):
        norm_var.value, stamp_var.value = new_cache, new_stamp
    elif module.is_mutable_collection(CACHE_COLLECTION):
      norm, new_cache, new_stamp = _adapter.cached_norm(
          kernel, lora_a, lora_b, scale, jnp.zeros((features,), jnp.float32),
          _adapter.empty_stamp())
      module.variable(CACHE_COLLECTION, "norm", lambda: new_cache)
      module.variable(CACHE_COLLECTION, "stamp", lambda: new_stamp)

  base_sq = None  # the frozen kernel's ‖W_j‖², when cache_base_norms stored them
  if module.has_variable(CACHE_COLLECTION, "base_sq_norm"):
    base_sq = module.variable(CACHE_COLLECTION, "base_sq_norm").value

  x_dropped = None
  if rate > 0.0:
    deterministic = nn.merge_param("deterministic", module.deterministic
                                   if hasattr(module, "deterministic") else None, deterministic)
    if not deterministic:
      keep = 1.0 - rate
      mask = jax.random.bernoulli(module.make_rng("dropout"), keep, x.shape)
      x_dropped = jax.lax.select(mask, x / keep, jnp.zeros_like(x))
  return _adapter.dora_forward(x, kernel, lora_a, lora_b, magnitude, scale, bias, norm=norm,
                               base_sq_norm=base_sq, x_dropped=x_dropped, precision=precision)


class DoRADense(nn.Module):
  """Drop-in replacement for ``nn.Dense`` with a DoRA adapter (PEFT semantics).

  ``y = m / ‖W + s·a·b‖ ⊙ (x·W + s·(x·a)·b) + bias`` for ``x [..., d_in]``, with
  ``kernel [d_in, features]`` and ``bias [features]`` in ``params`` (``nn.Dense``'s
  names and initialisers) and ``lora_a [d_in, r]``, ``lora_b [r, features]``,
  ``magnitude [features]`` in the ``dora`` collection.

  Attributes:
    features, use_bias, dtype, param_dtype, precision, kernel_init, bias_init:
      as ``nn.Dense``. ``precision`` applies to the forward matmuls.
    rank: LoRA rank ``r`` (``1 <= r <= min(d_in, features)``).
    alpha: LoRA alpha; scale ``alpha / r`` (``alpha / √r`` with ``rslora``).
    rslora: rank-stabilised scaling.
    dropout: dropout rate on the adapter path (PEFT's ``lora_dropout``); needs a
      ``dropout`` rng and ``deterministic=False`` in training.
    adapter_dtype: dtype of the adapter variables (default float32).
    cache_norm: reuse the norm stored in ``dora_cache`` while a stamp of the
      adapters matches; recompute (and store, when ``dora_cache`` is mutable)
      otherwise. For unmerged inference.
    deterministic: default for the call argument (dropout off when True).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.linen import DoRADense
    >>> layer = DoRADense(features=8, rank=4, alpha=8)
    >>> variables = layer.init(jax.random.key(0), jnp.ones((2, 16)))
    >>> sorted(variables), variables["dora"]["lora_a"].shape
    (['dora', 'params'], (16, 4))
  """

  features: int
  rank: int = 8
  alpha: float = 16.0
  rslora: bool = False
  dropout: float = 0.0
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  adapter_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()
  cache_norm: bool = False
  deterministic: bool | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array, deterministic: bool | None = None) -> jax.Array:
    """``inputs [..., d_in] -> [..., features]``."""
    return _dora_dense_call(
        self, inputs, features=self.features, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision, kernel_init=self.kernel_init,
        bias_init=self.bias_init, rank=self.rank, alpha=self.alpha, rslora=self.rslora,
        dropout=self.dropout, adapter_dtype=self.adapter_dtype, cache_norm=self.cache_norm,
        deterministic=deterministic if deterministic is not None else self.deterministic)


def _linen_matcher(targets) -> Callable[[str, nn.Module], bool]:
  if callable(targets) and not isinstance(targets, (str, re.Pattern)):
    return targets
  pattern = re.compile(targets) if isinstance(targets, str) else targets
  if not isinstance(pattern, re.Pattern):
    raise TypeError(f"targets must be a regex or a callable (path, module) -> bool, got {targets!r}")
  return lambda path, module: pattern.fullmatch(path) is not None


@contextlib.contextmanager
def intercept_dora(targets, *, rank: int, alpha: float, rslora: bool = False,
                   dropout: float = 0.0, adapter_dtype: Dtype = jnp.float32,
                   cache_norm: bool = False, deterministic: bool | None = None) -> Iterator[None]:
  """Run matching ``nn.Dense`` layers of any Linen model as DoRA layers (via ``nn.intercept_methods``).

  Inside the context, a call to an ``nn.Dense`` whose path (``'/'``-joined module
  names from the root, e.g. ``Encoder_0/Dense_1``) fully matches ``targets``
  (a regex, or a predicate ``(path, module) -> bool``) computes the DoRA output
  with the Dense's own ``kernel``/``bias`` and the adapter variables of the
  ``dora`` collection in the Dense's scope (created, from the current kernel,
  when ``dora`` is mutable and they are missing). Other layers run unchanged.
  ``nn.Dense`` with a custom ``dot_general``/``promote_dtype`` is refused.

  Interception happens when the model is traced: trace (``jax.jit``) the
  functions that apply the model inside the context, and don't reuse inside it
  a jitted function already traced outside with the same argument structure
  (its cached trace has no adapters).

  Args:
    targets: which Dense layers to adapt.
    rank, alpha, rslora, dropout, adapter_dtype, cache_norm: as :class:`DoRADense`.
    deterministic: dropout mode for every adapted layer (required when
      ``dropout > 0``).
  """
  match = _linen_matcher(targets)
  _adapter.check_dropout(dropout)

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if (type(module) is not nn.Dense or context.method_name != "__call__"
        or not match("/".join(module.path), module)):
      return next_fun(*args, **kwargs)
    if module.dot_general is not None or module.dot_general_cls is not None:
      raise NotImplementedError(f"{'/'.join(module.path)}: custom dot_general is not supported")
    if module.promote_dtype is not linen_dtypes.promote_dtype:
      raise NotImplementedError(f"{'/'.join(module.path)}: custom promote_dtype is not supported")
    inputs = args[0] if args else kwargs["inputs"]
    return _dora_dense_call(
        module, inputs, features=module.features, use_bias=module.use_bias,
        dtype=module.dtype, param_dtype=module.param_dtype, precision=module.precision,
        kernel_init=module.kernel_init, bias_init=module.bias_init, rank=rank, alpha=alpha,
        rslora=rslora, dropout=dropout, adapter_dtype=adapter_dtype, cache_norm=cache_norm,
        deterministic=deterministic)

  with nn.intercept_methods(interceptor):
    yield


def _walk(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _walk(value, (*prefix, key))
    else:
      yield (*prefix, key), value


def _kernel_scope(params: Mapping[str, Any], path: str, what: str) -> dict:
  """The ``params`` sub-dict of the layer at ``path`` (``'/'``-joined), which
  must hold a ``kernel``; ``ValueError`` naming ``what`` otherwise."""
  node = params
  for key in path.split("/") if path else []:
    if not isinstance(node, Mapping) or key not in node:
      node = None
      break
    node = node[key]
  if not isinstance(node, Mapping) or "kernel" not in node:
    raise ValueError(f"{what}: adapters at {path!r} have no kernel in params")
  return node


def adapter_paths(adapters: Mapping[str, Any]) -> list[str]:
  """Paths (``'/'``-joined) of the layers with ``lora_a``/``lora_b``/``magnitude`` in ``adapters``."""
  tree = adapters.get(ADAPTER_COLLECTION, adapters)
  return sorted({"/".join(p[:-1]) for p, _ in _walk(tree) if p[-1] == "magnitude"})


def cache_base_norms(variables: Mapping[str, Any]) -> dict:
  """``variables`` plus each adapted layer's frozen-kernel column norms
  ``‖W_j‖² [features]`` under ``dora_cache/<layer path>/base_sq_norm``.

  Applying the model with these variables skips re-reading every adapted
  kernel for ‖W‖² on each call (the kernels are frozen while the adapters
  train). Recompute them with this function whenever ``params`` change.

  Args:
    variables: a variables dict with the ``params`` and ``dora`` collections.

  Returns:
    A new variables dict (the input is not modified).

  Raises:
    ValueError: no adapters, or an adapter without a matching kernel.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dora_jax.linen import DoRADense, cache_base_norms
    >>> layer = DoRADense(features=8, rank=4, alpha=8)
    >>> variables = cache_base_norms(layer.init(jax.random.key(0), jnp.ones((2, 16))))
    >>> variables["dora_cache"]["base_sq_norm"].shape
    (8,)
  """
  if "params" not in variables or ADAPTER_COLLECTION not in variables:
    raise ValueError(f"cache_base_norms: variables need 'params' and '{ADAPTER_COLLECTION}' "
                     f"collections, got {sorted(variables)}")
  out = {k: unfreeze(v) if isinstance(v, FrozenDict) else jax.tree.map(lambda x: x, v)
         for k, v in variables.items()}
  paths = adapter_paths(out[ADAPTER_COLLECTION])
  if not paths:
    raise ValueError("cache_base_norms: no DoRA adapters (lora_a/lora_b/magnitude) found")
  cache = out.setdefault(CACHE_COLLECTION, {})
  for path in paths:
    kernel = _kernel_scope(out["params"], path, "cache_base_norms")["kernel"]
    node = cache
    for key in path.split("/") if path else []:
      node = node.setdefault(key, {})
    node["base_sq_norm"] = _adapter.column_sq_norm_jit(kernel)
  return out


def merge_params(params: Mapping[str, Any], adapters: Mapping[str, Any], *, alpha: float,
                 rslora: bool = False) -> dict:
  """Merged ``params`` for the plain (``nn.Dense``) model: ``kernel ← g ⊙ (W + s·a·b)``.

  Args:
    params: the ``params`` collection, or a variables dict containing it.
    adapters: the ``dora`` collection, or a variables dict containing it.
    alpha, rslora: as used in training (the rank is read from ``lora_a``).

  Returns:
    A new ``params`` dict (``{"params": ...}`` if a variables dict was given);
    the inputs are not modified.

  Raises:
    ValueError: no adapters found, or an adapter without a matching kernel.
  """
  wrapped = "params" in params
  tree = unfreeze(params["params"] if wrapped else params)
  tree = jax.tree.map(lambda v: v, tree)  # a fresh nested dict
  ad = adapters.get(ADAPTER_COLLECTION, adapters)
  ad = unfreeze(ad) if isinstance(ad, FrozenDict) else ad
  paths = adapter_paths(ad)
  if not paths:
    raise ValueError("merge_params: no DoRA adapters (lora_a/lora_b/magnitude) found")
  for path in paths:
    node_a = ad
    for k in path.split("/") if path else []:
      node_a = node_a[k]
    node_p = _kernel_scope(tree, path, "merge_params")
    a, b, m = node_a["lora_a"], node_a["lora_b"], node_a["magnitude"]
    scale = lora_scale(alpha, int(a.shape[-1]), rslora=rslora)
    node_p["kernel"] = merge_kernel(node_p["kernel"], a, b, m, scale)
  return {"params": tree} if wrapped else tree

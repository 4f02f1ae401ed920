"""intercept_dora beyond nn.Dense: nn.DenseGeneral, nn.Einsum in gemma's layouts, custom
modules calling jnp.einsum / lax.dot_general on their own params, and nn.jit models.

Each case checks, in float32: every projection adapted; the output at init equal to
the base bit for bit (eager and jitted); the adapted output against a float64
reference built from the weight viewed as ``[*B, d_in, d_out]`` (numpy
transposes/reshapes, the merged weight ``g ⊙ (W + s·a·b)`` contracted with the
layer's own equation); 5 Adam steps on the ``dora`` collection lowering the loss with
the base params bitwise unchanged; ``merge_params`` against the unmerged output.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from helpers.adapter_helpers import np_rng
from dora_jax.linen import cache_base_norms, intercept_dora, merge_params
from helpers.layout_reference import merged_weight64, perturb
from helpers.reference import f64, rel_err

RANK, ALPHA = 2, 3.0
SCALE = ALPHA / RANK
TOL = 1e-5


# -- modules ------------------------------------------------------------------------


class TorchLayoutProj(nn.Module):
  """A custom layer: ``w [d_out, d_in]`` (PyTorch's layout) through ``lax.dot_general``,
  then a second param ``v [d_in2, d_out]`` of the same module through ``jnp.einsum``."""

  d_out: int = 6

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.4), (self.d_out, x.shape[-1]))
    v = self.param("v", nn.initializers.normal(0.4), (self.d_out, 5))
    h = lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))
    return jnp.einsum("...o,oe->...e", jax.nn.tanh(h), v)


class CastEinsum(nn.Module):
  """A bfloat16 param cast to float32 before its einsum (a dtype cast of the param)."""

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(0.4), (3, x.shape[-1], 4), jnp.bfloat16)
    return jnp.einsum("btd,ndh->btnh", x, w.astype(jnp.float32))


class Wrap(nn.Module):
  """Puts ``inner`` under a path, next to a plain nn.Dense that is not targeted."""

  inner: nn.Module

  @nn.compact
  def __call__(self, x):
    y = self.inner(x)
    return y + 0.0 * nn.Dense(1, name="untargeted")(x).sum()


def _cases():
  # (id, module, x shape, {adapted path: (contracted, batch, output)}, op for the reference)
  return [
      ("dense_general_2axis", nn.DenseGeneral((4, 6), axis=(-2, -1)), (2, 3, 5, 7),
       {"kernel": ((0, 1), (), (2, 3))}, ("dg", (((2, 3), (0, 1)), ((), ())))),
      ("einsum_BTD_NDH", nn.Einsum((4, 8, 6), "BTD,NDH->BTNH"), (2, 3, 8),
       {"kernel": ((1,), (), (0, 2))}, ("es", "BTD,NDH->BTNH")),
      ("einsum_BSD_CKDH", nn.Einsum((2, 3, 8, 5), "BSD,CKDH->CBSKH"), (2, 3, 8),
       {"kernel": ((2,), (), (0, 1, 3))}, ("es", "BSD,CKDH->CBSKH")),
      ("einsum_F_NHF", nn.Einsum((2, 6, 8), "...F,NHF->...NH"), (2, 3, 8),
       {"kernel": ((2,), (), (0, 1))}, ("es", "...F,NHF->...NH")),
      ("einsum_batched_hij", nn.Einsum((3, 5, 4), "...hi,hij->...hj"), (2, 4, 3, 5),
       {"kernel": ((1,), (0,), (2,))}, ("es", "...hi,hij->...hj")),
      ("einsum_BTNH_NHD", nn.Einsum((4, 6, 8), "BTNH,NHD->BTD"), (2, 3, 4, 6),
       {"kernel": ((0, 1), (), (2,))}, ("es", "BTNH,NHD->BTD")),
  ]


def _rand_like(rng, tree, scale=0.3):
  return jax.tree.map(lambda v: jnp.asarray(scale * rng.standard_normal(v.shape), v.dtype), tree)


def _op64(op, x, w):
  kind, arg = op
  if kind == "es":
    return np.einsum(arg, f64(x), w)
  with jax.enable_x64(True):
    return np.asarray(lax.dot_general(jnp.asarray(f64(x)), jnp.asarray(w), arg,
                                      precision=lax.Precision.HIGHEST))


def _train(model, variables, adapters, x, target, steps=5):
  """Adam on the ``dora`` collection only; returns the losses and the final adapters."""
  tx = optax.adam(1e-2)

  def loss(ad):
    return jnp.mean((model.apply({**variables, "dora": ad}, x) - target) ** 2)

  @jax.jit
  def step(ad, state):
    value, grads = jax.value_and_grad(loss)(ad)
    updates, state = tx.update(grads, state, ad)
    return optax.apply_updates(ad, updates), state, value

  state = tx.init(adapters)
  losses = []
  for _ in range(steps):
    adapters, state, value = step(adapters, state)
    losses.append(float(value))
  return losses, adapters


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c[0])
def test_linen_layouts(case, fresh_key):
  _, module, x_shape, expected, op = case
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
  variables = module.init(fresh_key(), x)
  variables = {"params": _rand_like(rng, variables["params"])}   # a non-zero bias too
  params_before = jax.tree.map(np.array, variables["params"])
  y_base = module.apply(variables, x)
  y_base_jit = jax.jit(module.apply)(variables, x)
  with intercept_dora(".*", rank=RANK, alpha=ALPHA) as dora:
    y0, adapters = module.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    assert dora.adapted == sorted(expected)
    for path, roles in expected.items():
      layout = dora.layouts[path]
      assert (layout.contracted, layout.batch, layout.output) == roles
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y_base))
    y0_jit = jax.jit(module.apply)({**variables, **adapters}, x)
    np.testing.assert_array_equal(np.asarray(y0_jit), np.asarray(y_base_jit))

    tuned = {"dora": perturb(rng, adapters["dora"])}
    y = module.apply({**variables, **tuned}, x)
    target = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    losses, _ = _train(module, variables, adapters["dora"], x, target)
  # the float64 reference: the merged weight through the layer's own contraction, + bias
  (path, roles), = expected.items()
  group = tuned["dora"][path]
  w_eff = merged_weight64(variables["params"]["kernel"], group["lora_a"], group["lora_b"],
                          group["magnitude"], SCALE, roles)
  ref = _op64(op, x, w_eff)
  if "bias" in variables["params"]:
    ref = ref + (f64(y_base) - _op64(op, x, f64(variables["params"]["kernel"])))
  assert rel_err(y, y_base) > 1e-2
  assert rel_err(y, ref) < TOL
  assert losses[-1] < losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, params_before, jax.tree.map(np.asarray,
                                                                          variables["params"]))
  for layouts in (dora.layouts, None):   # these shapes determine the layout
    merged = merge_params(variables, tuned, alpha=ALPHA, layouts=layouts)
    assert rel_err(module.apply(merged, x), y) < TOL


def test_custom_module_two_params_dot_general_and_einsum(fresh_key):
  """A custom layer's two params, one through lax.dot_general in PyTorch's layout."""
  model = Wrap(TorchLayoutProj())
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 4)), jnp.float32)
  variables = {"params": _rand_like(rng, model.init(fresh_key(), x)["params"])}
  y_base = jax.jit(model.apply)(variables, x)
  with intercept_dora(r"inner", rank=RANK, alpha=ALPHA) as dora:
    y0, adapters = jax.jit(lambda v, k: model.apply(v, x, rngs={"params": k}, mutable=["dora"]))(
        variables, fresh_key())
    assert dora.adapted == ["inner/v", "inner/w"]
    assert set(adapters["dora"]) == {"inner"} and set(adapters["dora"]["inner"]) == {"v", "w"}
    lw, lv = dora.layouts["inner/w"], dora.layouts["inner/v"]
    assert (lw.contracted, lw.output, lv.contracted, lv.output) == ((1,), (0,), (0,), (1,))
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y_base))
    tuned = {"dora": perturb(rng, adapters["dora"])}
    y = model.apply({**variables, **tuned}, x)
    target = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    losses, _ = _train(model, variables, adapters["dora"], x, target)
  p, g = variables["params"]["inner"], tuned["dora"]["inner"]
  w_eff = merged_weight64(p["w"], *(g["w"][k] for k in ("lora_a", "lora_b", "magnitude")),
                          SCALE, ((1,), (), (0,)))
  v_eff = merged_weight64(p["v"], *(g["v"][k] for k in ("lora_a", "lora_b", "magnitude")),
                          SCALE, ((0,), (), (1,)))
  ref = np.einsum("...o,oe->...e", np.tanh(np.einsum("...i,oi->...o", f64(x), w_eff)), v_eff)
  assert rel_err(y, ref) < TOL
  assert losses[-1] < losses[0], losses
  merged = merge_params(variables, tuned, alpha=ALPHA, layouts=dora.layouts)
  assert rel_err(model.apply(merged, x), y) < TOL
  np.testing.assert_array_equal(merged["params"]["untargeted"]["kernel"],
                                variables["params"]["untargeted"]["kernel"])


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_param_cast_before_its_einsum_is_adapted(jit, fresh_key):
  """``jnp.einsum(spec, x, w.astype(f32))`` counts as the param ``w``: eagerly by value,
  under a trace through the cast (read from JAX's tracer; this fails if that moves)."""
  model = CastEinsum()
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  variables = model.init(fresh_key(), x)
  run = jax.jit(model.apply) if jit else model.apply
  y_base = run(variables, x)
  with intercept_dora(".*", rank=RANK, alpha=ALPHA) as dora:
    init = (jax.jit(lambda v, k: model.apply(v, x, rngs={"params": k}, mutable=["dora"]))
            if jit else (lambda v, k: model.apply(v, x, rngs={"params": k}, mutable=["dora"])))
    y0, adapters = init(variables, fresh_key())
    assert dora.adapted == ["w"]
    np.testing.assert_array_equal(np.asarray(y0), np.asarray(y_base))
    assert run({**variables, **adapters}, x).dtype == jnp.float32


class JitModel(nn.Module):
  """A third-party-style model whose ``__call__`` is ``nn.jit``-decorated (as gemma's)."""

  @nn.jit
  @nn.compact
  def __call__(self, x):
    h = nn.Einsum((3, 8, 4), "btd,ndh->btnh", name="q")(x)
    return nn.Dense(5, name="out")(h.reshape(*h.shape[:2], -1))


def test_nn_jit_cache_never_serves_another_interception(fresh_key):
  """nn.jit caches on the module and the variables' structure: without the interception
  in the jit key, a trace made outside would be served inside (and the reverse)."""
  model = JitModel()
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  variables = {"params": _rand_like(rng, model.init(fresh_key(), x)["params"])}
  with intercept_dora("q|out", rank=RANK, alpha=ALPHA) as dora:
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
  assert dora.adapted == ["out", "q/kernel"]
  tuned = {**variables, "dora": perturb(rng, adapters["dora"])}
  y_outside = model.apply(tuned, x)            # traced outside: the adapters are ignored
  np.testing.assert_array_equal(np.asarray(y_outside), np.asarray(model.apply(variables, x)))
  with intercept_dora("q|out", rank=RANK, alpha=ALPHA):
    y_inside = model.apply(tuned, x)           # an equal module, same variables structure
  assert rel_err(y_inside, y_outside) > 1e-2
  other = JitModel()                           # traced inside first, then used outside
  with intercept_dora("q|out", rank=RANK, alpha=ALPHA):
    y2 = other.apply(tuned, x[:1])
  y2_outside = other.apply(tuned, x[:1])
  assert rel_err(y2, y2_outside) > 1e-2
  np.testing.assert_array_equal(np.asarray(y_inside[:1]), np.asarray(y2))
  # a user's own jax.jit traced outside is retraced inside as well
  step = jax.jit(model.apply)
  np.testing.assert_array_equal(np.asarray(step(tuned, x)), np.asarray(y_outside))
  with intercept_dora("q|out", rank=RANK, alpha=ALPHA):
    np.testing.assert_array_equal(np.asarray(step(tuned, x)), np.asarray(y_inside))


def test_targets_matching_nothing_raise_and_list_what_could_be_adapted(fresh_key):
  model = Wrap(nn.Einsum((3, 8, 4), "btd,ndh->btnh"))
  x = jnp.ones((2, 3, 8))
  variables = model.init(fresh_key(), x)
  with intercept_dora(r"nope", rank=RANK, alpha=ALPHA):
    with pytest.raises(ValueError, match=r"adapted nothing") as err:
      model.init(fresh_key(), x)
    assert "inner/kernel: jnp.einsum('btd,ndh->btnh') in Einsum" in str(err.value)
    assert "untargeted/kernel" in str(err.value)
    with pytest.raises(ValueError, match=r"adapted nothing"):
      model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    model.apply(variables, x)   # no adapters asked for or given: the plain model runs
  with intercept_dora(r"inner", rank=RANK, alpha=ALPHA):
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
  with intercept_dora(r"nope", rank=RANK, alpha=ALPHA):   # adapters given, none used
    with pytest.raises(ValueError, match=r"collection is given"):
      model.apply({**variables, **adapters}, x)

  class MatmulOnly(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("w", nn.initializers.normal(), (8, 2))

  with intercept_dora(".*", rank=1, alpha=1.0):
    with pytest.raises(ValueError, match=r"Matched modules with no adaptable weight: <root> "
                       r"\(MatmulOnly\)"):
      MatmulOnly().init(fresh_key(), x)


def test_unsupported_uses_of_a_matched_weight_are_refused(fresh_key):
  class LhsWeight(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(), (4, 8))
      return jnp.einsum("od,btd->bto", w, x)

  x = jnp.ones((2, 3, 8))
  with intercept_dora(".*", rank=1, alpha=1.0):
    with pytest.raises(NotImplementedError, match=r"'w' enters jnp.einsum\('od,btd->bto'\) as "
                       "the first operand"):
      LhsWeight().init(fresh_key(), x)
  with pytest.raises(RuntimeError, match="cannot be nested"):
    with intercept_dora(".*", rank=1, alpha=1.0), intercept_dora(".*", rank=1, alpha=1.0):
      pass
  with pytest.raises(TypeError, match="rank must be an int"):
    with intercept_dora(".*", rank=1.5, alpha=1.0):
      pass
  with pytest.raises(ValueError, match=r"min\(d_in, d_out\) = 4"):
    with intercept_dora(".*", rank=5, alpha=1.0):
      nn.Einsum((8, 4), "btd,dh->bth").init(fresh_key(), x)


def test_square_weight_needs_its_layout_to_merge(fresh_key):
  """``x·Wᵀ`` on a square ``W``: shapes alone cannot tell the layout, merge_params asks."""
  class Transposed(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(0.4), (8, 8))
      return jnp.einsum("btd,od->bto", x, w)

  model = Transposed()
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  variables = model.init(fresh_key(), x)
  with intercept_dora(".*", rank=RANK, alpha=ALPHA) as dora:
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    tuned = {"dora": perturb(rng, adapters["dora"])}
    y = model.apply({**variables, **tuned}, x)
  with pytest.raises(ValueError, match=r"fit 2 layouts .*layouts=dora.layouts"):
    merge_params(variables, tuned, alpha=ALPHA)
  merged = merge_params(variables, tuned, alpha=ALPHA, layouts=dora.layouts)
  assert rel_err(model.apply(merged, x), y) < TOL


def test_cache_base_norms_op_level_same_step_fewer_kernel_reads(fresh_key):
  """Cached ‖W‖² for op-level weights: the same loss and adapter gradients, bit for bit,
  and one op fewer reading each kernel in the traced step."""
  model = Wrap(nn.Einsum((3, 8, 4), "btd,ndh->btnh"))
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  variables = {"params": _rand_like(rng, model.init(fresh_key(), x)["params"])}
  with intercept_dora("inner", rank=RANK, alpha=ALPHA) as dora:
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    tuned = perturb(rng, adapters["dora"])
    cached = cache_base_norms({**variables, "dora": tuned}, layouts=dora.layouts)
    np.testing.assert_allclose(cached["dora_cache"]["inner"]["kernel"]["base_sq_norm"],
                               np.sum(f64(variables["params"]["inner"]["kernel"]) ** 2, axis=1),
                               rtol=1e-6)

    def loss(ad, rest):
      return jnp.sum(model.apply({**rest, "dora": ad}, x) ** 2)

    def kernel_reads(rest):
      jaxpr = jax.make_jaxpr(loss)(tuned, rest).jaxpr
      leaves = jax.tree.leaves(rest)
      at = [i for i, v in enumerate(leaves) if v is rest["params"]["inner"]["kernel"]]
      return _uses(jaxpr, jaxpr.invars[len(jax.tree.leaves(tuned)) + at[0]])

    plain = {"params": variables["params"]}
    with_cache = {"params": variables["params"], "dora_cache": cached["dora_cache"]}
    assert kernel_reads(with_cache) < kernel_reads(plain)
    step = jax.jit(jax.value_and_grad(loss))
    (l0, g0), (l1, g1) = step(tuned, plain), step(tuned, with_cache)
  assert float(l0) == float(l1)
  jax.tree.map(np.testing.assert_array_equal, g0, g1)


def _uses(jaxpr, var) -> int:
  """Equations reading ``var``, following it into sub-jaxprs (pjit, custom_vjp)."""
  count = 0
  for eqn in jaxpr.eqns:
    if any(v is var for v in eqn.invars):
      subs = [p for p in eqn.params.values() if hasattr(p, "jaxpr") or hasattr(p, "eqns")]
      if subs:
        sub = subs[0].jaxpr if hasattr(subs[0], "jaxpr") else subs[0]
        inner = [sub.invars[i] for i, v in enumerate(eqn.invars) if v is var
                 and i < len(sub.invars)]
        count += sum(_uses(sub, v) for v in inner) or 1
      else:
        count += 1
  return count


def test_dropout_and_cached_norm_op_level(fresh_key):
  """PEFT dropout on the adapter path (eval = reference, train differs) and cache_norm."""
  model = nn.Einsum((3, 8, 4), "btd,ndh->btnh")
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  variables = {"params": _rand_like(rng, model.init(fresh_key(), x)["params"])}
  with intercept_dora(".*", rank=RANK, alpha=ALPHA) as dora:
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    tuned = {"dora": perturb(rng, adapters["dora"])}
    y_ref = model.apply({**variables, **tuned}, x)
  for deterministic in (True, False):
    with intercept_dora(".*", rank=RANK, alpha=ALPHA, dropout=0.5,
                        deterministic=deterministic):
      y = model.apply({**variables, **tuned}, x, rngs={"dropout": fresh_key()})
    assert (rel_err(y, y_ref) < 1e-6) == deterministic
  with intercept_dora(".*", rank=RANK, alpha=ALPHA, cache_norm=True):
    y1, cache = model.apply({**variables, **tuned}, x, mutable=["dora_cache"])
    assert set(cache["dora_cache"]["kernel"]) == {"norm", "stamp"}
    y2 = model.apply({**variables, **tuned, **cache}, x)
    moved = {"dora": jax.tree.map(lambda v: v + 0.1, tuned["dora"])}
    y3 = model.apply({**variables, **moved, **cache}, x)     # stale stamp: recomputed
  assert rel_err(y1, y_ref) < 1e-6 and rel_err(y2, y_ref) < 1e-6
  with intercept_dora(".*", rank=RANK, alpha=ALPHA):
    assert rel_err(y3, model.apply({**variables, **moved}, x)) < 1e-6
  assert dora.layouts["kernel"].output == (0, 2)


def test_training_step_has_no_kernel_sized_product(fresh_key):
  """The intercepted native-layout einsum's training step (gradients of the ``dora``
  collection) forms nothing kernel-sized: no ``W + s·a·b`` and no kernel cotangent."""
  from helpers.jaxprs import dot_output_shapes

  model = nn.Einsum((4, 16, 8), "BTD,NDH->BTNH", use_bias=False)
  x = jnp.ones((1, 3, 16))
  variables = model.init(fresh_key(), x)
  with intercept_dora(".*", rank=RANK, alpha=ALPHA):
    _, adapters = model.apply(variables, x, rngs={"params": fresh_key()}, mutable=["dora"])
    closed = jax.make_jaxpr(jax.grad(lambda ad: jnp.sum(model.apply({**variables, "dora": ad},
                                                                    x) ** 2)))(adapters["dora"])
  shapes = dot_output_shapes(closed)
  assert shapes and all(math.prod(s) < 4 * 16 * 8 for s in shapes), shapes


class _ScanLayer(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    y = nn.Einsum((4, 8, 2), "btd,ndh->btnh", use_bias=False, name="e")(x)
    return x + y.reshape(x.shape), None


def test_layers_under_nn_scan(fresh_key):
  """Layers stacked by nn.scan (``dora`` scanned with ``params``): adapters per layer,
  exact init, merge and cache_base_norms on the stacked weight (stacking axis = batch)."""
  model = nn.scan(_ScanLayer, variable_axes={"params": 0, "dora": 0},
                  split_rngs={"params": True}, length=3)(name="layers")
  rng = np_rng(fresh_key())
  x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
  run = lambda v: model.apply(v, x, None)[0]
  variables = {"params": _rand_like(rng, model.init(fresh_key(), x, None)["params"])}
  y_base = jax.jit(run)(variables)
  with intercept_dora(r"e", rank=RANK, alpha=ALPHA) as dora:
    _, adapters = model.apply(variables, x, None, rngs={"params": fresh_key()}, mutable=["dora"])
    assert dora.adapted == ["e/kernel"]
    assert jnp.shape(adapters["dora"]["e"]["kernel"]["lora_b"]) == (3, RANK, 4, 2)
    np.testing.assert_array_equal(np.asarray(jax.jit(run)({**variables, **adapters})),
                                  np.asarray(y_base))
    tuned = {"dora": perturb(rng, adapters["dora"])}
    y = run({**variables, **tuned})
    cached = cache_base_norms({**variables, **tuned}, layouts=dora.layouts)
    np.testing.assert_array_equal(np.asarray(run(cached)), np.asarray(y))
  assert rel_err(y, y_base) > 1e-2
  merged = merge_params(variables, tuned, alpha=ALPHA, layouts=dora.layouts)
  assert rel_err(run(merged), y) < TOL


def test_a_weight_changed_before_its_einsum_is_refused(fresh_key):
  """``jnp.einsum(spec, x, 2 * w)`` in a targeted module: not the param, so no silent skip."""
  class Scaled(nn.Module):
    @nn.compact
    def __call__(self, x):
      w = self.param("w", nn.initializers.normal(), (3, 8, 4))
      return jnp.einsum("btd,ndh->btnh", x, 2.0 * w)

  x = jnp.ones((2, 3, 8))
  with intercept_dora(".*", rank=1, alpha=1.0):
    with pytest.raises(NotImplementedError, match=r"'w': the second operand of "
                       r"jnp.einsum\('btd,ndh->btnh'\) has its shape \(3, 8, 4\)"):
      Scaled().init(fresh_key(), x)

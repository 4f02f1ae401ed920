"""DoRA on gemma's Gemma3 (Linen, ``gm.nn.Einsum`` projections) through ``intercept_dora``.

A tiny random-init Gemma3 (2 layers: one sliding-window, one global; float32
params). Checks: all 10 projections adapted (``q_einsum``, ``kv_einsum``,
``attn_vec_einsum``, ``gating_einsum``, ``linear`` per layer); the logits at init
equal to the base bit for bit; each adapted layer's output against a float64
DoRA reference built from its weight viewed as ``[d_in, d_out]``; 5 Adam steps
on the ``dora`` collection lower the loss with the base params bitwise unchanged;
merged params in the plain model equal the adapted model; and the
``nn.jit``-decorated ``Transformer.__call__`` never serves a trace across the
interception boundary.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("gemma")  # tests/zoo/conftest.py: DORA_JAX_ZOO_REQUIRED=1 makes this fail

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from gemma import gm  # noqa: E402

from dora_jax.linen import intercept_dora, merge_params  # noqa: E402
from helpers.layout_reference import merged_weight64, perturb  # noqa: E402
from helpers.reference import f64, rel_err  # noqa: E402

RANK, ALPHA = 4, 8.0
SCALE = ALPHA / RANK
TARGETS = r"layer_\d+/(attn/(q|kv|attn_vec)_einsum|mlp)"
#: weight -> (contracted, batch, output) kernel axes, from gemma's equations
ROLES = {
    "attn/q_einsum/w": ((1,), (), (0, 2)),          # BTD,NDH->BTNH
    "attn/kv_einsum/w": ((2,), (), (0, 1, 3)),      # BSD,CKDH->CBSKH
    "attn/attn_vec_einsum/w": ((0, 1), (), (2,)),   # BTNH,NHD->BTD
    "mlp/gating_einsum": ((2,), (), (0, 1)),        # ...F,NHF->...NH
    "mlp/linear": ((0,), (), (1,)),                 # ...H,HF->...F
}
EXPECTED = sorted(f"layer_{i}/{w}" for i in range(2) for w in ROLES)


@pytest.fixture(scope="module")
def gemma3():
  cfg = dataclasses.replace(
      gm.nn.Gemma3_270M.config, num_embed=256, embed_dim=64, hidden_dim=128, num_heads=4,
      head_dim=16, num_kv_heads=1,
      attention_types=gm.nn.config.make_attention_layers_types(
          (gm.nn.AttentionType.LOCAL_SLIDING, gm.nn.AttentionType.GLOBAL), num_layers=2),
      sliding_window_size=8)
  model = gm.nn.Transformer(config=cfg)
  rng = np.random.default_rng(20261201)
  tokens = jnp.asarray(rng.integers(0, 256, (2, 12)), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), tokens)["params"])
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(0.0, 0.3, s.shape), jnp.float32),
                        shapes)
  base = model.apply({"params": params}, tokens).logits
  with intercept_dora(TARGETS, rank=RANK, alpha=ALPHA) as dora:
    out, adapters = model.apply({"params": params}, tokens, rngs={"params": jax.random.key(1)},
                                mutable=["dora"])
  tuned = {"dora": perturb(rng, adapters["dora"])}
  return dict(model=model, params=params, tokens=tokens, base=base, init_logits=out.logits,
              adapters=adapters, tuned=tuned, dora=dora, rng=rng)


def _at(tree, path):
  for key in path.split("/"):
    tree = tree[key]
  return tree


def test_every_projection_adapted_and_init_is_exact(gemma3):
  dora = gemma3["dora"]
  assert dora.adapted == EXPECTED
  for key in EXPECTED:
    layout = dora.layouts[key]
    assert (layout.contracted, layout.batch, layout.output) == ROLES[key.split("/", 1)[1]]
  np.testing.assert_array_equal(np.asarray(gemma3["init_logits"]), np.asarray(gemma3["base"]))
  model, params, tokens = gemma3["model"], gemma3["params"], gemma3["tokens"]
  with intercept_dora(TARGETS, rank=RANK, alpha=ALPHA):
    again = model.apply({"params": params, **gemma3["adapters"]}, tokens).logits
  np.testing.assert_array_equal(np.asarray(again), np.asarray(gemma3["base"]))


def test_each_adapted_layer_matches_float64_reference(gemma3):
  model, params, tokens, tuned = (gemma3[k] for k in ("model", "params", "tokens", "tuned"))
  seen = {}

  def capture(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    if isinstance(context.module, gm.nn.Einsum):
      module = context.module
      seen["/".join((*module.path, module.weight_name))] = (args[0], np.asarray(args[1]),
                                                            np.asarray(y))
    return y

  with jax.disable_jit(), nn.intercept_methods(capture), intercept_dora(
      TARGETS, rank=RANK, alpha=ALPHA):
    logits = model.apply({"params": params, **tuned}, tokens).logits
  assert rel_err(logits, gemma3["base"]) > 1e-2
  assert sorted(seen) == EXPECTED
  for key, (eqn, x, y) in sorted(seen.items()):
    roles = ROLES[key.split("/", 1)[1]]
    group = _at(tuned["dora"], key)
    w_eff = merged_weight64(_at(params, key), group["lora_a"], group["lora_b"],
                            group["magnitude"], SCALE, roles)
    ref = np.einsum(eqn, f64(x), w_eff)
    assert rel_err(y, ref) < 1e-5, key


def test_adam_on_dora_lowers_loss_base_unchanged(gemma3):
  model, params, tokens = gemma3["model"], gemma3["params"], gemma3["tokens"]
  before = jax.tree.map(np.array, params)
  targets = jnp.roll(tokens, -1, axis=1)
  tx = optax.adam(1e-2)
  with intercept_dora(TARGETS, rank=RANK, alpha=ALPHA):

    def loss(ad):
      logits = model.apply({"params": params, "dora": ad}, tokens).logits
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @jax.jit
    def step(ad, state):
      value, grads = jax.value_and_grad(loss)(ad)
      updates, state = tx.update(grads, state, ad)
      return optax.apply_updates(ad, updates), state, value

    ad = gemma3["adapters"]["dora"]
    state = tx.init(ad)
    losses = []
    for _ in range(5):
      ad, state, value = step(ad, state)
      losses.append(float(value))
  assert losses[-1] < losses[0], losses
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, params))
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), gemma3["adapters"]["dora"], ad))
  assert all(moved)


def test_merged_params_equal_adapted_model(gemma3):
  model, params, tokens, tuned = (gemma3[k] for k in ("model", "params", "tokens", "tuned"))
  with intercept_dora(TARGETS, rank=RANK, alpha=ALPHA):
    adapted = model.apply({"params": params, **tuned}, tokens).logits
  for layouts in (gemma3["dora"].layouts, None):   # gemma's shapes determine the layouts
    merged = merge_params(params, tuned, alpha=ALPHA, layouts=layouts)
    plain = model.apply({"params": merged}, tokens).logits
    assert rel_err(plain, adapted) < 1e-5


def test_nn_jit_traces_never_cross_the_interception(gemma3):
  """``Transformer.__call__`` is ``nn.jit``: its cache keys on the module's fields and the
  variables' structure, so without the interception in the jit key a trace made outside
  (adapters ignored) would be served inside, silently."""
  model, params, tokens, tuned = (gemma3[k] for k in ("model", "params", "tokens", "tuned"))
  fresh = gm.nn.Transformer(config=model.config)     # an equal instance
  outside = fresh.apply({"params": params, **tuned}, tokens).logits
  np.testing.assert_array_equal(np.asarray(outside), np.asarray(gemma3["base"]))
  with intercept_dora(TARGETS, rank=RANK, alpha=ALPHA):
    inside = fresh.apply({"params": params, **tuned}, tokens).logits
  assert rel_err(inside, outside) > 1e-2
  again = fresh.apply({"params": params, **tuned}, tokens).logits
  np.testing.assert_array_equal(np.asarray(again), np.asarray(outside))

"""DoRA for embeddings and convolutions: float64 references, PEFT cross-check, surgery, errors.

The float64 references are independent of the layers' code paths: they build
the adapted weight densely (``E + s·a·b``, ``W + s·ΔW``), take its norm
directly, and run Flax's own ``nnx.Embed``/``nnx.Conv`` (padding logic
included) on the merged float64 weight, with the norm detached. The PyTorch
side (``peft_embed_conv_side.py``) runs under the interpreter of
``DORA_JAX_PEFT_PYTHON`` or ``.venv-peft`` (``scripts/peft_env.sh``).
"""

from __future__ import annotations

import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax.conv import DoRAConv, conv_norm, dora_conv
from dora_jax.embed import DoRAEmbed, dora_attend, dora_embed
from helpers.adapter_helpers import build
from helpers.reference import f64, rel_err

from helpers.torch_env import ENV_VAR, PEFT_PYTHON, ROOT
TOL = 1e-5



def _rng(key) -> np.random.Generator:
  """A host RNG seeded from a (fresh) JAX key: no device work per random draw."""
  return np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())


def _randomize(layer, key, *, b_scale=0.3, m_jitter=0.2):
  """Non-zero ``lora_a``/``lora_b`` and a magnitude away from the norm (fresh keys)."""
  rng = _rng(key)
  layer.lora_a[...] = jnp.asarray(
      rng.uniform(-1, 1, layer.lora_a.shape) / math.sqrt(layer.d_in), jnp.float32)
  layer.lora_b[...] = jnp.asarray(b_scale * rng.standard_normal(layer.lora_b.shape), jnp.float32)
  m = np.asarray(layer.magnitude[...]) * (1.0 + m_jitter * rng.standard_normal(layer.magnitude.shape))
  layer.magnitude[...] = jnp.asarray(m, jnp.float32)


def _normal(key, shape) -> jax.Array:
  return jnp.asarray(_rng(key).standard_normal(shape), jnp.float32)


def _params(layer):
  return {k: np.asarray(getattr(layer, k)[...]) for k in ("lora_a", "lora_b", "magnitude")}


def _nnx_grads(layer, fn, cot):
  """``y`` and the gradients of ``Σ fn(layer) ⊙ cot`` w.r.t. the adapters (``wrt=LoRAParam``)."""
  @nnx.jit
  def run(model):
    def loss(model):
      y = fn(model)
      return jnp.sum(y * cot), y
    grads, y = nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
    return y, {k: grads[k][...] for k in ("lora_a", "lora_b", "magnitude")}
  y, grads = run(layer)
  return np.asarray(y), {k: np.asarray(v) for k, v in grads.items()}


@nnx.jit
def _conv_grads(model, x, cot):
  def loss(model, x):
    y = model(x)
    return jnp.sum(y * cot), y
  (grads, dx), y = nnx.grad(loss, argnums=(nnx.DiffState(0, nnx.LoRAParam), 1),
                            has_aux=True)(model, x)
  return y, {k: grads[k][...] for k in ("lora_a", "lora_b", "magnitude")}, dx


def _nnx_grads_x(layer, x, cot):
  """Conv: ``y``, adapter gradients and ``dx`` of ``Σ layer(x) ⊙ cot`` (one compiled call)."""
  y, grads, dx = _conv_grads(layer, x, cot)
  return np.asarray(y), {k: np.asarray(v) for k, v in grads.items()}, np.asarray(dx)


@nnx.jit
def _apply(model, *args):
  """``model(*args)`` compiled (plain Flax layers run op by op otherwise: slow on a CPU)."""
  return model(*args)


# -- float64 references --------------------------------------------------------


def _adapted_2d(w2d, a, b, m, s):
  """``g ⊙ (W + s·a·b)`` with the norm detached (float64, inside enable_x64)."""
  dense = w2d + s * a @ b
  norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=0)))
  return dense * (m / norm)


def ref_embed(table, p, s, ids, cot, query=None, cot_q=None):
  """Float64 lookup (and attend) outputs and adapter gradients via plain nnx.Embed."""
  with jax.enable_x64(True):
    n, f = table.shape
    embed64 = nnx.eval_shape(lambda: nnx.Embed(n, f, param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    gdef, _ = nnx.split(embed64)
    t = jnp.asarray(f64(table))

    def run(q, which):
      e = _adapted_2d(t, q["lora_a"], q["lora_b"], q["magnitude"], s)
      mod = nnx.merge(gdef, nnx.State({"embedding": nnx.Param(e)}))
      return mod(jnp.asarray(ids)) if which == "call" else mod.attend(jnp.asarray(f64(query)))

    q = {k: jnp.asarray(f64(v)) for k, v in p.items()}
    out = {}
    for which, c in (("call", cot), ("attend", cot_q)):
      if c is None:
        continue
      c = jnp.asarray(f64(c))
      fn = jax.jit(jax.value_and_grad(
          lambda q, c, which=which: jnp.sum(run(q, which) * c), has_aux=False))
      y = jax.jit(lambda q, which=which: run(q, which))(q)
      _, g = fn(q, c)
      out[which] = (np.asarray(y), {k: np.asarray(v) for k, v in g.items()})
    return out


def ref_conv(base: nnx.Conv, p, s, x, cot):
  """Float64 output and gradients (adapters and x) via plain nnx.Conv on the merged kernel."""
  with jax.enable_x64(True):
    conv64 = nnx.eval_shape(lambda: nnx.Conv(
        base.in_features, base.out_features, base.kernel_size, base.strides,
        padding=base.padding, input_dilation=base.input_dilation,
        kernel_dilation=base.kernel_dilation, use_bias=base.bias is not None,
        param_dtype=jnp.float64, rngs=nnx.Rngs(0)))
    gdef, _ = nnx.split(conv64)
    w = jnp.asarray(f64(base.kernel[...]))
    d_in = math.prod(w.shape[:-1])
    bias = None if base.bias is None else jnp.asarray(f64(base.bias[...]))

    def run(q):
      r = q["lora_b"].shape[0]
      k = _adapted_2d(w.reshape(d_in, -1), q["lora_a"].reshape(d_in, r), q["lora_b"],
                      q["magnitude"], s).reshape(w.shape)
      state = {"kernel": nnx.Param(k)}
      if bias is not None:
        state["bias"] = nnx.Param(bias)
      return nnx.merge(gdef, nnx.State(state))(q["x"])

    q = {k: jnp.asarray(f64(v)) for k, v in {**p, "x": x}.items()}

    @jax.jit
    def both(q, c):
      (_, y), g = jax.value_and_grad(lambda q: (jnp.sum(run(q) * c), run(q)), has_aux=True)(q)
      return y, g

    y, g = both(q, jnp.asarray(f64(cot)))
    return np.asarray(y), {k: np.asarray(v) for k, v in g.items()}


# -- embeddings ----------------------------------------------------------------


def _embed_layer(key, n=13, f=7, rank=3, alpha=5.0, rslora=False):
  base = build(lambda: nnx.Embed(n, f, rngs=nnx.Rngs(0)), key, std=1.0)
  layer = DoRAEmbed(base, rank=rank, alpha=alpha, rslora=rslora, rngs=nnx.Rngs(1))
  return base, layer


def test_embed_starts_as_base_and_matches_float64(fresh_key):
  base, layer = _embed_layer(fresh_key())
  ids = jnp.asarray(_rng(fresh_key()).integers(-13, 13, (3, 5)))
  q = _normal(fresh_key(), (4, 7))
  np.testing.assert_array_equal(layer(ids), base(ids))  # PEFT init: lora_a = 0
  np.testing.assert_allclose(layer.attend(q), base.attend(q), rtol=1e-6, atol=1e-6)
  _randomize(layer, fresh_key())
  cot = _normal(fresh_key(), (3, 5, 7))
  cot_q = _normal(fresh_key(), (4, 13))
  ref = ref_embed(base.embedding[...], _params(layer), layer.scale, ids, cot, q, cot_q)
  for which, fn, c in (("call", lambda m: m(ids), cot), ("attend", lambda m: m.attend(q), cot_q)):
    y, grads = _nnx_grads(layer, fn, c)
    y_ref, g_ref = ref[which]
    assert rel_err(y, y_ref) < TOL, which
    assert rel_err(y, fn(base)) > 1e-2, which  # the adapter matters
    for k in grads:
      assert rel_err(grads[k], g_ref[k]) < TOL, (which, k)


def test_embed_functional_norm_is_factored_and_per_feature(fresh_key):
  _, layer = _embed_layer(fresh_key(), n=40, f=6, rank=4)
  _randomize(layer, fresh_key())
  e, p = np.asarray(layer.embedding[...], np.float64), _params(layer)
  dense = e + layer.scale * f64(p["lora_a"]) @ f64(p["lora_b"])
  np.testing.assert_allclose(layer.weight_norm(), np.linalg.norm(dense, axis=0), rtol=2e-6)
  ids = jnp.arange(40)
  y = dora_embed(ids, layer.embedding[...], *(jnp.asarray(p[k]) for k in p), layer.scale)
  assert y.shape == (40, 6)
  # Full vocabulary lookup = the adapted table; attend(I) = its transpose.
  g = f64(p["magnitude"]) / np.linalg.norm(dense, axis=0)
  assert rel_err(y, dense * g) < TOL
  yt = dora_attend(jnp.eye(6), layer.embedding[...], *(jnp.asarray(p[k]) for k in p),
                   layer.scale)
  assert rel_err(yt, (dense * g).T) < TOL


# -- convolutions --------------------------------------------------------------


CONV_CASES = {
    "1d_stride2_pad1": dict(in_features=3, out_features=4, kernel_size=(3,), strides=2,
                            padding=1, rank=2, x=(2, 11, 3)),
    "2d_rect_rslora": dict(in_features=3, out_features=5, kernel_size=(3, 2), strides=(1, 2),
                           padding=((1, 1), (0, 0)), rank=3, rslora=True, x=(2, 7, 8, 3)),
    "3d_nobias": dict(in_features=2, out_features=3, kernel_size=(2, 2, 2), strides=1,
                      padding="VALID", rank=2, use_bias=False, x=(1, 4, 5, 4, 2)),
    "2d_dilated_same": dict(in_features=2, out_features=3, kernel_size=(3, 3), strides=1,
                            padding="SAME", kernel_dilation=2, rank=2, x=(2, 6, 6, 2)),
    "2d_input_dilation": dict(in_features=2, out_features=4, kernel_size=(3, 3),
                                      strides=1, padding=((1, 1), (2, 1)), input_dilation=(1, 2),
                                      rank=3, x=(5, 5, 2)),
    "1d_causal_batch2": dict(in_features=3, out_features=3, kernel_size=(4,), strides=1,
                             padding="CAUSAL", kernel_dilation=2, rank=2, x=(2, 3, 9, 3)),
    "2d_circular": dict(in_features=2, out_features=2, kernel_size=(3, 3), strides=1,
                        padding="CIRCULAR", rank=1, x=(1, 5, 6, 2)),
}


def _conv_layer(key, case, alpha=3.0):
  case = dict(case)
  rank, rslora = case.pop("rank"), case.pop("rslora", False)
  case.pop("x")
  base = build(lambda: nnx.Conv(**case, rngs=nnx.Rngs(0)), key)
  return base, DoRAConv(base, rank=rank, alpha=alpha, rslora=rslora, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("name", sorted(CONV_CASES))
def test_conv_matches_float64(fresh_key, name):
  case = CONV_CASES[name]
  base, layer = _conv_layer(fresh_key(), case)
  x = _normal(fresh_key(), case["x"])
  np.testing.assert_allclose(layer(x), _apply(base, x), rtol=1e-6, atol=1e-6)  # b = 0
  _randomize(layer, fresh_key())
  y0 = np.asarray(layer(x))
  cot = _normal(fresh_key(), y0.shape)
  _, grads, dx = _nnx_grads_x(layer, x, cot)
  y_ref, g_ref = ref_conv(base, _params(layer), layer.scale, x, cot)
  assert y0.shape == y_ref.shape
  assert rel_err(y0, y_ref) < TOL
  assert rel_err(y0, _apply(base, x)) > 1e-2
  for k in ("lora_a", "lora_b", "magnitude"):
    assert rel_err(grads[k], g_ref[k]) < TOL, k
  assert rel_err(dx, g_ref["x"]) < TOL


def test_conv_norm_is_the_flattened_kernel_norm(fresh_key):
  base, layer = _conv_layer(fresh_key(), CONV_CASES["2d_rect_rslora"])
  _randomize(layer, fresh_key())
  p = _params(layer)
  w = f64(base.kernel[...])
  r = p["lora_b"].shape[0]
  delta = (f64(p["lora_a"]).reshape(-1, r) @ f64(p["lora_b"])).reshape(w.shape)
  want = np.sqrt(np.sum((w + layer.scale * delta) ** 2, axis=(0, 1, 2)))
  got = conv_norm(base.kernel[...], jnp.asarray(p["lora_a"]), jnp.asarray(p["lora_b"]),
                  layer.scale)
  np.testing.assert_allclose(got, want, rtol=2e-6)


def test_conv_dropout_follows_peft(fresh_key):
  base = build(lambda: nnx.Conv(3, 4, (3,), rngs=nnx.Rngs(0)), fresh_key())
  layer = DoRAConv(base, rank=2, alpha=2.0, dropout=0.5, rngs=nnx.Rngs(1, dropout=2))
  _randomize(layer, fresh_key())
  x = _normal(fresh_key(), (2, 6, 3))
  y_eval = layer(x, deterministic=True)
  key = fresh_key()
  y_train = layer(x, deterministic=False, rngs=key)
  xd = nnx.Dropout(0.5)(x, deterministic=False, rngs=key)
  p = {k: jnp.asarray(v) for k, v in _params(layer).items()}
  want = dora_conv(x, base.kernel[...], p["lora_a"], p["lora_b"], p["magnitude"],
                   layer.scale, base.bias[...], padding="SAME", x_dropped=xd)
  np.testing.assert_allclose(y_train, want, rtol=1e-5, atol=1e-6)
  assert rel_err(y_train, y_eval) > 1e-3
  # x_dropped = x reduces to the plain formula.
  same = dora_conv(x, base.kernel[...], p["lora_a"], p["lora_b"], p["magnitude"], layer.scale,
                   base.bias[...], x_dropped=x)
  np.testing.assert_allclose(same, y_eval, rtol=1e-5, atol=1e-6)


# -- surgery: apply_dora, merge, unmerge, cached norms -----------------------------


class _VisionText(nnx.Module):
  def __init__(self, seed=0):
    rngs = nnx.Rngs(seed)
    self.stem = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
    self.embed = nnx.Embed(20, 8, rngs=rngs)
    self.proj = nnx.Linear(8, 8, rngs=rngs)

  def __call__(self, img, ids):
    v = self.stem(img).mean(axis=(1, 2))            # [B, 8]
    t = self.embed(ids).mean(axis=1)                # [B, 8]
    return self.embed.attend(self.proj(v + t))      # tied head, [B, 20]


def test_apply_dora_merge_unmerge(fresh_key):
  model = build(_VisionText, fresh_key())
  img = _normal(fresh_key(), (2, 9, 9, 3))
  ids = jnp.asarray(_rng(fresh_key()).integers(0, 20, (2, 4)))
  y0 = np.asarray(_apply(model, img, ids))
  assert dora_jax.surgery.adaptable_paths(model) == ["embed", "proj", "stem"]
  dora_jax.apply_dora(model, targets="all-linear", rank=2, alpha=4, rngs=nnx.Rngs(1))
  assert dora_jax.surgery.adapted_paths(model) == ["proj"]  # as PEFT: no embeddings/convs
  dora_jax.apply_dora(model, targets="stem|embed", rank=2, alpha=4, rngs=nnx.Rngs(2))
  assert isinstance(model.stem, DoRAConv) and isinstance(model.embed, DoRAEmbed)
  np.testing.assert_allclose(_apply(model, img, ids), y0, rtol=1e-5, atol=1e-6)
  for _, layer in dora_jax.surgery.dora_layers(model):
    _randomize(layer, fresh_key())
  y = np.asarray(_apply(model, img, ids))
  assert rel_err(y, y0) > 1e-2
  # Training touches only the adapters.
  n_train = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
  assert n_train == (27 * 2 + 2 * 8 + 8) + (20 * 2 + 2 * 8 + 8) + (8 * 2 + 2 * 8 + 8)
  merged = dora_jax.merge(model)
  assert type(merged.stem) is nnx.Conv and type(merged.embed) is nnx.Embed
  assert rel_err(_apply(merged, img, ids), y) < TOL
  dora_jax.freeze_scales(model)
  assert rel_err(_apply(model, img, ids), y) < TOL
  assert bool(model.stem.cache_is_fresh()) and bool(model.embed.cache_is_fresh())
  dora_jax.unfreeze_scales(model)
  base = dora_jax.unmerge(model)
  np.testing.assert_array_equal(_apply(base, img, ids), y0)


def test_jitted_training_step_updates_adapters(fresh_key):
  import optax
  model = build(_VisionText, fresh_key())
  dora_jax.apply_dora(model, targets="stem|embed", rank=2, alpha=4, rngs=nnx.Rngs(2))
  opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.LoRAParam)
  img = _normal(fresh_key(), (2, 9, 9, 3))
  ids = jnp.asarray(_rng(fresh_key()).integers(0, 20, (2, 4)))
  frozen = np.asarray(model.stem.kernel[...])

  @nnx.jit
  def step(model, opt):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(m(img, ids) ** 2),
                                     argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    opt.update(model, grads)
    return loss

  l0, l1 = float(step(model, opt)), float(step(model, opt))
  assert l1 < l0
  assert float(jnp.abs(model.embed.lora_a[...]).max()) > 0
  np.testing.assert_array_equal(model.stem.kernel[...], frozen)


# -- bad configurations ----------------------------------------------------------


def test_bad_configurations_raise_clear_errors(fresh_key):
  rngs = nnx.Rngs(0)
  shaped = nnx.eval_shape  # the checks run before any weight is read
  with pytest.raises(NotImplementedError, match="feature_group_count=2"):
    DoRAConv(shaped(lambda: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=nnx.Rngs(0))),
             rank=2, alpha=1, rngs=rngs)
  with pytest.raises(NotImplementedError, match="mask"):
    DoRAConv(shaped(lambda: nnx.Conv(2, 3, (3,), mask=jnp.ones((3, 2, 3)), rngs=nnx.Rngs(0))),
             rank=1, alpha=1, rngs=rngs)
  with pytest.raises(ValueError, match="rank"):  # min(2·1, 3) = 2
    DoRAConv(shaped(lambda: nnx.Conv(1, 3, (2,), rngs=nnx.Rngs(0))), rank=3, alpha=1, rngs=rngs)
  with pytest.raises(ValueError, match="rank"):
    DoRAEmbed(shaped(lambda: nnx.Embed(50, 4, rngs=nnx.Rngs(0))), rank=5, alpha=1, rngs=rngs)
  with pytest.raises(TypeError, match="nnx.Embed"):
    DoRAEmbed(shaped(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0))), rank=1, alpha=1, rngs=rngs)
  layer = DoRAEmbed(build(lambda: nnx.Embed(10, 4, rngs=nnx.Rngs(0)), fresh_key()), rank=2,
                    alpha=1, rngs=rngs)
  with pytest.raises(ValueError, match="integer"):
    layer(jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"query must be \[\.\.\., features\]"):
    layer.attend(jnp.ones((2, 5)))
  conv = DoRAConv(build(lambda: nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)), fresh_key()), rank=2,
                  alpha=1, rngs=rngs)
  with pytest.raises(ValueError, match="inputs must be"):
    conv(jnp.ones((1, 5, 5, 2)))
  k = jnp.ones((3, 3, 2, 4))
  with pytest.raises(ValueError, match="lora_a must be"):
    dora_conv(jnp.ones((1, 5, 5, 2)), k, jnp.ones((3, 3, 4, 2)), jnp.ones((2, 4)),
              jnp.ones(4), 1.0)
  with pytest.raises(ValueError, match="padding"):
    dora_conv(jnp.ones((1, 5, 5, 2)), k, jnp.ones((3, 3, 2, 2)), jnp.ones((2, 4)),
              jnp.ones(4), 1.0, padding=(1, 2, 3))

  class Grouped(nnx.Module):
    def __init__(self):
      self.c = nnx.Conv(4, 4, (3,), feature_group_count=4, rngs=nnx.Rngs(0))

  with pytest.raises(NotImplementedError, match="c: feature_group_count=4"):
    dora_jax.apply_dora(shaped(Grouped), targets="c", rank=4, alpha=1, rngs=nnx.Rngs(0))


# -- Hugging Face PEFT -------------------------------------------------------------


needs_peft = pytest.mark.skipif(
    PEFT_PYTHON is None,
    reason=f"no PyTorch+PEFT interpreter: run scripts/peft_env.sh (makes .venv-peft) or set "
           f"{ENV_VAR} to a python with torch and peft")

PEFT_CONV = ["1d_stride2_pad1", "2d_rect_rslora", "3d_nobias"]


def _torch_conv(arr, n):
  """Flax ``[*window, in, out]`` -> torch ``[out, in, *window]``."""
  return np.ascontiguousarray(np.transpose(arr, (n + 1, n, *range(n))))


def _channels_first(arr, n):
  return np.ascontiguousarray(np.moveaxis(arr, -1, arr.ndim - n - 1))


def _torch_padding(padding, n):
  if isinstance(padding, int):
    return [padding] * n
  if padding == "VALID":
    return [0] * n
  return [lo for lo, hi in padding]


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("peft_embed_conv")
  key = jax.random.key(int.from_bytes(os.urandom(4), "little"))
  cases, jobs = {}, []
  k = jax.random.split(key, 16)  # one split; the draws are host-side

  base, layer = _embed_layer(k[0], n=17, f=6, rank=3, alpha=7.0)
  _randomize(layer, k[1])
  ids = _rng(k[2]).integers(0, 17, (3, 5))
  ids[0, 0], ids[0, 1] = 0, 16
  cot = np.asarray(_normal(k[3], (3, 5, 6)))
  y, grads = _nnx_grads(layer, lambda m: m(jnp.asarray(ids)), cot)
  p = _params(layer)
  np.savez(tmp / "embed-in.npz", weight=np.asarray(base.embedding[...]),
           lora_A=p["lora_a"].T.copy(), lora_B=p["lora_b"].T.copy(), magnitude=p["magnitude"],
           x=ids, cot=cot)
  cases["embed"] = dict(layer=layer, y=y, grads=grads, merged=dora_jax.merge(layer)(ids))
  jobs.append({"kind": "embed", "layer": {"num_embeddings": 17, "features": 6}, "r": 3,
               "alpha": 7.0, "rslora": False, "inputs": str(tmp / "embed-in.npz"),
               "out": str(tmp / "embed-out.npz")})

  for i, name in enumerate(PEFT_CONV):
    case = CONV_CASES[name]
    base, layer = _conv_layer(k[4 + 3 * i], case)
    _randomize(layer, k[5 + 3 * i])
    n = len(base.kernel_size)
    x = np.asarray(_normal(k[6 + 3 * i], case["x"]))
    y0 = np.asarray(layer(jnp.asarray(x)))
    cot = np.asarray(_normal(k[7 + 3 * i], y0.shape))
    _, g, dx = _nnx_grads_x(layer, jnp.asarray(x), jnp.asarray(cot))
    p = _params(layer)
    r = layer.rank
    data = dict(weight=_torch_conv(np.asarray(base.kernel[...]), n),
                lora_A=_torch_conv(p["lora_a"], n),
                lora_B=p["lora_b"].T.reshape(base.out_features, r, *(1,) * n).copy(),
                magnitude=p["magnitude"], x=_channels_first(x, n), cot=_channels_first(cot, n))
    if base.bias is not None:
      data["bias"] = np.asarray(base.bias[...])
    np.savez(tmp / f"{name}-in.npz", **data)
    cases[name] = dict(layer=layer, y=y0, n=n, dx=np.asarray(dx),
                       grads=g,
                       merged=np.asarray(dora_jax.merge(layer)(jnp.asarray(x))))
    strides = case["strides"]
    jobs.append({"kind": "conv", "r": r, "alpha": 3.0, "rslora": case.get("rslora", False),
                 "layer": {"in_features": base.in_features, "out_features": base.out_features,
                           "kernel_size": list(base.kernel_size),
                           "stride": [strides] * n if isinstance(strides, int) else list(strides),
                           "padding": _torch_padding(case["padding"], n)},
                 "inputs": str(tmp / f"{name}-in.npz"), "out": str(tmp / f"{name}-out.npz")})
  (tmp / "jobs.json").write_text(json.dumps(jobs))
  proc = subprocess.run([PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "peft_embed_conv_side.py"),
                         str(tmp / "jobs.json")], capture_output=True, text=True, timeout=300)
  if proc.returncode != 0:
    pytest.fail(f"the PyTorch side failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
  keys = json.loads(proc.stdout.strip().splitlines()[-1])
  for (name, case), job, kk in zip(cases.items(), jobs, keys):
    case["out"] = dict(np.load(job["out"]))
    case["keys"] = kk
  return cases


@needs_peft
def test_peft_embedding(peft_run):
  case = peft_run["embed"]
  out, layer = case["out"], case["layer"]
  assert rel_err(case["y"], out["y"]) < TOL
  assert rel_err(case["grads"]["lora_a"], out["d_lora_A"].T) < TOL
  assert rel_err(case["grads"]["lora_b"], out["d_lora_B"].T) < TOL
  assert rel_err(case["grads"]["magnitude"], out["d_magnitude"]) < TOL
  assert rel_err(case["merged"], out["y_merged"]) < TOL
  # The names and shapes PEFT saves are the ones the layer reports.
  want = {f"base_model.model.layer{s}": list(np.shape(v))
          for s, v in layer.peft_tensors().items()}
  assert case["keys"] == want


@needs_peft
@pytest.mark.parametrize("name", PEFT_CONV)
def test_peft_conv(peft_run, name):
  case = peft_run[name]
  out, layer, n = case["out"], case["layer"], case["n"]
  to_flax = lambda t: np.moveaxis(t, 1, -1)  # noqa: E731  (NC... -> N...C)
  assert rel_err(case["y"], to_flax(out["y"])) < TOL
  assert rel_err(case["dx"], to_flax(out["d_x"])) < TOL
  assert rel_err(case["grads"]["lora_a"],
                 np.transpose(out["d_lora_A"], (*range(2, n + 2), 1, 0))) < TOL
  r = layer.rank
  assert rel_err(case["grads"]["lora_b"], out["d_lora_B"].reshape(-1, r).T) < TOL
  assert rel_err(case["grads"]["magnitude"], out["d_magnitude"]) < TOL
  assert rel_err(case["merged"], to_flax(out["y_merged"])) < TOL
  want = {f"base_model.model.layer{s}": list(np.shape(v))
          for s, v in layer.peft_tensors().items()}
  assert case["keys"] == want
  # peft_tensors / load_peft_tensors round-trip exactly.
  before = _params(layer)
  layer.load_peft_tensors({k: np.asarray(v) for k, v in layer.peft_tensors().items()})
  for k, v in _params(layer).items():
    np.testing.assert_array_equal(v, before[k])


# -- Linen -----------------------------------------------------------------------


def test_linen_embed_and_conv_match_nnx_and_merge(fresh_key):
  import flax.linen as nn
  from dora_jax import linen_conv

  rng = _rng(fresh_key())
  ids = jnp.asarray(rng.integers(0, 9, (2, 3)))
  q = _normal(fresh_key(), (2, 5))
  emb = linen_conv.DoRAEmbed(num_embeddings=9, features=5, rank=2, alpha=3.0)
  v = emb.init(jax.random.key(0), ids)
  plain = nn.Embed(9, 5)
  np.testing.assert_array_equal(emb.apply(v, ids), plain.apply({"params": v["params"]}, ids))

  img = _normal(fresh_key(), (2, 6, 5, 3))
  conv = linen_conv.DoRAConv(features=4, kernel_size=(3, 2), strides=(2, 1), padding="SAME",
                             rank=2, alpha=3.0, rslora=True)
  cv = conv.init(jax.random.key(1), img)
  plain_conv = nn.Conv(4, (3, 2), strides=(2, 1), padding="SAME")
  np.testing.assert_allclose(conv.apply(cv, img), plain_conv.apply({"params": cv["params"]}, img),
                             rtol=1e-6, atol=1e-6)

  # Random adapters: Linen = NNX on the same weights, and the merged plain layers agree.
  def rand(tree):
    return jax.tree.map(lambda x: jnp.asarray(
        np.asarray(x) * (1 + 0.2 * rng.standard_normal(x.shape)) + 0.1
        * rng.standard_normal(x.shape), jnp.float32), tree)
  v = {**v, "dora": rand(v["dora"])}
  cv = {**cv, "dora": rand(cv["dora"])}
  nnx_emb = DoRAEmbed(build(lambda: nnx.Embed(9, 5, rngs=nnx.Rngs(0)), fresh_key()), rank=2,
                      alpha=3.0, rngs=nnx.Rngs(0))
  nnx_emb.embedding[...] = v["params"]["embedding"]
  for k in ("lora_a", "lora_b", "magnitude"):
    getattr(nnx_emb, k)[...] = v["dora"][k]
  y = emb.apply(v, ids)
  np.testing.assert_allclose(y, nnx_emb(ids), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(emb.apply(v, q, method="attend"), nnx_emb.attend(q), rtol=1e-6,
                             atol=1e-6)
  assert rel_err(y, plain.apply({"params": v["params"]}, ids)) > 1e-2
  merged = linen_conv.merge_params(v, v, alpha=3.0)
  assert rel_err(plain.apply(merged, ids), y) < TOL
  assert rel_err(plain.apply(merged, q, method="attend"), emb.apply(v, q, method="attend")) < TOL

  yc = conv.apply(cv, img)
  merged = linen_conv.merge_params(cv, cv, alpha=3.0, rslora=True)
  assert rel_err(yc, plain_conv.apply({"params": cv["params"]}, img)) > 1e-2
  assert rel_err(plain_conv.apply(merged, img), yc) < TOL
  with pytest.raises(NotImplementedError, match="feature_group_count"):
    linen_conv.DoRAConv(features=4, kernel_size=(3,), feature_group_count=2).init(
        jax.random.key(0), jnp.ones((1, 5, 4)))

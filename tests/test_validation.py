"""Bad input fails loudly, naming the argument and the shapes seen."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax

D_IN, D_OUT, R = 12, 10, 3


def _good():
  rng = np.random.default_rng(0)
  return dict(
      x=jnp.asarray(rng.normal(size=(4, D_IN)), jnp.float32),
      kernel=jnp.asarray(rng.normal(size=(D_IN, D_OUT)), jnp.float32),
      lora_a=jnp.asarray(rng.normal(size=(D_IN, R)), jnp.float32),
      lora_b=jnp.asarray(rng.normal(size=(R, D_OUT)), jnp.float32),
      magnitude=jnp.asarray(rng.uniform(1, 2, size=(D_OUT,)), jnp.float32),
      scale=0.5,
      bias=jnp.asarray(rng.normal(size=(D_OUT,)), jnp.float32),
  )


BAD = [
    # (argument, bad value, error type, words the message must contain)
    ("x", jnp.ones((4, D_IN + 1)), ValueError, ["x", f"({4}, {D_IN + 1})", str(D_IN)]),
    ("x", jnp.ones((4, D_IN), jnp.int32), TypeError, ["x", "int32"]),
    ("x", jnp.float32(1.0), ValueError, ["x", "()"]),
    ("kernel", jnp.ones((D_OUT, D_IN)), ValueError, ["lora_a", f"({D_IN}, {R})"]),
    ("kernel", jnp.ones((D_IN, D_OUT, 1)), ValueError, ["kernel", "2-D"]),
    ("kernel", jnp.ones((D_IN, D_OUT), jnp.int8), TypeError, ["kernel", "int8"]),
    ("lora_a", jnp.ones((R, D_IN)), ValueError, ["lora_a", f"({R}, {D_IN})"]),
    ("lora_a", jnp.ones((D_IN, 0)), ValueError, ["rank", ">= 1"]),
    ("lora_b", jnp.ones((D_OUT, R)), ValueError, ["lora_b", f"({D_OUT}, {R})", f"[{R}, {D_OUT}]"]),
    ("lora_b", jnp.ones((R + 1, D_OUT)), ValueError, ["lora_b", f"({R + 1}, {D_OUT})"]),
    ("magnitude", jnp.ones((D_OUT + 2,)), ValueError, ["magnitude", f"({D_OUT + 2},)"]),
    ("magnitude", jnp.ones((1, D_OUT)), ValueError, ["magnitude", f"(1, {D_OUT})"]),
    ("magnitude", jnp.ones((D_OUT,), jnp.int32), TypeError, ["magnitude", "int32"]),
    ("bias", jnp.ones((D_IN,)), ValueError, ["bias", f"({D_IN},)"]),
    ("scale", jnp.ones((2,)), ValueError, ["scale", "(2,)"]),
    ("scale", "0.5", TypeError, ["scale", "str"]),
    ("scale", True, TypeError, ["scale", "bool"]),
    ("scale", jnp.asarray(1 + 2j), TypeError, ["scale", "complex"]),
]


@pytest.mark.parametrize("name,value,error,words", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_dora_dense_rejects(name, value, error, words):
  args = _good()
  args[name] = value
  with pytest.raises(error) as info:
    dora_jax.dora_dense(**args)
  for word in words:
    assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("fn", ["factored_norm", "merge_kernel", "dora_norm_scale"])
def test_weight_functions_reject_torch_layout(fn):
  args = _good()
  kwargs = dict(kernel=args["kernel"], lora_a=args["lora_a"].T, lora_b=args["lora_b"],
                scale=0.5)
  if fn != "factored_norm":
    kwargs["magnitude"] = args["magnitude"]
  with pytest.raises(ValueError, match="lora_a"):
    getattr(dora_jax, fn)(**kwargs)


def test_norm_argument_shape_checked():
  args = _good()
  with pytest.raises(ValueError, match="norm"):
    dora_jax.dora_dense(**args, norm=jnp.ones((D_OUT + 1,)))


def test_chunk_size_checked():
  args = _good()
  with pytest.raises(ValueError, match="chunk_size"):
    dora_jax.factored_norm(args["kernel"], args["lora_a"], args["lora_b"], 1.0, chunk_size=0)


def test_column_sq_norm_checks_kernel():
  with pytest.raises(ValueError, match=r"kernel.*\(12,\)"):
    dora_jax.column_sq_norm(jnp.ones((12,)))
  with pytest.raises(TypeError, match="kernel"):
    dora_jax.column_sq_norm(jnp.ones((3, 4), jnp.int32))


# -- numeric scalars: alpha, scale, dropout ------------------------------------------


def _real_scalars(value):
  """``value`` as every kind of real scalar a user may hold."""
  return [value, float(value), np.float32(value), np.float64(value), np.int64(value),
          np.array(value, np.float32), np.array(value, np.int32), jnp.asarray(value, jnp.float32),
          jnp.asarray(value, jnp.bfloat16), jnp.bfloat16(value)]


@pytest.mark.parametrize("alpha", _real_scalars(16), ids=lambda a: type(a).__name__)
def test_lora_scale_accepts_any_real_scalar(alpha):
  s = dora_jax.lora_scale(alpha, 8)
  assert type(s) is float and s == 2.0
  assert dora_jax.lora_scale(alpha, 4, rslora=True) == 8.0


NOT_ALPHA = [
    (float("nan"), ValueError, "finite"),
    (float("inf"), ValueError, "finite"),
    (np.float32("-inf"), ValueError, "finite"),
    (jnp.asarray(jnp.nan), ValueError, "finite"),
    (10 ** 400, ValueError, "finite"),
    (True, TypeError, "bool"),
    (np.bool_(True), TypeError, "bool"),
    ("16", TypeError, "str"),
    (None, TypeError, "NoneType"),
    (1 + 2j, TypeError, "complex"),
    (jnp.asarray(1 + 2j), TypeError, "complex"),
    (np.ones(2), ValueError, "(2,)"),
    (jnp.ones((1,)), ValueError, "(1,)"),
]


@pytest.mark.parametrize("value,error,word", NOT_ALPHA, ids=[f"alpha-{i}" for i in range(len(NOT_ALPHA))])
def test_lora_scale_refuses_what_is_not_a_finite_real(value, error, word):
  with pytest.raises(error) as info:
    dora_jax.lora_scale(value, 8)
  assert "alpha" in str(info.value) and word in str(info.value), str(info.value)


def test_traced_alpha_is_refused_with_a_reason():
  with pytest.raises(TypeError, match="alpha must be a concrete number"):
    jax.jit(lambda a: dora_jax.lora_scale(a, 8))(16.0)


@pytest.mark.parametrize("scale", [float("nan"), float("-inf"), np.float32("inf"),
                                   jnp.asarray(jnp.nan, jnp.float32)])
def test_dora_dense_refuses_non_finite_scale(scale):
  with pytest.raises(ValueError, match="scale must be finite"):
    dora_jax.dora_dense(**dict(_good(), scale=scale))
  with pytest.raises(ValueError, match="scale must be finite"):
    dora_jax.factored_norm(_good()["kernel"], _good()["lora_a"], _good()["lora_b"], scale)


def test_dora_dense_takes_numpy_and_traced_scales(fresh_key):
  args = _good()
  k = jax.random.split(fresh_key(), 2)
  args["x"] = jax.random.normal(k[0], (4, D_IN))
  args["lora_b"] = 0.3 * jax.random.normal(k[1], (R, D_OUT))
  want = np.asarray(dora_jax.dora_dense(**dict(args, scale=0.75)))
  for scale in (np.float32(0.75), np.array(0.75), jnp.asarray(0.75)):
    np.testing.assert_array_equal(np.asarray(dora_jax.dora_dense(**dict(args, scale=scale))), want)
  traced = jax.jit(lambda s: dora_jax.dora_dense(**dict(args, scale=s)))(0.75)
  np.testing.assert_allclose(np.asarray(traced), want, rtol=1e-6, atol=1e-6)


def _mlp(seed=0):
  from flax import nnx

  return nnx.Sequential(nnx.Linear(D_IN, 16, rngs=nnx.Rngs(seed)), nnx.Linear(16, D_OUT, rngs=nnx.Rngs(seed + 1)))


@pytest.mark.parametrize("alpha", [np.float32(16), np.array(16.0), jnp.asarray(16, jnp.int32),
                                   jnp.bfloat16(16)], ids=lambda a: type(a).__name__)
def test_apply_dora_accepts_numpy_and_0d_alpha(alpha, fresh_key):
  from flax import nnx

  k = jax.random.split(fresh_key(), 3)
  models = []
  for a in (16, alpha):
    model = _mlp()
    dora_jax.apply_dora(model, targets=r"layers/\d", rank=4, alpha=a, dropout=np.float32(0.0),
                        rngs=nnx.Rngs(3))
    for i, layer in enumerate((model.layers[0], model.layers[1])):
      layer.lora_b[...] = 0.3 * jax.random.normal(k[i], layer.lora_b.shape)
    models.append(model)
  for layer in (models[1].layers[0], models[1].layers[1]):
    assert type(layer.alpha) is float and layer.alpha == 16.0 and layer.scale == 4.0
  x = jax.random.normal(k[2], (3, D_IN))
  np.testing.assert_array_equal(np.asarray(models[1](x)), np.asarray(models[0](x)))


@pytest.mark.parametrize("alpha,error", [(float("nan"), ValueError), (np.float32("inf"), ValueError),
                                         (jnp.asarray(jnp.nan), ValueError), ("16", TypeError)])
def test_apply_dora_refuses_bad_alpha_before_touching_the_model(alpha, error):
  from flax import nnx

  model = _mlp()
  with pytest.raises(error, match="alpha"):
    dora_jax.apply_dora(model, targets=r"layers/\d", rank=4, alpha=alpha, rngs=nnx.Rngs(3))
  assert not dora_jax.surgery.dora_layers(model)


# -- float dtypes for the adapters -----------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", np.uint8, jnp.bool_, jnp.complex64, None, "nope"],
                         ids=str)
def test_apply_dora_refuses_non_float_param_dtype(dtype):
  from flax import nnx

  model = _mlp()
  with pytest.raises(TypeError, match="param_dtype must be a floating dtype"):
    dora_jax.apply_dora(model, targets=r"layers/\d", rank=4, alpha=8, param_dtype=dtype,
                        rngs=nnx.Rngs(3))
  assert not dora_jax.surgery.dora_layers(model)
  with pytest.raises(TypeError, match="param_dtype must be a floating dtype"):
    dora_jax.nnx.DoRADense(model.layers[0], rank=4, alpha=8, param_dtype=dtype, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("dtype", [jnp.float16, "bfloat16"])
def test_apply_dora_float_param_dtypes(dtype):
  from flax import nnx

  model = _mlp()
  dora_jax.apply_dora(model, targets=r"layers/\d", rank=4, alpha=8, param_dtype=dtype,
                      rngs=nnx.Rngs(3))
  assert model.layers[0].lora_a[...].dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("dtype", [jnp.int8, "int32", jnp.bool_, jnp.complex64])
def test_load_adapter_refuses_non_float_dtype_at_the_call(tmp_path, dtype, fresh_key):
  from flax import nnx

  model = _mlp()
  dora_jax.apply_dora(model, targets=r"layers/\d", rank=4, alpha=8, rngs=nnx.Rngs(3))
  model.layers[0].lora_b[...] = jax.random.normal(fresh_key(), model.layers[0].lora_b.shape)
  dora_jax.save_adapter(model, tmp_path / "a")
  fresh = _mlp()
  for where in (tmp_path / "a", tmp_path / "nothing-here"):  # checked before any file is read
    with pytest.raises(TypeError, match="dtype must be a floating dtype"):
      dora_jax.load_adapter(fresh, where, dtype=dtype)
  assert not dora_jax.surgery.dora_layers(fresh)
  dora_jax.load_adapter(fresh, tmp_path / "a", dtype=jnp.bfloat16)
  assert fresh.layers[0].lora_b[...].dtype == jnp.bfloat16


# -- sharding helpers ---------------------------------------------------------------


def test_make_mesh_refuses_repeated_or_string_axis_names():
  import jax
  from dora_jax import sharding as dsh

  one = jax.devices()[:1]
  with pytest.raises(ValueError, match=r"distinct.*'tp' repeated"):
    dsh.make_mesh((1, 1), ("tp", "tp"), devices=one)
  with pytest.raises(TypeError, match=r"string 'tp'.*\('tp',\)"):
    dsh.make_mesh((1,), "tp", devices=one)
  with pytest.raises(TypeError, match="non-empty strings"):
    dsh.make_mesh((1,), (None,), devices=one)
  with pytest.raises(ValueError, match="2 axes but axis_names"):
    dsh.make_mesh((1, 1), ("tp",), devices=one)
  mesh = dsh.make_mesh((1, 1), ("fsdp", "tp"), devices=one)
  assert mesh.axis_names == ("fsdp", "tp")


def test_adapter_partition_specs_refuses_a_bare_string():
  from jax.sharding import PartitionSpec as P
  from dora_jax import sharding as dsh

  with pytest.raises(TypeError, match=r"string 'tp'.*P\('tp'\)"):
    dsh.adapter_partition_specs("tp")
  with pytest.raises(TypeError, match="entries must be None"):
    dsh.adapter_partition_specs((None, 3))
  with pytest.raises(TypeError, match="kernel_spec must be"):
    dsh.adapter_partition_specs(7)
  specs = dsh.adapter_partition_specs(P(("fsdp", "dp"), "tp"))
  assert specs == {"lora_a": P(("fsdp", "dp"), None), "lora_b": P(None, "tp"), "magnitude": P("tp")}
  assert dsh.adapter_partition_specs(P(None, P.UNCONSTRAINED))["magnitude"] == P(P.UNCONSTRAINED)

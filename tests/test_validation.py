"""Bad input fails loudly, naming the argument and the shapes seen."""

from __future__ import annotations

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

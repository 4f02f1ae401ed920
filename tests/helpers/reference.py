"""Float64 references for the tests: the dense DoRA formulation, PEFT-style.

Everything here materialises ``W + s·a·b [d_in, d_out]`` on purpose (the thing
the library avoids) and runs in float64, so it is an independent check of the
factored norm and of the custom backward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def f64(value) -> np.ndarray:
  """Any array (bf16 included) as a float64 numpy array, exactly."""
  return np.asarray(value).astype(np.float64)  # exact for bf16/fp16 (ml_dtypes)


def dense_norm(kernel, lora_a, lora_b, scale) -> np.ndarray:
  """``‖W + s·a·b‖`` per output column, float64 numpy."""
  w = f64(kernel) + float(scale) * f64(lora_a) @ f64(lora_b)
  return np.sqrt(np.sum(w * w, axis=0))


def dense_norm_jax(kernel, lora_a, lora_b, scale) -> jax.Array:
  """``‖W + s·a·b‖`` per column in JAX, forming the dense ``[d_in, d_out]`` update
  (what the library never does; float32, float64 under x64)."""
  acc = jnp.promote_types(jnp.float32, jnp.result_type(kernel, lora_a, lora_b))
  dense = kernel.astype(acc) + scale * jnp.dot(
      lora_a.astype(acc), lora_b.astype(acc), precision=jax.lax.Precision.HIGHEST)
  return jnp.sqrt(jnp.sum(jnp.square(dense), axis=0))


def dora_forward(x, kernel, lora_a, lora_b, magnitude, scale, bias=None) -> np.ndarray:
  """``y = m/‖W+s·a·b‖ ⊙ (x·W + s·x·a·b) + bias`` in float64 numpy."""
  xs = f64(x)
  pre = xs @ f64(kernel) + float(scale) * (xs @ f64(lora_a)) @ f64(lora_b)
  y = f64(magnitude) / dense_norm(kernel, lora_a, lora_b, scale) * pre
  return y if bias is None else y + f64(bias)


def _dense_forward(p, s):
  dense = p["kernel"] + s * p["lora_a"] @ p["lora_b"]
  norm = jax.lax.stop_gradient(jnp.sqrt(jnp.sum(dense * dense, axis=0)))
  pre = p["x"] @ p["kernel"] + s * (p["x"] @ p["lora_a"]) @ p["lora_b"]
  y = p["magnitude"] / norm * pre
  return y + p["bias"] if "bias" in p else y


@jax.jit  # one compiled program per shape (op-by-op float64 dispatch cost seconds per call)
def _dense_value_and_grads(diff, frozen, cot, s):
  loss = lambda diff: jnp.sum(_dense_forward({**diff, **frozen}, s) * cot)  # noqa: E731
  return _dense_forward({**diff, **frozen}, s), jax.grad(loss)(diff)


def dora_value_and_grads(x, kernel, lora_a, lora_b, magnitude, scale, bias, cotangent,
                         *, wrt_kernel: bool = False):
  """Float64 ``y`` and the gradients of ``Σ y ⊙ cotangent`` (norm detached).

  Returns ``(y, grads)`` with ``grads`` a dict over ``x, lora_a, lora_b,
  magnitude`` (+ ``bias`` when given, + ``kernel`` when ``wrt_kernel``), all
  float64 numpy, computed by JAX autodiff of the dense formulation with
  ``stop_gradient`` on the norm.
  """
  with jax.enable_x64(True):
    args = {k: jnp.asarray(f64(v)) for k, v in
            dict(x=x, kernel=kernel, lora_a=lora_a, lora_b=lora_b, magnitude=magnitude).items()}
    if bias is not None:
      args["bias"] = jnp.asarray(f64(bias))
    names = ["x", "lora_a", "lora_b", "magnitude"] + (["bias"] if bias is not None else [])
    if wrt_kernel:
      names.append("kernel")
    diff = {k: args[k] for k in names}
    frozen = {k: v for k, v in args.items() if k not in names}
    y, grads = _dense_value_and_grads(diff, frozen, jnp.asarray(f64(cotangent)),
                                      jnp.float64(float(scale)))
    return np.asarray(y), {k: np.asarray(v) for k, v in grads.items()}


def rel_err(actual, expected) -> float:
  """``‖actual − expected‖ / ‖expected‖`` in float64 (Frobenius)."""
  a, e = f64(actual), f64(expected)
  return float(np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-300))


def assert_grads_close(grads, names, expected, tol: float) -> None:
  """Each of ``grads`` (in the order of ``names``) has ``expected[name]``'s shape and
  a :func:`rel_err` below ``tol`` against it."""
  for name, got in zip(names, grads, strict=True):
    assert np.shape(got) == np.shape(expected[name]), (name, np.shape(got))
    assert rel_err(got, expected[name]) < tol, (name, rel_err(got, expected[name]))


#: Ulps by which two separately compiled programs computing the same float sums
#: may differ: none on the CPU (same code generation, the tests' claim there);
#: on a GPU XLA picks a reduction's or GEMM's summation order per fusion
#: (dequantised weights feed a fused GEMM in one program and a library GEMM in
#: the other), so the "exact init" results agree to a few ulps of the terms summed.
CROSS_PROGRAM_ULPS = 4 if jax.default_backend() == "gpu" else 0


def assert_same_result(actual, expected, magnitude=None) -> None:
  """``actual`` and ``expected``, one function compiled twice: bit for bit on
  the CPU; on a GPU within :data:`CROSS_PROGRAM_ULPS` units of the dtype's
  precision times ``magnitude`` (the summed terms' ``Σ|x|·|w|``, elementwise;
  default ``|expected|``)."""
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape and actual.dtype == expected.dtype
  if not CROSS_PROGRAM_ULPS:
    np.testing.assert_array_equal(actual, expected)
    return
  eps = float(jnp.finfo(expected.dtype).eps)
  scale = np.abs(f64(expected)) if magnitude is None else np.asarray(magnitude, np.float64)
  err = np.abs(f64(actual) - f64(expected))
  assert np.all(err <= CROSS_PROGRAM_ULPS * eps * scale), float(np.max(err / (eps * scale)))

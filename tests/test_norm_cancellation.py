"""The factored norm where an update cancels its column (``W_j ≈ −s(ab)_j``).

The three factored terms are each about ``‖W_j‖²`` there while their sum is
``‖W_j + s(ab)_j‖²``, far smaller: float32 keeps only their absolute rounding
error (relative error ~2e-3 at ``‖W + s·a·b‖/‖W‖ = 1e-2``, ~0.3 at 1e-3 before
the refinement). Every column must stay within :data:`TOL` of the float64 norm
of the stored values down to a ratio of 1e-3, on every refinement path and
backend (interpret mode off the GPU), with the flagged columns recomputed and
nothing recomputed when nothing cancels.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dora_jax
from dora_jax import norm as norm_lib
from dora_jax.kernels import column_norm as cn
from helpers.reference import f64

GPU = jax.default_backend() == "gpu"

#: Per-column relative error allowed against float64. A dense float32 norm
#: errs by about 2⁻²⁴/(ratio·√d_in) (the rounding of s·a·b, seen through the
#: small difference): ≤ 3e-5 at ratio 1e-3 for the shapes here.
TOL = 1e-4

#: ``‖W_j + s(ab)_j‖ / ‖s(ab)_j‖`` of the columns of a cancelling layer (cycled):
#: from 1e-3 up to no cancellation at all, so one layer holds flagged and
#: unflagged columns, more of the former than one refinement round takes.
RATIOS = (1e-3, 1.5e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)

#: Refinement paths checked on this platform: the default (``"auto"``) and the
#: other one it does not pick here.
REFINES = ("auto", "columns" if GPU else "kernel")


def cancelling_layer(key, d_in, d_out, rank, scale, *, dtype=jnp.float32, adapter_dtype=None,
                     ratios=RATIOS):
  """``(kernel, lora_a, lora_b)`` whose column j is ``−s(ab)_j`` plus a random
  residual of norm ``ratios[j % len]·‖s(ab)_j‖``, then stored in ``dtype``
  (adapters in ``adapter_dtype``, default ``dtype``)."""
  adapter_dtype = dtype if adapter_dtype is None else adapter_dtype
  k = jax.random.split(key, 3)
  a = (jax.random.uniform(k[0], (d_in, rank), minval=-1, maxval=1) / d_in**0.5).astype(adapter_dtype)
  b = jax.random.normal(k[1], (rank, d_out)).astype(adapter_dtype)
  update = scale * f64(a) @ f64(b)
  residual = f64(jax.random.normal(k[2], (d_in, d_out)))
  ratio = np.resize(np.asarray(ratios), d_out)
  residual *= ratio * np.linalg.norm(update, axis=0) / np.linalg.norm(residual, axis=0)
  kernel = jnp.asarray(residual - update, jnp.float32).astype(dtype)
  return kernel, a, b


def exact_norm(kernel, lora_a, lora_b, scale):
  """``‖W + s·a·b‖`` per column of the stored values, float64."""
  dense = f64(kernel) + float(scale) * f64(lora_a) @ f64(lora_b)
  return np.linalg.norm(dense, axis=0)


def cancellation_ratio(kernel, lora_a, lora_b, scale):
  """``‖W_j + s(ab)_j‖ / ‖W_j‖`` per column, float64."""
  return exact_norm(kernel, lora_a, lora_b, scale) / np.linalg.norm(f64(kernel), axis=0)


def column_errors(norm, expected):
  return np.abs(f64(norm) - expected) / expected


def assert_refined(norm, expected, ratio, *, plain=None):
  """Every column within :data:`TOL` of float64. Or, given ``plain`` (the
  unrefined factored norm) for the GPU's single refinement round
  (``loop=False``: :data:`~dora_jax.norm.REFINE_COLUMNS` columns, no
  data-dependent control flow), the round fixed that many of ``plain``'s
  inaccurate columns (or all), and those left are columns that cancel
  (``ratio`` = ‖W_j + s(ab)_j‖ / ‖W_j‖ within the flagging range, < 0.4)."""
  err, ratio = column_errors(norm, expected).ravel(), np.asarray(ratio).ravel()
  if plain is None:
    assert err.max() <= TOL, (err.max(), ratio[np.argmax(err)])
    return
  bad = err > TOL
  plain_bad = int(np.sum(column_errors(plain, expected) > TOL))
  assert np.all(ratio[bad] < 0.4), ratio[bad]
  # 2: slack for columns at TOL's edge, rounded differently by the two programs
  assert bad.sum() <= max(0, plain_bad - norm_lib.REFINE_COLUMNS) + 2, (bad.sum(), plain_bad)


def _norm(refine, chunk_size=None):
  options = {"chunk_size": chunk_size} | ({} if refine == "auto" else {"refine": refine})
  return jax.jit(lambda *v: dora_jax.factored_norm(*v, **options))


@pytest.mark.parametrize("refine", REFINES)
@pytest.mark.parametrize("d_in,d_out,rank,scale,chunk", [
    (37, 53, 1, 1.7, None),    # rank 1: U and G·b are vector products
    (130, 97, 16, 0.25, 32),   # chunked terms, ragged last chunk
    (257, 29, 64, -2.0, None), # a negative scale, high rank
])
def test_cancelled_columns_keep_float32_accuracy(fresh_key, refine, d_in, d_out, rank, scale,
                                                 chunk):
  kernel, a, b = cancelling_layer(fresh_key(), d_in, d_out, rank, scale)
  ratio = cancellation_ratio(kernel, a, b, scale)
  assert ratio.min() < 1.1e-3  # the acceptance range is reached
  expected = exact_norm(kernel, a, b, scale)
  norm = _norm(refine, chunk)(kernel, a, b, scale)
  assert norm.dtype == jnp.float32 and norm.shape == (d_out,)
  one_round = GPU and refine == "columns"
  assert_refined(norm, expected, ratio,
                 plain=_norm("off", chunk)(kernel, a, b, scale) if one_round else None)
  if refine == "auto" and rank == 1:  # what the refinement fixes: the plain sum misses it
    plain = column_errors(_norm("off", chunk)(kernel, a, b, scale), expected)
    assert plain[ratio < 2e-3].max() > 10 * TOL


@pytest.mark.parametrize("adapter_dtype,refine", [(jnp.bfloat16, REFINES[0]),
                                                   (jnp.float32, REFINES[1])])
def test_bf16_kernel_cancellation(fresh_key, refine, adapter_dtype):
  """bf16 kernels: the inputs are exact in float32, so the same bound holds
  down to the smallest ratio their own rounding leaves (about 1e-3)."""
  scale = 1.3
  kernel, a, b = cancelling_layer(fresh_key(), 91, 45, 8, scale, dtype=jnp.bfloat16,
                                  adapter_dtype=adapter_dtype)
  ratio = cancellation_ratio(kernel, a, b, scale)
  assert ratio.min() < 3e-3
  one_round = GPU and refine == "columns"
  assert_refined(_norm(refine)(kernel, a, b, scale), exact_norm(kernel, a, b, scale), ratio,
                 plain=_norm("off")(kernel, a, b, scale) if one_round else None)


def test_column_norm_kernel_does_not_cancel(fresh_key):
  """The one-pass kernel sums (W + s·a·b)² tile by tile: no cancellation
  between terms, so it meets the bound unrefined (the kernel backends use it
  for bf16/fp16 layers)."""
  scale = 0.9
  kernel, a, b = cancelling_layer(fresh_key(), 45, 40, 8, scale, dtype=jnp.bfloat16)
  cfg = cn.ColumnNormConfig(block_m=16, block_n=32, block_k=16, programs=4)
  norm = cn.column_norm(kernel, a, b, scale, config=cfg, interpret=not GPU)
  assert column_errors(norm, exact_norm(kernel, a, b, scale)).max() <= TOL


def _norm_used(backend, x, kernel, a, b, scale):
  """The norm ``dora_dense`` divides by on ``backend``: with ``m = 1`` and no
  bias ``y = pre / n``; with ``norm = 1`` the same program gives ``pre``."""
  d_out = kernel.shape[1]
  ones = jnp.ones((d_out,), jnp.float32)
  y = dora_jax.dora_dense(x, kernel, a, b, ones.astype(x.dtype), scale, backend=backend)
  pre = dora_jax.dora_dense(x, kernel, a, b, ones.astype(x.dtype), scale, backend=backend,
                            norm=ones)
  return y, pre


@pytest.mark.parametrize("backend", ["xla", "pallas", "mosaic", "auto"])
def test_dora_dense_norm_on_every_backend(fresh_key, backend):
  """float32 (T, d_in, d_out multiples of the Mosaic tiles; float32 runs
  there on the XLA path, logged): the norm a layer divides by is within TOL
  of float64 in every column."""
  scale = 1.5
  key = fresh_key()
  kernel, a, b = cancelling_layer(key, 128, 256, 5, scale)
  x = jax.random.normal(jax.random.fold_in(key, 1), (128, 128))
  y, pre = _norm_used(backend, x, kernel, a, b, scale)
  # n = pre / y per element (g = 1/n, rounded once); the median over tokens,
  # skipping the exact zeros that cancellation leaves in pre
  y, pre = f64(y), f64(pre)
  norm = np.nanmedian(np.where(y != 0, pre / np.where(y != 0, y, 1), np.nan), axis=0)
  assert column_errors(norm, exact_norm(kernel, a, b, scale)).max() <= TOL


@pytest.mark.parametrize("backend", ["xla", "pallas"])
def test_dora_dense_bf16_cancelling_layer(fresh_key, backend):
  """bf16 activations: ``pre`` and ``y`` are each rounded to bf16, so the layer
  must match ``pre`` divided by the float64 norm within two bf16 roundings
  (2⁻⁷ relative) per element; the plain factored sum is off by up to ~0.1 at
  these ratios. The kernel backends (Triton and Mosaic alike) take their
  norm from the one-pass kernel, XLA from factored_norm."""
  scale = 1.5
  key = fresh_key()
  kernel, a, b = cancelling_layer(key, 128, 256, 5, scale, dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.fold_in(key, 1), (128, 128), jnp.bfloat16)
  y, pre = _norm_used(backend, x, kernel, a, b, scale)
  expected = f64(pre) / exact_norm(kernel, a, b, scale)
  nonzero = expected != 0  # cancellation leaves exact zeros in a bf16 pre
  rel = np.abs(f64(y) - expected)[nonzero] / np.abs(expected[nonzero])
  assert rel.max() <= 2.0**-7


# -- refine_cancelled: the combine-and-refine step for any layout ------------------

def _einsum_norm_terms(w, a, b, scale):
  """A kernel ``W [N, D, H]`` contracted over D, ``a [D, r]``, ``b [r, N, H]``:
  the squared norms from the three terms and their magnitudes, per (n, h)
  flattened to ``[N·H]``, float32."""
  u = jnp.einsum("dr,ndh->rnh", a, w, precision="highest")
  gb = jnp.einsum("rs,snh->rnh", a.T @ a, b, precision="highest")
  base = jnp.sum(w * w, axis=1)
  cross, gram = jnp.sum(b * u, axis=0), jnp.sum(b * gb, axis=0)
  sq = base + 2 * scale * cross + scale * scale * gram
  bound = base + 2 * abs(scale) * jnp.sum(jnp.abs(b * u), axis=0) + scale**2 * jnp.sum(
      jnp.abs(b * gb), axis=0)
  return sq.reshape(-1), bound.reshape(-1)


def _einsum_layer(key, n, d, h, rank, scale):
  w2, a, b2 = cancelling_layer(key, d, n * h, rank, scale)
  w = jnp.transpose(w2.reshape(d, n, h), (1, 0, 2))  # [N, D, H]
  return w, a, b2.reshape(rank, n, h)


@pytest.mark.parametrize("loop", [True, False])
def test_refine_cancelled_in_another_layout(fresh_key, loop):
  """A caller with its own layout passes its terms and a gather of K columns.
  ``loop=True`` refines every flagged column in rounds of K, and where nothing
  cancels returns ``sq`` bit for bit without calling the gather at all;
  ``loop=False`` runs one round: exactly the K most cancelled are replaced,
  the rest kept."""
  n, d, h, rank, scale, k = 3, 41, 7, 4, 0.8, 5
  w, a, b = _einsum_layer(fresh_key(), n, d, h, rank, scale)
  sq, bound = jax.jit(_einsum_norm_terms, static_argnums=3)(w, a, b, scale)
  calls = []

  def exact_sq_columns(idx):
    assert idx.shape == (k,) and idx.dtype == jnp.int32
    jax.debug.callback(lambda i: calls.append(np.asarray(i)), idx)
    ni, hi = idx // h, idx % h
    v = w[ni, :, hi] + scale * jnp.einsum("dr,rk->kd", a, b[:, ni, hi], precision="highest")
    return jnp.sum(v * v, axis=1)

  refine = jax.jit(lambda s, bd: norm_lib.refine_cancelled(s, bd, exact_sq_columns, columns=k,
                                                           loop=loop))
  out = refine(sq, bound)
  jax.effects_barrier()
  expected = exact_norm(*(np.asarray(v) for v in (
      jnp.transpose(w, (1, 0, 2)).reshape(d, n * h), a, b.reshape(rank, n * h))), scale) ** 2
  flagged = np.asarray(norm_lib.cancelled_columns(sq, bound))
  assert flagged.sum() > k  # more than one round's worth
  assert all(len(set(c.tolist())) == k for c in calls)  # distinct indices
  rel = np.abs(f64(out) - expected) / expected
  if loop:
    assert len(calls) == -(-flagged.sum() // k)
    assert rel.max() <= 2 * TOL  # squared norms: twice the norm's bound
    calls.clear()
    settled = jnp.asarray(expected, jnp.float32)  # sq = bound: nothing cancels
    np.testing.assert_array_equal(refine(settled, settled), settled)
    jax.effects_barrier()
    assert calls == []
  else:
    assert len(calls) == 1
    worst = np.argsort(f64(sq) / f64(bound))[:k]  # the most cancelled
    changed = np.flatnonzero(f64(out) != f64(sq))
    assert set(changed) <= set(worst) and rel[worst].max() <= 2 * TOL
    kept = np.setdiff1d(np.arange(n * h), worst)
    np.testing.assert_array_equal(out[kept], sq[kept])


def test_refine_cancelled_checks_its_arguments():
  sq = jnp.ones(4)
  with pytest.raises(ValueError, match="same shape|one shape"):
    norm_lib.refine_cancelled(sq, jnp.ones(3), lambda i: sq[i])
  with pytest.raises(ValueError, match="columns"):
    norm_lib.refine_cancelled(sq, sq, lambda i: sq[i], columns=0)
  with pytest.raises(ValueError, match=r"shape \(2,\)"):
    norm_lib.refine_cancelled(sq.at[0].set(-1.0), sq, lambda i: jnp.ones(3), columns=2)
  with pytest.raises(ValueError, match="refine"):
    dora_jax.factored_norm(jnp.ones((4, 3)), jnp.ones((4, 1)), jnp.ones((1, 3)), 1.0,
                           refine="dense")


def test_refinement_adds_no_pass_over_the_kernel():
  """Outside the refinement, the kernel feeds exactly what it feeds without
  refinement (U = aᵀW and ‖W‖²). The only new consumer is, off the GPU, the
  loop, whose body (a gather of K columns) runs once per round of flagged
  columns; on a GPU (one round, no loop) the gather of K columns itself."""

  def consumers(refine):
    jaxpr = jax.make_jaxpr(lambda w, a, b: dora_jax.factored_norm(w, a, b, 1.0, refine=refine))(
        jnp.ones((96, 160)), jnp.ones((96, 8)), jnp.ones((8, 160)))
    (call,) = [e for e in jaxpr.jaxpr.eqns if "jaxpr" in e.params]
    inner = call.params["jaxpr"].jaxpr
    w = inner.invars[0]
    return [e for e in inner.eqns if w in e.invars]

  plain, refined = consumers("off"), consumers("columns")
  names = lambda eqns: sorted(e.primitive.name for e in eqns)
  assert len(refined) == len(plain) + 1, (names(plain), names(refined))
  if not GPU:
    assert sorted(names(plain) + ["while"]) == names(refined)
  else:  # the new consumer reads [d_in, K] of W, K = REFINE_COLUMNS
    gathered = (96, norm_lib.REFINE_COLUMNS)
    out_shapes = lambda eqns: {tuple(v.aval.shape) for e in eqns for v in e.outvars}
    assert gathered in out_shapes(refined) and gathered not in out_shapes(plain)


def test_gradients_follow_the_factored_terms(fresh_key):
  """The refinement changes values, not the function: reverse mode runs
  through the default path (the loop off the GPU, the kernel on it; neither
  takes tangents) and gives the factored sum's gradients, finite, and
  through the columns the refinement leaves alone equal to float64's."""
  scale = 0.7
  w, a, b = cancelling_layer(fresh_key(), 40, 27, 3, scale)
  flagged = cancellation_ratio(w, a, b, scale) < 0.5  # all the refinement may touch
  cot = jnp.asarray(np.where(flagged, 0.0, 1.0 + np.arange(27) / 27), jnp.float32)

  loss = lambda a, b: jnp.sum(dora_jax.factored_norm(w, a, b, scale) * cot)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(a, b)

  with jax.enable_x64(True):
    exact = jax.grad(lambda a, b: jnp.sum(jnp.linalg.norm(
        f64(w) + scale * a @ b, axis=0) * f64(cot)), argnums=(0, 1))(f64(a), f64(b))
  for got, want in zip(grads, exact):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(f64(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_vmapped_adapters_are_refined(fresh_key):
  """Stacked adapters under ``vmap``: the loop runs until every member is done."""
  keys = jax.random.split(fresh_key(), 2)
  layers = [cancelling_layer(k, 33, 30, 3, 1.1, ratios=RATIOS[i:] + RATIOS[:i])
            for i, k in enumerate(keys)]
  w, a, b = (jnp.stack(v) for v in zip(*layers))
  norms = jax.jit(jax.vmap(lambda *v: dora_jax.factored_norm(*v, 1.1)))(w, a, b)
  for norm, layer in zip(norms, layers):
    assert column_errors(norm, exact_norm(*layer, 1.1)).max() <= TOL

"""The fused kernels per shard on 8 devices: parity, HLO, fallbacks (kernels.partition).

Needs 8 devices, so ``tests/test_mesh_kernels.py`` runs this module in one
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``. By hand::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m pytest tests/scripts/mesh_kernel_checks.py -q

Layouts on a ``4 × 2`` ``('fsdp', 'tp')`` mesh (``kernel [d_in, d_out]``), the
adapters placed by :func:`dora_jax.sharding.adapter_partition_specs`:

* column: kernel ``P(None, 'tp')``, activations ``P('fsdp', None)``.
* row: kernel ``P('tp', None)``, activations ``P('fsdp', 'tp')``.
* fsdp: kernel ``P('fsdp', None)``, activations ``P('fsdp', None)``.
* fsdp_tp: kernel ``P('fsdp', 'tp')``, activations ``P('fsdp', None)``.

References: the same backend on one device (float32: rel err < 1e-5, the
partial sums over a split ``d_in`` reorder float32 additions only), and for
bf16 (``"mosaic"``) the float64 composition, within twice the one-device
run's own error plus 1e-3.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import dora_jax
from dora_jax import sharding as dsh
from dora_jax.kernels import dispatch, partition

if jax.device_count() < 8:
  pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
              allow_module_level=True)

RTOL = 1e-5
T, D_IN, D_OUT, RANK = 16, 48, 40, 4


class Layout(NamedTuple):
  kernel: P
  x: P


LAYOUTS = {
    "column": Layout(P(None, "tp"), P("fsdp", None)),
    "row": Layout(P("tp", None), P("fsdp", "tp")),
    "fsdp": Layout(P("fsdp", None), P("fsdp", None)),
    "fsdp_tp": Layout(P("fsdp", "tp"), P("fsdp", None)),
}


def mesh_8():
  return dsh.make_mesh((4, 2), ("fsdp", "tp"))


def rel_err(got, want) -> float:
  got = np.asarray(jax.device_get(got), np.float64)
  want = np.asarray(jax.device_get(want), np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def make_inputs(seed: int, tokens=T, d_in=D_IN, d_out=D_OUT, rank=RANK, dtype=jnp.float32):
  """Fresh random ``(x, params, frozen, target)``: non-zero ``lora_b``, magnitudes off the norms."""
  k = jax.random.split(jax.random.key(seed), 7)
  w = jax.random.normal(k[1], (d_in, d_out)) / math.sqrt(d_in)
  params = {"lora_a": jax.random.normal(k[2], (d_in, rank)) / math.sqrt(d_in),
            "lora_b": 0.3 * jax.random.normal(k[3], (rank, d_out)),
            "magnitude": jnp.linalg.norm(w, axis=0) * (1 + 0.2 * jax.random.normal(k[4], (d_out,))),
            "bias": 0.1 * jax.random.normal(k[5], (d_out,))}
  x = jax.random.normal(k[0], (tokens, d_in))
  target = jax.random.normal(k[6], (tokens, d_out))
  cast = lambda v: v.astype(dtype)
  return cast(x), {n: (cast(v) if n.startswith("lora") else v) for n, v in params.items()}, \
      cast(w), target


def place(mesh, layout: Layout, x, params, w, target):
  specs = dsh.adapter_partition_specs(layout.kernel)
  specs["bias"] = specs["magnitude"]
  put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
  return (put(x, layout.x), {n: put(v, specs[n]) for n, v in params.items()}, put(w, layout.kernel),
          put(target, P(layout.x[0], None)))


def train(backend: str, x, params, w, target, mesh=None, steps=2):
  """Forward and adapter gradients at the start, then the params after ``steps`` AdamW steps."""
  tx = optax.adamw(1e-2, weight_decay=0.1)

  def loss_fn(params, x, w, target):
    y = dora_jax.dora_dense(x, w, params["lora_a"], params["lora_b"], params["magnitude"], 2.0,
                            params["bias"], backend=backend)
    return jnp.mean((y - target) ** 2), y

  @jax.jit
  def step(params, opt_state, x, w, target):
    (_, y), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, w, target)
    dx = jax.grad(lambda x: loss_fn(params, x, w, target)[0])(x)
    updates, opt_state = tx.update(grads, opt_state, params)
    return y, grads, dx, optax.apply_updates(params, updates), opt_state

  ctx = jax.set_mesh(mesh) if mesh is not None else _null()
  with ctx:
    opt_state = tx.init(params)
    compiled = step.lower(params, opt_state, x, w, target).compile()
    y, grads, dx, params, opt_state = compiled(params, opt_state, x, w, target)
    for _ in range(steps - 1):
      _, _, _, params, opt_state = compiled(params, opt_state, x, w, target)
  return (y, grads, dx, params), compiled.as_text()


class _null:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


def kernel_names(hlo: str) -> set[str]:
  """The Pallas kernels (``dora_*`` names) whose lowering the compiled program holds."""
  return set(re.findall(r'op_name="[^"]*?(dora_[a-z_]+?)(?:/|")', hlo))


def kernel_sized_gathers(hlo: str, elements: int) -> list:
  return [c for c in dsh.collectives(hlo) if c.op == "all-gather" and c.elements >= elements]


def base_step_hlo(mesh, layout: Layout) -> str:
  """The frozen base layer's step (``x·W + bias``, the bias trained): its own gathers."""
  x, params, w, target = place(mesh, layout, *make_inputs(0))

  @jax.jit
  def step(bias, x, w, target):
    return jax.grad(lambda b: jnp.mean((x @ w + b - target) ** 2))(bias)

  with jax.set_mesh(mesh):
    return step.lower(params["bias"], x, w, target).compile().as_text()


@functools.lru_cache(maxsize=None)
def one_device_run(seed: int):
  inputs = make_inputs(seed)
  return inputs, train("pallas", *(jax.device_put(v, jax.devices()[0]) for v in inputs))[0]


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pallas_per_shard_matches_one_device(name):
  layout, mesh = LAYOUTS[name], mesh_8()
  inputs, want = one_device_run(11)
  got, hlo = train("pallas", *place(mesh, layout, *inputs), mesh=mesh)
  for what, g, w in zip(("forward", "grads", "dx", "params after 2 AdamW steps"), got, want):
    for gl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      assert rel_err(gl, wl) < RTOL, (name, what, rel_err(gl, wl))
  # the kernels run inside the partitioned program, on each device's blocks
  assert "dora_dual_matmul" in kernel_names(hlo), kernel_names(hlo)
  assert "CustomSPMDPartitioning" not in hlo
  shard = D_IN * D_OUT // math.prod(mesh.shape[a] for a in layout.kernel if a is not None)
  gathers = kernel_sized_gathers(hlo, shard)
  assert len(gathers) <= len(kernel_sized_gathers(base_step_hlo(mesh, layout), shard)), gathers
  if name in ("column", "row"):
    assert not gathers, gathers


def _norm_collectives(layout: Layout, mesh):
  """Collectives of the partitioned one-pass norm kernel (bf16, interpret mode)."""
  _, params, w, _ = place(mesh, layout, *make_inputs(3, dtype=jnp.bfloat16))
  f = jax.jit(lambda w, a, b: partition.column_norm(w, a, b, 2.0, interpret=True))
  with jax.set_mesh(mesh):
    compiled = f.lower(w, params["lora_a"], params["lora_b"]).compile()
    got = f(w, params["lora_a"], params["lora_b"])
  return dsh.collectives(compiled.as_text()), got, compiled.as_text(), (w, params)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_norm_kernel_per_shard_communication(name):
  layout, mesh = LAYOUTS[name], mesh_8()
  found, got, hlo, (w, params) = _norm_collectives(layout, mesh)
  assert "dora_column_norm" in kernel_names(hlo)
  one = [jax.device_put(v, jax.devices()[0]) for v in (w, params["lora_a"], params["lora_b"])]
  want = np.linalg.norm(np.asarray(one[0], np.float64) + 2.0 * np.asarray(one[1], np.float64)
                        @ np.asarray(one[2], np.float64), axis=0)
  assert rel_err(got, want) < 1e-5  # float32 accumulation of exact bf16 products
  if layout.kernel[0] is None:  # d_in whole on every device: no communication
    assert not found, found
  else:  # d_in split: the shards' sums of squares in one all-reduce of 2·d_out elements
    assert [c.op for c in found] == ["all-reduce"], found
    assert sum(math.prod(s) for c in found for s in c.shapes) <= 2 * D_OUT, found
  assert not kernel_sized_gathers(hlo, D_IN * RANK), found


def test_norm_kernel_row_split_at_huge_scales():
  """Row-split shards whose norms square past float32 (s = 1e19 .. 1e30, bf16
  weights: the kernel rescales those columns) combine finite and within 2e-6
  of float64, beside columns of ordinary size."""
  layout, mesh = LAYOUTS["row"], mesh_8()
  inputs = make_inputs(17, dtype=jnp.bfloat16)
  _, params, w, _ = place(mesh, layout, *inputs)
  one = [np.asarray(jax.device_put(v, jax.devices()[0]), np.float64)
         for v in (w, params["lora_a"], params["lora_b"])]
  b_small = jnp.asarray(params["lora_b"]).at[:, ::2].multiply(0)  # even columns: ‖W_j‖ only
  f = jax.jit(lambda w, a, b, s: partition.column_norm(w, a, b, s, interpret=True))
  for scale in (1e19, -1e20, 1e30):
    with jax.set_mesh(mesh):
      got = np.asarray(f(w, params["lora_a"], b_small, jnp.float32(scale)), np.float64)
    b64 = np.asarray(b_small, np.float64)
    want = np.linalg.norm(one[0] + scale * one[1] @ b64, axis=0)
    assert np.all(np.isfinite(got)), scale
    assert np.max(np.abs(got - want) / want) < 2e-6, (scale, np.max(np.abs(got - want) / want))


@pytest.mark.parametrize("name", ["column", "row", "fsdp"])
def test_factored_norm_communication(name):
  """The XLA norm of float32 calls, partitioned by GSPMD: one all-reduce of at most
  d_out + r·d_out + r² elements for a split d_in, none for column-parallel."""
  layout, mesh = LAYOUTS[name], mesh_8()
  _, params, w, _ = place(mesh, layout, *make_inputs(5))
  f = jax.jit(lambda w, a, b: dora_jax.factored_norm(w, a, b, 2.0, refine="off"))
  with jax.set_mesh(mesh):
    found = dsh.collectives(f.lower(w, params["lora_a"], params["lora_b"]).compile().as_text())
  if name == "column":
    assert not found, found
  else:
    assert [c.op for c in found] == ["all-reduce"], found
    assert sum(math.prod(s) for c in found for s in c.shapes) <= D_OUT + RANK * D_OUT + RANK ** 2


# -- "mosaic" (bf16 only; interpret mode) ------------------------------------------

M_RANK = 16


def _mosaic_run(mesh, layout, x, params, w, want_grads: bool):
  def f(params, x, w):
    y = dora_jax.dora_dense(x, w, params["lora_a"], params["lora_b"], params["magnitude"], 2.0,
                            backend="mosaic")
    return jnp.sum(y.astype(jnp.float32) * jnp.cos(jnp.arange(y.shape[1]))), y

  fn = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True) if want_grads else f)
  with (jax.set_mesh(mesh) if mesh is not None else _null()):
    return fn(params, x, w), fn.lower(params, x, w).compile().as_text()


def _float64_reference(x, params, w):
  x, w, a, b, m = (np.asarray(jax.device_get(v), np.float64) for v in
                   (x, w, params["lora_a"], params["lora_b"], params["magnitude"]))
  n = np.linalg.norm(w + 2.0 * a @ b, axis=0)
  return (m / n) * (x @ w + 2.0 * (x @ a) @ b)


@pytest.mark.parametrize("layout,tokens,d_in,d_out", [
    (Layout(P(None, "tp"), P(None, None)), 128, 64, 512),   # column: [64, 256] per shard
    (Layout(P("tp", None), P(None, "tp")), 128, 128, 256),  # row: [64, 256] per shard
    (LAYOUTS["fsdp"], 512, 64, 256),      # W gathered: [64, 256], 128 tokens per shard
    (LAYOUTS["fsdp_tp"], 512, 64, 512),   # W gathered over fsdp: [64, 256] per shard
], ids=["column", "row", "fsdp", "fsdp_tp"])
def test_mosaic_per_shard(layout, tokens, d_in, d_out):
  """Shards the Mosaic tiles divide (128 token rows per shard)."""
  mesh = mesh_8()
  x, params, w, _ = make_inputs(21, tokens, d_in, d_out, M_RANK, jnp.bfloat16)
  params.pop("bias")
  want = _float64_reference(x, params, w)
  one = [jax.device_put(v, jax.devices()[0]) for v in (x, params, w)]
  (_, y1), _ = _mosaic_run(None, layout, *one, want_grads=False)
  xs, ps, ws, _ = place(mesh, layout, x, {**params, "bias": params["magnitude"]}, w, x)
  ps.pop("bias")
  (_, y), hlo = _mosaic_run(mesh, layout, xs, ps, ws, want_grads=False)
  assert rel_err(y, want) <= 2 * rel_err(y1, want) + 1e-3, (rel_err(y, want), rel_err(y1, want))
  # Mosaic GPU's interpreter does not lower inside custom_partitioning (ordered
  # io_callbacks): its GEMMs run XLA per shard in interpret mode, the Pallas ones per shard
  assert "CustomSPMDPartitioning" not in hlo
  # forward + backward: the gradients as accurate as the one-device kernels'
  (_, g1), _ = _mosaic_run(None, layout, *one, want_grads=True)
  (_, g), hlo = _mosaic_run(mesh, layout, xs, ps, ws, want_grads=True)
  for gl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(g1), strict=True):
    assert rel_err(gl, wl) < 2e-2, rel_err(gl, wl)  # bf16 outputs: a few roundings apart
  assert "dora_scale_reduce" in kernel_names(hlo)


def test_mosaic_untileable_shard_runs_xla_per_shard(caplog):
  """Global tiles fit but one shard's do not (T/4 = 32 rows): XLA on each shard, logged once."""
  layout, mesh = LAYOUTS["column"], mesh_8()
  x, params, w, _ = make_inputs(4, 128, 64, 512, M_RANK, jnp.bfloat16)
  params.pop("bias")
  xs, ps, ws, _ = place(mesh, layout, x, {**params, "bias": params["magnitude"]}, w, x)
  ps.pop("bias")
  partition._tile_fallbacks_logged.clear()
  with caplog.at_level(logging.WARNING, logger="dora_jax"):
    (_, y), hlo = _mosaic_run(mesh, layout, xs, ps, ws, want_grads=False)
    _mosaic_run(mesh, layout, xs, ps, ws, want_grads=False)
  records = [r.getMessage() for r in caplog.records if "cannot tile one shard" in r.getMessage()]
  assert len(records) == 1, records
  assert "T=32" in records[0]
  assert "dora_matmul" not in " ".join(kernel_names(hlo))
  want = _float64_reference(x, params, w)
  assert rel_err(y, want) < 1e-2


# -- fallbacks, the op-level path, bad input ------------------------------------------

def test_no_rule_falls_back_to_xla_once(caplog):
  """d_out = 36 does not split over 8 devices: no partition rule, XLA, one log record."""
  layout, mesh = LAYOUTS["column"], mesh_8()
  x, params, w, _ = make_inputs(6, d_out=36)
  x = jax.device_put(x, NamedSharding(mesh, P("fsdp", None)))
  f = lambda x: dora_jax.dora_dense(x, w, params["lora_a"], params["lora_b"], params["magnitude"],
                                    2.0, backend="pallas")
  dispatch._fallbacks_logged.clear()
  with caplog.at_level(logging.INFO, logger="dora_jax"), jax.set_mesh(mesh):
    jaxpr = str(jax.make_jaxpr(f)(x))
    y = jax.jit(f)(x)
    jax.jit(lambda x: f(x) * 2)(x)
  assert "pallas_call" not in jaxpr and "custom_partitioning" not in jaxpr
  records = [r for r in caplog.records if "no partition rule" in r.getMessage()]
  assert len(records) == 1, [r.getMessage() for r in records]
  assert records[0].levelno == logging.WARNING
  assert "d_out=36 is not a multiple of the 8 devices" in records[0].getMessage()
  want = dora_jax.dora_dense(*(jax.device_put(v, jax.devices()[0]) for v in
                               (x, w, params["lora_a"], params["lora_b"], params["magnitude"])),
                             2.0, backend="xla")
  assert rel_err(y, want) < RTOL


def test_dora_einsum_uses_the_rules():
  """A multi-axis kernel [d_in, heads, head_dim] routes to dora_dense: kernels per shard."""
  mesh = mesh_8()
  x, params, w, _ = make_inputs(8)
  w3 = w.reshape(D_IN, 4, D_OUT // 4)
  b3 = params["lora_b"].reshape(RANK, 4, D_OUT // 4)
  m3 = params["magnitude"].reshape(4, D_OUT // 4)
  f = lambda x, w3, a, b3, m3: dora_jax.general.dora_einsum("td,dhk->thk", x, w3, a, b3, m3, 2.0,
                                                    backend="pallas")
  put = lambda v, s: jax.device_put(v, NamedSharding(mesh, s))
  args = (put(x, P("fsdp", None)), put(w3, P(None, "tp", None)), put(params["lora_a"], P()),
          put(b3, P(None, "tp", None)), put(m3, P("tp", None)))
  loss = jax.jit(jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(2, 3, 4)))
  with jax.set_mesh(mesh):
    y = jax.jit(f)(*args)
    grads = loss(*args)
    hlo = jax.jit(f).lower(*args).compile().as_text()
  assert "dora_dual_matmul" in kernel_names(hlo)
  one = [jax.device_put(v, jax.devices()[0]) for v in (x, w3, params["lora_a"], b3, m3)]
  assert rel_err(y, f(*one)) < RTOL
  for g, w_ in zip(grads, jax.grad(lambda *a: jnp.sum(jnp.sin(f(*a))), argnums=(2, 3, 4))(*one)):
    assert rel_err(g, w_) < RTOL


def test_bad_input_names_the_argument():
  with pytest.raises(ValueError, match="d_out must be a positive int"):
    partition.no_rule(16, 48, 0)
  with pytest.raises(TypeError, match="partitioned must be a bool"):
    dora_jax.backend.implementation("pallas", "yes")
  assert partition.layout_of(P("fsdp", None), P("fsdp", "tp")) == partition.Layout(
      tokens=("fsdp",), cols=("tp",), gathered=("fsdp",))
  assert partition.layout_of(P(None, "tp"), P("tp", None)) == partition.Layout(rows=("tp",))


def test_benchmark_smoke(tmp_path):
  import json
  import runpy
  import sys
  from pathlib import Path
  script = Path(__file__).resolve().parents[2] / "benchmarks" / "sharded_step.py"
  argv = sys.argv
  sys.argv = [str(script), "--smoke", "--out", str(tmp_path)]
  try:
    runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv = argv
  results = json.loads((tmp_path / "sharded_step.json").read_text())
  rows = results["results"]
  assert {r["impl"] for r in rows} == {"dora_kernels", "dora_xla", "lora"}
  assert {r["mesh"] for r in rows} == {"fsdp", "fsdp_tp"}
  for r in rows:
    assert r["step_ms_median"] > 0 and r["peak_bytes_per_device"] > 0, r
    assert len(r["step_ms"]) == results["config"]["timed"]

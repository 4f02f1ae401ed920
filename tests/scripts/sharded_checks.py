"""Sharded DoRA on 8 devices: parity with one device, HLO collectives, memory per device.

Needs 8 devices, so JAX must start with them: ``tests/test_sharding.py`` runs
this module in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (8 simulated CPU
devices). By hand::

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
      python -m pytest tests/scripts/sharded_checks.py -q

Layouts on a ``4 × 2`` ``('fsdp', 'tp')`` mesh (``kernel [d_in, d_out]``):

* column: kernel ``P(None, 'tp')``; activations batch-sharded over ``fsdp``.
* row: kernel ``P('tp', None)``; activations feature-sharded over ``tp``.
* fsdp: kernel ``P('fsdp', None)``; activations batch-sharded over ``fsdp``.
* fsdp_tp: kernel ``P('fsdp', 'tp')``.
* megatron (model tests only): up-projection column-, down-projection row-parallel.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import dora_jax
from dora_jax import sharding as dsh
from helpers import reference

if jax.device_count() < 8:
  pytest.skip("needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)",
              allow_module_level=True)

RTOL = 1e-5


class Layout(NamedTuple):
  up: tuple            # kernel spec of the first (or only) layer
  down: tuple          # kernel spec of the second layer
  x: P                 # activations [T, d_in] of the single-layer step
  expect: dict         # adapter specs of the first layer


LAYOUTS = {
    "column": Layout((None, "tp"), (None, "tp"), P("fsdp", None),
                     {"lora_a": P(None, None), "lora_b": P(None, "tp"), "magnitude": P("tp")}),
    "row": Layout(("tp", None), ("tp", None), P("fsdp", "tp"),
                  {"lora_a": P("tp", None), "lora_b": P(None, None), "magnitude": P(None)}),
    "fsdp": Layout(("fsdp", None), ("fsdp", None), P("fsdp", None),
                   {"lora_a": P("fsdp", None), "lora_b": P(None, None), "magnitude": P(None)}),
    "fsdp_tp": Layout(("fsdp", "tp"), ("tp", "fsdp"), P("fsdp", None),
                      {"lora_a": P("fsdp", None), "lora_b": P(None, "tp"), "magnitude": P("tp")}),
    "megatron": Layout((None, "tp"), ("tp", None), P("fsdp", None),
                       {"lora_a": P(None, None), "lora_b": P(None, "tp"), "magnitude": P("tp")}),
}
SINGLE_LAYER = ("column", "row", "fsdp", "fsdp_tp")


def mesh_8():
  return dsh.make_mesh((4, 2), ("fsdp", "tp"))


def mesh_1():
  return dsh.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])


def rel_err(got, want) -> float:
  """Relative L2 error in float64, on the host."""
  got = np.asarray(jax.device_get(got), np.float64)
  want = np.asarray(jax.device_get(want), np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _linear(d_in, d_out, spec, seed):
  init = nnx.with_partitioning(nnx.initializers.lecun_normal(), spec)
  bias_init = nnx.with_partitioning(nnx.initializers.normal(0.1), (spec[1],))
  return nnx.Linear(d_in, d_out, kernel_init=init, bias_init=bias_init, rngs=nnx.Rngs(seed))


class MLP(nnx.Module):
  """``down(gelu(up(x)))`` with partition-annotated kernels and biases."""

  def __init__(self, d_model: int, d_ff: int, layout: Layout):
    self.up = _linear(d_model, d_ff, layout.up, 0)
    self.down = _linear(d_ff, d_model, layout.down, 1)

  def __call__(self, x):
    return self.down(nnx.gelu(self.up(x)))


def _perturb(model):
  """Non-zero lora_b and magnitudes off the column norms, so every gradient is non-trivial."""
  for i, (_, layer) in enumerate(dora_jax.surgery.dora_layers(model)):
    k1, k2 = jax.random.split(jax.random.key(100 + i))
    layer.lora_b[...] = 0.2 * jax.random.normal(k1, layer.lora_b.shape)
    layer.magnitude[...] = layer.magnitude[...] * (1 + 0.1 * jax.random.normal(k2, layer.magnitude.shape))


def adapted_mlp(layout: Layout, d_model=64, d_ff=128, rank=4):
  with jax.set_mesh(mesh_1()):
    model = MLP(d_model, d_ff, layout)
  dora_jax.apply_dora(model, targets="up|down", rank=rank, alpha=8, rngs=nnx.Rngs(2))
  _perturb(model)
  return model


# -- sharding rules on a real model -------------------------------------------

@pytest.mark.parametrize("name", list(LAYOUTS))
def test_shard_model_places_adapters(name):
  layout = LAYOUTS[name]
  mesh = mesh_8()
  model = dsh.shard_model(adapted_mlp(layout), mesh)
  for var, want in layout.expect.items():
    arr = getattr(model.up, var)[...]
    assert arr.sharding.spec == want, (var, arr.sharding.spec, want)
    assert arr.sharding.mesh == mesh
  assert model.up.kernel[...].sharding.spec == P(*layout.up)
  # The optimizer's moments inherit the adapters' shardings.
  opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
  mu = opt.opt_state[0].mu
  assert mu["up"]["lora_b"][...].sharding.spec == layout.expect["lora_b"]


# -- parity with one device ------------------------------------------------------

def _train(model, mesh, x, y, steps=3):
  """``steps`` AdamW steps; also the forward and the adapter gradients before the first.

  One compiled program: each step returns its forward output and gradients.
  """

  @nnx.jit
  def step(model, optimizer, x, y):
    def loss_fn(model):
      out = model(x)
      return jnp.mean((out - y) ** 2), out

    (loss, out), grads = nnx.value_and_grad(
        loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam), has_aux=True)(model)
    optimizer.update(model, grads)
    dsh.constrain(model)
    dsh.constrain(optimizer)
    return loss, out, grads

  optimizer = dsh.shard_state(
      nnx.Optimizer(model, optax.adamw(1e-2, weight_decay=0.1), wrt=nnx.LoRAParam), mesh)
  with jax.set_mesh(mesh):
    results = [step(model, optimizer, x, y) for _ in range(steps)]
  losses = jnp.stack([jax.device_get(r[0]) for r in results])
  return results[0][1], results[0][2], losses, nnx.state(model, nnx.LoRAParam)


def same_sharding(arr, mesh, spec) -> bool:
  return arr.sharding.is_equivalent_to(NamedSharding(mesh, spec), arr.ndim)


@pytest.mark.parametrize("name", ["column", "row", "fsdp", "megatron"])
def test_sharded_training_matches_one_device(name):
  layout = LAYOUTS[name]
  mesh = mesh_8()
  ref_model = adapted_mlp(layout)
  model = dsh.shard_model(nnx.clone(ref_model), mesh)
  dsh.shard_model(ref_model, mesh_1())
  kx, ky = jax.random.split(jax.random.key(7))
  x = jax.random.normal(kx, (8, 4, 64))
  y = jax.random.normal(ky, (8, 4, 64))
  xs = jax.device_put(x, NamedSharding(mesh, P("fsdp", None, None)))
  ys = jax.device_put(y, NamedSharding(mesh, P("fsdp", None, None)))

  want = _train(ref_model, mesh_1(), x, y)
  got = _train(model, mesh, xs, ys)
  names = ("forward", "grads", "losses", "params after AdamW")
  for what, g, w in zip(names, got, want):
    g_leaves, w_leaves = jax.tree.leaves(g), jax.tree.leaves(w)
    assert len(g_leaves) == len(w_leaves) > 0
    for gl, wl in zip(g_leaves, w_leaves):
      assert rel_err(gl, wl) < RTOL, (what, rel_err(gl, wl))
  # The adapters stayed where shard_model put them.
  for var, spec in layout.expect.items():
    assert same_sharding(getattr(model.up, var)[...], mesh, spec), var
  assert float(got[2][-1]) < float(got[2][0])


# -- the compiled program: collectives and products ------------------------------

D_IN, D_OUT, RANK, TOKENS = 512, 1024, 8, 64


def _single_layer(layout: Layout, mesh, *, adapted=True):
  with jax.set_mesh(mesh):
    base = _linear(D_IN, D_OUT, layout.up, 0)
  if not adapted:
    return base
  layer = dora_jax.nnx.DoRADense(base, rank=RANK, alpha=16, rngs=nnx.Rngs(1))
  _perturb(layer)
  return dsh.shard_model(layer, mesh)


def naive_dora(layer, x):
  """A naive port: the norm through the dense ``W + s·a·b`` (autodiff, detached norm)."""
  w, a, b = layer.kernel[...], layer.lora_a[...], layer.lora_b[...]
  n = jax.lax.stop_gradient(jnp.linalg.norm(w + layer.scale * (a @ b), axis=0))
  pre = x @ w + layer.scale * ((x @ a) @ b)
  return layer.magnitude[...] / n * pre + layer.bias[...]


def compiled_step(layout: Layout, mesh, *, impl="dora"):
  """Compile one training step (loss, grads, AdamW) of a single layer on ``mesh``.

  ``impl``: ``"dora"`` (the library), ``"naive"`` (:func:`naive_dora`) or
  ``"base"`` (the plain frozen ``nnx.Linear``, training its bias only).
  """
  layer = _single_layer(layout, mesh, adapted=impl != "base")
  if impl == "base":
    dsh.shard_state(layer, mesh)
  wrt = nnx.LoRAParam if impl != "base" else nnx.PathContains("bias")
  graphdef, params, rest = nnx.split(layer, wrt, ...)
  tx = optax.adamw(1e-3)
  opt_state = tx.init(params)
  x = jax.device_put(jnp.ones((TOKENS, D_IN)), NamedSharding(mesh, layout.x))
  y = jax.device_put(jnp.ones((TOKENS, D_OUT)), NamedSharding(mesh, P(layout.x[0], None)))

  def step(params, rest, opt_state, x, y):
    def loss_fn(params):
      model = nnx.merge(graphdef, params, rest)
      out = naive_dora(model, x) if impl == "naive" else model(x)
      return jnp.mean((out - y) ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(mesh):
    return jax.jit(step).lower(params, rest, opt_state, x, y).compile()


@functools.lru_cache(maxsize=None)
def base_step_hlo(name: str) -> str:
  """HLO of the plain frozen layer's step (what the layout costs without adapters)."""
  return compiled_step(LAYOUTS[name], mesh_8(), impl="base").as_text()


def kernel_shard_elements(layout: Layout, mesh) -> int:
  shards = math.prod(mesh.shape[a] for a in layout.up if a is not None)
  return D_IN * D_OUT // shards


def weight_gathers(hlo: str, min_elements: int) -> list:
  return [c for c in dsh.collectives(hlo) if c.op == "all-gather" and c.elements >= min_elements]


def dense_products(hlo: str, min_elements: int) -> list:
  return [p for p in dsh.products(hlo) if p.elements >= min_elements]


def check_no_dense_traffic(layout: Layout, mesh, hlo: str, base_hlo: str) -> None:
  """The HLO assertions: no all-gather of a kernel-sized value beyond the base layer's
  own (FSDP gathers ``W`` for ``x·W``; column/row-parallel layers gather nothing that
  large), none of ``d_in·d_out`` elements outside FSDP layouts, and no matmul whose
  per-device result is as large as the local kernel shard (a dense ``a·b``)."""
  shard = kernel_shard_elements(layout, mesh)
  gathers = weight_gathers(hlo, shard)
  assert len(gathers) <= len(weight_gathers(base_hlo, shard)), gathers
  if "fsdp" not in layout.up:
    assert not weight_gathers(hlo, D_IN * D_OUT), weight_gathers(hlo, D_IN * D_OUT)
  big = dense_products(hlo, shard)
  assert not big, big


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_step_hlo_has_no_dense_gather_or_product(name):
  layout, mesh = LAYOUTS[name], mesh_8()
  hlo = compiled_step(layout, mesh).as_text()
  base_hlo = base_step_hlo(name)
  check_no_dense_traffic(layout, mesh, hlo, base_hlo)
  # The norm's reduction over d_in: small all-reduces only (O(d_out·r + r²) elements
  # apiece, activation-sized ones aside).
  for c in dsh.collectives(hlo):
    if c.op != "all-gather":
      assert c.elements <= max(TOKENS * D_OUT, (RANK + 1) * D_OUT + RANK * RANK), c


@pytest.mark.parametrize("name", ["row", "fsdp"])
def test_hlo_assertion_catches_naive_dora(name):
  layout, mesh = LAYOUTS[name], mesh_8()
  hlo = compiled_step(layout, mesh, impl="naive").as_text()
  base_hlo = base_step_hlo(name)
  with pytest.raises(AssertionError):
    check_no_dense_traffic(layout, mesh, hlo, base_hlo)
  assert dense_products(hlo, kernel_shard_elements(layout, mesh))


@pytest.mark.parametrize("name", SINGLE_LAYER)
def test_norm_alone_reduces_with_one_small_all_reduce(name):
  layout, mesh = LAYOUTS[name], mesh_8()
  layer = _single_layer(layout, mesh)
  w, a, b = layer.kernel[...], layer.lora_a[...], layer.lora_b[...]
  norm = lambda refine: jax.jit(lambda w, a, b: dora_jax.factored_norm(w, a, b, 2.0, refine=refine))
  with jax.set_mesh(mesh):
    hlo = norm("off").lower(w, a, b).compile().as_text()
    refined = norm("auto").lower(w, a, b).compile().as_text()
    naive = jax.jit(lambda w, a, b: reference.dense_norm_jax(w, a, b, 2.0)).lower(w, a, b).compile().as_text()
  found = dsh.collectives(hlo)
  assert all(c.op == "all-reduce" for c in found), found
  total = sum(math.prod(s) for c in found for s in c.shapes)
  assert total <= D_OUT + RANK * D_OUT + RANK * RANK, found
  if "tp" in layout.up[:1] or "fsdp" in layout.up[:1]:
    assert len(found) == 1  # d_in split: ‖W‖², aᵀW, aᵀa combined into one all-reduce
  shard = kernel_shard_elements(layout, mesh)
  assert not dense_products(hlo, shard)
  assert dense_products(naive, shard)
  # the cancelled-columns refinement: its gathered columns and small collectives only
  k = dora_jax.norm.REFINE_COLUMNS
  for c in dsh.collectives(refined):
    assert c.elements <= max(D_OUT, D_IN * k, (RANK + 1) * D_OUT + RANK * RANK), c
  assert not dense_products(refined, shard)


# -- per-device memory ------------------------------------------------------------

MEM_D, MEM_RANK, MEM_TOKENS = 4096, 8, 16


def step_memory(n: int, kernel_spec: tuple, x_spec: P) -> int:
  """Argument + temp bytes per device of a DoRA training step (loss, adapter grads,
  AdamW) on an ``n``-device mesh, adapters placed by :func:`adapter_partition_specs`.

  Compiled from abstract arrays: nothing is allocated.
  """
  mesh = dsh.make_mesh((n,), ("tp",), devices=jax.devices()[:n])
  specs = dsh.adapter_partition_specs(kernel_spec)

  def abstract(shape, spec):
    return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=NamedSharding(mesh, spec))

  params = {"lora_a": abstract((MEM_D, MEM_RANK), specs["lora_a"]),
            "lora_b": abstract((MEM_RANK, MEM_D), specs["lora_b"]),
            "magnitude": abstract((MEM_D,), specs["magnitude"])}
  kernel = abstract((MEM_D, MEM_D), P(*kernel_spec))
  bias = abstract((MEM_D,), P(kernel_spec[1]))
  x = abstract((MEM_TOKENS, MEM_D), x_spec)
  tx = optax.adamw(1e-3)

  def step(params, opt_state, kernel, bias, x):
    def loss_fn(p):
      y = dora_jax.dora_dense(x, kernel, p["lora_a"], p["lora_b"], p["magnitude"], 2.0, bias)
      return jnp.mean(y ** 2)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return loss, optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(mesh):
    opt_state = _opt_like(jax.eval_shape(tx.init, params), params)
    stats = jax.jit(step).lower(params, opt_state, kernel, bias, x).compile().memory_analysis()
  return stats.argument_size_in_bytes + stats.temp_size_in_bytes


def _opt_like(opt_state, params):
  """Give AdamW's moments the shardings of the params of the same (distinct) shapes."""
  by_shape = {p.shape: p.sharding for p in jax.tree.leaves(params)}
  assert len(by_shape) == len(jax.tree.leaves(params))
  return jax.tree.map(
      lambda o: jax.ShapeDtypeStruct(o.shape, o.dtype, sharding=by_shape.get(o.shape)), opt_state)


@pytest.mark.parametrize("name,kernel_spec,x_spec", [
    ("column", (None, "tp"), P(None, None)),
    ("row", ("tp", None), P(None, "tp")),
])
def test_memory_per_device_falls_as_one_over_n(name, kernel_spec, x_spec, record_property):
  mem = {n: step_memory(n, kernel_spec, x_spec) for n in (1, 2, 4, 8)}
  record_property("memory_bytes", repr(mem))
  print(f"{name}: " + ", ".join(f"N={n}: {b / 2**20:.2f} MiB" for n, b in mem.items()))
  for n in (2, 4, 8):
    assert mem[n] <= 1.25 * mem[1] / n, (n, mem)


# -- the Pallas path under a mesh -----------------------------------------------

def _has_pallas(fn, *args) -> bool:
  return "pallas_call" in str(jax.make_jaxpr(fn)(*args))


def test_pallas_falls_back_to_xla_under_a_mesh_once(caplog):
  """12 tokens do not split over 8 devices: no partition rule (kernels.partition), XLA."""
  from dora_jax.kernels import dispatch
  mesh = mesh_8()
  layer = _single_layer(LAYOUTS["column"], mesh)
  w, a, b, m = (layer.kernel[...], layer.lora_a[...], layer.lora_b[...], layer.magnitude[...])
  x = jax.device_put(jax.random.normal(jax.random.key(0), (12, D_IN)), NamedSharding(mesh, P("fsdp", None)))
  f = lambda x, w, a, b, m: dora_jax.dora_dense(x, w, a, b, m, 2.0, backend="pallas")
  g = lambda x, w, a, b, m: dora_jax.dora_dense(x, w, a, b, m, 2.0, backend="xla")
  dispatch._fallbacks_logged.clear()
  with caplog.at_level(logging.INFO, logger="dora_jax"), jax.set_mesh(mesh):
    assert not _has_pallas(f, x, w, a, b, m)
    y = jax.jit(f)(x, w, a, b, m)
    y_xla = jax.jit(g)(x, w, a, b, m)
    y_eager = f(x, w, a, b, m)  # concrete sharded arrays: detected too
  records = [r for r in caplog.records if r.name == "dora_jax" and "Pallas" in r.getMessage()]
  assert len(records) == 1, [r.getMessage() for r in records]
  assert records[0].levelno == logging.WARNING
  assert rel_err(y, y_xla) < RTOL and rel_err(y_eager, y_xla) < RTOL
  # Concrete sharded inputs outside any mesh context are detected as well.
  assert dispatch.partitioned_reason(w) is not None
  # One device, no mesh: Pallas stays.
  w1, a1, b1, m1, x1 = (jax.device_put(v, jax.devices()[0]) for v in (w, a, b, m, x))
  assert dispatch.partitioned_reason(x1, w1, a1, b1, m1) is None
  assert _has_pallas(f, x1, w1, a1, b1, m1)


def test_pallas_runs_per_shard_inside_shard_map():
  """Column-parallel blocks are independent DoRA layers: Pallas inside shard_map, no psum."""
  mesh = mesh_8()
  layer = _single_layer(LAYOUTS["column"], mesh)
  w, a, b, m = (layer.kernel[...], layer.lora_a[...], layer.lora_b[...], layer.magnitude[...])
  x = jax.device_put(jax.random.normal(jax.random.key(0), (16, D_IN)), NamedSharding(mesh, P("fsdp", None)))

  def local(x, w, a, b, m):
    return dora_jax.dora_dense(x, w, a, b, m, 2.0, backend="pallas")

  sharded = jax.shard_map(local, mesh=mesh, check_vma=False,
                          in_specs=(P("fsdp", None), P(None, "tp"), P(None, None), P(None, "tp"), P("tp")),
                          out_specs=P("fsdp", "tp"))
  with jax.set_mesh(mesh):
    assert _has_pallas(sharded, x, w, a, b, m)
    y = jax.jit(sharded)(x, w, a, b, m)
  want = dora_jax.dora_dense(*(jax.device_put(v, jax.devices()[0]) for v in (x, w, a, b, m)), 2.0,
                             backend="xla")
  assert rel_err(y, want) < RTOL


# -- the example -----------------------------------------------------------------

def test_sharded_finetune_example(capsys, monkeypatch):
  import runpy
  from pathlib import Path
  example = Path(__file__).resolve().parents[2] / "examples" / "sharded_finetune.py"
  monkeypatch.setattr("sys.argv", [str(example), "--steps", "6", "--d-model", "64", "--d-ff",
                                   "128", "--batch", "16", "--seq", "8", "--lr", "1e-2"])
  runpy.run_path(str(example), run_name="__main__")
  out = capsys.readouterr().out
  assert "mesh {'fsdp': 4, 'tp': 2}" in out, out
  assert "lora_b P(None, 'tp')" in out, out
  losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step ")]
  assert len(losses) == 6 and losses[-1] < losses[0], out
  assert "median step time" in out

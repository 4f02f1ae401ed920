"""Sharding rules, HLO diagnostics, and the 8-device checks (run in a subprocess).

The multi-device checks live in ``tests/scripts/sharded_checks.py``: JAX must start
with 8 (simulated CPU) devices, which this process cannot do once JAX is up,
so they run once in a fresh interpreter and each group below asserts on its
results.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import dora_jax
from dora_jax import sharding as dsh
from dora_jax.kernels import dispatch
from helpers.eight_devices import eight_device_tests



# -- adapter_partition_specs ----------------------------------------------------

@pytest.mark.parametrize("kernel,lora_a,lora_b,magnitude", [
    (P(None, "tp"), P(None, None), P(None, "tp"), P("tp")),            # column-parallel
    (P("tp", None), P("tp", None), P(None, None), P(None)),            # row-parallel
    (P("fsdp", None), P("fsdp", None), P(None, None), P(None)),        # FSDP
    (P("fsdp", "tp"), P("fsdp", None), P(None, "tp"), P("tp")),        # FSDP × TP
    (P(("fsdp", "dp"), "tp"), P(("fsdp", "dp"), None), P(None, "tp"), P("tp")),
    (P(), P(None, None), P(None, None), P(None)),                      # replicated
    (None, P(None, None), P(None, None), P(None)),
    (P("tp"), P("tp", None), P(None, None), P(None)),                  # trailing None omitted
])
def test_adapter_specs_follow_the_kernel(kernel, lora_a, lora_b, magnitude):
  specs = dsh.adapter_partition_specs(kernel)
  assert specs == {"lora_a": lora_a, "lora_b": lora_b, "magnitude": magnitude}


def test_adapter_specs_multi_dim_and_logical_names():
  # LinearGeneral kernel [heads, head_dim, d_model] contracted over (heads, head_dim).
  specs = dsh.adapter_partition_specs(("heads", None, "embed"), in_ndim=2)
  assert specs == {"lora_a": P("heads", None, None), "lora_b": P(None, "embed"),
                   "magnitude": P("embed")}
  # Q projection [d_model, heads, head_dim]: outputs (heads, head_dim).
  specs = dsh.adapter_partition_specs(P("embed", "heads"), in_ndim=1, out_ndim=2)
  assert specs == {"lora_a": P("embed", None), "lora_b": P(None, "heads", None),
                   "magnitude": P("heads", None)}
  with pytest.raises(ValueError, match="more entries"):
    dsh.adapter_partition_specs(P("a", "b", "c"), in_ndim=1, out_ndim=1)
  with pytest.raises(ValueError):
    dsh.adapter_partition_specs(P("a"), in_ndim=0)


def _annotated_model(mesh):
  with jax.set_mesh(mesh):
    init = nnx.initializers.lecun_normal()
    model = nnx.Sequential(
        nnx.Linear(16, 32, kernel_init=nnx.with_partitioning(init, ("fsdp", "tp")), rngs=nnx.Rngs(0)),
        nnx.Linear(32, 16, kernel_init=nnx.with_partitioning(init, ("tp", "fsdp")), rngs=nnx.Rngs(1)),
        nnx.Linear(16, 16, rngs=nnx.Rngs(2)))
  return dora_jax.apply_dora(model, targets=r"layers/\d+", rank=4, alpha=8, rngs=nnx.Rngs(3))


def test_annotate_and_shard_model_on_one_device():
  mesh = dsh.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  model = _annotated_model(mesh)
  dora_jax.cache_base_norms(model)
  x = jax.random.normal(jax.random.key(0), (4, 16))
  before = model(x)
  found = dsh.annotate_adapters(model, mesh)
  assert found["layers/0"]["base_sq_norm"] == P("tp")
  assert found["layers/0"]["lora_b"] == P(None, "tp")
  assert found["layers/1"]["lora_a"] == P("tp", None)
  assert found["layers/1"]["magnitude"] == P("fsdp")
  assert found["layers/2"]["lora_a"] == P(None, None)       # unannotated kernel: replicated
  up = model.layers[0]
  assert up.lora_a.get_metadata()["out_sharding"] == ("fsdp", None)
  assert up.norm_cache.get_metadata()["out_sharding"] == ("tp",)
  assert nnx.get_partition_spec(up.lora_b).get_value() == P(None, "tp")
  dsh.shard_model(model, mesh)
  assert up.lora_b[...].sharding.mesh == mesh
  assert jnp.array_equal(model(x), before)


def test_shard_model_refuses_explicit_axes():
  mesh = jax.make_mesh((1,), ("tp",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:1])
  with pytest.raises(ValueError, match="AxisType.Auto"):
    dsh.check_mesh(mesh)


# -- HLO diagnostics ----------------------------------------------------------------

_HLO = """
ENTRY %main (p0: f32[128,1024], p1: f32[128,8]) -> f32[1024] {
  %all-gather = f32[512,1024]{1,0} all-gather(%p0), channel_id=4, replica_groups={{0,1,2,3}}, dimensions={0}
  %dot.11 = f32[128,1024]{1,0} dot(%p1, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %all-reduce.7 = (f32[1024]{0}, f32[8,1024]{1,0}, f32[8,8]{1,0}) all-reduce(%s, %dot, %dot.1), channel_id=1
  %ags = (f32[128,8]{1,0}, f32[512,8]{1,0}) all-gather-start(%p1), channel_id=5, dimensions={0}
  %cc = (f32[16,1024]{1,0}, s8[4194304]{0}) custom-call(%x, %w), custom_call_target="__cublas$gemm"
  %cv = f32[16,1024]{1,0} custom-call(%x), custom_call_target="SomethingElse"
  ROOT %rs = f32[256]{0} reduce-scatter(%q), channel_id=2, dimensions={0}
}
"""


def test_collectives_parser():
  found = dsh.collectives(_HLO)
  assert [(c.op, c.elements) for c in found] == [
      ("all-gather", 512 * 1024), ("all-reduce", 8 * 1024), ("all-gather", 512 * 8),
      ("reduce-scatter", 256)]
  assert found[1].shapes == ((1024,), (8, 1024), (8, 8))


def test_products_parser():
  assert dsh.products(_HLO) == [dsh.Product("dot.11", (128, 1024)), dsh.Product("cc", (16, 1024))]


def test_collectives_of_a_real_compile_on_one_device():
  f = jax.jit(lambda w, a, b: dora_jax.factored_norm(w, a, b, 0.5))
  args = (jnp.ones((64, 32)), jnp.ones((64, 4)), jnp.ones((4, 32)))
  text = f.lower(*args).compile().as_text()
  assert dsh.collectives(text) == []
  assert all(p.elements < 64 * 32 for p in dsh.products(text))


# -- Pallas fallback detection on one device ----------------------------------------

def test_partitioned_reason_single_device():
  x = jnp.ones((8, 16))
  assert dispatch.partitioned_reason(x, None) is None
  assert dispatch.placement("pallas", 8, (16, 4), x) == ("pallas", False)
  assert dispatch.placement("xla", 8, (16, 4), x) == ("xla", False)
  mesh = dsh.make_mesh((1,), ("tp",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):  # a one-device mesh splits nothing
    assert dispatch.partitioned_reason(x) is None


# -- the 8-device checks --------------------------------------------------------------

GROUPS = [
    "test_shard_model_places_adapters",
    "test_sharded_training_matches_one_device",
    "test_step_hlo_has_no_dense_gather_or_product",
    "test_hlo_assertion_catches_naive_dora",
    "test_norm_alone_reduces_with_one_small_all_reduce",
    "test_memory_per_device_falls_as_one_over_n",
    "test_pallas_falls_back_to_xla_under_a_mesh_once",
    "test_pallas_runs_per_shard_inside_shard_map",
    "test_sharded_finetune_example",
]


eight_device_run, test_on_eight_devices, test_eight_device_run_is_clean = eight_device_tests(
    "sharded_checks.py", GROUPS)


class _OwnWeight(nnx.Module):
  """A module whose own weight (sharding metadata given) enters ``fn(x, w)``."""

  def __init__(self, fn, value, sharding):
    self.fn = fn
    self.w = nnx.Param(value, out_sharding=sharding)

  def __call__(self, x):
    return self.fn(x, self.w[...])


class _Heads(nnx.Module):
  """Native layouts: an ``nnx.Einsum`` kernel ``[N, D, H]`` (heads split), a
  batched op-level weight ``[N, H, J]`` and a weight stored ``[out, in]``."""

  def __init__(self, rngs):
    init = nnx.initializers.lecun_normal()
    self.q = nnx.Einsum("btd,ndh->btnh", (4, 16, 8),
                        kernel_init=nnx.with_partitioning(init, ("tp", None, None)), rngs=rngs)
    self.batched = _OwnWeight(lambda q, w: jnp.einsum("btnh,nhj->btnj", q, w),
                              jax.random.normal(rngs.params(), (4, 8, 6)), ("tp", None, "fsdp"))
    self.rows = _OwnWeight(lambda x, w: jnp.einsum("btd,fd->btf", x, w),
                           jax.random.normal(rngs.params(), (12, 16)),
                           ("tp", None))

    self.rows_t = _OwnWeight(lambda x, w: jnp.einsum("btd,df->btf", x, w.T),
                             jax.random.normal(rngs.params(), (12, 16)), ("tp", None))
    self.reshaped = _OwnWeight(lambda x, w: jnp.einsum("btd,df->btf", x, w.reshape(16, 12)),
                               jax.random.normal(rngs.params(), (4, 4, 12)), ("fsdp", None, "tp"))

  def __call__(self, x):
    return self.batched(self.q(x)), self.rows(x), self.rows_t(x), self.reshaped(x)


def test_native_layout_adapter_specs():
  mesh = dsh.make_mesh((1, 1), ("fsdp", "tp"), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    model = _Heads(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 3, 16))
  dora_jax.apply_dora(model, targets="q|batched|rows|rows_t|reshaped", rank=2, alpha=4.0, rngs=nnx.Rngs(2),
                      example_inputs=(x,))
  found = dsh.annotate_adapters(model, mesh)
  q, batched, rows = found["q"], found["batched"], found["rows"]
  # "btd,ndh->btnh": C = (d,), O = (n, h)
  assert (q["lora_a"], q["lora_b"], q["magnitude"], q["norm_cache"]) == (
      P(None, None), P(None, "tp", None), P("tp", None), P("tp"))
  # "btnh,nhj->btnj": B = (n,), C = (h,), O = (j,)
  assert (batched["lora_a"], batched["lora_b"], batched["magnitude"], batched["norm_cache"]) == (
      P("tp", None, None), P("tp", None, "fsdp"), P("tp", "fsdp"), P("tp", "fsdp"))
  # "btd,fd->btf": stored [out, in] ("tp", None), C = (d,), O = (f,)
  assert (rows["lora_a"], rows["lora_b"], rows["magnitude"]) == (
      P(None, None), P(None, "tp"), P("tp"))
  # stored [out, in], transposed on its way into the op: the operand's [in, out] entries
  assert (found["rows_t"]["lora_b"], found["rows_t"]["magnitude"]) == (P(None, "tp"), P("tp"))
  # reshaped on its way: axes mixed, the adapters replicated
  assert (found["reshaped"]["lora_a"], found["reshaped"]["lora_b"]) == (P(None, None),
                                                                        P(None, None))
  before = model(x)
  dsh.shard_model(model, mesh)
  for got, want in zip(model(x), before):
    assert jnp.array_equal(got, want)

"""QDoRA: a training step over a quantized frozen base, and the frozen weights' memory.

  python benchmarks/qdora.py --out DIR                  # one NVIDIA GPU
  python benchmarks/qdora.py --out DIR --smoke          # tiny shapes, any machine
  python benchmarks/qdora.py --out DIR --memory-only    # the bytes-per-parameter table (CPU is fine)

One bias-free projection, bf16 activations and adapters, a training step
(gradients of ``Σ y ⊙ cot`` for the adapters and ``x``, as in a network):

  lora_bf16      plain JAX LoRA over the bf16 kernel (the floor)
  dora_bf16      dora_jax DoRA over the bf16 kernel (dora_einsum -> dora_dense, backend auto)
  qdora_<q>      dora_jax QDoRA over the kernel quantized to <q> (nf4, int8, fp8, ...)
  qlora_<q>      qwix's QLoRA over the same quantized base: qwix.dot_general on the
                 QArray of the same codes (what LoraProvider computes), + s·(x·a)·b

Time: median over batches of queued calls, inputs rotated (benchmarks/harness.py).
Memory: XLA's buffer assignment of the compiled step: ``temp`` (temporaries) and
``peak`` (arguments + outputs + temporaries − aliased), and ``frozen`` (the
base weight's bytes: codes and scales, or the bf16 kernel). ``rel_diff``:
QDoRA's output against DoRA over the dequantized bf16 weight.

The memory tables (``--memory-only``, also part of every run): the frozen
bytes per parameter of each type on Llama-3-8B's seven projection shapes
(one decoder layer), from the ``nbytes`` of the arrays quantize_kernel returns;
and a whole model: the tiny Llama of ``examples/finetune_llama.py`` (bf16) after
``apply_dora(..., base_dtype=q)`` on its seven projections per layer, the bytes
of the arrays the model holds (projections, everything frozen, adapters) and of
all live JAX arrays after garbage collection (nothing of the float kernels left).

Writes ``DIR/qdora.json`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
from dora_jax import general, quantized  # noqa: E402

SCALE = 2.0
SPEC = "td,df->tf"
DN = (((1,), (0,)), ((), ()))
#: Llama-3-8B's projections (hidden 4096, MLP 14336, GQA 32/8 heads of 128).
LLAMA3_8B = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
             "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
             "down_proj": (14336, 4096)}
SMOKE_LAYER = {"q_proj": (256, 256), "up_proj": (256, 512), "down_proj": (512, 256)}


def memory_table(shapes: dict, qtypes, block_size: int | None) -> list[dict]:
  """Measured bytes of one layer's frozen projections per type (real arrays)."""
  rows = []
  params = sum(math.prod(s) for s in shapes.values())
  key = jax.random.key(0)
  kernels = {name: (jax.random.normal(jax.random.fold_in(key, i), s) / s[0] ** 0.5
                    ).astype(jnp.bfloat16) for i, (name, s) in enumerate(shapes.items())}
  bf16 = sum(int(w.nbytes) for w in kernels.values())
  rows.append(dict(qtype="bf16", block_size=None, bytes=bf16, cache_bytes=0,
                   bytes_per_param=bf16 / params, with_cache_per_param=bf16 / params))
  for qtype in qtypes:
    block = block_size if qtype in ("nf4", "int4") else None
    weights = cache = 0
    for w in kernels.values():
      qk = quantized.quantize_kernel(w, qtype, block_size=block)
      jax.block_until_ready(qk)
      weights += int(qk.codes.nbytes) + int(qk.scale.nbytes)
      cache += int(qk.sq_norm.nbytes)
      del qk
    rows.append(dict(qtype=qtype, block_size=block or (64 if qtype in ("nf4", "int4") else None),
                     bytes=weights, cache_bytes=cache, bytes_per_param=weights / params,
                     with_cache_per_param=(weights + cache) / params))
  for row in rows:
    row["layer_mib"] = row["bytes"] / 2**20
    row["params"] = params
  return rows


def make_steps(qtypes):
  """``{impl: step(p, frozen, x, cot) -> (loss, (grads of p, dx))}``."""
  import qwix

  def dora(p, w, x):
    return general.dora_einsum(SPEC, x, w, p["a"], p["b"], p["m"], SCALE)

  def lora(p, w, x):
    return x @ w + SCALE * ((x @ p["a"]) @ p["b"])

  def qlora(p, qa, x):
    return qwix.dot_general(x, qa, DN) + SCALE * ((x @ p["a"]) @ p["b"])

  def step(forward):
    def loss(p, frozen, x, cot):
      return jnp.sum((forward(p, frozen, x) * cot).astype(jnp.float32))
    grad = jax.value_and_grad(loss, argnums=(0, 2))
    return jax.jit(grad)

  steps = {"lora_bf16": step(lora), "dora_bf16": step(dora)}
  for q in qtypes:
    steps[f"qdora_{q}"] = step(dora)
    steps[f"qlora_{q}"] = step(qlora)
  return steps


def compiled_memory(fn, *args) -> tuple[float, float]:
  """``(temp MiB, peak MiB)`` of ``fn``'s compiled program (XLA buffer assignment)."""
  m = fn.lower(*args).compile().memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
          - m.alias_size_in_bytes)
  return m.temp_size_in_bytes / 2**20, peak / 2**20


def run_shape(d_in, d_out, tokens, rank, qtypes, block_size, timing, key):
  k = jax.random.split(key, 8)
  dtype = jnp.bfloat16
  w = (jax.random.normal(k[0], (d_in, d_out)) / d_in ** 0.5).astype(dtype)
  qks = {q: quantized.quantize_kernel(w, q, block_size=block_size if q in ("nf4", "int4")
                                      else None) for q in qtypes}
  base = {"a": (jax.random.normal(k[1], (d_in, rank)) / d_in ** 0.5).astype(dtype),
          "b": (0.01 * jax.random.normal(k[2], (rank, d_out))).astype(dtype)}
  sets = [(jax.random.normal(jax.random.fold_in(k[3], i), (tokens, d_in)).astype(dtype),
           jax.random.normal(jax.random.fold_in(k[4], i), (tokens, d_out)).astype(dtype))
          for i in range(3)]
  steps = make_steps(qtypes)
  rows = []
  for impl, fn in steps.items():
    kind, _, q = impl.partition("_")
    if q in qks:
      qk = qks[q]
      if kind == "qdora":
        frozen = qk
        m = quantized.init_magnitude(qk, dtype)
      else:
        qa = qk.to_qarray()
        frozen = qa.replace(scale=qa.scale.astype(dtype))  # qwix dequantizes to the scale's dtype
        m = None
      frozen_bytes = qk.nbytes
    else:
      frozen, frozen_bytes = w, int(w.nbytes)
      m = jnp.sqrt(general.weight_sq_norm(w, general.einsum_layout(SPEC, (1, d_in), w.shape)))
    p = dict(base)
    if kind in ("dora", "qdora"):
      p["m"] = (m * (1 + 0.01 * jax.random.normal(k[5], m.shape))).astype(dtype)
    args = [(p, frozen, x, cot) for x, cot in sets]
    ms = harness.time_jitted(fn, args, **timing)
    temp, peak = compiled_memory(fn, *args[0])
    row = dict(impl=impl, d_in=d_in, d_out=d_out, tokens=tokens, rank=rank, ms=ms,
               temp_mib=temp, peak_mib=peak, frozen_mib=frozen_bytes / 2**20)
    if kind == "qdora":  # the same maths as DoRA over the dequantized weight
      y = general.dora_einsum(SPEC, sets[0][0], qk, p["a"], p["b"], p["m"], SCALE)
      y_ref = general.dora_einsum(SPEC, sets[0][0], qk.dequantize(), p["a"], p["b"], p["m"],
                                  SCALE)
      row["rel_diff"] = float(jnp.linalg.norm((y - y_ref).astype(jnp.float32))
                              / jnp.linalg.norm(y_ref.astype(jnp.float32)))
    rows.append(row)
    print(f"  {impl:<11} {d_in}x{d_out} T={tokens} r={rank}: {ms:8.3f} ms  temp {temp:9.1f} MiB"
          f"  peak {peak:9.1f} MiB  frozen {row['frozen_mib']:8.1f} MiB"
          + (f"  rel_diff {row['rel_diff']:.1e}" if "rel_diff" in row else ""), flush=True)
  return rows


#: The tiny Llama of examples/finetune_llama.py.
TINY_LLAMA = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


def _live_bytes() -> int:
  import gc
  gc.collect()
  return sum(int(a.nbytes) for a in jax.live_arrays())


def model_memory_table(qtypes, block_size: int | None, rank: int = 16) -> list[dict]:
  """Measured bytes of a tiny Llama (bf16) adapted with ``apply_dora(base_dtype=q)``."""
  from flax import nnx
  import dora_jax
  from dora_jax.models import ALL_PROJECTIONS, LlamaConfig, random_llama
  from dora_jax.nnx import quantize as nnx_quantize
  rows = []
  for qtype in [None, *qtypes]:
    model = random_llama(LlamaConfig(**TINY_LLAMA), dtype=jnp.bfloat16, seed=0)
    block = block_size if qtype in ("nf4", "int4") else None
    dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=rank, alpha=2.0 * rank,
                        rngs=nnx.Rngs(0), base_dtype=qtype, block_size=block)
    proj = proj_params = cache = 0
    for _, site in dora_jax.surgery.dora_layers(model):
      value = site.kernel.get_value()
      proj_params += math.prod(value.shape)
      if nnx_quantize.is_quantized(value):
        proj += value.nbytes
        cache += int(value.sq_norm.nbytes)
      else:
        proj += int(value.nbytes)
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    adapters = nnx.state(model, nnx.LoRAParam)
    rows.append(dict(
        qtype=qtype or "bf16", block_size=block or (64 if qtype in ("nf4", "int4") else None),
        proj_params=proj_params, proj_bytes=proj, cache_bytes=cache,
        proj_bytes_per_param=proj / proj_params,
        frozen_bytes=sum(int(x.nbytes) for x in jax.tree.leaves(frozen)),
        adapter_bytes=sum(int(x.nbytes) for x in jax.tree.leaves(adapters)),
        live_bytes=_live_bytes()))
    del model, frozen, adapters
  return rows


def print_model_memory(rows):
  print(f"\ntiny Llama (bf16, {TINY_LLAMA['num_hidden_layers']} layers, "
        f"{rows[0]['proj_params']:,} projection params), apply_dora(base_dtype=...):")
  print(f"  {'type':<6} {'block':>5} {'proj B/param':>12} {'proj bytes':>10} "
        f"{'frozen bytes':>12} {'adapters':>9} {'live bytes':>10}")
  for r in rows:
    print(f"  {r['qtype']:<6} {str(r['block_size'] or '-'):>5} {r['proj_bytes_per_param']:>12.4f} "
          f"{r['proj_bytes']:>10,} {r['frozen_bytes']:>12,} {r['adapter_bytes']:>9,} "
          f"{r['live_bytes']:>10,}")


def print_memory(rows):
  print(f"\nfrozen projection weights, one layer ({rows[0]['params'] / 1e6:.1f} M params):")
  print(f"  {'type':<6} {'block':>5} {'bytes/param':>11} {'+ ‖Ŵ‖² cache':>13} {'MiB':>9}")
  for r in rows:
    print(f"  {r['qtype']:<6} {str(r['block_size'] or '-'):>5} {r['bytes_per_param']:>11.4f} "
          f"{r['with_cache_per_param']:>13.4f} {r['layer_mib']:>9.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true", help="tiny shapes, few repeats")
  parser.add_argument("--memory-only", action="store_true", help="only the memory table")
  parser.add_argument("--qtypes", default="nf4,int8,fp8")
  parser.add_argument("--block-size", type=int, default=64, help="nf4/int4 block size")
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--ranks", default="16")
  parser.add_argument("--shapes", default="4096x4096,4096x14336,14336x4096")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  qtypes = [q for q in args.qtypes.split(",") if q]
  print(harness.device_description(), flush=True)
  result = dict(device=harness.device_description(), block_size=args.block_size, rows=[])
  layer = SMOKE_LAYER if args.smoke else LLAMA3_8B
  result["memory_shapes"] = "smoke" if args.smoke else "Llama-3-8B projections"
  result["memory"] = memory_table(layer, sorted(set(qtypes) | {"nf4", "int4", "int8", "fp8"},
                                                key=quantized.QTYPES.index), args.block_size)
  print_memory(result["memory"])
  result["model_memory"] = model_memory_table(
      ["nf4"] if args.smoke else sorted(set(qtypes) | {"nf4", "int4", "int8", "fp8"},
                                         key=quantized.QTYPES.index), args.block_size)
  print_model_memory(result["model_memory"])
  if not args.memory_only:
    if args.smoke:
      shapes, tokens, ranks = [(256, 384)], 64, [4]
      timing = dict(calls=2, repeats=2, warmup=1)
    else:
      shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
      tokens, ranks = args.tokens, [int(r) for r in args.ranks.split(",")]
      timing = dict(calls=10, repeats=7)
    print("\nstep (fwd+bwd, adapters and dx), bf16:")
    for d_in, d_out in shapes:
      for rank in ranks:
        result["rows"] += run_shape(d_in, d_out, tokens, rank, qtypes, args.block_size, timing,
                                    jax.random.key(rank))
  with open(os.path.join(args.out, "qdora.json"), "w") as f:
    json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()

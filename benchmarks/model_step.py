"""Model-level benchmark: one training step of a whole Llama-3-8B-shaped decoder.

  python benchmarks/model_step.py --out DIR            # GPU: 32 layers, hidden 4096, MLP 14336,
                                                       # GQA 32/8, vocab 128256, seq 4096, batch 1, r = 384
  python benchmarks/model_step.py --out DIR --fit      # also the largest rank and sequence length that fit
  python benchmarks/model_step.py --out DIR --smoke    # tiny model, any machine

Random init, bf16 weights and activations, adapters on all seven projections
of every layer (float32 adapter parameters on both sides, as PEFT's default
``autocast_adapter_dtype`` makes them), AdamW on the adapters only, loss
``transformers``' causal-LM cross-entropy; no gradient checkpointing on either
side; flash attention on both (cuDNN through ``jax.nn.dot_product_attention``,
PyTorch's SDPA). Implementations, each in its own process (so peak memory is
its own):

  jax_dora    dora_jax.apply_dora on dora_jax.models.LlamaForCausalLM (kernel norms cached)
  jax_lora    the same model with plain LoRA projections ``x·W + s·(x·a)·b``
  peft_dora   Hugging Face PEFT ``use_dora=True`` on transformers' LlamaForCausalLM
  peft_lora   PEFT LoRA

Step time: median over ``--steps`` synchronised steps after two warm-up steps,
a fresh token batch each step. Peak memory: the device allocator's peak
(``memory_stats()['peak_bytes_in_use']`` in JAX, ``max_memory_allocated`` in
PyTorch). Writes ``DIR/model_step.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

LLAMA3_8B = dict(vocab=128256, hidden=4096, mlp=14336, layers=32, heads=32, kv_heads=8)
SMOKE = dict(vocab=256, hidden=64, mlp=160, layers=2, heads=4, kv_heads=2)
IMPLS = ("jax_dora", "jax_lora", "peft_dora", "peft_lora")


# -- the JAX side (a child process per implementation) -----------------------


def _jax_model(shape, seq, dtype, attn, seed=0):
  """A dora_jax.models.LlamaForCausalLM with random weights drawn on the device."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from dora_jax.models import LlamaConfig, LlamaForCausalLM

  config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                       intermediate_size=shape["mlp"], num_hidden_layers=shape["layers"],
                       num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                       rope_theta=500000.0, max_position_embeddings=max(seq, 2048))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(
      config, dtype=dtype, attn_implementation=attn, rngs=nnx.Rngs(0))))
  normal = jax.jit(lambda key, shape: (0.02 * jax.random.normal(key, shape)).astype(dtype),
                   static_argnums=1)
  key = jax.random.key(seed)
  filled = []
  for i, (path, var) in enumerate(nnx.to_flat_state(state)):
    value = (jnp.ones(var.shape, dtype) if path[-1] == "weight"
             else normal(jax.random.fold_in(key, i), tuple(var.shape)))
    filled.append((path, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(filled)), config


def _lora_projections(model, rank, alpha, seed):
  """Replace every projection by plain LoRA (frozen kernel, float32 adapters)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  class LoRAProjection(nnx.Module):
    def __init__(self, base, key):
      d_in, d_out = base.kernel.shape
      self.kernel = base.kernel
      self.lora_a = nnx.LoRAParam(jax.random.uniform(key, (d_in, rank), jnp.float32,
                                                     -d_in ** -0.5, d_in ** -0.5))
      self.lora_b = nnx.LoRAParam(jnp.full((rank, d_out), 1e-3, jnp.float32))
      self.scale = alpha / rank

    def __call__(self, x):
      h = x @ self.lora_a[...].astype(x.dtype)
      return x @ self.kernel[...] + (self.scale * (h @ self.lora_b[...].astype(x.dtype))).astype(x.dtype)

  key = jax.random.key(seed)
  for i, layer in enumerate(model.model.layers):
    for j, (owner, names) in enumerate(((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                        (layer.mlp, ("gate_proj", "up_proj", "down_proj")))):
      for k, name in enumerate(names):
        setattr(owner, name, LoRAProjection(getattr(owner, name),
                                            jax.random.fold_in(key, 100 * i + 10 * j + k)))


def _nonzero_b(model, seed):
  """Give DoRA's lora_b small random values: a trained adapter, not PEFT's zero init
  (timings on zeros can run faster than on real data)."""
  import jax
  from flax import nnx
  from dora_jax.nnx import DoRAParam

  key = jax.random.key(seed)
  for i, (path, var) in enumerate(nnx.iter_graph(model)):
    if isinstance(var, DoRAParam) and path[-1] == "lora_b":
      var[...] = 1e-3 * jax.random.normal(jax.random.fold_in(key, i), var.shape, var.dtype)


def run_jax_child(impl, shape, rank, seq, batch, steps, attn):
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx
  import dora_jax
  from dora_jax.models import ALL_PROJECTIONS, causal_lm_loss

  dtype = jnp.bfloat16
  model, config = _jax_model(shape, seq, dtype, attn)
  alpha = 2.0 * rank
  if impl == "jax_dora":
    dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=rank, alpha=alpha,
                        rngs=nnx.Rngs(1))
    dora_jax.cache_base_norms(model)
    _nonzero_b(model, 2)
  else:
    _lora_projections(model, rank, alpha, 1)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.LoRAParam)

  @nnx.jit
  def step(model, optimizer, ids):
    def loss_fn(m):
      return causal_lm_loss(m(ids), ids)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss

  keys = jax.random.split(jax.random.key(7), steps + 2)
  batches = [jax.random.randint(k, (batch, seq), 0, config.vocab_size) for k in keys]
  losses, times = [], []
  for i, ids in enumerate(batches):
    start = time.perf_counter()
    loss = float(step(model, optimizer, ids))  # synchronises
    if i >= 2:
      times.append((time.perf_counter() - start) * 1e3)
    losses.append(loss)
  stats = jax.local_devices()[0].memory_stats() or {}
  return dict(ms=statistics.median(times), peak_gib=stats.get("peak_bytes_in_use", 0) / 2**30,
              losses=losses, trainable=int(sum(
                  x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))))


# -- the parent ------------------------------------------------------------------


def _child(impl, args, rank, seq, steps):
  """Run one implementation in a fresh process; returns its result dict."""
  if impl.startswith("peft"):
    cmd = [args.peft_python, os.path.join(HERE, "model_step_peft.py")]
  else:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", impl]
  cmd += ["--rank", str(rank), "--seq", str(seq), "--batch", str(args.batch),
          "--steps", str(steps), "--shape", json.dumps(args.shape_dict)]
  if impl.startswith("peft"):
    cmd += ["--dora"] if impl == "peft_dora" else []
  elif args.attn:
    cmd += ["--attn", args.attn]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
  except subprocess.TimeoutExpired:
    return dict(error=f"timed out after {args.child_timeout} s")
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if lines:
    return json.loads(lines[-1][len("RESULT "):])
  tail = (proc.stderr or proc.stdout)[-600:]
  oom = any(s in tail for s in ("RESOURCE_EXHAUSTED", "out of memory", "OutOfMemory"))
  return dict(oom=True) if oom else dict(error=tail)


def _fit(impl, args):
  """Largest sequence length (at ``--rank``) and rank (at ``--seq``) that run a step."""
  out = {}
  for what, values in (("seq", args.fit_seqs), ("rank", args.fit_ranks)):
    best = None
    for value in values:
      rank, seq = (args.rank, value) if what == "seq" else (value, args.seq)
      res = _child(impl, args, rank, seq, steps=1)
      print(f"  fit {impl} rank={rank} seq={seq}: "
            + ("fits" if "ms" in res else "OOM" if res.get("oom") else res.get("error", "")[:120]),
            flush=True)
      if "ms" not in res:
        break
      best = value
    out[f"max_{what}"] = best
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out")
  p.add_argument("--smoke", action="store_true")
  p.add_argument("--impls", default=",".join(IMPLS))
  p.add_argument("--rank", type=int, default=384)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--attn", default=None, help="jax.nn.dot_product_attention implementation "
                                                "(default: cudnn on a GPU, xla elsewhere)")
  p.add_argument("--fit", action="store_true")
  p.add_argument("--fit-seqs", default="8192,16384,32768,65536")
  p.add_argument("--fit-ranks", default="1024,2048,4096")
  p.add_argument("--child-timeout", type=int, default=420)
  p.add_argument("--peft-python", default=os.environ.get("DORA_JAX_PEFT_PYTHON", sys.executable),
                 help="interpreter with torch, transformers and peft (default: "
                      "$DORA_JAX_PEFT_PYTHON, else this one)")
  p.add_argument("--child", choices=("jax_dora", "jax_lora"), help=argparse.SUPPRESS)
  p.add_argument("--shape", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()

  if args.child:
    shape = json.loads(args.shape)
    res = run_jax_child(args.child, shape, args.rank, args.seq, args.batch, args.steps, args.attn)
    print("RESULT " + json.dumps(res), flush=True)
    return

  import jax
  on_gpu = jax.default_backend() == "gpu"
  if args.attn is None:
    args.attn = "cudnn" if on_gpu else "xla"
  if args.smoke:
    args.rank, args.seq, args.steps = 4, 32, 2
    args.fit_seqs, args.fit_ranks = "64", "8"
  args.shape_dict = SMOKE if args.smoke else LLAMA3_8B
  args.fit_seqs = [int(v) for v in str(args.fit_seqs).split(",")]
  args.fit_ranks = [int(v) for v in str(args.fit_ranks).split(",")]
  # PEFT needs a GPU, or, for a smoke run, an interpreter that has it
  peft_ok = on_gpu or (args.smoke and args.peft_python != sys.executable)
  impls = [i for i in args.impls.split(",") if peft_ok or not i.startswith("peft")]
  rows = []
  for impl in impls:
    res = _child(impl, args, args.rank, args.seq, args.steps)
    row = dict(impl=impl, rank=args.rank, seq=args.seq, batch=args.batch, **res)
    if args.fit and "ms" in res:
      row.update(_fit(impl, args))
    rows.append(row)
    print(f"{impl:<10} " + (f"step {res['ms']:9.1f} ms  peak {res['peak_gib']:6.1f} GiB  "
                            f"loss {res['losses'][0]:.3f} -> {res['losses'][-1]:.3f}"
                            if "ms" in res else str(res)[:200]), flush=True)
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=HERE).stdout.strip() or "unknown"
  device = jax.devices()[0]
  meta = dict(device=f"{device.device_kind} ({jax.default_backend()})", jax=jax.__version__,
              date=datetime.date.today().isoformat(), commit=commit, shape=args.shape_dict,
              attn=args.attn, command="python benchmarks/model_step.py " + " ".join(sys.argv[1:]))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "model_step.json"), "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

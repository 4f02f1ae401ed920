"""Decoder-layer benchmark: one Llama-style block, one full training step.

  python benchmarks/decoder_layer.py --out DIR            # H100: hidden 4096, MLP 14336, GQA 32/8, seq 4096
  python benchmarks/decoder_layer.py --out DIR --smoke    # tiny sizes, any machine
  python benchmarks/decoder_layer.py --out DIR --attn cudnn   # cuDNN flash attention (GPU)

Adapters on all seven projections (q, k, v, o, gate, up, down); the step is
forward + backward + AdamW on the adapter parameters only, bf16 activations and
weights. JAX: DoRA (``dora_jax.dora_dense``) vs LoRA, same block code; torch:
PEFT DoRA vs PEFT LoRA on transformers' ``LlamaDecoderLayer`` (run in a
subprocess by ``peft_decoder_layer.py``, skipped without torch/peft/CUDA).
Writes ``DIR/decoder_results.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import harness  # noqa: E402
import dora_jax  # noqa: E402

PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
FULL = dict(hidden=4096, mlp=14336, heads=32, kv_heads=8, seq=4096, batch=1)
SMOKE = dict(hidden=64, mlp=160, heads=4, kv_heads=2, seq=32, batch=2)


def projection_shapes(cfg):
  h, hd = cfg["hidden"], cfg["hidden"] // cfg["heads"]
  return dict(q=(h, cfg["heads"] * hd), k=(h, cfg["kv_heads"] * hd), v=(h, cfg["kv_heads"] * hd),
              o=(cfg["heads"] * hd, h), gate=(h, cfg["mlp"]), up=(h, cfg["mlp"]),
              down=(cfg["mlp"], h))


def init(cfg, rank, dtype, key):
  """Frozen block weights and random (non-zero) adapters for every projection."""
  frozen, adapters = {}, {}
  for i, (name, (d_in, d_out)) in enumerate(projection_shapes(cfg).items()):
    k = jax.random.split(jax.random.fold_in(key, i), 3)
    w = (jax.random.normal(k[0], (d_in, d_out)) / d_in**0.5).astype(dtype)
    frozen[name] = w
    frozen[name + "_sq"] = dora_jax.column_sq_norm(w)
    adapters[name] = dict(
        a=(jax.random.normal(k[1], (d_in, rank)) / d_in**0.5).astype(dtype),
        b=(0.01 * jax.random.normal(k[2], (rank, d_out))).astype(dtype),
        m=jnp.sqrt(frozen[name + "_sq"]).astype(dtype))
  frozen["norm1"] = jnp.ones((cfg["hidden"],), dtype)
  frozen["norm2"] = jnp.ones((cfg["hidden"],), dtype)
  return frozen, adapters


def rms_norm(x, w, eps=1e-5):
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.mean(xf * xf, -1, keepdims=True) + eps)).astype(x.dtype) * w


def rope(x, positions, theta=500000.0):
  """HF's rotate_half RoPE on ``x [B, S, H, D]``."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  ang = positions[:, None].astype(jnp.float32) * inv[None, :]
  cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]
  sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, -1)
  rot = jnp.concatenate([-x2, x1], -1)
  return (x.astype(jnp.float32) * cos + rot * sin).astype(x.dtype)


def block(x, frozen, adapters, cfg, kind, scale):
  """One pre-norm Llama block ``x [B, S, hidden] -> [B, S, hidden]``."""
  def proj(name, h):
    w, p = frozen[name], adapters[name]
    if kind == "dora":
      return dora_jax.dora_dense(h, w, p["a"], p["b"], p["m"], scale,
                                 base_sq_norm=frozen[name + "_sq"])
    return h @ w + scale * ((h @ p["a"]) @ p["b"])

  b, s, _ = x.shape
  hd = cfg["hidden"] // cfg["heads"]
  h = rms_norm(x, frozen["norm1"])
  pos = jnp.arange(s)
  q = rope(proj("q", h).reshape(b, s, cfg["heads"], hd), pos)
  k = rope(proj("k", h).reshape(b, s, cfg["kv_heads"], hd), pos)
  v = proj("v", h).reshape(b, s, cfg["kv_heads"], hd)
  att = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                     implementation=cfg.get("attn")).reshape(b, s, -1)
  x = x + proj("o", att)
  h = rms_norm(x, frozen["norm2"])
  return x + proj("down", jax.nn.silu(proj("gate", h)) * proj("up", h))


def make_step(cfg, kind, scale, tx):
  def loss_fn(adapters, frozen, x, cot):
    return jnp.sum((block(x, frozen, adapters, cfg, kind, scale) * cot).astype(jnp.float32))

  def step(adapters, opt_state, frozen, x, cot):
    loss, grads = jax.value_and_grad(loss_fn)(adapters, frozen, x, cot)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def run_jax(cfg, rank, timing_kw):
  dtype = jnp.bfloat16
  frozen, adapters0 = init(cfg, rank, dtype, jax.random.key(0))
  xs = [jax.random.normal(jax.random.key(10 + i), (cfg["batch"], cfg["seq"], cfg["hidden"]), dtype)
        for i in range(2)]
  cots = [jax.random.normal(jax.random.key(20 + i), xs[0].shape, dtype) for i in range(2)]
  tx = optax.adamw(1e-4)
  rows = []
  for kind in ("lora", "dora"):
    step = make_step(cfg, kind, 2.0, tx)
    adapters = jax.tree.map(jnp.copy, adapters0)
    opt_state = tx.init(adapters)
    temp = step.lower(adapters, opt_state, frozen, xs[0], cots[0]).compile().memory_analysis()
    state = {"adapters": adapters, "opt": opt_state}

    def call(x, cot):  # threads the donated state through the timed calls
      state["adapters"], state["opt"], loss = step(state["adapters"], state["opt"], frozen, x, cot)
      return loss

    ms = harness.time_jitted(call, list(zip(xs, cots)), **timing_kw)
    rows.append(dict(framework="jax", impl=kind, rank=rank, ms=ms,
                     temp_mb=temp.temp_size_in_bytes / 2**20))
    print(f"jax {kind:<5} r={rank:<4} step {ms:8.3f} ms  temp {rows[-1]['temp_mb']:8.1f} MiB", flush=True)
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True)
  parser.add_argument("--smoke", action="store_true")
  parser.add_argument("--ranks", default="16,384")
  parser.add_argument("--no-torch", action="store_true")
  parser.add_argument("--attn", choices=("xla", "cudnn"), default=None,
                      help="jax.nn.dot_product_attention implementation (default: JAX's choice)")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  cfg = dict(SMOKE if args.smoke else FULL, attn=args.attn)
  timing_kw = dict(calls=2, repeats=2, warmup=1) if args.smoke else dict(calls=10, repeats=7)
  rows = []
  for rank in map(int, args.ranks.split(",")):
    rows += run_jax(cfg, rank, timing_kw)
  if not args.no_torch and jax.default_backend() == "gpu":
    res = os.path.join(args.out, "peft_decoder.json")
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "peft_decoder_layer.py"),
                           "--out", res, "--ranks", args.ranks] + (["--smoke"] if args.smoke else []))
    if proc.returncode == 0 and os.path.exists(res):
      with open(res) as f:
        rows += json.load(f)["rows"]
  meta = dict(device=harness.device_description(), date=datetime.date.today().isoformat(), config=cfg,
              command="python benchmarks/decoder_layer.py " + " ".join(sys.argv[1:]))
  with open(os.path.join(args.out, "decoder_results.json"), "w") as f:
    json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()

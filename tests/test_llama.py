"""The Llama-style model end to end: Hugging Face checkpoints, transformers' logits, PEFT's training.

The PyTorch side (``llama_torch_side.py``) runs once per module under the
PyTorch + PEFT interpreter (``DORA_JAX_PEFT_PYTHON`` or ``.venv-peft``, made by
``scripts/peft_env.sh``; without one those tests are skipped). It creates tiny
random-init checkpoints with ``transformers`` (``save_pretrained``), computes
their logits, and trains a PEFT DoRA adapter on them with
``torch.optim.AdamW``; the JAX side loads the same files and must agree:

* logits of :func:`dora_jax.models.load_hf_llama` vs ``transformers``: float32
  relative L2 error < 1e-5 (Llama with GQA; Llama with tied embeddings,
  biases, Llama-3 RoPE scaling and a sharded checkpoint; Qwen2);
* DoRA on all seven projections, PEFT's initial adapter (random non-zero
  ``lora_B``) loaded with :func:`dora_jax.load_adapter`: initial logits and the
  first-step gradient of every adapter tensor, relative L2 error < 1e-4;
* the same batches, ``optax.adamw`` vs ``torch.optim.AdamW`` with the same
  hyper-parameters, :data:`STEPS` steps: mean |Δloss| < 1e-3;
* a checkpoint written by :func:`dora_jax.models.save_hf_llama` loads in
  ``transformers`` with the same logits.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from dora_jax.io import naming, safetensors_format
from dora_jax.models import (ALL_PROJECTIONS, HFCheckpointError, LlamaConfig, LlamaForCausalLM,
                             causal_lm_loss, config_from_hf, config_to_hf, load_hf_llama,
                             random_llama, save_hf_llama)

from helpers.torch_env import ENV_VAR, PEFT_PYTHON, ROOT

TINY = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
        "initializer_range": 0.05, "rms_norm_eps": 1e-6}
#: Checkpoints transformers creates: (architecture, config overrides, max_shard_size).
CHECKPOINTS = {
    "llama": ("llama", {}, None),
    "llama3_tied_bias_sharded": ("llama", {
        "tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 8,
        "rope_theta": 500000.0, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}, "40KB"),
    "qwen2": ("qwen2", {}, None),
}
LOGITS_TOL = 1e-5
DORA_TOL = 1e-4
LOSS_TOL = 1e-3
STEPS = 100
BATCH, SEQ = 4, 32
RANK, ALPHA = 8, 16
ADAMW = {"lr": 5e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}



needs_torch = pytest.mark.skipif(
    PEFT_PYTHON is None,
    reason=f"no PyTorch+PEFT+transformers interpreter: run scripts/peft_env.sh (makes "
           f".venv-peft) or set {ENV_VAR} to a python with torch, peft, transformers, safetensors")


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def pattern_batches(rng: np.random.Generator, steps: int, batch: int, seq: int) -> np.ndarray:
  """``[steps, batch, seq]`` learnable token sequences: arithmetic progressions mod 256."""
  start = rng.integers(0, 256, size=(steps, batch, 1))
  stride = rng.choice([1, 2, 3, 5, 7], size=(steps, batch, 1))
  return ((start + stride * np.arange(seq)) % 256).astype(np.int32)


@nnx.jit
def forward(model: nnx.Module, ids: jax.Array, attention_mask=None, positions=None) -> jax.Array:
  """The model's logits, compiled once per model structure (eager dispatch is slow on a CPU)."""
  return model(ids, attention_mask=attention_mask, positions=positions)


def tiny_config(**overrides) -> LlamaConfig:
  return LlamaConfig(**{**TINY, **overrides})


# -- the PyTorch side, once per module ----------------------------------------


@pytest.fixture(scope="module")
def torch_side(tmp_path_factory):
  if PEFT_PYTHON is None:
    pytest.skip("no PyTorch+PEFT interpreter")
  tmp = tmp_path_factory.mktemp("llama")
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 256, size=(2, 24)).astype(np.int32)
  np.save(tmp / "ids.npy", ids)
  batches = pattern_batches(rng, STEPS, BATCH, SEQ)
  np.save(tmp / "batches.npy", batches)
  jobs = []
  for i, (name, (arch, overrides, shard)) in enumerate(CHECKPOINTS.items()):
    jobs.append({"kind": "checkpoint", "arch": arch, "config": {**TINY, **overrides},
                 "seed": 10 + i, "dir": str(tmp / name), "ids": str(tmp / "ids.npy"),
                 "out": str(tmp / f"{name}-logits.npz"), "max_shard_size": shard})
  # A checkpoint written by dora_jax, for transformers to read.
  jax_model, _ = _save_tiny(tmp, tie_word_embeddings=True)
  save_hf_llama(jax_model, tmp / "from_jax")
  jobs.append({"kind": "logits", "dir": str(tmp / "from_jax"), "ids": str(tmp / "ids.npy"),
               "out": str(tmp / "from_jax-logits.npz")})
  jobs.append({"kind": "train", "dir": str(tmp / "llama"), "seed": 20,
               "lora": {"r": RANK, "lora_alpha": ALPHA, "target_modules": [
                   "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj"]},
               "adapter": str(tmp / "adapter0"), "final_adapter": str(tmp / "adapter_final"),
               "batches": str(tmp / "batches.npy"), "adamw": ADAMW,
               "out": str(tmp / "train.npz")})
  (tmp / "jobs.json").write_text(json.dumps({"jobs": jobs}))
  start = time.perf_counter()
  proc = subprocess.run([PEFT_PYTHON, str(ROOT / "tests" / "scripts" / "llama_torch_side.py"),
                         str(tmp / "jobs.json")], capture_output=True, text=True, timeout=600,
                        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error",
                             "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
  assert proc.returncode == 0, proc.stderr[-4000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  print(f"\n[torch side] {time.perf_counter() - start:.1f}s: {summary}")
  return {"tmp": tmp, "ids": ids, "batches": batches, "jax_model": jax_model,
          "summary": summary}


def _randomize_norms(model: nnx.Module, rng: np.random.Generator) -> None:
  """Norm weights away from one, so a mix-up of norms shows."""
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if path[-1] == "weight":
      var[...] = jnp.asarray(1.0 + 0.2 * rng.standard_normal(var.shape), var.dtype)


# -- logits vs transformers ---------------------------------------------------


@needs_torch
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_logits_match_transformers(torch_side, name):
  model = load_hf_llama(torch_side["tmp"] / name)
  arch, overrides, _ = CHECKPOINTS[name]
  assert model.config.model_type == arch
  assert model.config.tie_word_embeddings == overrides.get("tie_word_embeddings", False)
  want = np.load(torch_side["tmp"] / f"{name}-logits.npz")["logits"]
  got = np.asarray(forward(model, jnp.asarray(torch_side["ids"])))
  err = rel_err(got, want)
  print(f"\n[{name}] logits rel err vs transformers: {err:.2e}")
  assert err < LOGITS_TOL


@needs_torch
def test_saved_checkpoint_loads_in_transformers(torch_side):
  want = np.asarray(forward(torch_side["jax_model"], jnp.asarray(torch_side["ids"])))
  got = np.load(torch_side["tmp"] / "from_jax-logits.npz")["logits"]
  assert rel_err(got, want) < LOGITS_TOL


# -- DoRA vs PEFT: initial logits, gradients, training -------------------------


def adapter_grads(model: nnx.Module, grads: nnx.State) -> dict[str, np.ndarray]:
  """Gradients keyed and laid out as PEFT's ``adapter_model.safetensors`` tensors."""
  flat = {tuple(str(p) for p in path): np.asarray(v[...])
          for path, v in nnx.to_flat_state(grads)}
  out = {}
  for path, _ in dora_jax.surgery.dora_layers(model):
    key = tuple(path.split("/"))
    prefix = "base_model.model." + naming.default_module_name(path)
    out[prefix + ".lora_A.weight"] = flat[key + ("lora_a",)].T
    out[prefix + ".lora_B.weight"] = flat[key + ("lora_b",)].T
    out[prefix + ".lora_magnitude_vector"] = flat[key + ("magnitude",)]
  return out


def make_train_step(tx):
  @nnx.jit
  def train_step(model, optimizer, ids):
    def loss_fn(m):
      return causal_lm_loss(m(ids), ids)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
    optimizer.update(model, grads)
    return loss, grads
  return train_step


def optax_adamw(cfg: dict) -> optax.GradientTransformation:
  """``torch.optim.AdamW(**cfg)`` in optax (both decay decoupled: ``p -= lr·wd·p``)."""
  b1, b2 = cfg["betas"]
  return optax.adamw(cfg["lr"], b1=b1, b2=b2, eps=cfg["eps"], weight_decay=cfg["weight_decay"])


@pytest.fixture(scope="module")
def jax_training(torch_side):
  tmp = torch_side["tmp"]
  model = load_hf_llama(tmp / "llama")
  dora_jax.load_adapter(model, tmp / "adapter0")
  batches = jnp.asarray(torch_side["batches"])
  logits0 = np.asarray(forward(model, batches[0]))
  optimizer = nnx.Optimizer(model, optax_adamw(ADAMW), wrt=nnx.LoRAParam)
  step = make_train_step(optax_adamw(ADAMW))
  losses, grads0 = [], None
  start = time.perf_counter()
  for i in range(batches.shape[0]):
    loss, grads = step(model, optimizer, batches[i])
    if i == 0:
      grads0 = adapter_grads(model, grads)
    losses.append(float(loss))
  print(f"\n[jax side] {len(losses)} steps in {time.perf_counter() - start:.1f}s "
        "(first includes compilation)")
  return {"model": model, "logits0": logits0, "grads0": grads0,
          "losses": np.asarray(losses), "torch": np.load(tmp / "train.npz")}


@needs_torch
def test_peft_adapter_loads_as_dora_on_every_projection(torch_side, jax_training):
  paths = dora_jax.surgery.adapted_paths(jax_training["model"])
  assert len(paths) == 7 * TINY["num_hidden_layers"]
  assert all(p.startswith("model/layers/") for p in paths)
  assert torch_side["summary"][-1]["adapted"] == len(paths)


@needs_torch
def test_initial_logits_match_peft(jax_training):
  err = rel_err(jax_training["logits0"], jax_training["torch"]["logits0"])
  print(f"\n[dora] initial logits rel err vs PEFT: {err:.2e}")
  assert err < DORA_TOL


@needs_torch
def test_first_step_gradients_match_peft(jax_training):
  theirs = {k[len("grad/"):]: v for k, v in jax_training["torch"].items()
            if k.startswith("grad/")}
  ours = jax_training["grads0"]
  assert set(ours) == set(theirs)
  errs = {k: rel_err(ours[k], theirs[k]) for k in sorted(ours)}
  worst = max(errs, key=errs.get)
  kinds = {}
  for k, e in errs.items():
    kind = k.rsplit(".", 2)[-2] if k.endswith(".weight") else "lora_magnitude_vector"
    kinds[kind] = max(kinds.get(kind, 0.0), e)
  print(f"\n[dora] first-step gradient rel err vs PEFT ({len(errs)} tensors): max {errs[worst]:.2e} "
        f"({worst}); by kind: " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(kinds.items())))
  assert all(np.linalg.norm(theirs[k]) > 0 for k in theirs)
  assert errs[worst] < DORA_TOL, errs


@needs_torch
def test_training_tracks_peft(jax_training, torch_side):
  ours, theirs = jax_training["losses"], jax_training["torch"]["losses"]
  assert len(ours) == len(theirs) == STEPS
  diff = np.abs(ours - theirs)
  print(f"\n[dora] {STEPS} AdamW steps: loss {theirs[0]:.4f} -> {theirs[-1]:.4f} (PEFT), "
        f"{ours[0]:.4f} -> {ours[-1]:.4f} (dora_jax); mean |Δloss| {diff.mean():.2e}, "
        f"max {diff.max():.2e}")
  assert diff.mean() < LOSS_TOL
  assert theirs[-1] < theirs[0] - 0.5  # it learned something
  # The trained adapters agree too.
  final = load_hf_llama(torch_side["tmp"] / "llama")
  dora_jax.load_adapter(final, torch_side["tmp"] / "adapter_final")
  ids = jnp.asarray(torch_side["batches"][-1])
  err = rel_err(forward(jax_training["model"], ids), forward(final, ids))
  print(f"[dora] logits after training, dora_jax vs PEFT's trained adapter: rel err {err:.2e}")
  assert err < 1e-2


# -- JAX only: loader, writer, config ----------------------------------------


_TINY_MODELS: dict[tuple, LlamaForCausalLM] = {}


def _save_tiny(tmp_path, **overrides) -> tuple[LlamaForCausalLM, Path]:
  """A random tiny model (built once per configuration) and its checkpoint directory."""
  key = tuple(sorted(overrides.items()))
  if key not in _TINY_MODELS:
    _TINY_MODELS[key] = random_llama(tiny_config(**overrides), seed=len(_TINY_MODELS))
    _randomize_norms(_TINY_MODELS[key], np.random.default_rng(1))
  model = _TINY_MODELS[key]
  return model, save_hf_llama(model, tmp_path / "ckpt")


def test_save_load_round_trip(tmp_path):
  model, path = _save_tiny(tmp_path, attention_bias=True, mlp_bias=True)
  loaded = load_hf_llama(path)
  ids = jnp.arange(20, dtype=jnp.int32).reshape(2, 10)
  want = np.asarray(forward(model, ids))
  np.testing.assert_array_equal(np.asarray(forward(loaded, ids)), want)
  assert loaded.config == model.config
  bf16 = load_hf_llama(path, dtype=jnp.bfloat16)
  assert bf16.model.layers[0].self_attn.q_proj.kernel.dtype == jnp.bfloat16
  assert rel_err(forward(bf16, ids).astype(jnp.float32), want) < 3e-2


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True, "head_dim": 8, "rope_type": "llama3", "rope_factor": 8.0,
     "rope_original_max_position_embeddings": 16},
    {"model_type": "qwen2", "attention_bias": True, "o_proj_bias": False},
    {"rope_type": "linear", "rope_factor": 2.0, "mlp_bias": True},
])
def test_config_round_trip(overrides):
  config = tiny_config(**overrides)
  assert config_from_hf(json.loads(json.dumps(config_to_hf(config)))) == config


def test_old_style_rope_config():
  hf = {**TINY, "rope_theta": 500000.0, "rope_scaling": {
      "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8192}}
  config = config_from_hf(hf)
  assert (config.rope_type, config.rope_theta, config.rope_original_max_position_embeddings) == (
      "llama3", 500000.0, 8192)


@pytest.mark.parametrize("hf, match", [
    ({"model_type": "gemma"}, "model_type 'gemma'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE type 'yarn'"),
    ({"model_type": "mistral", "sliding_window": 4096}, "sliding-window"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "sliding-window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_unsupported_configs_are_refused(hf, match):
  with pytest.raises(NotImplementedError, match=match):
    config_from_hf({**TINY, **hf})


def _rewrite(path: Path, edit) -> None:
  tensors, meta = safetensors_format.read(path / "model.safetensors")
  edit(tensors)
  (path / "model.safetensors").write_bytes(safetensors_format.encode(tensors, meta))


def test_missing_unexpected_and_misshaped_tensors(tmp_path):
  _, path = _save_tiny(tmp_path)

  def edit(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    t["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"].T

  _rewrite(path, edit)
  with pytest.raises(HFCheckpointError) as err:
    load_hf_llama(path)
  msg = str(err.value)
  assert "missing tensor(s)" in msg and "model.layers.1.mlp.up_proj.weight (128, 64)" in msg
  assert "unexpected tensor(s)" in msg and "model.layers.0.self_attn.q_proj.bias (64,)" in msg
  assert ("model.layers.0.self_attn.k_proj.weight: checkpoint (64, 32), model expects (32, 64)"
          in msg)


def test_ignorable_extras_and_tied_head(tmp_path):
  model, path = _save_tiny(tmp_path, tie_word_embeddings=True)

  def edit(t):
    t["model.rotary_emb.inv_freq"] = np.ones(8, np.float32)
    t["lm_head.weight"] = t["model.embed_tokens.weight"]

  _rewrite(path, edit)
  ids = jnp.arange(8, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(np.asarray(forward(load_hf_llama(path), ids)),
                                np.asarray(forward(model, ids)))


def test_sharded_checkpoint(tmp_path):
  model, path = _save_tiny(tmp_path)
  tensors, _ = safetensors_format.read(path / "model.safetensors")
  (path / "model.safetensors").unlink()
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for shard, keys in shards.items():
    (path / shard).write_bytes(safetensors_format.encode({k: tensors[k] for k in keys}))
  index = {"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}
  (path / "model.safetensors.index.json").write_text(json.dumps(index))
  ids = jnp.arange(8, dtype=jnp.int32)[None]
  np.testing.assert_array_equal(np.asarray(forward(load_hf_llama(path), ids)),
                                np.asarray(forward(model, ids)))
  (path / "model-00002-of-00002.safetensors").unlink()
  with pytest.raises(HFCheckpointError, match="model-00002-of-00002.safetensors.*missing"):
    load_hf_llama(path)


def test_no_weights_or_config(tmp_path):
  with pytest.raises(HFCheckpointError, match="config.json: missing"):
    load_hf_llama(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps(config_to_hf(tiny_config())))
  with pytest.raises(HFCheckpointError, match="neither model.safetensors"):
    load_hf_llama(tmp_path)


def test_padding_mask_and_positions(tmp_path):
  model, _ = _save_tiny(tmp_path)
  ids = jnp.arange(1, 11, dtype=jnp.int32)[None]
  padded = jnp.concatenate([ids, jnp.zeros((1, 4), jnp.int32)], axis=1)
  mask = jnp.concatenate([jnp.ones((1, 10)), jnp.zeros((1, 4))], axis=1)
  # Right padding: the real positions do not see the padding (causal anyway), and
  # a padded key is never attended to by later positions.
  want = forward(model, ids)
  np.testing.assert_allclose(forward(model, padded, mask)[:, :10], want, rtol=1e-5, atol=1e-6)
  # Left padding with shifted positions equals the unpadded sequence.
  left = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), ids], axis=1)
  lmask = jnp.concatenate([jnp.zeros((1, 4)), jnp.ones((1, 10))], axis=1)
  pos = jnp.maximum(jnp.arange(14) - 4, 0)[None]
  np.testing.assert_allclose(forward(model, left, lmask, pos)[:, 4:], want, rtol=1e-5,
                             atol=1e-6)


def test_dora_paths_and_peft_names():
  model = random_llama(tiny_config())
  dora_jax.apply_dora(model, targets=ALL_PROJECTIONS, rank=4, alpha=8, rngs=nnx.Rngs(1))
  paths = dora_jax.surgery.adapted_paths(model)
  assert len(paths) == 14
  names = dora_jax.io.adapter_config(model)["target_modules"]
  assert names == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
  assert naming.default_module_name("model/layers/1/self_attn/q_proj") == (
      "model.layers.1.self_attn.q_proj")


# -- examples/finetune_llama.py -------------------------------------------------


@functools.cache
def _load_example():
  import importlib.util
  spec = importlib.util.spec_from_file_location("finetune_llama",
                                                ROOT / "examples" / "finetune_llama.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_finetune_example_runs_resumes_and_exports(tmp_path, capsys):
  example = _load_example()
  data = tmp_path / "data.jsonl"
  rng = np.random.default_rng(0)
  data.write_text("".join(
      json.dumps({"text": " ".join(["alpha beta gamma delta"] * int(rng.integers(3, 9)))}) + "\n"
      for _ in range(40)))
  ckpt, out, merged = tmp_path / "tiny", tmp_path / "adapter", tmp_path / "merged"
  common = [str(ckpt), "--data", str(data), "--batch", "2", "--seq", "32", "--rank", "4",
            "--alpha", "8", "--lr", "1e-2", "--eval-every", "3", "--eval-batches", "1",
            "--ckpt-dir", str(tmp_path / "ckpts"), "--save-every", "3"]
  first = example.main([*common, "--init-random", "tiny", "--steps", "6"])
  assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step_3", "step_6"]
  # Resuming at the last step restores the adapters (same held-out loss) and exports.
  second = example.main([*common, "--steps", "6", "--resume", "--out", str(out),
                         "--merged-out", str(merged)])
  text = capsys.readouterr().out
  assert "resumed from" in text and "(step 6)" in text
  assert "PEFT adapter saved to" in text and "step time: median" in text
  assert [s for s, _ in first["evals"]] == [0, 3, 6]
  assert first["evals"][-1][1] < first["evals"][0][1]  # the held-out loss fell
  assert second["evals"][0] == first["evals"][-1]
  config = json.loads((out / "adapter_config.json").read_text())
  assert config["use_dora"] and config["r"] == 4 and config["task_type"] == "CAUSAL_LM"
  # The exported adapter on the base model equals the merged export.
  model = load_hf_llama(ckpt)
  dora_jax.load_adapter(model, out)
  ids = jnp.asarray(rng.integers(0, 256, size=(1, 16)), jnp.int32)
  assert rel_err(forward(load_hf_llama(merged), ids), forward(model, ids)) < 1e-5


def test_example_tokenizer_choice(tmp_path):
  example = _load_example()
  ids = example.Tokenizer(tmp_path, 256).encode(["hé", "x"])
  np.testing.assert_array_equal(ids, list("hé\n\n".encode()) + list(b"x\n\n"))
  with pytest.raises(SystemExit, match="vocab_size >= 256"):
    example.Tokenizer(tmp_path, 100)
  (tmp_path / "tokenizer.json").write_text("{}")
  try:
    import tokenizers  # noqa: F401
  except ImportError:
    with pytest.raises(SystemExit, match="needs the tokenizers package"):
      example.Tokenizer(tmp_path, 256)
  assert example.Tokenizer(tmp_path, 256, force_bytes=True).name == "bytes"

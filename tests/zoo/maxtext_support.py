"""A tiny random-init MaxText ``decoder_block="llama2"`` model (NNX, ``DenseGeneral``
projections) and helpers to look at its projections."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from zoo_support import require

maxtext = require("maxtext")
from maxtext.configs import pyconfig  # noqa: E402
from maxtext.layers import linears  # noqa: E402
from maxtext.models import models  # noqa: E402
from maxtext.utils import maxtext_utils  # noqa: E402

#: The projections of one decoder layer (attention and MLP), by module name.
PROJECTIONS = ("query", "key", "value", "out", "wi_0", "wi_1", "wo")
TARGETS = r"decoder/layers_\d+/(self_attention|mlp)/(" + "|".join(PROJECTIONS) + ")"
QWIX_PATH = r".*(" + "|".join(PROJECTIONS) + ")"
N_LAYERS = 2


def config():
  base_yml = os.path.join(os.path.dirname(maxtext.__file__), "configs", "base.yml")
  return pyconfig.initialize(
      [sys.argv[0], base_yml], run_name="t", model_name="default", decoder_block="llama2",
      base_emb_dim=64, base_mlp_dim=128, base_num_query_heads=4, base_num_kv_heads=2,
      head_dim=16, base_num_decoder_layers=N_LAYERS, vocab_size=256, per_device_batch_size=2,
      max_target_length=16, attention="dot_product", dtype="float32", weight_dtype="float32",
      matmul_precision="highest", scan_layers=False, enable_checkpointing=False,
      skip_jax_distributed_system=True, enable_dropout=False, remat_policy="full",
      hardware="cpu")


def build(cfg, seed: int = 0):
  """``(model, mesh)``; build and call the model under ``jax.set_mesh(mesh)``."""
  mesh = jax.sharding.Mesh(maxtext_utils.create_device_mesh(cfg), cfg.mesh_axes)
  with jax.set_mesh(mesh):
    model = models.Transformer(cfg, mesh, quant=None, rngs=nnx.Rngs(seed))
  return model, mesh


def inputs(key, batch: int = 2, length: int = 12):
  tokens = jax.random.randint(key, (batch, length), 0, 256)
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  return tokens, positions


def projections(model) -> dict[str, nnx.Module]:
  """``{path: DenseGeneral}`` of the attention and MLP projections (not the LM head)."""
  out = {}
  for path, module in nnx.iter_modules(model):
    p = "/".join(map(str, path))
    if isinstance(module, linears.DenseGeneral) and p.rsplit("/", 1)[-1] in PROJECTIONS:
      out[p] = module
  return out

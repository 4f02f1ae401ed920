"""Adapters on disk within dora_jax: PEFT-format save/load, Orbax checkpoints, merged export.

Every test uses fresh random adapters with non-zero ``lora_b`` and a magnitude
away from the column norms, so a transposition, a dropped tensor or a wrong
scale changes the numbers. The cross-check against PyTorch PEFT itself is in
``test_peft_compat.py``.
"""

from __future__ import annotations

import collections
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dora_jax
from dora_jax.io import AdapterFormatError, atomic, naming, safetensors_format
from dora_jax.io import peft as peft_io
from helpers.io_models import EmbedConvNet, ToyLM, inputs, randomize, rel_err

ALL_PROJ = r"layers/\d+/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)"


def adapted(key, *, targets=ALL_PROJ, rank=4, alpha=8.0, seed=0, **kwargs):
  model = ToyLM(seed=seed)
  dora_jax.apply_dora(model, targets=targets, rank=rank, alpha=alpha,
                      rngs=nnx.Rngs(int(jax.random.randint(key, (), 0, 2**30))), **kwargs)
  randomize(model, key)
  return model


def lora_flat(model):
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.LoRAParam))}


def assert_same_adapters(a, b):
  fa, fb = lora_flat(a), lora_flat(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
  for (pa, la), (pb, lb) in zip(dora_jax.surgery.dora_layers(a), dora_jax.surgery.dora_layers(b)):
    assert pa == pb
    assert (la.rank, la.alpha, la.rslora, la.dropout_rate) == (
        lb.rank, lb.alpha, lb.rslora, lb.dropout_rate), pa


def rewrite(directory: Path, *, tensors=None, config=None, link=False):
  """Rewrite an adapter's files (as PEFT would: no dora_jax config link unless ``link``)."""
  old_t, _ = safetensors_format.read(directory / peft_io.WEIGHTS_NAME)
  old_c = json.loads((directory / peft_io.CONFIG_NAME).read_text())
  tensors = old_t if tensors is None else tensors
  config = old_c if config is None else config
  (directory / peft_io.CONFIG_NAME).write_text(json.dumps(config))
  (directory / peft_io.WEIGHTS_NAME).write_bytes(
      safetensors_format.encode(tensors, {"format": "pt"}, with_checksum=False))


# -- round trips ---------------------------------------------------------------


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_round_trip_into_plain_model_is_bit_exact(tmp_path, fresh_key, param_dtype):
  model = adapted(fresh_key(), param_dtype=param_dtype)
  dora_jax.save_adapter(model, tmp_path / "a")
  fresh = ToyLM(seed=0)
  assert dora_jax.load_adapter(fresh, tmp_path / "a") is fresh
  assert_same_adapters(fresh, model)
  x = inputs(fresh_key())
  np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


def test_round_trip_into_adapted_model_overwrites_everything(tmp_path, fresh_key):
  model = adapted(fresh_key(), rank=3, alpha=5.0, rslora=True)
  other = adapted(fresh_key(), rank=3, alpha=5.0, rslora=True)  # same layout, other values
  assert any(not np.array_equal(lora_flat(model)[k], v) for k, v in lora_flat(other).items())
  dora_jax.save_adapter(model, tmp_path)
  dora_jax.load_adapter(other, tmp_path)
  assert_same_adapters(other, model)


def test_mixed_ranks_write_patterns_and_round_trip(tmp_path, fresh_key):
  key = fresh_key()
  model = ToyLM(seed=0)
  dora_jax.apply_dora(model, targets=r"layers/\d+/self_attn/(q|v)_proj", rank=4, alpha=8,
                      rngs=nnx.Rngs(1))
  dora_jax.apply_dora(model, targets=r"layers/\d+/mlp/down_proj", rank=4, alpha=2.5,
                      rngs=nnx.Rngs(2))
  dora_jax.apply_dora(model, targets=r"lm_head", rank=2, alpha=8, rngs=nnx.Rngs(3))
  randomize(model, key)
  dora_jax.save_adapter(model, tmp_path, base_model_name_or_path="org/toy", task_type="CAUSAL_LM")
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert (config["r"], config["lora_alpha"]) == (4, 8)
  assert config["rank_pattern"] == {"^lm_head": 2}
  assert config["alpha_pattern"] == {
      "^" + naming.re.escape(f"model.layers.{i}.mlp.down_proj"): 2.5 for i in (0, 1)}
  assert config["target_modules"] == ["down_proj", "lm_head", "q_proj", "v_proj"]
  assert config["base_model_name_or_path"] == "org/toy" and config["task_type"] == "CAUSAL_LM"
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, tmp_path)
  assert_same_adapters(fresh, model)


def test_config_matches_peft_format(tmp_path, fresh_key):
  model = adapted(fresh_key(), targets=r"layers/0/self_attn/q_proj|lm_head", dropout=0.1)
  dora_jax.save_adapter(model, tmp_path)
  config = json.loads((tmp_path / "adapter_config.json").read_text())
  assert config["peft_type"] == "LORA" and config["use_dora"] is True
  assert config["bias"] == "none" and config["fan_in_fan_out"] is False
  assert config["init_lora_weights"] is True and config["use_rslora"] is False
  assert config["lora_dropout"] == 0.1 and config["r"] == 4 and config["lora_alpha"] == 8
  # Only layer 0's q_proj: the short name would also select layer 1's, so full names.
  assert config["target_modules"] == ["lm_head", "model.layers.0.self_attn.q_proj"]
  tensors, metadata = safetensors_format.read(tmp_path / "adapter_model.safetensors")
  assert metadata["format"] == "pt"
  shapes = {k: v.shape for k, v in tensors.items()}
  assert shapes == {
      "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 16),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (8, 4),
      "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": (8,),
      "base_model.model.lm_head.lora_A.weight": (4, 16),
      "base_model.model.lm_head.lora_B.weight": (10, 4),
      "base_model.model.lm_head.lora_magnitude_vector": (10,),
  }
  layer = dict(dora_jax.surgery.dora_layers(model))["layers/0/self_attn/q_proj"]
  np.testing.assert_array_equal(
      tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
      np.asarray(layer.lora_b[...]).reshape(4, 8).T)


def test_files_readable_by_the_safetensors_library(tmp_path, fresh_key):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  model = adapted(fresh_key())
  dora_jax.save_adapter(model, tmp_path)
  ours, _ = safetensors_format.read(tmp_path / "adapter_model.safetensors")
  theirs = safetensors_numpy.load_file(str(tmp_path / "adapter_model.safetensors"))
  assert sorted(ours) == sorted(theirs)
  for k in ours:
    np.testing.assert_array_equal(ours[k], theirs[k])
  # and the other way round
  arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.int64)}
  safetensors_numpy.save_file(arrays, str(tmp_path / "lib.safetensors"))
  back, _ = safetensors_format.read(tmp_path / "lib.safetensors")
  for k in arrays:
    np.testing.assert_array_equal(back[k], arrays[k])


def test_bfloat16_tensors_round_trip_through_the_format():
  x = np.asarray(jax.random.normal(jax.random.key(0), (3, 5), jnp.bfloat16))
  back, meta = safetensors_format.decode(safetensors_format.encode({"x": x}, {"k": "v"}))
  assert back["x"].dtype == x.dtype and meta == {"k": "v"}
  np.testing.assert_array_equal(back["x"].view(np.uint16), x.view(np.uint16))


def test_dtype_argument_casts(tmp_path, fresh_key):
  model = adapted(fresh_key(), param_dtype=jnp.bfloat16)
  dora_jax.save_adapter(model, tmp_path)
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, tmp_path, dtype=jnp.float32)
  for k, v in lora_flat(fresh).items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, lora_flat(model)[k].astype(np.float32))


def test_load_applies_config_dropout_and_rngs(tmp_path, fresh_key):
  model = adapted(fresh_key(), dropout=0.25)
  dora_jax.save_adapter(model, tmp_path)
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, tmp_path, rngs=nnx.Rngs(params=0, dropout=7))
  assert {l.dropout_rate for _, l in dora_jax.surgery.dora_layers(fresh)} == {0.25}


def test_custom_module_name_maps(tmp_path, fresh_key):
  model = adapted(fresh_key(), targets=r"layers/\d+/mlp/up_proj|lm_head")
  as_dict = {"lm_head": "output"}
  dora_jax.save_adapter(model, tmp_path / "d", module_name_map=as_dict)
  names = set(safetensors_format.read(tmp_path / "d" / "adapter_model.safetensors")[0])
  assert "base_model.model.output.lora_A.weight" in names
  assert "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight" in names
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, tmp_path / "d", module_name_map=as_dict)
  assert_same_adapters(fresh, model)

  fn = lambda path: "transformer." + path.replace("/", ".")
  dora_jax.save_adapter(model, tmp_path / "f", module_name_map=fn)
  names = set(safetensors_format.read(tmp_path / "f" / "adapter_model.safetensors")[0])
  assert "base_model.model.transformer.layers.0.mlp.up_proj.lora_B.weight" in names
  fresh = ToyLM(seed=0)
  with pytest.raises(AdapterFormatError, match="name no adaptable layer"):
    dora_jax.load_adapter(fresh, tmp_path / "f")  # default map: no such modules
  dora_jax.load_adapter(fresh, tmp_path / "f", module_name_map=fn)
  assert_same_adapters(fresh, model)

  with pytest.raises(ValueError, match="maps both"):
    dora_jax.save_adapter(model, tmp_path / "c", module_name_map=lambda p: "same")


def test_default_module_names():
  f = naming.default_module_name
  assert f("layers/0/self_attn/q_proj") == "model.layers.0.self_attn.q_proj"
  assert f("model/layers/3/mlp/down_proj") == "model.layers.3.mlp.down_proj"
  assert f("lm_head") == "lm_head"
  assert f("embed_tokens") == "model.embed_tokens"
  assert f("encoder/block/0/dense") == "encoder.block.0.dense"
  with pytest.raises(ValueError):
    f("")


def test_pattern_matching_follows_peft():
  keys = ["o_proj", "^model\\.layers\\.0\\.mlp\\.up_proj", "layers.1.mlp.up_proj"]
  assert naming.pattern_key(keys, "model.layers.0.self_attn.o_proj") == "o_proj"
  assert naming.pattern_key(keys, "model.layers.0.mlp.up_proj") == keys[1]
  assert naming.pattern_key(keys, "model.layers.1.mlp.up_proj") == keys[2]
  assert naming.pattern_key(keys[1:2], "x.model.layers.0.mlp.up_proj") is None
  assert naming.pattern_key(keys, "model.layers.0.mlp.gate_proj") is None


def test_save_refuses_what_peft_cannot_express(tmp_path, fresh_key):
  with pytest.raises(ValueError, match="no DoRA layers"):
    dora_jax.save_adapter(ToyLM(seed=0), tmp_path)
  model = ToyLM(seed=0)
  dora_jax.apply_dora(model, targets="lm_head", rank=2, alpha=4, rslora=True, rngs=nnx.Rngs(0))
  dora_jax.apply_dora(model, targets=r"layers/0/mlp/up_proj", rank=2, alpha=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="use_rslora"):
    dora_jax.save_adapter(model, tmp_path)
  assert not (tmp_path / "adapter_config.json").exists()


# -- corrupt or mismatched files -----------------------------------------------


@pytest.fixture
def saved(tmp_path, fresh_key):
  model = adapted(fresh_key(), targets=r"layers/\d+/self_attn/(q|k|o)_proj|lm_head")
  dora_jax.save_adapter(model, tmp_path)
  return model, tmp_path


def _load_fresh(directory, **kwargs):
  return dora_jax.load_adapter(ToyLM(seed=0), directory, **kwargs)


def test_missing_tensor(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  key = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"
  del tensors[key]
  rewrite(d, tensors=tensors)
  with pytest.raises(AdapterFormatError, match="missing tensor.*" + key.replace(".", r"\.")):
    _load_fresh(d)


def test_wrong_shape_names_tensor_and_both_shapes(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  key = "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"
  tensors[key] = np.zeros((15, 4), np.float32)
  rewrite(d, tensors=tensors)
  with pytest.raises(AdapterFormatError) as err:
    _load_fresh(d)
  assert key in str(err.value) and "(15, 4)" in str(err.value) and "(16, 4)" in str(err.value)


def test_wrong_magnitude_shape(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  key = "base_model.model.lm_head.lora_magnitude_vector"
  tensors[key] = np.ones((11,), np.float32)
  rewrite(d, tensors=tensors)
  with pytest.raises(AdapterFormatError, match=r"lm_head\.lora_magnitude_vector.*\(11,\).*\(10,\)"):
    _load_fresh(d)


def test_wrong_rank_in_config(saved):
  _, d = saved
  config = json.loads((d / "adapter_config.json").read_text())
  config["r"] = 8
  rewrite(d, config=config)
  with pytest.raises(AdapterFormatError, match=r"rank 8.*shape \(4, 16\) \(rank 4\)"):
    _load_fresh(d)


def test_wrong_rank_pattern_in_config(saved):
  _, d = saved
  config = json.loads((d / "adapter_config.json").read_text())
  config["rank_pattern"] = {"lm_head": 2}
  rewrite(d, config=config)
  with pytest.raises(AdapterFormatError, match=r"module 'lm_head' rank 2"):
    _load_fresh(d)


def test_target_modules_must_cover_the_tensors(saved):
  _, d = saved
  config = json.loads((d / "adapter_config.json").read_text())
  config["target_modules"] = ["q_proj", "k_proj", "o_proj"]  # lm_head left out
  rewrite(d, config=config)
  with pytest.raises(AdapterFormatError, match="module\\(s\\) lm_head that target_modules"):
    _load_fresh(d)
  config["target_modules"] = r".*\.(q|k|o)_proj|lm_head"  # a regex covering everything
  rewrite(d, config=config)
  _load_fresh(d)


def test_edited_config_breaks_the_link(saved):
  _, d = saved
  config = json.loads((d / "adapter_config.json").read_text())
  config["lora_alpha"] = 9  # same shapes, different numbers: only the link catches it
  (d / "adapter_config.json").write_text(json.dumps(config))
  with pytest.raises(AdapterFormatError, match="not the config"):
    _load_fresh(d)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_safetensors(saved, keep):
  _, d = saved
  path = d / "adapter_model.safetensors"
  data = path.read_bytes()
  path.write_bytes(data[:keep] if keep >= 0 else data[:-3])
  with pytest.raises(AdapterFormatError, match="not a valid safetensors file"):
    _load_fresh(d)


def test_corrupt_header(saved):
  _, d = saved
  path = d / "adapter_model.safetensors"
  data = bytearray(path.read_bytes())
  data[10] = ord("{")
  path.write_bytes(bytes(data))
  with pytest.raises(AdapterFormatError, match="not JSON|not a valid"):
    _load_fresh(d)


def _flip_and_load(d, path, data, offset, bit):
  corrupt = bytearray(data)
  corrupt[offset] ^= 1 << bit
  path.write_bytes(bytes(corrupt))
  try:
    _load_fresh(d)
  except AdapterFormatError as err:
    return str(err)
  finally:
    path.write_bytes(data)
  return None


def test_bit_flips_in_the_weights_file_are_refused(saved, fresh_key):
  model, d = saved
  path = d / peft_io.WEIGHTS_NAME
  data = path.read_bytes()
  header_end = 8 + int.from_bytes(data[:8], "little")
  rng = np.random.default_rng(int(jax.random.randint(fresh_key(), (), 0, 2**30)))
  # The tensor data: what the format cannot check; the stored checksum catches it.
  for offset in rng.integers(header_end, len(data), size=40):
    err = _flip_and_load(d, path, data, int(offset), int(rng.integers(8)))
    assert err is not None, f"a flipped bit at data byte {offset} loaded"
    assert str(path) in err and "checksum" in err, err
  # The header (length, JSON, metadata): refused too, by the parser or the checksum.
  for offset in rng.integers(0, header_end, size=40):
    err = _flip_and_load(d, path, data, int(offset), int(rng.integers(8)))
    assert err is not None, f"a flipped bit at header byte {offset} loaded"
  # Every bit of the checksum's key name (a renamed key once left the file unverified).
  key = safetensors_format.CHECKSUM_KEY.encode()
  start = data.index(key)
  for offset in range(start, start + len(key)):
    for bit in range(8):
      assert _flip_and_load(d, path, data, offset, bit) is not None, (offset, bit)
  fresh = _load_fresh(d)  # the intact file still loads
  assert_same_adapters(fresh, model)


def test_files_without_a_checksum_load(saved):
  """Files written by PEFT (safetensors' writer) carry no checksum: loaded as before."""
  model, d = saved
  rewrite(d)
  _, metadata = safetensors_format.read(d / peft_io.WEIGHTS_NAME)
  assert metadata == {"format": "pt"}
  assert_same_adapters(_load_fresh(d), model)


def test_checksum_lives_in_the_metadata_where_other_readers_ignore_it(tmp_path, fresh_key):
  safetensors = pytest.importorskip("safetensors")
  model = adapted(fresh_key())
  dora_jax.save_adapter(model, tmp_path)
  path = tmp_path / peft_io.WEIGHTS_NAME
  with safetensors.safe_open(str(path), "np") as f:
    stored = f.metadata()
  assert len(stored[safetensors_format.CHECKSUM_KEY]) == 64 and stored["format"] == "pt"
  tensors, metadata = safetensors_format.read(path)  # verified, and not handed back
  assert safetensors_format.CHECKSUM_KEY not in metadata
  again = safetensors_format.encode(tensors, {**metadata, safetensors_format.CHECKSUM_KEY: "0" * 64})
  assert safetensors_format.decode(again)[1] == metadata  # a stale value passed in is recomputed
  assert safetensors_format.CHECKSUM_ALGORITHM_KEY not in metadata
  with pytest.raises(ValueError, match="need with_checksum=True"):
    safetensors_format.encode(tensors, metadata, with_checksum=False)
  foreign = {k: v for k, v in metadata.items() if not k.startswith("dora_jax.")}
  plain = safetensors_format.encode(tensors, foreign, with_checksum=False)
  header = json.loads(plain[8:8 + int.from_bytes(plain[:8], "little")])
  assert header["__metadata__"] == foreign
  # dora_jax's keys without the checksum: a file whose checksum key was renamed
  # (a flipped bit) is refused, not read unverified.
  renamed = bytearray(again)
  at = bytes(renamed).index(safetensors_format.CHECKSUM_KEY.encode())
  renamed[at + len("dora_jax.sha")] ^= 1
  with pytest.raises(safetensors_format.SafetensorsError, match="no checksum"):
    safetensors_format.decode(bytes(renamed))


def test_paths_that_are_not_directories(tmp_path, fresh_key):
  model = adapted(fresh_key())
  file = tmp_path / "adapter.txt"
  file.write_text("not an adapter")
  with pytest.raises(NotADirectoryError, match="adapter.txt: exists and is not a directory"):
    dora_jax.save_adapter(model, file)
  with pytest.raises(NotADirectoryError, match="is not a directory"):
    dora_jax.save_adapter(model, file / "inside")
  with pytest.raises(NotADirectoryError, match="adapter.txt: exists and is not a directory"):
    dora_jax.save_adapter_state(model, file, overwrite=True)
  with pytest.raises(AdapterFormatError, match="adapter.txt: not a directory"):
    dora_jax.load_adapter(ToyLM(seed=0), file)
  with pytest.raises(NotADirectoryError, match="adapter.txt: not a directory"):
    dora_jax.restore_adapter_state(model, file)
  assert file.read_text() == "not an adapter"
  assert sorted(os.listdir(tmp_path)) == ["adapter.txt"]


def test_save_through_a_symlink_and_from_inside_the_directory(tmp_path, fresh_key, monkeypatch):
  first, second, third = (adapted(fresh_key()) for _ in range(3))
  real, link = tmp_path / "real", tmp_path / "link"
  dora_jax.save_adapter(first, real)
  link.symlink_to(real, target_is_directory=True)
  dora_jax.save_adapter(second, link)  # the real directory is replaced; the link stays a link
  assert link.is_symlink() and os.path.realpath(link) == os.fspath(real)
  assert_same_adapters(_load_fresh(real), second)
  monkeypatch.chdir(real)
  dora_jax.save_adapter(third, ".")
  assert os.getcwd() == os.fspath(real) and os.path.isfile(peft_io.CONFIG_NAME)
  assert_same_adapters(_load_fresh("."), third)


def test_extra_unknown_tensor(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  tensors["base_model.model.lm_head.base_layer.weight"] = np.zeros((10, 16), np.float32)
  tensors["something_else"] = np.zeros((2,), np.float32)
  rewrite(d, tensors=tensors)
  with pytest.raises(AdapterFormatError) as err:
    _load_fresh(d)
  assert "lm_head.base_layer.weight" in str(err.value) and "something_else" in str(err.value)


def test_tensor_for_a_module_the_model_lacks(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  for k in list(tensors):
    if ".lm_head." in k:
      tensors[k.replace(".lm_head.", ".score.")] = tensors.pop(k)
  config = json.loads((d / "adapter_config.json").read_text())
  config["target_modules"] = [*config["target_modules"], "score"]
  rewrite(d, tensors=tensors, config=config)
  with pytest.raises(AdapterFormatError, match="module\\(s\\) score name no adaptable layer"):
    _load_fresh(d)


def test_non_finite_values(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  key = "base_model.model.lm_head.lora_A.weight"
  tensors[key] = tensors[key].copy()
  tensors[key][1, 2] = np.nan
  rewrite(d, tensors=tensors)
  with pytest.raises(AdapterFormatError, match="non-finite"):
    _load_fresh(d)


def test_missing_config_and_unsupported_configs(saved):
  _, d = saved
  config = json.loads((d / "adapter_config.json").read_text())
  for change, pattern in [({"use_dora": False}, "not DoRA"), ({"bias": "all"}, "bias"),
                          ({"peft_type": "IA3"}, "peft_type"), ({"fan_in_fan_out": True},
                                                                 "fan_in_fan_out"),
                          ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                          ({"r": 0}, "positive")]:
    rewrite(d, config={**config, **change})
    with pytest.raises(AdapterFormatError, match=pattern):
      _load_fresh(d)
  (d / "adapter_config.json").unlink()
  with pytest.raises(AdapterFormatError, match="adapter_config.json: missing"):
    _load_fresh(d)


def test_dtype_mismatch_with_adapted_layer(saved, fresh_key):
  model, d = saved
  target = adapted(fresh_key(), targets=r"layers/\d+/self_attn/(q|k|o)_proj|lm_head",
                   param_dtype=jnp.bfloat16)
  with pytest.raises(AdapterFormatError, match="dtype float32 but layer .* bfloat16"):
    dora_jax.load_adapter(target, d)
  dora_jax.load_adapter(target, d, dtype=jnp.bfloat16)
  for k, v in lora_flat(target).items():
    np.testing.assert_array_equal(v, lora_flat(model)[k].astype(jnp.bfloat16))


def test_config_mismatch_with_adapted_layer(saved, fresh_key):
  _, d = saved
  target = adapted(fresh_key(), targets=r"layers/\d+/self_attn/(q|k|o)_proj|lm_head", alpha=3.0)
  with pytest.raises(AdapterFormatError, match=r"alpha 3\.0 vs 8\.0"):
    dora_jax.load_adapter(target, d)


def test_strict_requires_every_adapted_layer_covered(saved, fresh_key):
  model, d = saved
  target = adapted(fresh_key(), targets=r"layers/\d+/self_attn/(q|k|v|o)_proj|lm_head")
  with pytest.raises(AdapterFormatError, match="does not cover: layers/0/self_attn/v_proj"):
    dora_jax.load_adapter(target, d)
  v_before = lora_flat(target)["layers/0/self_attn/v_proj/lora_b"]
  dora_jax.load_adapter(target, d, strict=False)
  np.testing.assert_array_equal(lora_flat(target)["layers/0/self_attn/v_proj/lora_b"], v_before)
  np.testing.assert_array_equal(lora_flat(target)["lm_head/lora_b"], lora_flat(model)["lm_head/lora_b"])


def test_failed_load_leaves_the_model_unchanged(saved):
  _, d = saved
  tensors, _ = safetensors_format.read(d / "adapter_model.safetensors")
  key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"  # sorts after others
  tensors[key] = np.zeros((7, 4), np.float32)
  rewrite(d, tensors=tensors)
  model = ToyLM(seed=0)
  before = nnx.to_flat_state(nnx.state(model))
  with pytest.raises(AdapterFormatError):
    dora_jax.load_adapter(model, d)
  assert not dora_jax.surgery.dora_layers(model)
  after = nnx.to_flat_state(nnx.state(model))
  assert [p for p, _ in before] == [p for p, _ in after]


# -- crash safety ----------------------------------------------------------------
#
# A save replaces the adapter directory by a swap (dora_jax.io.atomic). The
# file-system steps it takes go through atomic's _rename, _exchange, _rmtree,
# fsync_tree and fsync_dir; the first test copies the directory's parent before
# and after every one of them, i.e. every state a SIGKILL between two steps can
# leave, and loads each copy. (tests/test_crash_safety.py kills real saving
# processes at random instants.)

_STEPS = ("_rename", "_exchange", "_rmtree", "fsync_tree", "fsync_dir")


def _no_exchange(monkeypatch):
  """The two-rename swap used where renameat2(RENAME_EXCHANGE) is unavailable."""
  monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)


def _leftovers(parent: Path, name: str) -> list[str]:
  """Siblings of ``parent/name`` left by a save (staged versions, the lock file)."""
  return sorted(p for p in os.listdir(parent) if p.startswith(f".{name}{atomic.SIBLING_TAG}"))


def _which(model, old, new) -> str:
  got, o, n = lora_flat(model), lora_flat(old), lora_flat(new)
  if sorted(got) == sorted(o) and all(np.array_equal(got[k], o[k]) for k in got):
    return "old"
  if sorted(got) == sorted(n) and all(np.array_equal(got[k], n[k]) for k in got):
    return "new"
  return "mixture"


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("existing", [True, False], ids=["overwrite", "first-save"])
def test_every_crash_state_of_a_save_loads_old_or_new(tmp_path, fresh_key, monkeypatch, exchange,
                                                      existing):
  old, new = adapted(fresh_key()), adapted(fresh_key(), targets=r"layers/\d+/mlp/up_proj|lm_head")
  parent, snaps = tmp_path / "p", tmp_path / "snaps"
  target = parent / "a"
  if existing:
    dora_jax.save_adapter(old, target)
    (target / "README.md").write_text("kept")
    (target / "runs").mkdir()
    (target / "runs" / "log.txt").write_text("kept too")
  if not exchange:
    _no_exchange(monkeypatch)
  count = iter(range(10_000))
  for name in _STEPS:
    def step(*args, _real=getattr(atomic, name), **kwargs):
      shutil.copytree(parent, snaps / f"{next(count):03d}", symlinks=True)
      out = _real(*args, **kwargs)
      shutil.copytree(parent, snaps / f"{next(count):03d}", symlinks=True)
      return out
    monkeypatch.setattr(atomic, name, step)
  dora_jax.save_adapter(new, target)
  monkeypatch.undo()
  states = sorted(os.listdir(snaps))
  assert len(states) >= 12
  seen = collections.Counter()
  for state in states:
    copy = snaps / state / "a"
    fresh = ToyLM(seed=0)
    try:
      dora_jax.load_adapter(fresh, copy)
      seen[_which(fresh, old, new)] += 1
    except AdapterFormatError as err:
      assert not existing and "missing" in str(err), (state, err)  # a first save: nothing yet
      assert not dora_jax.surgery.dora_layers(fresh)
      seen["none"] += 1
      continue
    # The load finished what the crash interrupted: no leftovers, other files back in place.
    assert _leftovers(snaps / state, "a") == [], state
    if existing:
      assert (copy / "README.md").read_text() == "kept", state
      assert (copy / "runs" / "log.txt").read_text() == "kept too", state
  assert seen["mixture"] == 0, seen
  assert seen["new"] >= 2 and (seen["old"] if existing else seen["none"]) >= 2, seen
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, target)
  assert _which(fresh, old, new) == "new" and _leftovers(parent, "a") == []
  if existing:
    assert sorted(os.listdir(target)) == sorted(peft_io.ADAPTER_FILES + ("README.md", "runs"))


class Crash(RuntimeError):
  pass


def _crash_on(monkeypatch, name, call):
  """Make call number ``call`` of ``atomic.<name>`` raise; returns the counter (``"at": 0``
  disarms it, ``"n": 0`` restarts the count)."""
  real = getattr(atomic, name)
  trap = {"n": 0, "at": call}

  def wrapper(*args, **kwargs):
    trap["n"] += 1
    if trap["n"] == trap["at"]:
      raise Crash(f"simulated crash in {name} call {trap['at']}")
    return real(*args, **kwargs)

  monkeypatch.setattr(atomic, name, wrapper)
  return trap


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("step", _STEPS)
def test_a_failing_step_leaves_old_or_new_and_the_next_save_recovers(tmp_path, fresh_key,
                                                                      monkeypatch, exchange, step):
  old, new, newer = adapted(fresh_key()), adapted(fresh_key()), adapted(fresh_key())
  target = tmp_path / "a"
  dora_jax.save_adapter(old, target)
  (target / "notes.txt").write_text("mine")
  if not exchange:
    _no_exchange(monkeypatch)
  if step == "_exchange" and not exchange:
    pytest.skip("the two-rename swap does not exchange")
  trap, outcomes, failed_at = _crash_on(monkeypatch, step, 1), set(), 0
  while True:
    trap["n"] = 0
    try:
      dora_jax.save_adapter(new, target)
      break  # every call of this step has been made to fail once
    except Crash:
      pass
    trap["at"], failed_at = 0, trap["at"]
    fresh = ToyLM(seed=0)
    dora_jax.load_adapter(fresh, target)
    outcomes.add(_which(fresh, old, new))
    assert (target / "notes.txt").read_text() == "mine"
    dora_jax.save_adapter(old, target)  # back to the old adapter for the next failure point
    trap["n"], trap["at"] = 0, failed_at + 1
  trap["at"] = 0
  assert failed_at >= 1 and "mixture" not in outcomes, outcomes
  dora_jax.save_adapter(newer, target)
  fresh = ToyLM(seed=0)
  dora_jax.load_adapter(fresh, target)
  assert _which(fresh, old, newer) == "new"
  assert _leftovers(tmp_path, "a") == [] and (target / "notes.txt").read_text() == "mine"


def test_a_save_waits_for_a_load_in_progress(tmp_path, fresh_key):
  import threading

  old, new = adapted(fresh_key()), adapted(fresh_key())
  target = tmp_path / "a"
  dora_jax.save_adapter(old, target)
  with atomic.reading(target, managed=peft_io.ADAPTER_FILES):  # what a load holds
    writer = threading.Thread(target=dora_jax.save_adapter, args=(new, target))
    writer.start()
    writer.join(0.5)
    assert writer.is_alive(), "the save did not wait for the load"
    assert _which(_load_fresh(target), old, new) == "old"  # loads share the lock
  writer.join(30)
  assert not writer.is_alive()
  assert _which(_load_fresh(target), old, new) == "new"
  assert _leftovers(tmp_path, "a") == []  # nor a lock file, once nobody holds it


def test_write_file_replaces_atomically(tmp_path, monkeypatch):
  path = tmp_path / "f.bin"
  atomic.write_file(path, b"old")
  _crash_on(monkeypatch, "_replace", 1)
  with pytest.raises(Crash):
    atomic.write_file(path, b"new")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["f.bin"]


# -- Orbax -------------------------------------------------------------------


def test_adapter_state_checkpoint_round_trip(tmp_path, fresh_key):
  model = adapted(fresh_key(), param_dtype=jnp.bfloat16)
  dora_jax.save_adapter_state(model, tmp_path / "ckpt")
  target = adapted(fresh_key(), param_dtype=jnp.bfloat16)
  dora_jax.restore_adapter_state(target, tmp_path / "ckpt")
  assert_same_adapters(target, model)
  with pytest.raises(Exception):
    dora_jax.save_adapter_state(model, tmp_path / "ckpt")  # exists, no overwrite
  dora_jax.save_adapter_state(target, tmp_path / "ckpt", overwrite=True)


def test_checkpoint_mismatches_are_clear(tmp_path, fresh_key):
  model = adapted(fresh_key())
  dora_jax.save_adapter_state(model, tmp_path / "ckpt")
  with pytest.raises(ValueError, match="rank"):
    dora_jax.restore_adapter_state(adapted(fresh_key(), rank=2), tmp_path / "ckpt")
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
  with pytest.raises(ValueError, match="no optimizer state"):
    dora_jax.restore_adapter_state(model, tmp_path / "ckpt", opt)
  with pytest.raises(FileNotFoundError):
    dora_jax.restore_adapter_state(model, tmp_path / "nothing")


def test_corrupt_checkpoint_metadata_names_the_file(tmp_path, fresh_key):
  model = adapted(fresh_key(), dropout=0.1)
  dora_jax.save_adapter_state(model, tmp_path / "ckpt")
  json_files = sorted(p for p in (tmp_path / "ckpt").rglob("*")
                      if p.name in ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata")
                      or p.parent.name == "array_metadatas")
  assert len(json_files) >= 6
  rng = np.random.default_rng(int(jax.random.randint(fresh_key(), (), 0, 2**30)))
  target = adapted(fresh_key(), dropout=0.1)
  for path in json_files:
    data = path.read_bytes()
    corrupt = bytearray(data)
    corrupt[int(rng.integers(len(data)))] = 0xFF  # never valid UTF-8
    path.write_bytes(bytes(corrupt))
    with pytest.raises(ValueError) as info:
      dora_jax.restore_adapter_state(target, tmp_path / "ckpt")
    assert not isinstance(info.value, UnicodeDecodeError)
    assert str(path) in str(info.value) and "corrupt checkpoint metadata" in str(info.value)
    path.write_bytes(data)
  dora_jax.restore_adapter_state(target, tmp_path / "ckpt")
  assert_same_adapters(target, model)


def test_checkpoint_overwrite_replaces_the_whole_directory(tmp_path, fresh_key):
  model, other = adapted(fresh_key()), adapted(fresh_key())
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.LoRAParam)
  dora_jax.save_adapter_state(model, tmp_path / "ckpt", opt)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    dora_jax.save_adapter_state(other, tmp_path / "ckpt")
  dora_jax.save_adapter_state(other, tmp_path / "ckpt", overwrite=True)  # no optimizer now
  assert not (tmp_path / "ckpt" / "optimizer").exists()
  target = adapted(fresh_key())
  dora_jax.restore_adapter_state(target, tmp_path / "ckpt")
  assert_same_adapters(target, other)
  assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no staged versions, no lock file left


# One optax transformation for every trainer: nnx.jit keys its cache on the optimizer's
# (static) tx, so a fresh optax.adamw(...) per model would recompile the step.
_TX = optax.adamw(3e-2, weight_decay=0.01)


def _trainer(seed, *, dropout=0.1):
  model = ToyLM(seed=0)  # the same frozen base every time
  dora_jax.apply_dora(model, targets=ALL_PROJ + "|lm_head", rank=4, alpha=8, dropout=dropout,
                      rngs=nnx.Rngs(params=seed, dropout=seed + 1))
  randomize(model, jax.random.key(seed))
  optimizer = nnx.Optimizer(model, _TX, wrt=nnx.LoRAParam)
  return model, optimizer


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(m):
    return jnp.mean((m(x) - y) ** 2)
  loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
  optimizer.update(model, grads)
  return loss


def test_resumed_training_is_bit_identical(tmp_path, fresh_key):
  k = jax.random.split(fresh_key(), 2)
  xs = jax.random.normal(k[0], (6, 4, 3, 16))
  ys = jax.random.normal(k[1], (6, 4, 3, 10))

  straight, opt = _trainer(1)
  for i in range(6):
    _train_step(straight, opt, xs[i], ys[i])

  first, opt1 = _trainer(1)
  for i in range(3):
    _train_step(first, opt1, xs[i], ys[i])
  dora_jax.save_adapter_state(first, tmp_path / "step3", opt1)

  resumed, opt2 = _trainer(77)  # different adapters, dropout keys and optimizer state
  dora_jax.restore_adapter_state(resumed, tmp_path / "step3", opt2)
  for i in range(3, 6):
    _train_step(resumed, opt2, xs[i], ys[i])

  assert_same_adapters(resumed, straight)
  a = jax.tree.leaves(nnx.state(opt2))
  b = jax.tree.leaves(nnx.state(opt))
  assert len(a) == len(b)
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  assert int(opt2.step[...]) == 6
  # And the checkpoint mattered: without it the runs differ.
  other, opt3 = _trainer(77)
  for i in range(3, 6):
    _train_step(other, opt3, xs[i], ys[i])
  assert not np.array_equal(lora_flat(other)["lm_head/lora_b"], lora_flat(straight)["lm_head/lora_b"])


# -- merged export -------------------------------------------------------------


@pytest.mark.parametrize("separator", ["/", "."])
def test_export_merged(tmp_path, fresh_key, separator):
  model = adapted(fresh_key(), targets=ALL_PROJ + "|lm_head")
  path = dora_jax.export_merged(model, tmp_path / "merged.safetensors", separator=separator)
  tensors, metadata = safetensors_format.read(path)
  assert metadata["separator"] == separator
  merged = dora_jax.merge(model)
  want = {separator.join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(merged, nnx.Param))}
  assert sorted(tensors) == sorted(want)
  assert all("lora" not in k and "magnitude" not in k for k in tensors)
  q = separator.join(["layers", "0", "self_attn", "q_proj", "kernel"])
  assert tensors[q].shape == (16, 2, 4)
  for k in want:
    np.testing.assert_array_equal(tensors[k], want[k])
  # A plain model loaded from the file computes what the adapted model computes.
  plain = ToyLM(seed=5)
  state = nnx.state(plain, nnx.Param)
  flat = {separator.join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
  for k, v in flat.items():
    v[...] = jnp.asarray(tensors[k])
  x = inputs(fresh_key())
  assert rel_err(plain(x), model(x)) < 1e-5
  assert rel_err(ToyLM(seed=0)(x), model(x)) > 1e-2
  assert dora_jax.surgery.dora_layers(model)  # the model itself is untouched


# -- other layouts ---------------------------------------------------------------


def test_project_llama_port_gets_peft_names(tmp_path, fresh_key):
  models = pytest.importorskip("dora_jax.models")
  cfg = models.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  model = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  dora_jax.apply_dora(model, targets=r"model/layers/\d+/self_attn/(q|v)_proj|lm_head", rank=2,
                      alpha=4, rngs=nnx.Rngs(1))
  randomize(model, fresh_key())
  dora_jax.save_adapter(model, tmp_path)
  names = sorted(safetensors_format.read(tmp_path / "adapter_model.safetensors")[0])
  assert names[:3] == ["base_model.model.lm_head.lora_A.weight",
                       "base_model.model.lm_head.lora_B.weight",
                       "base_model.model.lm_head.lora_magnitude_vector"]
  assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in names
  assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
      "lm_head", "q_proj", "v_proj"]
  fresh = models.LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
  dora_jax.load_adapter(fresh, tmp_path)
  assert_same_adapters(fresh, model)


EMBED_CONV_TARGETS = "embed|conv|head"


def embed_conv_adapted(key, *, rank=3, alpha=6.0):
  model = EmbedConvNet(seed=0)
  dora_jax.apply_dora(model, targets=EMBED_CONV_TARGETS, rank=rank, alpha=alpha,
                      rngs=nnx.Rngs(1))
  randomize(model, key)
  return model


def embed_conv_ids(key):
  return jax.random.randint(key, (2, 4, 5), 0, 12)


def test_embed_conv_round_trip_is_bit_exact(tmp_path, fresh_key):
  model = embed_conv_adapted(fresh_key())
  dora_jax.save_adapter(model, tmp_path)
  tensors, _ = safetensors_format.read(tmp_path / peft_io.WEIGHTS_NAME)
  assert {k: tuple(v.shape) for k, v in tensors.items()} == {
      "base_model.model.embed.lora_embedding_A": (3, 12),
      "base_model.model.embed.lora_embedding_B": (8, 3),
      "base_model.model.embed.lora_magnitude_vector": (8,),
      "base_model.model.conv.lora_A.weight": (3, 8, 3, 3),
      "base_model.model.conv.lora_B.weight": (6, 3, 1, 1),
      "base_model.model.conv.lora_magnitude_vector": (1, 6, 1, 1),
      "base_model.model.head.lora_A.weight": (3, 6),
      "base_model.model.head.lora_B.weight": (5, 3),
      "base_model.model.head.lora_magnitude_vector": (5,)}
  config = json.loads((tmp_path / peft_io.CONFIG_NAME).read_text())
  assert config["target_modules"] == ["conv", "embed", "head"]
  assert (config["r"], config["lora_alpha"]) == (3, 6)
  fresh = EmbedConvNet(seed=0)
  dora_jax.load_adapter(fresh, tmp_path)
  assert_same_adapters(fresh, model)
  ids = embed_conv_ids(fresh_key())
  assert rel_err(EmbedConvNet(seed=0)(ids), model(ids)) > 1e-2  # the adapter matters
  np.testing.assert_array_equal(np.asarray(fresh(ids)), np.asarray(model(ids)))
  # Loading again into the now adapted model overwrites with the same values.
  dora_jax.load_adapter(fresh, tmp_path)
  assert_same_adapters(fresh, model)


@pytest.mark.parametrize("key, shape", [
    ("base_model.model.conv.lora_A.weight", (3, 8, 3, 2)),
    ("base_model.model.conv.lora_magnitude_vector", (6,)),
    ("base_model.model.embed.lora_embedding_B", (8, 2)),
])
def test_embed_conv_wrong_shape_names_the_tensor(tmp_path, fresh_key, key, shape):
  dora_jax.save_adapter(embed_conv_adapted(fresh_key()), tmp_path)
  tensors, _ = safetensors_format.read(tmp_path / peft_io.WEIGHTS_NAME)
  good = tuple(tensors[key].shape)
  tensors[key] = np.zeros(shape, np.float32)
  rewrite(tmp_path, tensors=tensors)
  fresh = EmbedConvNet(seed=0)
  with pytest.raises(AdapterFormatError) as err:
    dora_jax.load_adapter(fresh, tmp_path)
  msg = str(err.value)
  assert key in msg and str(shape) in msg and str(good) in msg
  assert not dora_jax.surgery.dora_layers(fresh)  # nothing was touched


def test_embed_conv_missing_or_foreign_tensor_raises(tmp_path, fresh_key):
  dora_jax.save_adapter(embed_conv_adapted(fresh_key()), tmp_path)
  tensors, _ = safetensors_format.read(tmp_path / peft_io.WEIGHTS_NAME)
  missing = dict(tensors)
  del missing["base_model.model.embed.lora_embedding_A"]
  rewrite(tmp_path, tensors=missing)
  with pytest.raises(AdapterFormatError, match=r"missing tensor.*embed\.lora_embedding_A"):
    dora_jax.load_adapter(EmbedConvNet(seed=0), tmp_path)
  # Linear-style names on an embedding: PEFT would not load them into nn.Embedding.
  foreign = {k.replace("lora_embedding_A", "lora_A.weight").replace(
      "lora_embedding_B", "lora_B.weight"): v for k, v in tensors.items()}
  rewrite(tmp_path, tensors=foreign)
  with pytest.raises(AdapterFormatError, match=r"embed\.lora_A\.weight.*Embed"):
    dora_jax.load_adapter(EmbedConvNet(seed=0), tmp_path)

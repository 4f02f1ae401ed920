"""Weight-decomposition analysis: known answers, a float64 reference, the CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dora_jax
from dora_jax import analysis
from dora_jax.analysis import __main__ as cli
from dora_jax.analysis import checkpoints, plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _f64(value) -> np.ndarray:
  """Any float array (bf16 included) as float64 numpy, exactly."""
  if np.asarray(value).dtype == np.float64:
    return np.asarray(value)
  return np.asarray(jnp.asarray(value).astype(jnp.float32)).astype(np.float64)


def paper_reference(base, tuned):
  """The paper's eqs. (4)-(5) verbatim in float64 numpy, columns = output columns."""
  w0, w = _f64(base), _f64(tuned)
  m0 = np.linalg.norm(w0, axis=0)
  m = np.linalg.norm(w, axis=0)
  cos = np.sum(w * w0, axis=0) / (m * m0)
  dm, dd = np.abs(m - m0), 1.0 - cos
  return dm, dd, dm.mean(), dd.mean()


def _rng(seed=0):
  return np.random.default_rng(seed)


# ------------------------------------------------------------------ decompose


def test_pure_column_rescaling_has_no_direction_change():
  rng = _rng(1)
  w0 = rng.normal(size=(32, 12)).astype(np.float32)
  c = rng.uniform(0.5, 2.0, size=12).astype(np.float32)
  out = analysis.decompose(w0, w0 * c)
  np.testing.assert_allclose(out.direction_change, 0.0, atol=1e-7)
  m0 = np.linalg.norm(w0.astype(np.float64), axis=0)
  np.testing.assert_allclose(out.magnitude_change, np.abs(c - 1) * m0, rtol=1e-5)
  np.testing.assert_allclose(out.delta_m, np.mean(np.abs(c - 1) * m0), rtol=1e-5)
  np.testing.assert_allclose(out.base_magnitude, m0, rtol=1e-6)
  np.testing.assert_allclose(out.tuned_magnitude, c * m0, rtol=1e-5)


def test_pure_rotation_at_fixed_norm_has_no_magnitude_change():
  rng = _rng(2)
  d_in, d_out = 24, 10
  w0 = rng.normal(size=(d_in, d_out))
  theta = rng.uniform(0.01, 2.5, size=d_out)
  # p_j: a unit vector orthogonal to w0_j; rotate w0_j by theta_j in that plane.
  p = rng.normal(size=(d_in, d_out))
  p -= w0 * np.sum(p * w0, axis=0) / np.sum(w0 * w0, axis=0)
  p /= np.linalg.norm(p, axis=0)
  w = np.cos(theta) * w0 + np.sin(theta) * np.linalg.norm(w0, axis=0) * p
  out = analysis.decompose(w0.astype(np.float32), w.astype(np.float32))
  np.testing.assert_allclose(out.magnitude_change, 0.0, atol=2e-6 * np.linalg.norm(w0, axis=0).max())
  np.testing.assert_allclose(out.direction_change, 1 - np.cos(theta), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.delta_d, np.mean(1 - np.cos(theta)), rtol=1e-5)


def test_orthogonal_matrix_keeps_magnitudes():
  rng = _rng(3)
  w0 = rng.normal(size=(16, 9))
  q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
  out = analysis.decompose(w0.astype(np.float32), (q @ w0).astype(np.float32))
  np.testing.assert_allclose(out.magnitude_change, 0.0, atol=1e-5)
  _, dd, _, _ = paper_reference(w0, q @ w0)
  np.testing.assert_allclose(out.direction_change, dd, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, 5), (64, 33), (3, 1)])
@pytest.mark.parametrize("step", [1e-3, 0.3, 3.0])
def test_random_matches_float64_reference(shape, step):
  rng = _rng(hash((shape, step)) % 2**31)
  w0 = rng.normal(size=shape).astype(np.float32)
  w = (w0 + step * rng.normal(size=shape)).astype(np.float32)
  dm, dd, mean_m, mean_d = paper_reference(w0, w)
  out = analysis.decompose(w0, w)
  assert out.magnitude_change.dtype == jnp.float32
  np.testing.assert_allclose(out.magnitude_change, dm, rtol=1e-4, atol=1e-6 * np.abs(w0).max())
  np.testing.assert_allclose(out.direction_change, dd, rtol=1e-4, atol=1e-9)
  np.testing.assert_allclose(out.delta_m, mean_m, rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(out.delta_d, mean_d, rtol=1e-4, atol=1e-9)


def test_float64_inputs_match_reference_tightly():
  rng = _rng(4)
  w0 = rng.normal(size=(40, 20))
  w = w0 + 0.05 * rng.normal(size=w0.shape)
  dm, dd, mean_m, mean_d = paper_reference(w0, w)
  with jax.enable_x64(True):
    out = analysis.decompose(jnp.asarray(w0), jnp.asarray(w))
    assert out.direction_change.dtype == jnp.float64
    np.testing.assert_allclose(out.magnitude_change, dm, rtol=1e-10)
    np.testing.assert_allclose(out.direction_change, dd, rtol=1e-9)
    np.testing.assert_allclose([out.delta_m, out.delta_d], [mean_m, mean_d], rtol=1e-10)


def test_tiny_updates_stay_accurate_in_float32():
  """1 − cos ~ 1e-10 is below float32 resolution of cos; the stable form keeps it."""
  rng = _rng(5)
  w0 = rng.normal(size=(256, 16)).astype(np.float32)
  w = (w0 + 1e-5 * rng.normal(size=w0.shape)).astype(np.float32)
  dm, dd, _, _ = paper_reference(w0, w)  # float64 from the same float32 inputs
  assert dd.max() < 1e-9
  out = analysis.decompose(w0, w)
  np.testing.assert_allclose(out.direction_change, dd, rtol=1e-3)
  np.testing.assert_allclose(out.magnitude_change, dm, rtol=1e-2, atol=1e-9)


def test_bfloat16_kernels_are_upcast_exactly():
  rng = _rng(6)
  w0 = jnp.asarray(rng.normal(size=(32, 8)), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=(32, 8)), jnp.bfloat16)
  dm, dd, _, _ = paper_reference(w0, w)
  out = analysis.decompose(w0, w)
  assert out.direction_change.dtype == jnp.float32
  np.testing.assert_allclose(out.magnitude_change, dm, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.direction_change, dd, rtol=1e-5, atol=1e-7)


def test_zero_columns_are_defined():
  w0 = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
  w = np.array([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]], np.float32)
  out = analysis.decompose(w0, w)
  np.testing.assert_array_equal(out.direction_change, [0.0, 1.0, 1.0])
  np.testing.assert_array_equal(out.magnitude_change, [0.0, 1.0, 2.0])
  assert np.all(np.isfinite(out.direction_change))


def test_decompose_is_jittable():
  rng = _rng(7)
  w0 = rng.normal(size=(6, 4)).astype(np.float32)
  w = w0 + 0.1
  eager = analysis.decompose(w0, w)
  jitted = jax.jit(analysis.decompose)(w0, w)
  np.testing.assert_allclose(jitted.delta_d, eager.delta_d, rtol=1e-6)


def test_decompose_rejects_bad_shapes_and_dtypes():
  with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
    analysis.decompose(np.ones((4, 3), np.float32), np.ones((3, 4), np.float32))
  with pytest.raises(ValueError, match="2-D"):
    analysis.decompose(np.ones((4,), np.float32), np.ones((4,), np.float32))
  with pytest.raises(TypeError, match="floating"):
    analysis.decompose(np.ones((4, 3), np.int32), np.ones((4, 3), np.int32))


# -------------------------------------------------------------------- compare


def _tree(rng, sizes=(8, 6, 4)):
  return {"layers": [{"kernel": rng.normal(size=(a, b)).astype(np.float32),
                      "bias": np.zeros(b, np.float32)} for a, b in zip(sizes[:-1], sizes[1:])],
          "embed": {"embedding": rng.normal(size=(5, sizes[0])).astype(np.float32)}}


def test_compare_full_finetune_rows_match_decompose():
  rng = _rng(10)
  base = _tree(rng)
  tuned = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base)
  rows = analysis.compare(base, tuned, layers=r"kernel$", checkpoint="step_7")
  assert [r.layer for r in rows] == ["layers/0/kernel", "layers/1/kernel"]
  for row, layer in zip(rows, base["layers"]):
    i = int(row.layer.split("/")[1])
    dm, dd, mean_m, mean_d = paper_reference(layer["kernel"], tuned["layers"][i]["kernel"])
    assert row.checkpoint == "step_7" and row.source == "kernel"
    assert row.shape == layer["kernel"].shape
    np.testing.assert_allclose([row.delta_m, row.delta_d], [mean_m, mean_d], rtol=1e-4)
    np.testing.assert_allclose(row.columns.direction_change, dd, rtol=1e-4)
  everything = analysis.compare(base, tuned)
  assert {r.layer for r in everything} == {"layers/0/kernel", "layers/1/kernel", "embed/embedding"}


def test_compare_accepts_nnx_state_and_module():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])

  base = Mlp(nnx.Rngs(0))
  tuned = Mlp(nnx.Rngs(0))
  tuned.layers[1].kernel[...] = tuned.layers[1].kernel[...] * 2.0
  rows = analysis.compare(nnx.state(base, nnx.Param), tuned, layers="kernel")
  assert [r.layer for r in rows] == ["layers/0/kernel", "layers/1/kernel"]
  assert rows[0].delta_m == 0 and rows[0].delta_d == 0
  np.testing.assert_allclose(rows[1].delta_m, rows[1].base_magnitude, rtol=1e-6)
  assert rows[1].delta_d < 1e-7


def _dora_params(rng, d_in, d_out, rank, *, b_scale=0.3, m_noise=0.2):
  kernel = rng.normal(size=(d_in, d_out)).astype(np.float32) / math.sqrt(d_in)
  return {
      "kernel": kernel,
      "bias": np.zeros(d_out, np.float32),
      "lora_a": rng.uniform(-1, 1, size=(d_in, rank)).astype(np.float32) / math.sqrt(d_in),
      "lora_b": (b_scale * rng.normal(size=(rank, d_out))).astype(np.float32),
      "magnitude": (np.linalg.norm(kernel, axis=0)
                    * (1 + m_noise * rng.normal(size=d_out))).astype(np.float32),
  }


def test_compare_merges_dora_adapters():
  rng = _rng(11)
  tuned = {"blocks": {"0": {"proj": _dora_params(rng, 12, 7, 3)}}}
  base = {"blocks": {"0": {"proj": {"kernel": tuned["blocks"]["0"]["proj"]["kernel"]}}}}
  p = tuned["blocks"]["0"]["proj"]
  [row] = analysis.compare(base, tuned, scale=0.5)
  assert row.layer == "blocks/0/proj/kernel" and row.source == "dora"
  merged = dora_jax.merge_kernel(p["kernel"], p["lora_a"], p["lora_b"], p["magnitude"], 0.5)
  dm, dd, mean_m, mean_d = paper_reference(p["kernel"], np.asarray(merged))
  np.testing.assert_allclose([row.delta_m, row.delta_d], [mean_m, mean_d], rtol=1e-4)
  kernel, source = analysis.effective_kernels(tuned, scale=0.5)["blocks/0/proj/kernel"]
  assert source == "dora" and kernel.dtype == jnp.float32
  np.testing.assert_allclose(kernel, merged, rtol=1e-6, atol=1e-7)
  # By DoRA's construction the merged column norms are the magnitude vector.
  np.testing.assert_allclose(row.columns.tuned_magnitude, p["magnitude"], rtol=1e-5)


def test_dora_at_init_and_magnitude_only_updates():
  rng = _rng(12)
  p = _dora_params(rng, 10, 6, 2, b_scale=0.0, m_noise=0.0)
  [row] = analysis.compare({"l": {"kernel": p["kernel"]}}, {"l": p}, scale=2.0)
  assert row.delta_m < 1e-6 and row.delta_d < 1e-7
  p = _dora_params(rng, 10, 6, 2, b_scale=0.0, m_noise=0.3)  # only the magnitude moved
  [row] = analysis.compare({"l": {"kernel": p["kernel"]}}, {"l": p}, scale=2.0)
  assert row.delta_m > 1e-2 and row.delta_d < 1e-7
  # The base may itself be the adapter tree at init (merges to its kernel).
  init = dict(p, lora_b=np.zeros_like(p["lora_b"]), magnitude=np.linalg.norm(p["kernel"], axis=0))
  [again] = analysis.compare({"l": init}, {"l": p}, scale=2.0)
  np.testing.assert_allclose(again.delta_m, row.delta_m, rtol=1e-5)


def test_apply_dora_model_unmerged_equals_merged():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.layers = nnx.List([nnx.Linear(6, 5, rngs=rngs), nnx.Linear(5, 3, rngs=rngs)])

  model = Mlp(nnx.Rngs(0))
  base = nnx.state(model, nnx.Param)
  dora_jax.apply_dora(model, targets=r"layers/\d+", rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  for i, layer in enumerate(model.layers):
    layer.lora_b[...] = 0.3 * jax.random.normal(jax.random.key(i), layer.lora_b.shape)
    layer.magnitude[...] = layer.magnitude[...] * (1.0 + 0.1 * i)
  adapted = analysis.compare(base, model, layers="kernel", scale=model.layers[0].scale)
  merged = analysis.compare(base, dora_jax.merge(model), layers="kernel")
  assert [r.source for r in adapted] == ["dora", "dora"] and [r.source for r in merged] == ["kernel"] * 2
  for a, m in zip(adapted, merged):
    assert a.layer == m.layer
    # ΔM of layer 0 is 0 in exact arithmetic: fp32 rounding of magnitudes ~1 leaves ~1e-7.
    np.testing.assert_allclose([a.delta_m, a.delta_d], [m.delta_m, m.delta_d], rtol=1e-4, atol=1e-6)
  assert all(r.delta_d > 1e-4 for r in adapted)


def test_compare_merges_nnx_lora_linear():
  rngs = nnx.Rngs(3)
  layer = nnx.LoRALinear(6, 4, lora_rank=2, rngs=rngs)
  layer.lora.lora_b[...] = jax.random.normal(jax.random.key(1), (2, 4))
  state = nnx.state(layer, nnx.Param)
  base = {"kernel": layer.kernel[...]}
  with pytest.raises(ValueError, match="scale="):
    analysis.compare(base, state)
  [row] = analysis.compare(base, state, scale=1.0)
  assert row.source == "lora" and row.layer == "kernel"
  merged = layer.kernel[...] + layer.lora.lora_a[...] @ layer.lora.lora_b[...]
  _, _, mean_m, mean_d = paper_reference(np.asarray(base["kernel"]), np.asarray(merged))
  np.testing.assert_allclose([row.delta_m, row.delta_d], [mean_m, mean_d], rtol=1e-4)


def test_compare_scale_per_module():
  rng = _rng(13)
  tuned = {"a": _dora_params(rng, 5, 4, 2), "b": _dora_params(rng, 5, 4, 2)}
  base = {k: {"kernel": v["kernel"]} for k, v in tuned.items()}
  rows = analysis.compare(base, tuned, scale=lambda module: {"a": 0.5, "b": 4.0}[module])
  ref = [analysis.compare({k: base[k]}, {k: tuned[k]}, scale=s)[0] for k, s in (("a", 0.5), ("b", 4.0))]
  assert [r.delta_d for r in rows] == [r.delta_d for r in ref]


def test_torch_layout_transposes():
  rng = _rng(14)
  w0 = rng.normal(size=(3, 8)).astype(np.float32)  # weight [d_out, d_in]
  w = w0 * np.array([[1.0], [2.0], [1.0]], np.float32)  # rescales output row 1
  [row] = analysis.compare({"q/weight": w0}, {"q/weight": w}, layout="torch")
  assert row.shape == (8, 3)
  np.testing.assert_allclose(row.columns.magnitude_change[[0, 2]], 0.0)
  assert row.delta_d < 1e-7


def test_compare_errors_name_things():
  rng = _rng(15)
  base = _tree(rng)
  with pytest.raises(ValueError, match=r"no layer matches 'attn'.*layers/0/kernel.*layers/1/kernel"):
    analysis.compare(base, base, layers="attn")
  bad = jax.tree.map(lambda x: x, base)
  bad["layers"][1]["kernel"] = np.ones((6, 5), np.float32)
  with pytest.raises(ValueError, match=r"layers/1/kernel.*\(6, 4\).*\(6, 5\)"):
    analysis.compare(base, bad, layers="kernel")
  with pytest.raises(ValueError, match=r"lacks layers/1/kernel"):
    analysis.compare(base, {"layers": [base["layers"][0]]}, layers="kernel")
  with pytest.raises(ValueError, match="layout"):
    analysis.compare(base, base, layout="jax")


def test_pearson_and_table():
  rng = _rng(16)
  base = _tree(rng, (8, 8, 8, 8, 8))
  rows = []
  for step in (1, 2, 3):
    tuned = jax.tree.map(lambda x: x + 0.05 * step * rng.normal(size=x.shape).astype(np.float32), base)
    rows += analysis.compare(base, tuned, layers="kernel", checkpoint=f"step_{step}")
  dd = [r.delta_d for r in rows]
  dm = [r.delta_m for r in rows]
  np.testing.assert_allclose(analysis.pearson(rows), np.corrcoef(dd, dm)[0, 1], rtol=1e-12)
  assert math.isnan(analysis.pearson(rows[:1]))
  table = analysis.format_table(rows)
  lines = table.splitlines()
  assert lines[0].split() == ["checkpoint", "layer", "shape", "source", "delta_M", "delta_D", "mean_M0"]
  assert len({len(line) for line in lines[1:-2]}) == 1  # aligned columns
  assert lines[-2].startswith("pearson(delta_D, delta_M) = ")
  assert lines[-1].split(":")[1].split(",")[0].split()[0] == "step_1"
  np.testing.assert_allclose(float(lines[-1].split(",")[-1].split()[-1]),
                             np.corrcoef(dd[-4:], dm[-4:])[0, 1], atol=1e-4)
  assert len(lines) == 2 + len(rows) + 2
  assert analysis.format_table(rows[:4]).splitlines()[-1].startswith("pearson")
  csv = analysis.rows_to_csv(rows).splitlines()
  assert len(csv) == 1 + len(rows) and csv[1].startswith("step_1,layers/0/kernel,8,8,kernel,")


def test_plot_writes_png(tmp_path):
  rng = _rng(17)
  base = _tree(rng)
  rows = []
  for step in (1, 2):
    tuned = jax.tree.map(lambda x: x * (1 + 0.1 * step) + 0.01 * rng.normal(size=x.shape), base)
    rows += analysis.compare(base, tuned, checkpoint=f"s{step}")
  path = plot.scatter_panels({"FT": rows, "other": rows[:3]}, tmp_path / "p.png")
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC
  with pytest.raises(ValueError):
    plot.scatter_panels({"FT": []}, tmp_path / "q.png")


# ---------------------------------------------------------- checkpoints + CLI


def _save_orbax(path, tree):
  import orbax.checkpoint as ocp

  ckpt = ocp.StandardCheckpointer()
  ckpt.save(os.fspath(path), tree)
  ckpt.wait_until_finished()


def _save_safetensors(path, flat):
  from safetensors.numpy import save_file

  save_file({k.replace("/", "."): np.ascontiguousarray(v) for k, v in flat.items()}, os.fspath(path))


def test_loaders_round_trip(tmp_path):
  model = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
  _save_orbax(tmp_path / "nnx", nnx.state(model, nnx.Param))
  loaded = checkpoints.load(tmp_path / "nnx")
  assert set(loaded) == {"kernel", "bias"}
  np.testing.assert_array_equal(loaded["kernel"], np.asarray(model.kernel[...]))
  _save_safetensors(tmp_path / "f.safetensors", {"layers/0/kernel": np.eye(3, dtype=np.float32)})
  assert list(checkpoints.load(tmp_path / "f.safetensors")) == ["layers/0/kernel"]
  with pytest.raises(FileNotFoundError, match="nope"):
    checkpoints.load(tmp_path / "nope")
  (tmp_path / "x.npz").write_bytes(b"")
  with pytest.raises(ValueError, match="Orbax"):
    checkpoints.load(tmp_path / "x.npz")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not an Orbax checkpoint"):
    checkpoints.load(tmp_path / "empty")
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.fspath(tmp_path / "run"))
  manager.save(7, args=ocp.args.StandardSave({"l": {"kernel": np.ones((3, 2), np.float32)}}))
  manager.wait_until_finished()
  assert list(checkpoints.load(tmp_path / "run" / "7")) == ["l/kernel"]
  assert checkpoints.label(tmp_path / "step_10.safetensors") == "step_10"
  assert checkpoints.label(f"{tmp_path}/step_20/") == "step_20"


@pytest.fixture
def ckpt_dir(tmp_path):
  rng = _rng(20)
  base = {"layers": {str(i): {"kernel": rng.normal(size=(8, 6)).astype(np.float32),
                              "bias": np.zeros(6, np.float32)} for i in range(3)}}
  _save_orbax(tmp_path / "base", base)
  t1 = jax.tree.map(lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), base)
  _save_orbax(tmp_path / "step_100", t1)
  t2 = jax.tree.map(lambda x: x + 0.1 * rng.normal(size=x.shape).astype(np.float32), base)
  _save_safetensors(tmp_path / "step_200.safetensors", analysis.flatten_params(t2))
  return tmp_path, base, t1, t2


def test_cli_end_to_end(ckpt_dir):
  tmp, base, t1, t2 = ckpt_dir
  out = tmp / "out"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "dora_jax.analysis", str(tmp / "base"), str(tmp / "step_100"),
       str(tmp / "step_200.safetensors"), "--layers", r"layers/[01]/kernel", "--out", str(out)],
      capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].split()[:2] == ["checkpoint", "layer"]
  body = [line.split() for line in lines[2:6]]
  assert [(b[0], b[1]) for b in body] == [("step_100", "layers/0/kernel"), ("step_100", "layers/1/kernel"),
                                          ("step_200", "layers/0/kernel"), ("step_200", "layers/1/kernel")]
  expected = []
  for tuned in (t1, t2):
    for i in ("0", "1"):
      _, _, mean_m, mean_d = paper_reference(base["layers"][i]["kernel"], tuned["layers"][i]["kernel"])
      expected.append((mean_m, mean_d))
  got = [(float(b[4]), float(b[5])) for b in body]
  np.testing.assert_allclose(got, expected, rtol=1e-3)
  assert "pearson(delta_D, delta_M) = " in proc.stdout
  png = out / cli.PLOT_NAME
  data = png.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 1000
  from PIL import Image

  with Image.open(png) as image:
    image.verify()
  assert (out / cli.CSV_NAME).read_text().count("\n") == 5


def test_cli_errors(ckpt_dir, capsys):
  tmp, _, _, _ = ckpt_dir
  out = str(tmp / "out")
  assert cli.main([str(tmp / "base"), str(tmp / "missing"), "--out", out]) == 2
  err = capsys.readouterr().err
  assert "checkpoint not found" in err and "missing" in err
  assert cli.main([str(tmp / "base"), str(tmp / "step_100"), "--layers", "attn", "--out", out]) == 2
  err = capsys.readouterr().err
  assert "no layer matches 'attn'" in err and "layers/2/kernel" in err
  _save_safetensors(tmp / "wide.safetensors", {"layers/0/kernel": np.ones((8, 7), np.float32)})
  assert cli.main([str(tmp / "base"), str(tmp / "wide.safetensors"), "--layers", "0/kernel",
                   "--out", out]) == 2
  err = capsys.readouterr().err
  assert "layers/0/kernel" in err and "(8, 6)" in err and "(8, 7)" in err
  assert not os.path.exists(os.path.join(out, cli.PLOT_NAME))


def _cli_error(capsys, argv) -> str:
  """Run the CLI in-process; it must exit 2 with exactly one ``error:`` line."""
  assert cli.main([str(a) for a in argv]) == 2
  captured = capsys.readouterr()
  lines = captured.err.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
  assert "Traceback" not in captured.err
  return lines[0]


def test_cli_unreadable_safetensors(ckpt_dir, capsys, fresh_key):
  tmp, _, _, _ = ckpt_dir
  out = tmp / "out"
  good = (tmp / "step_200.safetensors").read_bytes()
  rng = np.random.default_rng(int(jax.random.randint(fresh_key(), (), 0, 2**30)))
  cases = {"truncated": good[: len(good) // 2], "random": rng.bytes(4096), "empty": b"",
           "short": good[:5]}
  for name, data in cases.items():
    path = tmp / f"{name}.safetensors"
    path.write_bytes(data)
    err = _cli_error(capsys, [tmp / "base", path, "--out", out])
    assert str(path) in err, err
  assert not out.exists()


def test_cli_invalid_layers_regex(ckpt_dir, capsys):
  tmp, _, _, _ = ckpt_dir
  err = _cli_error(capsys, [tmp / "base", tmp / "step_100", "--layers", "layers/(0", "--out", tmp / "o"])
  assert "--layers" in err and "not a valid regular expression" in err and "layers/(0" in err
  with pytest.raises(ValueError, match="layers: 'a\\[' is not a valid regular expression"):
    analysis.compare({"k": np.ones((2, 2), np.float32)}, {"k": np.ones((2, 2), np.float32)}, layers="a[")


def test_cli_out_is_an_existing_file(ckpt_dir, capsys):
  tmp, _, _, _ = ckpt_dir
  out = tmp / "results.txt"
  out.write_text("keep me")
  err = _cli_error(capsys, [tmp / "base", tmp / "step_100", "--out", out])
  assert str(out) in err and "not a directory" in err
  assert out.read_text() == "keep me"


def test_cli_without_matplotlib(ckpt_dir, capsys, monkeypatch):
  tmp, _, _, _ = ckpt_dir
  monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
  err = _cli_error(capsys, [tmp / "base", tmp / "step_100", "--out", tmp / "o"])
  assert "matplotlib" in err and "pip install" in err
  assert not (tmp / "o").exists()


@pytest.mark.parametrize("how", ["all", "one"])
def test_non_finite_tuned_kernel_is_an_error(ckpt_dir, capsys, how, fresh_key):
  tmp, base, _, _ = ckpt_dir
  tuned = analysis.flatten_params(base)
  kernel = tuned["layers/1/kernel"] + 0.1 * np.asarray(
      jax.random.normal(fresh_key(), tuned["layers/1/kernel"].shape))
  if how == "all":
    kernel = np.full_like(kernel, np.nan)
  else:
    kernel[3, 2] = np.inf
  tuned["layers/1/kernel"] = kernel
  _save_safetensors(tmp / "nan.safetensors", tuned)
  err = _cli_error(capsys, [tmp / "base", tmp / "nan.safetensors", "--out", tmp / "o"])
  assert "layers/1/kernel" in err and "non-finite" in err and "'nan'" in err
  with pytest.raises(ValueError, match="non-finite"):
    analysis.compare(base, tuned, layers="layers/1")
  bad_base = dict(tuned)
  with pytest.raises(ValueError, match=r"the base: layers/1/kernel has \d+ non-finite"):
    analysis.compare(bad_base, analysis.flatten_params(base), layers="layers/1")


def test_integer_tensor_is_reported_as_such(ckpt_dir, capsys):
  tmp, base, _, _ = ckpt_dir
  tuned = analysis.flatten_params(base)
  tuned["layers/0/kernel"] = np.round(tuned["layers/0/kernel"] * 100).astype(np.int32)
  _save_safetensors(tmp / "int.safetensors", tuned)
  err = _cli_error(capsys, [tmp / "base", tmp / "int.safetensors", "--out", tmp / "o"])
  assert "layers/0/kernel (int32, shape (8, 6))" in err and "lacks" not in err
  # An integer tensor in the base, selected by name, is named instead of "no layer matches" alone.
  with pytest.raises(ValueError, match=r"matching but not 2-D floating point: layers/0/kernel \(int32"):
    analysis.compare(tuned, base, layers="layers/0/kernel")


def test_safetensors_loader_reads_bfloat16(tmp_path):
  from dora_jax.io import safetensors_format

  kernel = jnp.asarray(np.linspace(-1, 1, 12).reshape(4, 3), jnp.bfloat16)
  (tmp_path / "bf.safetensors").write_bytes(
      safetensors_format.encode({"layers.0.kernel": np.asarray(kernel)}))
  loaded = checkpoints.load(tmp_path / "bf.safetensors")
  assert loaded["layers/0/kernel"].dtype == jnp.bfloat16
  np.testing.assert_array_equal(loaded["layers/0/kernel"], np.asarray(kernel))

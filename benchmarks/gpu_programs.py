"""The CUDA programs ``dora_dense`` compiles, exported on any machine (no GPU needed).

  python benchmarks/gpu_programs.py --out DIR            # write DIR/<case>.mlir
  python benchmarks/gpu_programs.py --compare DIR_A DIR_B

Lowers the forward and training steps of ``backend="auto"``, ``"pallas"`` and
``"mosaic"`` for CUDA (``jax.export`` with ``platforms=["cuda"]``) as an
H100 would run them (kernels compiled, not interpreted; the Triton lowering
told it has compute capability 9.0, the Mosaic GPU kernels 132 SMs), over
shapes and dtypes that reach every branch of the dispatch: fused and addend
ranks, ``pre`` and output residuals, bias, fp16, a width above the one-pass
``dpre``/``dm`` limit, a ``d_in`` the ``dx`` GEMM does not tile. Source
locations are stripped, so two commits that run the same GPU program write
byte-identical files: run it before and after a change and ``--compare``.
Nothing runs on a device; JAX internals are patched for the export only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import jax
import jax.numpy as jnp
from jax import export

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# (tokens, d_in, d_out, rank, bias, dtype)
SHAPES = [(512, 512, 512, 16, False, jnp.bfloat16), (512, 512, 512, 64, False, jnp.bfloat16),
          (512, 512, 768, 16, True, jnp.bfloat16), (512, 768, 512, 24, False, jnp.float16),
          (512, 512, 9216, 16, False, jnp.bfloat16), (4096, 4096, 4096, 16, False, jnp.bfloat16),
          (512, 320, 512, 16, False, jnp.bfloat16)]
MODES = ("train", "infer", "train_cached", "train_wrt_x_only")
_CHECKS = [export.DisabledSafetyCheck.custom_call(name)
           for name in ("__gpu$xla.gpu.triton", "mosaic_gpu_v2", "mosaic_gpu")]


def _pretend_h100():
  """Patch what the lowering asks of the device, and drop source locations."""
  from jax._src.interpreters import mlir  # noqa: PLC0415
  from jax._src.lib.mlir import ir  # noqa: PLC0415
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415
  info = gpu_info.GpuInfo(gpu_version=None, arch_name="9.0", compute_capability=90)
  pallas_call_registration.gpu_info_lib.get_gpu_info = lambda: info
  mlir.source_info_to_location = lambda *a, **k: ir.Location.unknown()
  from dora_jax.kernels import dispatch, scaled_matmul  # noqa: PLC0415
  dispatch.Device.current = staticmethod(lambda: dispatch.Device(gpu=True, cuda=True, hopper=True))
  scaled_matmul.num_sms = lambda: 132


def _step(backend, mode, w, cot, options):
  import dora_jax  # noqa: PLC0415

  def loss(x, a, b, m, bias, q):
    y = dora_jax.dora_dense(x, w, a, b, m, 2.0, bias, backend=backend, base_sq_norm=q,
                            options=options)
    return jnp.sum((y * cot).astype(jnp.float32)), y

  def step(x, a, b, m, bias, q):
    if mode == "infer":
      return loss(x, a, b, m, bias, q)[1]
    argnums = (0,) if mode == "train_wrt_x_only" else (0, 1, 2, 3)
    return jax.grad(loss, argnums=argnums, has_aux=True)(x, a, b, m, bias, q)
  return step


def write(out_dir: str):
  _pretend_h100()
  import dora_jax  # noqa: PLC0415
  options = dora_jax.KernelOptions(interpret=False)
  os.makedirs(out_dir, exist_ok=True)
  for backend in ("auto", "pallas", "mosaic"):
    for tokens, d_in, d_out, rank, bias, dtype in SHAPES:
      for mode in MODES:
        spec = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)  # noqa: E731
        w, cot = spec(d_in, d_out), spec(tokens, d_out)
        args = (spec(tokens, d_in), spec(d_in, rank), spec(rank, d_out),
                spec(d_out, dt=jnp.float32), spec(d_out) if bias else None,
                spec(d_out, dt=jnp.float32) if mode == "train_cached" else None)
        name = (f"{backend}_{tokens}x{d_in}x{d_out}_r{rank}_{'bias' if bias else 'nobias'}_"
                f"{jnp.dtype(dtype).name}_{mode}")

        def fn(w, cot, *args, backend=backend, mode=mode):
          return _step(backend, mode, w, cot, options)(*args)

        try:
          text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=_CHECKS)(
              w, cot, *args).mlir_module()
        except Exception as e:  # noqa: BLE001 - recorded, and differs from a success
          text = f"ERROR {type(e).__name__}: {str(e)[:2000]}"
        text = re.sub(r"loc\([^)]*\)", "", text)
        text = re.sub(r"#loc\d*( = .*)?", "", text)
        text = re.sub(r"[\w/.\-]+\.py:\d+", "SRC", text)
        with open(os.path.join(out_dir, name + ".mlir"), "w") as f:
          f.write(text)
        kernels = sorted(set(re.findall(r"(dora_[a-z_]+?)_?(?:mosaic_gpu)?\b", text)))
        print(name, "ERROR" if text.startswith("ERROR") else len(text), kernels, flush=True)


def compare(dir_a: str, dir_b: str) -> int:
  names = sorted(set(os.listdir(dir_a)) | set(os.listdir(dir_b)))
  differ = 0
  for name in names:
    paths = [os.path.join(d, name) for d in (dir_a, dir_b)]
    if not all(os.path.exists(p) for p in paths):
      print("only in one:", name)
      differ += 1
      continue
    texts = [open(p).read() for p in paths]
    if texts[0] != texts[1]:
      print("differs:", name)
      differ += 1
  print(f"{len(names) - differ} of {len(names)} programs identical")
  return 1 if differ else 0


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out")
  parser.add_argument("--compare", nargs=2, metavar=("DIR_A", "DIR_B"))
  args = parser.parse_args()
  if args.compare:
    sys.exit(compare(*args.compare))
  if not args.out:
    parser.error("--out or --compare is required")
  write(args.out)


if __name__ == "__main__":
  main()

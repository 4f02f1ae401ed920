"""The ``"pallas"`` backend of :func:`dora_jax.dora_dense`: fused forward and ``dx``.

Same signatures and semantics as :func:`dora_jax.compose.forward_xla` and
:func:`dora_jax.compose.backward_xla` (their pure ``jax.numpy`` twins). Shapes::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: XLA computes ``h = x2·a [T, r]`` (float32 accumulation, kept as the
residual) and ``s·h``; one Pallas launch (:func:`dual_matmul`) then runs the K
loop over ``x2·W`` and ``(s·h)·b`` into one float32 accumulator and writes
``y = g ⊙ acc + bias`` and, when the backward needs it, the residual
``pre = acc``, both in the activation dtype. :func:`forward_pallas_y` is the
inference variant that writes ``y`` only.

Backward (norm detached): ``dpre = dy ⊙ g`` (one XLA elementwise pass, bf16)
feeds ``t = dpre·bᵀ``, ``db = s·hᵀ·dpre`` and ``dx = dpre·Wᵀ + s·t·aᵀ``. ``dx``
is one Pallas launch (K loop over ``Wᵀ`` tiles then ``(s·t)·aᵀ``) where
:func:`use_dx_kernel` says it was measured faster than XLA's two GEMMs, else
XLA. ``da = xᵀ·(s·t)``, ``dm = Σ_T dy ⊙ pre / n`` and ``dbias = Σ_T dy`` stay
in XLA (small GEMMs and one reduction pass).

Folding ``dy ⊙ g`` into the ``dx`` kernel's prologue (``dual_matmul(...,
k_scale=g)``) was measured on an H100 and lost: scaling the A tile in
registers takes the MMA off its shared-memory pipeline (4.14 ms vs 3.13 ms
with ``dpre`` materialised, 8192×28672, T=4096; see benchmarks/KERNELS.md).

No ``[d_in, d_out]`` temporary is formed anywhere. On a machine without a GPU
the kernels run in Pallas interpret mode (slow; meant for tests).
"""

from __future__ import annotations

import contextlib

import jax.numpy as jnp
from jax import lax

from dora_jax.compose import Grads, Wants, backward_xla
from dora_jax.kernels._common import MatmulConfig, default_interpret
from dora_jax.kernels.dual_matmul import dual_matmul

_F32 = jnp.float32

#: Tiling of the forward launch (M = T, N = d_out, K = d_in) and of the ``dx``
#: launch (M = T, N = d_in, K = d_out) for 2-byte dtypes, measured on an H100
#: (benchmarks/KERNELS.md): (128, 256, 64), 8 warps, 3 stages, grouped by 8
#: rows of tiles. 4 stages measured within 1% but ran out of shared memory
#: (240 KiB asked, 227 KiB available) on a ragged T = 1000, r = 384 call.
#: 4-byte dtypes use :meth:`MatmulConfig.default_for`.
FORWARD_CONFIG = MatmulConfig(block_m=128, block_n=256, block_k=64, group_m=8,
                              num_warps=8, num_stages=3)
DX_CONFIG = MatmulConfig(block_m=128, block_n=256, block_k=64, group_m=8,
                         num_warps=8, num_stages=3)

_overrides: dict = {"forward": None, "dx": None, "dx_kernel": None}


@contextlib.contextmanager
def block_configs(*, forward: MatmulConfig | None = None, dx: MatmulConfig | None = None,
                  dx_kernel: bool | None = None):
  """Override tilings (and whether ``dx`` uses the kernel) for calls traced inside."""
  saved = dict(_overrides)
  _overrides.update(forward=forward, dx=dx, dx_kernel=dx_kernel)
  try:
    yield
  finally:
    _overrides.update(saved)


def _config(name: str, dtype) -> MatmulConfig:
  override = _overrides[name]
  if override is not None:
    return override
  if jnp.dtype(dtype).itemsize >= 4:
    return MatmulConfig.default_for(dtype)
  return FORWARD_CONFIG if name == "forward" else DX_CONFIG


def use_dx_kernel(tokens: int, d_in: int, d_out: int, rank: int, dtype) -> bool:
  """Whether the fused ``dx`` launch beats XLA's ``dpre·Wᵀ + s·t·aᵀ`` here.

  Off a GPU (interpret mode) the kernel always runs, so the tests cover it.
  On the GPU: measured on an H100 (benchmarks/KERNELS.md), the Pallas ``Wᵀ`` GEMM wins
  while the GEMM is small enough that XLA's separate passes matter and loses
  to cuBLAS on the large ones.
  """
  forced = _overrides["dx_kernel"]
  if forced is not None:
    return forced
  if default_interpret():
    return True
  if jnp.dtype(dtype).itemsize != 2:
    return False
  return tokens * d_in * d_out <= DX_KERNEL_MAX_MNK


#: Largest ``T·d_in·d_out`` for which the fused ``dx`` launch is used on a GPU.
DX_KERNEL_MAX_MNK = 4096 * 4096 * 4096


def _hidden_and_scaled(x2, lora_a, scale):
  """``h = x2·a`` (as :func:`dora_jax.compose.lora_hidden`) and ``s·h``, each
  rounded once from the float32 accumulator."""
  cdt = x2.dtype
  acc = jnp.promote_types(_F32, cdt)
  h_acc = jnp.dot(x2, lora_a.astype(cdt), preferred_element_type=acc)
  return h_acc.astype(cdt), (scale.astype(acc) * h_acc).astype(cdt)


def _forward(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre):
  cdt = x2.dtype
  h, hs = _hidden_and_scaled(x2, lora_a, scale)
  y, pre = dual_matmul(
      x2, kernel.astype(cdt), hs, lora_b.astype(cdt), col_scale=g,
      col_bias=bias, want_pre=want_pre, out_dtype=cdt, config=_config("forward", cdt))
  return y, pre, h


def forward_pallas(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True):
  """Return ``(y, pre, h)`` like :func:`dora_jax.compose.forward_xla`, fused.

  ``y [T, d_out]`` and ``pre [T, d_out]`` are in ``x2.dtype``; ``h [T, r]`` too.
  ``pre`` is the float32 accumulator rounded once (XLA's path rounds ``x2·W``
  and ``h·b`` separately), so the two agree to the activation dtype's rounding.
  ``pre`` is ``None`` (not written) when ``want_pre`` is false.
  """
  return _forward(x2, kernel, lora_a, lora_b, g, scale, bias, want_pre)


def forward_pallas_y(x2, kernel, lora_a, lora_b, g, scale, bias):
  """``y`` only (no ``pre`` written): the forward when nothing is differentiated."""
  return _forward(x2, kernel, lora_a, lora_b, g, scale, bias, False)[0]


def backward_pallas(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy,
                    wants: Wants, *, y=None) -> Grads:
  """Cotangents of :func:`forward_pallas`, like :func:`dora_jax.compose.backward_xla`.

  Only the cotangents ``wants`` asks for are computed; the rest are ``None``.
  Everything but ``dx`` is XLA's; ``dx = [dpre | s·t]·[Wᵀ ; aᵀ]`` is one fused
  launch where :func:`use_dx_kernel` says it measured faster.
  """
  cdt = dy.dtype
  tokens, d_in = x2.shape

  def dx_kernel(dpre, ts):
    dx, _ = dual_matmul(dpre, kernel.astype(cdt), ts, lora_a.astype(cdt), trans_b=True,
                        out_dtype=cdt, config=_config("dx", cdt))
    return dx

  fused = use_dx_kernel(tokens, d_in, dy.shape[1], lora_a.shape[1], cdt)
  return backward_xla(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy, wants,
                      y=y, dx_matmul=dx_kernel if fused else None)


__all__ = ["DX_CONFIG", "DX_KERNEL_MAX_MNK", "FORWARD_CONFIG", "backward_pallas",
           "block_configs", "forward_pallas", "forward_pallas_y", "use_dx_kernel"]

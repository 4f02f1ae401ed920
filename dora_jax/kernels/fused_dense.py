"""The ``"pallas"`` backend of :func:`dora_jax.dora_dense`: fused forward and ``dx``.

Same signatures and semantics as :func:`dora_jax.compose.forward_xla` and
:func:`dora_jax.compose.backward_xla` (their pure ``jax.numpy`` twins). Shapes::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: XLA computes ``h = x2·a [T, r]`` (float32 accumulation, kept as the
residual) and ``s·h``; one Pallas launch (:func:`dual_matmul`) then runs the K
loop over ``x2·W`` and ``(s·h)·b`` into one float32 accumulator and writes
``y = g ⊙ acc + bias`` and, when the backward needs it, the residual
``pre = acc``, both in the activation dtype.

Backward (norm detached): ``dpre = dy ⊙ g`` (one XLA elementwise pass, bf16)
feeds ``t = dpre·bᵀ``, ``db = s·hᵀ·dpre`` and ``dx = dpre·Wᵀ + s·t·aᵀ``. ``dx``
is one Pallas launch (K loop over ``Wᵀ`` tiles then ``(s·t)·aᵀ``) where
:func:`use_dx_kernel` says it was measured faster than XLA's two GEMMs, else
XLA. ``da = xᵀ·(s·t)``, ``dm = Σ_T dy ⊙ pre / n`` and ``dbias = Σ_T dy`` stay
in XLA (small GEMMs and one reduction pass).

No ``[d_in, d_out]`` temporary is formed anywhere. On a machine without a GPU
the kernels run in Pallas interpret mode (slow; meant for tests).
"""

from __future__ import annotations

import jax.numpy as jnp

from dora_jax.backend import KernelOptions
from dora_jax.compose import Grads, Residuals, Wants, backward_xla
from dora_jax.kernels._common import MatmulConfig
from dora_jax.kernels.dual_matmul import dual_matmul

_F32 = jnp.float32

#: Largest ``T·d_in·d_out`` for which the fused ``dx`` launch beat XLA's two
#: GEMMs (2-byte dtypes); beyond it cuBLAS's main loop wins.
DX_KERNEL_MAX_MNK = 4096 * 4096 * 4096


def use_dx_kernel(tokens: int, d_in: int, d_out: int, dtype) -> bool:
  """Whether the fused ``dx`` launch runs (:attr:`KernelOptions.pallas_dx` unset):
  2-byte dtypes with ``T·d_in·d_out`` at most :data:`DX_KERNEL_MAX_MNK`."""
  return jnp.dtype(dtype).itemsize == 2 and tokens * d_in * d_out <= DX_KERNEL_MAX_MNK


def _tiles(config: MatmulConfig | None, dtype) -> MatmulConfig:
  return MatmulConfig.default_for(dtype) if config is None else config


def _hidden_and_scaled(x2, lora_a, scale):
  """``h = x2·a`` (as :func:`dora_jax.compose.lora_hidden`) and ``s·h``, each
  rounded once from the float32 accumulator."""
  cdt = x2.dtype
  acc = jnp.promote_types(_F32, cdt)
  h_acc = jnp.dot(x2, lora_a.astype(cdt), preferred_element_type=acc)
  return h_acc.astype(cdt), (scale.astype(acc) * h_acc).astype(cdt)


def forward_pallas(x2, kernel, lora_a, lora_b, g, scale, bias, *, want_pre: bool = True,
                   options: KernelOptions = KernelOptions()):
  """Return ``(y, pre, h)`` like :func:`dora_jax.compose.forward_xla`, fused.

  ``y [T, d_out]`` and ``pre [T, d_out]`` are in ``x2.dtype``; ``h [T, r]`` too.
  ``pre`` is the float32 accumulator rounded once (XLA's path rounds ``x2·W``
  and ``h·b`` separately), so the two agree to the activation dtype's rounding.
  ``pre`` is ``None`` (not written) when ``want_pre`` is false.
  """
  cdt = x2.dtype
  h, hs = _hidden_and_scaled(x2, lora_a, scale)
  y, pre = dual_matmul(
      x2, kernel.astype(cdt), hs, lora_b.astype(cdt), col_scale=g, col_bias=bias,
      want_pre=want_pre, out_dtype=cdt, config=_tiles(options.pallas_tiles, cdt),
      interpret=options.interpret)
  return y, pre, h


def backward_pallas(res: Residuals, dy, wants: Wants, *,
                    options: KernelOptions = KernelOptions()) -> Grads:
  """Cotangents of :func:`forward_pallas`, like :func:`dora_jax.compose.backward_xla`.

  Only the cotangents ``wants`` asks for are computed; the rest are ``None``.
  Everything but ``dx`` is XLA's; ``dx = [dpre | s·t]·[Wᵀ ; aᵀ]`` is one fused
  launch where :attr:`KernelOptions.pallas_dx` (default :func:`use_dx_kernel`) says.
  """
  cdt = dy.dtype
  tokens, d_in = res.x2.shape

  def dx_kernel(dpre, ts):
    dx, _ = dual_matmul(dpre, res.kernel.astype(cdt), ts, res.lora_a.astype(cdt), trans_b=True,
                        out_dtype=cdt, config=_tiles(options.pallas_dx_tiles, cdt),
                        interpret=options.interpret)
    return dx

  fused = options.pallas_dx
  if fused is None:
    fused = use_dx_kernel(tokens, d_in, dy.shape[1], cdt)
  return backward_xla(res, dy, wants, dx_matmul=dx_kernel if fused else None)


__all__ = ["DX_KERNEL_MAX_MNK", "backward_pallas", "forward_pallas", "use_dx_kernel"]

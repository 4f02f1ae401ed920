"""The ``"pallas"`` backend of :func:`dora_jax.dora_dense`: fused forward and ``dx``.

Same signatures and semantics as :func:`dora_jax.compose.forward_xla` and
:func:`dora_jax.compose.backward_xla` (their pure ``jax.numpy`` twins). Shapes::

  x2 [T, d_in]   kernel [d_in, d_out]   lora_a [d_in, r]   lora_b [r, d_out]
  g, inv_norm [d_out] (float32)   bias [d_out] or None   scale: 0-d float32

Forward: XLA computes ``h = x2·a [T, r]`` (float32 accumulation, kept as the
residual) and ``s·h``; one Pallas launch (:func:`dual_matmul`) then runs the K
loop over ``x2·W`` and ``(s·h)·b`` into one float32 accumulator and writes
``y = g ⊙ acc + bias`` and the residual ``pre = acc`` in the activation dtype.

Backward (norm detached), with ``dpre = dy ⊙ g`` never materialised:

* ``t = dpre·bᵀ = dy·(g ⊙ b)ᵀ [T, r]`` (XLA, ``g`` folded into ``b``);
* ``dx = dpre·Wᵀ + s·t·aᵀ``: one Pallas launch, the prologue ``dy ⊙ g`` applied
  to each ``dy`` tile, then the K loop over ``Wᵀ`` tiles and ``(s·t)·aᵀ``;
* ``da = xᵀ·(s·t)``, ``db = s·(hᵀ·dy) ⊙ g``, ``dm = Σ_T dy ⊙ pre / n``,
  ``dbias = Σ_T dy`` (XLA: small GEMMs and one reduction pass over ``dy``/``pre``).

No ``[d_in, d_out]`` temporary is formed anywhere. On a machine without a GPU
the kernels run in Pallas interpret mode (slow; meant for tests).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
from jax import lax

from dora_jax.compose import Grads, Wants, lora_hidden
from dora_jax.kernels._common import MatmulConfig
from dora_jax.kernels.dual_matmul import dual_matmul

_F32 = jnp.float32

#: Tiling of the forward launch (M = T, N = d_out, K = d_in) and of the ``dx``
#: launch (M = T, N = d_in, K = d_out), measured on an H100 (see BENCHMARKS.md).
FORWARD_CONFIG = MatmulConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)
DX_CONFIG = MatmulConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3)

_overrides: dict[str, MatmulConfig | None] = {"forward": None, "dx": None}


@contextlib.contextmanager
def block_configs(*, forward: MatmulConfig | None = None, dx: MatmulConfig | None = None):
  """Use other tilings for calls traced inside this context (tests, tuning)."""
  saved = dict(_overrides)
  _overrides.update(forward=forward, dx=dx)
  try:
    yield
  finally:
    _overrides.update(saved)


def _config(name: str) -> MatmulConfig:
  override = _overrides[name]
  if override is not None:
    return override
  return FORWARD_CONFIG if name == "forward" else DX_CONFIG


def _hidden_and_scaled(x2, lora_a, scale):
  """``h = x2·a`` (as :func:`lora_hidden`) and ``s·h``, both rounded once from float32."""
  cdt = x2.dtype
  acc = jnp.promote_types(_F32, cdt)
  h_acc = jnp.dot(x2, lora_a.astype(cdt), preferred_element_type=acc)
  return h_acc.astype(cdt), (scale.astype(acc) * h_acc).astype(cdt)


def forward_pallas(x2, kernel, lora_a, lora_b, g, scale, bias):
  """Return ``(y, pre, h)`` like :func:`dora_jax.compose.forward_xla`, fused.

  ``y [T, d_out]`` and ``pre [T, d_out]`` are in ``x2.dtype``; ``h [T, r]`` too.
  ``pre`` is the float32 accumulator rounded once (XLA's path rounds ``x2·W``
  and ``h·b`` separately), so the two agree to the activation dtype's rounding.
  """
  cdt = x2.dtype
  h, hs = _hidden_and_scaled(x2, lora_a, scale)
  y, pre = dual_matmul(
      x2, kernel.astype(cdt), hs, lora_b.astype(cdt), col_scale=g,
      col_bias=bias, want_pre=True, out_dtype=cdt, config=_config("forward"))
  return y, pre, h


def backward_pallas(x2, kernel, lora_a, lora_b, h, pre, g, inv_norm, scale, dy,
                    wants: Wants) -> Grads:
  """Cotangents of :func:`forward_pallas`, like :func:`dora_jax.compose.backward_xla`.

  Only the cotangents ``wants`` asks for are computed; the rest are ``None``.
  """
  cdt = dy.dtype
  acc = g.dtype
  dy_acc = dy.astype(acc)
  need_t = wants.x or wants.lora_a or wants.scale
  t = ts = None
  if need_t:
    gb = (lora_b.astype(acc) * g[None, :]).astype(cdt)  # [r, d_out]: dpre·bᵀ = dy·(g⊙b)ᵀ
    t = lax.dot_general(dy, gb, (((1,), (1,)), ((), ())), preferred_element_type=acc)
    ts = (scale * t).astype(cdt)

  dx = da = db = dm = ds = dbias = dkernel = None
  if wants.x:
    dx, _ = dual_matmul(
        dy, kernel.astype(cdt), ts, lora_a.astype(cdt), k_scale=g, trans_b=True,
        out_dtype=cdt, config=_config("dx"))
  if wants.lora_a:
    da = lax.dot_general(x2, ts, (((0,), (0,)), ((), ())), preferred_element_type=acc)
  if wants.lora_b:
    hty = lax.dot_general(h, dy, (((0,), (0,)), ((), ())), preferred_element_type=acc)
    db = scale * hty * g[None, :]
  if wants.magnitude:
    dm = jnp.sum(dy_acc * pre.astype(acc), axis=0) * inv_norm
  if wants.scale:
    ds = jnp.sum(h.astype(acc) * t)
  if wants.bias:
    dbias = jnp.sum(dy_acc, axis=0)
  if wants.kernel:
    dkernel = lax.dot_general(x2, dy, (((0,), (0,)), ((), ())),
                              preferred_element_type=acc) * g[None, :]
  return Grads(dx, dkernel, da, db, dm, ds, dbias)


__all__ = ["DX_CONFIG", "FORWARD_CONFIG", "backward_pallas", "block_configs",
           "forward_pallas", "lora_hidden"]

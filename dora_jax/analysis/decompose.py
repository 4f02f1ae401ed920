"""Magnitude/direction decomposition of one weight update (DoRA paper, §3).

The paper writes a weight ``W ∈ ℝ^{d×k}`` as ``m · V/‖V‖_c`` with one magnitude
per column and compares a fine-tuned ``W^t`` with the pre-trained ``W_0``::

  ΔM^t = (1/k) Σ_n |m_n^t − m_n^0|                (eq. 4)
  ΔD^t = (1/k) Σ_n (1 − cos(W_n^t, W_0^n))        (eq. 5)

In the Flax layout (``kernel [d_in, d_out]``, ``y = x·W``) the paper's columns
are the output columns ``W[:, j]``, which is also where DoRA keeps its
magnitude vector, so ``k = d_out`` and ``m_j = ‖W[:, j]‖₂``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dora_jax._checks import accumulation_dtype, check_float


class Decomposition(NamedTuple):
  """ΔM and ΔD of one kernel, per output column and averaged (a JAX pytree).

  Attributes:
    magnitude_change: ``[d_out]`` ``|‖W[:, j]‖ − ‖W_0[:, j]‖|`` (the paper's
      ``|m_n^t − m_n^0|``).
    direction_change: ``[d_out]`` ``1 − cos(W[:, j], W_0[:, j])``, in ``[0, 2]``.
    base_magnitude: ``[d_out]`` ``‖W_0[:, j]‖``.
    tuned_magnitude: ``[d_out]`` ``‖W[:, j]‖``.
    delta_m: ``[]`` mean of ``magnitude_change`` over columns (eq. 4).
    delta_d: ``[]`` mean of ``direction_change`` over columns (eq. 5).
  """

  magnitude_change: jax.Array
  direction_change: jax.Array
  base_magnitude: jax.Array
  tuned_magnitude: jax.Array
  delta_m: jax.Array
  delta_d: jax.Array


def check_kernel_pair(base_kernel, tuned_kernel, name: str = "kernel") -> None:
  """Raise ``ValueError`` unless both are 2-D float arrays of one shape."""
  base_shape, tuned_shape = tuple(np.shape(base_kernel)), tuple(np.shape(tuned_kernel))
  if len(base_shape) != 2:
    raise ValueError(f"{name}: base kernel must be 2-D [d_in, d_out], got shape {base_shape}")
  if base_shape != tuned_shape:
    raise ValueError(
        f"shape mismatch for {name!r}: base {base_shape} vs tuned {tuned_shape}"
    )
  check_float(f"{name} (base)", base_kernel)
  check_float(f"{name} (tuned)", tuned_kernel)


@jax.jit
def _decompose(base_kernel: jax.Array, tuned_kernel: jax.Array) -> Decomposition:
  acc = accumulation_dtype(base_kernel, tuned_kernel)
  w0 = base_kernel.astype(acc)
  w = tuned_kernel.astype(acc)
  m0 = jnp.sqrt(jnp.sum(jnp.square(w0), axis=0))
  m = jnp.sqrt(jnp.sum(jnp.square(w), axis=0))
  # m − m0 = (m² − m0²) / (m + m0) = Σ_i (w − w0)(w + w0) / (m + m0): no
  # cancellation between two nearly equal norms when the update is small.
  delta = w - w0
  total = m + m0
  dm = jnp.sum(delta * (w + w0), axis=0) / jnp.where(total > 0, total, 1)
  # 1 − cos = ½‖u − u0‖² for unit u = w/m, u0 = w0/m0: accurate where cos ≈ 1
  # (no 1 − 0.9999…). From the update itself: u − u0 = (δ − w0·(m − m0)/m0) / m.
  diff = (delta - w0 * (dm / jnp.where(m0 > 0, m0, 1))) / jnp.where(m > 0, m, 1)
  dd = 0.5 * jnp.sum(jnp.square(diff), axis=0)
  # A zero column has no direction: both zero counts as unchanged (0), one zero
  # as orthogonal (cos taken as 0, so 1).
  dd = jnp.where((m > 0) == (m0 > 0), dd, jnp.ones_like(dd))
  dm = jnp.abs(dm)
  return Decomposition(dm, dd, m0, m, jnp.mean(dm), jnp.mean(dd))


def decompose(base_kernel: jax.Array, tuned_kernel: jax.Array) -> Decomposition:
  """ΔM and ΔD between a base kernel and a tuned kernel, both ``[d_in, d_out]``.

  Per output column ``j`` (the paper's column ``n``, ``k = d_out`` columns)::

    base_magnitude[j]   = ‖W_0[:, j]‖₂                        [d_out]
    tuned_magnitude[j]  = ‖W[:, j]‖₂                          [d_out]
    magnitude_change[j] = |tuned_magnitude[j] − base_magnitude[j]|
    direction_change[j] = 1 − W[:, j]·W_0[:, j] / (‖W[:, j]‖ ‖W_0[:, j]‖)
    delta_m = mean_j magnitude_change[j]        (paper eq. 4, one per matrix)
    delta_d = mean_j direction_change[j]        (paper eq. 5, one per matrix)

  Computed in float32 (float64 for float64 inputs with x64 enabled) in forms
  that stay accurate for tiny updates: ``m − m0 = Σ(W − W_0)(W + W_0)/(m + m0)``
  and ``1 − cos = ½‖W/m − W_0/m0‖²`` (both from ``W − W_0``). A column that is zero in both kernels has
  ``direction_change = 0``; zero in only one of them, ``1`` (cos taken as 0).

  For a PyTorch ``weight [d_out, d_in]`` pass the transposes.

  Args:
    base_kernel: ``[d_in, d_out]`` pre-trained kernel ``W_0``, any float dtype.
    tuned_kernel: ``[d_in, d_out]`` fine-tuned (or merged adapter) kernel ``W``.

  Returns:
    A :class:`Decomposition` of JAX arrays (``[d_out]`` vectors, ``[]`` means).

  Raises:
    ValueError: the kernels are not 2-D or their shapes differ.
    TypeError: a kernel is not floating point.
  """
  check_kernel_pair(base_kernel, tuned_kernel)
  return _decompose(jnp.asarray(base_kernel), jnp.asarray(tuned_kernel))

"""Every use of qwix (``pip install 'dora_jax[qdora]'``, pinned to 0.1.8) in one place.

What dora_jax takes from qwix: its quantizers (calibration, rounding, the
NormalFloat-4 codebook, fp8 casting: :func:`quantize`), its dequantizer (the
reference the tests hold :mod:`dora_jax.quantized` to) and its ``QArray``
type (:func:`to_qarray`, so qwix's own quantized ops and QLoRA run over the
very weights dora_jax quantized). The codebook lives in a private qwix
module; ``tests/test_qdora.py`` checks these names, so a qwix release that
moves them fails there, loudly, rather than here at run time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
  import qwix
  from qwix._src.core import numerics as _numerics  # private: the nf4 codebook
except ImportError as err:  # pragma: no cover - depends on the environment
  raise ImportError(
      "QDoRA quantizes with qwix: pip install 'dora_jax[qdora]' (qwix==0.1.8)") from err

#: The qwix release this module was written against.
QWIX_VERSION = "0.1.8"

#: dora_jax's qtype names -> qwix's qtypes.
QTYPES = {"nf4": "nf4", "int4": jnp.int4, "int8": jnp.int8, "fp8": jnp.float8_e4m3fn}

QArray = qwix.QArray


def quantize(kernel: jax.Array, qtype: str, *, channelwise_axes: Sequence[int],
             tiled_axes: dict[int, int]) -> QArray:
  """qwix's symmetric absmax quantization of a float32 ``kernel``.

  One scale per index of ``channelwise_axes``, per ``tile`` elements of each
  axis in ``tiled_axes``, shared over the other axes (float32 scales).
  """
  return qwix.quantize(kernel, QTYPES[qtype], channelwise_axes=tuple(channelwise_axes),
                       tiled_axes=dict(tiled_axes))


def dequantize(array: QArray) -> jax.Array:
  """qwix's dequantization (in the scale's dtype)."""
  return qwix.dequantize(array)


def nf4_codebook() -> np.ndarray:
  """The 16 NormalFloat-4 values qwix rounds to, ``[16]`` float32, ascending."""
  with jax.ensure_compile_time_eval():  # a constant, also when first asked for under a trace
    return np.asarray(_numerics.get_nf4_buckets(), np.float32)


def qarray(codes: jax.Array, scale: jax.Array, qtype: str) -> QArray:
  """A qwix ``QArray`` from unpacked codes (``uint4`` nf4 indices, ``int4``,
  ``int8``, ``float8_e4m3fn``) and their scale (same rank)."""
  return qwix.QArray(codes, scale, None, QTYPES[qtype])


def version() -> str:
  return qwix.__version__

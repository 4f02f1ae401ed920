"""Every use of qwix's private modules by :mod:`dora_jax.qwix`, in one place.

Pinned to qwix 0.1.8 (``pip install 'dora_jax[qwix]'``). ``tests/zoo/test_qwix.py``
imports this module and checks each name below, so a qwix release that moves one
fails there, loudly, rather than inside a training step.

Used:

* ``qwix._src.utils.flax_util``: ``find_param`` (is an op operand one of the current
  module's weights, and which), ``get_or_create_param`` (adapter params, NNX and
  Linen alike), ``get_current_module``, ``make_rng`` (dropout keys);
* ``qwix._src.providers.ptq.WithAux`` (a weight qwix has quantized);
* ``QuantizationProvider._get_current_rule_and_op_id`` (a provider's rule lookup, a
  private method of qwix's public base class).
"""

from __future__ import annotations

from qwix._src.providers.ptq import WithAux
from qwix._src.utils.flax_util import find_param, get_current_module, get_or_create_param, make_rng

#: The qwix version this file was written against.
QWIX_VERSION = "0.1.8"

#: Private attributes of qwix's public classes that :mod:`dora_jax.qwix` calls.
PRIVATE_METHODS = {"QuantizationProvider": ("_get_current_rule_and_op_id",)}

__all__ = ["QWIX_VERSION", "PRIVATE_METHODS", "WithAux", "find_param", "get_current_module",
           "get_or_create_param", "make_rng"]

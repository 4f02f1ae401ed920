"""DoRA through qwix: ``qwix.apply_lora_to_model(model, DoraProvider(...), *inputs)``.

Needs qwix (``pip install 'dora_jax[qwix]'``, pinned to the version in
:data:`QWIX_VERSION`); ``import dora_jax`` itself never imports qwix.

* :class:`DoraProvider`, :class:`DoraRule`: see :mod:`dora_jax.qwix.provider`.
* :func:`merge` (NNX) / :func:`merge_params` (Linen): merged plain weights.
"""

from dora_jax.qwix._private import QWIX_VERSION
from dora_jax.qwix.merge import merge, merge_params
from dora_jax.qwix.provider import DoraProvider, DoraRule

__all__ = ["QWIX_VERSION", "DoraProvider", "DoraRule", "merge", "merge_params"]

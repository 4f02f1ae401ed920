"""Linen DoRA embeddings and convolutions: kept as an import path of
:mod:`dora_jax.linen`, where :class:`DoRAEmbed`, :class:`DoRAConv` and
:func:`merge_params` (Dense, Conv, Embed and op-level weights alike) live."""

from dora_jax.linen import ADAPTER_COLLECTION, DoRAConv, DoRAEmbed, merge_params

__all__ = ["ADAPTER_COLLECTION", "DoRAConv", "DoRAEmbed", "merge_params"]

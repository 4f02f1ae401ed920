"""Weight-decomposition analysis from the DoRA paper (§3): ΔM and ΔD per layer.

For a pre-trained kernel ``W_0`` and a fine-tuned ``W`` (Flax layout
``[d_in, d_out]``, one magnitude per output column ``j``)::

  ΔM = mean_j |‖W[:, j]‖ − ‖W_0[:, j]‖|
  ΔD = mean_j (1 − cos(W[:, j], W_0[:, j]))

* :func:`decompose` — both, per column ``[d_out]`` and averaged, for one kernel.
* :func:`compare` — one :class:`LayerRow` per kernel of a whole parameter tree
  (full fine-tunes, merged adapters, or unmerged LoRA/DoRA adapters merged here).
* :func:`pearson` — correlation of ΔD and ΔM over rows (layers × checkpoints).
* :func:`format_table`, :func:`rows_to_csv` — the rows as text.
* :mod:`dora_jax.analysis.plot` — the paper-style scatter plot (matplotlib).
* :mod:`dora_jax.analysis.checkpoints` — Orbax / safetensors loading.
* ``python -m dora_jax.analysis BASE TUNED [TUNED ...] --out DIR`` — the CLI.
"""

from dora_jax.analysis.compare import (LayerRow, compare, effective_kernel, effective_kernels,
                                       flatten_params, format_table, layer_names, pearson,
                                       rows_to_csv)
from dora_jax.analysis.decompose import Decomposition, decompose

__all__ = [
    "Decomposition",
    "LayerRow",
    "compare",
    "decompose",
    "effective_kernel",
    "effective_kernels",
    "flatten_params",
    "format_table",
    "layer_names",
    "pearson",
    "rows_to_csv",
]

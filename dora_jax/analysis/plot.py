"""Scatter plots of ΔM against ΔD, like the DoRA paper's Figure 2 (matplotlib, Agg).

matplotlib is imported only when a plot is drawn (extra ``analysis``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

from dora_jax.analysis.compare import LayerRow, pearson


def require_matplotlib() -> None:
  """Raise ``ImportError`` with the install hint unless matplotlib can be imported."""
  try:
    import matplotlib  # noqa: F401
  except ImportError as err:
    raise ImportError(f"the plot needs matplotlib, which is not installed: "
                      f"pip install 'dora_jax[analysis]' ({err})") from None


def _checkpoint_order(rows: Sequence[LayerRow]) -> list[str]:
  seen: dict[str, None] = {}
  for r in rows:
    seen.setdefault(r.checkpoint, None)
  return list(seen)


def _draw(ax, rows: Sequence[LayerRow], title: str | None, cmap) -> None:
  order = _checkpoint_order(rows)
  colors = cmap(np.linspace(0.0, 0.9, max(len(order), 1)))
  for color, label in zip(colors, order):
    pts = [r for r in rows if r.checkpoint == label]
    ax.scatter([r.delta_d for r in pts], [r.delta_m for r in pts], color=color, label=label,
               s=36, edgecolors="black", linewidths=0.4, zorder=3)
  r = pearson(rows)
  dd = np.array([row.delta_d for row in rows])
  dm = np.array([row.delta_m for row in rows])
  if not math.isnan(r):
    slope, intercept = np.polyfit(dd, dm, 1)
    xs = np.linspace(dd.min(), dd.max(), 2)
    ax.plot(xs, slope * xs + intercept, "--", color="gray", linewidth=1, zorder=2)
  head = f"{title}: " if title else ""
  ax.set_title(f"{head}pearson r = {r:+.3f} ({len(rows)} points)")
  ax.set_xlabel("ΔD  (mean 1 − cos per column)")
  ax.set_ylabel("ΔM  (mean |m − m₀| per column)")
  ax.ticklabel_format(style="sci", scilimits=(-3, 3))
  ax.grid(True, alpha=0.3)
  ax.legend(title="checkpoint", fontsize="small")


def scatter_panels(groups: Mapping[str, Sequence[LayerRow]], path: str | os.PathLike, *,
                   dpi: int = 120) -> str:
  """One ΔD-vs-ΔM panel per group (e.g. ``{"FT": rows, "DoRA": rows}``), written as PNG.

  Each point is one layer of one checkpoint (x = ``delta_d``, y = ``delta_m``),
  colored by checkpoint in order of first appearance; the title gives the
  Pearson correlation; a dashed line is the least-squares fit.

  Returns:
    The path written.
  """
  require_matplotlib()
  from matplotlib import colormaps
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  if not groups or not all(groups.values()):
    raise ValueError("scatter_panels needs at least one group and no empty group")
  n = len(groups)
  fig = Figure(figsize=(5.2 * n, 4.4), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, n, squeeze=False)[0]
  for ax, (title, rows) in zip(axes, groups.items()):
    _draw(ax, rows, title, colormaps["viridis"])
  fig.savefig(os.fspath(path), format="png", dpi=dpi)
  return os.fspath(path)


def scatter(rows: Sequence[LayerRow], path: str | os.PathLike, *, title: str | None = None,
            dpi: int = 120) -> str:
  """A single ΔD-vs-ΔM panel of ``rows`` written as PNG (see :func:`scatter_panels`)."""
  return scatter_panels({title or "": rows}, path, dpi=dpi)

"""The one plot style of every figure: rcParams sized for print, figure sizes, the grid.

Figure functions draw inside ``with style():`` (matplotlib's ``rc_context`` of
:data:`STYLE`), make their axes with :func:`new_figure` and grid them with :func:`grid`.
"""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402

#: Resolution of the PNG copies (the PDFs are vector).
PNG_DPI = 300
COLUMN_WIDTH_IN = 3.4  # one column of a two-column paper
PAGE_WIDTH_IN = 7.0  # both columns
#: rcParams of every figure: small print fonts, no top/right spines, TrueType in PDFs.
STYLE: dict[str, Any] = {
    "font.size": 7,
    "axes.titlesize": 7,
    "axes.labelsize": 7,
    "xtick.labelsize": 6,
    "ytick.labelsize": 6,
    "legend.fontsize": 6,
    "lines.linewidth": 1.0,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "pdf.fonttype": 42,
}


def style() -> Any:
    """Context manager applying :data:`STYLE` (``plt.rc_context``)."""
    return plt.rc_context(STYLE)


def grid(ax: Any) -> None:
    """The light grid of line plots."""
    ax.grid(alpha=0.3, lw=0.5)


def new_figure(nrows: int, ncols: int, *, height_per_row: float = 1.45, **kw: Any):
    """Constrained-layout figure sized for print: one column wide up to 2 panels, else page."""
    width = COLUMN_WIDTH_IN if ncols <= 2 else min(PAGE_WIDTH_IN, 1.5 * ncols + 1.2)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(width, height_per_row * nrows + 0.6),
        squeeze=False,
        layout="constrained",
        **kw,
    )
    return fig, axes

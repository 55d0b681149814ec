"""Threshold sensitivity of Table 1: MCC over a grid of CKA and PER thresholds, as heatmaps.

One panel per (Table 1 column, size): x the CKA threshold of early convergence, y the PER
threshold (weights) or the fraction of the largest layer PER (gradients), colour the MCC
(:func:`lmdynamics.report.tables.mcc_grids`; grey where undefined). A star marks the configured
thresholds, a ring the paper's (0.45 and 0.95 / 0.9), so a reader sees whether a cell's
sign rests on one threshold. A dot marks the thresholds where the cell's p-value under random
relabelling of layers (Table 1's: one seed's exact test, or the stratified test over seeds) is
at most ``mcc.alpha``; a panel without dots has no threshold pair that can be told from chance.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import xarray as xr
from matplotlib.colors import Normalize

from lmdynamics.report.cka import cka_label
from lmdynamics.report.figures import save_figure
from lmdynamics.report.style import new_figure, style
from lmdynamics.report.tables import COLUMNS, PAPER_THRESHOLDS, MCCOptions, mcc_grids

MCC_CMAP = "RdBu_r"
UNDEFINED_COLOR = "0.85"


def _per_axis_label(options: MCCOptions, parameter: str) -> str:
    """y label: the PER threshold, or the fraction of the largest layer PER it multiplies."""
    if parameter == "weights" and options.weight_threshold == "absolute":
        return f"{options.per_quantity} threshold"
    return f"fraction of largest\n{options.per_quantity}"


def mcc_sensitivity(ds: xr.Dataset, out_stem: Path, options: MCCOptions | None = None, *,
                    grids: xr.Dataset | None = None, note: str = "") -> list[Path]:
    """Draw the sensitivity heatmaps of ``ds`` (the combined metrics after ``select_cka``).

    ``grids``: the MCC grid and its p-values to draw (default
    :func:`~lmdynamics.report.tables.mcc_grids` of ``ds``;
    :func:`lmdynamics.report.exclusion.grid_without` leaves flagged revisions out);
    ``note``: a line under the figure (the flagged revisions)."""
    options = options or MCCOptions()
    grids = mcc_grids(ds, options) if grids is None else grids
    grid, p_values = grids["mcc"], grids["p_value"]
    sizes = [str(s) for s in grid["size"].values]
    cka_t, per_t = grid["cka_threshold"].values, grid["per_threshold"].values
    half_x, half_y = np.diff(cka_t).min() / 2, np.diff(per_t).min() / 2
    extent = (cka_t[0] - half_x, cka_t[-1] + half_x, per_t[0] - half_y, per_t[-1] + half_y)
    cmap = plt.get_cmap(MCC_CMAP).with_extremes(bad=UNDEFINED_COLOR)
    norm = Normalize(-1.0, 1.0)
    with style():
        fig, axes = new_figure(len(COLUMNS), len(sizes), height_per_row=1.6)
        image = None
        for i, (label, _, parameter) in enumerate(COLUMNS):
            key = "per_weight_threshold" if parameter == "weights" else "per_grad_fraction"
            for j, size in enumerate(sizes):
                ax = axes[i, j]
                values = grid.sel(size=size, column=label).transpose("per_threshold",
                                                                     "cka_threshold")
                image = ax.imshow(np.ma.masked_invalid(values.to_numpy()), origin="lower",
                                  extent=extent, cmap=cmap, norm=norm, aspect="auto",
                                  interpolation="nearest")
                below = p_values.sel(size=size, column=label).transpose(
                    "per_threshold", "cka_threshold").to_numpy() <= options.alpha
                y_at, x_at = np.nonzero(below)
                ax.plot(cka_t[x_at], per_t[y_at], marker=".", ms=2, color="k", ls="none",
                        label=f"p ≤ {options.alpha:g}")
                ax.plot(options.cka_threshold, getattr(options, key), marker="*", ms=7,
                        color="k", ls="none", label="configured")
                ax.plot(PAPER_THRESHOLDS["cka_threshold"], PAPER_THRESHOLDS[key], marker="o",
                        ms=7, mfc="none", mec="k", ls="none", label="paper")
                ax.set_title(f"{size}, {label}")
                if j == 0:
                    ax.set_ylabel(_per_axis_label(options, parameter))
                if i == len(COLUMNS) - 1:
                    ax.set_xlabel(f"{cka_label(ds)} threshold")
        axes[0, 0].legend(loc="lower left", frameon=True, fontsize=5)
        if image is not None:
            fig.colorbar(image, ax=axes, label="MCC (grey: undefined)", aspect=40, pad=0.01,
                         shrink=0.8)
        if note:
            fig.supxlabel(note, fontsize=5, wrap=True)
        return save_figure(fig, Path(out_stem))

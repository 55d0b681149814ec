"""One layer x step figure per measure of :mod:`lmdynamics.estimators.measures`.

``figures/measure_<name>.{png,pdf}`` (:func:`measure_figure`), from the combined metrics
dataset: a heatmap per (data, component) row and size column, layers on the y axis and the
analysed checkpoints on the x axis (one cell each, labelled by step or by fraction of
training), the colour the measure's value (mean over seeds with seed replicates). Each row has
its own colour scale (a norm of weights and one of gradients differ by orders of magnitude),
logarithmic for the measures the registry marks so (norms, condition numbers); NaN cells
(undefined values, or stores without the measure's data: the reduction's log says which) are
grey. A comparative measure draws its comparison with the final step (``<name>``, one row per
component); its pairwise variable stays in the data.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib import colormaps
from matplotlib.colors import LogNorm, Normalize

from lmdynamics.estimators.measures import DATA_KINDS, MEASURES, Measure
from lmdynamics.report.cka import tick_positions
from lmdynamics.report.figures import (
    COMPONENT_NAMES,
    check_x_axis,
    over_seeds,
    present_layers,
    save_figure,
    seeds_text,
    step_tick_label,
)
from lmdynamics.report.style import STYLE, new_figure, style
from lmdynamics.report.tables import final_step

__all__ = ["DATA_TITLES", "measure_figure", "measure_rows"]

#: Row titles of the data kinds.
DATA_TITLES: dict[str, str] = {"weights": "weights", "gradients": "gradients",
                               "activations": "activations", "ov_circuit": "OV circuit"}
CMAP = "viridis"


def measure_rows(ds: xr.Dataset, measure: Measure) -> list[tuple[str, str, str]]:
    """(variable, data kind, component) of every row ``measure`` has in ``ds``: each of its
    variables present, each component with a finite value (for a comparative measure, its
    comparison with the final step)."""
    rows = []
    kinds = ["activations"] if measure.comparative else [d for d in DATA_KINDS
                                                        if d in measure.data]
    for kind in kinds:
        name = measure.variable(kind)
        if name not in ds:
            continue
        for comp in ds["component"].values:
            if bool(ds[name].sel(component=comp).notnull().any()):
                rows.append((name, kind, str(comp)))
    return rows


def _norm(values: np.ndarray, log: bool) -> Normalize:
    finite = values[np.isfinite(values)]
    if log:
        finite = finite[finite > 0]
    if finite.size == 0:
        return Normalize(0.0, 1.0)
    low, high = float(finite.min()), float(finite.max())
    if high <= low:  # one value: a small symmetric window around it
        low, high = (low / 2, high * 2) if log else (low - 0.5, high + 0.5)
    return LogNorm(low, high) if log else Normalize(low, high)


def measure_figure(name: str, ds: xr.Dataset, out_stem: Path, *,
                   x_axis: str = "step") -> list[Path]:
    """Draw measure ``name``'s layer x step heatmaps (module docstring) to ``out_stem``
    (.png, .pdf). ValueError for an unknown measure; a dataset without any of its values
    (every one NaN or absent) gives a figure that says so."""
    check_x_axis(x_axis)
    if name not in MEASURES:
        raise ValueError(f"unknown measure {name!r}; known: {', '.join(MEASURES)}")
    measure = MEASURES[name]
    ds, _ = over_seeds(ds)
    rows = measure_rows(ds, measure)
    sizes = [str(s) for s in ds["size"].values]
    steps = ds["step"].to_numpy()
    ticks = tick_positions(steps)
    labels = ([step_tick_label(float(steps[i])) for i in ticks] if x_axis == "step"
              else [f"{steps[i] / final_step(ds):.2g}" for i in ticks])
    cmap = colormaps[CMAP].with_extremes(bad="0.85")
    with style():
        if not rows:
            fig, axes = new_figure(1, 1)
            axes[0, 0].text(0.5, 0.5, f"{measure.title}: no values\n(not computed, or NaN "
                            "everywhere: see the reduce_size logs)", ha="center",
                            va="center", transform=axes[0, 0].transAxes)
            axes[0, 0].set_axis_off()
            return save_figure(fig, out_stem)
        fig, axes = new_figure(len(rows), len(sizes), height_per_row=1.3)
        for i, (var, kind, comp) in enumerate(rows):
            da = ds[var].sel(component=comp)
            norm = _norm(da.to_numpy(), measure.log_scale)
            image = None
            for j, size in enumerate(sizes):
                ax = axes[i, j]
                layers = present_layers(ds, size)
                values = da.sel(size=size, layer=layers).transpose("layer", "step").to_numpy()
                image = ax.imshow(np.ma.masked_invalid(values), origin="lower", cmap=cmap,
                                  norm=norm, interpolation="nearest", aspect="auto")
                ax.set_xticks(ticks, labels if i == len(rows) - 1 else [], rotation=90)
                ax.set_yticks(range(len(layers)), [str(v) for v in layers])
                if i == 0:
                    ax.set_title(f"{size} ({len(layers)} layers)")
                if j == 0:
                    ax.set_ylabel(f"{DATA_TITLES[kind]}\n"
                                  f"{COMPONENT_NAMES.get(comp, comp)}: layer")
            if image is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # log ticks on a narrow range
                    fig.colorbar(image, ax=axes[i, :], label=measure.unit, aspect=12,
                                 pad=0.01)
        axis_name = "training step" if x_axis == "step" else "fraction of training"
        fig.supxlabel(f"{axis_name} (one cell per checkpoint)", fontsize=STYLE["axes.labelsize"])
        title = measure.title + (" (OV: mean over heads)" if "ov_circuit" in
                                 {r[1] for r in rows} else "")
        seeds = seeds_text(ds)
        fig.suptitle(title + (f"; {seeds}" if seeds else ""), fontsize=STYLE["axes.labelsize"])
        return save_figure(fig, out_stem)

"""Paper figures 1-5 and the training-loss figure, drawn from the combined metrics dataset.

Every figure function takes the combined ``metrics.zarr`` dataset (see ``docs/architecture.md``,
"Metrics datasets"): float64 ``cka``, ``per_weight``, ``per_grad`` with dims
(size, seed, component, layer, step) (or without ``seed``), ``size`` ordered by parameter
count, missing layers NaN, attrs ``final_step`` and ``per_divisor``. Seed replicates
(:func:`over_seeds`): lines are the mean over seeds, bands the min-max range across seeds;
with one seed the figure is that run's, as before seeds were a dimension. Each writes
``<out_stem>.png`` and ``<out_stem>.pdf`` and returns both paths. The x axis is either the
training step on a symlog axis (``"step"``) or the fraction of training ``step / final_step``
(``"fraction"``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter, SymmetricalLogLocator  # noqa: E402

from lmdynamics.report.style import (  # noqa: E402
    PNG_DPI,
    STYLE,
    grid,
    new_figure,
    style,
)
from lmdynamics.report.tables import final_step  # noqa: E402
from lmdynamics.store import atomic_path  # noqa: E402

X_AXES: tuple[str, ...] = ("step", "fraction")
METRICS: tuple[str, ...] = ("cka", "per_weight", "per_grad")
COMPONENT_NAMES: dict[str, str] = {"attention": "Attention", "mlp": "MLP"}
METRIC_TITLES: dict[str, str] = {
    "cka": "CKA (current vs final)", "per_weight": "PER of weights", "per_grad": "PER of gradients",
}
DEPTH_CMAP = "viridis"
SIZE_CMAP = "plasma"
DEPTH_LABEL = "layer depth (fraction of layers)"


# --------------------------------------------------------------------------- helpers


def check_x_axis(x_axis: str) -> str:
    """Return ``x_axis`` if it is one of :data:`X_AXES`, else raise ValueError naming it."""
    if x_axis not in X_AXES:
        raise ValueError(f"unknown x_axis {x_axis!r}; allowed values: {', '.join(X_AXES)}")
    return x_axis


def x_values(ds: xr.Dataset, x_axis: str) -> np.ndarray:
    """x coordinates, shape (step,): training steps, or ``step / final_step`` (dimensionless)."""
    steps = ds["step"].to_numpy().astype(float)
    if check_x_axis(x_axis) == "fraction":
        return steps / final_step(ds)
    return steps


def x_label(x_axis: str) -> str:
    """Axis label naming which x axis is used."""
    if check_x_axis(x_axis) == "step":
        return "training step (symlog)"
    return "fraction of training (step / final step)"


def x_caption(ds: xr.Dataset, x_axis: str) -> str:
    """The figure's x label, and under it the note on flagged revisions (attr ``audit_note``
    of :func:`lmdynamics.report.exclusion.mark_dataset`) when there is one."""
    note = ds.attrs.get("audit_note", "")
    return x_label(x_axis) + (f"\n{note}" if note else "")


def excluded_steps(ds: xr.Dataset, size: str) -> np.ndarray:
    """Boolean (step,): the steps of ``size`` whose revision the audits flagged (variable
    ``excluded``, :func:`lmdynamics.report.exclusion.mark_dataset`); all False without it."""
    if "excluded" not in ds:
        return np.zeros(ds.sizes["step"], dtype=bool)
    return ds["excluded"].sel(size=size).transpose("step").to_numpy().astype(bool)


def leaves_out(ds: xr.Dataset) -> bool:
    """Whether flagged revisions are left out of the drawn statistics (``audit.defective:
    exclude``), not only drawn hollow."""
    return ds.attrs.get("audit_policy") == "exclude"


def plot_steps(ax: Axes, x: np.ndarray, y: np.ndarray, flagged: np.ndarray, *,
               leave_out: bool, color: Any, **kw: Any) -> list:
    """A line over steps whose ``flagged`` points are hollow markers: left out of the line
    with ``leave_out`` (it joins the trusted steps on either side), kept in it otherwise."""
    keep = ~flagged if leave_out else np.ones_like(flagged)
    lines = ax.plot(x[keep], np.asarray(y)[keep], color=color, **kw)
    if flagged.any():
        ax.plot(x[flagged], np.asarray(y)[flagged], ls="none", marker="o", mfc="none",
                mec=color, ms=3.0, mew=0.7, zorder=4)
    return lines


def band_steps(ax: Axes, x: np.ndarray, lo: np.ndarray, hi: np.ndarray, flagged: np.ndarray,
               *, leave_out: bool, **kw: Any) -> None:
    """``fill_between`` over the steps, without the ``flagged`` ones when ``leave_out``."""
    keep = ~flagged if leave_out else np.ones_like(flagged)
    ax.fill_between(x[keep], np.asarray(lo)[keep], np.asarray(hi)[keep], **kw)


def flagged_handle(ds: xr.Dataset) -> tuple[Line2D, str] | None:
    """The legend entry of hollow markers, when any revision of ``ds`` is flagged."""
    if "excluded" not in ds or not bool(ds["excluded"].any()):
        return None
    label = ("flagged revision (left out)" if leaves_out(ds)
             else "flagged revision (counted)")
    return Line2D([], [], ls="none", marker="o", mfc="none", mec="0.3", ms=3.0), label


def step_tick_label(value: float, _pos: int | None = None) -> str:
    """Compact step tick: 0, 1, 10, 100, 1k, 10k, 100k, 1M."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:g}{unit}"
    return f"{value:g}"


def format_x(ax: Axes, x_axis: str, *, label: bool = False, max_step: float = 0.0,
             min_step: float | None = None) -> None:
    """Scale an x axis: symlog (linthresh 1, so step 0 shows) or linear fraction of training.

    The step axis starts at 0 when the first analysed step is 0, else at the first analysed
    step (``min_step``; default the smallest x of what is drawn), so a suite without step 0
    (OLMo-1B-hf starts at step 1000) does not spend most of the axis on steps it never
    saved. With more than four decades to show the step axis is ticked every second decade
    (0, 1, 100, 10k) so that narrow panels stay legible.
    """
    if check_x_axis(x_axis) == "step":
        ax.set_xscale("symlog", linthresh=1.0, linscale=1.0)
        first = ax.dataLim.x0 if min_step is None else min_step
        left = float(first) if np.isfinite(first) and first > 0 else 0.0
        ax.set_xlim(left=left)
        base = 100 if max_step > 1e4 * max(left, 1.0) else 10
        ax.xaxis.set_major_locator(SymmetricalLogLocator(base=base, linthresh=1.0))
        ax.xaxis.set_major_formatter(FuncFormatter(step_tick_label))
    else:
        ax.set_xlim(0, 1.0)
    if label:
        ax.set_xlabel(x_label(x_axis))


def metric_ylabel(ds: xr.Dataset, metric: str) -> str:
    """y-axis label with units: CKA is unitless in [0, 1]; PER is effective rank / divisor."""
    if metric == "cka":
        if ds.attrs.get("cka_estimator") == "debiased":
            return "debiased CKA vs final"  # may dip below 0
        return "CKA vs final (0-1)"
    divisor = ds.attrs.get("per_divisor", "H")
    kind = "weights" if metric == "per_weight" else "gradients"
    return f"PER {kind} (ER / {divisor})"


def size_colors(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` RGBA colours from a sequential palette, ordered from smallest to largest size."""
    cmap = plt.get_cmap(SIZE_CMAP)
    positions = [0.45] if n == 1 else np.linspace(0.05, 0.8, n)
    return [cmap(float(p)) for p in positions]


def present_layers(ds: xr.Dataset, size: str) -> np.ndarray:
    """Layer indices (int array) for which ``size`` has any non-NaN metric value."""
    present = None
    for metric in METRICS:
        if metric not in ds:
            continue
        has = ds[metric].sel(size=size).notnull().any(dim=("component", "step"))
        present = has if present is None else (present | has)
    if present is None:
        return np.array([], dtype=int)
    return ds["layer"].to_numpy()[present.to_numpy()].astype(int)


def depth_fraction(layer: int, n_layers: int) -> float:
    """Depth of 0-based ``layer`` as a fraction of ``n_layers``: ``(layer + 1) / n_layers``."""
    return (layer + 1) / n_layers


def layer_percentiles(da: xr.DataArray, q: Sequence[float]) -> np.ndarray:
    """Percentiles ``q`` (0-100) across ``layer`` ignoring NaN; shape (len(q), step)."""
    values = da.transpose("layer", "step").to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps give NaN
        return np.nanpercentile(values, q, axis=0)


def layer_mean(da: xr.DataArray) -> np.ndarray:
    """Mean across ``layer`` ignoring NaN; shape (step,)."""
    values = da.transpose("layer", "step").to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def save_figure(fig: Figure, out_stem: Path) -> list[Path]:
    """Write ``fig`` to ``out_stem`` .png (:data:`PNG_DPI`) and .pdf, close it, return paths."""
    out_stem = Path(out_stem)
    out_stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    try:
        engine = fig.get_layout_engine()
        if engine is not None:  # lay out once, not once per file format
            engine.execute(fig)
            fig.set_layout_engine("none")
        for path in paths:  # through a temporary file: a killed job leaves no half figure
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=PNG_DPI, format=path.suffix[1:])
    finally:
        plt.close(fig)
    return paths


def require(ds: xr.Dataset, metrics: Sequence[str]) -> None:
    """Raise ValueError if ``ds`` lacks a metric variable."""
    missing = [m for m in metrics if m not in ds]
    if missing:
        raise ValueError(f"dataset lacks variable(s) {missing}; has {list(ds.data_vars)}")


#: Suffixes of per-run bootstrap variables: not averaged over seeds (the mean of per-seed
#: intervals is no interval of the mean); with several seeds the band is the seed range.
_PER_RUN_SUFFIXES = ("_low", "_high", "_resamples")


def over_seeds(ds: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset | None]:
    """(``ds`` averaged over ``seed``, ``ds`` itself or None when there is one seed or none).

    The mean keeps NaN (``skipna=False``): a metric undefined in one replicate is undefined
    in the mean, not the mean of the others. With one seed the first element is that seed's
    data unchanged (``isel``), so a suite without replicates draws exactly as before; with
    several, the bootstrap variables (``*_low``, ``*_high``, ``*_resamples``) are dropped
    from the mean and ``attrs["n_seeds"]`` records the count.
    """
    if "seed" not in ds.dims:
        return ds, None
    if ds.sizes["seed"] == 1:
        return ds.isel(seed=0, drop=True), None
    per_run = [v for v in ds.data_vars if "seed" in ds[v].dims
               and str(v).endswith(_PER_RUN_SUFFIXES)]
    mean = ds.drop_vars(per_run).mean("seed", skipna=False, keep_attrs=True)
    for name in ds.data_vars:  # booleans and variables without seeds, as they were
        if name in mean and "seed" not in ds[name].dims:
            mean[name] = ds[name]
    mean.attrs["n_seeds"] = int(ds.sizes["seed"])
    return mean, ds


def seed_range(da: xr.DataArray) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) over ``seed`` of a (seed, step) array, NaN where any seed is NaN."""
    values = da.transpose("seed", "step").to_numpy()
    return values.min(axis=0), values.max(axis=0)


def seeds_text(ds: xr.Dataset) -> str:
    """``"mean of N seeds"`` for a dataset averaged by :func:`over_seeds`, else ``""``."""
    n = ds.attrs.get("n_seeds")
    return f"mean of {n} seeds" if n else ""


# --------------------------------------------------------------------------- figures


def figure1(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """CKA vs the final checkpoint, distribution across layers (10/25/50/75/90th percentiles).

    Rows: the smallest and the largest size (first and last of ``size``); columns: components.
    Shaded bands span the 10-90th and 25-75th percentiles per step; the line is the median.
    With seed replicates: the distribution over layers of the mean over seeds.
    """
    check_x_axis(x_axis)
    require(ds, ["cka"])
    ds, _ = over_seeds(ds)
    sizes = list(dict.fromkeys([str(ds["size"].values[0]), str(ds["size"].values[-1])]))
    components = [str(c) for c in ds["component"].values]
    x = x_values(ds, x_axis)
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    out = leaves_out(ds)
    with style():
        fig, axes = new_figure(len(sizes), len(components), sharex=True, sharey=True)
        for i, size in enumerate(sizes):
            flagged = excluded_steps(ds, size)
            for j, comp in enumerate(components):
                ax = axes[i, j]
                da = ds["cka"].sel(size=size, component=comp)
                pct = layer_percentiles(da, [10, 25, 50, 75, 90])
                c = colors[size]
                band_steps(ax, x, pct[0], pct[4], flagged, leave_out=out, color=c, alpha=0.2,
                           lw=0)
                band_steps(ax, x, pct[1], pct[3], flagged, leave_out=out, color=c, alpha=0.45,
                           lw=0)
                plot_steps(ax, x, pct[2], flagged, leave_out=out, color=c)
                n = len(present_layers(ds, size))
                ax.set_title(f"{size} ({n} layers), {COMPONENT_NAMES.get(comp, comp)}")
                format_x(ax, x_axis, max_step=float(x.max()), min_step=float(x.min()))
                if j == 0:
                    ax.set_ylabel(metric_ylabel(ds, "cka"))
                grid(ax)
        grey = "0.35"
        handles = [
            plt.Rectangle((0, 0), 1, 1, color=grey, alpha=0.2, lw=0),
            plt.Rectangle((0, 0), 1, 1, color=grey, alpha=0.45, lw=0),
            Line2D([], [], color=grey),
        ]
        labels = ["10-90th pct.", "25-75th pct.", "median"]
        if (entry := flagged_handle(ds)) is not None:
            handles.append(entry[0])
            labels.append(entry[1])
        fig.supxlabel(x_caption(ds, x_axis), fontsize=STYLE["axes.labelsize"])
        title = ", ".join(filter(None, ["distribution over layers", seeds_text(ds)]))
        fig.legend(handles, labels, loc="outside upper center", ncol=len(handles),
                   frameon=False, title=title)
        return save_figure(fig, out_stem)


def _mark_flagged(ax: Axes, ds: xr.Dataset, x: np.ndarray, colors: dict[str, Any]) -> bool:
    """Draw a triangle on the x axis at each step flagged in boolean ``ds["flagged"]``.

    ``ds["flagged"]`` has dims (size, step); returns whether anything was drawn.
    """
    if "flagged" not in ds:
        return False
    drawn = False
    for size, color in colors.items():
        flags = ds["flagged"].sel(size=size).fillna(False).transpose("step").to_numpy()
        flags = flags.astype(bool)
        if flags.any():
            ax.plot(x[flags], np.zeros(int(flags.sum())), ls="none", marker="^", ms=3.5,
                    color=color, transform=ax.get_xaxis_transform(), clip_on=False, zorder=5)
            drawn = True
    return drawn


def _layer_mean_band(ax: Axes, ds: xr.Dataset, metric: str, size: str, comp: str,
                     x: np.ndarray, color: Any) -> bool:
    """Shade ``<metric>_layer_mean_low/_high`` (size, component, step) if present."""
    low, high = f"{metric}_layer_mean_low", f"{metric}_layer_mean_high"
    if low not in ds or high not in ds:
        return False
    lo = ds[low].sel(size=size, component=comp).transpose("step").to_numpy()
    hi = ds[high].sel(size=size, component=comp).transpose("step").to_numpy()
    ax.fill_between(x, lo, hi, color=color, alpha=0.2, lw=0)
    return True


def figure2(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """Layer-mean CKA, PER of weights and PER of gradients per step, one line per size.

    2x3 grid: rows Attention/MLP, columns CKA, PER weights, PER gradients. Colours follow a
    sequential palette ordered by parameter count. If ``ds`` has ``cka_layer_mean_low`` /
    ``_high`` (size, component, step), the bootstrap interval of the layer mean is shaded
    around each CKA curve. If ``ds`` has a boolean ``flagged``
    (size, step), flagged checkpoints are marked with a triangle on the x axis. With several
    seeds (:func:`over_seeds`): the line is the mean over seeds of the layer mean, the band
    its min-max range across seeds (for every metric; no bootstrap band).
    """
    check_x_axis(x_axis)
    require(ds, METRICS)
    ds, per_seed = over_seeds(ds)
    sizes = [str(s) for s in ds["size"].values]
    components = [str(c) for c in ds["component"].values]
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    x = x_values(ds, x_axis)
    flagged = banded = seed_banded = False
    out = leaves_out(ds)
    with style():
        fig, axes = new_figure(len(components), len(METRICS), sharex=True, sharey="col")
        fig.get_layout_engine().set(wspace=0.1)  # room for the y labels between columns
        for i, comp in enumerate(components):
            for j, metric in enumerate(METRICS):
                ax = axes[i, j]
                for size in sizes:
                    hollow = excluded_steps(ds, size)
                    y = layer_mean(ds[metric].sel(size=size, component=comp))
                    plot_steps(ax, x, y, hollow, leave_out=out, color=colors[size],
                               label=size)
                    if per_seed is not None:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)  # absent layers
                            means = per_seed[metric].sel(size=size, component=comp).mean(
                                "layer")
                        lo, hi = seed_range(means)
                        band_steps(ax, x, lo, hi, hollow, leave_out=out, color=colors[size],
                                   alpha=0.2, lw=0)
                        seed_banded = True
                    banded |= _layer_mean_band(ax, ds, metric, size, comp, x, colors[size])
                flagged |= _mark_flagged(ax, ds, x, colors)
                ax.set_title(f"{COMPONENT_NAMES.get(comp, comp)}: {METRIC_TITLES[metric]}")
                ax.set_ylabel(metric_ylabel(ds, metric))
                format_x(ax, x_axis, max_step=float(x.max()), min_step=float(x.min()))
                grid(ax)
        fig.supxlabel(x_caption(ds, x_axis), fontsize=STYLE["axes.labelsize"])
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if (entry := flagged_handle(ds)) is not None:
            handles.append(entry[0])
            labels.append(entry[1])
        if flagged:
            handles.append(Line2D([], [], ls="none", marker="^", ms=3.5, color="0.3"))
            labels.append("flagged checkpoint")
        if banded:
            handles.append(plt.Rectangle((0, 0), 1, 1, color="0.35", alpha=0.2, lw=0))
            level = float(ds.attrs.get("bootstrap_level", 0.9))
            labels.append(f"{100 * level:g}% bootstrap interval")
        if seed_banded:
            handles.append(plt.Rectangle((0, 0), 1, 1, color="0.35", alpha=0.2, lw=0))
            labels.append(f"min-max over {ds.attrs['n_seeds']} seeds")
        title = "model size (mean over layers" + (f", {seeds_text(ds)})" if seed_banded
                                                  else ")")
        fig.legend(handles, labels, loc="outside upper center", ncol=len(handles),
                   frameon=False, title=title)
        return save_figure(fig, out_stem)


def layer_grid(ds: xr.Dataset, out_stem: Path, x_axis: str, *, sharey: bool | str,
               ylabel: Callable[[str], str],
               draw: Callable[[Any, str, str, list, Callable[[Any], Any]], None],
               suptitle: str | None = None) -> list[Path]:
    """The per-layer grid of Figures 3-5 and :func:`cka_seed_sd`: rows components, columns
    sizes, one line per layer coloured by ``(layer + 1) / n_layers`` of that size on
    :data:`DEPTH_CMAP`, with a shared colour bar. ``draw(ax, size, component, layers,
    colour_of)`` fills one panel (``colour_of(layer)``: the layer's colour); ``ylabel(component)``
    is the left column's y label."""
    sizes = [str(s) for s in ds["size"].values]
    components = [str(c) for c in ds["component"].values]
    x = x_values(ds, x_axis)
    cmap = plt.get_cmap(DEPTH_CMAP)
    norm = Normalize(0.0, 1.0)
    with style():
        fig, axes = new_figure(len(components), len(sizes), sharex=True, sharey=sharey)
        for j, size in enumerate(sizes):
            layers = present_layers(ds, size)
            for i, comp in enumerate(components):
                ax = axes[i, j]
                draw(ax, size, comp, layers,
                     lambda layer: cmap(norm(depth_fraction(int(layer), len(layers)))))  # noqa: B023 (used at once)
                if i == 0:
                    ax.set_title(f"{size} ({len(layers)} layers)")
                if j == 0:
                    ax.set_ylabel(ylabel(comp))
                format_x(ax, x_axis, max_step=float(x.max()), min_step=float(x.min()))
                grid(ax)
        fig.supxlabel(x_caption(ds, x_axis), fontsize=STYLE["axes.labelsize"])
        if (entry := flagged_handle(ds)) is not None:
            fig.legend([entry[0]], [entry[1]], loc="outside upper right", frameon=False)
        if suptitle is not None:
            fig.suptitle(suptitle, fontsize=STYLE["axes.labelsize"])
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=axes, label=DEPTH_LABEL,
                     aspect=30, pad=0.01)
        return save_figure(fig, out_stem)


def per_layer_figure(ds: xr.Dataset, out_stem: Path, metric: str, *,
                     x_axis: str = "step") -> list[Path]:
    """Per-layer lines of ``metric`` (:func:`layer_grid`); y is shared within a row. With
    several seeds (:func:`over_seeds`): each line is the layer's mean over seeds, with its
    min-max range across seeds shaded.
    """
    check_x_axis(x_axis)
    require(ds, [metric])
    ds, per_seed = over_seeds(ds)
    x = x_values(ds, x_axis)

    def draw(ax, size, comp, layers, colour_of):
        da = ds[metric].sel(size=size, component=comp)
        hollow = excluded_steps(ds, size)
        for layer in layers:
            plot_steps(ax, x, da.sel(layer=layer).transpose("step").to_numpy(), hollow,
                       leave_out=leaves_out(ds), color=colour_of(layer), lw=0.8)
            if per_seed is not None:
                lo, hi = seed_range(per_seed[metric].sel(size=size, component=comp,
                                                         layer=layer))
                band_steps(ax, x, lo, hi, hollow, leave_out=leaves_out(ds),
                           color=colour_of(layer), alpha=0.15, lw=0)

    return layer_grid(
        ds, out_stem, x_axis, sharey="row", draw=draw,
        ylabel=lambda comp: f"{COMPONENT_NAMES.get(comp, comp)}\n{metric_ylabel(ds, metric)}",
        suptitle=(f"lines: {seeds_text(ds)}; bands: min-max across seeds"
                  if per_seed is not None else None))


def figure3(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """Per-layer CKA vs the final checkpoint (paper Fig. 3)."""
    return per_layer_figure(ds, out_stem, "cka", x_axis=x_axis)


def figure4(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """Per-layer PER of the weights (paper Fig. 4)."""
    return per_layer_figure(ds, out_stem, "per_weight", x_axis=x_axis)


def figure5(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """Per-layer PER of the gradients (paper Fig. 5)."""
    return per_layer_figure(ds, out_stem, "per_grad", x_axis=x_axis)


def cka_seed_sd(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """Across-seed standard deviation of CKA to the final checkpoint, per layer, over training.

    Rows components, columns sizes, colour layer depth (:func:`layer_grid`, as Figures 3-5).
    The sd is the sample standard deviation (``ddof=1``) over the ``seed`` replicates, NaN
    where any replicate is NaN. With one seed (or none) the sd is undefined: every panel says
    so in words ("one seed") and draws no line, so the figure exists for every configuration.
    """
    check_x_axis(x_axis)
    require(ds, ["cka"])
    n_seeds = ds.sizes.get("seed", 1)
    mean, _ = over_seeds(ds)
    sd = ds["cka"].std("seed", ddof=1, skipna=False) if n_seeds >= 2 else None
    x = x_values(mean, x_axis)

    def draw(ax, size, comp, layers, colour_of):
        if sd is None:
            ax.text(0.5, 0.5, "one seed:\nno across-seed spread", ha="center",
                    va="center", transform=ax.transAxes, color="0.3", fontsize=6)
            ax.set_xlim(float(x.min()), float(x.max()))
            return
        da = sd.sel(size=size, component=comp)
        for layer in layers:
            plot_steps(ax, x, da.sel(layer=layer).transpose("step").to_numpy(),
                       excluded_steps(mean, size), leave_out=leaves_out(mean), lw=0.8,
                       color=colour_of(layer))

    return layer_grid(
        mean, out_stem, x_axis, sharey=True, draw=draw,
        ylabel=lambda comp: f"{COMPONENT_NAMES.get(comp, comp)}\nsd of "
                            f"{metric_ylabel(mean, 'cka')}",
        suptitle=f"across-seed sd (ddof=1) over {n_seeds} seed{'s' if n_seeds != 1 else ''}")


def smooth_log_window(steps: np.ndarray, values: np.ndarray, rel_width: float) -> np.ndarray:
    """Mean of ``values`` over steps within ``step * (1 +- rel_width)``; shape (n,), NaN-aware.

    ``steps`` (n,) must be sorted ascending. The window is uniform on a log axis, so early
    steps are not averaged with much later ones.
    """
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    sums = np.concatenate([[0.0], np.cumsum(np.where(finite, values, 0.0))])
    counts = np.concatenate([[0], np.cumsum(finite)])
    lo = np.searchsorted(steps, steps * (1 - rel_width), side="left")
    hi = np.searchsorted(steps, steps * (1 + rel_width), side="right")
    n = counts[hi] - counts[lo]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, (sums[hi] - sums[lo]) / n, np.nan)


def training_loss_figure(loss: pd.DataFrame, out_stem: Path, *,
                         smooth: float | None = 0.1) -> list[Path]:
    """Training loss (nats/token) vs training step (symlog), one line per size.

    ``loss`` has columns ``size, step, loss``; sizes are drawn in order of first appearance
    (assumed smallest first for the sequential palette). ``smooth`` is the relative half-width
    of a log-uniform moving mean (see :func:`smooth_log_window`); the raw curve is then drawn
    faintly underneath. ``None`` or 0 draws the raw curve only. With a ``seed`` column of
    several replicates: the line is the mean over seeds (per step, before smoothing) and the
    band the min-max range across seeds; every seed must log the same steps.
    """
    missing = {"size", "step", "loss"} - set(loss.columns)
    if missing:
        raise ValueError(f"loss table lacks column(s) {sorted(missing)}")
    if smooth is not None and not 0 <= smooth < 1:
        raise ValueError(f"smooth={smooth!r} is outside the allowed range [0, 1) or None")
    sizes = list(dict.fromkeys(str(s) for s in loss["size"]))
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    with style():
        fig, axes = new_figure(1, 1, height_per_row=2.0)
        ax = axes[0, 0]
        n_seeds = int(loss["seed"].nunique()) if "seed" in loss else 1
        for size in sizes:
            part = loss[loss["size"].astype(str) == size]
            by_step = part.groupby("step")["loss"]
            if n_seeds > 1:
                counts = by_step.count()
                if (counts != n_seeds).any():
                    raise ValueError(f"training loss of size {size}: steps "
                                     f"{counts[counts != n_seeds].index[:5].tolist()} are not "
                                     f"logged by all {n_seeds} seeds")
                ax.fill_between(by_step.min().index.to_numpy(dtype=float),
                                by_step.min().to_numpy(), by_step.max().to_numpy(),
                                color=colors[size], alpha=0.2, lw=0)
            mean = by_step.mean() if n_seeds > 1 else part.set_index("step")["loss"].sort_index()
            steps, raw = mean.index.to_numpy(dtype=float), mean.to_numpy(dtype=float)
            if smooth:
                ax.plot(steps, raw, color=colors[size], alpha=0.25, lw=0.5)
                raw = smooth_log_window(steps, raw, smooth)
            ax.plot(steps, raw, color=colors[size], label=size)
        format_x(ax, "step", label=True, max_step=float(loss["step"].max()), min_step=0.0)
        ax.set_ylabel("training loss (nats/token)")
        grid(ax)
        ax.legend(title="model size" + (f" (mean and min-max of {n_seeds} seeds)"
                                        if n_seeds > 1 else ""), frameon=False)
        return save_figure(fig, out_stem)


FIGURES: dict[str, Callable[..., list[Path]]] = {
    "figure1": figure1,
    "figure2": figure2,
    "figure3": figure3,
    "figure4": figure4,
    "figure5": figure5,
    "cka_seed_sd": cka_seed_sd,
}


def render(name: str, ds: xr.Dataset, out_stem: Path, *,
           registry: dict[str, Callable[..., list[Path]]] | None = None,
           **options: Any) -> list[Path]:
    """Draw figure ``name`` (a key of ``registry``, by default :data:`FIGURES`) from ``ds``;
    options go to the figure function. An unknown name fails listing the known ones."""
    registry = FIGURES if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown figure {name!r}; known figures: {', '.join(registry)}")
    return registry[name](ds, Path(out_stem), **options)

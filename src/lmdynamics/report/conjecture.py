"""Figures of the Conjecture analyses, drawn from the combined ``stats.zarr``.

Input: the dataset of :func:`lmdynamics.reduction.stats.combine_stats` (dims ``size``
ordered by parameter count, ``step``, ``param``/``matrix`` with ``*_layer``/``*_module``
coordinates, ``layer``, ...). Conventions, helpers and palettes are those of
:mod:`lmdynamics.report.figures` (x axis symlog step or fraction of training, depth colours,
size colours, PNG at 300 dpi + PDF). Each function writes ``<out_stem>.{png,pdf}`` and
returns both paths.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import xarray as xr  # noqa: E402
from matplotlib.cm import ScalarMappable  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from lmdynamics import families  # noqa: E402
from lmdynamics.estimators.spectrum import fit_window, power_law_fit  # noqa: E402
from lmdynamics.report.figures import (  # noqa: E402
    DEPTH_CMAP,
    DEPTH_LABEL,
    check_x_axis,
    depth_fraction,
    excluded_steps,
    flagged_handle,
    format_x,
    leaves_out,
    over_seeds,
    plot_steps,
    render,
    save_figure,
    size_colors,
    x_caption,
    x_values,
)
from lmdynamics.report.style import STYLE, grid, new_figure, style  # noqa: E402
from lmdynamics.report.tables import final_step  # noqa: E402

#: Weight matrices of a GPT-NeoX block, in the post's order, with panel titles by role
#: (every family's: :func:`block_matrices`).
BLOCK_MATRICES: dict[str, str] = dict(families.get("gpt_neox").block_matrices)


def block_matrices(ds: xr.Dataset) -> dict[str, str]:
    """Block weight matrices (module -> panel title by role) of the family recorded in the
    dataset's attrs (``family``; GPT-NeoX when absent), :attr:`Family.block_matrices`."""
    return dict(families.family_of(ds.attrs).block_matrices)


def embedding_names(ds: xr.Dataset) -> list[str]:
    """Store names of the input embeddings and the unembedding the dataset holds, in model
    order (GPT-NeoX: ``embed_in``, ``embed_out``; a tied unembedding is absent)."""
    family = families.family_of(ds.attrs)
    unembedding = family.store_renames.get(family.unembedding, family.unembedding)
    params = {str(p) for p in ds["param"].values}
    return [n for n in (*family.input_embeddings, unembedding) if f"{n}.weight" in params]
CIRCUIT_TITLES: dict[str, str] = {"mlp": "MLP out", "ov": "OV circuits (mean over heads)"}


def sizes_of(ds: xr.Dataset) -> list[str]:
    """Size labels in dataset order (by parameter count)."""
    return [str(s) for s in ds["size"].values]


def n_layers(ds: xr.Dataset, size: str) -> int:
    """Number of blocks of ``size``."""
    return int(ds["num_layers"].sel(size=size))


def block_param(ds: xr.Dataset, var: str, size: str, module: str, stat: str,
                kind: str = "weight") -> np.ndarray:
    """``var`` (stat_param/stat_weight/stat_grad) at ``stat`` for ``module``'s ``kind`` in
    every block of ``size``: float64 (layer, step)."""
    names = [f"layer{i}.{module}.{kind}" for i in range(n_layers(ds, size))]
    stat_dim = "param_stat" if var == "stat_param" else "shape_stat"
    da = ds[var].sel(size=size, param=names, **{stat_dim: stat})
    return da.transpose("param", "step").to_numpy().astype(float)


def nanmean0(values: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring NaN (all-NaN columns give NaN without a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=0)


def depth_lines(ax: Any, x: np.ndarray, rows: np.ndarray, flagged: np.ndarray | None = None,
                leave_out: bool = False, **kw: Any) -> None:
    """One line per row of ``rows`` (layer, step), coloured by depth; ``flagged`` steps
    hollow (:func:`~lmdynamics.report.figures.plot_steps`)."""
    cmap = plt.get_cmap(DEPTH_CMAP)
    flagged = np.zeros(len(x), dtype=bool) if flagged is None else flagged
    for i, y in enumerate(rows):
        plot_steps(ax, x, y, flagged, leave_out=leave_out,
                   color=cmap(depth_fraction(i, len(rows))), lw=0.8, **kw)


def depth_colorbar(fig: Any, axes: Any) -> None:
    """The shared layer-depth colour bar of :mod:`lmdynamics.report.figures`."""
    fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=plt.get_cmap(DEPTH_CMAP)),
                 ax=axes, label=DEPTH_LABEL, aspect=30, pad=0.01)


def _finish(fig: Any, ds: xr.Dataset, x_axis: str, out_stem: Path, legend_axis: Any = None,
            title: str = "model size") -> list[Path]:
    fig.supxlabel(x_caption(ds, x_axis), fontsize=STYLE["axes.labelsize"])
    handles, labels = legend_axis.get_legend_handles_labels() if legend_axis is not None \
        else ([], [])
    if (entry := flagged_handle(ds)) is not None:
        handles.append(entry[0])
        labels.append(entry[1])
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncol=max(1, len(handles)),
                   frameon=False, title=title)
    return save_figure(fig, out_stem)


def _flagged(ds: xr.Dataset, size: str) -> dict[str, Any]:
    """Keyword arguments of :func:`depth_lines` / ``plot_steps`` for ``size``'s flagged steps."""
    return {"flagged": excluded_steps(ds, size), "leave_out": leaves_out(ds)}


def pick_steps(steps: Sequence[int], final: int, wanted: Sequence[int] = ()) -> list[int]:
    """Steps to show in snapshot figures: ``wanted`` (each must be in ``steps``), or by
    default the first step, the steps nearest sqrt(final) and final/10 (on a log scale),
    and ``final``, without repeats, ascending."""
    steps = sorted(int(s) for s in steps)
    if wanted:
        bad = [s for s in wanted if s not in steps]
        if bad:
            raise ValueError(f"figure steps {bad} are not among the analysed steps {steps}")
        return sorted(set(wanted))
    positive = [s for s in steps if s > 0]

    def nearest(target: float) -> int:
        return min(positive, key=lambda s: abs(math.log(s) - math.log(target)))

    picks = {steps[0], final}
    if positive and final > 0:
        picks |= {nearest(math.sqrt(final)), nearest(max(final / 10, 1))}
    return sorted(p for p in picks if p in steps)


def norms_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                 steps: Sequence[int] = ()) -> list[Path]:
    """Frobenius norm over training: rows = block matrices (one line per block, colour =
    depth) and the embeddings (GPT-NeoX: embed_in solid, embed_out dashed; the family's
    own names otherwise, unembedding last); columns = sizes."""
    check_x_axis(x_axis)
    x = x_values(ds, x_axis)
    sizes = sizes_of(ds)
    matrices = block_matrices(ds)
    embeddings = embedding_names(ds)
    with style():
        fig, axes = new_figure(len(matrices) + 1, len(sizes), sharex=True,
                                sharey="row", height_per_row=1.1)
        for j, size in enumerate(sizes):
            for i, (module, title) in enumerate(matrices.items()):
                depth_lines(axes[i, j], x, block_param(ds, "stat_param", size, module, "norm"),
                            **_flagged(ds, size))
                axes[i, 0].set_ylabel(f"{title}\n||W||_F")
            ax = axes[-1, j]
            for k, name in enumerate(embeddings):
                ls = "--" if k == len(embeddings) - 1 and k > 0 else ("-", ":")[k % 2]
                y = ds["stat_param"].sel(size=size, param=f"{name}.weight", param_stat="norm")
                plot_steps(ax, x, y.to_numpy(), color="0.2", ls=ls, label=name,
                           **_flagged(ds, size))
            axes[-1, 0].set_ylabel("embeddings\n||W||_F")
            axes[0, j].set_title(f"{size} ({n_layers(ds, size)} layers)")
            for ax in axes[:, j]:
                format_x(ax, x_axis, max_step=float(x.max()))
                grid(ax)
        axes[-1, 0].legend(frameon=False)
        depth_colorbar(fig, axes)
        return _finish(fig, ds, x_axis, out_stem)


def _size_mean_grid(ds: xr.Dataset, out_stem: Path, x_axis: str,
                    rows: list[tuple[str, Callable[[str, str], np.ndarray]]],
                    columns: dict[str, str], refs: dict[int, list[float]] | None = None,
                    symlog_rows: Sequence[int] = (), sharey: str | bool = "row") -> list[Path]:
    """Grid of panels, one line per size: ``rows`` = (y label, f(size, column) -> (layer,
    step)), averaged over layers; ``columns`` = key -> title; ``refs`` = dotted horizontal
    reference values per row."""
    x = x_values(ds, x_axis)
    sizes = sizes_of(ds)
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    with style():
        fig, axes = new_figure(len(rows), len(columns), sharex=True, sharey=sharey,
                                height_per_row=1.3)
        for i, (label, values) in enumerate(rows):
            for j, (key, title) in enumerate(columns.items()):
                ax = axes[i, j]
                for size in sizes:
                    plot_steps(ax, x, nanmean0(values(size, key)), color=colors[size],
                               label=size, **_flagged(ds, size))
                for ref in (refs or {}).get(i, []):
                    ax.axhline(ref, color="0.5", lw=0.6, ls=":")
                if i in symlog_rows:
                    ax.set_yscale("symlog", linthresh=1.0)
                axes[0, j].set_title(title)
                format_x(ax, x_axis, max_step=float(x.max()))
                grid(ax)
            axes[i, 0].set_ylabel(label)
        return _finish(fig, ds, x_axis, out_stem, axes[0, 0],
                       "model size (mean over layers)")


def _matrix_values(ds: xr.Dataset, var: str, stat: str) -> Callable[[str, str], np.ndarray]:
    def values(size: str, key: str) -> np.ndarray:
        if "." not in key:  # an embedding (block matrices are module paths)
            da = ds[var].sel(size=size, param=f"{key}.weight")
            return da.sel(param_stat=stat).to_numpy()[None].astype(float)
        return block_param(ds, var, size, key, stat)
    return values


def distance_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                    steps: Sequence[int] = ()) -> list[Path]:
    """Relative distance from the step-0 weights (from the earliest analysed step's, attr
    ``init_step``, when the suite has no step 0) and cosine to the final weights, mean over
    blocks per size, for each block matrix and the embeddings."""
    check_x_axis(x_axis)
    columns = {**block_matrices(ds), **{n: n for n in embedding_names(ds)}}
    init = int(ds.attrs.get("init_step", 0))
    w0 = "W0" if init == 0 else f"W{init}"
    rows = [(f"||W - {w0}|| / ||{w0}||" + ("" if init == 0 else
                                           f"\n({w0}: step {init}, the earliest analysed)"),
             _matrix_values(ds, "stat_param", "rel_dist_init")),
            ("cosine to final W", _matrix_values(ds, "stat_param", "cos_final"))]
    return _size_mean_grid(ds, out_stem, x_axis, rows, columns, refs={1: [1.0]}, sharey=False)


def shape_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                 steps: Sequence[int] = ()) -> list[Path]:
    """Excess kurtosis (top) and log-likelihood advantage of a logistic over a Gaussian fit
    (bottom, nats per element, > 0: logistic fits better) of the block weight matrices, the
    MLP-out gradient and the residual stream; mean over blocks per size."""
    check_x_axis(x_axis)
    family = families.family_of(ds.attrs)
    columns = {**block_matrices(ds), "grad": "MLP write gradient",
               "residual": "residual stream"}

    def pick(size: str, key: str, stat: str) -> np.ndarray:
        if key == "residual":
            da = ds["stat_act"].sel(size=size, site="residual", shape_stat=stat)
            return da.isel(layer=slice(0, n_layers(ds, size))).transpose(
                "layer", "step").to_numpy().astype(float)
        if key == "grad":
            return block_param(ds, "stat_grad", size, family.mlp_write, stat)
        return block_param(ds, "stat_weight", size, key, stat)

    rows = [("excess kurtosis", lambda s, k: pick(s, k, "kurtosis")),
            ("loglik logistic - Gaussian\n(nats/element)",
             lambda s, k: pick(s, k, "loglik_logistic") - pick(s, k, "loglik_gaussian"))]
    return _size_mean_grid(ds, out_stem, x_axis, rows, columns, refs={0: [0.0, 1.2], 1: [0.0]},
                           symlog_rows=[0])


def residual_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                    steps: Sequence[int] = ()) -> list[Path]:
    """Residual-stream max |x| after each block over training (one panel per size, colour =
    depth), and its maximum over training against depth (last panel, one line per size)."""
    check_x_axis(x_axis)
    x = x_values(ds, x_axis)
    sizes = sizes_of(ds)
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    with style():
        fig, axes = new_figure(1, len(sizes) + 1, height_per_row=2.0)
        for j, size in enumerate(sizes):
            n = n_layers(ds, size)
            rows = ds["stat_resid_max_abs"].sel(size=size).isel(layer=slice(0, n))
            rows = rows.transpose("layer", "step").to_numpy().astype(float)
            ax = axes[0, j]
            depth_lines(ax, x, rows, **_flagged(ds, size))
            ax.set_title(f"{size} ({n} layers)")
            format_x(ax, x_axis, max_step=float(x.max()))
            grid(ax)
            peak = np.nanmax(rows, axis=1)
            axes[0, -1].plot([depth_fraction(i, n) for i in range(n)], peak, marker="o", ms=2,
                             color=colors[size], label=size)
        axes[0, 0].set_ylabel("max |x| of the block output")
        last = axes[0, -1]
        last.set_title("max over training")
        last.set_xlabel(DEPTH_LABEL)
        grid(last)
        depth_colorbar(fig, axes)
        return _finish(fig, ds, x_axis, out_stem, last)


def spectra_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                   steps: Sequence[int] = ()) -> list[Path]:
    """Fitted exponent alpha over training (first column, mean over blocks, one line per
    size), then singular values against rank (log-log) of each block matrix of the largest
    size at the chosen steps (colour = depth; dashed: the fitted power law over its rank
    window). Rows: block matrices."""
    check_x_axis(x_axis)
    sizes = sizes_of(ds)
    size = sizes[-1]
    shown = pick_steps(ds["step"].values, final_step(ds), steps)
    lo, hi = ds["stat_spectrum_slope"].attrs.get("fit_ranks", (0.0, 0.5))
    cmap = plt.get_cmap(DEPTH_CMAP)
    n = n_layers(ds, size)
    x = x_values(ds, x_axis)
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    matrices = block_matrices(ds)
    last_row = len(matrices) - 1
    with style():
        fig, axes = new_figure(len(matrices), len(shown) + 1, height_per_row=1.3)
        for i, (module, title) in enumerate(matrices.items()):
            ax = axes[i, 0]
            for s in sizes:
                names = [f"layer{li}.{module}" for li in range(n_layers(ds, s))]
                alpha = ds["stat_spectrum_slope"].sel(size=s, matrix=names)
                plot_steps(ax, x, nanmean0(alpha.transpose("matrix", "step").to_numpy()),
                           color=colors[s], label=s, **_flagged(ds, s))
            ax.set_ylabel(f"{title}\nalpha (all sizes)")
            format_x(ax, x_axis, max_step=float(x.max()), label=i == last_row)
            grid(ax)
            for j, step in enumerate(shown, start=1):
                ax = axes[i, j]
                alphas = []
                for layer in range(n):
                    sv = ds["stat_spectrum"].sel(size=size, step=step,
                                                 matrix=f"layer{layer}.{module}").to_numpy()
                    sv = sv[np.isfinite(sv)]
                    color = cmap(depth_fraction(layer, n))
                    ax.loglog(np.arange(1, sv.size + 1), sv, color=color, lw=0.8)
                    alpha, log_c = power_law_fit(sv, lo, hi)
                    k = np.arange(fit_window(sv.size, lo, hi)[0], fit_window(sv.size, lo, hi)[1]
                                  + 1)
                    ax.loglog(k, np.exp(log_c) * k**-alpha, color=color, lw=0.6, ls="--")
                    alphas.append(alpha)
                ax.text(0.97, 0.95, f"mean alpha {np.nanmean(alphas):.2f}", ha="right",
                        va="top", transform=ax.transAxes, fontsize=STYLE["legend.fontsize"])
                ax.yaxis.set_minor_formatter(NullFormatter())
                grid(ax)
                if i == 0:
                    ax.set_title(f"{size}, step {step}{_flag_text(ds, size, step)}")
                if i == last_row:
                    ax.set_xlabel("rank k")
        axes[0, 0].set_title("alpha over training")
        depth_colorbar(fig, axes)
        handles, labels = axes[0, 0].get_legend_handles_labels()
        if (entry := flagged_handle(ds)) is not None:
            handles.append(entry[0])
            labels.append(entry[1])
        fig.legend(handles, labels, loc="outside upper center", ncol=len(handles),
                   frameon=False, title="model size (alpha: mean over layers)")
        if ds.attrs.get("audit_note"):
            fig.supxlabel(ds.attrs["audit_note"], fontsize=5)
        return save_figure(fig, out_stem)


def _flag_text(ds: xr.Dataset, size: str, step: int) -> str:
    """`` (flagged)`` in the title of a snapshot of a flagged revision."""
    flags = excluded_steps(ds, size)
    steps = ds["step"].to_numpy().tolist()
    return " (flagged)" if step in steps and flags[steps.index(step)] else ""


def embedding_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                     steps: Sequence[int] = ()) -> list[Path]:
    """Correlation matrix of the first token embeddings (rows: sizes, columns: steps)."""
    check_x_axis(x_axis)
    shown = pick_steps(ds["step"].values, final_step(ds), steps)
    sizes = sizes_of(ds)
    with style():
        fig, axes = new_figure(len(sizes), len(shown), height_per_row=1.5)
        image = None
        for i, size in enumerate(sizes):
            for j, step in enumerate(shown):
                corr = ds["stat_embedding_corr"].sel(size=size, step=step).to_numpy()
                ax = axes[i, j]
                image = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if i == 0 or _flag_text(ds, size, step):
                    ax.set_title(f"step {step}{_flag_text(ds, size, step)}")
                if j == 0:
                    ax.set_ylabel(f"{size}\ntoken 0-{corr.shape[0] - 1}")
        fig.colorbar(image, ax=axes, label="Pearson correlation", aspect=30, pad=0.01)
        if ds.attrs.get("audit_note"):
            fig.supxlabel(ds.attrs["audit_note"], fontsize=5)
        return save_figure(fig, out_stem)


def closeness_figure(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step",
                     steps: Sequence[int] = ()) -> list[Path]:
    """Closeness of the top-k singular directions to the final checkpoint's: per block
    (colour = depth), one panel per size, and mean over blocks per size (last column);
    rows: MLP out, OV circuits."""
    check_x_axis(x_axis)
    x = x_values(ds, x_axis)
    sizes = sizes_of(ds)
    colors = dict(zip(sizes, size_colors(len(sizes)), strict=True))
    circuits = [str(c) for c in ds["circuit"].values]
    with style():
        fig, axes = new_figure(len(circuits), len(sizes) + 1, sharex=True, sharey=True,
                                height_per_row=1.5)
        for i, circuit in enumerate(circuits):
            for j, size in enumerate(sizes):
                da = ds["stat_direction_closeness"].sel(size=size, circuit=circuit)
                rows = da.isel(layer=slice(0, n_layers(ds, size))).transpose("layer", "step")
                rows = rows.to_numpy().astype(float)
                depth_lines(axes[i, j], x, rows, **_flagged(ds, size))
                plot_steps(axes[i, -1], x, nanmean0(rows), color=colors[size], label=size,
                           **_flagged(ds, size))
                axes[0, j].set_title(f"{size} ({n_layers(ds, size)} layers)")
            axes[i, 0].set_ylabel(f"{CIRCUIT_TITLES.get(circuit, circuit)}\n"
                                  "mean best |cos| to final")
            axes[0, -1].set_title("mean over layers")
            for ax in axes[i]:
                format_x(ax, x_axis, max_step=float(x.max()))
                grid(ax)
        depth_colorbar(fig, axes)
        return _finish(fig, ds, x_axis, out_stem, axes[0, -1])


STATS_FIGURES: dict[str, Callable[..., list[Path]]] = {
    "norms": norms_figure,
    "distance": distance_figure,
    "shape": shape_figure,
    "residual": residual_figure,
    "spectra": spectra_figure,
    "embedding": embedding_figure,
    "closeness": closeness_figure,
}


def render_stats(name: str, ds: xr.Dataset, out_stem: Path, **options: Any) -> list[Path]:
    """Draw figure ``name`` (a key of :data:`STATS_FIGURES`) from the combined statistics;
    with seed replicates, from their mean over seeds
    (:func:`~lmdynamics.report.figures.over_seeds`)."""
    ds, _ = over_seeds(ds)
    return render(name, ds, out_stem, registry=STATS_FIGURES, **options)

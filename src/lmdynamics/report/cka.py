"""Which CKA the figures and Table 1 show, and figure 6: CKA between every pair of steps.

The metrics datasets store both estimators (``cka`` biased, ``cka_debiased``) and, when
enabled, standardised variants, bootstrap intervals and pairwise matrices
(:mod:`lmdynamics.reduction.cka`). Figures and the MCC table read ``cka`` (and ``cka_low``,
``cka_layer_mean_low``, ``cka_pairwise``, ...): :func:`select_cka` renames the configured
estimator's variables to those names, so the drawing code stays estimator-agnostic, and
records the choice in ``attrs["cka_estimator"]`` for labels.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import xarray as xr
from matplotlib.colors import Normalize

from lmdynamics.estimators.cka import cka_variable
from lmdynamics.options import defaults
from lmdynamics.report.figures import (  # noqa: E402
    COMPONENT_NAMES,
    check_x_axis,
    over_seeds,
    render,
    require,
    save_figure,
    step_tick_label,
)
from lmdynamics.report.style import STYLE, new_figure, style  # noqa: E402
from lmdynamics.report.tables import final_step  # noqa: E402

#: Suffixes of the variables that belong to one CKA estimator (see lmdynamics.reduction.cka).
CKA_SUFFIXES: tuple[str, ...] = ("", "_low", "_high", "_layer_mean_low", "_layer_mean_high",
                                 "_pairwise", "_resamples")
#: Figure names that draw the standardised variant of a base figure.
STANDARDIZED_SUFFIX = "_standardized"
PAIRWISE_CMAP = "viridis"


#: Schema defaults of the config sections the CKA figures read.
_DEFAULTS = {"metrics": defaults("metrics"), "figures": defaults("figures")}

def select_cka(ds: xr.Dataset, estimator: str, *, standardized: bool = False) -> xr.Dataset:
    """``ds`` with the chosen CKA variables renamed to ``cka``, ``cka_low``, ... .

    ``estimator``: ``biased`` | ``debiased``; ``standardized`` picks the per-dimension
    standardised variant. Other CKA variables are dropped; ``attrs`` gain
    ``cka_estimator`` and ``cka_standardized``. Raises ValueError naming the missing variable
    (e.g. a dataset reduced without ``metrics.standardize``).
    """
    base = cka_variable(estimator, standardized=standardized)
    if base not in ds:
        hint = " (enable metrics.standardize and rerun the reductions)" if standardized else ""
        raise ValueError(f"the metrics dataset lacks {base!r}{hint}; it has "
                         f"{sorted(map(str, ds.data_vars))}")
    rename = {base + s: "cka" + s for s in CKA_SUFFIXES if base + s in ds}
    drop = [v for v in ds.data_vars if str(v).startswith("cka") and v not in rename]
    out = ds.drop_vars(drop).rename({k: v for k, v in rename.items() if k != v})
    out.attrs = {**ds.attrs, "cka_estimator": estimator, "cka_standardized": standardized}
    return out


def figure_dataset(name: str, ds: xr.Dataset, estimator: str) -> tuple[str, xr.Dataset]:
    """The figure function's name and dataset for figure ``name``.

    ``figure2_standardized`` draws ``figure2`` from the standardised variant; every other
    name draws from ``estimator``'s variables.
    """
    standardized = name.endswith(STANDARDIZED_SUFFIX)
    base = name.removesuffix(STANDARDIZED_SUFFIX)
    return base, select_cka(ds, estimator, standardized=standardized)


def cka_label(ds: xr.Dataset) -> str:
    """"CKA", "debiased CKA", "CKA (standardised)" ... from :func:`select_cka`'s attrs."""
    label = "debiased CKA" if ds.attrs.get("cka_estimator") == "debiased" else "CKA"
    return label + (" (standardised dims)" if ds.attrs.get("cka_standardized") else "")


def tick_positions(steps: np.ndarray, limit: int = 6) -> np.ndarray:
    """Indices of at most ``limit`` steps spread over ``steps``, always first and last."""
    if steps.size <= limit:
        return np.arange(steps.size)
    return np.unique(np.linspace(0, steps.size - 1, limit).round().astype(int))


def figure6(ds: xr.Dataset, out_stem: Path, *, x_axis: str = "step") -> list[Path]:
    """CKA between every pair of checkpoints, mean over layers: heatmaps (step x step).

    Rows: components; columns: sizes. Each cell ``(step, step_ref)`` is the mean over the
    size's layers of ``cka_pairwise`` (one colour scale, 0 to 1, for every panel). Steps are
    equally spaced (one cell per analysed checkpoint) and labelled by step or by fraction of
    training (``x_axis``). Blocks of high similarity show phases of training; the last
    column of each panel is figure 3's curve averaged over layers.
    """
    check_x_axis(x_axis)
    require(ds, ["cka_pairwise"])
    ds, _ = over_seeds(ds)  # with seed replicates: the mean over seeds
    sizes = [str(s) for s in ds["size"].values]
    components = [str(c) for c in ds["component"].values]
    steps = ds["step"].to_numpy()
    ticks = tick_positions(steps)
    if x_axis == "step":
        labels = [step_tick_label(float(steps[i])) for i in ticks]
    else:
        labels = [f"{steps[i] / final_step(ds):.2g}" for i in ticks]
    norm = Normalize(0.0, 1.0)
    with style():
        fig, axes = new_figure(len(components), len(sizes), height_per_row=1.7)
        image = None
        for i, comp in enumerate(components):
            for j, size in enumerate(sizes):
                ax = axes[i, j]
                da = ds["cka_pairwise"].sel(size=size, component=comp)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)  # absent layers: NaN
                    mean = np.nanmean(da.transpose("layer", "step", "step_ref").to_numpy(),
                                      axis=0)
                image = ax.imshow(mean, origin="lower", cmap=PAIRWISE_CMAP, norm=norm,
                                  interpolation="nearest", aspect="equal")
                ax.set_xticks(ticks, labels, rotation=90)
                ax.set_yticks(ticks, labels if j == 0 else [])
                ax.set_title(f"{size}, {COMPONENT_NAMES.get(comp, comp)}")
                if j == 0:
                    ax.set_ylabel("step" if x_axis == "step" else "fraction of training")
        axis_name = "training step" if x_axis == "step" else "fraction of training"
        fig.supxlabel(f"{axis_name} (one cell per checkpoint)", fontsize=STYLE["axes.labelsize"])
        if image is not None:
            fig.colorbar(image, ax=axes, label=f"{cka_label(ds)}, mean over layers",
                         aspect=30, pad=0.01, shrink=0.8, extend="min")
        return save_figure(fig, out_stem)


#: Figures drawn by this module (the paper's 1-5 are in :data:`lmdynamics.report.figures.FIGURES`).
CKA_FIGURES = {"figure6": figure6}


def render_figure(name: str, ds: xr.Dataset, out_stem: Path, *,
                  estimator: str = _DEFAULTS["metrics"]["cka_estimator"],
                  x_axis: str = _DEFAULTS["figures"]["x_axis"]) -> list[Path]:
    """Draw figure ``name`` (figure1-6 or figure2_standardized) with ``estimator``'s CKA
    (default: the schema's ``metrics.cka_estimator``, as in the workflow)."""
    base, data = figure_dataset(name, ds, estimator)
    if base in CKA_FIGURES:
        return CKA_FIGURES[base](data, Path(out_stem), x_axis=x_axis)
    return render(base, data, Path(out_stem), x_axis=x_axis)

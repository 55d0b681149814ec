"""Figures and tables of an intervention study.

- :func:`convergence_figure`: CKA to the final step over training, one panel per (size,
  component, layer), one colour per variant: the mean over seeds with a band from the lowest
  to the highest seed, and the convergence threshold;
- :func:`effect_scatter`: each variant's effect on the convergence step against its effect
  on PER (weights | gradients), one point per (variant, size, component, layer) with
  bootstrap intervals over seeds on both axes: the causal counterpart of the paper's Table 1;
- :func:`effects_markdown`: the effects table with intervals.

The captions (:data:`CAPTIONS`) say what counts as evidence for or against the hypothesis.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

__all__ = ["CAPTIONS", "convergence_figure", "effect_scatter", "effects_markdown"]

CAPTIONS = {
    "convergence": (
        "CKA of each layer's output to its own final output over training, per variant "
        "(line: mean over seeds; band: lowest to highest seed; dashed: the convergence "
        "threshold). Evidence *for* the hypothesis (higher effective rank -> faster "
        "convergence): the rank-raising variants' curves cross the threshold for good "
        "earlier than baseline's, the negative control's later. Evidence *against*: curves "
        "that do not move, or move the same way for the regulariser and its control."),
    "scatter": (
        "Effect of each variant on the convergence step (variant - baseline, steps; "
        "negative = converges sooner) against its effect on PER, one point per (variant, "
        "size, component, layer), bars: bootstrap intervals over seeds. The hypothesis "
        "predicts points in the lower right (PER up, convergence sooner) and upper left "
        "(PER down, later): a negative slope through the origin, for the regulariser and "
        "the control alike and for orthogonal initialisation (no extra loss term). Points "
        "with PER moved far but the convergence step unchanged, or on the positive "
        "diagonal, count against it."),
}

STYLE = {"marker_attention": "o", "marker_mlp": "s"}


def _variant_colors(variants: list[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {v: cmap(i % 10) for i, v in enumerate(variants)}


def _ordered_variants(names, baseline: str = "baseline") -> list[str]:
    names = sorted(set(names))
    return ([baseline] if baseline in names else []) + [n for n in names if n != baseline]


def _save(fig, out_stem: Path) -> list[Path]:
    """The project's :func:`lmdynamics.report.figures.save_figure` (png + pdf, atomic), imported
    here so that the tables of this module import without zarr."""
    from lmdynamics.report.figures import save_figure

    return save_figure(fig, Path(out_stem))


def convergence_figure(metrics: pd.DataFrame, out_stem: Path, *, threshold: float,
                       estimator_column: str = "cka_debiased",
                       sizes: list[str] | None = None) -> list[Path]:
    """Draw the convergence curves (see module doc) from the stacked per-step tables.

    ``metrics``: rows (variant, size, seed, component, layer, step) with
    ``estimator_column``. ``sizes``: panel row order (default: sorted labels).
    """
    sizes = sizes or sorted(set(metrics["size"]))
    variants = _ordered_variants(metrics["variant"])
    colors = _variant_colors(variants)
    rows = [(s, c) for s in sizes for c in ("attention", "mlp")]
    n_cols = int(metrics.groupby("size")["layer"].max().max()) + 1
    fig, axes = plt.subplots(len(rows), n_cols, figsize=(2.2 * n_cols + 1.0, 1.7 * len(rows)),
                             squeeze=False, sharey=True, layout="constrained")
    for r, (size, comp) in enumerate(rows):
        sub = metrics[(metrics["size"] == size) & (metrics["component"] == comp)]
        layers = sorted(set(sub["layer"]))
        for col in range(n_cols):
            ax = axes[r, col]
            if col not in layers:
                ax.set_axis_off()
                continue
            for v in variants:
                g = sub[(sub["layer"] == col) & (sub["variant"] == v)]
                if g.empty:
                    continue
                stat = g.groupby("step")[estimator_column].agg(["mean", "min", "max"])
                x = stat.index.to_numpy(dtype=float)
                ax.plot(x, stat["mean"], color=colors[v], lw=1.2, label=v)
                ax.fill_between(x, stat["min"], stat["max"], color=colors[v], alpha=0.18, lw=0)
            ax.axhline(threshold, color="0.4", ls="--", lw=0.8)
            ax.set_xlim(0, float(metrics["step"].max()))  # linear: layers converge late
            ax.set_title(f"{size} {comp} L{col}", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 0:
                ax.set_ylabel("CKA to final", fontsize=8)
            if r == len(rows) - 1:
                ax.set_xlabel("training step", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(variants), fontsize=8)
    return _save(fig, out_stem)


def effect_scatter(effects: pd.DataFrame, out_stem: Path) -> list[Path]:
    """Draw effect on convergence step vs effect on PER (weights, gradients); see module doc.

    ``effects``: the long table of :func:`lmdynamics.interventions.outcomes.effects`.
    """
    variants = _ordered_variants(effects["variant"])
    colors = _variant_colors(["baseline", *variants] if "baseline" not in variants
                             else variants)
    step = effects[effects["measure"] == "convergence_step"].set_index(
        ["variant", "size", "component", "layer"])
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.2), sharey=True, layout="constrained")
    for ax, measure, label in ((axes[0], "per_weight", "PER of weights"),
                               (axes[1], "per_grad", "PER of gradients")):
        per = effects[effects["measure"] == measure].set_index(
            ["variant", "size", "component", "layer"])
        common = per.index.intersection(step.index)
        for key in common:
            v, _, comp, _ = key
            x, y = per.loc[key], step.loc[key]
            ax.errorbar(x["effect"], y["effect"],
                        xerr=[[x["effect"] - x["low"]], [x["high"] - x["effect"]]],
                        yerr=[[y["effect"] - y["low"]], [y["high"] - y["effect"]]],
                        fmt=STYLE[f"marker_{comp}"], color=colors[v], ms=4, lw=0.7,
                        capsize=1.5, alpha=0.85)
        ax.axhline(0, color="0.5", lw=0.7)
        ax.axvline(0, color="0.5", lw=0.7)
        ax.set_xlabel(f"effect on {label} (variant - baseline)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("effect on convergence step (steps)", fontsize=8)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[v], marker="o", ls="", label=v) for v in variants
               if v != "baseline"]
    handles += [Line2D([], [], color="0.3", marker=STYLE[f"marker_{c}"], ls="", label=c)
                for c in ("attention", "mlp")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7)
    return _save(fig, out_stem)


def _cell(row: pd.Series, digits: int) -> str:
    if not np.isfinite(row["effect"]):
        return "NaN"
    return f"{row['effect']:+.{digits}f} [{row['low']:+.{digits}f}, {row['high']:+.{digits}f}]"


def effects_markdown(effects: pd.DataFrame, summary: pd.DataFrame, *, level: float,
                     threshold: float, estimator: str) -> str:
    """The effects as Markdown: a pooled summary per variant, then one row per (variant,
    size, component, layer); ``effect [low, high]`` = mean paired difference to baseline and
    its bootstrap interval over seeds at ``level``."""
    digits = {"convergence_step": 0, "auc": 3, "per_weight": 3, "per_grad": 3,
              "train_loss": 3, "eval_loss": 3}
    names = {"convergence_step": "Δ convergence step", "auc": "Δ area 1-CKA",
             "per_weight": "Δ PER weights", "per_grad": "Δ PER gradients",
             "train_loss": "Δ train loss", "eval_loss": "Δ eval loss"}
    n_seeds = int(effects["n_seeds"].max()) if len(effects) else 0
    lines = [f"Effects of each variant against baseline: mean of the per-seed differences "
             f"[{level:.0%} bootstrap interval over {n_seeds} seeds]. Convergence: {estimator} "
             f"CKA to the final step stays >= {threshold:g}.", "",
             "Pooled over sizes, components and layers:", "",
             "| variant | " + " | ".join(names[m] for m in digits) + " |",
             "|---|" + "---:|" * len(digits)]
    for v, g in summary.groupby("variant", sort=True):
        g = g.set_index("measure")
        lines.append(f"| {v} | " + " | ".join(_cell(g.loc[m], digits[m]) for m in digits)
                     + " |")
    layer_measures = ["convergence_step", "auc", "per_weight", "per_grad"]
    lines += ["", "Per layer:", "",
              "| variant | size | component | layer | "
              + " | ".join(names[m] for m in layer_measures) + " |",
              "|---|---|---|---:|" + "---:|" * len(layer_measures)]
    wide = effects.set_index(["variant", "size", "component", "layer", "measure"])
    for key in sorted({k[:4] for k in wide.index}):
        cells = [_cell(wide.loc[(*key, m)], digits[m]) for m in layer_measures]
        lines.append("| " + " | ".join(str(k) for k in key) + " | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

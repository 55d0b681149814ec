"""Paper Table 1: Matthews correlation between early convergence and large PER, per size.

For each size and component, every layer gets two binary labels (options: :class:`MCCOptions`,
config section ``mcc``):

- *early convergence*: CKA (of that component) ``cka_threshold`` or above at the early step:
  ``early_step: at_or_before`` (default) takes the last analysed step at or before
  ``early_fraction`` x final step (the text: converged "by" the first 10 % of training);
  ``nearest`` the step nearest to it (ties -> the later step; the paper's code, step 13000 of
  143000);
- *large PER*: ``per_quantity`` names the PER the thresholds apply to: ``per`` (the reduction's
  ``metrics.per_divisor``), ``per_normalized`` (default: PER / PER of a random Gaussian matrix
  of the same shape, so 1 means "as spread as noise"), ``per_head_dim`` (top head_dim
  singular values / head_dim, the paper's code). Weights: that PER at the final step
  ``per_weight_threshold`` or above (``weight_threshold: absolute``, the text's fixed 0.95)
  or ``per_weight_threshold`` x the largest layer value or above (``relative``, default: the
  text's "relative to other model layers"); gradients: ``per_grad_fraction`` x the largest
  layer value or above. The largest is taken within the component (``reference:
  component``, default) or over both components (``model``).
- "or above" is ``>=`` (``comparison: at_least``, the text) or ``>`` (``greater``, the code).

The table holds the Matthews correlation (phi coefficient) of the two labels over the layers of
the size (layers that are NaN in either input are dropped). When either label puts every layer
in one class the coefficient is undefined: NaN with the reason in ``undefined_reason``.

Intervals: when the metrics hold bootstrap resamples of CKA (``cka_resamples``, one value per
resample of *sequences*, :mod:`lmdynamics.reduction.cka`), every resample relabels the layers'
early convergence and gives one MCC; ``mcc_low``/``mcc_high`` are the percentile interval of
those MCCs at the bootstrap level (resamples where the MCC is undefined are left out and
counted in ``resamples_undefined``; more than half undefined -> no interval). PER labels are
held fixed: weights carry no sampling error, and gradient PER is not resampled.

Seed replicates (a ``seed`` dimension in the metrics): every seed gets its own MCC (one row per
(size, seed, column) in :func:`mcc_table`); :func:`mcc_seed_summary` gives one row per (size,
column) with the across-seed mean, min and max of the defined MCCs, and the markdown table has
one row per size with "mean (min to max)" in each cell. With one seed the markdown is the
single run's table, with its bootstrap intervals.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.estimators.bootstrap import percentile_interval
from lmdynamics.estimators.mcc import matthews_corrcoef, mcc_undefined_reason
from lmdynamics.options import defaults
from lmdynamics.store import write_text_atomic

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (label, component, parameter)
    ("θ_att", "attention", "weights"),
    ("∇θ_att", "attention", "gradients"),
    ("θ_mlp", "mlp", "weights"),
    ("∇θ_mlp", "mlp", "gradients"),
)
TABLE_COLUMNS: tuple[str, ...] = (
    "size", "seed", "n_params", "component", "parameter", "label", "early_step", "n_layers",
    "n_early", "n_large", "mcc", "mcc_low", "mcc_high", "resamples_undefined",
    "interval_spans_zero", "undefined_reason",
)
_VARIABLE = {"weights": "per_weight", "gradients": "per_grad"}
#: ``mcc.early_step``: how the early step is chosen (see :func:`early_step`).
EARLY_STEP_RULES: tuple[str, ...] = ("at_or_before", "nearest")
#: ``mcc.per_quantity`` -> suffix of the reduction's ``per_weight``/``per_grad`` variables.
PER_QUANTITIES: dict[str, str] = {"per": "", "per_normalized": "_normalized",
                                  "per_head_dim": "_head_dim"}
#: ``mcc.comparison``: ``at_least`` is ``>=`` (the text), ``greater`` is ``>`` (the code).
COMPARISONS: tuple[str, ...] = ("at_least", "greater")
#: ``mcc.reference``: relative thresholds use the largest PER within the component or model.
REFERENCES: tuple[str, ...] = ("component", "model")
#: ``mcc.weight_threshold``: PER >= per_weight_threshold, or >= it x the largest layer PER.
WEIGHT_THRESHOLDS: tuple[str, ...] = ("absolute", "relative")
#: The paper's thresholds (section 4, "Table 1"), marked on the sensitivity figure.
PAPER_THRESHOLDS = {"cka_threshold": 0.45, "per_weight_threshold": 0.95,
                    "per_grad_fraction": 0.9}
_SYMBOL = {"at_least": "≥", "greater": ">"}


def _check_range(name: str, value: float, *, low_open: bool) -> float:
    """Return ``value`` if in [0, 1] (or (0, 1] with ``low_open``), else raise ValueError."""
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:  # also catches NaN
        allowed = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={value!r} is outside the allowed range {allowed}")
    return float(value)


def _check_choice(name: str, value: str, allowed: Any) -> str:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed {', '.join(allowed)}")
    return value


#: Schema defaults of config section ``mcc`` (the defaults below).
_DEFAULTS = defaults("mcc")


@dataclass(frozen=True)
class MCCOptions:
    """The definitions behind Table 1 (config section ``mcc``; see the module docstring).

    Fields are the keys of config section ``mcc``; their defaults are the schema's
    (``workflow/schemas/config.schema.yaml``). Defaults follow the paper's text where it
    decides (thresholds 0.45 / 0.95 / 0.9, ``>=``, converged *by* 10 % of training, the
    gradient reference within one component);
    ``per_quantity`` defaults to ``per_normalized`` and ``weight_threshold`` to ``relative``:
    no trained tiny-suite weight reaches 0.95 of a random matrix's PER (docs/guide/table1.md).
    """

    cka_threshold: float = _DEFAULTS["cka_threshold"]
    early_fraction: float = _DEFAULTS["early_fraction"]
    early_step: str = _DEFAULTS["early_step"]
    per_quantity: str = _DEFAULTS["per_quantity"]
    per_weight_threshold: float = _DEFAULTS["per_weight_threshold"]
    per_grad_fraction: float = _DEFAULTS["per_grad_fraction"]
    weight_threshold: str = _DEFAULTS["weight_threshold"]
    reference: str = _DEFAULTS["reference"]
    comparison: str = _DEFAULTS["comparison"]

    def __post_init__(self) -> None:
        _check_range("cka_threshold", self.cka_threshold, low_open=False)
        _check_range("per_weight_threshold", self.per_weight_threshold, low_open=False)
        _check_range("early_fraction", self.early_fraction, low_open=True)
        _check_range("per_grad_fraction", self.per_grad_fraction, low_open=True)
        _check_choice("early_step", self.early_step, EARLY_STEP_RULES)
        _check_choice("per_quantity", self.per_quantity, PER_QUANTITIES)
        _check_choice("weight_threshold", self.weight_threshold, WEIGHT_THRESHOLDS)
        _check_choice("reference", self.reference, REFERENCES)
        _check_choice("comparison", self.comparison, COMPARISONS)


def early_step(steps: np.ndarray, final_step: int, early_fraction: float,
               rule: str = "at_or_before") -> int:
    """The early step among ``steps`` for ``early_fraction`` x ``final_step``.

    ``at_or_before``: the last step at or before the target (a step equal to it counts, up to
    float rounding of the product); ``nearest``: the step nearest to it, ties -> the later.

    >>> early_step(np.array([0, 32, 64, 128, 512]), 512, 0.1)
    32
    >>> early_step(np.array([0, 32, 64, 128, 512]), 512, 0.1, "nearest")
    64
    """
    _check_choice("early_step", rule, EARLY_STEP_RULES)
    steps = np.sort(np.asarray(steps, dtype=np.int64))
    if steps.size == 0:
        raise ValueError("no steps to choose the early step from")
    target = early_fraction * final_step
    if rule == "at_or_before":
        before = steps[steps <= target + 1e-9 * max(1.0, abs(target))]
        if before.size == 0:
            raise ValueError(f"no analysed step is at or before {early_fraction:g} x "
                             f"{final_step} = {target:g}; steps: {steps.tolist()}")
        return int(before[-1])
    distance = np.abs(steps - target)
    nearest = np.flatnonzero(distance == distance.min())
    return int(steps[nearest[-1]])


def final_step(ds: xr.Dataset) -> int:
    """Final training step: ``ds.attrs["final_step"]``, else the largest ``step`` coordinate;
    ValueError when it is not a ``step`` coordinate. The one definition tables and figures use."""
    steps = ds["step"].to_numpy()
    step = int(ds.attrs.get("final_step", steps.max()))
    if step not in set(steps.tolist()):
        raise ValueError(f"final_step {step} is not among the dataset steps")
    return step


def at_or_above(x: np.ndarray, threshold: float, comparison: str = "at_least") -> np.ndarray:
    """``x >= threshold`` (``at_least``) or ``x > threshold`` (``greater``), elementwise."""
    _check_choice("comparison", comparison, COMPARISONS)
    return x >= threshold if comparison == "at_least" else x > threshold


def per_variable(parameter: str, per_quantity: str) -> str:
    """Metrics variable of ``parameter``'s PER in ``per_quantity``: ``per_weight_normalized``."""
    return _VARIABLE[parameter] + PER_QUANTITIES[per_quantity]


def layer_labels(
    cka: np.ndarray, per: np.ndarray, *, parameter: str, cka_threshold: float,
    per_weight_threshold: float, per_grad_fraction: float, comparison: str = "at_least",
    weight_threshold: str = "absolute", reference: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels (early, large) for layers with finite inputs; each shape (n_layers,).

    ``cka``: CKA at the early step, shape (layer,); ``per``: PER at the final step, shape
    (layer,). Layers NaN in either are dropped before thresholds are computed. Gradients
    (and weights with ``weight_threshold="relative"``) compare with their fraction x
    ``reference`` (default: the largest kept ``per``).
    """
    _check_choice("weight_threshold", weight_threshold, WEIGHT_THRESHOLDS)
    keep = np.isfinite(cka) & np.isfinite(per)
    cka, per = cka[keep], per[keep]
    early = at_or_above(cka, cka_threshold, comparison)
    if reference is None:
        reference = per.max() if per.size else math.nan
    if parameter == "weights":
        scale = reference if weight_threshold == "relative" else 1.0
        large = at_or_above(per, per_weight_threshold * scale, comparison)
    elif parameter == "gradients":
        large = at_or_above(per, per_grad_fraction * reference, comparison)
    else:
        raise ValueError(f"unknown parameter {parameter!r}; allowed: weights, gradients")
    return early, large


@dataclass(frozen=True)
class CellInputs:
    """What one Table 1 cell needs, as float64 arrays over the size's layers.

    ``cka`` (layer,) at the early step; ``per`` (layer,) at the final step; ``reference``
    the largest layer PER relative thresholds apply to (NaN when no layer is defined);
    ``cka_resamples`` (layer, resample) or None.
    """

    parameter: str
    cka: np.ndarray
    per: np.ndarray
    reference: float
    cka_resamples: np.ndarray | None


def cell_inputs(ds: xr.Dataset, size: str, component: str, parameter: str,
                options: MCCOptions, *, early: int, last: int) -> CellInputs:
    """Gather one cell's inputs from the metrics dataset (see :class:`CellInputs`)."""
    cka = ds["cka"].sel(size=size, component=component, step=early).to_numpy()
    per_all = ds[per_variable(parameter, options.per_quantity)].sel(size=size, step=last)
    per = per_all.sel(component=component).to_numpy()
    if options.reference == "model":  # layers of either component with both inputs
        cka_all = ds["cka"].sel(size=size, step=early).transpose(*per_all.dims).to_numpy()
        pool = np.where(np.isfinite(cka_all), per_all.to_numpy(), np.nan)
    else:
        pool = np.where(np.isfinite(cka), per, np.nan)
    reference = float(np.nanmax(pool)) if np.isfinite(pool).any() else math.nan
    resamples = None
    if "cka_resamples" in ds:
        resamples = ds["cka_resamples"].sel(size=size, component=component, step=early)
        resamples = resamples.transpose("layer", ...).to_numpy()
    return CellInputs(parameter, cka, per, reference, resamples)


def cell_mcc(inputs: CellInputs, options: MCCOptions, *,
             cka: np.ndarray | None = None) -> tuple[float, str | None, np.ndarray, np.ndarray]:
    """(MCC or NaN, reason if undefined, early labels, large labels) of one cell.

    ``cka`` replaces the point estimate (a bootstrap resample); the kept layers are those
    finite in the point estimate, so a resample NaN in a kept layer gives NaN.
    """
    keep = np.isfinite(inputs.cka) & np.isfinite(inputs.per)
    values = inputs.cka if cka is None else cka
    if not np.isfinite(values[keep]).all():
        return math.nan, "a resample is undefined for a layer", np.array([]), np.array([])
    is_early, is_large = layer_labels(
        np.where(keep, values, np.nan), inputs.per, parameter=inputs.parameter,
        cka_threshold=options.cka_threshold, per_weight_threshold=options.per_weight_threshold,
        per_grad_fraction=options.per_grad_fraction, comparison=options.comparison,
        weight_threshold=options.weight_threshold,
        reference=None if math.isnan(inputs.reference) else inputs.reference)
    reason = mcc_undefined_reason(is_early, is_large, a_name="early convergence",
                                  b_name=f"large PER ({inputs.parameter})")
    mcc = math.nan if reason else float(matthews_corrcoef(is_early, is_large))
    return mcc, reason, is_early, is_large


def mcc_interval(inputs: CellInputs, options: MCCOptions,
                 level: float) -> tuple[float, float, float]:
    """(low, high, fraction of resamples undefined) of one cell's MCC; NaNs without resamples.

    Each bootstrap resample of CKA relabels early convergence; the interval is the
    percentile interval of the defined resample MCCs at ``level``.
    """
    if inputs.cka_resamples is None or inputs.cka_resamples.shape[-1] == 0:
        return math.nan, math.nan, math.nan
    mccs = np.array([cell_mcc(inputs, options, cka=inputs.cka_resamples[:, r])[0]
                     for r in range(inputs.cka_resamples.shape[-1])])
    low, high = percentile_interval(mccs, level)
    return low, high, float(np.mean(~np.isfinite(mccs)))


def replicates(ds: xr.Dataset) -> list[tuple[int, xr.Dataset]]:
    """``(seed, dataset of that seed)`` of a metrics dataset; ``[(0, ds)]`` without ``seed``."""
    if "seed" not in ds.dims:
        return [(0, ds)]
    return [(int(s), ds.sel(seed=s, drop=True)) for s in ds["seed"].to_numpy()]


def mcc_table(ds: xr.Dataset, options: MCCOptions | None = None, **kwargs: Any) -> pd.DataFrame:
    """Table 1 in long form: one row per (size, seed, column θ_att, ∇θ_att, θ_mlp, ∇θ_mlp).

    ``ds``: combined metrics dataset with ``cka`` and the PER variables of the chosen
    ``per_quantity`` (size, [seed,] component, layer, step), optionally ``cka_resamples``
    (each seed is a table of its own, :func:`replicates`);
    ``options`` (or its fields as keyword arguments). Returns columns :data:`TABLE_COLUMNS`;
    ``mcc`` is NaN when undefined, with ``undefined_reason`` saying why (else None). The
    definitions are stored in ``df.attrs["thresholds"]`` for :func:`write_mcc_table`.
    """
    if options is None:
        options = MCCOptions(**kwargs)
    elif kwargs:
        options = dataclasses.replace(options, **kwargs)
    needed = ["cka", *(per_variable(p, options.per_quantity) for p in _VARIABLE)]
    missing = [v for v in needed if v not in ds]
    if missing:
        raise ValueError(f"dataset lacks variable(s) {missing} (per_quantity="
                         f"{options.per_quantity!r}; rerun the reductions to add them)")
    last = final_step(ds)
    early = early_step(ds["step"].to_numpy(), last, options.early_fraction, options.early_step)
    level = float(ds.attrs.get("bootstrap_level", 0.9))
    rows = []
    for size in ds["size"].to_numpy():
        n_params = int(ds["n_params"].sel(size=size)) if "n_params" in ds.coords else None
        for (seed, run), (label, component, parameter) in itertools.product(
                replicates(ds), COLUMNS):
            inputs = cell_inputs(run, size, component, parameter, options, early=early,
                                 last=last)
            mcc, reason, is_early, is_large = cell_mcc(inputs, options)
            low, high, lost = mcc_interval(inputs, options, level)
            rows.append({
                "size": str(size), "seed": seed, "n_params": n_params,
                "component": component,
                "parameter": parameter, "label": label, "early_step": early,
                "n_layers": int(is_early.size), "n_early": int(is_early.sum()),
                "n_large": int(is_large.sum()), "mcc": mcc, "mcc_low": low, "mcc_high": high,
                "resamples_undefined": lost,
                "interval_spans_zero": bool(low <= 0.0 <= high),
                "undefined_reason": reason,
            })
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    df.attrs["thresholds"] = {**dataclasses.asdict(options), "final_step": last,
                              "bootstrap_level": level,
                              "intervals": "cka_resamples" in ds}
    return df


SEED_SUMMARY_COLUMNS: tuple[str, ...] = (
    "size", "n_params", "component", "parameter", "label", "n_seeds", "n_defined",
    "mcc_mean", "mcc_min", "mcc_max",
)


def mcc_seed_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Table 1 across seeds: one row per (size, column) of :func:`mcc_table`'s long table.

    ``mcc_mean``, ``mcc_min``, ``mcc_max``: mean and range over the seeds whose MCC is defined
    (``n_defined`` of ``n_seeds``; NaN when none is). With one seed the three equal its MCC.
    Returns columns :data:`SEED_SUMMARY_COLUMNS`, sizes and columns in the order of ``df``.
    """
    rows = []
    keys = ["size", "label"]
    for (size, label), part in df.groupby(keys, sort=False):
        values = part["mcc"].to_numpy(dtype=float)
        defined = values[np.isfinite(values)]
        first = part.iloc[0]
        rows.append({
            "size": size, "n_params": first["n_params"], "component": first["component"],
            "parameter": first["parameter"], "label": label,
            "n_seeds": int(part["seed"].nunique()), "n_defined": int(defined.size),
            "mcc_mean": float(defined.mean()) if defined.size else math.nan,
            "mcc_min": float(defined.min()) if defined.size else math.nan,
            "mcc_max": float(defined.max()) if defined.size else math.nan,
        })
    return pd.DataFrame(rows, columns=list(SEED_SUMMARY_COLUMNS))


def format_params(n: Any) -> str:
    """Human parameter count: 70426624 -> ``"70.4M"``, 42000 -> ``"42.0k"``; '?' if unknown."""
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "?"
    n = float(n)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def header_line(df: pd.DataFrame, thresholds: Mapping[str, Any] | None) -> str:
    """Sentences stating every definition behind ``df`` (thresholds, early step, PER, ...)."""
    steps = ", ".join(str(int(s)) for s in sorted(set(df["early_step"])))
    if not thresholds:
        return f"Early step: {steps} (thresholds not recorded)."
    t = {**dataclasses.asdict(MCCOptions()), **thresholds}
    final = t.get("final_step", "final")
    cka = f"{t['cka_estimator']} CKA" if t.get("cka_estimator") else "CKA"
    ge = _SYMBOL[t["comparison"]]
    rule = ("the last analysed step at or before" if t["early_step"] == "at_or_before"
            else "the analysed step nearest to")
    quantity = {"per": "PER", "per_normalized": "PER / PER of a random Gaussian matrix of "
                "the same shape", "per_head_dim": "PER of the top head_dim singular values / "
                "head_dim"}[t["per_quantity"]]
    largest = "the largest layer value " + ("within the component" if t["reference"] ==
                                            "component" else "over both components")
    weights = f"{t['per_weight_threshold']:g}" + (
        f" × {largest}" if t["weight_threshold"] == "relative" else "")
    text = (
        f"Early convergence: {cka} {ge} {t['cka_threshold']:g} at step {steps} ({rule} "
        f"{t['early_fraction']:g} × final step {final}). Large PER, on {quantity} "
        f"(`{t['per_quantity']}`) at step {final}: weights {ge} {weights}; gradients {ge} "
        f"{t['per_grad_fraction']:g} × {largest}.")
    if t.get("intervals"):
        text += (f" Brackets: {100 * t.get('bootstrap_level', 0.9):g}% percentile interval "
                 "over bootstrap resamples of sequences (CKA relabelled per resample, PER "
                 "labels fixed); † marks an interval that contains 0.")
    elif "intervals" in t:
        text += " No intervals: the metrics hold no bootstrap resamples (metrics.bootstrap)."
    return text


def _size_table(title: str, header: str, table: pd.DataFrame,
                cell: Callable[[str, str, pd.Series, list[str]], str]) -> str:
    """Table 1's markdown: ``title``, ``header``, then one row per size of ``table`` (in its
    order, with the parameter count), one cell per column of :data:`COLUMNS` written by
    ``cell(size, label, row, notes)`` ("–" where ``table`` has no row), which appends its
    footnotes to ``notes``."""
    labels = [c[0] for c in COLUMNS]
    lines = [title, "", header, "", "| size | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    notes: list[str] = []
    for size in dict.fromkeys(table["size"].astype(str)):
        part = table[table["size"].astype(str) == size]
        cells = []
        for label in labels:
            row = part[part["label"] == label]
            cells.append("–" if row.empty else cell(size, label, row.iloc[0], notes))
        n_params = part["n_params"].iloc[0] if "n_params" in part else None
        lines.append(f"| {size} ({format_params(n_params)}) | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


TITLE = ("**Table 1.** Matthews correlation between early activation convergence and large PER "
         "across layers")


def mcc_markdown(df: pd.DataFrame, thresholds: Mapping[str, Any] | None = None) -> str:
    """Table 1 as markdown: rows sizes (with parameter count), columns θ_att ... ∇θ_mlp.

    Values to 2 decimals; NaN cells read "undefined" with a footnote giving the reason. With
    several seeds: :func:`mcc_seeds_markdown`.
    """
    if thresholds is None:
        thresholds = df.attrs.get("thresholds")
    if "seed" in df and df["seed"].nunique() > 1:
        return mcc_seeds_markdown(df, thresholds)

    def cell(size: str, label: str, row: pd.Series, notes: list[str]) -> str:
        value = float(row["mcc"])
        if not math.isnan(value):
            return f"{value:.2f}" + _interval_text(row)
        lost = float(row["resamples_undefined"]) if "resamples_undefined" in row else math.nan
        also = "" if math.isnan(lost) else \
            f" (undefined in {100 * lost:.0f}% of the bootstrap resamples)"
        notes.append(f"[^{len(notes) + 1}]: {size} {label}: "
                     f"{row['undefined_reason'] or 'undefined'}{also}")
        return f"undefined[^{len(notes)}]"

    return _size_table(TITLE + ".", header_line(df, thresholds), df, cell)


def mcc_seeds_markdown(df: pd.DataFrame, thresholds: Mapping[str, Any] | None) -> str:
    """Table 1 over seed replicates: one row per size, each cell the MCC's mean over seeds
    and its range, "mean (min to max)"; a footnote counts the seeds where it is undefined
    (with their reasons), "undefined" when it is in every seed."""
    n_seeds = int(df["seed"].nunique())

    def cell(size: str, label: str, row: pd.Series, notes: list[str]) -> str:
        runs = df[(df["size"].astype(str) == size) & (df["label"] == label)]
        lost = runs[~np.isfinite(runs["mcc"].to_numpy(dtype=float))]
        text = "undefined" if row["n_defined"] == 0 else \
            f"{row['mcc_mean']:.2f} ({row['mcc_min']:.2f} to {row['mcc_max']:.2f})"
        if len(lost):
            reasons = "; ".join(sorted({str(r or "undefined")
                                        for r in lost["undefined_reason"]}))
            seeds = ", ".join(str(int(s)) for s in lost["seed"])
            notes.append(f"[^{len(notes) + 1}]: {size} {label}: undefined in "
                         f"{len(lost)} of {n_seeds} seeds (seed {seeds}): {reasons}")
            text += f"[^{len(notes)}]"
        return text

    # no bootstrap intervals here (each seed's are in the CSV): their sentence is left out
    header = header_line(df, thresholds and {k: v for k, v in thresholds.items()
                                             if k != "intervals"})
    return _size_table(f"{TITLE}: mean over {n_seeds} seeds (min to max across seeds).",
                       header, mcc_seed_summary(df), cell)


def _interval_text(row: pd.Series) -> str:
    """`` [low, high]`` (with † when it contains 0); ``""`` without resamples; `` [no
    interval: p% of resamples undefined]`` when too few resamples give a defined MCC."""
    low, high = float(row.get("mcc_low", math.nan)), float(row.get("mcc_high", math.nan))
    if math.isnan(low) or math.isnan(high):
        lost = float(row.get("resamples_undefined", math.nan))
        return "" if math.isnan(lost) else f" [no interval: {100 * lost:.0f}% of resamples " \
                                           "undefined]"
    return f" [{low:.2f}, {high:.2f}]" + ("†" if low <= 0.0 <= high else "")


def write_mcc_table(
    df: pd.DataFrame, csv_path: Path, md_path: Path, *,
    thresholds: Mapping[str, Any] | None = None, seeds_csv: Path | None = None,
) -> list[Path]:
    """Write ``df`` as CSV (unchanged) and as the paper-layout markdown; return the paths.

    ``thresholds`` defaults to ``df.attrs["thresholds"]`` (set by :func:`mcc_table`);
    ``seeds_csv``: also write :func:`mcc_seed_summary` there.
    """
    text = mcc_markdown(df, thresholds)
    write_text_atomic(df.to_csv(index=False), csv_path)
    write_text_atomic(text, md_path)
    paths = [Path(csv_path), Path(md_path)]
    if seeds_csv is not None:
        write_text_atomic(mcc_seed_summary(df).to_csv(index=False), seeds_csv)
        paths.append(Path(seeds_csv))
    return paths


#: Threshold grids of the sensitivity figure: CKA thresholds 0.30-0.70 and PER thresholds
#: (weights) / fractions of the largest PER (gradients) 0.50-1.00, both in steps of 0.025.
SENSITIVITY_CKA = tuple(round(0.30 + 0.025 * i, 3) for i in range(17))
SENSITIVITY_PER = tuple(round(0.50 + 0.025 * i, 3) for i in range(21))


def mcc_grid(ds: xr.Dataset, options: MCCOptions | None = None, *,
             cka_thresholds: tuple[float, ...] = SENSITIVITY_CKA,
             per_thresholds: tuple[float, ...] = SENSITIVITY_PER) -> xr.DataArray:
    """Point MCC of every Table 1 cell over a grid of thresholds (NaN where undefined).

    Dims (size, column, per_threshold, cka_threshold); ``per_threshold`` is
    ``per_weight_threshold`` for the weight columns and ``per_grad_fraction`` for the
    gradient ones; every other definition comes from ``options``. With seed replicates: the
    mean over seeds of each seed's MCC, NaN (undefined) where any seed's is.
    """
    runs = replicates(ds)
    if len(runs) > 1:
        grids = [mcc_grid(run, options, cka_thresholds=cka_thresholds,
                          per_thresholds=per_thresholds) for _, run in runs]
        return xr.concat(grids, dim="seed").mean("seed", skipna=False, keep_attrs=True)
    ds = runs[0][1]
    options = options or MCCOptions()
    last = final_step(ds)
    early = early_step(ds["step"].to_numpy(), last, options.early_fraction, options.early_step)
    sizes = [str(s) for s in ds["size"].to_numpy()]
    out = np.full((len(sizes), len(COLUMNS), len(per_thresholds), len(cka_thresholds)), np.nan)
    for si, size in enumerate(sizes):
        for ci, (_, component, parameter) in enumerate(COLUMNS):
            inputs = cell_inputs(ds, size, component, parameter, options, early=early,
                                 last=last)
            key = "per_weight_threshold" if parameter == "weights" else "per_grad_fraction"
            for pi, per_t in enumerate(per_thresholds):
                for ki, cka_t in enumerate(cka_thresholds):
                    grid_options = dataclasses.replace(options, cka_threshold=cka_t,
                                                       **{key: per_t})
                    out[si, ci, pi, ki] = cell_mcc(inputs, grid_options)[0]
    return xr.DataArray(
        out, dims=("size", "column", "per_threshold", "cka_threshold"),
        coords={"size": np.array(sizes, dtype=object),
                "column": np.array([c[0] for c in COLUMNS], dtype=object),
                "per_threshold": np.array(per_thresholds),
                "cka_threshold": np.array(cka_thresholds)},
        attrs={**dataclasses.asdict(options), "early_step_value": early, "final_step": last},
        name="mcc")

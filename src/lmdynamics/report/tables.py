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
  layer value or above, on the mean gradient PER over the last ``grad_steps`` analysed steps
  and, with ``grad_batches: sub_batch_mean`` (default) where the metrics hold them, over the
  sub-batches of the eval batch (:func:`label_per`). The largest is taken within the
  component (``reference: component``, default) or over both components (``model``).
- "or above" is ``>=`` (``comparison: at_least``, the text) or ``>`` (``greater``, the code).

The table holds the Matthews correlation (phi coefficient) of the two labels over the layers of
the size (layers that are NaN in either input are dropped). When either label puts every layer
in one class the coefficient is undefined: NaN with the reason in ``undefined_reason``.

Intervals: when the metrics hold bootstrap resamples of CKA (``cka_resamples``, one value per
resample of *sequences*, :mod:`lmdynamics.reduction.cka`), every resample relabels the layers'
early convergence and gives one MCC; ``mcc_low``/``mcc_high`` are the percentile interval of
those MCCs at the bootstrap level (resamples where the MCC is undefined are left out and
counted in ``resamples_undefined``; more than half undefined -> no interval). PER labels are
held fixed: weights carry no sampling error, and gradient PER is not resampled. An interval
shows the measurement's stability, it is not a test.

The null (:func:`null_columns`): ``p_value`` is the exact probability, over every distinct
relabelling of the size's layers, of an MCC at least as extreme as the observed one
(:func:`lmdynamics.estimators.mcc.relabelling_test`; ``alternative``), ``p_min`` the smallest
p-value the cell's label counts allow, ``verdict`` a plain label at ``alpha``
(:func:`verdict`). ``n_uncertain`` counts gradient labels within batch noise of their
threshold (:func:`uncertain_labels`).

Seed replicates (a ``seed`` dimension in the metrics): every seed gets its own MCC (one row per
(size, seed, column) in :func:`mcc_table`); :func:`mcc_seed_summary` gives one row per (size,
column) with the across-seed mean, sd, min and max of the defined MCCs and the exact
stratified relabelling test over seeds; the markdown leads with one row per size with "mean
(min to max), sd, seeds; p" in each cell, then each seed's own table. With one seed the
markdown is the single run's table, with its bootstrap intervals and p-values.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.estimators.bootstrap import percentile_interval
from lmdynamics.estimators.mcc import (
    ALTERNATIVES,
    joint_counts,
    matthews_corrcoef,
    mcc_undefined_reason,
    relabelling_test,
)
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
    "n_both", "p_value", "p_min", "n_relabellings", "verdict", "n_uncertain",
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
#: ``mcc.grad_batches``: gradient PER of the whole eval batch, or the mean over its
#: sub-batches (``extraction.grad_sub_batches``).
GRAD_BATCHES: tuple[str, ...] = ("whole", "sub_batch_mean")
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
    (``lmdynamics/schemas/config.schema.yaml``). Defaults follow the paper's text where it
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
    grad_steps: int = _DEFAULTS["grad_steps"]
    grad_batches: str = _DEFAULTS["grad_batches"]
    alternative: str = _DEFAULTS["alternative"]
    alpha: float = _DEFAULTS["alpha"]

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
        _check_choice("alternative", self.alternative, ALTERNATIVES)
        _check_choice("grad_batches", self.grad_batches, GRAD_BATCHES)
        if isinstance(self.grad_steps, bool) or not isinstance(self.grad_steps, int) \
                or self.grad_steps < 1:
            raise ValueError(f"grad_steps={self.grad_steps!r}: allowed an integer of at least 1")
        if not 0.0 < self.alpha < 1.0:  # also catches NaN
            raise ValueError(f"alpha={self.alpha!r} is outside the allowed range (0, 1)")


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


def grad_label_steps(steps: np.ndarray, last: int, k: int) -> list[int]:
    """The analysed steps whose gradient PER the labels average: the last ``k`` at or before
    ``last`` (all of them when there are fewer).

    >>> grad_label_steps(np.array([0, 64, 128, 256, 384, 512]), 512, 3)
    [256, 384, 512]
    """
    if k < 1:
        raise ValueError(f"grad_steps={k!r}: allowed an integer of at least 1")
    return sorted(int(s) for s in steps if s <= last)[-k:]


def label_per(ds: xr.Dataset, parameter: str, options: MCCOptions, *,
              last: int) -> xr.DataArray:
    """The PER the large-PER labels threshold, over (component, layer), of one size's ``ds``.

    Weights: the ``per_quantity`` PER at the final step ``last``. Gradients: its mean over
    :func:`grad_label_steps` (``options.grad_steps``) of the whole eval batch's gradient
    (``grad_batches: whole``, and ``sub_batch_mean`` when the metrics hold no sub-batches) or
    of the mean over its sub-batches (``sub_batch_mean``, :func:`label_per_sub`); a layer NaN
    at any of them is NaN. :func:`grad_label_batches` says which.
    """
    if parameter == "gradients" and options.grad_batches == "sub_batch_mean":
        sub = label_per_sub(ds, options, last=last)
        if sub is not None:
            return sub.mean("sub_batch", skipna=False)
    per = ds[per_variable(parameter, options.per_quantity)]
    if parameter == "weights":
        return per.sel(step=last)
    steps = grad_label_steps(per["step"].to_numpy(), last, options.grad_steps)
    return per.sel(step=steps).mean("step", skipna=False)


def grad_label_batches(ds: xr.Dataset, options: MCCOptions) -> int:
    """How many sub-batches of the eval batch the gradient labels average (0: the whole
    batch): ``ds``'s when ``grad_batches`` is ``sub_batch_mean`` and it holds two or more."""
    if options.grad_batches != "sub_batch_mean" or sub_variable(options.per_quantity) not in ds:
        return 0
    n = ds.sizes.get("sub_batch", 0)
    return n if n >= 2 else 0


def sub_variable(per_quantity: str) -> str:
    """Metrics variable of the sub-batch gradient PER in ``per_quantity``."""
    return "per_grad_sub" + PER_QUANTITIES[per_quantity]


def label_per_sub(ds: xr.Dataset, options: MCCOptions, *,
                  last: int) -> xr.DataArray | None:
    """The gradient PER of each sub-batch of the eval batch (``extraction.grad_sub_batches``)
    averaged over :func:`grad_label_steps`, (component, layer, sub_batch) of one size's
    ``ds``; None when the metrics hold fewer than two sub-batches."""
    name = sub_variable(options.per_quantity)
    if name not in ds or ds.sizes.get("sub_batch", 0) < 2:
        return None
    per = ds[name]
    steps = grad_label_steps(per["step"].to_numpy(), last, options.grad_steps)
    return per.sel(step=steps).mean("step", skipna=False).transpose(
        "component", "layer", "sub_batch")


@dataclass(frozen=True)
class CellInputs:
    """What one Table 1 cell needs, as float64 arrays over the size's layers.

    ``cka`` (layer,) at the early step; ``per`` (layer,) the PER the labels threshold
    (:func:`label_per`); ``reference`` the largest layer PER relative thresholds apply to
    (NaN when no layer is defined); ``cka_resamples`` (layer, resample) or None;
    ``per_sub`` (layer, sub_batch) the gradient PER of each sub-batch of the eval batch
    (:func:`label_per_sub`) and ``sub_reference`` (sub_batch,) its largest layer value, or
    None (weights, or no sub-batches).
    """

    parameter: str
    cka: np.ndarray
    per: np.ndarray
    reference: float
    cka_resamples: np.ndarray | None
    per_sub: np.ndarray | None = None
    sub_reference: np.ndarray | None = None


def _reference(pool: np.ndarray) -> np.ndarray:
    """The largest finite value over the leading axes of ``pool`` (NaN where none is)."""
    flat = pool.reshape(-1, *pool.shape[2:]) if pool.ndim > 2 else pool.reshape(-1)
    finite = np.isfinite(flat).any(axis=0)
    return np.where(finite, np.nanmax(np.where(np.isfinite(flat), flat, -np.inf), axis=0),
                    np.nan)


def cell_inputs(ds: xr.Dataset, size: str, component: str, parameter: str,
                options: MCCOptions, *, early: int, last: int) -> CellInputs:
    """Gather one cell's inputs from the metrics dataset (see :class:`CellInputs`)."""
    cka = ds["cka"].sel(size=size, component=component, step=early).to_numpy()
    run = ds.sel(size=size)
    per_all = label_per(run, parameter, options, last=last)
    per = per_all.sel(component=component).to_numpy()
    if options.reference == "model":  # layers of either component with both inputs
        cka_all = ds["cka"].sel(size=size, step=early).transpose(*per_all.dims).to_numpy()
    else:  # the layers of this component with both inputs
        cka_all = np.where(per_all["component"].to_numpy()[:, None] == component,
                           ds["cka"].sel(size=size, step=early).transpose(
                               *per_all.dims).to_numpy(), np.nan)
    pool = np.where(np.isfinite(cka_all), per_all.to_numpy(), np.nan)
    reference = float(_reference(pool))
    resamples = None
    if "cka_resamples" in ds:
        resamples = ds["cka_resamples"].sel(size=size, component=component, step=early)
        resamples = resamples.transpose("layer", ...).to_numpy()
    sub = label_per_sub(run, options, last=last) if parameter == "gradients" else None
    if sub is None:
        return CellInputs(parameter, cka, per, reference, resamples)
    sub_pool = np.where(np.isfinite(cka_all)[..., None], sub.to_numpy(), np.nan)
    return CellInputs(parameter, cka, per, reference, resamples,
                      per_sub=sub.sel(component=component).to_numpy(),
                      sub_reference=_reference(sub_pool))


#: A gradient label is uncertain when its PER / largest layer PER lies within this many
#: standard errors (estimated from the eval batch's sub-batches) of ``per_grad_fraction``.
UNCERTAIN_SE = 2.0


def uncertain_labels(inputs: CellInputs, options: MCCOptions) -> float:
    """How many of a gradient cell's large-PER labels batch noise could flip; NaN without
    sub-batches (and for weights, which carry no sampling noise).

    A layer's ratio ``r`` = label PER / ``reference`` is compared with
    ``per_grad_fraction``; its standard error is the standard deviation over the J
    sub-batches of their own ratios (each sub-batch's PER over its own largest layer value)
    divided by sqrt(J): independent sequences, so the spread of a mean of J of them. A label
    is uncertain when ``|r - per_grad_fraction| <= UNCERTAIN_SE x`` that error, or when the
    error is undefined (a sub-batch's PER is NaN). For the
    whole batch's PER (``grad_batches: whole``) the error is the sub-batch mean's, an
    estimate checked against independent batches in ``benchmarks/grad_label_stability.py``.
    """
    if inputs.per_sub is None or inputs.sub_reference is None:
        return math.nan
    keep = np.isfinite(inputs.cka) & np.isfinite(inputs.per)
    if not keep.any():
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = inputs.per[keep] / inputs.reference
        sub = inputs.per_sub[keep] / inputs.sub_reference  # (layer, J)
    se = np.std(sub, axis=1, ddof=1) / math.sqrt(sub.shape[1])
    close = np.abs(ratio - options.per_grad_fraction) <= UNCERTAIN_SE * se
    return float(np.sum(close | ~np.isfinite(se)))


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
                **null_columns([joint_counts(is_early, is_large)], options),
                "n_uncertain": uncertain_labels(inputs, options),
            })
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    df.attrs["thresholds"] = {**dataclasses.asdict(options), "final_step": last,
                              "grad_label_steps": grad_label_steps(
                                  ds["step"].to_numpy(), last, options.grad_steps),
                              "grad_label_batches": grad_label_batches(ds, options),
                              "bootstrap_level": level,
                              "intervals": "cka_resamples" in ds}
    return df


def verdict(p_value: float, p_min: float, alpha: float, alternative: str) -> str:
    """A cell's plain label: ``undefined`` (no p-value), ``design cannot reach p < alpha``
    (even the most extreme labels would not), ``above chance`` / ``differs from chance``
    (``p_value <= alpha``, for ``alternative`` greater / two_sided), else ``cannot be
    distinguished from chance``."""
    if math.isnan(p_value):
        return "undefined"
    if p_min > alpha:
        return f"design cannot reach p < {alpha:g}"
    if p_value <= alpha:
        return "above chance" if alternative == "greater" else "differs from chance"
    return "cannot be distinguished from chance"


def null_columns(counts: list[tuple[int, int, int, int]],
                 options: MCCOptions) -> dict[str, Any]:
    """``n_both``, ``p_value``, ``p_min``, ``n_relabellings``, ``verdict`` of one cell (one
    2 x 2 table ``(layers, early, large, both)``) or of one cell over seeds (one table per
    seed): :func:`~lmdynamics.estimators.mcc.relabelling_test` with ``options.alternative``,
    labelled at ``options.alpha``."""
    test = relabelling_test(counts, options.alternative)
    return {"n_both": sum(c[3] for c in counts), "p_value": test.p_value,
            "p_min": test.min_p_value, "n_relabellings": test.n_relabellings,
            "verdict": verdict(test.p_value, test.min_p_value, options.alpha,
                               options.alternative)}


SEED_SUMMARY_COLUMNS: tuple[str, ...] = (
    "size", "n_params", "component", "parameter", "label", "n_seeds", "n_defined",
    "mcc_mean", "mcc_min", "mcc_max",
    "mcc_sd", "p_value", "p_min", "n_relabellings", "verdict",
)


def options_of(thresholds: Mapping[str, Any] | None) -> MCCOptions:
    """The :class:`MCCOptions` among recorded ``thresholds`` (``df.attrs["thresholds"]`` of
    :func:`mcc_table`), the defaults for the fields they lack."""
    names = {f.name for f in dataclasses.fields(MCCOptions)}
    return MCCOptions(**{k: v for k, v in (thresholds or {}).items() if k in names})


def mcc_seed_summary(df: pd.DataFrame, options: MCCOptions | None = None) -> pd.DataFrame:
    """Table 1 across seeds: one row per (size, column) of :func:`mcc_table`'s long table.

    ``mcc_mean``, ``mcc_min``, ``mcc_max``, ``mcc_sd`` (ddof 1; NaN with fewer than two):
    over the seeds whose MCC is defined (``n_defined`` of ``n_seeds``; NaN when none is).
    With one seed mean, min and max equal its MCC. ``p_value``, ``p_min``,
    ``n_relabellings``, ``verdict``: the exact stratified relabelling test over the seeds
    (:func:`null_columns`; each seed's layers relabelled independently, statistic the summed
    joint count), with ``options`` (default: those recorded in ``df.attrs``). Returns columns
    :data:`SEED_SUMMARY_COLUMNS`, sizes and columns in the order of ``df``.
    """
    options = options or options_of(df.attrs.get("thresholds"))
    counts = ["n_layers", "n_early", "n_large", "n_both"]
    rows = []
    keys = ["size", "label"]
    for (size, label), part in df.groupby(keys, sort=False):
        values = part["mcc"].to_numpy(dtype=float)
        defined = values[np.isfinite(values)]
        first = part.iloc[0]
        tables = ([tuple(int(v) for v in r) for r in part[counts].to_numpy()]
                  if set(counts) <= set(part) else [])
        null = null_columns(tables, options)
        del null["n_both"]
        rows.append({
            "size": size, "n_params": first["n_params"], "component": first["component"],
            "parameter": first["parameter"], "label": label,
            "n_seeds": int(part["seed"].nunique()), "n_defined": int(defined.size),
            "mcc_mean": float(defined.mean()) if defined.size else math.nan,
            "mcc_min": float(defined.min()) if defined.size else math.nan,
            "mcc_max": float(defined.max()) if defined.size else math.nan,
            "mcc_sd": float(defined.std(ddof=1)) if defined.size > 1 else math.nan,
            **null,
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
        f"{t['per_grad_fraction']:g} × {largest}{_grad_steps_text(t)}.")
    if t.get("intervals"):
        text += (f" Brackets: {100 * t.get('bootstrap_level', 0.9):g}% percentile interval "
                 "over bootstrap resamples of sequences (CKA relabelled per resample, PER "
                 "labels fixed); † marks an interval that contains 0.")
    elif "intervals" in t:
        text += " No intervals: the metrics hold no bootstrap resamples (metrics.bootstrap)."
    return text


def _grad_steps_text(t: Mapping[str, Any]) -> str:
    """`` (gradient PER: the mean over 4 sub-batches of the eval batch and steps 256, 384,
    512)``, saying what the gradient labels average; ``""`` for one step of the whole batch."""
    steps = t.get("grad_label_steps") or []
    batches = int(t.get("grad_label_batches") or 0)
    parts = [f"{batches} sub-batches of the eval batch"] if batches else []
    if len(steps) > 1:
        parts.append("steps " + ", ".join(str(int(s)) for s in steps))
    text = " and ".join(parts)
    if t.get("grad_batches") == "sub_batch_mean" and not batches:
        text = "the whole eval batch (the metrics hold no sub-batches)" + (
            f", the mean over {text}" if text else "")
    elif text:
        text = "the mean over " + text
    return f" (gradient PER: {text})" if text else ""


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

    Values to 2 decimals, each with its bootstrap interval, its p-value under random
    relabelling of layers, the smallest p-value its label counts allow and its plain label
    (:func:`verdict`); NaN cells read "undefined" with a footnote giving the reason. With
    several seeds: :func:`mcc_seeds_markdown`.
    """
    if thresholds is None:
        thresholds = df.attrs.get("thresholds")
    if "seed" in df and df["seed"].nunique() > 1:
        return mcc_seeds_markdown(df, thresholds)
    header = " ".join(filter(None, (header_line(df, thresholds), null_line(thresholds))))
    return _size_table(TITLE + ".", header, df, _run_cell)


def _run_cell(size: str, label: str, row: pd.Series, notes: list[str]) -> str:
    """One run's cell: "MCC [interval]; p = …", or "undefined" with a footnote; a footnote
    also when gradient labels lie within batch noise of the threshold."""
    value = float(row["mcc"])
    uncertain = float(row.get("n_uncertain", math.nan))
    noise = (f"large-gradient-PER labels within {UNCERTAIN_SE:g} standard errors of the "
             f"threshold: {uncertain:.0f} of {int(row['n_layers'])} layers (batch noise, "
             "estimated from sub-batches of the eval batch): another eval batch could flip "
             "them") if uncertain > 0 else ""
    if not math.isnan(value):
        text = f"{value:.2f}" + _interval_text(row) + _null_text(row)
        if noise:
            notes.append(f"[^{len(notes) + 1}]: {size} {label}: {noise}")
            text += f"[^{len(notes)}]"
        return text
    lost = float(row["resamples_undefined"]) if "resamples_undefined" in row else math.nan
    also = "" if math.isnan(lost) else \
        f" (undefined in {100 * lost:.0f}% of the bootstrap resamples)"
    notes.append(f"[^{len(notes) + 1}]: {size} {label}: "
                 f"{row['undefined_reason'] or 'undefined'}{also}" + (f"; {noise}" if noise
                                                                      else ""))
    return f"undefined[^{len(notes)}]"


def _null_text(row: pd.Series) -> str:
    """``"; p = 0.25 (min 0.25): design cannot reach p < 0.05"``; ``""`` without a p-value."""
    p = float(row.get("p_value", math.nan))
    if math.isnan(p):
        return ""
    return f"; p = {p:.2g} (min {float(row['p_min']):.2g}): {row['verdict']}"


def null_line(thresholds: Mapping[str, Any] | None, *, seeds: int = 1) -> str:
    """Sentences saying what the p-values test and what the intervals do not (markdown)."""
    if not thresholds or "alternative" not in thresholds:
        return ""
    t = {**dataclasses.asdict(MCCOptions()), **thresholds}
    extreme = ("at least as large as" if t["alternative"] == "greater" else
               "at least as far from its chance expectation as")
    what = ("an MCC " + extreme + " the observed one" if seeds == 1 else
            "a sum over seeds of layers both early and large " + extreme + " the observed "
            "one (the exact stratified test; with the same label counts in every seed, the "
            "same as the mean MCC)")
    relabel = ("the early-convergence labels permuted over the size's layers with the "
               "large-PER labels fixed" + ("" if seeds == 1 else ", in each seed independently"))
    sided = "one-sided" if t["alternative"] == "greater" else "two-sided"
    text = (f"p: the exact {sided} probability, over every "
            f"distinct random relabelling of layers ({relabel}), of {what}; min: the smallest "
            "p those label counts allow, so \"design cannot reach p < "
            f"{t['alpha']:g}\" means that no outcome with this many layers could be told from "
            f"chance at α = {t['alpha']:g}. p-values are per cell, not adjusted for the "
            "table's number of cells.")
    if seeds == 1 and t.get("intervals"):
        text += (" The bracketed interval is not a test: it shows how far the MCC moves when "
                 "the sequences CKA is measured on are resampled with the PER labels fixed "
                 "(the measurement's stability in this run), not whether the association "
                 "exceeds chance.")
    return text


def mcc_seeds_markdown(df: pd.DataFrame, thresholds: Mapping[str, Any] | None) -> str:
    """Table 1 over seed replicates: one row per size, each cell the MCC over seeds, "mean
    (min to max), sd, defined seeds; p = … (min …): label" with the exact stratified test
    over seeds; a footnote counts the seeds where it is undefined (with their reasons),
    "undefined" when it is in every seed. Then each seed's own table (with its bootstrap
    intervals and p-values), secondary."""
    n_seeds = int(df["seed"].nunique())

    def cell(size: str, label: str, row: pd.Series, notes: list[str]) -> str:
        runs = df[(df["size"].astype(str) == size) & (df["label"] == label)]
        lost = runs[~np.isfinite(runs["mcc"].to_numpy(dtype=float))]
        text = "undefined" if row["n_defined"] == 0 else \
            f"{row['mcc_mean']:.2f} ({row['mcc_min']:.2f} to {row['mcc_max']:.2f})"
        if row["n_defined"] > 0:
            sd = float(row["mcc_sd"])
            text += ("" if math.isnan(sd) else f", sd {sd:.2f}") + \
                f", {row['n_defined']} of {n_seeds} seeds" + _null_text(row)
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
    header = " ".join(filter(None, (header, null_line(thresholds, seeds=n_seeds))))
    text = _size_table(f"{TITLE}: mean over {n_seeds} seeds (min to max across seeds).",
                       header, mcc_seed_summary(df, options_of(thresholds)), cell)
    return text + seed_tables_markdown(df, thresholds)


def seed_tables_markdown(df: pd.DataFrame, thresholds: Mapping[str, Any] | None) -> str:
    """Each seed's own Table 1 (MCC, bootstrap interval, p-value), under a heading that says
    what the intervals and p-values of one run mean; ``""`` with one seed."""
    seeds = list(dict.fromkeys(df["seed"])) if "seed" in df else []
    if len(seeds) < 2:
        return ""
    parts = ["", "**Each seed alone** (secondary: one run's labels; the headline above is "
             "the distribution over seeds). " + null_line(thresholds)]
    for seed in seeds:
        table = _size_table(f"Seed {int(seed)}:", "", df[df["seed"] == seed], _run_cell)
        table = re.sub(r"\n{3,}", "\n\n", table)  # no header line
        # footnote labels unique in the document: [^1] -> [^s3-1]
        parts += ["", re.sub(r"\[\^(\d+)\]", rf"[^s{int(seed)}-\1]", table).rstrip("\n")]
    return "\n".join(parts) + "\n"


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
    return mcc_grids(ds, options, cka_thresholds=cka_thresholds,
                     per_thresholds=per_thresholds)["mcc"]


def mcc_grids(ds: xr.Dataset, options: MCCOptions | None = None, *,
              cka_thresholds: tuple[float, ...] = SENSITIVITY_CKA,
              per_thresholds: tuple[float, ...] = SENSITIVITY_PER) -> xr.Dataset:
    """:func:`mcc_grid`'s ``mcc`` and, over the same grid, ``p_value``: Table 1's p-value of
    each point under random relabelling of layers (:func:`null_columns` with
    ``options.alternative``; with seed replicates the exact stratified test over seeds; NaN
    where the MCC is undefined in every seed)."""
    options = options or MCCOptions()
    runs = [run_grid(run, options, cka_thresholds, per_thresholds) for _, run in replicates(ds)]
    return combine_run_grids(runs, options, cka_thresholds, per_thresholds)


def combine_run_grids(runs: list[tuple[np.ndarray, np.ndarray, dict]], options: MCCOptions,
                      cka_thresholds: tuple[float, ...] = SENSITIVITY_CKA,
                      per_thresholds: tuple[float, ...] = SENSITIVITY_PER) -> xr.Dataset:
    """:func:`mcc_grids` of the seed replicates' grids ``runs`` (:func:`run_grid` of each):
    the mean MCC and the exact stratified p-value over them."""
    mcc = np.mean([values for values, _, _ in runs], axis=0)
    counts = np.stack([c for _, c, _ in runs], axis=-2)  # (..., seed, 4)
    p = np.full(mcc.shape, np.nan)
    for index in np.ndindex(p.shape):
        tables = [tuple(int(v) for v in row) for row in counts[index]]
        p[index] = relabelling_test(tables, options.alternative).p_value
    return xr.Dataset({"mcc": _grid_array(mcc, "mcc", runs[0][2], options, cka_thresholds,
                                          per_thresholds),
                       "p_value": _grid_array(p, "p_value", runs[0][2], options,
                                              cka_thresholds, per_thresholds)})


def run_grid(ds: xr.Dataset, options: MCCOptions, cka_thresholds: tuple[float, ...],
             per_thresholds: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray, dict]:
    """One run's grid: MCC (size, column, per, cka), its 2 x 2 counts (..., 4) as
    :func:`~lmdynamics.estimators.mcc.joint_counts` gives them, and the steps used."""
    last = final_step(ds)
    early = early_step(ds["step"].to_numpy(), last, options.early_fraction, options.early_step)
    sizes = [str(s) for s in ds["size"].to_numpy()]
    shape = (len(sizes), len(COLUMNS), len(per_thresholds), len(cka_thresholds))
    out, counts = np.full(shape, np.nan), np.zeros((*shape, 4), dtype=np.int64)
    for si, size in enumerate(sizes):
        for ci, (_, component, parameter) in enumerate(COLUMNS):
            inputs = cell_inputs(ds, size, component, parameter, options, early=early,
                                 last=last)
            key = "per_weight_threshold" if parameter == "weights" else "per_grad_fraction"
            for pi, per_t in enumerate(per_thresholds):
                for ki, cka_t in enumerate(cka_thresholds):
                    grid_options = dataclasses.replace(options, cka_threshold=cka_t,
                                                       **{key: per_t})
                    mcc, _, is_early, is_large = cell_mcc(inputs, grid_options)
                    out[si, ci, pi, ki] = mcc
                    counts[si, ci, pi, ki] = joint_counts(is_early, is_large)
    return out, counts, {"sizes": sizes, "early_step_value": early, "final_step": last}


def _grid_array(values: np.ndarray, name: str, steps: dict, options: MCCOptions,
                cka_thresholds: tuple[float, ...],
                per_thresholds: tuple[float, ...]) -> xr.DataArray:
    return xr.DataArray(
        values, dims=("size", "column", "per_threshold", "cka_threshold"),
        coords={"size": np.array(steps["sizes"], dtype=object),
                "column": np.array([c[0] for c in COLUMNS], dtype=object),
                "per_threshold": np.array(per_thresholds),
                "cka_threshold": np.array(cka_thresholds)},
        attrs={**dataclasses.asdict(options), "early_step_value": steps["early_step_value"],
               "final_step": steps["final_step"]},
        name=name)

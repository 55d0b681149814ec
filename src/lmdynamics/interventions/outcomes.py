"""Outcome measures of each run and effects of each variant against ``baseline``.

Per (variant, size, seed, component, layer), from a run's per-step table
(:func:`lmdynamics.interventions.run.analyse_states`):

- ``convergence_step``: the first analysed step from which CKA to the final step stays at or
  above ``threshold`` at every later analysed step (:func:`convergence_step`);
- ``auc``: area under 1 - CKA over the fraction of training (step / final step), trapezoids
  between analysed steps: the mean distance from the final representation over training, 0
  for a layer identical to its final self throughout (:func:`area_above`);
- ``per_weight``, ``per_grad``: PER of the write matrix and of its gradient, averaged over the
  analysed steps after step 0 (step 0 is the initialisation itself, which ``orthogonal_init``
  sets to PER 1 by construction);
- ``train_loss``: mean language-model loss of the last
  :data:`~lmdynamics.interventions.run.FINAL_LOSS_WINDOW` updates; ``eval_loss``: loss of the
  final checkpoint on the eval batch (the last training batch; no regulariser term in either).

Effects (:func:`effects`): variant minus baseline, paired by seed (equal seeds share the
initialisation RNG stream and the data order), the mean of the per-seed differences, with a
percentile bootstrap interval over seeds (:func:`lmdynamics.estimators.bootstrap.bootstrap_weights`,
:func:`lmdynamics.estimators.bootstrap.percentile_interval`). With 3 seeds a resample takes one of
only
10 distinct multisets: the interval is coarse and says how much the seeds disagree, not more.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from lmdynamics.estimators.bootstrap import bootstrap_weights, percentile_interval

from .run import FINAL_LOSS_WINDOW

__all__ = ["KEYS", "MEASURES", "area_above", "convergence_step", "effects", "run_outcomes",
           "summary_effects"]

#: Keys of an outcome row; ``MEASURES`` its values (units: steps, fraction of training x
#: CKA, dimensionless PER, nats/token).
KEYS = ("variant", "size", "seed", "component", "layer")
MEASURES = ("convergence_step", "auc", "per_weight", "per_grad", "train_loss", "eval_loss")
#: The CKA estimators a study may choose (columns of a run's table).
CKA_COLUMNS = {"biased": "cka", "debiased": "cka_debiased"}


def convergence_step(steps: Sequence[int], cka: Sequence[float], threshold: float) -> float:
    """First analysed step from which ``cka`` stays ``>= threshold`` to the last step.

    ``steps`` ascending, ``cka`` the same length. NaN counts as below the threshold (an
    undefined CKA is never taken for converged). Returns NaN when even the last value is
    below (or NaN), e.g. ``threshold > 1``; the last step itself when only it qualifies.
    """
    steps, cka = np.asarray(steps, dtype=np.float64), np.asarray(cka, dtype=np.float64)
    if steps.shape != cka.shape or steps.ndim != 1:
        raise ValueError(f"steps and cka must be 1-D of equal length; got {steps.shape} and "
                         f"{cka.shape}")
    if steps.size and np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    with np.errstate(invalid="ignore"):
        ok = cka >= threshold  # NaN -> False
    if not ok.size or not ok[-1]:
        return math.nan
    below = np.flatnonzero(~ok)
    return float(steps[below[-1] + 1] if below.size else steps[0])


def area_above(steps: Sequence[int], cka: Sequence[float], final_step: int) -> float:
    """Trapezoid area under ``1 - cka`` over ``steps / final_step``; NaN if any CKA is NaN."""
    x = np.asarray(steps, dtype=np.float64) / float(final_step)
    y = 1.0 - np.asarray(cka, dtype=np.float64)
    if not np.isfinite(y).all():
        return math.nan
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def run_outcomes(metrics: pd.DataFrame, losses: pd.DataFrame, *, threshold: float,
                 estimator: str = "debiased") -> pd.DataFrame:
    """Outcome measures of one run: one row per (component, layer), columns :data:`MEASURES`.

    ``metrics``: the run's per-step table (component, layer, step, cka, cka_debiased,
    per_weight, per_grad, loss); ``losses``: its per-update table (step, train_loss).
    """
    if estimator not in CKA_COLUMNS:
        raise ValueError(f"cka estimator {estimator!r}: allowed {', '.join(CKA_COLUMNS)}")
    column = CKA_COLUMNS[estimator]
    final = int(metrics["step"].max())
    train_loss = float(np.mean(losses.sort_values("step")["train_loss"].to_numpy()
                               [-FINAL_LOSS_WINDOW:]))
    rows = []
    for (comp, layer), g in metrics.sort_values("step").groupby(["component", "layer"],
                                                                sort=True):
        steps, cka = g["step"].to_numpy(), g[column].to_numpy()
        later = g["step"] > 0
        rows.append({
            "component": comp, "layer": int(layer),
            "convergence_step": convergence_step(steps, cka, threshold),
            "auc": area_above(steps, cka, final),
            "per_weight": float(g.loc[later, "per_weight"].mean(skipna=False)),
            "per_grad": float(g.loc[later, "per_grad"].mean(skipna=False)),
            "train_loss": train_loss,
            "eval_loss": float(g.loc[g["step"] == final, "loss"].iloc[0]),
        })
    return pd.DataFrame(rows)


def _paired(outcomes: pd.DataFrame, variant: str, baseline: str) -> pd.DataFrame:
    """Per-seed differences variant - baseline over the cells both have (seed-paired)."""
    cell = ["size", "component", "layer", "seed"]
    v = outcomes[outcomes["variant"] == variant].set_index(cell)[list(MEASURES)]
    b = outcomes[outcomes["variant"] == baseline].set_index(cell)[list(MEASURES)]
    common = v.index.intersection(b.index)
    return (v.loc[common] - b.loc[common]).reset_index()


def _interval(diffs: np.ndarray, weights: np.ndarray, level: float) -> tuple[float, float]:
    """Percentile interval of the resampled means of ``diffs`` (n_seeds,); NaN-aware: a NaN
    difference (a layer that never converged in one arm) makes the resamples with it NaN."""
    if weights.shape[0] == 0:
        return math.nan, math.nan
    with np.errstate(invalid="ignore"):
        means = weights @ np.where(np.isfinite(diffs), diffs, np.nan) / weights.sum(axis=1)
    return percentile_interval(means, level)


def effects(outcomes: pd.DataFrame, *, baseline: str = "baseline", samples: int = 2000,
            level: float = 0.9, seed: int = 0) -> pd.DataFrame:
    """Effect of every variant on every measure, per (size, component, layer).

    Returns long format: variant, size, component, layer, measure, baseline (mean over
    seeds), value (the variant's mean), effect (mean paired difference), low, high (the
    bootstrap interval at ``level``), n_seeds. Raises ValueError when ``baseline`` has no
    runs.
    """
    if baseline not in set(outcomes["variant"]):
        raise ValueError(f"no runs of the baseline variant {baseline!r}; the effects are "
                         "differences to it: add it to interventions.variants")
    rows = []
    for variant in sorted(set(outcomes["variant"]) - {baseline}):
        diffs = _paired(outcomes, variant, baseline)
        for (size, comp, layer), g in diffs.groupby(["size", "component", "layer"],
                                                    sort=True):
            g = g.sort_values("seed")
            n = len(g)
            w = bootstrap_weights(n, samples, seed)
            sel = (outcomes["size"] == size) & (outcomes["component"] == comp) & \
                (outcomes["layer"] == layer) & outcomes["seed"].isin(g["seed"])
            for measure in MEASURES:
                d = g[measure].to_numpy(dtype=np.float64)
                lo, hi = _interval(d, w, level)
                means = outcomes[sel].groupby("variant")[measure].mean()
                rows.append({"variant": variant, "size": size, "component": comp,
                             "layer": int(layer), "measure": measure,
                             "baseline": float(means.get(baseline, math.nan)),
                             "value": float(means.get(variant, math.nan)),
                             "effect": float(np.mean(d)) if np.isfinite(d).all() else math.nan,
                             "low": lo, "high": hi, "n_seeds": n})
    return pd.DataFrame(rows)


def summary_effects(outcomes: pd.DataFrame, *, baseline: str = "baseline",
                    samples: int = 2000, level: float = 0.9, seed: int = 0) -> pd.DataFrame:
    """Each variant's effect pooled over every size, component and layer.

    Per seed, the mean over cells of the paired differences; then mean and bootstrap
    interval over seeds, as in :func:`effects`. Columns: variant, measure, effect, low, high,
    n_seeds, n_cells.
    """
    rows = []
    for variant in sorted(set(outcomes["variant"]) - {baseline}):
        diffs = _paired(outcomes, variant, baseline)
        per_seed = diffs.groupby("seed")[list(MEASURES)].mean()  # NaN-skipping over cells
        w = bootstrap_weights(len(per_seed), samples, seed)
        n_cells = int(diffs.groupby("seed").size().max()) if len(diffs) else 0
        for measure in MEASURES:
            d = per_seed[measure].to_numpy(dtype=np.float64)
            lo, hi = _interval(d, w, level)
            rows.append({"variant": variant, "measure": measure,
                         "effect": float(np.mean(d)) if np.isfinite(d).all() else math.nan,
                         "low": lo, "high": hi, "n_seeds": len(per_seed), "n_cells": n_cells})
    return pd.DataFrame(rows)

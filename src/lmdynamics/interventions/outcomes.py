"""Outcome measures of each run, its within-run contrast, and the effects of each contrast.

Per (run, component, layer), from a run's per-step table
(:func:`lmdynamics.interventions.run.analyse_states`; the last analysed step is the
reference step, before any cooldown):

- ``crossing_step``: when CKA to the reference step rises for good to ``threshold``,
  linearly interpolated between the two analysed steps around the last crossing
  (:func:`crossing_step`): a continuous outcome, not the analysed step after it;
- ``crossing_loss``: the eval loss (nats/token) at the crossing step, interpolated the same
  way: *how far the run had learned* when the layer settled, so that "converges sooner" can be
  told from "the whole run learns faster" (a loss-matched outcome);
- ``area``: area under 1 - CKA over the fraction of the steps up to the reference
  (:func:`area_above`): the mean distance from the reference representation;
- ``per_weight``, ``per_grad``: PER of the write matrix and of its gradient, averaged over
  the analysed steps after step 0 (gradients: the steps that have them);
- run-wide: ``train_loss`` (mean language-model loss of the
  :data:`~lmdynamics.interventions.run.FINAL_LOSS_WINDOW` updates before the reference
  step), ``eval_loss`` (eval batch at the reference step).

Within-run contrast (:func:`run_contrasts`): the targeted layer against the other layers of
the same component in the same run (the control layers): ``did_<m> = <m>(target) -
mean(<m>(controls))`` for each layer measure, plus ``target_<m>`` and ``control_<m>``. A seed
that makes the whole run converge late moves target and controls alike and cancels.

Effects (:func:`contrast_effects`): for each configured contrast ``treatment`` vs
``control`` (two variants), per seed the difference of a run measure between the two runs of
that seed (same initialisation and data order), so a difference-in-differences for the
``did_`` measures; their mean, a percentile bootstrap interval over seeds, the exact
sign-flip test (:func:`lmdynamics.estimators.paired.sign_flip_test`) and the smallest effect
the design could detect (:func:`lmdynamics.estimators.paired.minimum_detectable_effect`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from lmdynamics.estimators.bootstrap import bootstrap_weights, percentile_interval
from lmdynamics.estimators.paired import minimum_detectable_effect, sign_flip_test

from .run import FINAL_LOSS_WINDOW

__all__ = ["CKA_COLUMNS", "LAYER_MEASURES", "RUN_MEASURES", "area_above", "contrast_effects",
           "crossing_step", "run_contrasts", "run_outcomes"]

#: Measures of each (run, component, layer); units: steps, nats/token, fraction of training
#: x CKA, dimensionless PER.
LAYER_MEASURES = ("crossing_step", "crossing_loss", "area", "per_weight", "per_grad")
#: Measures of a run as a whole (nats/token).
RUN_WIDE = ("train_loss", "eval_loss")
#: The per-run measures a contrast compares (columns of :func:`run_contrasts`), in order.
RUN_MEASURES = (*(f"did_{m}" for m in LAYER_MEASURES),
                *(f"{side}_{m}" for m in LAYER_MEASURES for side in ("target", "control")),
                *RUN_WIDE)
#: The CKA estimators a study may choose (columns of a run's table).
CKA_COLUMNS = {"biased": "cka", "debiased": "cka_debiased"}


def _check_steps(steps: np.ndarray, values: np.ndarray) -> None:
    if steps.shape != values.shape or steps.ndim != 1:
        raise ValueError(f"steps and values must be 1-D of equal length; got {steps.shape} "
                         f"and {values.shape}")
    if steps.size and np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")


def crossing_step(steps: Sequence[int], cka: Sequence[float], threshold: float) -> float:
    """When ``cka`` rises for good to ``threshold``, interpolated linearly.

    ``steps`` ascending, ``cka`` the same length. With ``i`` the last index below the
    threshold (NaN counts as below: an undefined CKA is never taken for converged), the
    crossing is ``steps[i] + (threshold - cka[i]) / (cka[i+1] - cka[i]) * (steps[i+1] -
    steps[i])`` (``steps[i+1]`` when ``cka[i]`` is NaN); ``steps[0]`` when no value is below;
    NaN when the last value is below (or NaN).
    """
    steps, cka = np.asarray(steps, dtype=np.float64), np.asarray(cka, dtype=np.float64)
    _check_steps(steps, cka)
    with np.errstate(invalid="ignore"):
        ok = cka >= threshold  # NaN -> False
    if not ok.size or not ok[-1]:
        return math.nan
    below = np.flatnonzero(~ok)
    if not below.size:
        return float(steps[0])
    i = below[-1]
    if not np.isfinite(cka[i]):
        return float(steps[i + 1])
    frac = (threshold - cka[i]) / (cka[i + 1] - cka[i])  # cka[i] < threshold <= cka[i+1]
    return float(steps[i] + frac * (steps[i + 1] - steps[i]))


def area_above(steps: Sequence[int], cka: Sequence[float], reference_step: int) -> float:
    """Trapezoid area under ``1 - cka`` over ``steps / reference_step``; NaN if any CKA is
    NaN."""
    x = np.asarray(steps, dtype=np.float64) / float(reference_step)
    y = 1.0 - np.asarray(cka, dtype=np.float64)
    _check_steps(x, y)
    if not np.isfinite(y).all():
        return math.nan
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2.0)


def run_outcomes(metrics: pd.DataFrame, losses: pd.DataFrame, *, threshold: float,
                 estimator: str) -> pd.DataFrame:
    """Outcome measures of one run: one row per (component, layer), columns
    :data:`LAYER_MEASURES` and the run-wide ``train_loss``, ``eval_loss``.

    ``metrics``: the run's per-step table (component, layer, step, cka, cka_debiased,
    per_weight, per_grad, loss; the last step is the reference); ``losses``: its per-update
    table (step, train_loss).
    """
    if estimator not in CKA_COLUMNS:
        raise ValueError(f"cka estimator {estimator!r}: allowed {', '.join(CKA_COLUMNS)}")
    column = CKA_COLUMNS[estimator]
    reference = int(metrics["step"].max())
    upto = losses[losses["step"] <= reference].sort_values("step")["train_loss"].to_numpy()
    train_loss = float(np.mean(upto[-FINAL_LOSS_WINDOW:]))
    rows = []
    for (comp, layer), g in metrics.sort_values("step").groupby(["component", "layer"],
                                                                sort=True):
        steps, cka = g["step"].to_numpy(), g[column].to_numpy()
        loss = g["loss"].to_numpy(dtype=np.float64)
        cross = crossing_step(steps, cka, threshold)
        later = g["step"] > 0
        rows.append({
            "component": comp, "layer": int(layer),
            "crossing_step": cross,
            "crossing_loss": (float(np.interp(cross, steps, loss))
                              if math.isfinite(cross) and np.isfinite(loss).all() else math.nan),
            "area": area_above(steps, cka, reference),
            "per_weight": float(g.loc[later, "per_weight"].mean(skipna=False)),
            "per_grad": float(g.loc[later, "per_grad"].mean(skipna=True)),
            "train_loss": train_loss,
            "eval_loss": float(loss[-1]),
        })
    return pd.DataFrame(rows)


def run_contrasts(outcomes: pd.DataFrame, *, component: str, layer: int) -> dict[str, float]:
    """The within-run contrast of one run's outcomes (rows of :func:`run_outcomes`): for
    each layer measure ``m``, ``target_m`` (the targeted layer), ``control_m`` (the mean over
    the other layers of ``component``) and ``did_m`` = their difference; the run-wide
    measures as they are. Keys: :data:`RUN_MEASURES`. Raises ValueError when the run has no
    such layer or no other layer of the component."""
    same = outcomes[outcomes["component"] == component]
    target = same[same["layer"] == layer]
    controls = same[same["layer"] != layer]
    if target.empty or controls.empty:
        raise ValueError(f"interventions.target: {component} layer {layer} needs that layer "
                         f"and at least one other {component} layer as control; the run has "
                         f"layers {sorted(same['layer'])}")
    out: dict[str, float] = {}
    for m in LAYER_MEASURES:
        t = float(target[m].iloc[0])
        c = float(controls[m].mean(skipna=False))
        out |= {f"target_{m}": t, f"control_{m}": c, f"did_{m}": t - c}
    for m in RUN_WIDE:
        out[m] = float(outcomes[m].iloc[0])
    return {k: out[k] for k in RUN_MEASURES}


def _paired(runs: pd.DataFrame, treatment: str, control: str, measure: str,
            size: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeds both variants have, with the treatment's and the control's values there."""
    sel = runs[runs["size"] == size]
    t = sel[sel["variant"] == treatment].set_index("seed")[measure]
    c = sel[sel["variant"] == control].set_index("seed")[measure]
    seeds = np.array(sorted(set(t.index) & set(c.index)))
    if not seeds.size:
        return seeds, np.empty(0), np.empty(0)
    return (seeds, t.loc[seeds].to_numpy(dtype=np.float64),
            c.loc[seeds].to_numpy(dtype=np.float64))


def contrast_effects(runs: pd.DataFrame, contrasts: Mapping[str, Mapping[str, str]], *,
                     alpha: float, power: float, samples: int, level: float,
                     seed: int = 0) -> pd.DataFrame:
    """Effect of every contrast on every measure of :data:`RUN_MEASURES`, per size.

    ``runs``: one row per run (variant, size, seed and the measures of
    :func:`run_contrasts`); ``contrasts``: name -> {treatment, control} (variant names).
    Returns long format: contrast, treatment, control, size, measure, n_seeds (seeds with both
    runs and a finite difference), n_undefined (seeds with both runs whose difference is NaN,
    left out), treatment_mean, control_mean, effect (mean paired difference), sd (of the
    differences), low, high (percentile bootstrap interval over seeds at ``level``),
    p_value (exact sign-flip test, two-sided), min_p (the smallest p-value the design can
    give), mde (smallest effect detectable at ``alpha`` with ``power``, paired t-test at the
    observed sd).
    """
    rows = []
    for name, c in contrasts.items():
        for size in sorted(set(runs["size"])):
            for measure in RUN_MEASURES:
                seeds, t, k = _paired(runs, c["treatment"], c["control"], measure, size)
                d = t - k
                finite = np.isfinite(d)
                d = d[finite]
                n = d.size
                test = sign_flip_test(d)
                sd = float(np.std(d, ddof=1)) if n > 1 else math.nan
                if n:
                    lo, hi = percentile_interval(bootstrap_weights(n, samples, seed) @ d / n,
                                                 level)
                else:
                    lo = hi = math.nan
                rows.append({
                    "contrast": name, "treatment": c["treatment"], "control": c["control"],
                    "size": size, "measure": measure, "n_seeds": n,
                    "n_undefined": int((~finite).sum()),
                    "treatment_mean": float(np.mean(t[finite])) if n else math.nan,
                    "control_mean": float(np.mean(k[finite])) if n else math.nan,
                    "effect": test.mean, "sd": sd, "low": lo, "high": hi,
                    "p_value": test.p_value if n else math.nan, "min_p": test.min_p,
                    "mde": minimum_detectable_effect(sd, n, alpha=alpha, power=power)})
    return pd.DataFrame(rows)

"""Paper Table 1: Matthews correlation between early convergence and large PER, per size.

For each size and component, every layer gets two binary labels:

- *early convergence*: CKA (of that component) >= ``cka_threshold`` at the step nearest to
  ``early_fraction * final_step`` (ties go to the later step);
- *large PER*: for weights, PER >= ``per_weight_threshold`` at the final step; for gradients,
  PER >= ``per_grad_fraction`` x the largest layer PER of that size and component at the final
  step.

The table holds the Matthews correlation (phi coefficient) of the two labels over the layers of
the size (layers that are NaN in either input are dropped). When either label puts every layer
in one class the coefficient is undefined: NaN with the reason in ``undefined_reason``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.metrics import matthews_corrcoef, mcc_undefined_reason
from lmdynamics.store import write_text_atomic

COLUMNS: tuple[tuple[str, str, str], ...] = (
    # (label, component, parameter)
    ("θ_att", "attention", "weights"),
    ("∇θ_att", "attention", "gradients"),
    ("θ_mlp", "mlp", "weights"),
    ("∇θ_mlp", "mlp", "gradients"),
)
TABLE_COLUMNS: tuple[str, ...] = (
    "size", "n_params", "component", "parameter", "label", "early_step", "n_layers",
    "n_early", "n_large", "mcc", "undefined_reason",
)
_VARIABLE = {"weights": "per_weight", "gradients": "per_grad"}


def _check_range(name: str, value: float, *, low_open: bool) -> float:
    """Return ``value`` if in [0, 1] (or (0, 1] with ``low_open``), else raise ValueError."""
    ok = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not ok:  # also catches NaN
        allowed = "(0, 1]" if low_open else "[0, 1]"
        raise ValueError(f"{name}={value!r} is outside the allowed range {allowed}")
    return float(value)


def early_step(steps: np.ndarray, final_step: int, early_fraction: float) -> int:
    """The step in ``steps`` nearest to ``early_fraction * final_step``; ties -> the later step.

    >>> early_step(np.array([0, 1000, 3000, 13000, 23000]), 143000, 0.1)
    13000
    """
    steps = np.sort(np.asarray(steps, dtype=np.int64))
    if steps.size == 0:
        raise ValueError("no steps to choose the early step from")
    target = early_fraction * final_step
    distance = np.abs(steps - target)
    nearest = np.flatnonzero(distance == distance.min())
    return int(steps[nearest[-1]])


def final_step(ds: xr.Dataset) -> int:
    """Final training step (``ds.attrs["final_step"]``); it must be a ``step`` coordinate."""
    steps = ds["step"].to_numpy()
    step = int(ds.attrs.get("final_step", steps.max()))
    if step not in set(steps.tolist()):
        raise ValueError(f"final_step {step} is not among the dataset steps")
    return step


def layer_labels(
    cka: np.ndarray, per: np.ndarray, *, parameter: str, cka_threshold: float,
    per_weight_threshold: float, per_grad_fraction: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels (early, large) for layers with finite inputs; each shape (n_layers,).

    ``cka``: CKA at the early step, shape (layer,); ``per``: PER at the final step, shape
    (layer,). Layers NaN in either are dropped before thresholds are computed.
    """
    keep = np.isfinite(cka) & np.isfinite(per)
    cka, per = cka[keep], per[keep]
    early = cka >= cka_threshold
    if parameter == "weights":
        large = per >= per_weight_threshold
    elif parameter == "gradients":
        large = per >= per_grad_fraction * per.max() if per.size else per.astype(bool)
    else:
        raise ValueError(f"unknown parameter {parameter!r}; allowed: weights, gradients")
    return early, large


def mcc_table(
    ds: xr.Dataset, *, cka_threshold: float = 0.45, early_fraction: float = 0.1,
    per_weight_threshold: float = 0.95, per_grad_fraction: float = 0.9,
) -> pd.DataFrame:
    """Table 1 in long form: one row per (size, column θ_att, ∇θ_att, θ_mlp, ∇θ_mlp).

    ``ds``: combined metrics dataset with ``cka``, ``per_weight``, ``per_grad`` (size,
    component, layer, step). Returns columns :data:`TABLE_COLUMNS`; ``mcc`` is NaN when
    undefined, with ``undefined_reason`` saying why (else None). The thresholds are stored in
    ``df.attrs["thresholds"]`` for :func:`write_mcc_table`.
    """
    _check_range("cka_threshold", cka_threshold, low_open=False)
    _check_range("per_weight_threshold", per_weight_threshold, low_open=False)
    _check_range("early_fraction", early_fraction, low_open=True)
    _check_range("per_grad_fraction", per_grad_fraction, low_open=True)
    missing = [v for v in ("cka", "per_weight", "per_grad") if v not in ds]
    if missing:
        raise ValueError(f"dataset lacks variable(s) {missing}")
    last = final_step(ds)
    early = early_step(ds["step"].to_numpy(), last, early_fraction)
    rows = []
    for size in ds["size"].to_numpy():
        n_params = int(ds["n_params"].sel(size=size)) if "n_params" in ds.coords else None
        for label, component, parameter in COLUMNS:
            cka = ds["cka"].sel(size=size, component=component, step=early).to_numpy()
            per = ds[_VARIABLE[parameter]].sel(size=size, component=component, step=last)
            is_early, is_large = layer_labels(
                cka, per.to_numpy(), parameter=parameter, cka_threshold=cka_threshold,
                per_weight_threshold=per_weight_threshold, per_grad_fraction=per_grad_fraction,
            )
            reason = mcc_undefined_reason(
                is_early, is_large, a_name="early convergence", b_name=f"large PER ({parameter})"
            )
            mcc = float("nan") if reason else float(matthews_corrcoef(is_early, is_large))
            rows.append({
                "size": str(size), "n_params": n_params, "component": component,
                "parameter": parameter, "label": label, "early_step": early,
                "n_layers": int(is_early.size), "n_early": int(is_early.sum()),
                "n_large": int(is_large.sum()), "mcc": mcc, "undefined_reason": reason,
            })
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    df.attrs["thresholds"] = {
        "cka_threshold": cka_threshold, "early_fraction": early_fraction,
        "per_weight_threshold": per_weight_threshold, "per_grad_fraction": per_grad_fraction,
        "final_step": last,
    }
    return df


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
    """One sentence stating the thresholds and the early step(s) used in ``df``."""
    steps = ", ".join(str(int(s)) for s in sorted(set(df["early_step"])))
    if not thresholds:
        return f"Early step: {steps} (thresholds not recorded)."
    t = thresholds
    final = t.get("final_step", "final")
    cka = f"{t['cka_estimator']} CKA" if t.get("cka_estimator") else "CKA"
    return (
        f"Early convergence: {cka} ≥ {t['cka_threshold']:g} at step {steps} (nearest to "
        f"{t['early_fraction']:g} × final step {final}); large weight PER: PER ≥ "
        f"{t['per_weight_threshold']:g} at step {final}; large gradient PER: PER ≥ "
        f"{t['per_grad_fraction']:g} × the largest layer PER at step {final}."
    )


def mcc_markdown(df: pd.DataFrame, thresholds: Mapping[str, Any] | None = None) -> str:
    """Table 1 as markdown: rows sizes (with parameter count), columns θ_att ... ∇θ_mlp.

    Values to 2 decimals; NaN cells read "undefined" with a footnote giving the reason.
    """
    if thresholds is None:
        thresholds = df.attrs.get("thresholds")
    labels = [c[0] for c in COLUMNS]
    lines = [
        "**Table 1.** Matthews correlation between early activation convergence and large PER "
        "across layers.",
        "",
        header_line(df, thresholds),
        "",
        "| size | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    notes: list[str] = []
    for size in dict.fromkeys(df["size"].astype(str)):
        part = df[df["size"].astype(str) == size]
        cells = []
        for label in labels:
            row = part[part["label"] == label]
            if row.empty:
                cells.append("–")
                continue
            value = float(row["mcc"].iloc[0])
            if math.isnan(value):
                notes.append(f"[^{len(notes) + 1}]: {size} {label}: "
                             f"{row['undefined_reason'].iloc[0] or 'undefined'}")
                cells.append(f"undefined[^{len(notes)}]")
            else:
                cells.append(f"{value:.2f}")
        n_params = part["n_params"].iloc[0] if "n_params" in part else None
        lines.append(f"| {size} ({format_params(n_params)}) | " + " | ".join(cells) + " |")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def write_mcc_table(
    df: pd.DataFrame, csv_path: Path, md_path: Path, *,
    thresholds: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``df`` as CSV (unchanged) and as the paper-layout markdown; return both paths.

    ``thresholds`` defaults to ``df.attrs["thresholds"]`` (set by :func:`mcc_table`).
    """
    text = mcc_markdown(df, thresholds)
    write_text_atomic(df.to_csv(index=False), csv_path)
    write_text_atomic(text, md_path)
    return [Path(csv_path), Path(md_path)]

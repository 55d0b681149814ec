"""Tests for lmdynamics.tables: paper Table 1 (MCC between early convergence and large PER)."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lmdynamics import tables

STEPS = [0, 10, 20, 100]  # final step 100; nearest to 10 % is step 10
T, F = True, False


def hand_dataset(
    early: dict[str, list[bool]],
    per_weight: dict[str, list[float]],
    per_grad: dict[str, list[float]],
    steps: list[int] = STEPS,
    early_step: int = 10,
    size: str = "70m",
    n_layers_total: int | None = None,
) -> xr.Dataset:
    """One-size dataset: CKA 0.9/0.1 at ``early_step`` for early/late layers, 1 at the end.

    ``early``, ``per_weight``, ``per_grad`` map component -> per-layer values; PER values are
    placed at the final step (0.5 elsewhere). Extra layers up to ``n_layers_total`` are NaN.
    """
    n = len(early["attention"])
    total = n_layers_total or n
    shape = (1, 2, total, len(steps))
    cka = np.full(shape, np.nan)
    pw = np.full(shape, np.nan)
    pg = np.full(shape, np.nan)
    e = steps.index(early_step)
    for c, comp in enumerate(["attention", "mlp"]):
        cka[0, c, :n] = 0.05
        cka[0, c, :n, e] = np.where(early[comp], 0.9, 0.1)
        cka[0, c, :n, -1] = 1.0
        pw[0, c, :n] = 0.5
        pw[0, c, :n, -1] = per_weight[comp]
        pg[0, c, :n] = 0.5
        pg[0, c, :n, -1] = per_grad[comp]
    dims = ("size", "component", "layer", "step")
    return xr.Dataset(
        {"cka": (dims, cka), "per_weight": (dims, pw), "per_grad": (dims, pg)},
        coords={"size": [size], "component": ["attention", "mlp"], "layer": np.arange(total),
                "step": steps, "n_params": ("size", [70_426_624])},
        attrs={"final_step": steps[-1], "per_divisor": "H"},
    )


def _row(df: pd.DataFrame, label: str) -> pd.Series:
    return df[df["label"] == label].iloc[0]


def test_perfect_zero_and_undefined():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, T, T]},
        per_weight={"attention": [0.99, 0.97, 0.5, 0.6], "mlp": [0.99, 0.2, 0.99, 0.2]},
        # ∇θ_att: [T, F, T, F] vs early [T, T, F, F] -> 0
        per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]},
    )
    df = tables.mcc_table(ds)
    assert list(df.columns) == list(tables.TABLE_COLUMNS)
    assert list(df["label"]) == ["θ_att", "∇θ_att", "θ_mlp", "∇θ_mlp"]
    assert _row(df, "θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(df, "∇θ_att")["mcc"] == pytest.approx(0.0)
    for label in ("θ_mlp", "∇θ_mlp"):  # all MLP layers early -> undefined, never 0
        row = _row(df, label)
        assert math.isnan(row["mcc"])
        assert "early" in row["undefined_reason"]
    assert pd.isna(_row(df, "θ_att")["undefined_reason"])
    row = _row(df, "θ_att")
    assert (row["n_layers"], row["n_early"], row["n_large"], row["early_step"]) == (4, 2, 2, 10)
    assert row["n_params"] == 70_426_624 and row["size"] == "70m"
    assert row["component"] == "attention" and row["parameter"] == "weights"


def test_negative_correlation_and_undefined_large():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, F, T, F]},
        per_weight={"attention": [0.5, 0.5, 0.99, 0.99], "mlp": [0.5, 0.5, 0.5, 0.5]},
        per_grad={"attention": [0.5] * 4, "mlp": [0.5] * 4},
    )
    df = tables.mcc_table(ds)
    assert _row(df, "θ_att")["mcc"] == pytest.approx(-1.0)
    assert math.isnan(_row(df, "θ_mlp")["mcc"])  # no layer has large weight PER
    assert "large PER" in _row(df, "θ_mlp")["undefined_reason"]
    assert math.isnan(_row(df, "∇θ_att")["mcc"])  # every gradient PER equals the max


def test_gradient_threshold_is_relative_to_largest_layer():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99] * 2 + [0.5] * 2, "mlp": [0.99] * 2 + [0.5] * 2},
        per_grad={"attention": [0.5, 0.46, 0.44, 0.2], "mlp": [0.05, 0.046, 0.044, 0.02]},
    )
    df = tables.mcc_table(ds)  # threshold 0.9 x max -> [T, T, F, F] at any scale
    assert _row(df, "∇θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(df, "∇θ_mlp")["mcc"] == pytest.approx(1.0)
    assert _row(df, "∇θ_att")["n_large"] == 2
    df = tables.mcc_table(ds, per_grad_fraction=0.8)  # -> [T, T, T, F]
    assert _row(df, "∇θ_att")["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_nan_layers_are_dropped():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
        n_layers_total=7,
    )
    df = tables.mcc_table(ds)
    assert (df["n_layers"] == 4).all()
    assert np.allclose(df["mcc"], 1.0)


def test_early_step_selection():
    pythia = [0, *[2**i for i in range(10)], 1000, 3000, *range(13000, 143001, 10000)]
    assert 143000 in pythia
    assert tables.early_step(np.array(pythia), 143000, 0.1) == 13000
    assert tables.early_step(np.array([0, 5, 15, 100]), 100, 0.1) == 15  # tie -> later
    assert tables.early_step(np.array([15, 0, 5, 100]), 100, 0.1) == 15  # order-independent
    assert tables.early_step(np.array([0, 9, 12, 100]), 100, 0.1) == 9
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99] * 4, "mlp": [0.99] * 4},
        per_grad={"attention": [0.5] * 4, "mlp": [0.5] * 4},
        steps=[0, 5, 15, 100], early_step=15,
    )
    df = tables.mcc_table(ds)
    assert (df["early_step"] == 15).all()
    assert (df["n_early"] == 2).all()


@pytest.mark.parametrize(
    ("arg", "value", "allowed"),
    [("cka_threshold", 1.5, "[0, 1]"), ("per_weight_threshold", -0.1, "[0, 1]"),
     ("early_fraction", 0.0, "(0, 1]"), ("per_grad_fraction", 1.2, "(0, 1]"),
     ("cka_threshold", float("nan"), "[0, 1]")],
)
def test_threshold_validation(arg, value, allowed):
    ds = hand_dataset(
        early={"attention": [T, F], "mlp": [T, F]},
        per_weight={"attention": [0.99, 0.5], "mlp": [0.99, 0.5]},
        per_grad={"attention": [0.5, 0.1], "mlp": [0.5, 0.1]},
    )
    with pytest.raises(ValueError, match=re.escape(f"{arg}={value!r}") + ".*" + re.escape(allowed)):
        tables.mcc_table(ds, **{arg: value})


def test_write_mcc_table(tmp_path):
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, T, T]},
        per_weight={"attention": [0.99, 0.97, 0.5, 0.6], "mlp": [0.99, 0.2, 0.99, 0.2]},
        per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]},
    )
    df = tables.mcc_table(ds)
    csv, md = tmp_path / "tables" / "mcc.csv", tmp_path / "tables" / "mcc.md"
    assert tables.write_mcc_table(df, csv, md) == [csv, md]
    back = pd.read_csv(csv)
    assert list(back.columns) == list(tables.TABLE_COLUMNS)
    assert len(back) == 4 and back["mcc"].isna().sum() == 2
    text = md.read_text(encoding="utf-8")
    assert "| size | θ_att | ∇θ_att | θ_mlp | ∇θ_mlp |" in text
    assert "| 70m (70.4M) | 1.00 | 0.00 | undefined[^1] | undefined[^2] |" in text
    assert "[^1]: 70m θ_mlp:" in text and "early" in text.split("[^1]:")[-1]
    assert "CKA ≥ 0.45 at step 10" in text and "PER ≥ 0.95" in text and "0.9 ×" in text
    assert sorted(p.name for p in csv.parent.iterdir()) == ["mcc.csv", "mcc.md"]  # no tmp


def test_markdown_without_recorded_thresholds():
    df = pd.DataFrame([{
        "size": "42k", "n_params": 42_000, "component": "attention", "parameter": "weights",
        "label": "θ_att", "early_step": 50, "n_layers": 2, "n_early": 1, "n_large": 1,
        "mcc": 0.5, "undefined_reason": None,
    }])
    text = tables.mcc_markdown(df)
    assert "| 42k (42.0k) | 0.50 | – | – | – |" in text and "50" in text

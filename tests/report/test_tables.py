"""Tests for lmdynamics.report.tables: paper Table 1 (MCC between early convergence and
large PER)."""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lmdynamics.report import tables

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
        {"cka": (dims, cka), "per_weight": (dims, pw), "per_grad": (dims, pg),
         # the default per_quantity (per_normalized) with a random-matrix PER of 1
         "per_weight_normalized": (dims, pw.copy()), "per_grad_normalized": (dims, pg.copy())},
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
    for rule in tables.EARLY_STEP_RULES:  # 13000 is both before and nearest 14300
        assert tables.early_step(np.array(pythia), 143000, 0.1, rule) == 13000
    near = functools.partial(tables.early_step, rule="nearest")
    assert near(np.array([0, 5, 15, 100]), 100, 0.1) == 15  # tie -> later
    assert near(np.array([15, 0, 5, 100]), 100, 0.1) == 15  # order-independent
    assert near(np.array([0, 9, 12, 100]), 100, 0.1) == 9
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99] * 4, "mlp": [0.99] * 4},
        per_grad={"attention": [0.5] * 4, "mlp": [0.5] * 4},
        steps=[0, 5, 15, 100], early_step=15,
    )
    df = tables.mcc_table(ds, early_step="nearest")
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
    assert "CKA ≥ 0.45 at step 10" in text and "weights ≥ 0.95" in text
    assert "gradients ≥ 0.9 × the largest layer value within the component" in text
    assert "at or before 0.1 × final step 100" in text and "(`per_normalized`)" in text
    assert "No intervals" in text and " [" not in text.split("| 70m")[1].split("\n")[0]
    assert sorted(p.name for p in csv.parent.iterdir()) == ["mcc.csv", "mcc.md"]  # no tmp


def test_markdown_without_recorded_thresholds():
    df = pd.DataFrame([{
        "size": "42k", "n_params": 42_000, "component": "attention", "parameter": "weights",
        "label": "θ_att", "early_step": 50, "n_layers": 2, "n_early": 1, "n_large": 1,
        "mcc": 0.5, "undefined_reason": None,
    }])
    text = tables.mcc_markdown(df)
    assert "| 42k (42.0k) | 0.50 | – | – | – |" in text and "50" in text


# --------------------------------------------------------------------- issue 18 definitions


def test_early_step_at_or_before_boundaries():
    steps = np.array([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512])
    assert tables.early_step(steps, 512, 0.1) == 32  # 51.2: the last step by 10 %
    assert tables.early_step(steps, 512, 0.1, "nearest") == 64  # 12.5 % of training
    assert tables.early_step(steps, 512, 0.125) == 64  # exactly at the target: included
    assert tables.early_step(steps, 512, 63.99 / 512) == 32  # just below it: not
    assert tables.early_step(steps, 512, 1.0) == 512
    assert tables.early_step(np.array([0, 29, 30, 100]), 100, 0.29) == 29  # 28.999999999999996
    with pytest.raises(ValueError, match="no analysed step is at or before"):
        tables.early_step(np.array([40, 100]), 100, 0.1)
    with pytest.raises(ValueError, match="early_step='latest'"):
        tables.early_step(steps, 512, 0.1, "latest")


def test_default_early_step_is_at_or_before():
    # CKA 0.9/0.1 at step 5 (the last step by 10 % of 100) and 0.05 at 15, the nearest
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, F, T, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
        steps=[0, 5, 15, 100], early_step=5,
    )
    df = tables.mcc_table(ds)
    assert (df["early_step"] == 5).all()
    assert _row(df, "θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(df, "θ_mlp")["mcc"] == pytest.approx(0.0)
    nearest = tables.mcc_table(ds, early_step="nearest")
    assert (nearest["early_step"] == 15).all() and nearest["mcc"].isna().all()
    assert "no layer has early convergence" in nearest["undefined_reason"].iloc[0]


def test_per_quantity_picks_the_variable():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.80, 0.78, 0.6, 0.6], "mlp": [0.9, 0.9, 0.8, 0.8]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )
    # a random square matrix has PER 0.8, a D x 4D one 0.966: normalised, layers 0-1 are large
    ds["per_weight_normalized"] = ds["per_weight"] / xr.DataArray([0.8, 0.92],
                                                                  dims="component")
    ds["per_weight_head_dim"] = ds["per_weight"] * 0 + 0.99
    ds["per_grad_head_dim"] = ds["per_grad"]
    absolute = functools.partial(tables.mcc_table, weight_threshold="absolute")
    raw = absolute(ds, per_quantity="per")
    assert raw.query("parameter == 'weights'")["mcc"].isna().all()  # 0.95 unreachable
    norm = absolute(ds)  # 0.80 / 0.8 = 1.0, 0.78 / 0.8 = 0.975, 0.6 / 0.8 = 0.75
    assert _row(norm, "θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(norm, "θ_mlp")["mcc"] == pytest.approx(1.0)  # 0.9 / 0.92 = 0.978
    head = absolute(ds, per_quantity="per_head_dim")
    assert "all 4 layers have large PER" in _row(head, "θ_att")["undefined_reason"]
    with pytest.raises(ValueError, match="lacks variable.*per_weight_head_dim"):
        tables.mcc_table(ds.drop_vars("per_weight_head_dim"), per_quantity="per_head_dim")
    with pytest.raises(ValueError, match="per_quantity='rank'.*per_normalized"):
        tables.mcc_table(ds, per_quantity="rank")


def test_relative_weight_threshold():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.66, 0.63, 0.6, 0.59], "mlp": [0.9, 0.9, 0.8, 0.8]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )
    df = tables.mcc_table(ds)  # default: >= 0.95 x the largest (0.627 and 0.855)
    assert _row(df, "θ_att")["mcc"] == pytest.approx(1.0)  # [T, T, F, F]
    assert _row(df, "θ_mlp")["mcc"] == pytest.approx(1.0)
    assert "no layer has large PER" in tables.mcc_table(
        ds, weight_threshold="absolute").query("label == 'θ_att'")["undefined_reason"].iloc[0]
    loose = tables.mcc_table(ds, per_weight_threshold=0.9)  # >= 0.594: [T, T, T, F]
    assert _row(loose, "θ_att")["mcc"] == pytest.approx(1 / math.sqrt(3))
    ds["per_weight_normalized"] = ds["per_weight"] / xr.DataArray([0.8, 0.966], dims="component")
    model = tables.mcc_table(ds, reference="model")  # largest: 0.9 / 0.966 = 0.932 -> 0.885
    assert "no layer has large PER" in _row(model, "θ_att")["undefined_reason"]  # <= 0.825
    assert _row(model, "θ_mlp")["mcc"] == pytest.approx(1.0)  # 0.932, 0.932 | 0.828, 0.828
    assert _row(tables.mcc_table(ds), "θ_att")["mcc"] == pytest.approx(1.0)  # ratio-free


def test_strict_comparison_at_the_thresholds():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.95, 0.95, 0.5, 0.5], "mlp": [0.99, 0.95, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.45, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )
    ds["cka"].loc[{"component": "attention", "step": 10, "layer": 1}] = 0.45
    # layer 1: CKA 0.45 early, PER 0.95 large, gradient 0.45 = 0.9 x 0.5 large
    at_least = tables.mcc_table(ds, weight_threshold="absolute")
    assert _row(at_least, "θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(at_least, "∇θ_att")["mcc"] == pytest.approx(1.0)
    greater = tables.mcc_table(ds, comparison="greater", weight_threshold="absolute")
    # attention layer 1 is no longer early, and no attention weight PER is > 0.95
    assert "no layer has large PER" in _row(greater, "θ_att")["undefined_reason"]
    # gradients: early [T, F, F, F], large (> 0.45) [T, F, F, F]
    assert _row(greater, "∇θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(greater, "∇θ_att")["n_early"] == 1
    # MLP weights: early [T, T, F, F], large (> 0.95) [T, F, F, F] -> 1 / sqrt(3)
    assert _row(greater, "θ_mlp")["mcc"] == pytest.approx(1 / math.sqrt(3))


def test_gradient_reference_within_component_or_model():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.45, 0.3, 0.3], "mlp": [0.9, 0.85, 0.8, 0.2]},
    )
    component = tables.mcc_table(ds)  # att: >= 0.45 -> [T, T, F, F]; mlp >= 0.81 [T,T,F,F]
    assert _row(component, "∇θ_att")["mcc"] == pytest.approx(1.0)
    assert _row(component, "∇θ_mlp")["mcc"] == pytest.approx(1.0)
    model = tables.mcc_table(ds, reference="model")  # >= 0.81 for both components
    assert "no layer has large PER" in _row(model, "∇θ_att")["undefined_reason"]
    assert _row(model, "∇θ_mlp")["mcc"] == pytest.approx(1.0)


def with_resamples(ds: xr.Dataset, resamples: dict[str, np.ndarray]) -> xr.Dataset:
    """Add ``cka_resamples`` (size, component, layer, step, resample): the point CKA at every
    step but ``early_step``'s values replaced per component by ``resamples`` (layer, R)."""
    n_res = next(iter(resamples.values())).shape[-1]
    values = np.repeat(ds["cka"].to_numpy()[..., None], n_res, axis=-1)
    e = int(np.flatnonzero(ds["step"].to_numpy() == 10)[0])
    for c, comp in enumerate(ds["component"].to_numpy()):
        values[0, c, : resamples[comp].shape[0], e] = resamples[comp]
    dims = ("size", "component", "layer", "step", "resample")
    return ds.assign(cka_resamples=(dims, values)).assign_attrs(bootstrap_level=0.9)


def test_mcc_intervals_by_hand():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )
    point = np.array([0.9, 0.9, 0.1, 0.1])[:, None]
    att = np.repeat(point, 100, axis=1)
    att[2, :30] = 0.5  # 30 resamples: layer 2 early -> labels [T,T,T,F] vs [T,T,F,F]: 1/sqrt3
    att[1, 30:40] = 0.2  # 10 resamples: layer 1 late -> [T,F,F,F]: 1/sqrt3 too
    mlp = np.repeat(point, 100, axis=1)
    mlp[:2, :60] = 0.2  # 60 resamples: no layer early -> undefined
    df = tables.mcc_table(with_resamples(ds, {"attention": att, "mlp": mlp}))
    row = _row(df, "θ_att")
    assert row["mcc"] == pytest.approx(1.0)
    assert row["mcc_low"] == pytest.approx(1 / math.sqrt(3))  # 40 % of resamples
    assert row["mcc_high"] == pytest.approx(1.0)
    assert row["resamples_undefined"] == 0.0 and not row["interval_spans_zero"]
    mlp_row = _row(df, "θ_mlp")  # more than half of the resamples undefined: no interval
    assert mlp_row["mcc"] == pytest.approx(1.0) and math.isnan(mlp_row["mcc_low"])
    assert mlp_row["resamples_undefined"] == pytest.approx(0.6)
    text = tables.mcc_markdown(df)
    assert "1.00 [0.58, 1.00]" in text and "no interval: 60% of resamples undefined" in text
    assert "90% percentile interval" in text


def test_mcc_intervals_cover_the_point_estimate_and_mark_zero():
    rng = np.random.default_rng(5)
    n_layers = 12
    early = {"attention": list(rng.random(n_layers) < 0.5), "mlp": [T, F] * 6}
    ds = hand_dataset(
        early=early,
        per_weight={c: list(rng.uniform(0.8, 1.0, n_layers)) for c in ("attention", "mlp")},
        per_grad={c: list(rng.uniform(0.3, 0.5, n_layers)) for c in ("attention", "mlp")},
    )
    cka_early = {c: rng.uniform(0.3, 0.6, n_layers) for c in ("attention", "mlp")}
    for comp, values in cka_early.items():
        ds["cka"].loc[{"component": comp, "step": 10}] = values
    noisy = {c: v[:, None] + rng.normal(0, 0.03, (n_layers, 500)) for c, v in cka_early.items()}
    df = tables.mcc_table(with_resamples(ds, noisy))
    assert df["mcc"].notna().all() and df["mcc_low"].notna().all()
    assert (df["mcc_low"] <= df["mcc"]).all() and (df["mcc"] <= df["mcc_high"]).all()
    assert (df["mcc_low"] < df["mcc_high"]).any()  # the noise moves some cells
    spans = (df["mcc_low"] <= 0) & (df["mcc_high"] >= 0)
    assert (df["interval_spans_zero"] == spans).all() and spans.any()
    text = tables.mcc_markdown(df)
    assert text.count("]†") == int(spans.sum())


def test_sensitivity_grid_matches_the_table():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, T, F]},
        per_weight={"attention": [0.99, 0.97, 0.5, 0.6], "mlp": [0.99, 0.2, 0.99, 0.2]},
        per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]},
    )
    grid = tables.mcc_grid(ds)
    assert grid.dims == ("size", "column", "per_threshold", "cka_threshold")
    assert grid.sizes == {"size": 1, "column": 4, "per_threshold": 21, "cka_threshold": 17}
    for cka_t, per_t, grad_f in ((0.45, 0.95, 0.9), (0.3, 0.55, 0.5), (0.7, 1.0, 1.0)):
        df = tables.mcc_table(ds, cka_threshold=cka_t, per_weight_threshold=per_t,
                              per_grad_fraction=grad_f)
        for label, _, parameter in tables.COLUMNS:
            y = per_t if parameter == "weights" else grad_f
            got = float(grid.sel(size="70m", column=label, cka_threshold=cka_t,
                                 per_threshold=y))
            assert got == pytest.approx(_row(df, label)["mcc"], nan_ok=True)
    # CKA 0.9 / 0.1: every threshold between them gives the same labels
    assert np.unique(grid.sel(column="θ_att", per_threshold=0.95).to_numpy()).size == 1


def test_paper_code_config_reproduces_the_paper_definitions():
    """config/paper_code.yaml: biased CKA, head_dim PER, strict thresholds, nearest step."""
    import yaml

    from lmdynamics.estimators.rank import per_divisor, proportional_effective_rank

    config = yaml.safe_load((Path(__file__).parents[2] / "config/paper_code.yaml").read_text())
    assert config["metrics"]["cka_estimator"] == "biased"
    assert config["metrics"]["per_divisor"] == "head_dim" and config["metrics"]["per_truncate"]
    options = tables.MCCOptions(**config["mcc"])
    assert (options.comparison, options.early_step, options.per_quantity) == (
        "greater", "nearest", "per_head_dim")
    # head_dim PER by hand: pythia-70m's head dim is 64; keep the top 64 of 512 values
    s = np.r_[np.full(32, 2.0), np.full(32, 1.0), np.full(448, 5.0)]
    k = per_divisor("head_dim", n_singular_values=512, hidden_size=512, num_attention_heads=8)
    assert k == 64
    assert proportional_effective_rank(s, k) == pytest.approx(1.0)  # top 64: all 5.0
    s2 = np.r_[np.full(32, 2.0), np.full(480, 1.0)]  # top 64: 32 x 2, 32 x 1
    p = np.r_[np.full(32, 2 / 96), np.full(32, 1 / 96)]
    assert proportional_effective_rank(s2, k) == pytest.approx(np.exp(-np.sum(p * np.log(p)))
                                                               / 64)
    # the code's labels: CKA > 0.45 at the step nearest 10 % (15 of 0, 5, 15, 100), PER > 0.95
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.95, 0.99, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
        steps=[0, 5, 15, 100], early_step=15,
    )
    ds["cka"].loc[{"component": "attention", "step": 15, "layer": 1}] = 0.45
    ds["per_weight_head_dim"], ds["per_grad_head_dim"] = ds["per_weight"], ds["per_grad"]
    df = tables.mcc_table(ds, options)
    assert (df["early_step"] == 15).all()
    # attention: early (> 0.45) [T, F, F, F], large (> 0.95) [T, F, T, F]: 1 / sqrt(3)
    assert _row(df, "θ_att")["mcc"] == pytest.approx(1 / math.sqrt(3))
    assert np.corrcoef([1, 0, 0, 0], [1, 0, 1, 0])[0, 1] == pytest.approx(1 / math.sqrt(3))


def test_schema_enums_and_defaults_match_the_code():
    import dataclasses

    import yaml

    schema = yaml.safe_load((Path(__file__).parents[2] /
                             "workflow/schemas/config.schema.yaml").read_text())
    mcc = schema["properties"]["mcc"]["properties"]
    allowed = {"early_step": tables.EARLY_STEP_RULES, "per_quantity": tuple(tables.PER_QUANTITIES),
               "weight_threshold": tables.WEIGHT_THRESHOLDS, "reference": tables.REFERENCES,
               "comparison": tables.COMPARISONS}
    for key, values in allowed.items():
        assert tuple(mcc[key]["enum"]) == values, key
    defaults = dataclasses.asdict(tables.MCCOptions())
    assert set(mcc) == set(defaults)
    for key, value in defaults.items():
        assert mcc[key]["default"] == value, key


# --------------------------------------------------------------------- seed replicates


def _replicates(*runs: xr.Dataset) -> xr.Dataset:
    """Runs of one size stacked over ``seed`` (0, 1, ...) as ``combine_sizes`` does."""
    return xr.concat([r.expand_dims(seed=[k], axis=1) for k, r in enumerate(runs)], dim="seed")


def test_table1_over_seeds_one_row_per_seed_and_the_range_across_them(tmp_path):
    grads = {"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]}
    run0 = hand_dataset(early={"attention": [T, T, F, F], "mlp": [T, T, T, T]},
                        per_weight={"attention": [0.99, 0.97, 0.5, 0.6],
                                    "mlp": [0.99, 0.2, 0.99, 0.2]}, per_grad=grads)
    run1 = hand_dataset(early={"attention": [T, F, T, F], "mlp": [T, F, T, F]},
                        per_weight={"attention": [0.99, 0.97, 0.5, 0.6],
                                    "mlp": [0.99, 0.2, 0.99, 0.2]}, per_grad=grads)
    ds = _replicates(run0, run1)
    df = tables.mcc_table(ds)
    assert len(df) == 8 and df.groupby("seed").size().to_dict() == {0: 4, 1: 4}
    # each seed's rows are that run's own table
    for seed, run in ((0, run0), (1, run1)):
        alone = tables.mcc_table(run).drop(columns="seed")
        mine = df[df["seed"] == seed].drop(columns="seed").reset_index(drop=True)
        # reasons: pandas stores a missing one as None or NaN depending on the column's others
        reasons = [(m if isinstance(m, str) else None, a if isinstance(a, str) else None)
                   for m, a in zip(mine.pop("undefined_reason"), alone.pop("undefined_reason"),
                                   strict=True)]
        assert all(m == a for m, a in reasons)
        pd.testing.assert_frame_equal(mine, alone)
    summary = tables.mcc_seed_summary(df)
    att = summary.set_index("label").loc["θ_att"]
    # θ_att: seed 0 early [T,T,F,F] vs large [T,T,F,F] -> 1; seed 1 [T,F,T,F] -> 0
    assert (att.mcc_mean, att.mcc_min, att.mcc_max, att.n_defined) == (0.5, 0.0, 1.0, 2)
    mlp = summary.set_index("label").loc["θ_mlp"]  # seed 0 undefined (all early), seed 1: 1
    assert (mlp.mcc_mean, mlp.mcc_min, mlp.mcc_max, mlp.n_defined) == (1.0, 1.0, 1.0, 1)
    paths = tables.write_mcc_table(df, tmp_path / "mcc.csv", tmp_path / "mcc.md",
                                   seeds_csv=tmp_path / "mcc_seeds.csv")
    assert [p.name for p in paths] == ["mcc.csv", "mcc.md", "mcc_seeds.csv"]
    text = (tmp_path / "mcc.md").read_text(encoding="utf-8")
    assert "mean over 2 seeds (min to max across seeds)" in text
    assert "| 70m (70.4M) | 0.50 (0.00 to 1.00) | " in text
    assert "1.00 (1.00 to 1.00)[^" in text and "θ_mlp: undefined in 1 of 2 seeds (seed 0)" in text
    assert "Brackets" not in text and "No intervals" not in text
    # the sensitivity grid is the mean over seeds of each seed's grid
    grid = tables.mcc_grid(ds)
    assert grid.dims == ("size", "column", "per_threshold", "cka_threshold")
    np.testing.assert_array_equal(
        grid.to_numpy(), (tables.mcc_grid(run0).to_numpy() + tables.mcc_grid(run1).to_numpy()) / 2)


def test_one_seed_table_is_the_run_table():
    run = hand_dataset(early={"attention": [T, T, F, F], "mlp": [T, T, T, T]},
                       per_weight={"attention": [0.99, 0.97, 0.5, 0.6],
                                   "mlp": [0.99, 0.2, 0.99, 0.2]},
                       per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]})
    df, alone = tables.mcc_table(_replicates(run)), tables.mcc_table(run)
    pd.testing.assert_frame_equal(df, alone)
    assert tables.mcc_markdown(df) == tables.mcc_markdown(alone)
    summary = tables.mcc_seed_summary(df)
    defined = summary[summary.n_defined == 1]
    assert (defined.mcc_mean == defined.mcc_min).all()
    assert (defined.mcc_min == defined.mcc_max).all()
    np.testing.assert_array_equal(summary.mcc_mean.to_numpy(), df.mcc.to_numpy())

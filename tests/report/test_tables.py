"""Tests for lmdynamics.report.tables: paper Table 1 (MCC between early convergence and
large PER)."""

from __future__ import annotations

import functools
import itertools
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

    ``early``, ``per_weight``, ``per_grad`` map component -> per-layer values; weight PER
    values are placed at the final step (0.5 elsewhere), gradient PER values at every step
    (the labels average it over the last steps). Extra layers up to ``n_layers_total`` are
    NaN.
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
        pg[0, c, :n] = np.asarray(per_grad[comp])[:, None]  # the same at every step
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
    # θ_att: 2 of 4 early and large, both on the same layers: 1 of the C(4, 2) = 6
    # relabellings; ∇θ_att: MCC 0 has 5 of the 6 relabellings at or above it
    assert ("| 70m (70.4M) | 1.00; p = 0.17 (min 0.17): design cannot reach p < 0.05 | "
            "0.00; p = 0.83 (min 0.17): design cannot reach p < 0.05 | undefined[^1] | "
            "undefined[^2] |") in text
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

    from lmdynamics.options import schema as package_schema

    schema = package_schema()
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
    # θ_att over seeds: 2 + 1 layers both early and large; per seed the C(4, 2) = 6
    # relabellings have 0, 1, 2 joint layers 1, 4, 1 times, so 4 + 4 + 1 of the 36 pairs
    # reach a sum of 3 (p = 0.25) and 1 of 36 the largest, 4 (min 0.028)
    assert ("| 70m (70.4M) | 0.50 (0.00 to 1.00), sd 0.71, 2 of 2 seeds; p = 0.25 (min 0.028): "
            "cannot be distinguished from chance | ") in text
    assert "1.00 (1.00 to 1.00), 1 of 2 seeds; p = 0.17 (min 0.17): design cannot reach " \
        "p < 0.05[^" in text and "θ_mlp: undefined in 1 of 2 seeds (seed 0)" in text
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


# --------------------------------------------------------------------- the null (issue 28)


def test_cells_carry_their_exact_p_value_and_a_plain_label(tmp_path):
    """A planted association among 12 layers is above chance; labels that merely look alike
    are not; 3 layers with one early layer cannot reach p < 0.05 whatever they show."""
    early = [T] * 6 + [F] * 6
    ds = hand_dataset(
        early={"attention": early, "mlp": [T, F] * 6},
        per_weight={"attention": [0.99] * 6 + [0.5] * 6,  # large = early: MCC 1
                    "mlp": [0.99, 0.5] * 5 + [0.5, 0.99]},  # 10 of 12 agree
        per_grad={"attention": [0.5, 0.1] * 6,  # half of the early ones: MCC 0
                  "mlp": [0.5] * 3 + [0.1] * 9},
    )
    df = tables.mcc_table(ds)
    att = _row(df, "θ_att")
    # 1 of the C(12, 6) = 924 relabellings puts the 6 early labels on the 6 large layers
    assert (att.mcc, att.n_both, att.n_relabellings) == (1.0, 6, 924)
    assert att.p_value == pytest.approx(1 / 924) and att.p_min == pytest.approx(1 / 924)
    assert att.verdict == "above chance"
    mlp = _row(df, "θ_mlp")  # 5 of 6 early ones large: sum_{t>=5} C(6,t) C(6,6-t) / 924
    assert mlp.p_value == pytest.approx((6 * 6 + 1) / 924) and mlp.verdict == "above chance"
    grad = _row(df, "∇θ_att")
    assert grad.mcc == 0.0 and grad.verdict == "cannot be distinguished from chance"
    assert grad.p_value > 0.5
    # ∇θ_mlp: 3 large among 12, 2 of them early: the MCC is positive but p is not small
    assert _row(df, "∇θ_mlp").mcc > 0 and _row(df, "∇θ_mlp").p_value > 0.05
    small = hand_dataset(  # the tiny suite's 183k: 3 layers, one early, two large
        early={"attention": [T, F, F], "mlp": [F, T, F]},
        per_weight={"attention": [0.99, 0.99, 0.5], "mlp": [0.99, 0.99, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1], "mlp": [0.5, 0.1, 0.1]},
        size="183k")
    cells = tables.mcc_table(small)
    assert (cells.mcc.to_numpy() == pytest.approx([0.5, 0.5, 0.5, -0.5]))
    assert (cells.verdict == "design cannot reach p < 0.05").all()
    assert cells.p_min.to_numpy() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1 / 3])
    assert cells.p_value.to_numpy() == pytest.approx([2 / 3, 2 / 3, 2 / 3, 1.0])
    csv, md = tmp_path / "mcc.csv", tmp_path / "mcc.md"
    tables.write_mcc_table(cells, csv, md)
    back = pd.read_csv(csv)
    assert {"n_both", "p_value", "p_min", "n_relabellings", "verdict"} <= set(back.columns)
    text = md.read_text(encoding="utf-8")
    assert "0.50; p = 0.67 (min 0.67): design cannot reach p < 0.05" in text
    assert "-0.50; p = 1 (min 0.33): design cannot reach p < 0.05" in text
    assert "every distinct random relabelling of layers" in text
    assert "not adjusted for the table's number of cells" in text
    # two-sided: the negative cell's |MCC| is as large as any outcome's
    two = tables.mcc_table(small, alternative="two_sided")
    assert _row(two, "∇θ_mlp").p_value == pytest.approx(1.0)
    assert _row(tables.mcc_table(ds, alternative="two_sided"), "θ_att").p_value == \
        pytest.approx(2 / 924)


def test_undefined_cells_have_no_p_value():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, T, T]},
        per_weight={"attention": [0.99, 0.97, 0.5, 0.6], "mlp": [0.99, 0.2, 0.99, 0.2]},
        per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]},
    )
    df = tables.mcc_table(ds)
    for label in ("θ_mlp", "∇θ_mlp"):
        row = _row(df, label)
        assert math.isnan(row.p_value) and math.isnan(row.p_min)
        assert row.verdict == "undefined" and row.n_relabellings == 0
    text = tables.mcc_markdown(df)
    assert "undefined[^1]" in text and "undefined[^1];" not in text


def test_gradient_labels_average_the_last_steps():
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.5, 0.1, 0.1], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )  # steps 0, 10, 20, 100
    # the final step alone: layer 2 is the largest ([F, F, T, F] vs early [T, T, F, F]);
    # steps 10 and 20 put layers 0 and 1 on top
    ds["per_grad_normalized"].loc[{"component": "attention"}] = np.array([
        [0.5, 0.5, 0.5, 0.30],  # layer 0: mean of the last 3 = 0.433
        [0.5, 0.5, 0.5, 0.32],  # 0.44
        [0.1, 0.1, 0.1, 0.40],  # 0.2
        [0.1, 0.1, 0.1, 0.20]])  # 0.133
    last = tables.mcc_table(ds, grad_steps=1)
    assert _row(last, "∇θ_att").n_large == 1 and _row(last, "∇θ_att").mcc < 0
    mean3 = tables.mcc_table(ds, grad_steps=3)  # >= 0.9 x 0.44: layers 0 and 1
    assert _row(mean3, "∇θ_att").mcc == pytest.approx(1.0)
    assert mean3.attrs["thresholds"]["grad_label_steps"] == [10, 20, 100]
    assert "(gradient PER: the whole eval batch (the metrics hold no sub-batches), the mean " \
        "over steps 10, 20, 100)" in tables.mcc_markdown(mean3)
    assert "the mean over" not in tables.mcc_markdown(last)
    # asking for more steps than there are averages all of them
    assert tables.mcc_table(ds, grad_steps=50).attrs["thresholds"]["grad_label_steps"] == \
        [0, 10, 20, 100]
    # weights are always the final step's
    assert _row(mean3, "θ_att").mcc == pytest.approx(1.0)
    # a layer undefined at any averaged step is undefined (left out), never averaged around
    ds["per_grad_normalized"].loc[{"component": "attention", "layer": 3, "step": 20}] = np.nan
    assert _row(tables.mcc_table(ds, grad_steps=3), "∇θ_att").n_layers == 3
    assert _row(tables.mcc_table(ds, grad_steps=1), "∇θ_att").n_layers == 4


@pytest.mark.parametrize(("arg", "value", "message"), [
    ("grad_steps", 0, "grad_steps=0: allowed an integer of at least 1"),
    ("grad_steps", 1.5, "grad_steps=1.5: allowed an integer of at least 1"),
    ("alpha", 1.0, "alpha=1.0 is outside the allowed range (0, 1)"),
    ("alpha", float("nan"), "alpha=nan is outside the allowed range (0, 1)"),
    ("alternative", "less", "alternative='less': allowed greater, two_sided"),
])
def test_null_option_validation(arg, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        tables.MCCOptions(**{arg: value})


def test_seed_distribution_is_the_headline_and_each_seed_follows(tmp_path):
    runs = []
    for flip in (0, 1, 2):  # three seeds of a 6-layer size; seed k swaps k layer pairs
        early = np.array([T, T, T, F, F, F])
        early[:flip], early[3:3 + flip] = False, True
        runs.append(hand_dataset(
            early={"attention": list(early), "mlp": [T] * 6},
            per_weight={"attention": [0.99] * 3 + [0.5] * 3, "mlp": [0.99] * 3 + [0.5] * 3},
            per_grad={"attention": [0.5] * 3 + [0.1] * 3, "mlp": [0.5] * 3 + [0.1] * 3}))
    df = tables.mcc_table(_replicates(*runs))
    summary = tables.mcc_seed_summary(df).set_index("label")
    att = summary.loc["θ_att"]
    mccs = np.array([1.0, 1 / 3, -1 / 3])  # 3, 2, 1 of the 3 early layers large
    assert att.mcc_mean == pytest.approx(mccs.mean()) and att.mcc_sd == pytest.approx(
        mccs.std(ddof=1))
    # per seed t = 3, 2, 1 of C(6, 3) = 20 relabellings with 1, 9, 9, 1 at t = 0..3:
    # P(t1 + t2 + t3 >= 6) by hand
    pmf = {0: 1, 1: 9, 2: 9, 3: 1}
    hits = sum(pmf[x] * pmf[y] * pmf[z] for x, y, z in itertools.product(pmf, repeat=3)
               if x + y + z >= 6)
    assert att.p_value == pytest.approx(hits / 20**3)
    assert att.p_min == pytest.approx(1 / 20**3) and att.n_relabellings == 20**3
    mlp = summary.loc["θ_mlp"]  # every layer early in every seed: no test
    assert mlp.n_defined == 0 and math.isnan(mlp.p_value) and mlp.verdict == "undefined"
    tables.write_mcc_table(df, tmp_path / "mcc.csv", tmp_path / "mcc.md",
                           seeds_csv=tmp_path / "mcc_seeds.csv")
    text = (tmp_path / "mcc.md").read_text(encoding="utf-8")
    headline, per_seed = text.split("**Each seed alone**")
    assert (f"| 70m (70.4M) | 0.33 (-0.33 to 1.00), sd 0.67, 3 of 3 seeds; p = "
            f"{hits / 20**3:.2g} (min {1 / 20**3:.2g}): ") in headline
    assert "in each seed independently" in headline
    for seed in range(3):
        assert f"Seed {seed}:" in per_seed
    assert per_seed.count("| 70m (70.4M) |") == 3
    assert "[^s0-1]: 70m θ_mlp" in per_seed and "[^s2-2]: 70m ∇θ_mlp" in per_seed
    assert "[^1]: 70m θ_mlp: undefined in 3 of 3 seeds" in headline
    seeds_csv = pd.read_csv(tmp_path / "mcc_seeds.csv")
    assert list(seeds_csv.columns) == list(tables.SEED_SUMMARY_COLUMNS)


def test_sensitivity_p_values_match_the_table():
    rng = np.random.default_rng(3)
    n = 10
    ds = hand_dataset(
        early={c: list(rng.random(n) < 0.5) for c in ("attention", "mlp")},
        per_weight={c: list(rng.uniform(0.5, 1.0, n)) for c in ("attention", "mlp")},
        per_grad={c: list(rng.uniform(0.1, 0.5, n)) for c in ("attention", "mlp")},
    )
    ds["cka"].loc[{"step": 10}] = rng.uniform(0.3, 0.7, (1, 2, n))
    grids = tables.mcc_grids(ds)
    for cka_t, per_t in ((0.45, 0.95), (0.5, 0.8), (0.4, 0.6)):
        df = tables.mcc_table(ds, cka_threshold=cka_t, per_weight_threshold=per_t,
                              per_grad_fraction=per_t)
        for label in df["label"]:
            got = grids.sel(size="70m", column=label, cka_threshold=cka_t, per_threshold=per_t)
            assert float(got["p_value"]) == pytest.approx(_row(df, label).p_value, nan_ok=True)
            assert float(got["mcc"]) == pytest.approx(_row(df, label).mcc, nan_ok=True)
    assert np.isfinite(grids["p_value"]).any()


def test_sensitivity_figure_marks_significant_thresholds(tmp_path):
    from lmdynamics.report.mcc import mcc_sensitivity

    early = [T] * 6 + [F] * 6
    ds = hand_dataset(early={"attention": early, "mlp": early},
                      per_weight={"attention": [0.99] * 6 + [0.5] * 6,
                                  "mlp": [0.99] * 6 + [0.5] * 6},
                      per_grad={"attention": [0.5] * 6 + [0.1] * 6,
                                "mlp": [0.5] * 6 + [0.1] * 6})
    paths = mcc_sensitivity(ds, tmp_path / "sens")
    assert sorted(p.suffix for p in paths) == [".pdf", ".png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def with_sub_batches(ds: xr.Dataset, sub: dict[str, np.ndarray]) -> xr.Dataset:
    """Add ``per_grad_sub_normalized`` (size, component, layer, step, sub_batch): per
    component the (layer, sub_batch) values ``sub``, the same at every step."""
    n_sub = next(iter(sub.values())).shape[-1]
    values = np.full((*ds["per_grad_normalized"].shape, n_sub), np.nan)
    for c, comp in enumerate(ds["component"].to_numpy()):
        values[0, c, : sub[comp].shape[0]] = sub[comp][:, None, :]
    dims = ("size", "component", "layer", "step", "sub_batch")
    return ds.assign(per_grad_sub_normalized=(dims, values))


def test_gradient_labels_within_batch_noise_of_the_threshold_are_counted(tmp_path):
    ds = hand_dataset(
        early={"attention": [T, T, F, F], "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        # ratios to the largest: attention 1, 0.92, 0.88, 0.4; mlp 1, 1, 0.2, 0.2
        per_grad={"attention": [0.5, 0.46, 0.44, 0.2], "mlp": [0.5, 0.5, 0.1, 0.1]},
    )
    assert math.isnan(_row(tables.mcc_table(ds), "∇θ_att").n_uncertain)  # no sub-batches
    spread = 0.02 * np.array([-1.5, -0.5, 0.5, 1.5])  # sd 0.0258: the ratio's se is 0.0258
    sub = {"attention": np.array([[0.5] * 4, 0.46 + spread, 0.44 - spread, [0.2] * 4]),
           "mlp": np.array([[0.5] * 4, [0.5] * 4, 0.1 + spread / 4, [0.1] * 4])}
    noisy = with_sub_batches(ds, sub)
    df = tables.mcc_table(noisy, grad_batches="whole")
    # layers 1 and 2 lie 0.02 from 0.9, within 2 x 0.0258; layers 0 and 3 are far from it
    assert _row(df, "∇θ_att").n_uncertain == 2
    assert _row(df, "∇θ_mlp").n_uncertain == 0
    assert math.isnan(_row(df, "θ_att").n_uncertain)  # weights carry no sampling noise
    assert _row(df, "∇θ_att").mcc == pytest.approx(_row(tables.mcc_table(ds), "∇θ_att").mcc)
    text = tables.mcc_markdown(df)
    assert ("70m ∇θ_att: large-gradient-PER labels within 2 standard errors of the "
            "threshold: 2 of 4 layers") in text
    assert "∇θ_mlp: large-gradient-PER" not in text
    # an undefined cell's footnote says so too
    every = hand_dataset(
        early={"attention": [T] * 4, "mlp": [T, T, F, F]},
        per_weight={"attention": [0.99, 0.99, 0.5, 0.5], "mlp": [0.99, 0.99, 0.5, 0.5]},
        per_grad={"attention": [0.5, 0.46, 0.44, 0.2], "mlp": [0.5, 0.5, 0.1, 0.1]})
    text = tables.mcc_markdown(tables.mcc_table(with_sub_batches(every, sub),
                                                grad_batches="whole"))
    assert ("70m ∇θ_att: all 4 layers have early convergence; large-gradient-PER labels "
            "within 2 standard errors of the threshold: 2 of 4 layers") in text
    # the mean over sub-batches as the label PER: layer 2's sub-batches average 0.47, above
    # 0.9 x 0.5 now, so it joins the large ones
    lifted = with_sub_batches(ds, {**sub, "attention": np.array(
        [[0.5] * 4, 0.46 + spread, 0.47 - spread, [0.2] * 4])})
    whole = tables.mcc_table(lifted, grad_batches="whole")
    mean = tables.mcc_table(lifted)  # the default: sub_batch_mean
    assert _row(whole, "∇θ_att").n_large == 2 and _row(mean, "∇θ_att").n_large == 3
    assert mean.attrs["thresholds"]["grad_label_batches"] == 4
    assert "(gradient PER: the mean over 4 sub-batches of the eval batch)" in \
        tables.mcc_markdown(mean)
    assert whole.attrs["thresholds"]["grad_label_batches"] == 0
    # without sub-batches in the metrics the whole batch's, and the table says so
    fallback = tables.mcc_table(ds, grad_batches="sub_batch_mean")
    assert fallback.attrs["thresholds"]["grad_label_batches"] == 0
    assert "(gradient PER: the whole eval batch (the metrics hold no sub-batches))" in \
        tables.mcc_markdown(fallback)
    pd.testing.assert_frame_equal(fallback, tables.mcc_table(ds, grad_batches="whole"))

"""The whole tiny DAG, end to end, through the real Snakemake command line."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import REPO, snakemake

pytestmark = pytest.mark.slow

TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
RESULTS = "results/tiny"


def test_every_output_exists_and_is_non_empty(tiny_run):
    figures = tiny_run / RESULTS / "figures"
    for name in ["figure1", "figure2", "figure3", "figure4", "figure5", "figure6",
                 "training_loss"]:
        for ext in ("png", "pdf"):
            f = figures / f"{name}.{ext}"
            assert f.stat().st_size > 5000, f
    for name in ["metrics.csv", "training_loss.csv", "tables/mcc.csv", "tables/mcc.md"]:
        assert (tiny_run / RESULTS / name).stat().st_size > 0, name


def test_per_pair_store_layout(tiny_run):
    size = TINY["sizes"][0]
    ds = xr.open_zarr(tiny_run / RESULTS / f"extract/{size}/step0.zarr", consolidated=False)
    spec = TINY["tiny"]["models"][size]
    n_layers, dim = spec["num_layers"], spec["hidden_size"]
    assert ds.activations.dims == ("component", "layer", "token", "dim")
    assert ds.activations.shape == (2, n_layers, TINY["tokens"], dim)
    assert list(ds.component.values) == ["attention", "mlp"]
    assert ds.weight_singular_values.dims == ("component", "layer", "k")
    assert ds.grad_singular_values.shape == (2, n_layers, dim)
    for key in ("model", "revision", "size", "step", "dtype", "lmdynamics_version"):
        assert key in ds.attrs, key
    assert ds.attrs["step"] == 0 and ds.attrs["size"] == size
    # one (component, layer) slice is one chunk
    assert ds.activations.encoding["chunks"] == (1, 1, TINY["tokens"], dim)
    # the same token positions at every step
    other = xr.open_zarr(tiny_run / RESULTS / f"extract/{size}/step{TINY['final_step']}.zarr",
                         consolidated=False)
    np.testing.assert_array_equal(ds.sequence.values, other.sequence.values)
    np.testing.assert_array_equal(ds.position.values, other.position.values)


def test_metrics_are_finite_in_range_and_one_at_the_final_step(tiny_run):
    ds = xr.open_zarr(tiny_run / RESULTS / "metrics.zarr", consolidated=False).load()
    assert ds.cka.dims == ("size", "component", "layer", "step")
    # sizes ordered by parameter count
    assert list(np.diff(ds.n_params.values) > 0) == [True] * (ds.sizes["size"] - 1)
    assert sorted(ds.step.values.tolist()) == sorted(TINY["steps"])
    for size in ds.size.values:
        n_layers = TINY["tiny"]["models"][str(size)]["num_layers"]
        sub = ds.sel(size=size).isel(layer=slice(0, n_layers))
        for var in ("cka", "per_weight", "per_grad"):
            values = sub[var].values
            assert np.isfinite(values).all(), (size, var)
            assert (values >= 0).all() and (values <= 1 + 1e-9).all(), (size, var)
        np.testing.assert_allclose(sub.cka.sel(step=TINY["final_step"]).values, 1.0, atol=1e-9)
        # layers a size does not have are NaN
        assert np.isnan(ds.sel(size=size).isel(layer=slice(n_layers, None)).cka.values).all()
    table = pd.read_csv(tiny_run / RESULTS / "metrics.csv")
    assert list(table.columns[:7]) == ["size", "component", "layer", "step", "cka",
                                       "per_weight", "per_grad"]
    n_rows = sum(TINY["tiny"]["models"][s]["num_layers"] for s in TINY["sizes"])
    assert len(table) == n_rows * 2 * len(TINY["steps"])


def test_models_learn(tiny_run):
    loss = pd.read_csv(tiny_run / RESULTS / "training_loss.csv")
    for size, grp in loss.groupby("size"):
        grp = grp.sort_values("step")
        first, last = grp.loss.iloc[0], grp.loss.iloc[-20:].mean()
        assert first > 5.0, (size, first)  # ~ln 256 at initialisation
        assert last < 3.0, (size, last)


def test_mcc_table_has_every_size_and_parameter(tiny_run):
    mcc = pd.read_csv(tiny_run / RESULTS / "tables/mcc.csv")
    assert set(mcc["size"]) == set(TINY["sizes"])
    assert len(mcc) == 4 * len(TINY["sizes"])
    undefined = mcc[mcc.mcc.isna()]
    assert undefined.undefined_reason.notna().all()
    # issue 18: the default definitions give defined weight cells for at least two sizes,
    # every defined cell has a bootstrap interval that holds its value
    weights = mcc[(mcc.parameter == "weights") & mcc.mcc.notna()]
    for label in ("θ_att", "θ_mlp"):
        assert (weights.label == label).sum() >= 2, mcc
    defined = mcc[mcc.mcc.notna()]
    assert defined[["mcc_low", "mcc_high"]].notna().all().all(), defined
    assert (defined.mcc_low <= defined.mcc + 1e-12).all()
    assert (defined.mcc <= defined.mcc_high + 1e-12).all()
    assert (defined.early_step == 32).all()  # the last step by 10 % of 512 (51.2)
    text = (tiny_run / RESULTS / "tables/mcc.md").read_text(encoding="utf-8")
    assert "at or before 0.1 × final step 512" in text and "`per_normalized`" in text
    for ext in ("png", "pdf"):
        assert (tiny_run / RESULTS / f"figures/mcc_sensitivity.{ext}").stat().st_size > 1000


def test_logs_and_benchmarks_per_job(tiny_run):
    logs = tiny_run / RESULTS / "logs"
    extract_logs = list((logs / "extract").rglob("*.log"))
    assert len(extract_logs) == len(TINY["sizes"]) * len(TINY["steps"])
    assert "wrote" in extract_logs[0].read_text()
    assert list((tiny_run / RESULTS / "benchmarks/extract").rglob("*.tsv"))


def test_immediate_rerun_has_nothing_to_do(tiny_run):
    proc = snakemake(tiny_run, "--configfile", "config/tiny.yaml", "-n")
    assert re.search(r"Nothing to be done", proc.stdout + proc.stderr), proc.stdout[-2000:]

"""The Conjecture statistics in the end-to-end DAG: on the session's ``mini_run`` (default
test run) what holds for any suite, on ``tiny_run`` (slow) what needs the full training."""

from __future__ import annotations

import re

import numpy as np
import pytest
import xarray as xr
import yaml

from lmdynamics.reduction.stats import STAT_VARIABLES
from lmdynamics.store import open_store
from support.workflow import REPO, snakemake

TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
RESULTS = "results/tiny"
FIGURES = ["norms", "distance", "shape", "residual", "spectra", "embedding", "closeness"]


@pytest.mark.slow
def test_stats_store_and_figures(tiny_run):
    results = tiny_run / RESULTS
    for name in FIGURES:
        for ext in ("png", "pdf"):
            assert (results / f"figures/conjecture_{name}.{ext}").stat().st_size > 5000, name
    ds = open_store(results / "stats.zarr", required=STAT_VARIABLES).load()
    assert list(ds["size"].values) == TINY["sizes"]  # config order is by parameter count
    assert sorted(ds.step.values.tolist()) == sorted(TINY["steps"])
    assert ds.stat_param.dims == ("size", "seed", "step", "param", "param_stat")
    assert ds.seed.values.tolist() == [0]  # the tiny configuration's one replicate
    ds = ds.sel(seed=0)
    final = TINY["final_step"]
    for size in TINY["sizes"]:
        n = TINY["tiny"]["models"][size]["num_layers"]
        sub = ds.sel(size=size)
        assert (sub.stat_param.sel(step=0, param_stat="dist_init").dropna("param") == 0).all()
        cos = sub.stat_param.sel(step=final, param_stat="cos_final").dropna("param")
        np.testing.assert_allclose(cos, 1.0, rtol=1e-12)
        closeness = sub.stat_direction_closeness.isel(layer=slice(0, n))
        np.testing.assert_allclose(closeness.sel(step=final), 1.0, rtol=1e-9)
        assert np.isfinite(closeness).all() and (closeness > 0).all()
        resid = sub.stat_resid_max_abs.isel(layer=slice(0, n))
        assert np.isfinite(resid).all() and (resid > 0).all()
        assert np.isfinite(sub.stat_embedding_corr).all()
    # the post's first observation in this suite: trained QKV weights are heavier-tailed
    kurt = ds.stat_weight.sel(shape_stat="kurtosis", param=ds.param_module
                              == "attention.query_key_value")
    assert float(kurt.sel(step=final).mean()) > float(kurt.sel(step=0).mean())


def test_per_pair_stores_carry_the_statistics(mini_run):
    config = mini_run.config
    size, step = config["sizes"][-1], config["steps"][1]
    ds = xr.open_zarr(mini_run.results / f"extract/{size}/seed0/step{step}.zarr",
                      consolidated=False)
    assert all(v in ds for v in STAT_VARIABLES)
    log = (mini_run.results / f"logs/extract/{size}/seed0.log").read_text()
    assert log.count("Conjecture statistics in") == len(config["steps"])
    benchmarks = mini_run.results / "benchmarks"
    # one per (size, seed): benchmarks/reduce_stats/<size>/seed<k>.tsv
    assert len(list((benchmarks / "reduce_stats").glob("*/seed*.tsv"))) == len(config["sizes"])
    assert (benchmarks / "combine_stats.tsv").is_file()


def test_adding_a_size_reruns_no_other_size(mini_run, tmp_path):
    config = {**mini_run.config, "sizes": [*mini_run.config["sizes"], "1m"]}
    path = tmp_path / "plus_1m.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(mini_run.workdir, "--configfile", str(path), "-n")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)\s*$", proc.stdout, flags=re.M))
    assert counts["extract"] == "1"  # the new size's (every step's stores in one job)
    assert counts["reduce_stats"] == "1" and counts["train_tiny"] == "1"
    assert counts["combine_stats"] == "1" and counts["stats_figure"] == str(len(FIGURES))
    assert "size=42k" not in proc.stdout

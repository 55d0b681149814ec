"""Seed replicates end to end: the finished ``mini_run`` (seeds [0]) gains replicate 1.

Adding the seed is a real run (about 2-4 minutes on 2 cores: marked slow): it must leave
every output of seed 0 untouched, train a replicate that differs from seed 0, and give the
across-seed outputs (mean and spread figures, Table 1 over seeds) from both.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from lmdynamics.reduction.metrics import combine_sizes
from lmdynamics.report.cka import select_cka
from lmdynamics.report.tables import MCCOptions, mcc_table
from lmdynamics.store import open_store
from support.reruns import CONFIG, CONFIGFILE, RESULTS, SIZES, STEPS, finished_copy, plan
from support.workflow import snakemake

pytestmark = pytest.mark.slow
SEEDS = [0, 1]


@pytest.fixture(scope="module")
def two_seeds(mini_run, tmp_path_factory):
    """A copy of the finished one-seed run, then the same config with seeds [0, 1], run."""
    assert mini_run.configfile == CONFIGFILE and mini_run.config == CONFIG
    workdir = finished_copy(mini_run.workdir, tmp_path_factory.mktemp("seeds") / "workflow")
    seed0 = sorted((workdir / RESULTS).glob("extract/*/seed0/step*.zarr"))
    before = {p: p.stat().st_mtime_ns for p in seed0}
    (workdir / "config/seeds.yaml").write_text(yaml.safe_dump({**CONFIG, "seeds": SEEDS}))
    snakemake(workdir, "--configfile", "config/seeds.yaml")
    return workdir, before


def test_adding_a_seed_leaves_seed_0_untouched_and_is_then_up_to_date(two_seeds):
    workdir, before = two_seeds
    assert len(before) == len(SIZES) * len(STEPS)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert plan(workdir, "--configfile", "config/seeds.yaml") == set()


def test_replicates_differ_and_record_their_seed(two_seeds):
    workdir, _ = two_seeds
    results = workdir / RESULTS
    for size in SIZES:
        init = [open_store(results / f"extract/{size}/seed{k}/step0.zarr").attrs
                for k in SEEDS]
        assert [a["seed"] for a in init] == SEEDS
        assert init[0]["weights_sha256"] != init[1]["weights_sha256"]  # other initialisation
        assert init[0]["eval_batch_sha256"] == init[1]["eval_batch_sha256"]  # one eval batch
    metrics = pd.read_csv(results / "metrics.csv")
    assert sorted(metrics["seed"].unique()) == SEEDS
    by_seed = [metrics[metrics.seed == k].drop(columns="seed").reset_index(drop=True)
               for k in SEEDS]
    early = by_seed[0]["step"] < CONFIG["final_step"]
    assert not np.allclose(by_seed[0].loc[early, "cka"], by_seed[1].loc[early, "cka"])
    loss = pd.read_csv(results / "training_loss.csv")
    curves = [loss[(loss.seed == k) & (loss["size"] == SIZES[0])].loss.to_numpy() for k in SEEDS]
    assert curves[0].shape == curves[1].shape and not np.allclose(curves[0], curves[1])


def test_seed_0_of_two_is_the_single_run(two_seeds, mini_run):
    workdir, _ = two_seeds
    one = pd.read_csv(mini_run.results / "metrics.csv")
    two = pd.read_csv(workdir / RESULTS / "metrics.csv")
    pd.testing.assert_frame_equal(two[two.seed == 0].reset_index(drop=True), one)


def test_spread_outputs_exist(two_seeds):
    workdir, _ = two_seeds
    figures = workdir / RESULTS / "figures"
    for name in ("cka_seed_sd", "figure2", "figure3", "training_loss"):
        for ext in ("png", "pdf"):
            assert (figures / f"{name}.{ext}").stat().st_size > 5000, name
    ds = xr.open_zarr(workdir / RESULTS / "metrics.zarr", consolidated=False)
    assert ds.cka.dims == ("size", "seed", "component", "layer", "step")
    assert ds.seed.values.tolist() == SEEDS


def test_table1_ranges_hold_each_seeds_own_mcc(two_seeds):
    """Each seed's Table 1, computed here from that seed's per-size metrics alone, lies in
    the range of mcc_seeds.csv, and the extremes are attained."""
    workdir, _ = two_seeds
    results = workdir / RESULTS
    options = MCCOptions(**CONFIG["mcc"])
    estimator = CONFIG["metrics"]["cka_estimator"]
    own = []
    for k in SEEDS:
        ds = combine_sizes([results / f"metrics/{size}/seed{k}.zarr" for size in SIZES])
        own.append(mcc_table(select_cka(ds, estimator), options).set_index(["size", "label"]))
    summary = pd.read_csv(results / "tables/mcc_seeds.csv").set_index(["size", "label"])
    assert len(summary) == 4 * len(SIZES) and (summary.n_seeds == 2).all()
    for key, row in summary.iterrows():
        values = np.array([t.loc[key, "mcc"] for t in own], dtype=float)
        defined = values[np.isfinite(values)]
        assert row.n_defined == defined.size, key
        if defined.size:
            assert row.mcc_min <= defined.min() + 1e-12 and defined.max() <= row.mcc_max + 1e-12
            assert row.mcc_min == pytest.approx(defined.min(), abs=1e-12)
            assert row.mcc_max == pytest.approx(defined.max(), abs=1e-12)
            assert row.mcc_mean == pytest.approx(defined.mean(), abs=1e-12)
        else:
            assert np.isnan(row.mcc_mean) and np.isnan(row.mcc_min), key
    md = (results / "tables/mcc.md").read_text(encoding="utf-8")
    assert "mean over 2 seeds (min to max across seeds)" in md

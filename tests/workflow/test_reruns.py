"""Incremental reruns: what ``snakemake -n`` plans after a finished run.

Each test works on a fresh copy of the session's finished ``mini_run`` (outputs, mtimes and
Snakemake's metadata), so nothing leaks into other tests. The plans are dry runs (seconds);
adding a step also reruns the reductions for real, so that one is marked slow. The tiny
suite extracts in one job per (size, seed) (every step's store): a changed set of steps reruns
those jobs, never the training or the reference stores.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from support.reruns import (
    CONFIG,
    CONFIGFILE,
    FIGURES,
    MEASURE_FIGURES,
    RESULTS,
    SIZES,
    STATS_FIGURES,
    STEPS,
    downstream_of_metrics,
    downstream_of_stores,
    finished_copy,
    job,
    plan,
    table1_jobs,
    with_config,
)
from support.workflow import REPO, snakemake


@pytest.fixture
def finished(mini_run, tmp_path) -> Path:
    assert mini_run.configfile == CONFIGFILE and mini_run.config == CONFIG
    return finished_copy(mini_run.workdir, tmp_path / "workflow")


def test_a_copied_finished_run_is_up_to_date(finished):
    assert plan(finished) == set()


def test_adding_a_size_plans_only_that_size_and_what_combines_sizes(finished):
    sizes = [*SIZES, "1m"]
    jobs = plan(finished, "--config", f"sizes={sizes!r}".replace("'", '"'))
    expected = {job("train_tiny", size="1m", seed=0), job("reduce_size", size="1m", seed=0),
                job("reduce_stats", size="1m", seed=0), job("reference", size="1m", seed=0),
                job("extract", size="1m", seed=0),
                job("training_loss"), *downstream_of_metrics(), *downstream_of_stores()}
    assert jobs == expected


def test_adding_a_seed_plans_only_that_seed_and_what_combines_seeds(finished):
    """seeds [0] -> [0, 1]: replicate 1 is trained, extracted and reduced; nothing of seed 0
    reruns (the eval batch is the suite's, not the seed's); the combined outputs redo."""
    jobs = plan(finished, "--config", "seeds=[0, 1]")
    expected = {*(job("train_tiny", size=s, seed=1) for s in SIZES),
                *(job("reduce_size", size=s, seed=1) for s in SIZES),
                *(job("reduce_stats", size=s, seed=1) for s in SIZES),
                *(job("reference", size=s, seed=1) for s in SIZES),
                *(job("extract", size=s, seed=1) for s in SIZES),
                job("training_loss"), *downstream_of_metrics(), *downstream_of_stores()}
    assert jobs == expected


@pytest.mark.slow
def test_adding_a_step_plans_its_extractions_and_the_reductions(finished):
    added = STEPS[1]
    # The state after a run without that step: no stores for it, reductions made without it.
    before = {**CONFIG, "steps": [s for s in STEPS if s != added]}
    (finished / "config/before.yaml").write_text(yaml.safe_dump(before))
    for size in SIZES:
        shutil.rmtree(finished / RESULTS / f"extract/{size}/seed0/step{added}.zarr")
    snakemake(finished, "--configfile", "config/before.yaml")
    assert plan(finished, "--configfile", "config/before.yaml") == set()

    jobs = plan(finished)  # the run's steps again: that step added
    expected = {*(job("extract", size=s, seed=0) for s in SIZES),
                *(job("reduce_size", size=s, seed=0) for s in SIZES),
                *(job("reduce_stats", size=s, seed=0) for s in SIZES),
                *downstream_of_metrics(), *downstream_of_stores()}
    assert jobs == expected


def test_a_new_saved_step_plans_its_extractions_and_never_the_references(finished):
    """A step the tiny training saved but the run did not analyse (16 of 0, 1, 2, ..., 64):
    its extractions and the reductions; the reference stores (and training) stay."""
    added = 16
    assert added not in STEPS
    jobs = plan(finished, "--configfile", with_config(finished, steps=sorted([*STEPS, added])))
    assert jobs == {*(job("extract", size=s, seed=0) for s in SIZES),
                    *(job("reduce_size", size=s, seed=0) for s in SIZES),
                    *(job("reduce_stats", size=s, seed=0) for s in SIZES),
                    *downstream_of_metrics(), *downstream_of_stores()}


def test_a_statistics_option_reruns_the_reference_only_when_it_shapes_it(finished):
    """Only conjecture.top_k shapes the reference store; other statistics options rerun the
    extractions (and what reads them) but not the reference jobs."""
    extracts = {job("extract", size=s, seed=0) for s in SIZES}
    other = with_config(finished, conjecture={**CONFIG.get("conjecture", {}),
                                              "max_elements": 4096})
    jobs = plan(finished, "--configfile", other)
    assert extracts <= jobs and not {j for j in jobs if j[0] == "reference"}
    jobs = plan(finished, "--configfile", with_config(finished, conjecture={
        **CONFIG.get("conjecture", {}), "top_k": 7}))
    assert {job("reference", size=s, seed=0) for s in SIZES} | extracts <= jobs


def test_changing_a_figure_option_redraws_only_the_figures(finished):
    jobs = plan(finished, "--config", "figures={x_axis: fraction}")
    assert jobs == {*(job("figure", figure=f) for f in FIGURES),
                    *(job("stats_figure", stat_figure=f) for f in STATS_FIGURES),
                    *(job("measure_figure", measure=m) for m in MEASURE_FIGURES)}


def test_choosing_measures_reruns_the_reductions_and_never_an_extraction(finished):
    """The stores hold every measure's data: choosing measures (here: only the Gini index of
    the weights, and PWCCA against every step) redoes the reductions and what reads them,
    and draws the chosen measures' figures only."""
    measures = {name: {"data": []} for name in MEASURE_FIGURES}
    measures["gini"] = {"data": ["weights"]}
    measures["pwcca"] = {"data": ["activations"], "reference": ["final", "pairwise"]}
    jobs = plan(finished, "--configfile", with_config(finished, measures=measures))
    assert jobs == {*(job("reduce_size", size=s, seed=0) for s in SIZES),
                    *downstream_of_metrics(["pwcca", "gini"])}


def test_changing_a_table1_option_redoes_only_table1(finished):
    jobs = plan(finished, "--config", "mcc={early_step: nearest, per_quantity: per_head_dim}")
    assert jobs == table1_jobs()


def test_editing_a_plotting_module_redraws_figures_and_never_extracts(finished, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "src", src, ignore=shutil.ignore_patterns("__pycache__"))
    # Unchanged code (mtimes kept by the copy): nothing to do.
    assert plan(finished, "--rerun-triggers", "mtime", pythonpath=src) == set()

    module = src / "lmdynamics/report/figures.py"
    module.write_text(module.read_text() + "\n# an edit of the plotting code\n")
    jobs = plan(finished, "--rerun-triggers", "mtime", pythonpath=src)
    assert jobs == {job("training_loss"), *(job("figure", figure=f) for f in FIGURES),
                    job("mcc_sensitivity"),
                    *(job("stats_figure", stat_figure=f) for f in STATS_FIGURES),
                    *(job("measure_figure", measure=m) for m in MEASURE_FIGURES)}
    # With every default trigger too (here the code's path changed as well), no extraction,
    # training or reduction.
    jobs = plan(finished, pythonpath=src)
    costly = {"train_tiny", "tiny_eval_batch", "extract", "reduce_size", "combine",
              "reduce_stats", "combine_stats"}
    assert not {rule for rule, _ in jobs} & costly, jobs

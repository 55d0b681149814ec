"""Flagged revisions in Table 1, the sensitivity grid and the figures (audit.defective)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_figures import SIZES_2, make_metrics_dataset, replicated_dataset
from test_tables import F, T, hand_dataset

from lmdynamics import defects
from lmdynamics.report import exclusion, figures, tables

STEPS = [0, 4, 8, 10, 20, 100]  # final 100: the early step (10 % of training) is 10


def _found(*revisions, kind="same_as_main", size="70m"):
    return defects.frame({"size": size, "seed": seed, "step": step, "audit": "hub",
                          "kind": kind, "detail": f"{kind} detail", "evidence": "sha256 ab12",
                          "source": "https://github.com/EleutherAI/pythia/issues/205"}
                         for seed, step in revisions)


def _dataset():
    """70m: layers converge early at step 10 (0.9 / 0.1 as in test_tables), at step 8 the
    opposite labels, at step 4 no layer; PER labels fixed, so each early step gives its own
    Table 1."""
    ds = hand_dataset(early={"attention": [T, T, F, F], "mlp": [T, F, T, F]},
                      per_weight={"attention": [0.99, 0.97, 0.5, 0.6],
                                  "mlp": [0.99, 0.2, 0.99, 0.2]},
                      per_grad={"attention": [0.5, 0.1, 0.5, 0.1], "mlp": [0.5, 0.5, 0.5, 0.1]},
                      steps=STEPS, early_step=10)
    ds["cka"].loc[{"step": 8, "component": "attention"}] = [0.1, 0.1, 0.9, 0.9]
    return ds.expand_dims(seed=[0], axis=1)


def _mcc(df, label):
    return float(df[df.label == label].mcc.iloc[0])


def test_nothing_flagged_leaves_table_1_as_it_is():
    ds = _dataset()
    table = tables.mcc_table(ds)
    out, early = exclusion.table_without(ds, defects.frame([]), tables.MCCOptions(), table,
                                         "exclude")
    assert out is table and early == {}


def test_an_excluded_early_step_uses_the_nearest_trusted_one_before_it():
    ds = _dataset()
    table = tables.mcc_table(ds)
    assert set(table.early_step) == {10} and _mcc(table, "θ_att") == pytest.approx(1.0)
    found = _found((0, 10))
    out, early = exclusion.table_without(ds, found, tables.MCCOptions(), table, "exclude")
    assert early[("70m", 0)] == exclusion.EarlyStep(10, 8, early[("70m", 0)].reason)
    assert set(out.early_step) == {8}
    # at step 8 attention's early labels are the opposite ones: MCC -1, computed at step 8
    assert _mcc(out, "θ_att") == pytest.approx(-1.0)
    notes = exclusion.footnotes(ds, found, "exclude", early)
    assert "70m seed 0 step 10: same_as_main detail (sha256 ab12) [https://github.com/" \
        "EleutherAI/pythia/issues/205]" in notes
    assert "Table 1 uses step 8, the nearest trusted analysed step at or before it" in notes
    assert "left out of this table" in notes
    # mark: computed with the flagged revision, and still listed
    marked, none = exclusion.table_without(ds, found, tables.MCCOptions(), table, "mark")
    assert marked is table and none == {}
    assert "counted in this table (audit.defective: mark)" in exclusion.footnotes(
        ds, found, "mark", none)


def test_a_run_without_trusted_early_step_is_undefined_with_the_reason():
    ds = _dataset()
    table = tables.mcc_table(ds)
    found = _found((0, 0), (0, 4), (0, 8), (0, 10))  # #205: everything up to the early step
    out, early = exclusion.table_without(ds, found, tables.MCCOptions(), table, "exclude")
    assert early[("70m", 0)].used is None
    assert out.mcc.isna().all() and (out.n_layers == 0).all()
    reason = out.undefined_reason.iloc[0]
    assert reason.startswith("undefined: early step 10 is flagged: same_as_main detail")
    assert reason.endswith("no trusted analysed step at or before it")
    md = tables.mcc_markdown(out)
    assert md.count("undefined[^") == 4 and "no trusted analysed step" in md
    # no test of chance either: no counts, no p-value, the plain label says so
    assert (out.n_both == 0).all() and (out.n_relabellings == 0).all()
    assert out.p_value.isna().all() and out.p_min.isna().all()
    assert set(out.verdict) == {"undefined"}
    assert tables.mcc_seed_summary(out).p_value.isna().all()
    grids = exclusion.grid_without(ds, found, tables.MCCOptions(), "exclude")
    assert grids["mcc"].isnull().all() and grids["p_value"].isnull().all()


def test_a_flagged_final_step_leaves_nothing_to_compare_with():
    ds = _dataset()
    table = tables.mcc_table(ds)
    out, _ = exclusion.table_without(ds, _found((0, 100), kind="trajectory"),
                                     tables.MCCOptions(), table, "exclude")
    assert out.mcc.isna().all()
    assert "the final step 100, the reference of CKA and PER, is flagged" in \
        out.undefined_reason.iloc[0]


def test_seeds_are_judged_one_by_one():
    ds = replicated_dataset((0, 1))
    ds = ds.assign(per_weight_normalized=ds.per_weight, per_grad_normalized=ds.per_grad)
    options = tables.MCCOptions()
    table = tables.mcc_table(ds, options)
    early = int(table.early_step.iloc[0])
    before = max(s for s in ds.step.values if s < early)
    out, changed = exclusion.table_without(ds, _found((1, early)), options, table, "exclude")
    assert list(changed) == [("70m", 1)]
    assert set(out[out.seed == 0].early_step) == {early}
    assert set(out[(out.seed == 1) & (out["size"] == "70m")].early_step) == {before}
    assert set(out[(out.seed == 1) & (out["size"] == "160m")].early_step) == {early}
    # the sensitivity grid follows: seed 1 of 70m at the earlier step, the rest unchanged
    grids = exclusion.grid_without(ds, _found((1, early)), options, "exclude")
    grid, plain = grids["mcc"], tables.mcc_grids(ds, options)
    for name in ("mcc", "p_value"):  # p: the stratified test over the same two seeds
        np.testing.assert_array_equal(grids[name].sel(size="160m").values,
                                      plain[name].sel(size="160m").values)
    runs = [tables.mcc_grid(ds.sel(seed=[0], size=["70m"]), options),
            tables.mcc_grid(ds.sel(seed=[1], size=["70m"], step=[before, 512]),
                            exclusion._at(options, before, 512))]
    expected = (runs[0].values + runs[1].values) / 2
    np.testing.assert_array_equal(grid.sel(size="70m").values, expected[0])
    assert exclusion.grid_without(ds, _found((1, early)), options, "mark") is None


def test_mark_dataset_and_the_figures_draw_flagged_revisions_hollow(tmp_path, monkeypatch):
    ds = make_metrics_dataset(SIZES_2).expand_dims(seed=[0], axis=1)
    found = _found((0, 4), (0, 8))
    marked = exclusion.mark_dataset(ds, found, "exclude")
    assert marked.excluded.dims == ("size", "step")
    assert marked.excluded.sel(size="70m").values.tolist() == [
        s in (4, 8) for s in ds.step.values]
    assert not marked.excluded.sel(size="160m").any()
    assert "70m: steps 4, 8" in marked.attrs["audit_note"]
    monkeypatch.setattr(figures, "PNG_DPI", 60)
    drawn = []
    real_save = figures.save_figure

    def keep(fig, stem):
        drawn.append(fig)
        return real_save(fig, stem)

    monkeypatch.setattr(figures, "save_figure", keep)
    x = np.asarray(ds.step.values, dtype=float)
    for policy, line_points in (("exclude", len(x) - 2), ("mark", len(x))):
        figures.figure2(exclusion.mark_dataset(ds, found, policy), tmp_path / policy)
        fig = drawn[-1]
        legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        assert ("flagged revision (left out)" if policy == "exclude"
                else "flagged revision (counted)") in legend
        first = fig.axes[0].get_lines()
        hollow = [ln for ln in first if ln.get_marker() == "o"
                  and ln.get_markerfacecolor() == "none"]
        assert len(hollow) == 1 and list(hollow[0].get_xdata()) == [4.0, 8.0]
        assert len(first[0].get_xdata()) == line_points
        assert "flagged revisions" in fig.get_supxlabel()


def test_symlog_axis_starts_at_the_first_analysed_step():
    """OLMo-1B-hf has no step 0: an axis starting at 0 would spend most of its width on
    steps nobody saved."""
    ds = make_metrics_dataset(SIZES_2, steps=[1000, 2000, 20000, 100000, 738020])
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    x = figures.x_values(ds, "step")
    ax.plot(x, x)
    figures.format_x(ax, "step", max_step=float(x.max()), min_step=float(x.min()))
    assert ax.get_xlim()[0] == 1000.0
    fig2, ax2 = plt.subplots()
    ax2.plot([0, 10, 512], [0, 1, 2])
    figures.format_x(ax2, "step", max_step=512.0)
    assert ax2.get_xlim()[0] == 0.0
    plt.close("all")


def test_undefined_cells_have_nan_results_but_keep_the_parameter_count():
    ds = _dataset()
    table = tables.mcc_table(ds)
    out, _ = exclusion.table_without(ds, _found((0, 0), (0, 4), (0, 8), (0, 10)),
                                     tables.MCCOptions(), table, "exclude")
    assert (out.n_params == table.n_params).all()
    assert all(math.isnan(v) for v in out.mcc_low) and not out.interval_spans_zero.any()

"""The CKA reduction on stored tiny-suite activations: both estimators, intervals, pairwise,
standardisation, the combined store, figures and the command line."""

from __future__ import annotations

import json
import math
import shutil
import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr

from lmdynamics.cli import run
from lmdynamics.estimators.rank import effective_rank, proportional_effective_rank
from lmdynamics.extraction.extract import ExtractionOptions, extract_checkpoint
from lmdynamics.options import defaults
from lmdynamics.reduction.cka import CKAOptions
from lmdynamics.reduction.metrics import combine_sizes, reduce_size, tidy_metrics
from lmdynamics.report import figures
from lmdynamics.report.cka import render_figure, select_cka
from lmdynamics.report.tables import header_line
from lmdynamics.sources.tiny import eval_batch, load_corpus, train_tiny_model
from lmdynamics.store import open_store, write_store
from support.cka_reference import biased_cka_gram, debiased_cka_gram

SPEC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
STEPS = [0, 2, 8]
FINAL = 8
BATCH, SEQ_LEN, TOKENS = 8, 32, 96


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list:
    """Per-pair stores of a tiny model trained here for 8 updates, at steps 0, 2, 8."""
    root = tmp_path_factory.mktemp("tinysuite")
    corpus = load_corpus()
    train_tiny_model(SPEC, size="t", out_dir=root / "ckpt", loss_csv=root / "loss.csv",
                     final_step=FINAL, log_until=8, interval=8, batch_size=BATCH,
                     seq_len=SEQ_LEN, lr=defaults("tiny")["lr"], warmup=2, seed=0,
                     threads=1, corpus=corpus)
    np.save(root / "eval.npy", eval_batch(corpus, final_step=FINAL, batch_size=BATCH,
                                          seq_len=SEQ_LEN, seed=0))
    return [extract_checkpoint(root / "ckpt" / f"step{s}", root / "eval.npy",
                               root / f"extract/step{s}.zarr", tokens=TOKENS, seed=0,
                               size="t", step=s, model_name="tiny-t", revision=f"step{s}",
                               options=ExtractionOptions(device="cpu")) for s in STEPS]


@pytest.fixture(scope="module")
def reduced(stores, tmp_path_factory):
    out = tmp_path_factory.mktemp("reduced") / "t.zarr"
    options = CKAOptions(bootstrap_samples=200, bootstrap_level=0.9, seed=3, standardize=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no undefined values here
        reduce_size(stores, out, final_step=FINAL, cka_options=options)
    return open_store(out).load()


def activations(stores, step: int, comp: int, layer: int) -> np.ndarray:
    ds = xr.open_zarr(stores[STEPS.index(step)], consolidated=False)
    return ds.activations.isel(component=comp, layer=layer).values.astype(np.float64)


def zscore(x: np.ndarray) -> np.ndarray:
    std = x.std(axis=0)
    return np.where(std > 0, (x - x.mean(axis=0)) / np.where(std > 0, std, 1), 0.0)


def test_both_estimators_match_gram_references_on_stored_activations(stores, reduced):
    assert reduced.attrs["bootstrap_samples"] == 200 and reduced.attrs["standardize"] is True
    assert reduced.attrs["bootstrap_sequences"] == BATCH
    for comp in range(2):
        for layer in range(SPEC["num_layers"]):
            ref = activations(stores, FINAL, comp, layer)
            for si, step in enumerate(STEPS):
                x = activations(stores, step, comp, layer)
                at = {"component": comp, "layer": layer, "step": si}
                assert float(reduced.cka[at]) == pytest.approx(biased_cka_gram(x, ref),
                                                               abs=1e-10)
                assert float(reduced.cka_debiased[at]) == pytest.approx(
                    debiased_cka_gram(x, ref), abs=1e-10)
                assert float(reduced.cka_debiased_standardized[at]) == pytest.approx(
                    debiased_cka_gram(zscore(x), zscore(ref)), abs=1e-9)
                for s2, other in enumerate(STEPS):
                    y = activations(stores, other, comp, layer)
                    pair = reduced.cka_debiased_pairwise.isel(step_ref=s2)[at]
                    assert float(pair) == pytest.approx(debiased_cka_gram(x, y), abs=1e-10)


def test_pairwise_final_column_is_the_cka_to_the_final_step(reduced):
    for name in ("cka", "cka_debiased"):
        pairwise = reduced[f"{name}_pairwise"]
        assert pairwise.dims == ("component", "layer", "step", "step_ref")
        np.testing.assert_allclose(pairwise.sel(step_ref=FINAL).values, reduced[name].values,
                                   atol=1e-12)
        np.testing.assert_allclose(pairwise.values, pairwise.transpose(
            "component", "layer", "step_ref", "step").values, atol=1e-12)


def test_bootstrap_intervals(reduced, stores, tmp_path):
    for name in ("cka", "cka_debiased", "cka_standardized", "cka_debiased_standardized"):
        low, high = reduced[f"{name}_low"].values, reduced[f"{name}_high"].values
        assert np.isfinite(low).all() and (low <= high).all(), name
        np.testing.assert_allclose(low[..., -1], 1.0, atol=1e-12)  # the final step vs itself
        np.testing.assert_allclose(high[..., -1], 1.0, atol=1e-12)
        point = reduced[name].values[..., :-1]
        inside = (low[..., :-1] <= point) & (point <= high[..., :-1])
        assert inside.mean() >= 0.75, name  # percentile intervals need not contain it
        mean_low = reduced[f"{name}_layer_mean_low"]
        assert mean_low.dims == ("component", "step")
        assert (mean_low.values <= reduced[f"{name}_layer_mean_high"].values).all()
    # seeded: a second reduction gives the same intervals; another seed different ones
    again = reduce_size(stores, tmp_path / "a.zarr", final_step=FINAL, cka_options=CKAOptions(
        bootstrap_samples=200, seed=3))
    np.testing.assert_array_equal(again.cka_debiased_low.values, reduced.cka_debiased_low.values)
    other = reduce_size(stores, tmp_path / "b.zarr", final_step=FINAL, cka_options=CKAOptions(
        bootstrap_samples=200, seed=4))
    assert not np.array_equal(other.cka_debiased_low.values, reduced.cka_debiased_low.values)
    plain = reduce_size(stores, tmp_path / "c.zarr", final_step=FINAL)
    assert "cka_low" not in plain and "cka_standardized" not in plain
    assert "cka_debiased_pairwise" in plain and plain.attrs["bootstrap_samples"] == 0


def test_undefined_cka_is_nan_with_a_warning_naming_size_step_layer(stores, tmp_path):
    paths = []
    for path in stores:
        ds = open_store(path).load()
        if ds.attrs["step"] == 2:
            acts = ds.activations.values.copy()
            acts[1, 0] = 0.25  # MLP layer 0 constant at step 2
            ds = ds.assign(activations=(ds.activations.dims, acts))
        paths.append(write_store(ds, tmp_path / f"{ds.attrs['step']}.zarr"))
    with pytest.warns(RuntimeWarning) as record:
        out = reduce_size(paths, tmp_path / "out.zarr", final_step=FINAL,
                          cka_options=CKAOptions(bootstrap_samples=20))
    messages = [str(w.message) for w in record]
    assert any(m.startswith("CKA undefined") and "size t step 2 mlp layer 0" in m
               for m in messages), messages
    assert any(m.startswith("debiased CKA undefined") and "size t step 2 mlp layer 0" in m
               for m in messages), messages
    for name in ("cka", "cka_debiased", "cka_low", "cka_debiased_high"):
        assert math.isnan(float(out[name].sel(component="mlp", layer=0, step=2))), name
        assert np.isfinite(out[name].sel(component="attention").values).all(), name
    pair = out.cka_pairwise.sel(component="mlp", layer=0)
    assert np.isnan(pair.sel(step=2)).all() and np.isnan(pair.sel(step_ref=2)).all()


def test_per_truncate_option(stores, tmp_path):
    kinds = {}
    for truncate in (True, False):
        ds = reduce_size(stores, tmp_path / f"{truncate}.zarr", final_step=FINAL,
                         per_divisor="head_dim", per_truncate=truncate)
        assert ds.attrs["per_truncate"] is truncate
        kinds[truncate] = ds
    sv = open_store(stores[-1]).weight_singular_values.values[0, 0]
    head_dim = SPEC["hidden_size"] // SPEC["num_heads"]
    at = {"component": "attention", "layer": 0, "step": FINAL}
    assert float(kinds[True].per_weight.sel(at)) == pytest.approx(
        proportional_effective_rank(sv, head_dim), rel=1e-12)
    assert float(kinds[False].per_weight.sel(at)) == pytest.approx(
        effective_rank(sv) / head_dim, rel=1e-12)
    assert float(kinds[False].per_weight.sel(at)) > 1.0  # more than head_dim values kept
    with pytest.raises(ValueError, match="per-size metrics disagree on per_truncate"):
        combine_sizes([tmp_path / "True.zarr", _renamed(kinds[False], tmp_path / "u.zarr")])


def _renamed(ds: xr.Dataset, path) -> object:
    return write_store(ds.assign_attrs(size="u", n_params=int(ds.attrs["n_params"]) * 3), path)


def test_combined_store_table_and_selection(reduced, tmp_path):
    first = write_store(reduced, tmp_path / "t.zarr")
    bigger = reduced.isel(layer=slice(0, 1)).assign_attrs(size="u", n_params=10**6)
    combined = combine_sizes([_renamed(bigger, tmp_path / "u.zarr"), first])
    assert list(combined["size"].values) == ["t", "u"]
    assert combined.cka_pairwise.dims == ("size", "seed", "component", "layer", "step",
                                          "step_ref")
    assert combined.seed.values.tolist() == [0]  # stores without replicates: one seed
    assert np.isnan(combined.cka_debiased_low.sel(size="u", layer=1)).all()
    assert combined.attrs["bootstrap_samples"] == 200 and combined.attrs["standardize"]
    table = tidy_metrics(combined)
    assert list(table.columns[:8]) == ["size", "seed", "component", "layer", "step", "cka",
                                       "per_weight", "per_grad"]
    assert {"cka_debiased", "cka_low", "cka_debiased_high",
            "cka_debiased_standardized"} <= set(table.columns)
    assert "cka_pairwise" not in table.columns and "cka_layer_mean_low" not in table.columns
    chosen = select_cka(combined, "debiased")
    np.testing.assert_array_equal(chosen.cka.values, combined.cka_debiased.values)
    np.testing.assert_array_equal(chosen.cka_layer_mean_low.values,
                                  combined.cka_debiased_layer_mean_low.values)
    np.testing.assert_array_equal(chosen.cka_pairwise.values,
                                  combined.cka_debiased_pairwise.values)
    assert not any(v.startswith("cka_debiased") for v in map(str, chosen.data_vars))
    assert chosen.attrs["cka_estimator"] == "debiased"
    standard = select_cka(combined, "biased", standardized=True)
    np.testing.assert_array_equal(standard.cka.values, combined.cka_standardized.values)
    assert "cka_pairwise" not in standard  # pairwise is computed for raw activations only
    with pytest.raises(ValueError, match="lacks 'cka_debiased_standardized'.*standardize"):
        select_cka(combined.drop_vars("cka_debiased_standardized"), "debiased",
                   standardized=True)
    with pytest.raises(ValueError, match="'mean'.*biased, debiased"):
        select_cka(combined, "mean")
    assert "debiased CKA ≥ 0.45" in header_line(
        pd.DataFrame({"early_step": [2]}),
        {"cka_threshold": 0.45, "early_fraction": 0.1, "per_weight_threshold": 0.95,
         "per_grad_fraction": 0.9, "final_step": 8, "cka_estimator": "debiased"})


def test_combine_stacks_seed_replicates_and_refuses_an_incomplete_grid(reduced, tmp_path):
    # a second replicate: the same size with other values (as another training run gives)
    other = (reduced * 0.5).assign_attrs({**reduced.attrs, "seed": 3})
    for name in ("flag_nonfinite", "flag_duplicate"):
        other[name] = reduced[name]
    runs = [write_store(reduced, tmp_path / "s0.zarr"), write_store(other, tmp_path / "s3.zarr")]
    combined = combine_sizes(runs[::-1])
    assert combined.seed.values.tolist() == [0, 3]
    assert combined.cka.dims == ("size", "seed", "component", "layer", "step")
    np.testing.assert_array_equal(combined.cka.sel(size="t", seed=0).values, reduced.cka.values)
    np.testing.assert_array_equal(combined.cka.sel(size="t", seed=3).values,
                                  reduced.cka.values * 0.5)
    assert "seed" not in combined.attrs and combined.flagged.dims == ("size", "step")
    table = tidy_metrics(combined)
    assert table.groupby("seed").size().to_dict() == {0: len(table) // 2, 3: len(table) // 2}
    # a size lacking a seed the other has is refused, naming both
    bigger = _renamed(reduced, tmp_path / "u.zarr")
    with pytest.raises(ValueError, match=r"lack seed\(s\) \[3\] of size u"):
        combine_sizes([*runs, bigger])
    with pytest.raises(ValueError, match="two metrics datasets for size t seed 0"):
        combine_sizes([runs[0], write_store(reduced, tmp_path / "again.zarr")])


@pytest.mark.parametrize(("name", "estimator"), [
    ("figure2", "debiased"), ("figure2_standardized", "biased"), ("figure6", "debiased"),
    ("figure6", "biased")])
def test_figures_from_the_combined_store(reduced, tmp_path, monkeypatch, name, estimator):
    import matplotlib.pyplot as plt

    monkeypatch.setattr(figures, "PNG_DPI", 80)
    combined = combine_sizes([write_store(reduced, tmp_path / "t.zarr")])
    paths = render_figure(name, combined, tmp_path / name, estimator=estimator,
                          x_axis="fraction" if name == "figure6" else "step")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert plt.get_fignums() == []


def test_reduce_command_line(stores, tmp_path):
    out = tmp_path / "cli.zarr"
    options = {"metrics": {"per_truncate": False, "standardize": True,
                           "bootstrap": {"samples": 30, "level": 0.8}}, "seed": 1,
               "final_step": FINAL}
    run(["reduce", *map(str, stores), "--options",
         json.dumps(options), "--out", str(out)])
    ds = open_store(out)
    assert ds.attrs["per_truncate"] is False and ds.attrs["standardize"] is True
    assert ds.attrs["bootstrap_level"] == 0.8 and "cka_debiased_standardized_low" in ds
    with pytest.raises(ValueError, match="metrics.standardize': 'maybe'"):
        run(["reduce", str(stores[0]), "--options",
             '{"metrics": {"standardize": "maybe"}, "final_step": 8}', "--out", str(out)])
    with pytest.raises(ValueError, match=r"metrics.bootstrap.level=1.5.*\(0, 1\)"):
        CKAOptions(bootstrap_level=1.5)
    with pytest.raises(ValueError, match="metrics.bootstrap.samples=-1"):
        CKAOptions(bootstrap_samples=-1)


def test_bootstrap_with_one_sequence_warns_and_leaves_intervals_nan(stores, tmp_path):
    paths = []
    for path in stores:
        ds = open_store(path).load()
        ds = ds.assign_coords(sequence=("token", np.zeros(ds.sizes["token"], dtype=np.int64)))
        paths.append(write_store(ds, tmp_path / f"{ds.attrs['step']}.zarr"))
    with pytest.warns(RuntimeWarning, match="size t.*1 sequence.*at least 2"):
        out = reduce_size(paths, tmp_path / "o.zarr", final_step=FINAL,
                          cka_options=CKAOptions(bootstrap_samples=10))
    assert "cka_low" not in out and np.isfinite(out.cka_debiased.values).all()
    shutil.rmtree(tmp_path / "o.zarr")


def test_reduction_stores_the_random_per_baseline_and_cka_resamples(reduced, stores):
    from lmdynamics.estimators.rank import per_divisor, random_gaussian_per

    hidden = SPEC["hidden_size"]
    for comp, shape in (("attention", (hidden, hidden)), ("mlp", (hidden, 4 * hidden))):
        base = random_gaussian_per(shape, hidden)
        assert float(reduced["per_random"].sel(component=comp)) == base.mean
        assert float(reduced["per_random_se"].sel(component=comp)) == base.stderr
        for var in ("per_weight", "per_grad"):
            ratio = reduced[var].sel(component=comp) / base.mean
            np.testing.assert_allclose(reduced[f"{var}_normalized"].sel(component=comp), ratio,
                                       rtol=1e-15)
    assert 0.75 < float(reduced["per_random"].sel(component="attention")) < 0.81
    assert 0.95 < float(reduced["per_random"].sel(component="mlp")) < 0.97
    # head_dim PER from the stored singular values, by hand
    k = per_divisor("head_dim", n_singular_values=hidden, hidden_size=hidden,
                    num_attention_heads=SPEC["num_heads"])
    ds = xr.open_zarr(stores[STEPS.index(FINAL)], consolidated=False)
    s = np.sort(ds["grad_singular_values"].sel(component="mlp").isel(layer=1).values)[::-1][:k]
    p = s / s.sum()
    expected = np.exp(-np.sum(p * np.log(p))) / k
    got = float(reduced["per_grad_head_dim"].sel(component="mlp", layer=1, step=FINAL))
    assert got == pytest.approx(expected, rel=1e-12)
    # every bootstrap resample's CKA, whose percentiles are the stored interval
    res = reduced["cka_debiased_resamples"]
    assert res.dims == ("component", "layer", "step", "resample") and res.sizes["resample"] == 200
    low = np.nanquantile(res.values, 0.05, axis=-1)
    np.testing.assert_allclose(low, reduced["cka_debiased_low"].values, rtol=1e-12)
    assert "cka_standardized_resamples" not in reduced


def test_sub_batch_gradient_per(reduced, stores, tmp_path):
    """``per_grad_sub`` is the PER of each stored sub-batch gradient spectrum; stores without
    them (written before ``extraction.grad_sub_batches``) still reduce, without it."""
    final = open_store(stores[-1]).load()
    sub = final["grad_sub_singular_values"].values  # (sub_batch, component, layer, k)
    assert sub.shape[0] == 4  # the schema's default, 2 of the 8 sequences each
    k = sub.shape[-1]
    for j in range(4):
        at = {"component": "mlp", "layer": 1, "step": FINAL, "sub_batch": j}
        assert float(reduced.per_grad_sub.sel(at)) == pytest.approx(
            proportional_effective_rank(sub[j, 1, 1], k), rel=1e-12)
        assert float(reduced.per_grad_sub_normalized.sel(at)) == pytest.approx(
            float(reduced.per_grad_sub.sel(at) / reduced.per_random.sel(component="mlp")))
    assert reduced.per_grad_sub.dims == ("component", "layer", "step", "sub_batch")
    assert "per_grad_sub_head_dim" in reduced
    # old stores: no sub-batches anywhere -> no variable, no warning; in some only -> warning
    old = [write_store(open_store(p).load().drop_vars("grad_sub_singular_values"),
                       tmp_path / f"old{i}.zarr") for i, p in enumerate(stores)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        plain = reduce_size(old, tmp_path / "plain.zarr", final_step=FINAL)
    assert "per_grad_sub" not in plain
    np.testing.assert_array_equal(plain.per_grad.values, reduced.per_grad.values)
    mixed = [*old[:-1], stores[-1]]
    with pytest.warns(RuntimeWarning, match="per_grad_sub left out for size t"):
        assert "per_grad_sub" not in reduce_size(mixed, tmp_path / "m.zarr", final_step=FINAL)
    # combining a size with sub-batches and one without leaves them out, with a warning
    reduce_size(stores, tmp_path / "t.zarr", final_step=FINAL)
    with_sub = tmp_path / "t.zarr"
    with pytest.warns(RuntimeWarning, match="per_grad_sub left out of the combined metrics"):
        combined = combine_sizes([with_sub, _renamed(plain, tmp_path / "u.zarr")])
    assert "per_grad_sub" not in combined and "per_grad" in combined
    assert "per_grad_sub" in combine_sizes([with_sub])

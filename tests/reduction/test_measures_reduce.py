"""The measures in the per-size reduction, on stores of a tiny model trained and extracted
here: every measure against a float64 reference computed from the stored activations or the
checkpoint's own tensors (tests/measure_reference.py, repsim), stores written before the
measures' data existed, the options, the combined store, the CSV and the figures.

Tolerances: PWCCA vs repsim 1e-10; SVCCA vs google/svcca's cca_core algorithm 1e-6 (its
regularisation epsilon); Gini, Hoyer, max norm 1e-12 absolute; norms, PER 1e-9 relative;
condition numbers 1e-6 relative (the Gram route's smallest singular value).
"""

from __future__ import annotations

import json
import re
import warnings

import numpy as np
import pytest
import repsim
import xarray as xr
from safetensors.numpy import load_file

from lmdynamics.cli import run
from lmdynamics.estimators.cca import ActivationPair, CenteredSVD, unit_correlations
from lmdynamics.estimators.measures import MEASURES, chosen
from lmdynamics.extraction.extract import ExtractionOptions, extract_checkpoint
from lmdynamics.extraction.names import MEASURE_INPUTS
from lmdynamics.options import defaults
from lmdynamics.reduction.measures import MeasureOptions
from lmdynamics.reduction.metrics import combine_sizes, reduce_size, tidy_metrics
from lmdynamics.report.measures import measure_figure
from lmdynamics.sources.tiny import eval_batch, load_corpus, train_tiny_model
from lmdynamics.store import IncompleteStoreError, open_store, write_store
from support.measure_reference import (
    effective_rank_reference,
    gini_hurley_rickard,
    hoyer_reference,
    ov_heads,
    svcca_reference,
)

SPEC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
STEPS = [0, 2, 8]
FINAL = 8
BATCH, SEQ_LEN, TOKENS = 8, 32, 96
#: Every measure on every data kind it allows, both references for the comparative ones.
EVERYTHING = {name: {"data": list(m.data), **({"reference": ["final", "pairwise"]}
                                              if m.comparative else {}),
                     **{p: defaults("measures")[name][p] for p in m.parameters}}
              for name, m in MEASURES.items()}
#: Stored variables the extraction adds for the measures (absent from older stores).
NEW_INPUTS = sorted({v for v in MEASURE_INPUTS.values()}
                    - {"activations", "weight_singular_values", "grad_singular_values"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained here for 8 updates, and its stores at steps 0, 2, 8."""
    root = tmp_path_factory.mktemp("measures")
    corpus = load_corpus()
    train_tiny_model(SPEC, size="t", out_dir=root / "ckpt", loss_csv=root / "loss.csv",
                     final_step=FINAL, log_until=8, interval=8, batch_size=BATCH,
                     seq_len=SEQ_LEN, lr=defaults("tiny")["lr"], warmup=2, seed=0,
                     threads=1, corpus=corpus)
    np.save(root / "eval.npy", eval_batch(corpus, final_step=FINAL, batch_size=BATCH,
                                          seq_len=SEQ_LEN, seed=0))
    for s in STEPS:
        extract_checkpoint(root / "ckpt" / f"step{s}", root / "eval.npy",
                           root / f"extract/step{s}.zarr", tokens=TOKENS, seed=0, size="t",
                           step=s, model_name="tiny-t", revision=f"step{s}",
                           options=ExtractionOptions(device="cpu"))
    return root


def stores(root) -> list:
    return [root / f"extract/step{s}.zarr" for s in STEPS]


@pytest.fixture(scope="module")
def reduction(run_dir):
    """Every measure of the stores, and the text of the warnings the reduction gave."""
    out = run_dir / "reduced.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        reduce_size(stores(run_dir), out, final_step=FINAL,
                    measure_options=MeasureOptions.from_config(EVERYTHING))
    return open_store(out).load(), "\n".join(str(w.message) for w in caught)


@pytest.fixture(scope="module")
def reduced(reduction):
    return reduction[0]


def acts(root, step: int, ci: int, layer: int) -> np.ndarray:
    ds = xr.open_zarr(root / f"extract/step{step}.zarr", consolidated=False)
    return ds.activations.isel(component=ci, layer=layer).values.astype(np.float64)


def weights(root, step: int) -> dict:
    return load_file(root / "ckpt" / f"step{step}" / "model.safetensors")


WRITE = {"attention": "attention.dense.weight", "mlp": "mlp.dense_4h_to_h.weight"}


def references(matrix: np.ndarray) -> dict[str, float]:
    """Every single-checkpoint measure of one matrix, from LAPACK and the papers' formulas."""
    s = np.linalg.svd(matrix, compute_uv=False)
    return {"condition_number": float(np.linalg.cond(matrix, 2)),
            "spectral_norm": float(np.linalg.norm(matrix, 2)),
            "nuclear_norm": float(np.linalg.norm(matrix, "nuc")),
            "frobenius_norm": float(np.linalg.norm(matrix, "fro")),
            "per": effective_rank_reference(s) / s.size,
            "max_norm": float(np.abs(matrix).max()),
            "gini": gini_hurley_rickard(matrix), "hoyer": hoyer_reference(matrix)}


def check(value: float, expected: float, name: str, where) -> None:
    if name in ("gini", "hoyer", "max_norm"):
        assert value == pytest.approx(expected, abs=1e-12), (name, where)
    elif name == "condition_number":
        assert value == pytest.approx(expected, rel=1e-6), (name, where)
    else:
        assert value == pytest.approx(expected, rel=1e-9), (name, where)


def test_single_checkpoint_measures_match_float64_references(run_dir, reduced):
    for si, step in enumerate(STEPS):
        state = weights(run_dir, step)
        for ci, comp in enumerate(("attention", "mlp")):
            for layer in range(SPEC["num_layers"]):
                where = (step, comp, layer)
                at = {"component": ci, "layer": layer, "step": si}
                act = references(acts(run_dir, step, ci, layer))
                w = references(state[f"gpt_neox.layers.{layer}.{WRITE[comp]}"]
                               .astype(np.float64))
                for name in MEASURES:
                    if "activations" in MEASURES[name].data and not MEASURES[name].comparative:
                        check(float(reduced[f"{name}_act"][at]), act[name], name, where)
                    if "weights" in MEASURES[name].data:
                        check(float(reduced[f"{name}_weight"][at]), w[name], name, where)
            for layer in range(SPEC["num_layers"]):
                for h, ov in enumerate(ov_heads("gpt_neox", state, layer, SPEC["num_heads"])):
                    s = np.linalg.svd(ov, compute_uv=False)[:SPEC["hidden_size"]
                                                             // SPEC["num_heads"]]
                    expected = {"condition_number": s[0] / s[-1], "spectral_norm": s[0],
                                "nuclear_norm": s.sum(),
                                "frobenius_norm": np.sqrt(np.sum(s**2)),
                                "per": effective_rank_reference(s) / s.size}
                    at = {"layer": layer, "head": h, "step": si}
                    for name, value in expected.items():
                        check(float(reduced[f"{name}_ov_heads"][at]), value, name,
                              (step, layer, h))
    # the OV rows: the mean over heads in the attention row, nothing for the MLP
    mean = reduced["per_ov_heads"].mean("head").transpose("layer", "step")
    np.testing.assert_allclose(reduced["per_ov"].sel(component="attention"), mean, rtol=1e-15)
    assert reduced["per_ov"].sel(component="mlp").isnull().all()


def test_gradient_measures_and_the_singular_gradients_of_layernorm_models(reduced):
    for name in ("gini", "hoyer", "max_norm", "spectral_norm", "nuclear_norm"):
        values = reduced[f"{name}_grad"].values
        assert np.isfinite(values).all() and (values > 0).all(), name
    # every residual-stream gradient is orthogonal to the all-ones direction LayerNorm
    # removes, so the write matrices' gradients are singular: condition number NaN
    assert reduced["condition_number_grad"].isnull().all()


def test_pwcca_and_svcca_match_repsim_and_google_svcca_on_stored_activations(run_dir,
                                                                             reduction):
    reduced, warned = reduction
    fi = STEPS.index(FINAL)
    checked = 0
    for ci in range(2):
        for layer in range(SPEC["num_layers"]):
            ref_basis = CenteredSVD.from_activations(acts(run_dir, FINAL, ci, layer))
            for si, step in enumerate(STEPS):
                x, ref = acts(run_dir, step, ci, layer), acts(run_dir, FINAL, ci, layer)
                sv = float(reduced["svcca"].isel(component=ci, layer=layer, step=si))
                assert sv == pytest.approx(svcca_reference(x, ref), abs=1e-6), (ci, layer)
                pw = reduced["pwcca_pairwise"].isel(component=ci, layer=layer)
                # vs final is the final column of the pairwise matrix, weighted by the step
                assert float(reduced["pwcca"].isel(component=ci, layer=layer, step=si)) \
                    == float(pw[si, fi])
                shared = unit_correlations(ActivationPair.of(
                    CenteredSVD.from_activations(x), ref_basis))
                if si == fi or shared >= 2:  # PWCCA is not unique there (shared directions)
                    continue
                both = (float(pw[si, fi]) + float(pw[fi, si])) / 2
                assert both == pytest.approx(repsim.pwcca([x, ref])[0, 1], abs=1e-10)
                checked += 1
    assert checked >= 4
    np.testing.assert_allclose(reduced["svcca"].isel(step=fi), 1.0, atol=1e-12)
    np.testing.assert_allclose(reduced["pwcca"].isel(step=fi), 1.0, atol=1e-12)
    np.testing.assert_allclose(reduced["svcca_pairwise"], reduced["svcca_pairwise"].transpose(
        "component", "layer", "step_ref", "step").values, atol=1e-12)  # symmetric
    # GPT-NeoX's first MLP (parallel residual) reads the token's embedding alone: its
    # outputs at two steps share directions, which the reduction reports
    assert re.search(r"PWCCA/SVCCA of size t: up to \d+ canonical correlations are exactly "
                     r"1 \(mlp layer 0, .*not unique", warned), warned


def _old_copy(run_dir, tmp, steps) -> list:
    """The stores with the measures' data removed from ``steps``: what an extraction made
    before it existed (the same writer, so the same format and digests)."""
    out = []
    for s, path in zip(STEPS, stores(run_dir), strict=True):
        ds = open_store(path).load()
        if s in steps:
            ds = ds.drop_vars(NEW_INPUTS).drop_dims(["act_k", "head", "ov_k",
                                                     "element_stat"], errors="ignore")
        target = tmp / f"step{s}.zarr"
        write_store(ds, target)
        out.append(target)
    return out


def test_old_stores_reduce_with_the_missing_measures_nan_and_named(run_dir, reduced, tmp_path):
    paths = _old_copy(run_dir, tmp_path, steps={0, 2})
    with pytest.warns(RuntimeWarning) as caught:
        ds = reduce_size(paths, tmp_path / "old.zarr", final_step=FINAL,
                         measure_options=MeasureOptions.from_config(EVERYTHING))
    text = "\n".join(str(w.message) for w in caught)
    for variable in ("activation_singular_values", "ov_singular_values",
                     "weight_element_stats", "grad_element_stats"):
        assert f"the stores of steps [0, 2] lack {variable}" in text, variable
    assert "rerun those extractions" in text
    assert ds["gini_weight"].sel(step=[0, 2]).isnull().all()
    assert ds["gini_weight"].sel(step=FINAL).notnull().all()
    assert ds["per_ov"].sel(component="attention", step=[0, 2]).isnull().all()
    # what the old stores hold is unaffected: CKA, PER, PWCCA (activations), weights' norms
    for name in ("cka", "cka_debiased", "per_weight", "per_grad", "pwcca", "svcca",
                 "spectral_norm_weight", "condition_number_weight"):
        np.testing.assert_allclose(ds[name], reduced[name], rtol=1e-12, err_msg=name)


def test_a_measure_input_of_the_wrong_layout_is_refused_in_one_line(run_dir, tmp_path):
    paths = _old_copy(run_dir, tmp_path, steps=set())
    ds = open_store(paths[1]).load()
    ds["ov_singular_values"] = ds["ov_singular_values"].transpose("head", "layer", "ov_k")
    bad = tmp_path / "bad.zarr"
    write_store(ds, bad)
    with pytest.raises(IncompleteStoreError, match=r"bad.zarr: ov_singular_values has dims"):
        reduce_size([paths[0], bad, paths[2]], tmp_path / "r.zarr", final_step=FINAL)


def test_measure_options_choose_what_is_computed(run_dir, tmp_path):
    out = tmp_path / "none.zarr"
    ds = reduce_size(stores(run_dir), out, final_step=FINAL,
                     measure_options=MeasureOptions(()))
    assert not [v for v in ds.data_vars if str(v).split("_")[0] in
                {"pwcca", "svcca", "gini", "hoyer", "condition", "spectral", "nuclear",
                 "frobenius", "max"}]
    assert json.loads(ds.attrs["measures"]) == {}
    # the command line: --options picks measures and data
    out = tmp_path / "some.zarr"
    opts = {"measures": {name: {"data": []} for name in MEASURES}, "final_step": FINAL}
    opts["measures"]["gini"] = {"data": ["weights"]}
    opts["measures"]["svcca"] = {"data": ["activations"], "reference": ["pairwise"],
                                 "variance": 0.5}
    run(["reduce", *map(str, stores(run_dir)), "--options",
         json.dumps(opts), "--out", str(out)])
    got = open_store(out)
    assert "gini_weight" in got and "gini_grad" not in got and "hoyer_weight" not in got
    assert "svcca_pairwise" in got and "svcca" not in got
    assert json.loads(got.attrs["measures"])["svcca"]["variance"] == 0.5
    assert MeasureOptions() == MeasureOptions.from_config(defaults("measures"))
    with pytest.raises(ValueError, match="measures.gini.data"):
        chosen({"gini": {"data": ["ov_circuit"]}})


def test_combined_store_csv_and_a_figure_per_measure(reduced, run_dir, tmp_path):
    path = tmp_path / "t.zarr"
    write_store(reduced, path)
    combined = combine_sizes([path])
    assert combined["gini_weight"].dims == ("size", "seed", "component", "layer", "step")
    assert combined["per_ov_heads"].dims == ("size", "seed", "layer", "head", "step")
    table = tidy_metrics(combined)
    for column in ("pwcca", "svcca", "gini_weight", "hoyer_grad", "per_act", "per_ov",
                   "condition_number_weight", "max_norm_act"):
        assert column in table.columns, column
    assert table["per_ov"].notna().sum() == (table["component"] == "attention").sum()
    for name in MEASURES:
        paths = measure_figure(name, combined, tmp_path / f"measure_{name}")
        assert all(p.stat().st_size > 5000 for p in paths), name
    with pytest.raises(ValueError, match="unknown measure"):
        measure_figure("cka", combined, tmp_path / "x")
    # a measure without any value (here: dropped) still gets a figure that says so
    paths = measure_figure("gini", combined.drop_vars(
        [v for v in combined.data_vars if str(v).startswith("gini")]), tmp_path / "empty")
    assert paths[0].stat().st_size > 1000

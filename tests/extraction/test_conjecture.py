"""The Conjecture statistics on real (tiny, trained) checkpoints: collection in the extraction
pass, per-pair stores, per-size and combined reductions, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import xarray as xr

from lmdynamics.config import conjecture_errors
from lmdynamics.extraction.conjecture import ResidualRecorder, StatsOptions
from lmdynamics.extraction.extract import extract_checkpoint, sample_token_positions
from lmdynamics.extraction.names import param_key, param_parts, param_sort_key
from lmdynamics.extraction.passes import run_pass
from lmdynamics.extraction.reference import build_reference
from lmdynamics.extraction.stats import Moments
from lmdynamics.reduction.stats import STAT_VARIABLES, combine_stats, reduce_stats
from lmdynamics.report import conjecture as conjecture_figures
from lmdynamics.sources import tiny
from lmdynamics.sources.checkpoints import CheckpointMismatchError, ReferenceWeights, load_model
from lmdynamics.store import IncompleteStoreError, open_store, write_array_atomic

SPECS = {"a": {"hidden_size": 16, "num_layers": 2, "num_heads": 2},
         "b": {"hidden_size": 24, "num_layers": 3, "num_heads": 2}}
FINAL = 8
STEPS = (0, 4, FINAL)
TOKENS = 64


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    """Two tiny sizes trained for 8 updates; their reference stores; per-pair stores with
    statistics at 3 steps."""
    root = tmp_path_factory.mktemp("conjecture")
    corpus = tiny.load_corpus()
    batch = tiny.eval_batch(corpus, final_step=FINAL, batch_size=4, seq_len=32, seed=0)
    write_array_atomic(batch, root / "eval_batch.npy")
    for size, spec in SPECS.items():
        ck = root / "checkpoints" / size
        tiny.train_tiny_model(spec, size=size, out_dir=ck, loss_csv=root / f"{size}.csv",
                              final_step=FINAL, log_until=4, interval=4, batch_size=4,
                              seq_len=32, lr=1e-2, warmup=1, seed=0, threads=1,
                              corpus=corpus)
        build_reference(ck / "step0", ck / f"step{FINAL}", root / "reference" / f"{size}.zarr",
                        size=size, top_k=4, final_step=FINAL)
        for step in STEPS:
            extract_checkpoint(ck / f"step{step}", root / "eval_batch.npy",
                               root / "extract" / size / f"step{step}.zarr", tokens=TOKENS,
                               seed=0, size=size, step=step, model_name=f"tiny-{size}",
                               revision=f"step{step}", stats=_options(root, size))
    return root


def _options(root: Path, size: str, **kw) -> StatsOptions:
    return StatsOptions(root / "reference" / f"{size}.zarr", top_k=4, **kw)


def _store(root: Path, size: str, step: int) -> xr.Dataset:
    return open_store(root / "extract" / size / f"step{step}.zarr").load()


def test_param_names():
    assert param_key("gpt_neox.layers.3.mlp.dense_4h_to_h.weight") == (
        "layer3.mlp.dense_4h_to_h.weight")
    assert param_key("gpt_neox.embed_in.weight") == "embed_in.weight"
    assert param_key("lm_head.weight") == param_key("embed_out.weight") == "embed_out.weight"
    assert param_parts("layer3.attention.dense.bias") == (3, "attention.dense", "bias")
    assert param_parts("embed_out") == (-1, "embed_out", "weight")
    names = ["embed_out.weight", "layer10.attention.dense.weight", "final_layer_norm.bias",
             "layer2.mlp.dense_4h_to_h.bias", "layer2.input_layernorm.weight",
             "embed_in.weight", "layer2.mlp.dense_4h_to_h.weight"]
    assert sorted(names, key=param_sort_key) == [
        "embed_in.weight", "layer2.input_layernorm.weight", "layer2.mlp.dense_4h_to_h.weight",
        "layer2.mlp.dense_4h_to_h.bias", "layer10.attention.dense.weight",
        "final_layer_norm.bias", "embed_out.weight"]


def test_stats_options_are_checked(tmp_path):
    for kw, match in [({"top_k": 0}, "conjecture.top_k': 0"),
                      ({"spectrum_fit": (0.5, 0.5)}, "spectrum_fit"),
                      ({"spectrum_fit": (0.2, 1.5)}, "spectrum_fit.1': 1.5"),
                      ({"max_elements": 3}, "conjecture.max_elements': 3")]:
        with pytest.raises(ValueError, match=match):
            StatsOptions(tmp_path, **kw)


def test_store_carries_every_statistic_and_keeps_the_pass_variables(suite, tmp_path):
    ds = _store(suite, "a", 4)
    assert all(v in ds for v in STAT_VARIABLES)
    n_params = sum(1 for _ in load_model(suite / "checkpoints/a/step4").parameters())
    assert ds.stat_param.dims == ("param", "param_stat") and ds.sizes["param"] == n_params
    assert ds.stat_weight.dims == ("param", "shape_stat")
    assert ds.stat_act.dims == ("site", "layer", "shape_stat")
    assert ds.stat_spectrum.sizes["matrix"] == 2 + 4 * SPECS["a"]["num_layers"]
    assert ds.stat_embedding_corr.shape == (256, 256)
    # the pass's own variables are those of an extraction without statistics
    plain = extract_checkpoint(suite / "checkpoints/a/step4", suite / "eval_batch.npy",
                               tmp_path / "plain.zarr", tokens=TOKENS, seed=0, size="a",
                               step=4, model_name="tiny-a", revision="step4")
    plain = open_store(plain).load()
    assert not [v for v in plain.data_vars if v.startswith("stat_")]
    for var in plain.data_vars:
        np.testing.assert_array_equal(plain[var].values, ds[var].values)


def test_distance_from_init_is_zero_at_step_zero_and_cosine_to_final_one_at_the_end(suite):
    first, last = _store(suite, "a", 0), _store(suite, "a", FINAL)
    assert (first.stat_param.sel(param_stat="dist_init").values == 0).all()
    np.testing.assert_allclose(first.stat_param.sel(param_stat="cos_init").dropna("param"), 1,
                               rtol=1e-12)
    np.testing.assert_allclose(last.stat_param.sel(param_stat="cos_final").dropna("param"), 1,
                               rtol=1e-12)
    np.testing.assert_allclose(last.stat_direction_closeness.values, 1.0, rtol=1e-9)
    # biases start at zero: relative distance and cosine to step 0 undefined (NaN), not 0
    bias = "layer0.attention.dense.bias"
    assert math.isnan(float(last.stat_param.sel(param=bias, param_stat="rel_dist_init")))
    mid = _store(suite, "a", 4)
    qkv = "layer1.attention.query_key_value.weight"
    assert 0 < float(mid.stat_param.sel(param=qkv, param_stat="rel_dist_init")) < math.inf
    assert (mid.stat_direction_closeness.values < 1).all()


def test_weight_and_gradient_statistics_match_a_direct_computation(suite):
    ds = _store(suite, "a", 4)
    model = load_model(suite / "checkpoints/a/step4")
    init = load_model(suite / "checkpoints/a/step0")
    batch = torch.as_tensor(np.load(suite / "eval_batch.npy"))
    model(input_ids=batch, labels=batch).loss.backward()
    name = "gpt_neox.layers.1.mlp.dense_h_to_4h.weight"
    w = dict(model.named_parameters())[name]
    w0 = dict(init.named_parameters())[name].detach().double().numpy()
    wn, gn = w.detach().double().numpy(), w.grad.double().numpy()
    row = ds.stat_param.sel(param=param_key(name)).to_series()
    np.testing.assert_allclose(row["norm"], np.linalg.norm(wn), rtol=1e-12)
    np.testing.assert_allclose(row["grad_norm"], np.linalg.norm(gn), rtol=1e-5)
    np.testing.assert_allclose(row["dist_init"], np.linalg.norm(wn - w0), rtol=1e-12)
    shape = ds.stat_weight.sel(param=param_key(name)).to_series()
    np.testing.assert_allclose(shape["kurtosis"], Moments.of(wn).excess_kurtosis, rtol=1e-12)
    np.testing.assert_allclose(shape["max_abs"], np.abs(wn).max(), rtol=1e-12)
    np.testing.assert_allclose(ds.stat_weight_quantile.sel(param=param_key(name)),
                               np.quantile(wn, ds["quantile"].values), rtol=1e-12)
    g_shape = ds.stat_grad.sel(param=param_key(name)).to_series()
    np.testing.assert_allclose(g_shape["std"], gn.std(), rtol=1e-5)
    spectrum = ds.stat_spectrum.sel(matrix="layer1.mlp.dense_h_to_4h").values
    np.testing.assert_allclose(spectrum[np.isfinite(spectrum)],
                               np.linalg.svd(wn, compute_uv=False), rtol=1e-8)
    emb = dict(model.named_parameters())["gpt_neox.embed_in.weight"].detach().double().numpy()
    np.testing.assert_allclose(ds.stat_embedding_corr.values, np.corrcoef(emb), atol=1e-6)


def test_residual_recorder_matches_hidden_states_and_micro_batches(suite):
    model = load_model(suite / "checkpoints/b/step4")
    batch = torch.as_tensor(np.load(suite / "eval_batch.npy"))
    seq, pos = sample_token_positions(*batch.shape, TOKENS, 0)
    whole, parts = ResidualRecorder(model), ResidualRecorder(model)
    hooks_before = len(model.gpt_neox.layers[0]._forward_hooks)
    run_pass(model, batch, seq, pos, extra_hooks=whole.hooks)
    run_pass(model, batch, seq, pos, micro_batch=3, extra_hooks=parts.hooks)
    assert len(model.gpt_neox.layers[0]._forward_hooks) == hooks_before  # handles removed
    with torch.no_grad():
        hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    n = SPECS["b"]["num_layers"]
    for i in range(n - 1):  # the last hidden state is after the final layer norm
        np.testing.assert_allclose(whole.max_abs[i], float(hidden[i + 1].abs().max()),
                                   rtol=1e-6)
        np.testing.assert_allclose(whole.sampled()[i], hidden[i + 1][seq, pos].numpy(),
                                   rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(parts.max_abs, whole.max_abs, rtol=1e-5)
    np.testing.assert_allclose(parts.sampled(), whole.sampled(), rtol=1e-5, atol=1e-6)


def test_reference_weights_accept_pythia_names_and_name_missing_tensors(tmp_path):
    """Pythia's files name the unembedding ``embed_out``; transformers' own renaming maps
    it to today's ``lm_head`` (tests/pythia_files.py)."""
    from support.pythia_files import pythia_config

    (tmp_path / "config.json").write_text(json.dumps(pythia_config(16, 2, 2, 512)))
    safetensors.torch.save_file({"embed_out.weight": torch.ones(2, 2)},
                                tmp_path / "model.safetensors")
    ref = ReferenceWeights(tmp_path)
    assert ref["lm_head.weight"].shape == (2, 2)
    with pytest.raises(CheckpointMismatchError, match="no tensor 'gpt_neox.embed_in.weight'"):
        ref["gpt_neox.embed_in.weight"]


def test_reduce_and_combine(suite, tmp_path):
    per_size = []
    for size in SPECS:
        paths = [suite / "extract" / size / f"step{s}.zarr" for s in reversed(STEPS)]
        out = tmp_path / f"{size}.zarr"
        ds = reduce_stats(paths, out, final_step=FINAL)
        assert list(ds.step.values) == list(STEPS)
        assert ds.stat_param.dims == ("step", "param", "param_stat")
        per_size.append(out)
    combined = combine_stats(per_size[::-1])
    assert list(combined["size"].values) == ["a", "b"]  # by parameter count
    assert combined.stat_resid_max_abs.dims == ("size", "seed", "step", "layer")
    assert np.isnan(combined.stat_resid_max_abs.sel(size="a", layer=2)).all()
    assert np.isfinite(combined.stat_resid_max_abs.sel(size="b")).all()
    assert combined.param.values[0] == "embed_in.weight"
    assert combined.param.values[-1] == "embed_out.weight"
    layer2 = combined.param.values[combined.param_layer.values == 2]
    assert len(layer2) == 12 and np.isnan(combined.stat_param.sel(size="a", param=layer2)).all()
    assert combined.stat_spectrum_slope.attrs["fit_ranks"] == [0.0, 0.5]
    assert combined.attrs["final_step"] == FINAL


def test_reduce_refuses_stores_without_statistics_or_final_step(suite, tmp_path):
    plain = extract_checkpoint(suite / "checkpoints/a/step4", suite / "eval_batch.npy",
                               tmp_path / "plain.zarr", tokens=TOKENS, seed=0, size="a",
                               step=4, model_name="tiny-a", revision="step4")
    with pytest.raises(IncompleteStoreError, match="conjecture.enabled false"):
        reduce_stats([plain], tmp_path / "x.zarr", final_step=4)
    with pytest.raises(IncompleteStoreError, match="no store for the final step 8"):
        reduce_stats([suite / "extract/a/step4.zarr"], tmp_path / "x.zarr", final_step=FINAL)


@pytest.fixture(scope="module")
def combined(suite, tmp_path_factory) -> xr.Dataset:
    out = tmp_path_factory.mktemp("combined")
    paths = [reduce_stats([suite / "extract" / size / f"step{s}.zarr" for s in STEPS],
                          out / f"{size}.zarr", final_step=FINAL) and out / f"{size}.zarr"
             for size in SPECS]
    return combine_stats(paths)


@pytest.mark.parametrize("name", list(conjecture_figures.STATS_FIGURES))
def test_every_figure_is_written(combined, tmp_path, name):
    paths = conjecture_figures.render_stats(name, combined, tmp_path / name, x_axis="fraction")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 5000 for p in paths)


def test_figure_options_are_checked(combined, tmp_path):
    with pytest.raises(ValueError, match="unknown figure 'nope'"):
        conjecture_figures.render_stats("nope", combined, tmp_path / "x")
    with pytest.raises(ValueError, match=r"figure steps \[3\] are not among"):
        conjecture_figures.render_stats("spectra", combined, tmp_path / "x", steps=[3])
    with pytest.raises(ValueError, match="unknown x_axis"):
        conjecture_figures.render_stats("norms", combined, tmp_path / "x", x_axis="time")


def test_pick_steps():
    steps = [0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512]
    assert conjecture_figures.pick_steps(steps, 512) == [0, 16, 64, 512]
    assert conjecture_figures.pick_steps(steps, 512, [64, 8]) == [8, 64]
    assert conjecture_figures.pick_steps([0, 1], 1) == [0, 1]


def test_config_checks():
    base = {"steps": [0, 8], "conjecture": {"spectrum_fit": [0.5, 0.2], "figure_steps": [3]}}
    errors = conjecture_errors(base)
    assert any("conjecture.spectrum_fit" in e and "lo < hi" in e for e in errors)
    assert any("conjecture.figure_steps': [3]" in e for e in errors)
    assert conjecture_errors({"steps": [0, 8]}) == []

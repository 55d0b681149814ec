"""The duplicate-revision audit: table, metrics flags, and what figures mark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.extraction.extract import extraction_dataset
from lmdynamics.extraction.passes import Extraction
from lmdynamics.reduction import audit
from lmdynamics.reduction.flags import set_flagged
from lmdynamics.reduction.metrics import reduce_size, write_combined
from lmdynamics.store import open_store, write_store


def test_duplicates_groups_equal_hashes():
    assert audit.duplicates({0: "a", 1: "b", 2: "a", 3: "a"}) == {
        0: [2, 3], 1: [], 2: [0, 3], 3: [0, 2]}


def test_audit_table_finds_duplicates_within_a_size_only():
    attrs = [{"size": "70m", "step": 0, "weights_sha256": "x", "revision": "step0"},
             {"size": "70m", "step": 143000, "weights_sha256": "x"},
             {"size": "70m", "step": 1000, "weights_sha256": "y"},
             {"size": "160m", "step": 0, "weights_sha256": "y"}]
    table = audit.audit_table(attrs)
    assert list(table.columns) == audit.AUDIT_COLUMNS
    got = {(r.size, r.step): (r.duplicate, r.duplicate_of) for r in table.itertuples()}
    assert got == {("70m", 0): (True, "step143000"), ("70m", 143000): (True, "step0"),
                   ("70m", 1000): (False, ""), ("160m", 0): (False, "")}


def test_flagged_ors_duplicate_and_nonfinite_flags():
    ds = xr.Dataset(
        {"flag_duplicate": (("size", "step"), np.array([[True, False, False],
                                                        [False, False, False]])),
         "flag_nonfinite": (("size", "layer", "step"), np.array([[[False, False, False]] * 2,
                                                                 [[False, False, False],
                                                                  [False, True, False]]]))},
        coords={"size": ["a", "b"], "step": [0, 1, 2]})
    out = set_flagged(ds)
    assert out.flagged.dims == ("size", "step")
    np.testing.assert_array_equal(out.flagged.values, [[True, False, False],
                                                       [False, True, False]])


def _pair_store(path, size, step, sha, seed, n_layers=2, dim=4, tokens=16):
    rng = np.random.default_rng(seed)
    result = Extraction(rng.normal(size=(2, n_layers, tokens, dim)).astype(np.float32),
                        np.sort(rng.random((2, n_layers, dim)))[..., ::-1],
                        np.sort(rng.random((2, n_layers, dim)))[..., ::-1], 1.0)
    attrs = {"model": f"m-{size}", "revision": f"step{step}", "size": size, "step": step,
             "hidden_size": dim, "num_attention_heads": 2, "num_layers": n_layers,
             "n_params": 100 * n_layers, "weights_sha256": sha}
    ds = extraction_dataset(result, np.zeros(tokens, dtype=np.int64), np.arange(tokens), attrs)
    return write_store(ds, path)


def test_reduction_flags_byte_identical_steps_and_the_audit_lists_them(tmp_path):
    stores = {}
    for size, n_layers in (("a", 2), ("b", 3)):
        for step in (0, 10, 20):
            sha = "same" if (size == "a" and step in (0, 20)) else f"{size}{step}"
            stores[(size, step)] = _pair_store(tmp_path / f"{size}/step{step}.zarr", size, step,
                                               sha, seed=step, n_layers=n_layers)
    metrics = [reduce_size([stores[("a", s)] for s in (0, 10, 20)], tmp_path / "a.zarr",
                           final_step=20),
               reduce_size([stores[("b", s)] for s in (0, 10, 20)], tmp_path / "b.zarr",
                           final_step=20)]
    np.testing.assert_array_equal(metrics[0].flag_duplicate.values, [True, False, True])
    combined = write_combined([tmp_path / "a.zarr", tmp_path / "b.zarr"],
                              tmp_path / "metrics.zarr", tmp_path / "metrics.csv")
    stored = open_store(tmp_path / "metrics.zarr").load()
    for ds in (combined, stored):
        assert ds.flagged.dims == ("size", "step") and ds.flagged.dtype == bool
        np.testing.assert_array_equal(ds.flagged.sel(size="a").values, [True, False, True])
        assert not ds.flagged.sel(size="b").any()
    table = audit.write_audit(list(stores.values()), tmp_path / "audit.csv")
    assert table.duplicate.sum() == 2
    assert pd.read_csv(tmp_path / "audit.csv").duplicate_of.fillna("").tolist().count(
        "step20") == 1

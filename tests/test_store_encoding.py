"""The per-pair activations' encoding (chosen in benchmarks/store_encoding.py) round-trips."""

from __future__ import annotations

import json

import numpy as np

from lmdynamics.extraction.extract import activation_encoding, extraction_dataset
from lmdynamics.extraction.passes import Extraction
from lmdynamics.store import open_store, write_store


def test_activations_written_per_layer_with_bitshuffle_zstd_and_read_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(2, 3, 40, 8)).astype(np.float32)
    acts[1, 2, 5, 3] = np.nan  # a diverged value survives the codec as NaN
    sv = np.ones((2, 3, 8))
    ds = extraction_dataset(Extraction(acts, sv, sv, 1.0), np.zeros(40, np.int64),
                            np.arange(40), {"step": 0})
    path = write_store(ds, tmp_path / "step0.zarr", encoding=activation_encoding(acts.shape))
    meta = json.loads((path / "activations" / "zarr.json").read_text())
    assert meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1, 40, 8]
    blosc = [c for c in meta["codecs"] if c["name"] == "blosc"]
    assert blosc and blosc[0]["configuration"]["cname"] == "zstd"
    assert blosc[0]["configuration"]["shuffle"] == "bitshuffle"
    back = open_store(path).activations.values
    np.testing.assert_array_equal(back, acts)

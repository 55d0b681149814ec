"""Hostile and damaged stores (issue 16): verified, not trusted.

Every case breaks one store of a finished extraction (or reduction) in place; the next
reader must stop with one line naming the store, the array or attribute and the redo
command, and write nothing; or, where the data are genuine, give the correct result. The
catalogue of damaged per-pair stores (``faultlib.HOSTILE_STORES``) runs in
``tests/test_faults.py::test_broken_store_is_refused_by_reduce``, next to the other broken
stores; here: the codecs and digests written, cases that need their own setup, and
hostile eval batches.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import xarray as xr
import zarr

from lmdynamics.cli import run
from lmdynamics.store import (
    ATTRS_DIGEST_ATTR,
    DIGESTS_ATTR,
    FORMAT_ATTR,
    STORE_FORMAT,
    IncompleteStoreError,
    open_store,
    write_store,
)
from support.faultlib import FINAL, STEPS, _flip_byte, _rewrite, copy_stores, extract


@pytest.fixture(scope="module")
def good_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    for step in STEPS:
        extract(root, step)
    return root / "extract"


def _reduce(stores, out) -> None:
    run(["reduce", *map(str, stores), "--options", json.dumps({"final_step": FINAL}),
         "--out", str(out)])


def _assert_one_line_naming(message: str, store, fragment: str) -> None:
    assert fragment in message, message
    assert "\n" not in message, message
    assert str(store) in message and f"`--forcerun {store}`" in message, message
    assert f"delete {store} and rerun" in message, message


def test_every_array_is_checksummed_and_digested(good_stores, tmp_path):
    """Extraction and reduction stores: crc32c last on every array, a digest per array."""
    stores = copy_stores(good_stores, tmp_path / "extract")
    _reduce(stores, tmp_path / "s.zarr")
    for path in (stores[0], tmp_path / "s.zarr"):
        group = zarr.open_group(path, mode="r")
        arrays = dict(group.arrays())
        assert group.attrs[FORMAT_ATTR] == STORE_FORMAT and group.attrs["complete"] is True
        assert set(group.attrs[DIGESTS_ATTR]) == set(arrays)
        assert len(group.attrs[ATTRS_DIGEST_ATTR]) == 64
        for name, array in arrays.items():
            codecs = array.metadata.codecs
            assert isinstance(codecs[-1], zarr.codecs.Crc32cCodec), (path, name, codecs)
    activations = zarr.open_group(stores[0], mode="r")["activations"].metadata.codecs
    assert [type(c).__name__ for c in activations[1:]] == ["BloscCodec", "Crc32cCodec"]


def test_chunks_copied_into_a_middle_store_are_refused(good_stores, tmp_path):
    """Today's silent CKA = 1: step 4's activations replaced by the final step's chunks."""
    stores = copy_stores(good_stores, tmp_path / "extract")
    shutil.rmtree(stores[1] / "activations" / "c")
    shutil.copytree(stores[2] / "activations" / "c", stores[1] / "activations" / "c")
    with pytest.raises(IncompleteStoreError) as info:
        _reduce(stores, tmp_path / "s.zarr")
    _assert_one_line_naming(str(info.value), stores[1], "holds other data than was written")


def test_nan_activations_recorded_as_finite_are_still_flagged(good_stores, tmp_path):
    """A store (digests valid) whose writer said 'finite' over NaN activations: the reduction
    looks at the data, flags the step and gives NaN CKA for that layer, not a number."""
    stores = copy_stores(good_stores, tmp_path / "extract")

    def poison(ds: xr.Dataset) -> xr.Dataset:
        acts = ds.activations.values.copy()
        acts[1, 0, 3, 2] = np.nan
        ds = ds.assign(activations=(ds.activations.dims, acts))
        for name in ("nonfinite_activations", "nonfinite_weights", "nonfinite_grads"):
            ds[name] = xr.zeros_like(ds[name], dtype=bool)
        return ds.assign_attrs(nonfinite=False)

    _rewrite(stores[1], poison)
    with pytest.warns(RuntimeWarning, match="size s step 4 mlp layer 0"):
        _reduce(stores, tmp_path / "s.zarr")
    ds = open_store(tmp_path / "s.zarr")
    assert ds.flag_nonfinite.sel(step=4, component="mlp", layer=0).item() is True
    assert int(ds.flag_nonfinite.sum()) == 1
    assert np.isnan(ds.cka.sel(step=4, component="mlp", layer=0).item())


def test_damaged_metrics_store_is_refused_by_combine(good_stores, tmp_path):
    stores = copy_stores(good_stores, tmp_path / "extract")
    metrics = tmp_path / "s.zarr"
    _reduce(stores, metrics)
    _flip_byte(metrics, "cka", 0)
    with pytest.raises(IncompleteStoreError) as info:
        run(["combine", str(metrics), "--out-zarr", str(tmp_path / "m.zarr"),
              "--out-csv", str(tmp_path / "m.csv")])
    _assert_one_line_naming(str(info.value), metrics, "array 'cka' has a damaged chunk")
    assert not (tmp_path / "m.zarr").exists() and not (tmp_path / "m.csv").exists()


def test_digests_are_of_decoded_values_not_of_compressed_bytes(tmp_path):
    """Rewriting identical data gives identical digests; one changed value changes one."""
    ds = xr.Dataset({"a": (("x", "y"), np.arange(12.0).reshape(3, 4)),
                     "s": ("x", np.array(["u", "v", "w"], dtype=object))},
                    attrs={"k": 1})
    one = write_store(ds, tmp_path / "one.zarr")
    two = write_store(ds, tmp_path / "two.zarr", encoding={"a": {"chunks": (1, 4)}})
    d1, d2 = (zarr.open_group(p, mode="r").attrs[DIGESTS_ATTR] for p in (one, two))
    assert d1 == d2
    changed = ds.copy(deep=True)
    changed.a[2, 3] = -1.0
    d3 = zarr.open_group(write_store(changed, tmp_path / "three.zarr"),
                         mode="r").attrs[DIGESTS_ATTR]
    assert d3["a"] != d1["a"] and d3["s"] == d1["s"]


# --------------------------------------------------------------------------- eval batch

BAD_BATCHES = {
    "float": lambda b: b.astype(np.float32) + 0.5,
    "float_integral": lambda b: b.astype(np.float64),
    "one_dim": lambda b: b.ravel(),
    "three_dim": lambda b: b[None],
    "bool": lambda b: b > 100,
    "empty": lambda b: b[:0],
    "strings": lambda b: b.astype(str),
}


@pytest.mark.parametrize("case", [*sorted(BAD_BATCHES), "not_npy", "pickled"])
def test_extract_refuses_an_eval_batch_that_is_not_2d_integers(good_stores, tmp_path, case):
    from lmdynamics.store import TokenArrayError

    batch = np.load(good_stores.parent / "batch.npy")
    path = tmp_path / "batch.npy"
    if case == "not_npy":
        path.write_text("not an array")
    elif case == "pickled":
        np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, BAD_BATCHES[case](batch))
    out = tmp_path / "out" / "step0.zarr"
    with pytest.raises(TokenArrayError) as info:
        run(["extract", "--checkpoint", str(good_stores.parent / "ck" / "step0"),
              "--eval-batch", str(path), "--options", '{"tokens": 8}', "--size", "s",
              "--step", "0", "--model", "m", "--revision", "step0", "--out", str(out)])
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert "2-D integer array" in message or "cannot be read" in message, message
    assert not out.exists()


def test_digested_reader_refuses_partial_or_reordered_reads(tmp_path):
    """The reduction's one-pass digest check: all blocks in C order, or a named error."""
    from lmdynamics.store import DigestedReader

    acts = np.random.default_rng(0).normal(size=(2, 3, 5, 4)).astype(np.float32)
    path = write_store(xr.Dataset({"activations": (("c", "l", "t", "d"), acts)}),
                       tmp_path / "s.zarr", encoding={"activations": {"chunks": (1, 1, 5, 4)}})
    order = list(np.ndindex(2, 3))
    reader = DigestedReader(path, "activations")
    for index in order:
        np.testing.assert_array_equal(reader.read(index), acts[index])
    reader.finish()
    for reads in (order[:-1], order[::-1]):
        reader = DigestedReader(path, "activations")
        for index in reads:
            reader.read(index)
        with pytest.raises(IncompleteStoreError, match="'activations' holds other data"):
            reader.finish()

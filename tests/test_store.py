"""Atomic zarr stores: a half-written store is never taken for a complete one."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr

from lmdynamics.store import IncompleteStoreError, open_store, write_store


def _dataset():
    return xr.Dataset({"a": (("component", "x"), np.arange(6.0).reshape(2, 3))},
                      coords={"component": ["attention", "mlp"]}, attrs={"size": "s"})


def test_roundtrip_and_strings(tmp_path):
    path = write_store(_dataset(), tmp_path / "s.zarr")
    ds = open_store(path, required=("a",))
    assert list(ds.component.values) == ["attention", "mlp"]
    np.testing.assert_array_equal(ds.a.values, _dataset().a.values)
    assert not list(tmp_path.glob(".s.zarr.tmp-*"))


def test_unmarked_store_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    _dataset().to_zarr(path, consolidated=False)  # written without the completion mark
    with pytest.raises(IncompleteStoreError, match=r"incomplete.*--forcerun"):
        open_store(path)


def test_missing_variable_and_missing_store(tmp_path):
    path = write_store(_dataset(), tmp_path / "s.zarr")
    with pytest.raises(IncompleteStoreError, match="lacks b"):
        open_store(path, required=("a", "b"))
    with pytest.raises(IncompleteStoreError, match="not a zarr store"):
        open_store(tmp_path / "nothing.zarr")


def test_rewrite_replaces_and_cleans_stale_tmp(tmp_path):
    path = tmp_path / "s.zarr"
    stale = tmp_path / ".s.zarr.tmp-99999"
    stale.mkdir()
    write_store(_dataset(), path)
    write_store(_dataset() * 2, path)
    assert not stale.exists()
    assert float(open_store(path).a.sum()) == 30.0
    assert zarr.open_group(path, mode="r").attrs["complete"] is True

"""Outputs a user opens are clean (issue 17): ``xr.open_zarr`` on a store we write raises no
warning, also once Snakemake has put its ``.snakemake_timestamp`` into the directory output
(Snakemake marks every ``directory()`` output so; zarr warns about unknown objects when it lists
a group without consolidated metadata)."""

from __future__ import annotations

import warnings

import numpy as np
import xarray as xr

from lmdynamics.store import open_store, write_store


def test_open_zarr_on_our_store_raises_no_warning(tmp_path):
    ds = xr.Dataset({"cka": (("layer", "step"), np.linspace(0, 1, 6).reshape(2, 3))},
                    coords={"step": [0, 8, 16], "component": "mlp"}, attrs={"final_step": 16})
    path = write_store(ds, tmp_path / "metrics.zarr")
    (path / ".snakemake_timestamp").touch()  # what Snakemake leaves in directory() outputs
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opened = xr.open_zarr(path)
        np.testing.assert_array_equal(opened["cka"].values, ds["cka"].values)
        # our own reader reads the written metadata (not the consolidated copy), quietly too
        assert float(open_store(path)["cka"].sum()) == float(ds["cka"].sum())

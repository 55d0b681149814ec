"""Atomic zarr stores: a half-written store is never taken for a complete one."""

from __future__ import annotations

import os

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


def test_atomic_writers_use_hidden_names_and_remove_what_killed_writers_left(tmp_path):
    """Every atomic writer (text, arrays, figures, checkpoints, stores) goes through
    atomic_path: a killed writer's hidden temporary, or an earlier version's visible one, is
    removed by the next write of the same path; a failed write leaves nothing."""
    from lmdynamics.store import atomic_path, write_array_atomic, write_text_atomic

    for name in (".t.csv.tmp-4242", "t.csv.tmp-4242", ".a.npy.tmp-1"):
        (tmp_path / name).write_text("half")
    (tmp_path / ".d.tmp-7").mkdir()
    write_text_atomic("x\n", tmp_path / "t.csv")
    write_array_atomic(np.arange(3), tmp_path / "a.npy")
    with atomic_path(tmp_path / "d") as tmp:
        assert tmp.name == f".d.tmp-{os.getpid()}"
        tmp.mkdir()
        (tmp / "f").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "d", "t.csv"]
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "e.txt") as tmp:
        tmp.write_text("partial")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "d", "t.csv"]


def test_save_checkpoint_and_figures_clean_stale_temporaries(tmp_path):
    import matplotlib.pyplot as plt
    import torch
    from transformers import GPTNeoXForCausalLM

    from lmdynamics.report.figures import save_figure
    from lmdynamics.sources import checkpoints as ck
    from lmdynamics.sources.tiny import model_config

    (tmp_path / "step0.tmp-99").mkdir()  # the visible name of earlier versions
    (tmp_path / ".step0.tmp-98").mkdir()
    (tmp_path / ".fig.png.tmp-97").write_text("half")
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(model_config({"hidden_size": 16, "num_layers": 1,
                                                "num_heads": 2}, seq_len=8))
    ck.save_checkpoint(model, tmp_path / "step0")
    save_figure(plt.figure(), tmp_path / "fig")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.pdf", "fig.png", "step0"]

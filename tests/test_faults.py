"""Faults without a DAG: broken stores, untrusted checkpoints, diverged (NaN/inf) checkpoints.

Everything goes through the package's command line (``lmdynamics.cli.run``: what the
``lmdynamics`` command runs, without its one-line error report) or, once per kind, a real
subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from lmdynamics.cli import run
from lmdynamics.estimators.rank import proportional_effective_rank
from lmdynamics.extraction.spectra import singular_values
from lmdynamics.reduction.flags import set_flagged
from lmdynamics.reduction.metrics import combine_sizes, reduce_size
from lmdynamics.report.figures import FIGURES, render
from lmdynamics.report.tables import mcc_table
from lmdynamics.sources import checkpoints as ck
from lmdynamics.store import IncompleteStoreError, open_store, write_store
from support.faultlib import (
    BROKEN_STORES,
    FINAL,
    HOSTILE_STORES,
    STEPS,
    TOKENS,
    copy_stores,
    extract,
)
from support.workflow import REPO

DIVERGE = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"


@pytest.fixture(scope="module")
def good_stores(tmp_path_factory) -> Path:
    """Three complete, consistent per-pair stores (steps 0, 4, 8) of a tiny model."""
    root = tmp_path_factory.mktemp("stores")
    for step in STEPS:
        extract(root, step)
    return root / "extract"


def _reduce(stores: list[Path], out: Path) -> None:
    run(["reduce", *map(str, stores), "--options", json.dumps({"final_step": FINAL}),
         "--out", str(out)])


# --------------------------------------------------------------------------- broken stores


def test_good_stores_reduce(good_stores, tmp_path):
    stores = copy_stores(good_stores, tmp_path / "extract")
    _reduce(stores, tmp_path / "s.zarr")
    ds = open_store(tmp_path / "s.zarr")
    assert np.isfinite(ds.cka.values).all() and not ds.flag_nonfinite.values.any()
    np.testing.assert_allclose(ds.cka.sel(step=FINAL).values, 1.0, atol=1e-12)


@pytest.mark.parametrize("case", sorted({**BROKEN_STORES, **HOSTILE_STORES}))
@pytest.mark.parametrize("which", [4, FINAL], ids=["middle", "final"])
def test_broken_store_is_refused_by_reduce(good_stores, tmp_path, case, which):
    """Each fault is refused with one line naming the store, the fault and how to redo it;
    no output. Damaged stores (HOSTILE_STORES: checksums, digests, required attrs) are
    refused by any reader, not only by the reduction's cross-store checks."""
    if case == "step_mismatch" and which == FINAL:
        pytest.skip("same fault as the middle store's")
    stores = copy_stores(good_stores, tmp_path / "extract")
    broken = tmp_path / "extract" / f"step{which}.zarr"
    breaker, fragment = {**BROKEN_STORES, **HOSTILE_STORES}[case]
    breaker(broken)
    out = tmp_path / "s.zarr"
    with pytest.raises(IncompleteStoreError) as info:
        _reduce(stores, out)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert str(broken) in message and f"`--forcerun {broken}`" in message, message
    assert f"delete {broken} and rerun" in message, message
    assert not out.exists() and not list(tmp_path.glob(".s.zarr.*"))
    if case in HOSTILE_STORES:
        with pytest.raises(IncompleteStoreError, match="--forcerun"):
            open_store(broken)


def test_reduce_command_exits_nonzero_naming_the_store(good_stores, tmp_path):
    """The real `lmdynamics reduce` process: non-zero exit, message on stderr."""
    stores = copy_stores(good_stores, tmp_path / "extract")
    BROKEN_STORES["missing_array"][0](stores[1])
    proc = subprocess.run([sys.executable, "-m", "lmdynamics", "reduce", *map(str, stores),
                           "--options", json.dumps({"final_step": FINAL}),
                           "--out", str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode != 0
    assert f"{stores[1]} lacks activations" in proc.stderr and "--forcerun" in proc.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_replacing_a_store_never_exposes_a_half_deleted_one(tmp_path):
    """The old store is renamed aside before the new one moves in; leftovers are cleaned."""
    ds = xr.Dataset({"a": ("x", np.arange(3.0))})
    path = write_store(ds, tmp_path / "s.zarr")
    stale = tmp_path / ".s.zarr.old-12345"  # as left by a writer killed between two renames
    shutil.copytree(path, stale)
    write_store(ds * 2, path)
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]
    assert open_store(path).a.values.tolist() == [0.0, 2.0, 4.0]


def test_all_nan_chunks_are_written_so_missing_ones_are_detected(tmp_path):
    ds = xr.Dataset({"a": (("x", "y"), np.full((2, 3), np.nan))})
    path = write_store(ds, tmp_path / "s.zarr", encoding={"a": {"chunks": (1, 3)}})
    assert np.isnan(open_store(path).a.values).all()  # all-NaN chunks exist: not refused
    next(p for p in (path / "a" / "c").rglob("*") if p.is_file()).unlink()
    with pytest.raises(IncompleteStoreError, match="'a' has 1 of its 2 chunk files"):
        open_store(path)


# --------------------------------------------------------------------------- untrusted files


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _extract_argv(checkpoint: Path, batch: Path, out: Path) -> list[str]:
    return ["extract", "--checkpoint", str(checkpoint), "--eval-batch", str(batch),
            "--options", json.dumps({"tokens": TOKENS}), "--size", "s", "--step", "0",
            "--model", "m", "--revision", "step0", "--out", str(out)]


def _untrusted(case: str, directory: Path) -> tuple[type[Exception], list[str]]:
    """Make the checkpoint in ``directory`` untrusted; return the error and message parts."""
    config = directory / ck.CONFIG_NAME
    data = json.loads(config.read_text())
    if case == "pickle_payload":
        state = ck.read_state_dict(directory / ck.SAFETENSORS_NAME)
        (directory / ck.SAFETENSORS_NAME).unlink()
        state["evil"] = _Payload()
        torch.save(state, directory / ck.PICKLE_NAME)
        return ck.UntrustedCheckpointError, [str(directory / ck.PICKLE_NAME), "refused"]
    changes = {"auto_map": {"auto_map": {"AutoModelForCausalLM": "evil.Model"}},
               "trust_remote_code": {"trust_remote_code": True},
               "unknown_architecture": {"architectures": ["MambaForCausalLM"],
                                        "model_type": "mamba"}}[case]
    config.write_text(json.dumps({**data, **changes}))
    if case == "unknown_architecture":
        return ck.UnknownArchitectureError, [str(config), "'mamba'", "known families",
                                             "gpt_neox (gpt_neox)"]
    return ck.UntrustedCheckpointError, [str(config), case, "refused"]


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


UNTRUSTED = ["auto_map", "trust_remote_code", "unknown_architecture", "pickle_payload"]


@pytest.mark.parametrize("case", UNTRUSTED)
def test_extract_refuses_untrusted_checkpoint(good_stores, tmp_path, case, monkeypatch):
    monkeypatch.chdir(tmp_path)
    directory = shutil.copytree(good_stores.parent / "ck" / "step0", tmp_path / "step0")
    error, parts = _untrusted(case, directory)
    out = tmp_path / "out" / "step0.zarr"
    with pytest.raises(error) as info:
        run(_extract_argv(directory, good_stores.parent / "batch.npy", out))
    for part in parts:
        assert part in str(info.value), (part, str(info.value))
    assert not out.exists() and not (tmp_path / "out").exists()
    assert not (tmp_path / "pwned.txt").exists()


def test_extract_command_refuses_remote_code(good_stores, tmp_path):
    """The real `lmdynamics extract` process: non-zero exit, message, no store, no code run."""
    directory = shutil.copytree(good_stores.parent / "ck" / "step0", tmp_path / "step0")
    _, parts = _untrusted("auto_map", directory)
    out = tmp_path / "out" / "step0.zarr"
    proc = subprocess.run([sys.executable, "-m", "lmdynamics",
                           *_extract_argv(directory, good_stores.parent / "batch.npy", out)],
                          capture_output=True, text=True, env=_env(), timeout=300,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "UntrustedCheckpointError" in proc.stderr
    for part in parts:
        assert part in proc.stderr, (part, proc.stderr[-2000:])
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- NaN and inf


def test_singular_values_and_per_of_nonfinite_matrices_are_nan():
    for bad in (np.inf, -np.inf, np.nan):
        m = np.ones((3, 5))
        m[1, 2] = bad
        sv = singular_values(m)
        assert sv.shape == (3,) and np.isnan(sv).all()
        assert np.isnan(proportional_effective_rank(sv, 3))
        assert np.isnan(singular_values(torch.from_numpy(m).float())).all()


@pytest.fixture(scope="module")
def diverged(tmp_path_factory):
    """Stores of steps 0, 4, 8 where step 4's layer-1 MLP write matrix is inf."""
    root = tmp_path_factory.mktemp("diverged")
    for step in STEPS:
        extract(root, step, diverge=DIVERGE if step == 4 else None)
    return root / "extract"


def test_diverged_checkpoint_is_recorded_in_its_store(diverged):
    ds = open_store(diverged / "step4.zarr")
    assert ds.attrs["nonfinite"] is True
    acts = ds.nonfinite_activations.sel(component="mlp").values.tolist()
    weights = ds.nonfinite_weights.values.tolist()
    assert acts == [False, True]  # layer 0 is untouched; layer 1 writes inf
    assert weights == [[False, False], [False, True]]
    assert ds.nonfinite_grads.values.all()  # the loss is NaN: every gradient is
    assert np.isnan(float(ds.loss))
    assert np.isnan(ds.weight_singular_values.sel(component="mlp", layer=1).values).all()
    healthy = open_store(diverged / "step0.zarr")
    assert healthy.attrs["nonfinite"] is False and not healthy.nonfinite_grads.values.any()


def test_extract_warns_naming_size_step_layer(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lmdynamics"):
        extract(tmp_path, 4, diverge=DIVERGE)
    assert "non-finite activations (NaN or inf) for size s step 4 mlp layer 1" in caplog.text


def test_diverged_step_is_flagged_and_its_metrics_are_nan(diverged, tmp_path, caplog):
    stores = [diverged / f"step{s}.zarr" for s in STEPS]
    with caplog.at_level(logging.WARNING, logger="lmdynamics"), \
            pytest.warns(RuntimeWarning, match="size s step 4 mlp layer 1"):
        ds = reduce_size(stores, tmp_path / "s.zarr", final_step=FINAL)
    assert ds.flag_nonfinite.dims == ("component", "layer", "step")
    assert ds.flag_nonfinite.sel(step=4).values.all()
    assert not ds.flag_nonfinite.sel(step=[0, 8]).values.any()
    assert np.isnan(ds.cka.sel(step=4, component="mlp", layer=1))
    assert np.isnan(ds.per_weight.sel(step=4, component="mlp", layer=1))
    assert np.isnan(ds.per_grad.sel(step=4)).all()
    finite = ds.drop_sel(step=4)
    assert np.isfinite(finite.cka).all() and np.isfinite(finite.per_grad).all()
    assert "per_grad is NaN (undefined) for size s step 4 attention layer 0" in caplog.text
    assert "CKA undefined" in caplog.text and "step 4 mlp layer 1" in caplog.text
    # combined: flags aggregated over (size, step), the step flagged, CSV keeps NaN rows
    run(["combine", str(tmp_path / "s.zarr"), "--out-zarr", str(tmp_path / "m.zarr"),
          "--out-csv", str(tmp_path / "m.csv")])
    combined = open_store(tmp_path / "m.zarr").load()
    assert combined.flag_nonfinite.dims == ("size", "step")
    assert combined.flag_nonfinite.sel(size="s").values.tolist() == [False, True, False]
    assert combined.flagged.sel(size="s").values.tolist() == [False, True, False]
    table = pd.read_csv(tmp_path / "m.csv")
    assert len(table) == 2 * 2 * len(STEPS)
    row = table[(table.step == 4) & (table.component == "mlp") & (table.layer == 1)]
    assert row[["cka", "per_weight", "per_grad"]].isna().all(axis=None)


def test_diverged_final_step_gives_undefined_mcc_and_figures_still_render(tmp_path):
    """Every CKA is against the final step: if it diverged, MCC is undefined, not a number."""
    for step in STEPS:
        extract(tmp_path, step, diverge=DIVERGE if step == FINAL else None)
    stores = [tmp_path / "extract" / f"step{s}.zarr" for s in STEPS]
    with pytest.warns(RuntimeWarning):
        reduce_size(stores, tmp_path / "s.zarr", final_step=FINAL)
    combined = combine_sizes([tmp_path / "s.zarr"])
    assert combined.flagged.values.tolist() == [[False, False, True]]
    assert np.isnan(combined.cka.sel(component="mlp", layer=1)).all()
    table = mcc_table(combined).set_index(["component", "parameter"])
    assert table.mcc.isna().all() and table.undefined_reason.notna().all()
    assert table.loc[("attention", "gradients"), "undefined_reason"] == "no layers to compare"
    assert table.loc[("mlp", "gradients"), "undefined_reason"] == "no layers to compare"
    assert table.loc[("mlp", "weights"), "n_layers"] == 1  # the diverged layer is dropped
    for name in FIGURES:
        for path in render(name, combined, tmp_path / "fig" / name):
            assert path.stat().st_size > 1000


def test_flagged_combines_every_flag():
    """`flagged` is the OR of every flag_* (size, step), whatever other helpers add."""
    steps, sizes = [0, 4, 8], ["a", "b"]
    ds = xr.Dataset(
        {"flag_nonfinite": (("size", "step"), [[False, True, False], [False, False, False]]),
         "flag_duplicate": (("size", "step"), [[False, False, False], [True, False, False]])},
        coords={"size": sizes, "step": steps})
    assert set_flagged(ds).flagged.values.tolist() == [[False, True, False],
                                                       [True, False, False]]
    preset = ds.assign(flagged=(("size", "step"), np.zeros((2, 3), dtype=bool)))
    assert not set_flagged(preset).flagged.values.any()  # set elsewhere: left alone
    empty = xr.Dataset(coords={"size": sizes, "step": steps})
    assert set_flagged(empty).flagged.shape == (2, 3)

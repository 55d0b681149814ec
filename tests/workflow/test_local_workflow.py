"""``source: local`` end to end: a real ``transformers.Trainer`` run analysed in place with
``steps: discover``; the same run recorded by the callback with only step 0 and the final
checkpoint kept; a rewritten checkpoint re-extracted alone; a new step picked up alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import yaml

from lmdynamics.record import TrainerCallback
from support.reruns import parse_plan
from support.workflow import copy_workflow, snakemake
from test_record import SEQ, STEPS, VOCAB, run_config, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("own")
    np.save(root / "eval.npy", np.random.default_rng(0).integers(0, VOCAB, size=(8, SEQ)))
    cfg = run_config(root, "recorded", recorded=str(root / "stores/step{step}.zarr"))
    train(root / "recorded", save_steps=STEPS,
          callbacks=[TrainerCallback(cfg, size="s", every=4)])
    train(root / "saved", save_steps=4)
    return root


def workflow(tmp: Path, data: Path, run: str, **changes) -> Path:
    wd = copy_workflow(tmp)
    cfg = {**run_config(data, run), "final_step": None, "mcc": {"early_step": "nearest"},
           **changes}
    (wd / "config/own.yaml").write_text(yaml.safe_dump(cfg))
    return wd


def plan(wd: Path) -> set:
    return parse_plan(snakemake(wd, "-n", "--configfile", "config/own.yaml").stdout)


def extracts(jobs: set) -> set:
    return {dict(w)["step"] for rule, w in jobs if rule in ("extract", "adopt_recorded")}


def test_saved_checkpoints_discovered_rewritten_and_new(data, tmp_path):
    wd = workflow(tmp_path / "wf", data, "saved", conjecture={"enabled": False})
    snakemake(wd, "--configfile", "config/own.yaml")
    store = xr.open_zarr(wd / "results/own/extract/s/seed0/step8.zarr")
    folder = data / "saved/checkpoint-8"
    assert store.attrs["checkpoint_path"] == str(folder.resolve())
    assert (wd / "results/own/tables/mcc.md").is_file()
    assert plan(wd) == set()
    # a checkpoint rewritten (other bytes, same path) is extracted again, and only it
    original = (folder / "model.safetensors").read_bytes()
    shutil.copy(data / "saved/checkpoint-4/model.safetensors", folder / "model.safetensors")
    try:
        assert extracts(plan(wd)) == {"8"}
    finally:
        (folder / "model.safetensors").write_bytes(original)
    # training goes on: a new step is picked up, nothing else is extracted again
    snakemake(wd, "--configfile", "config/own.yaml")
    new = data / "saved/checkpoint-16"
    shutil.copytree(data / "saved/checkpoint-12", new)
    (new / "trainer_state.json").write_text(json.dumps({"global_step": 16}))
    try:
        assert extracts(plan(wd)) == {"16"}
        # a half-written folder is not a step
        (new / "model.safetensors").write_bytes(b"\0" * 16)
        assert extracts(plan(wd)) == set()
    finally:
        shutil.rmtree(new)


def test_recorded_run_keeps_two_checkpoints_and_is_analysed(data, tmp_path):
    wd = workflow(tmp_path / "wf", data, "recorded",
                  local={"path": str(data / "recorded/checkpoint-{step}"),
                         "recorded": str(data / "stores/step{step}.zarr"),
                         "settle_seconds": 0})
    proc = snakemake(wd, "--configfile", "config/own.yaml")
    jobs = parse_plan(proc.stdout + proc.stderr)
    assert {s for r, w in jobs if r == "adopt_recorded" for k, s in w if k == "step"} == \
        {"4", "8"}
    assert {s for r, w in jobs if r == "extract" for k, s in w if k == "step"} == {"0", "12"}
    assert (wd / "results/own/figures/figure2.png").is_file()
    assert any((wd / "results/own/figures").glob("conjecture_*.png"))
    # a recorded store of other settings is refused in one line
    wd2 = workflow(tmp_path / "wf2", data, "recorded", tokens=32,
                   local={"path": str(data / "recorded/checkpoint-{step}"),
                          "recorded": str(data / "stores/step{step}.zarr"),
                          "settle_seconds": 0})
    proc = snakemake(wd2, "--configfile", "config/own.yaml", "--keep-going",
                     "--until", "adopt_recorded", check=False)
    assert proc.returncode != 0
    for step in (4, 8):
        log = (wd2 / f"results/own/logs/adopt_recorded/s/seed0/step{step}.log").read_text()
        assert "recorded with other settings" in log and "64 tokens" in log
        assert not (wd2 / f"results/own/extract/s/seed0/step{step}.zarr").exists()

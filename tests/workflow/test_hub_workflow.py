"""The Pythia configuration end to end through the real Snakemake command line and the real
huggingface_hub client, against the loopback hub (one size, four steps, faults injected),
serving revisions in the hub's own legacy format (tests/pythia_files.py: transformers 4.x
names, float16, persisted buffers; ``pytorch_model.bin`` on most branches, a legacy-named
``model.safetensors`` on one, a byte-identical duplicate); and the full grid's dry run,
offline."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from conftest import copy_workflow, snakemake
from hub_server import HubServer, add_pythia, token_at, use_endpoint

RESULTS = "results/pythia"
STEPS = [0, 1, 512, 143000]
OVERLAY = {"sizes": ["70m"], "steps": STEPS, "tokens": 512,
           "extraction": {"device": "cpu", "dtype": "float32"},
           "hub": {"sequences": 2, "retries": 2, "backoff": 0.2, "min_free_gb": 0}}


def test_the_paper_grid_dry_run_is_offline_and_lists_135_extractions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no request
    workdir = copy_workflow(tmp_path / "wf")
    proc = snakemake(workdir, "-n", "--configfile", "config/config.yaml", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert counts["extract"] == "135"
    # step 0 and the final step of each size are kept (every extraction of the size reads them)
    assert counts["download"] == "125" and counts["download_reference"] == "10"
    assert counts["pile_batch"] == "1" and counts["checkpoint_audit"] == "1"


@pytest.mark.slow
def test_pythia_config_runs_end_to_end_through_the_hub_client(tmp_path, monkeypatch):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "config/test_hub.yaml").write_text(yaml.safe_dump(OVERLAY))
    args = ("--configfile", "config/config.yaml", "config/test_hub.yaml",
            "--resources", "network=2")
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path, timeout=5)
        add_pythia(hub, "70m", STEPS, same_as={512: 143000}, safetensors=(1,))
        hub.add_pile()
        flaky = hub.fault(r"/api/models/.*/revision/step0$", times=1, status=503)
        truncated = hub.fault(r"/resolve/[0-9a-f]+/model\.safetensors$", kind="short",
                              method="GET", times=1)
        first = snakemake(workdir, *args, "--keep-going", check=False)
        assert first.returncode != 0, "the truncated download should fail the first run"
        assert flaky.hits == 1 and truncated.hits == 1
        logs = "".join(p.read_text() for p in (workdir / RESULTS / "logs/download").rglob("*.log"))
        assert re.search(r"CorruptDownloadError: downloaded model\.safetensors .*truncated", logs)
        snakemake(workdir, *args)  # the next run fetches the truncated file again
        repo = hub.state.repo("models", "EleutherAI/pythia-70m-deduped")
        assert hub.state.bytes_sent(r"/datasets/.*\.bin$") == 1024 * 2049 * 2  # once
        rerun = snakemake(workdir, *args, "-n")
        assert "Nothing to be done" in rerun.stdout + rerun.stderr

    results = workdir / RESULTS
    # the eval batch is the first sequences of the last training batch (batch 142999)
    start = 142999 * 1024 * 2049
    expected = token_at(np.arange(start, start + 2 * 2049, dtype=np.uint64)).reshape(2, 2049)
    np.testing.assert_array_equal(np.load(results / "eval_batch.npy"), expected)
    record = json.loads((results / "data/batch142999.json").read_text())
    assert record["pieces"] == [{"shard": "document-00020-of-00020.bin",
                                 "offset": 74_139_648, "length": 4_196_352}]
    # weights were temporary except the reference steps' (0 and final); the revision records
    # stay, and the stores carry them
    ckpts = results / "checkpoints/70m/seed0"
    assert sorted(p.parent.name for p in ckpts.rglob("model.safetensors")) == [
        "step0", "step143000"]
    for step in STEPS:
        rev = json.loads((ckpts / f"step{step}/revision.json").read_text())
        assert rev["commit"] == repo.branches[f"step{step}"]
        attrs = xr.open_zarr(results / f"extract/70m/seed0/step{step}.zarr",
                             consolidated=False).attrs
        assert attrs["revision_commit"] == rev["commit"]
        assert attrs["hub_weights_sha256"] == rev["sha256"] == attrs["weights_sha256"]
        assert attrs["sampling_protocol"] == "random_positions"
    # step 512 repeats step 143000 byte for byte: audited and flagged
    audit = pd.read_csv(results / "tables/checkpoint_audit.csv").set_index("step")
    assert audit.duplicate.to_dict() == {0: False, 1: False, 512: True, 143000: True}
    assert audit.loc[512, "duplicate_of"] == "step143000"
    metrics = xr.open_zarr(results / "metrics.zarr", consolidated=False).load()
    assert metrics.flagged.sel(size="70m").values.tolist() == [False, False, True, True]
    np.testing.assert_allclose(metrics.cka.sel(size="70m", step=512).values, 1.0, atol=1e-9)
    final = metrics.sel(size="70m", step=143000)
    for name in ("cka", "cka_debiased"):
        assert final[name].notnull().all()
        np.testing.assert_allclose(final[name].values, 1.0, atol=1e-9)
    assert pd.read_csv(results / "tables/mcc.csv").shape[0] >= 1
    assert (results / "figures/figure2.png").stat().st_size > 5000

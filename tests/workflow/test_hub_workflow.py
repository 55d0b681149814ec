"""The Pythia configuration end to end through the real Snakemake command line and the real
huggingface_hub client, against the loopback hub (one size, four steps, faults injected),
serving revisions in the hub's own legacy format (tests/pythia_files.py: transformers 4.x
names, float16, persisted buffers; ``pytorch_model.bin`` on most branches, a legacy-named
``model.safetensors`` on one, a byte-identical duplicate); the full grid's dry run,
offline; and the offline dry run of every shipped suite definition (the OLMo and Mistral
suites end to end: tests/workflow/test_trust_workflow.py)."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from support.hub_server import HubServer, add_pythia, token_at, use_endpoint
from support.workflow import snakemake

RESULTS = "results/pythia"
STEPS = [0, 1, 512, 143000]
OVERLAY = {"sizes": ["70m"], "steps": STEPS, "tokens": 512,
           "extraction": {"device": "cpu", "dtype": "float32"},
           "hub": {"sequences": 2, "retries": 2, "backoff": 0.2, "min_free_gb": 0},
           # every measure (PWCCA and SVCCA are off by default: docs/guide/measures.md)
           "measures": {"pwcca": {"data": ["activations"]}, "svcca": {"data": ["activations"]}}}


def test_the_paper_grid_dry_run_is_offline_and_lists_135_extractions(workflow_copy,
                                                                       monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no request
    workdir = workflow_copy
    proc = snakemake(workdir, "-n", "--configfile", "config/config.yaml", "--quiet", "rules")
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert counts["extract"] == "135"
    # one download per (size, step), all temporary; one reference store per size
    assert counts["download"] == "135" and counts["reference"] == "5"
    assert counts["pile_batch"] == "1" and counts["checkpoint_audit"] == "1"


@pytest.mark.slow
def test_pythia_config_runs_end_to_end_through_the_hub_client(tmp_path, workflow_copy,
                                                                monkeypatch):
    workdir = workflow_copy
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
        # adding a step: its download and extraction only; step 0 and the final step, whose
        # weights are gone, are neither downloaded again nor re-extracted, and the reference
        # store stays
        (workdir / "config/more.yaml").write_text(yaml.safe_dump({"steps": [*STEPS, 1000]}))
        more = snakemake(workdir, "--configfile", "config/config.yaml", "config/test_hub.yaml",
                         "config/more.yaml", "-n", "--quiet", "rules")
        counts = dict(re.findall(r"^(\w+)\s+(\d+)$", more.stdout, flags=re.M))
        assert counts["download"] == "1" and counts["extract"] == "1", more.stdout
        assert "reference" not in counts, more.stdout

    results = workdir / RESULTS
    # the eval batch is the first sequences of the last training batch (batch 142999)
    start = 142999 * 1024 * 2049
    expected = token_at(np.arange(start, start + 2 * 2049, dtype=np.uint64)).reshape(2, 2049)
    np.testing.assert_array_equal(np.load(results / "eval_batch.npy"), expected)
    record = json.loads((results / "data/batch142999.json").read_text())
    assert record["pieces"] == [{"shard": "document-00020-of-00020.bin",
                                 "offset": 74_139_648, "length": 4_196_352}]
    # weights were all temporary (the size's reference store holds what the statistics need
    # of step 0 and the final step); the revision records stay, and the stores carry them
    ckpts = results / "checkpoints/70m/seed0"
    assert not list(ckpts.rglob("model.safetensors"))
    reference = xr.open_zarr(results / "reference/70m/seed0.zarr", consolidated=False)
    assert reference.attrs["final_step"] == 143000
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
    # every measure on the hub path (docs/guide/measures.md): PWCCA, SVCCA, PER, condition
    # numbers, norms, Gini and Hoyer of weights, gradients, activations and OV circuits
    from lmdynamics.estimators.measures import MEASURES
    from lmdynamics.options import resolve
    from lmdynamics.reduction.measures import MeasureOptions

    table = pd.read_csv(results / "metrics.csv")
    chosen = MeasureOptions.from_config(resolve("measures", OVERLAY["measures"])).choices
    for choice in chosen:
        assert (results / f"figures/measure_{choice.measure.name}.png").stat().st_size > 5000
        for kind in choice.data:
            name = choice.measure.variable(kind)
            values = metrics[name].sel(size="70m")
            if kind == "ov_circuit":
                values = values.sel(component="attention")
                assert metrics[f"{name}_heads"].sel(size="70m").notnull().all(), name
            assert values.notnull().all() and name in table.columns, name
    assert {c.measure.name for c in chosen} == set(MEASURES)
    np.testing.assert_allclose(final["svcca"].values, 1.0, atol=1e-9)


# --- other suites: the dry run of every shipped definition, offline, and OLMo end to end ----

#: Per shipped suite: the overlay on config/config.yaml (its hub.repo/revision/dataset
#: removed, so the definition's apply) and the extraction jobs it must plan.
SUITE_RUNS = {
    "pythia": ({"suite": "pythia"}, 5 * 27),
    "pythia-deduped": ({"suite": "pythia-deduped"}, 5 * 27),
    "polypythias": ({"suite": "polypythias", "sizes": ["14m", "70m"],
                     "eval_data": {"path": "tokens.npy"}}, 2 * 27 * 10),  # seeds unset: all 10
    # OLMo-1B-hf has no step0 branch (its first is step1000): the config check refuses 0
    "olmo-1b": ({"suite": "olmo-1b", "sizes": ["1B"], "steps": [1000, 2000, 20000],
                 "final_step": 20000, "eval_data": {"path": "tokens.npy"}}, 3),
    "olmo-7b-0424": ({"suite": "olmo-7b-0424", "sizes": ["7B"], "steps": [1000, 2000, 452000],
                      "final_step": 452000, "eval_data": {"path": "tokens.npy"}}, 3),
    "mistral-gpt2": ({"suite": "mistral-gpt2", "sizes": ["small", "medium"],
                      "steps": [0, 10, 100, 1000, 2000, 20000, 100000, 400000],
                      "final_step": 400000,
                      "eval_data": {"path": "tokens.npy", "seq_len": 1024}}, 2 * 8 * 5),
}


def suite_config(workdir, overlay: dict) -> str:
    """config/suite.yaml: config/config.yaml without its hub repo, revision and dataset (the
    suite definition's apply), with ``overlay``; and tokens.npy for eval_data."""
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    for key, value in overlay.items():
        config[key] = ({**config[key], **value} if isinstance(value, dict)
                       and isinstance(config.get(key), dict) else value)
    (workdir / "config/suite.yaml").write_text(yaml.safe_dump(config))
    np.save(workdir / "tokens.npy", np.arange(16 * 2049, dtype=np.uint16) % 500)
    return "config/suite.yaml"


@pytest.mark.parametrize("name", list(SUITE_RUNS))
def test_every_shipped_suite_plans_offline(name, workflow_copy, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: no request
    overlay, extractions = SUITE_RUNS[name]
    workdir = workflow_copy
    configfile = suite_config(workdir, overlay)
    # one dry run: its job table (counts) and every job's shell command
    commands = snakemake(workdir, "-n", "-p", "--configfile", configfile).stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", commands, flags=re.M))
    assert counts["extract"] == str(extractions)
    assert int(counts["download"]) == extractions
    eval_rule = "pile_batch" if name.startswith("pythia") else "suite_eval_batch"
    assert counts[eval_rule] == "1"
    repos = set(re.findall(r"lmdynamics download --repo (\S+)", commands))
    expected = {"pythia": "EleutherAI/pythia-70m", "pythia-deduped":
                "EleutherAI/pythia-70m-deduped", "polypythias": "EleutherAI/pythia-70m",
                "olmo-1b": "allenai/OLMo-1B-hf", "olmo-7b-0424": "allenai/OLMo-7B-0424-hf",
                "mistral-gpt2": "stanford-crfm/alias-gpt2-small-x21"}[name]
    assert expected in repos, repos
    if name.startswith("olmo"):  # discovered at download time, by pattern
        assert "--step 1000 --revision-pattern 'step(?P<step>[0-9]+)-tokens" in commands
    assert "lmdynamics hub-audit" in commands  # the pre-flight audit precedes the downloads

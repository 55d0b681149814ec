"""Checkpoints you can trust, end to end through the Snakemake command line and the real
huggingface_hub client against the loopback hub (tests/hub_server.py):

- #205's pattern (tests/defect_files.py: one blob for main and steps 0-53000, a second for
  63000 and the final step) is named in ``tables/hub_audit.csv`` before any weight request;
  with ``audit.defective: fail`` the run stops before any download or extraction, in one line
  naming them; with ``exclude`` (the default) Table 1 is computed without them, its footnotes
  list each, the figures mark them, and each shared blob is fetched once;
- an OLMo-1B-hf-style repo (no step0 branch, first step1000, the irregular last branch
  step738020-tokens3094B) and a Mistral-GPT-2-style repo (``pytorch_model.bin`` with the
  persistent ``attn.bias`` / ``attn.masked_bias`` buffers of transformers 4.x) run end to end
  under the shipped definitions and the default options.
"""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from support.defect_files import add_genuine, add_pythia_205
from support.hub_server import (
    MISTRAL_REPO,
    OLMO_REPO,
    TEST_VOCAB,
    HubServer,
    add_mistral_gpt2,
    add_olmo,
    use_endpoint,
)
from support.workflow import snakemake

STEPS_205 = [0, 3000, 13000, 63000, 73000, 143000]
FAST = {"tokens": 64, "extraction": {"device": "cpu", "dtype": "float32"},
        "metrics": {"bootstrap": {"samples": 20}},
        "hub": {"sequences": 2, "retries": 1, "backoff": 0.2, "min_free_gb": 0}}


def _config(workdir, overlay: dict, name: str = "trust.yaml") -> str:
    """config/<name>: config/config.yaml without its hub repo, revision and dataset (the
    suite definition's apply), with :data:`FAST` and ``overlay``."""
    config = yaml.safe_load((workdir / "config/config.yaml").read_text())
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    for part in (FAST, overlay):
        for key, value in part.items():
            config[key] = ({**config[key], **value} if isinstance(value, dict)
                           and isinstance(config.get(key), dict) else value)
    (workdir / "config" / name).write_text(yaml.safe_dump(config))
    return f"config/{name}"


def _logs(results) -> str:
    return "".join(p.read_text() for p in (results / "logs").rglob("*.log"))


def _run(workdir, results, *args: str) -> None:
    """The workflow with ``args``; on failure, the end of Snakemake's output and the logs."""
    proc = snakemake(workdir, *args, "--resources", "network=2", check=False)
    if proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:] + _logs(results)[-6000:])


def _is_weight_get(method: str, path: str) -> bool:
    """A GET of a model's weight file (the Pile's ``.bin`` shards are a dataset's)."""
    return method == "GET" and not path.startswith("/datasets/") and \
        re.search(r"/resolve/.*\.(bin|safetensors)$", path) is not None


def _weight_gets(hub, repo: str = "") -> list[int]:
    return [i for i, (m, p, _, _) in enumerate(hub.state.requests)
            if repo in p and _is_weight_get(m, p)]


@pytest.mark.slow
def test_205_pattern_fail_stops_before_extraction_and_exclude_leaves_them_out(
        tmp_path, workflow_copy, monkeypatch):
    workdir = workflow_copy
    configfile = _config(workdir, {"suite": "pythia", "sizes": ["70m", "2.8b"],
                                   "steps": STEPS_205})
    (workdir / "config/fail.yaml").write_text(yaml.safe_dump({"audit": {"defective": "fail"}}))
    results = workdir / "results/pythia"
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path, timeout=5)
        blobs = add_pythia_205(hub, STEPS_205, vocab=TEST_VOCAB)
        add_genuine(hub, STEPS_205, vocab=TEST_VOCAB)
        hub.add_pile("EleutherAI/pile-standard-pythia-preshuffled")
        flagged = sorted(blobs["main"] + [63000])
        # fail: the pre-flight audit stops the run before any weight is fetched
        failed = snakemake(workdir, "--configfile", configfile, "config/fail.yaml",
                           "--resources", "network=2", check=False)
        assert failed.returncode != 0
        assert _weight_gets(hub) == [] and not (results / "extract").exists()
        errors = [line for line in (results / "logs/hub_audit.log").read_text().splitlines()
                  if line.startswith("lmdynamics hub-audit: error:")]
        assert len(errors) == 1
        for step in flagged:
            assert f"2.8b seed 0 step {step} (" in errors[0]
        assert "70m" not in errors[0]
        # exclude (the default)
        _run(workdir, results, "--configfile", configfile)
        requests = list(hub.state.requests)
        gets = _weight_gets(hub, "pythia-2.8b")
    # the audit asked for every planned revision before the first weight request
    first = min(i for i, (m, p, _, _) in enumerate(requests) if _is_weight_get(m, p))
    asked = {p for _, p, _, _ in requests[:first]}
    for step in STEPS_205:
        assert f"/api/models/EleutherAI/pythia-2.8b/revision/step{step}" in asked
    audit = pd.read_csv(results / "tables/hub_audit.csv", keep_default_na=False,
                        dtype={"step": str})
    big = audit[(audit["size"] == "2.8b") & (audit.step != "")].set_index("step")
    assert sorted(int(s) for s in big[big.defective].index) == flagged
    assert not audit[audit["size"] == "70m"].defective.any()
    # one GET per distinct 2.8b blob (main's, the second, 73000's), not one per revision
    assert len(gets) == 3
    assert not list((results / "checkpoints/.blobs").glob("*"))
    found = pd.read_csv(results / "tables/defective.csv")
    assert sorted(set(found[found["size"] == "2.8b"].step)) == flagged
    assert set(found.audit) == {"hub", "content"}  # the weights confirm the hashes
    # Table 1: 70m at step 13000 as configured; 2.8b has no trusted step at or before it
    table = pd.read_csv(results / "tables/mcc.csv")
    assert set(table[table["size"] == "70m"].early_step) == {13000}
    big_rows = table[table["size"] == "2.8b"]
    assert big_rows.mcc.isna().all()
    assert big_rows.undefined_reason.str.contains("no trusted analysed step").all()
    md = (results / "tables/mcc.md").read_text()
    assert "**Flagged revisions**" in md and "left out of this table" in md
    for step in flagged:
        assert f"- 2.8b seed 0 step {step}: " in md
    assert "issues/205" in md
    # the figures mark them: hollow markers at the flagged steps, with a legend entry
    from lmdynamics.cli import run
    from lmdynamics.report import figures

    drawn = []
    real_save = figures.save_figure
    monkeypatch.setattr(figures, "save_figure",
                        lambda fig, stem: drawn.append(fig) or real_save(fig, stem))
    run(["figure", "figure2", "--metrics", str(results / "metrics.zarr"), "--defects",
         str(results / "tables/defective.csv"), "--out-stem", str(tmp_path / "f2")])
    fig = drawn[-1]
    assert "flagged revision (left out)" in [t.get_text() for leg in fig.legends
                                             for t in leg.get_texts()]
    hollow = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "o"
              and ln.get_markerfacecolor() == "none"]
    assert [sorted(ln.get_xdata()) for ln in hollow] == [[float(s) for s in flagged]]
    # mark: the same table computed with the flagged revisions, still listed
    run(["mcc", "--metrics", str(results / "metrics.zarr"), "--defects",
         str(results / "tables/defective.csv"), "--options",
         json.dumps({"audit": {"defective": "mark"}}), "--csv", str(tmp_path / "mark.csv"),
         "--md", str(tmp_path / "mark.md")])
    marked = pd.read_csv(tmp_path / "mark.csv")
    assert set(marked[marked["size"] == "2.8b"].early_step) == {13000}
    assert "counted in this table (audit.defective: mark)" in (tmp_path / "mark.md").read_text()


@pytest.mark.slow
def test_olmo_1b_hf_style_repo_runs_under_the_shipped_definition(tmp_path, workflow_copy,
                                                                  monkeypatch):
    """No step0 branch, first step1000, an irregular last branch: the Conjecture reference is
    the earliest revision, Table 1's early step exists, nothing is flagged."""
    steps = [1000, 20000, 738020]
    last = {738020: "step738020-tokens3094B"}  # OLMo-1B-hf's last branch, as the hub names it
    workdir = workflow_copy
    np.save(workdir / "tokens.npy", np.arange(16 * 33, dtype=np.uint16) % 500)
    configfile = _config(workdir, {
        "suite": "olmo-1b", "sizes": ["1B"], "steps": steps, "final_step": 738020,
        "eval_data": {"path": "tokens.npy", "seq_len": 33}})
    results = workdir / "results/olmo-1b"
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path, timeout=5)
        names = add_olmo(hub, steps, names=last)
        _run(workdir, results, "--configfile", configfile)
        repo = hub.state.repo("models", OLMO_REPO)
    assert names[738020] == "step738020-tokens3094B"
    # every step's branch found by list_repo_refs, the same eval batch in every store
    batch = np.load(results / "eval_batch.npy")
    np.testing.assert_array_equal(batch, (np.arange(2 * 33) % 500).reshape(2, 33))
    digest = hashlib.sha256(batch.astype(np.int64).tobytes()).hexdigest()
    for step in steps:
        rev = json.loads((results / f"checkpoints/1B/seed0/step{step}/revision.json")
                         .read_text())
        attrs = xr.open_zarr(results / f"extract/1B/seed0/step{step}.zarr").attrs
        assert rev["revision"] == names[step] == attrs["revision"]
        assert rev["commit"] == repo.branches[names[step]]
        assert attrs["eval_batch_sha256"] == digest and attrs["family"] == "llama"
    reference = xr.open_zarr(results / "reference/1B/seed0.zarr", consolidated=False)
    init = json.loads((results / "checkpoints/1B/seed0/step1000/revision.json").read_text())
    assert reference.attrs["init_weights_sha256"] == init["sha256"]  # the earliest revision
    assert not pd.read_csv(results / "tables/hub_audit.csv").defective.any()
    assert pd.read_csv(results / "tables/defective.csv").empty
    assert set(pd.read_csv(results / "tables/mcc.csv").early_step) == {20000}
    for name in ("figure2", "conjecture_distance"):
        assert (results / f"figures/{name}.png").stat().st_size > 5000


@pytest.mark.slow
def test_mistral_gpt2_style_repo_runs_under_the_shipped_definition(tmp_path, workflow_copy,
                                                                     monkeypatch):
    """transformers-4.x ``pytorch_model.bin`` files with the persistent attention buffers
    load (the gpt2 family drops exactly those) and the whole DAG runs."""
    steps = [0, 100, 400000]
    workdir = workflow_copy
    np.save(workdir / "tokens.npy", np.arange(16 * 33, dtype=np.uint16) % 500)
    configfile = _config(workdir, {
        "suite": "mistral-gpt2", "sizes": ["small"], "seeds": [21], "steps": steps,
        "final_step": 400000, "eval_data": {"path": "tokens.npy", "seq_len": 33}})
    results = workdir / "results/mistral-gpt2"
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path, timeout=5)
        add_mistral_gpt2(hub, steps)
        _run(workdir, results, "--configfile", configfile)
        assert _weight_gets(hub, MISTRAL_REPO)
    logs = _logs(results)
    assert "dropped 4 persistent buffers of older transformers" in logs
    assert "attn.masked_bias" in logs
    attrs = xr.open_zarr(results / "extract/small/seed21/step100.zarr").attrs
    assert attrs["family"] == "gpt2" and not any("masked_bias" in k
                                                 for k in attrs["tensor_sha256"])
    assert pd.read_csv(results / "tables/defective.csv").empty
    assert (results / "tables/mcc.md").is_file()

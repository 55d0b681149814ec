"""The pre-flight hub audit through the real huggingface_hub client against the loopback hub,
serving the defects the suites' trackers document (tests/defect_files.py): #205's two blobs,
#206's shared first shard, #202's revision without weights; and the download that fetches a
blob several planned revisions share once."""

from __future__ import annotations

import copy
import json
import re
import time

import pandas as pd
import pytest
import yaml

from lmdynamics import defects
from lmdynamics import hub_audit as ha
from lmdynamics.cli import run
from lmdynamics.sources.blobs import SharedBlobs
from lmdynamics.sources.hub import download_revision
from support.defect_files import (
    SHARD_STEPS_206,
    add_missing_weights,
    add_pythia_205,
    add_pythia_206,
    first_shard,
)
from support.hub_server import TEST_VOCAB, HubServer, use_endpoint
from support.workflow import REPO

PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
STEPS_205 = [0, 512, 3000, 13000, 53000, 63000, 73000, 143000]


def _config(suite: str, sizes: list[str], steps: list[int], **overlay) -> dict:
    config = copy.deepcopy(PYTHIA)
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    config.update(suite=suite, sizes=sizes, steps=steps, **overlay)
    config["hub"].update(retries=0, backoff=0.1)
    return config


def _model_requests(hub, expected: int) -> list[str]:
    """The /api/models requests the hub logged (the server logs a request after answering
    it: wait a moment for the last)."""
    deadline = time.monotonic() + 5
    while True:
        asked = [p for _, p, _, _ in hub.state.requests if p.startswith("/api/models/")]
        if len(asked) >= expected or time.monotonic() > deadline:
            return asked
        time.sleep(0.05)


def _weight_gets(hub) -> list[str]:
    return [p for m, p, _, _ in hub.state.requests
            if m == "GET" and re.search(r"/resolve/.*\.(bin|safetensors)$", p)]


def test_205_pattern_is_named_from_the_hashes_before_any_weight_request(monkeypatch, tmp_path):
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        blobs = add_pythia_205(hub, STEPS_205, vocab=TEST_VOCAB)
        result = ha.audit(_config("pythia", ["2.8b"], STEPS_205))
        assert _weight_gets(hub) == []  # metadata only
        # (the client also asks /api/agent-harnesses for its own user agent: not ours)
        asked = _model_requests(hub, result.requests)
    table = result.table
    assert result.requests == len(STEPS_205) + 1 == len(asked)  # one per revision and main
    rows = table[table.revision != "main"].set_index("step")
    flagged = rows[rows.defective]
    assert sorted(flagged.index) == sorted(blobs["main"] + [63000])
    assert set(flagged.loc[blobs["main"], "kind"]) == {"same_as_main"}
    assert flagged.loc[63000, "kind"] == "same_as_final"
    assert not rows.loc[143000, "defective"] and not rows.loc[73000, "defective"]
    # file-level groups: main's blob, the second blob (63000 with the final step), 73000 alone
    assert rows.loc[0, "file_group"] == rows.loc[53000, "file_group"] == \
        table[table.revision == "main"].file_group.iloc[0]
    assert rows.loc[63000, "file_group"] == rows.loc[143000, "file_group"] != \
        rows.loc[73000, "file_group"]
    assert rows.loc[0, "same_as_main"] and rows.loc[63000, "same_as_final"]
    # the suite definition's known defects are reported beside the verdict
    assert "issues/205" in rows.loc[13000, "known_defects"]
    findings = "\n".join(result.findings())
    assert "5 revision(s) same_as_main" in findings and \
        "known defect confirmed: https://github.com/EleutherAI/pythia/issues/205" in findings
    # written and read back; the hub rows become rows of tables/defective.csv
    ha.write_audit(result, tmp_path / "hub_audit.csv")
    found = defects.frame(ha.defect_rows(ha.read_audit(tmp_path / "hub_audit.csv")))
    assert sorted(found.step) == sorted(flagged.index)
    assert set(found.audit) == {"hub"} and found.source.str.contains("issues/205").all()


def test_a_defect_fixed_upstream_is_not_flagged(monkeypatch, tmp_path):
    """Known defects report, the hashes decide: #205's steps served genuine files here."""
    import safetensors.torch

    from support.defect_files import trajectory_state
    from support.pythia_files import pythia_config

    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        for step in [0, 13000, 143000, "main"]:
            state = trajectory_state("2.8b", 143000 if step == "main" else step, TEST_VOCAB)
            hub.add_model("EleutherAI/pythia-2.8b", step if step == "main" else f"step{step}",
                          {"config.json": json.dumps(pythia_config(32, 2, 4, TEST_VOCAB)).encode(),
                           "model.safetensors": safetensors.torch.save(state)})
        result = ha.audit(_config("pythia", ["2.8b"], [0, 13000, 143000]))
    rows = result.table[result.table.revision != "main"].set_index("step")
    assert not rows.defective.any()
    assert "issues/205" in rows.loc[13000, "known_defects"]
    assert "not seen in the hashes (fixed upstream?)" in "\n".join(result.findings())


def test_206_shared_shard_is_named_with_its_tensors(monkeypatch, tmp_path):
    steps = [0, 49000, 50000, 51000, 58000, 143000]
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_pythia_206(hub, steps, vocab=TEST_VOCAB)
        result = ha.audit(_config("pythia", ["12b"], steps))
        assert _weight_gets(hub) == []
    rows = result.table[result.table.revision != "main"].set_index("step")
    assert sorted(rows[rows.defective].index) == list(SHARD_STEPS_206)
    assert set(rows.loc[list(SHARD_STEPS_206), "kind"]) == {"shared_shard"}
    shared = rows.loc[50000, "shared_shards"]
    assert shared.startswith("pytorch_model-00001-of-00003.bin: step58000, step143000, main")
    assert "gpt_neox.embed_in.weight" in shared
    assert not rows.loc[143000, "defective"]  # the reference is never flagged
    assert "issues/206" in rows.loc[50000, "known_defects"]


def test_decide_rules_on_synthetic_groups():
    def planned(step, content):
        files = ha.RevisionFiles("r", "main" if step is None else f"step{step}",
                                 files=((f"f{content}", content * 64, 1),) if content else ())
        return ha.Planned("s", 0, step, files)

    # steps 1 and 2 repeat step 0 (#83, #198): step 0 anchors them; 5 and 7 repeat each other
    run_ = [planned(0, "a"), planned(1, "a"), planned(2, "a"), planned(5, "b"), planned(7, "b"),
            planned(9, "c"), planned(10, "d"), planned(None, "d"), planned(8, None)]
    verdict = ha.decide(run_, final_step=10)
    assert {s: k for s, (k, _) in verdict.items()} == {
        1: "same_as_step0", 2: "same_as_step0", 5: "shared_content", 7: "shared_content",
        8: "no_weights"}
    # step 0 repeating main (#205) is flagged with everything else that does
    run_ = [planned(0, "m"), planned(1, "m"), planned(4, "x"), planned(10, "f"),
            planned(None, "m")]
    assert {s: k for s, (k, _) in ha.decide(run_, final_step=10).items()} == {
        0: "same_as_main", 1: "same_as_main"}


def test_202_revision_without_weights_is_one_line_at_plan_time(monkeypatch, tmp_path, capsys):
    config = _config("polypythias", ["410m"], [0, 40000, 143000], seeds=[9],
                     eval_data={"path": "tokens.npy"})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_missing_weights(hub, "EleutherAI/pythia-410m-seed9", [0, 40000, 143000], 40000,
                            vocab=TEST_VOCAB)
        monkeypatch.chdir(REPO)
        run(["plan", "--configfile", str(tmp_path / "c.yaml")])
        out = capsys.readouterr().out
        result = ha.audit(config)
    lines = [line for line in out.splitlines() if "no_weights" in line]
    assert len(lines) == 1 and "410m seed 9" in lines[0] and "steps 40000" in lines[0]
    assert "known defect confirmed: https://github.com/EleutherAI/pythia/issues/202" in lines[0]
    with pytest.raises(defects.DefectiveRevisionsError,
                       match=r"no usable weights on the hub for 1 planned revision\(s\): "
                             r"410m seed 9 step 40000: EleutherAI/pythia-410m-seed9@step40000 "
                             r"has no weights on the hub \(no weights file among.*remove those "
                             r"steps"):
        ha.enforce(result.table, "exclude")


def test_fail_policy_stops_with_one_line_naming_them(monkeypatch, tmp_path):
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_pythia_205(hub, STEPS_205, vocab=TEST_VOCAB)
        result = ha.audit(_config("pythia", ["2.8b"], STEPS_205))
    ha.enforce(result.table, "exclude")  # exclude and mark go on
    ha.enforce(result.table, "mark")
    with pytest.raises(defects.DefectiveRevisionsError) as err:
        ha.enforce(result.table, "fail")
    line = str(err.value)
    assert "\n" not in line and line.startswith("the pre-flight hub audit flagged 6 revision")
    assert "2.8b seed 0 step 13000 (same_as_main)" in line and "step 63000 (same_as_final)" \
        in line


def test_offline_plan_lists_known_defects_without_deciding(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = {**copy.deepcopy(PYTHIA), "suite": "pythia"}
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    lines, sizes = ha.audit_report(config, online=False)
    assert sizes is None and "not checked offline" in lines[0]
    assert any("2.8b seed 0 steps 0, 1, 2, 4" in line and "issues/205" in line
               for line in lines)


def test_a_blob_several_revisions_serve_is_fetched_once(monkeypatch, tmp_path):
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        blobs = add_pythia_205(hub, STEPS_205, vocab=TEST_VOCAB)
        result = ha.audit(_config("pythia", ["2.8b"], STEPS_205))
        root = tmp_path / "checkpoints"
        shared = SharedBlobs(root / ".blobs", result.table)
        repo = "EleutherAI/pythia-2.8b"
        size = None
        for step in blobs["main"]:
            record = download_revision(repo, f"step{step}", root / f"2.8b/seed0/step{step}",
                                       retries=0, backoff=0.1, blobs=shared)
            size = record["bytes"]
        gets = _weight_gets(hub)
    assert len(gets) == 1  # five revisions, one blob, one GET
    assert hub.state.bytes_sent(r"/resolve/.*model\.safetensors$") == size
    for step in blobs["main"]:
        assert (root / f"2.8b/seed0/step{step}/model.safetensors").stat().st_size == size
    # every revision serving it is downloaded: the kept copy is gone
    assert not list((root / ".blobs").glob("*"))


def test_shard_tensor_names_come_from_the_index_not_the_weights(monkeypatch, tmp_path):
    """#206's tensor names are read from the small index file: no weight request."""
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_pythia_206(hub, [0, 50000, 143000], vocab=TEST_VOCAB)
        files = ha.revision_files("EleutherAI/pythia-12b", "step50000", retries=0, backoff=0.1)
        names = ha.shard_tensors("EleutherAI/pythia-12b", files.commit, files.index,
                                 "pytorch_model-00001-of-00003.bin", retries=0, backoff=0.1)
        assert _weight_gets(hub) == []
    assert names and all(first_shard(n) for n in names)
    assert pd.Series(names).str.startswith("gpt_neox.layers.0.").sum() >= 1


def test_a_damaged_kept_blob_is_dropped_and_fetched_again(monkeypatch, tmp_path):
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        blobs = add_pythia_205(hub, STEPS_205, vocab=TEST_VOCAB)
        result = ha.audit(_config("pythia", ["2.8b"], STEPS_205))
        root = tmp_path / "checkpoints"
        shared = SharedBlobs(root / ".blobs", result.table)
        first, second = blobs["main"][:2]
        download_revision("EleutherAI/pythia-2.8b", f"step{first}",
                          root / f"2.8b/seed0/step{first}", retries=0, backoff=0.1,
                          blobs=shared)
        (kept,) = list((root / ".blobs").iterdir())
        data = bytearray(kept.read_bytes())
        kept.unlink()
        kept.write_bytes(bytes(data[:100]) + bytes(b ^ 0xFF for b in data[100:200])
                         + bytes(data[200:]))  # same size, other bytes
        record = download_revision("EleutherAI/pythia-2.8b", f"step{second}",
                                   root / f"2.8b/seed0/step{second}", retries=0, backoff=0.1,
                                   blobs=shared)
        assert len(_weight_gets(hub)) == 2  # fetched again, and verified
    row = result.table[result.table.step == second].iloc[0]
    assert row.weight_files == f"model.safetensors={record['sha256']}"  # the hub's blob

"""The duplicate-revision audit: table, metrics flags, and what figures mark."""

from __future__ import annotations

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.extraction.extract import extraction_dataset
from lmdynamics.extraction.passes import Extraction
from lmdynamics.reduction import audit
from lmdynamics.reduction.flags import set_flagged
from lmdynamics.reduction.metrics import reduce_size, write_combined
from lmdynamics.store import open_store, write_store


def test_duplicates_groups_equal_hashes():
    assert audit.duplicates({0: "a", 1: "b", 2: "a", 3: "a"}) == {
        0: [2, 3], 1: [], 2: [0, 3], 3: [0, 2]}


def test_audit_table_finds_duplicates_within_a_size_only():
    attrs = [{"size": "70m", "step": 0, "weights_sha256": "x", "revision": "step0"},
             {"size": "70m", "step": 143000, "weights_sha256": "x"},
             {"size": "70m", "step": 1000, "weights_sha256": "y"},
             {"size": "160m", "step": 0, "weights_sha256": "y"}]
    table = audit.audit_table(attrs)
    assert list(table.columns) == audit.AUDIT_COLUMNS
    got = {(r.size, r.step): (r.duplicate, r.duplicate_of) for r in table.itertuples()}
    assert got == {("70m", 0): (True, "step143000"), ("70m", 143000): (True, "step0"),
                   ("70m", 1000): (False, ""), ("160m", 0): (False, "")}


def test_flagged_ors_duplicate_and_nonfinite_flags():
    ds = xr.Dataset(
        {"flag_duplicate": (("size", "step"), np.array([[True, False, False],
                                                        [False, False, False]])),
         "flag_nonfinite": (("size", "layer", "step"), np.array([[[False, False, False]] * 2,
                                                                 [[False, False, False],
                                                                  [False, True, False]]]))},
        coords={"size": ["a", "b"], "step": [0, 1, 2]})
    out = set_flagged(ds)
    assert out.flagged.dims == ("size", "step")
    np.testing.assert_array_equal(out.flagged.values, [[True, False, False],
                                                       [False, True, False]])


def _pair_store(path, size, step, sha, seed, n_layers=2, dim=4, tokens=16, **extra):
    rng = np.random.default_rng(seed)
    result = Extraction(rng.normal(size=(2, n_layers, tokens, dim)).astype(np.float32),
                        np.sort(rng.random((2, n_layers, dim)))[..., ::-1],
                        np.sort(rng.random((2, n_layers, dim)))[..., ::-1], 1.0)
    attrs = {"model": f"m-{size}", "revision": f"step{step}", "size": size, "step": step,
             "hidden_size": dim, "num_attention_heads": 2, "num_layers": n_layers,
             "n_params": 100 * n_layers, "weights_sha256": sha, **extra}
    ds = extraction_dataset(result, np.zeros(tokens, dtype=np.int64), np.arange(tokens), attrs)
    return write_store(ds, path)


def test_reduction_flags_byte_identical_steps_and_the_audit_lists_them(tmp_path):
    stores = {}
    for size, n_layers in (("a", 2), ("b", 3)):
        for step in (0, 10, 20):
            sha = "same" if (size == "a" and step in (0, 20)) else f"{size}{step}"
            stores[(size, step)] = _pair_store(tmp_path / f"{size}/step{step}.zarr", size, step,
                                               sha, seed=step, n_layers=n_layers)
    metrics = [reduce_size([stores[("a", s)] for s in (0, 10, 20)], tmp_path / "a.zarr",
                           final_step=20),
               reduce_size([stores[("b", s)] for s in (0, 10, 20)], tmp_path / "b.zarr",
                           final_step=20)]
    np.testing.assert_array_equal(metrics[0].flag_duplicate.values, [True, False, True])
    combined = write_combined([tmp_path / "a.zarr", tmp_path / "b.zarr"],
                              tmp_path / "metrics.zarr", tmp_path / "metrics.csv")
    stored = open_store(tmp_path / "metrics.zarr").load()
    for ds in (combined, stored):
        assert ds.flagged.dims == ("size", "step") and ds.flagged.dtype == bool
        np.testing.assert_array_equal(ds.flagged.sel(size="a").values, [True, False, True])
        assert not ds.flagged.sel(size="b").any()
    table = audit.write_audit(list(stores.values()), tmp_path / "audit.csv")
    assert table.duplicate.sum() == 2
    assert pd.read_csv(tmp_path / "audit.csv").duplicate_of.fillna("").tolist().count(
        "step20") == 1


# --- content audit: per-tensor digests and trajectories ---------------------------------------

def _trajectory(steps, final, swap=()):
    """Per step, the three statistics of 3 matrices on a smooth training-like trajectory
    (cosine to init falls, to final rises, distance from init grows); ``swap`` exchanges the
    values of two steps (a mislabelled revision)."""
    values = {}
    for s in steps:
        t = np.sqrt(s / final)
        values[s] = {"cos_init": {f"m{i}": 1 - 0.9 * t + 0.001 * i for i in range(3)},
                     "cos_final": {f"m{i}": 0.05 + 0.95 * t for i in range(3)},
                     "rel_dist_init": {f"m{i}": 2.0 * t for i in range(3)}}
    if swap:
        a, b = swap
        values[a], values[b] = values[b], values[a]
    return values


def test_trajectory_check_flags_a_misplaced_revision_with_its_numbers():
    steps = [0, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    assert audit.trajectory_findings(_trajectory(steps, 100000), 0.05) == {}
    found = audit.trajectory_findings(_trajectory(steps, 100000, swap=(2000, 50000)), 0.05)
    assert sorted(found) == [2000, 50000]
    detail, evidence = found[2000]
    assert "between steps 1000 and 5000" in detail
    assert "median over 3 matrices" in evidence and "> tolerance 0.05" in evidence
    # a revision like #108's (a late checkpoint under an early step) alone
    run = _trajectory(steps, 100000)
    run[5000] = run[100000]
    assert list(audit.trajectory_findings(run, 0.05)) == [5000]


def test_digests_name_identical_revisions_and_shared_tensors():
    final = {"a": "1", "b": "2", "c": "3"}
    run = {0: {"a": "x", "b": "y", "c": "z"}, 1: {"a": "x", "b": "y", "c": "z"},
           5: {"a": "1", "b": "q", "c": "r"}, 7: dict(final), 10: final}
    found = audit.digest_findings(run, final_step=10)
    assert {s: k for s, (k, _, _) in found.items()} == {
        1: "same_as_step0", 5: "tensors_equal", 7: "same_as_final"}
    assert found[5][1] == "tensors equal to step 10's byte for byte: a"
    assert "1 of 3 tensors equal step 10's" in found[5][2]


def test_206_shard_duplicate_is_named_per_tensor_after_download(monkeypatch, tmp_path):
    """#206 end to end but the extraction: the loopback hub serves pythia-12b-like shards,
    the download merges them into one model.safetensors, the tensor digests of the files
    name every tensor of the shared first shard, and only those."""
    from lmdynamics import families
    from lmdynamics.sources.checkpoints import weights_digests
    from lmdynamics.sources.hub import download_revision
    from support.defect_files import SHARD_STEPS_206, add_pythia_206, first_shard
    from support.hub_server import TEST_VOCAB, HubServer, use_endpoint

    steps = [0, 49000, 50000, 143000]
    facts = []
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_pythia_206(hub, steps, vocab=TEST_VOCAB)
        for step in steps:
            out = tmp_path / f"step{step}"
            download_revision("EleutherAI/pythia-12b", f"step{step}", out, retries=0,
                              backoff=0.1)
            _, tensors = weights_digests(out, families.get("gpt_neox"))
            facts.append(audit.RevisionFacts("12b", 0, step, tensors))
    table, rows = audit.content_audit(facts, final_step=143000, tolerance=0.05)
    assert [(r["step"], r["kind"]) for r in rows] == [(50000, "tensors_equal")]
    assert 50000 in SHARD_STEPS_206
    named = set(table[table.step == 50000].tensor)
    assert named and all(first_shard(n) for n in named)
    shard = {n for n in facts[0].tensors if first_shard(n)}
    assert named == shard  # every parameter of the shard, no buffer, nothing else
    assert set(table[table.step == 50000].equal_to) == {"step143000"}
    assert "gpt_neox.embed_in.weight" in rows[0]["detail"]


def test_audit_command_writes_the_defects_and_fail_stops_naming_them(tmp_path):
    """The checkpoint_audit rule's command: the hub audit's rows and the content audit's in
    tables/defective.csv; with audit.defective fail, one line naming the content findings."""
    import json

    import pytest

    from lmdynamics import defects
    from lmdynamics.cli import run

    digests = {0: {"w": "a", "v": "b"}, 10: {"w": "c", "v": "b2"}, 20: {"w": "e", "v": "b"},
               30: {"w": "e", "v": "f"}}
    stores = [_pair_store(tmp_path / f"s{step}.zarr", "a", step, f"sha{step}", seed=step,
                          tensor_sha256=d) for step, d in digests.items()]
    hub = tmp_path / "hub_audit.csv"
    pd.DataFrame([{"size": "a", "seed": 0, "step": 10, "repo": "o/a", "revision": "step10",
                   "commit": "c" * 40, "weight_files": "model.safetensors=" + "1" * 64,
                   "weights_bytes": 1, "file_group": "G1", "same_content_as": "main",
                   "same_as_main": True, "same_as_final": False, "shared_shards": "",
                   "no_weights": False, "defective": True, "kind": "same_as_main",
                   "reason": "serves main's", "known_defects": ""}]).to_csv(hub, index=False)
    args = ["audit", *map(str, stores), "--out", str(tmp_path / "c.csv"),
            "--tensor-audit", str(tmp_path / "t.csv"), "--defects", str(tmp_path / "d.csv"),
            "--hub-audit", str(hub)]
    run([*args, "--options", json.dumps({"final_step": 30})])
    found = defects.read_defects(tmp_path / "d.csv")
    assert [(r.step, r.audit, r.kind) for r in found.itertuples()] == [
        (10, "hub", "same_as_main"), (20, "content", "tensors_equal")]
    assert "tensors equal to step 30's byte for byte: w" in found.detail.iloc[1]
    tensors = pd.read_csv(tmp_path / "t.csv")
    pairs = set(zip(tensors.step, tensors.tensor, strict=True))
    assert pairs == {(0, "v"), (20, "v"), (20, "w"), (30, "w")}
    with pytest.raises(defects.DefectiveRevisionsError,
                       match=r"^the content audit flagged 1 revision\(s\) .*a seed 0 step 20 "
                             r"\(tensors_equal\)"):
        run([*args, "--options", json.dumps({"final_step": 30, "audit": {"defective": "fail"}})])

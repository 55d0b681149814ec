"""Downloads of Pythia revisions through the real huggingface_hub client, against a loopback
hub (tests/hub_server.py) that injects faults."""

from __future__ import annotations

import hashlib
import io
import json

import httpx2
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

from lmdynamics.sources import hub as hb
from lmdynamics.sources.checkpoints import UntrustedCheckpointError, load_model, read_state_dict
from lmdynamics.sources.revision import revision_attrs
from support.hub_server import HubServer, add_pythia, checkpoint_files, use_endpoint
from support.pythia_files import torch_bytes

REPO = "EleutherAI/pythia-70m-deduped"
FAST = {"retries": 2, "backoff": 0.01}


@pytest.fixture
def server(monkeypatch, tmp_path):
    with HubServer() as srv:
        use_endpoint(monkeypatch, srv, tmp_path, timeout=1)
        # step512 serves model.safetensors (legacy names), the others pytorch_model.bin
        add_pythia(srv, "70m", [0, 1, 2, 4, 512, 1000, 143000], missing=(2,), safetensors=(512,))
        add_pythia(srv, "160m", [0, 143000])  # sharded, with its index
        yield srv


def _listing(path):
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_download_writes_the_model_directory_and_a_record(server, tmp_path):
    out = tmp_path / "checkpoints/70m/step0"
    record = hb.download_revision(REPO, "step0", out, **FAST)
    assert _listing(out) == ["config.json", "model.safetensors", "revision.json"]
    assert _listing(out.parent) == ["step0"]  # no staging folder left behind
    sha = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    assert record["sha256"] == sha and record["bytes"] == (out / "model.safetensors").stat().st_size
    assert record["commit"] == server.state.repo("models", REPO).branches["step0"]
    assert json.loads((out / "revision.json").read_text()) == record
    assert revision_attrs(out)["revision_commit"] == record["commit"]
    load_model(out)


def test_a_safetensors_revision_is_kept_byte_for_byte_and_loads_its_legacy_names(server,
                                                                                  tmp_path):
    out = tmp_path / "step512"
    record = hb.download_revision(REPO, "step512", out, **FAST)
    expected = checkpoint_files("70m", seed=1512, layout="safetensors")["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == expected and not record["converted"]
    assert "embed_out.weight" in read_state_dict(out / "model.safetensors")
    _assert_same_weights(load_model(out), expected_state("70m", 1512))


def expected_state(size, seed):
    """The revision's float16 tensors under today's names, as float32."""
    from support.hub_server import TEST_VOCAB
    from support.pythia_files import TEST_ARCHITECTURES, legacy_state_dict

    state = legacy_state_dict(*TEST_ARCHITECTURES[size], TEST_VOCAB, seed)
    state["lm_head.weight"] = state.pop("embed_out.weight")
    return state


def _assert_same_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) <= set(state)
    for name, tensor in loaded.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, state[name].float(), rtol=0, atol=0)


def test_pickled_weights_are_read_safely_and_rewritten_as_safetensors(server, tmp_path):
    out = tmp_path / "step4"
    record = hb.download_revision(REPO, "step4", out, **FAST)
    assert _listing(out) == ["config.json", "model.safetensors", "revision.json"]
    assert record["converted"] and record["weights_files"][0]["name"] == "pytorch_model.bin"
    converted = read_state_dict(out / "model.safetensors")
    assert converted["embed_out.weight"].dtype == torch.float16  # names and dtypes kept
    assert converted["gpt_neox.layers.0.attention.bias"].dtype == torch.bool
    _assert_same_weights(load_model(out), expected_state("70m", 1004))


def test_sharded_revisions_are_checked_against_their_index_and_merged(server, tmp_path):
    out = tmp_path / "160m/step0"
    record = hb.download_revision("EleutherAI/pythia-160m-deduped", "step0", out, **FAST)
    assert [f["name"] for f in record["weights_files"]] == [
        "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert _listing(out) == ["config.json", "model.safetensors", "revision.json"]
    _assert_same_weights(load_model(out), expected_state("160m", 1000))


@pytest.mark.parametrize("damage, message", [
    ("drop_shard", "incomplete or inconsistent shard set"),
    ("drop_index", "without their index"),
    ("overlap", "is in both"),
    ("index_lies", "names shards"),
])
def test_broken_shard_sets_fail_naming_the_problem(server, tmp_path, damage, message):
    files = checkpoint_files("160m", seed=5)
    first, second = "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"
    index = json.loads(files["pytorch_model.bin.index.json"])
    if damage == "drop_shard":
        del files[second]
    elif damage == "drop_index":
        del files["pytorch_model.bin.index.json"]
    elif damage == "overlap":  # shard 2 also carries a tensor of shard 1, with other values
        a = torch.load(io.BytesIO(files[first]), weights_only=True)
        b = torch.load(io.BytesIO(files[second]), weights_only=True)
        name = next(iter(a))
        b[name] = a[name] + 1
        files[second] = torch_bytes(b)
    elif damage == "index_lies":
        index["weight_map"] = {k: first for k in index["weight_map"]}
        files["pytorch_model.bin.index.json"] = json.dumps(index).encode()
    server.add_model("EleutherAI/pythia-160m-deduped", "step8", files)
    with pytest.raises(hb.HubError, match=message):
        hb.download_revision("EleutherAI/pythia-160m-deduped", "step8", tmp_path / "s8", **FAST)
    assert not (tmp_path / "s8").exists()


def test_missing_revision_names_it_and_the_nearest_steps(server, tmp_path):
    with pytest.raises(hb.RevisionNotFound) as err:
        hb.download_revision(REPO, "step2", tmp_path / "step2", **FAST)
    msg = str(err.value)
    assert "'step2'" in msg and REPO in msg
    assert "step1" in msg and "step4" in msg and "branches on the hub" in msg
    assert isinstance(err.value.__cause__, RevisionNotFoundError)
    assert not (tmp_path / "step2").exists()


def test_server_errors_are_retried_with_backoff_until_they_recover(server, tmp_path):
    api = server.fault(r"/api/models/.*/revision/step1$", times=2, status=503)
    get = server.fault(r"/resolve/.*/pytorch_model\.bin$", method="GET", times=1, status=502)
    hb.download_revision(REPO, "step1", tmp_path / "step1", **FAST)
    assert api.hits == 2 and get.hits == 1
    assert (tmp_path / "step1/model.safetensors").is_file()


def test_persistent_server_errors_fail_clearly_after_the_retries(server, tmp_path):
    server.fault(r"/api/models/.*/revision/step1$", times=100, status=503)
    with pytest.raises(hb.HubError, match=r"step1: revision info: gave up after 3 attempts.*503"):
        hb.download_revision(REPO, "step1", tmp_path / "step1", **FAST)
    assert not (tmp_path / "step1").exists()


def test_timeouts_are_retried_then_fail_clearly(server, tmp_path):
    slow = server.fault(r"/api/models/.*/revision/step0$", kind="slow", delay=2.5, times=1)
    hb.download_revision(REPO, "step0", tmp_path / "a", **FAST)
    assert slow.hits == 1
    server.fault(r"/api/models/.*/revision/step0$", kind="slow", delay=2.5, times=100)
    with pytest.raises(hb.HubError, match=r"gave up after 2 attempts.*Timeout"):
        hb.download_revision(REPO, "step0", tmp_path / "b", retries=1, backoff=0.01)


def test_a_dropped_connection_resumes(server, tmp_path):
    drop = server.fault(r"/resolve/.*/pytorch_model\.bin$", kind="drop", method="GET")
    record = hb.download_revision(REPO, "step0", tmp_path / "step0", **FAST)
    assert drop.hits == 1
    assert record["weights_files"][0]["sha256"] == hashlib.sha256(
        checkpoint_files("70m", seed=1000)["pytorch_model.bin"]).hexdigest()


@pytest.mark.parametrize("kind, message", [("short", "truncated"), ("corrupt", "sha256")])
def test_truncated_or_corrupt_weights_fail_naming_the_file_and_are_fetched_again(
        server, tmp_path, kind, message):
    server.fault(r"/resolve/.*/model\.safetensors$", kind=kind, method="GET", times=1)
    out = tmp_path / "checkpoints/step512"
    with pytest.raises(hb.CorruptDownloadError, match=message) as err:
        hb.download_revision(REPO, "step512", out, **FAST)
    assert "model.safetensors" in str(err.value) and "rerun" in str(err.value)
    assert _listing(out) == [] and _listing(out.parent) == []  # nothing kept
    hb.download_revision(REPO, "step512", out, **FAST)  # the next run fetches it again
    load_model(out)


def test_not_enough_disk_fails_before_writing(server, tmp_path):
    out = tmp_path / "checkpoints/step0"
    need = r"step0: it needs \d+\.\d\d [kM]B \(hub metadata\)"
    with pytest.raises(hb.NotEnoughDiskError, match=need):
        hb.download_revision(REPO, "step0", out, min_free_bytes=10**18, **FAST)
    assert not (tmp_path / "checkpoints").exists()
    assert server.state.bytes_sent(r"pytorch_model\.bin") == 0


def test_a_config_asking_for_remote_code_is_refused(server, tmp_path):
    files = checkpoint_files("70m", seed=7)
    config = json.loads(files["config.json"])
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Model"}
    files["config.json"] = json.dumps(config).encode()
    server.add_model(REPO, "step8", files)
    with pytest.raises(UntrustedCheckpointError, match="auto_map"):
        hb.download_revision(REPO, "step8", tmp_path / "step8", **FAST)
    assert not (tmp_path / "step8").exists()


def test_with_retries_backs_off_exponentially_and_stops_on_permanent_errors():
    waits, calls = [], []

    response = httpx2.Response(503, request=httpx2.Request("GET", "http://127.0.0.1/x"))

    def flaky():
        calls.append(1)
        if len(calls) < 4:
            raise HfHubHTTPError("503 Server Error", response=response)
        return "ok"

    assert hb.with_retries(flaky, what="x", retries=5, backoff=1.5, max_wait=4,
                           sleep=waits.append) == "ok"
    assert waits == [1.5, 3.0, 4]
    with pytest.raises(KeyError):
        hb.with_retries(lambda: {}["k"], what="x", sleep=waits.append)
    assert len(waits) == 3


def test_nearest_steps_and_weight_layouts():
    assert hb.nearest_steps([0, 1, 4, 512, 1000], 2) == [0, 1, 4]
    assert hb.nearest_steps([1000, 3000], 2000, k=1) == [3000]
    assert hb.steps_from_refs(["main", "step10", "step2", "v1"]) == [2, 10]
    assert hb.weight_files(["config.json", "model.safetensors", "pytorch_model.bin"]) == (
        ["model.safetensors"], False, None)
    assert hb.weight_files(["pytorch_model.bin"]) == (["pytorch_model.bin"], True, None)
    shards = ["model-00002-of-00002.safetensors", "model-00001-of-00002.safetensors"]
    index = "model.safetensors.index.json"
    assert hb.weight_files([*shards, index]) == (sorted(shards), True, index)
    with pytest.raises(hb.HubError, match="without their index"):
        hb.weight_files(shards)
    with pytest.raises(hb.HubError, match="incomplete"):
        hb.weight_files(["model-00001-of-00003.safetensors", "model-00003-of-00003.safetensors",
                         index])
    with pytest.raises(hb.HubError, match="no weights file"):
        hb.weight_files(["config.json", "README.md"])


def test_converted_shards_merge_into_one_file(tmp_path):
    import safetensors.torch

    a, b = {"x": torch.arange(4.0)}, {"y": torch.ones(2, 2)}
    safetensors.torch.save_file(a, tmp_path / "model-00001-of-00002.safetensors")
    torch.save(b, tmp_path / "part.bin")
    hb.convert_to_safetensors([tmp_path / "model-00001-of-00002.safetensors",
                               tmp_path / "part.bin"], tmp_path / "model.safetensors")
    merged = read_state_dict(tmp_path / "model.safetensors")
    assert set(merged) == {"x", "y"} and torch.equal(merged["y"], b["y"])


def test_weights_corrupted_on_disk_are_discarded_so_the_next_run_downloads_them(server,
                                                                              tmp_path):
    import numpy as np

    from lmdynamics.extraction.extract import extract_checkpoint
    from lmdynamics.sources.checkpoints import CorruptCheckpointError

    out = tmp_path / "checkpoints/70m/step0"
    hb.download_revision(REPO, "step0", out, **FAST)
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated on disk after the download
    np.save(tmp_path / "batch.npy", np.zeros((1, 8), dtype=np.int64))
    with pytest.raises(CorruptCheckpointError, match="model.safetensors.*next run downloads"):
        extract_checkpoint(out, tmp_path / "batch.npy", tmp_path / "s.zarr", tokens=4, seed=0,
                           size="70m", step=0, model_name=REPO, revision="step0")
    assert _listing(out) == ["config.json"]

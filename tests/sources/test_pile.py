"""The last training batch: byte-range arithmetic, range reads through the real client
against the loopback hub, and the local-file source."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lmdynamics.sources import pile
from support.hub_server import PILE_REPO, PILE_SHARDS, HubServer, token_at, use_endpoint

REAL = [pile.Shard(n, s) for n, s in PILE_SHARDS if n.endswith(".bin")]
LAST_BATCH_BYTES = 1024 * 2049 * 2


def expected_batch(batch: int, first: int = 0, count: int = 1024) -> np.ndarray:
    start = (batch * 1024 + first) * 2049
    return token_at(np.arange(start, start + count * 2049, dtype=np.uint64)).reshape(count, 2049)


def test_last_batch_offsets_match_the_reference_facts():
    start, stop = pile.batch_byte_range(142999)
    assert (start, stop) == (600_074_139_648, 600_074_139_648 + 4_196_352)
    pieces = pile.split_range(start, stop, pile.order_shards((s.name, s.size) for s in REAL))
    assert pieces == [pile.Piece("document-00020-of-00020.bin", 74_139_648, 4_196_352)]
    assert pieces[0].offset + pieces[0].length == 78_336_000  # the end of the data
    assert pile.batch_byte_range(142999, first=8, count=8) == (
        start + 8 * 4098, start + 16 * 4098)


def test_a_range_across_a_shard_boundary_is_split():
    shards = [pile.Shard("a", 10), pile.Shard("b", 5), pile.Shard("c", 7)]
    assert pile.split_range(8, 17, shards) == [
        pile.Piece("a", 8, 2), pile.Piece("b", 0, 5), pile.Piece("c", 0, 2)]
    with pytest.raises(pile.PileError, match="past the end of the data"):
        pile.split_range(20, 23, shards)


@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.data())
def test_split_pieces_tile_the_range(sizes, data):
    shards = [pile.Shard(str(i), s) for i, s in enumerate(sizes)]
    total = sum(sizes)
    start = data.draw(st.integers(0, total - 1))
    stop = data.draw(st.integers(start + 1, total))
    pieces = pile.split_range(start, stop, shards)
    assert sum(p.length for p in pieces) == stop - start
    assert all(p.length > 0 and 0 <= p.offset and p.offset + p.length <= sizes[int(p.shard)]
               for p in pieces)
    bases = np.cumsum([0, *sizes])
    assert bases[int(pieces[0].shard)] + pieces[0].offset == start
    for a, b in zip(pieces, pieces[1:], strict=False):
        assert int(b.shard) == int(a.shard) + 1 and b.offset == 0


def test_shard_listing_is_ordered_and_must_be_complete():
    names = [("x/document-00001-of-00002.bin", 2), ("x/document-00000-of-00002.bin", 1),
             ("x/document-00002-of-00002.bin", 3), ("x/document.idx", 9)]
    assert [s.size for s in pile.order_shards(names)] == [1, 2, 3]
    with pytest.raises(pile.PileError, match="missing: document-00001-of-00002.bin"):
        pile.order_shards([n for n in names if "00001" not in n[0]])
    with pytest.raises(pile.PileError, match="no data shards"):
        pile.order_shards([("README.md", 5)])


@pytest.fixture
def dataset(monkeypatch, tmp_path):
    with HubServer() as srv:
        use_endpoint(monkeypatch, srv, tmp_path)
        srv.add_pile()
        yield srv


def test_the_last_batch_is_fetched_by_range_read_through_the_client(dataset):
    source = pile.HubTokens(PILE_REPO, retries=1, backoff=0.01)
    tokens, record = pile.read_sequences(source, 142999)
    assert tokens.dtype == np.uint16 and tokens.shape == (1024, 2049)
    np.testing.assert_array_equal(tokens, expected_batch(142999))
    # exactly the batch's bytes crossed the wire, not a 30 GB shard
    assert dataset.state.bytes_sent(r"/datasets/.*\.bin$") == LAST_BATCH_BYTES
    assert record["commit"] == dataset.state.repo("datasets", PILE_REPO).branches["main"]
    assert record["pieces"][0]["offset"] == 74_139_648


def test_a_batch_straddling_two_shards_is_joined(dataset):
    # shard 00000 ends inside sequence 68 of batch 7149 (30e9 bytes / 4098 per sequence)
    source = pile.HubTokens(PILE_REPO, retries=1, backoff=0.01)
    tokens, record = pile.read_sequences(source, 7149, first=32, count=64)
    assert [p["shard"] for p in record["pieces"]] == ["document-00000-of-00020.bin",
                                                      "document-00001-of-00020.bin"]
    np.testing.assert_array_equal(tokens, expected_batch(7149, 32, 64))


def test_range_reads_retry_server_errors_and_dropped_connections(dataset):
    err = dataset.fault(r"00020-of-00020\.bin$", method="GET", times=2, status=503)
    drop = dataset.fault(r"00020-of-00020\.bin$", kind="drop", method="GET")
    source = pile.HubTokens(PILE_REPO, retries=3, backoff=0.01)
    tokens, _ = pile.read_sequences(source, 142999, count=16)
    assert err.hits == 2 and drop.hits == 1
    np.testing.assert_array_equal(tokens, expected_batch(142999, 0, 16))


def test_local_shards_give_the_same_batch(tmp_path):
    folder = tmp_path / "pile"
    folder.mkdir()
    for name, size in PILE_SHARDS:  # sparse files: only the last batch holds data
        with open(folder / name, "wb") as fh:
            fh.truncate(size)
    with open(folder / "document-00020-of-00020.bin", "r+b") as fh:
        fh.seek(74_139_648)
        fh.write(expected_batch(142999).astype("<u2").tobytes())
    tokens, record = pile.read_sequences(pile.LocalTokens(folder), 142999)
    np.testing.assert_array_equal(tokens, expected_batch(142999))
    assert record["source"] == "local"
    joined = tmp_path / "all.bin"  # one file holding the concatenation
    with open(joined, "wb") as fh:
        fh.truncate(600_078_336_000)
        fh.seek(600_074_139_648)
        fh.write(expected_batch(142999, 0, 4).astype("<u2").tobytes())
    tokens, _ = pile.read_sequences(pile.LocalTokens(joined), 142999, count=4)
    np.testing.assert_array_equal(tokens, expected_batch(142999, 0, 4))
    with pytest.raises(pile.PileError, match="no such file"):
        pile.LocalTokens(tmp_path / "nowhere")


def test_eval_batch_selection_checks_the_vocabulary():
    tokens = expected_batch(3, 0, 4)
    out = pile.select_eval_batch(tokens, 2, vocab_size=512)
    assert out.dtype == np.int64 and out.shape == (2, 2049)
    with pytest.raises(pile.PileError, match="vocabulary size 100"):
        pile.select_eval_batch(tokens, 2, vocab_size=100)


# --------------------------------------------------------------------------- gradient batches
# The paper code's gradient protocol on Pythia: for checkpoint c, the first 128 sequences of
# training batches c-5 and c-4 (0 and 1 below step 5), read by range like the last batch.

GRADIENT_BYTES = 2 * 128 * 2049 * 2


def _gradient_batches(tmp_path, step: int, **hub: str):
    import json

    from lmdynamics.cli import run

    out, record = tmp_path / f"step{step}.npy", tmp_path / f"step{step}.json"
    options = {"source": "hub", "hub": {"retries": 1, "backoff": 0.01, **hub}}
    run(["gradient-batches", "--step", str(step), "--options", json.dumps(options),
         "--out", str(out), "--record", str(record)])
    return np.load(out), json.loads(record.read_text())


@pytest.mark.parametrize(("step", "batches"), [(143000, (142995, 142996)), (1000, (995, 996)),
                                               (5, (0, 1)), (3, (0, 1)), (0, (0, 1))])
def test_hub_gradient_batches_are_range_reads_of_batches_c_minus_5_and_4(
        dataset, tmp_path, step, batches):
    tokens, record = _gradient_batches(tmp_path, step)
    assert tokens.dtype == np.int64 and tokens.shape == (2, 128, 2049)
    for got, batch in zip(tokens, batches, strict=True):
        np.testing.assert_array_equal(got, expected_batch(batch, 0, 128))
    assert [r["batch"] for r in record["batches"]] == list(batches)
    assert dataset.state.bytes_sent(r"/datasets/.*\.bin$") == GRADIENT_BYTES  # only those


def test_hub_gradient_batches_from_local_shards_touch_no_network(tmp_path):
    folder = tmp_path / "pile"
    folder.mkdir()
    for name, size in PILE_SHARDS:
        with open(folder / name, "wb") as fh:
            fh.truncate(size)
    with open(folder / "document-00000-of-00020.bin", "r+b") as fh:  # batches 995 and 996
        for batch in (995, 996):
            fh.seek(batch * 1024 * 4098)
            fh.write(expected_batch(batch, 0, 128).astype("<u2").tobytes())
    tokens, record = _gradient_batches(tmp_path, 1000, tokens_path=str(folder),
                                       dataset="no/such-dataset")
    np.testing.assert_array_equal(tokens[0], expected_batch(995, 0, 128))
    np.testing.assert_array_equal(tokens[1], expected_batch(996, 0, 128))
    assert {r["source"] for r in record["batches"]} == {"local"}


def test_hub_gradient_batches_fail_naming_the_missing_shard(monkeypatch, tmp_path):
    with HubServer() as srv:
        use_endpoint(monkeypatch, srv, tmp_path)
        commit = srv.add_pile()
        del srv.state.repo("datasets", PILE_REPO).commits[commit]["document-00007-of-00020.bin"]
        with pytest.raises(pile.PileError, match="missing: document-00007-of-00020.bin"):
            _gradient_batches(tmp_path, 143000)
        assert not (tmp_path / "step143000.npy").exists()

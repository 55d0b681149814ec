"""The last training batch of Pythia, read by byte range from the preshuffled Pile.

Pythia's training data (hub dataset ``EleutherAI/pile-deduped-pythia-preshuffled``) is a
sequence of uint16 tokens, 2049 per sequence, split into files
``document-00000-of-00020.bin`` ... ``document-00020-of-00020.bin`` whose concatenation holds
sequence ``i`` at bytes ``[i * 4098, (i + 1) * 4098)``. Batch ``N`` (consumed by optimizer
update ``N``) is sequences ``[N * 1024, (N + 1) * 1024)``. The last batch, ``N = 142999``, is
the 4,196,352 bytes at offset 600,074,139,648 of the concatenation, i.e. bytes
74,139,648-78,335,999 of shard 00020 (shared/notes/reference-facts.md): this module computes
those ranges from the shard sizes (read from the hub's file metadata, never hard-coded) and
fetches exactly those bytes with HTTP range requests through the ``huggingface_hub`` client
(``HF_ENDPOINT`` respected), or reads them from a local copy of the files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from lmdynamics.options import defaults
from lmdynamics.sources.pythia import BATCH_SEQUENCES, SEQUENCE_TOKENS

#: Bytes per token (uint16, little endian).
TOKEN_BYTES = 2
#: Schema defaults of config section ``hub`` (retries and backoff of the range reads).
_HUB = defaults("hub")
#: Shard file names of the preshuffled data, in any folder of the repository.
SHARD_PATTERN = re.compile(r"(?:^|/)document-(\d{5})-of-(\d{5})\.bin$")


class PileError(RuntimeError):
    """The token data cannot give the requested batch; the message says which file and why."""


@dataclass(frozen=True)
class Shard:
    """One data file: its name (path in the repository or on disk) and size in bytes."""

    name: str
    size: int


@dataclass(frozen=True)
class Piece:
    """A contiguous byte range ``[offset, offset + length)`` of one shard."""

    shard: str
    offset: int
    length: int


def batch_byte_range(batch: int, *, first: int = 0, count: int = BATCH_SEQUENCES,
                     batch_size: int = BATCH_SEQUENCES,
                     seq_tokens: int = SEQUENCE_TOKENS) -> tuple[int, int]:
    """Byte range ``[start, stop)`` in the concatenated data of sequences ``first .. first +
    count - 1`` of training batch ``batch``.

    >>> batch_byte_range(142999)
    (600074139648, 600078336000)
    """
    if batch < 0:
        raise ValueError(f"batch={batch}: allowed >= 0")
    if not (0 <= first and 1 <= count and first + count <= batch_size):
        raise ValueError(f"sequences {first}..{first + count - 1}: allowed within 0.."
                         f"{batch_size - 1} (a batch holds {batch_size} sequences)")
    seq_bytes = seq_tokens * TOKEN_BYTES
    start = (batch * batch_size + first) * seq_bytes
    return start, start + count * seq_bytes


def order_shards(entries: Iterable[tuple[str, int]]) -> list[Shard]:
    """The data shards among ``(name, size)`` entries, in order, checked to be complete.

    Keeps names matching :data:`SHARD_PATTERN` and orders them by index; raises
    :class:`PileError` when none match, when their ``-of-`` totals disagree, or when an
    index is missing or repeated (a gap would shift every later offset).
    """
    found: dict[int, Shard] = {}
    totals = set()
    for name, size in entries:
        m = SHARD_PATTERN.search(name)
        if not m:
            continue
        index, last = int(m.group(1)), int(m.group(2))
        totals.add(last)
        if index in found:
            raise PileError(f"shard index {index} appears twice: {found[index].name} and {name}")
        found[index] = Shard(name, int(size))
    if not found:
        raise PileError("no data shards named document-NNNNN-of-NNNNN.bin found")
    if len(totals) != 1:
        raise PileError(f"data shards disagree on their number: -of- {sorted(totals)}")
    last = totals.pop()
    missing = sorted(set(range(last + 1)) - set(found))
    if missing:
        names = ", ".join(f"document-{i:05d}-of-{last:05d}.bin" for i in missing[:5])
        raise PileError(f"data shards missing: {names}" + (" ..." if len(missing) > 5 else "")
                        + "; every shard is needed to place the byte offsets")
    return [found[i] for i in sorted(found)]


def split_range(start: int, stop: int, shards: list[Shard]) -> list[Piece]:
    """The pieces of shards that hold bytes ``[start, stop)`` of their concatenation.

    Pieces are in order and their lengths sum to ``stop - start``; raises :class:`PileError`
    when the range runs past the end of the data.
    """
    if not 0 <= start < stop:
        raise ValueError(f"byte range [{start}, {stop}): allowed 0 <= start < stop")
    pieces, base = [], 0
    for shard in shards:
        end = base + shard.size
        if start < end and stop > base:
            lo, hi = max(start, base), min(stop, end)
            pieces.append(Piece(shard.name, lo - base, hi - lo))
        base = end
    if stop > base:
        raise PileError(f"bytes [{start}, {stop}) run past the end of the data ({base} bytes "
                        f"in {len(shards)} shards)")
    return pieces


def decode_tokens(data: bytes, seq_tokens: int = SEQUENCE_TOKENS) -> np.ndarray:
    """Little-endian uint16 bytes -> uint16 array (sequences, seq_tokens)."""
    if len(data) % (seq_tokens * TOKEN_BYTES):
        raise PileError(f"{len(data)} bytes is not a whole number of {seq_tokens}-token "
                        "sequences")
    return np.frombuffer(data, dtype="<u2").astype(np.uint16).reshape(-1, seq_tokens)


class TokenSource(Protocol):
    """Where shard bytes come from: the hub (range requests) or local files."""

    def shards(self) -> list[Shard]: ...

    def read(self, piece: Piece) -> bytes: ...

    def describe(self) -> dict: ...


class LocalTokens:
    """Shards on disk: a folder of ``document-*-of-*.bin`` files, or one file holding their
    concatenation (e.g. the shards joined with ``cat``)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        if not self.path.exists():
            raise PileError(f"hub.tokens_path {self.path}: no such file or folder; allowed: a "
                            "folder of document-NNNNN-of-NNNNN.bin shards or one file holding "
                            "their concatenation")

    def shards(self) -> list[Shard]:
        if self.path.is_file():
            return [Shard(str(self.path), self.path.stat().st_size)]
        return order_shards((str(p), p.stat().st_size) for p in sorted(self.path.iterdir())
                            if p.is_file())

    def read(self, piece: Piece) -> bytes:
        with open(piece.shard, "rb") as fh:
            fh.seek(piece.offset)
            data = fh.read(piece.length)
        if len(data) != piece.length:
            raise PileError(f"{piece.shard}: short read, {len(data)} of {piece.length} bytes "
                            f"at offset {piece.offset} (truncated file?)")
        return data

    def describe(self) -> dict:
        return {"source": "local", "path": str(self.path)}


def read_sequences(source: TokenSource, batch: int, *, first: int = 0,
                   count: int = BATCH_SEQUENCES) -> tuple[np.ndarray, dict]:
    """Sequences ``first .. first + count - 1`` of training batch ``batch`` from ``source``.

    Returns the uint16 array (count, 2049) and a provenance record (source, shard pieces,
    byte range, sha256 of the bytes).
    """
    start, stop = batch_byte_range(batch, first=first, count=count)
    pieces = split_range(start, stop, source.shards())
    data = b"".join(source.read(p) for p in pieces)
    if len(data) != stop - start:
        raise PileError(f"read {len(data)} bytes for range [{start}, {stop}); expected "
                        f"{stop - start}")
    record = {**source.describe(), "batch": batch, "first_sequence": first, "sequences": count,
              "byte_range": [start, stop],
              "pieces": [{"shard": p.shard, "offset": p.offset, "length": p.length}
                         for p in pieces],
              "sha256": hashlib.sha256(data).hexdigest()}
    return decode_tokens(data), record


def select_eval_batch(tokens: np.ndarray, sequences: int, vocab_size: int | None = None
                      ) -> np.ndarray:
    """The eval batch fed to extraction: the first ``sequences`` rows, as int64.

    With ``vocab_size`` every token is checked to be below it (a wrong file or offset shows
    up as out-of-range ids long before it shows up as odd metrics).
    """
    if not 1 <= sequences <= tokens.shape[0]:
        raise ValueError(f"sequences={sequences}: allowed 1..{tokens.shape[0]}")
    out = np.asarray(tokens[:sequences], dtype=np.int64)
    if vocab_size is not None and out.max() >= vocab_size:
        raise PileError(f"token id {int(out.max())} >= vocabulary size {vocab_size}: the bytes "
                        "read are not this suite's tokens (wrong file or offset?)")
    return out


class HubTokens:
    """Shards of a hub dataset, read with HTTP range requests through ``huggingface_hub``.

    The dataset's revision is resolved to a commit once, so every read sees the same files;
    shard sizes come from the hub's tree listing. Transient errors are retried with backoff
    (:func:`lmdynamics.sources.hub.with_retries`); a server that ignores the ``Range`` header is
    refused rather than streamed a 30 GB shard.
    """

    def __init__(self, repo: str, revision: str | None = None, *,
                 retries: int = _HUB["retries"], backoff: float = _HUB["backoff"]):
        from huggingface_hub import HfApi, constants

        from lmdynamics.sources.hub import with_retries

        self.repo, self.retries, self.backoff = repo, retries, backoff
        self.api = HfApi()
        info = with_retries(
            lambda: self.api.dataset_info(repo, revision=revision,
                                          timeout=constants.HF_HUB_ETAG_TIMEOUT),
            what=f"dataset {repo}: info", retries=retries, backoff=backoff)
        self.commit = info.sha
        self.revision = revision or "main"

    def shards(self) -> list[Shard]:
        from huggingface_hub.hf_api import RepoFile

        from lmdynamics.sources.hub import with_retries

        entries = with_retries(
            lambda: list(self.api.list_repo_tree(self.repo, revision=self.commit,
                                                 repo_type="dataset", recursive=True)),
            what=f"dataset {self.repo}: file list", retries=self.retries, backoff=self.backoff)
        return order_shards((e.path, e.size) for e in entries if isinstance(e, RepoFile))

    def read(self, piece: Piece) -> bytes:
        from lmdynamics.sources.hub import with_retries

        return with_retries(lambda: self._read_once(piece),
                            what=f"dataset {self.repo}: bytes {piece.offset}+{piece.length} of "
                                 f"{piece.shard}", retries=self.retries, backoff=self.backoff)

    def _read_once(self, piece: Piece) -> bytes:
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        url = hf_hub_url(self.repo, piece.shard, repo_type="dataset", revision=self.commit)
        last = piece.offset + piece.length - 1
        headers = {**build_hf_headers(), "Range": f"bytes={piece.offset}-{last}",
                   "Accept-Encoding": "identity"}
        with http_stream_backoff("GET", url, headers=headers, max_retries=0,
                                 timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as response:
            hf_raise_for_status(response)
            if response.status_code != 206:
                raise PileError(f"{url}: the server answered {response.status_code} to a Range "
                                "request; refusing to download the whole shard")
            expected = f"bytes {piece.offset}-{last}/"
            content_range = response.headers.get("Content-Range", "")
            if not content_range.startswith(expected):
                raise PileError(f"{url}: Content-Range {content_range!r}, expected "
                                f"{expected}<size>")
            chunks, received = [], 0
            for chunk in response.iter_bytes():
                received += len(chunk)
                if received > piece.length:
                    raise PileError(f"{url}: more than the {piece.length} bytes asked for")
                chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) != piece.length:
            raise PileError(f"{url}: {len(data)} of {piece.length} bytes received (truncated)")
        return data

    def describe(self) -> dict:
        return {"source": "hub", "repo": self.repo, "revision": self.revision,
                "commit": self.commit}

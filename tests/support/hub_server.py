"""A loopback HTTP server speaking the part of the Hugging Face hub protocol the real
``huggingface_hub`` client uses (shared/notes/ecosystem-facts.md), with fault injection.

Endpoints (``{kind}`` = ``models`` | ``datasets``; dataset file URLs start with ``/datasets``):

- ``GET /api/{kind}/{repo}[/revision/{rev}]`` -> ``{"id", "sha", "siblings": [{"rfilename"}]}``;
  with ``?blobs=true`` (what ``HfApi.model_info(files_metadata=True)`` sends) each sibling
  also has ``size``, ``blobId`` and, for LFS files, ``lfs: {"sha256", "size",
  "pointerSize"}`` (the fields huggingface_hub 2.4 parses into ``RepoSibling`` /
  ``BlobLfsInfo``; #205 and allenai/OLMo #915 read the LFS sha256 this way, without
  downloading); ``blobId`` of an LFS file is the git id of its pointer file
- ``GET /api/{kind}/{repo}/refs`` -> ``{"branches": [{"name", "ref", "targetCommit"}], ...}``
- ``GET /api/{kind}/{repo}/tree/{rev}`` -> ``[{"type": "file", "path", "size", "oid"}]`` (and
  ``lfs: {"oid", "size", "pointerSize"}`` for LFS files)
- ``HEAD``/``GET /[datasets/]{repo}/resolve/{rev}/{file}`` with ``X-Repo-Commit``, ``ETag``
  (sha256 for weight files, as for LFS; git blob id otherwise), ``Content-Length``, and
  ``Range`` requests answered 206 with ``Content-Range``
- 404s carry ``X-Error-Code`` ``RepoNotFound``, ``RevisionNotFound`` or ``EntryNotFound``.

Model repos hold small Pythia-shaped revisions in the hub's legacy format
(tests/pythia_files.py); the dataset repo holds
the preshuffled Pile's real file layout (21 shards, 600 GB) as *virtual* files whose tokens
are a function of their position (:func:`token_at`), so range reads at Pythia's real offsets
can be checked without storing anything.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

from support.pythia_files import revision_files

#: The preshuffled Pile's files and sizes (shared/notes/reference-facts.md).
PILE_SHARDS = [(f"document-{i:05d}-of-00020.bin", 30_000_000_000) for i in range(20)] + [
    ("document-00020-of-00020.bin", 78_336_000), ("document.idx", 1_757_184_042)]
PILE_REPO = "EleutherAI/pile-deduped-pythia-preshuffled"
TEST_VOCAB = 512


def token_at(index: np.ndarray) -> np.ndarray:
    """The virtual dataset's token at global token ``index`` (uint16, < TEST_VOCAB)."""
    x = np.asarray(index, dtype=np.uint64) * np.uint64(2654435761)
    return ((x >> np.uint64(7)) % np.uint64(TEST_VOCAB)).astype(np.uint16)


@dataclass
class VirtualFile:
    """A file whose bytes are computed on demand: ``reader(offset, length) -> bytes``."""

    size: int
    reader: Callable[[int, int], bytes]
    etag: str


def _pile_reader(base: int) -> Callable[[int, int], bytes]:
    def read(offset: int, length: int) -> bytes:
        g0, g1 = base + offset, base + offset + length
        tokens = token_at(np.arange(g0 // 2, (g1 + 1) // 2, dtype=np.uint64))
        data = tokens.astype("<u2").tobytes()
        return data[g0 - (g0 // 2) * 2:][:length]
    return read


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(name: str) -> bool:
    """Weight files are stored with git LFS (the hub's default ``.gitattributes`` tracks
    ``*.bin`` and ``*.safetensors``)."""
    return name.endswith((".safetensors", ".bin"))


def etag_for(name: str, data: bytes) -> str:
    """sha256 for weight files (what the hub sends for LFS files), git blob id otherwise."""
    if is_lfs(name):
        return hashlib.sha256(data).hexdigest()
    return git_blob_sha1(data)


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git LFS pointer file of an object (git-lfs spec v1)."""
    return (f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\n"
            f"size {size}\n").encode()


def sibling(name: str, f: bytes | VirtualFile, blobs: bool) -> dict:
    """One entry of ``siblings``; with ``blobs`` the file metadata the hub adds."""
    if not blobs:
        return {"rfilename": name}
    size, etag = _size(f), _etag(name, f)
    if not is_lfs(name):
        return {"rfilename": name, "size": size, "blobId": etag}
    pointer = lfs_pointer(etag, size)
    return {"rfilename": name, "size": size, "blobId": git_blob_sha1(pointer),
            "lfs": {"sha256": etag, "size": size, "pointerSize": len(pointer)}}


@dataclass
class Fault:
    """Misbehave on requests whose method and path match, ``times`` times.

    kinds: ``status`` (answer ``status``), ``slow`` (sleep ``delay`` s first), ``drop`` (send
    half the body then close: a dropped connection), ``short`` (serve a truncated file with
    a matching Content-Length), ``corrupt`` (flip bytes, same length), ``body`` (answer
    ``status`` with ``body`` as ``content_type``: a proxy's login page, a wrong endpoint).
    """

    pattern: str
    kind: str = "status"
    times: int = 1
    method: str | None = None
    status: int = 503
    delay: float = 0.0
    body: bytes = b""
    content_type: str = "text/html; charset=utf-8"
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (self.times > 0 and (self.method is None or self.method == method)
                and re.search(self.pattern, path) is not None)


@dataclass
class Repo:
    """Branch name -> commit, and commit -> files (name -> bytes or VirtualFile)."""

    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, dict[str, bytes | VirtualFile]] = field(default_factory=dict)

    def add(self, branch: str, files: dict[str, bytes | VirtualFile]) -> str:
        digest = hashlib.sha1(branch.encode())
        for name in sorted(files):
            f = files[name]
            digest.update(name.encode() + (f.etag.encode() if isinstance(f, VirtualFile)
                                           else hashlib.sha256(f).digest()))
        commit = digest.hexdigest()
        self.commits[commit] = files
        self.branches[branch] = commit
        return commit

    def resolve(self, rev: str) -> str | None:
        if rev in self.commits:
            return rev
        return self.branches.get(rev)


class HubState:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], Repo] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int, int]] = []  # method, path, status, body bytes
        self.lock = threading.Lock()

    def repo(self, kind: str, repo_id: str) -> Repo:
        return self.repos.setdefault((kind, repo_id), Repo())

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.times -= 1
                    fault.hits += 1
                    return fault
        return None

    def bytes_sent(self, pattern: str) -> int:
        return sum(n for m, p, s, n in self.requests if m == "GET" and re.search(pattern, p))


API = re.compile(r"^/api/(models|datasets)/([^/]+/[^/]+)(?:/(revision|tree|refs)(?:/([^/]+))?)?"
                 r"(?:/(.*))?$")
RESOLVE = re.compile(r"^/(datasets/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class Handler(BaseHTTPRequestHandler):
    server_version = "lmdynamics-test-hub/1"
    state: HubState

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._handle("HEAD")

    def _handle(self, method: str) -> None:
        path, _, query = self.path.partition("?")
        fault = self.state.take_fault(method, path)
        try:
            if fault and fault.kind == "slow":
                time.sleep(fault.delay)
            if fault and fault.kind == "status":
                self._send(fault.status, b"injected failure", {}, method, path)
                return
            if fault and fault.kind == "body":
                self._send(fault.status, fault.body, {"Content-Type": fault.content_type},
                           method, path)
                return
            if m := API.match(path):
                self._api(method, path, *m.groups(), blobs="blobs=true" in query.lower())
            elif m := RESOLVE.match(path):
                self._resolve(method, path, m, fault)
            else:
                self._send(404, b"not found", {}, method, path)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str, path: str,
              length: int | None = None) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        sent = 0
        if method != "HEAD":
            self.wfile.write(body)
            sent = len(body)
        with self.state.lock:
            self.state.requests.append((method, path, status, sent))

    def _error(self, code: str, method: str, path: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send(404, json.dumps({"error": code}).encode(), headers, method, path)

    def _json(self, obj, method: str, path: str) -> None:
        self._send(200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, method,
                   path)

    def _api(self, method, path, kind, repo_id, action, rev, rest, blobs=False) -> None:
        repo = self.state.repos.get((kind, repo_id))
        if repo is None:
            return self._error("RepoNotFound", method, path)
        if action == "refs":
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                        for b, c in sorted(repo.branches.items())]
            return self._json({"branches": branches, "tags": [], "converts": []}, method, path)
        commit = repo.resolve(rev or "main")
        if commit is None:
            return self._error("RevisionNotFound", method, path)
        files = repo.commits[commit]
        if action == "tree":
            return self._json([{"type": "file", "path": n, "size": _size(f),
                                "oid": _etag(n, f),
                                **({"lfs": {"oid": _etag(n, f), "size": _size(f),
                                            "pointerSize": len(lfs_pointer(_etag(n, f),
                                                                           _size(f)))}}
                                   if is_lfs(n) else {})}
                               for n, f in sorted(files.items())], method, path)
        self._json({"id": repo_id, "sha": commit,
                    "siblings": [sibling(n, f, blobs) for n, f in sorted(files.items())]},
                   method, path)

    def _resolve(self, method: str, path: str, m: re.Match, fault: Fault | None) -> None:
        kind = "datasets" if m.group(1) else "models"
        repo = self.state.repos.get((kind, m.group(2)))
        if repo is None:
            return self._error("RepoNotFound", method, path)
        commit = repo.resolve(m.group(3))
        if commit is None:
            return self._error("RevisionNotFound", method, path)
        name = m.group(4)
        f = repo.commits[commit].get(name)
        if f is None:
            return self._error("EntryNotFound", method, path, commit)
        size = _size(f)
        headers = {"X-Repo-Commit": commit, "ETag": f'"{_etag(name, f)}"',
                   "Accept-Ranges": "bytes"}
        start, stop, status = 0, size, 200
        if rng := self.headers.get("Range"):
            rm = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not rm or int(rm.group(1)) >= size:
                return self._send(416, b"", {"Content-Range": f"bytes */{size}"}, method, path)
            start = int(rm.group(1))
            stop = min(size, int(rm.group(2)) + 1) if rm.group(2) else size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        if method == "HEAD":
            return self._send(status, b"", headers, method, path, length=stop - start)
        body = f.reader(start, stop - start) if isinstance(f, VirtualFile) else f[start:stop]
        if fault and fault.kind == "short":
            body = body[: len(body) // 2]
        elif fault and fault.kind == "corrupt":
            body = bytes(b ^ 0xFF for b in body[:64]) + body[64:]
        elif fault and fault.kind == "drop":
            self._send(status, body[: len(body) // 2], headers, method, path, length=len(body))
            self.close_connection = True
            return
        self._send(status, body, headers, method, path)


def _size(f: bytes | VirtualFile) -> int:
    return f.size if isinstance(f, VirtualFile) else len(f)


def _etag(name: str, f: bytes | VirtualFile) -> str:
    return f.etag if isinstance(f, VirtualFile) else etag_for(name, f)


class HubServer:
    """``with HubServer() as hub: ...``; ``hub.url`` is the endpoint (HF_ENDPOINT)."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def fault(self, pattern: str, kind: str = "status", **kwargs) -> Fault:
        f = Fault(pattern, kind, **kwargs)
        self.state.faults.append(f)
        return f

    def add_model(self, repo_id: str, branch: str, files: dict[str, bytes]) -> str:
        return self.state.repo("models", repo_id).add(branch, files)

    def add_pile(self, repo_id: str = PILE_REPO) -> str:
        files, base = {}, 0
        for name, size in PILE_SHARDS:
            files[name] = VirtualFile(size, _pile_reader(base), hashlib.sha256(
                f"{name}:{size}".encode()).hexdigest())
            if name.endswith(".bin"):
                base += size
        return self.state.repo("datasets", repo_id).add("main", files)


# --- Pythia revisions in the hub's own format (tests/pythia_files.py) -----------------------

#: Sizes whose revisions are served sharded (as the hub serves its larger checkpoints).
SHARDED_SIZES = ("160m",)


def checkpoint_files(size: str, seed: int, *, layout: str | None = None) -> dict[str, bytes]:
    """The files of one revision of ``pythia-<size>-deduped`` in the legacy format
    (:func:`pythia_files.revision_files`): ``pytorch_model.bin`` by default, shards with
    their index for :data:`SHARDED_SIZES`, or ``layout``."""
    layout = layout or ("sharded" if size in SHARDED_SIZES else "bin")
    return revision_files(size, seed, TEST_VOCAB, layout)


def add_pythia(hub: HubServer, size: str, steps: list[int], *, missing: tuple[int, ...] = (),
               same_as: dict[int, int] | None = None,
               safetensors: tuple[int, ...] = ()) -> None:
    """Publish ``EleutherAI/pythia-<size>-deduped`` with branches ``step<N>`` and ``main``,
    as the hub serves Pythia: legacy names and buffers, float16, ``pytorch_model.bin`` on
    most branches (shards for :data:`SHARDED_SIZES`).

    ``safetensors`` steps serve ``model.safetensors`` (legacy names) instead; ``same_as``
    maps a step to another whose files it repeats byte for byte (the hub defect of Pythia
    issues #195/#205); ``missing`` steps get no branch. Revision ``step<N>`` is seeded
    ``1000 + N``.
    """
    repo_id = f"EleutherAI/pythia-{size}-deduped"
    same_as = same_as or {}
    cache: dict[int, dict[str, bytes]] = {}
    for step in sorted(steps, key=lambda s: s in same_as):
        if step in missing:
            continue
        source = same_as.get(step, step)
        if source not in cache:
            cache[source] = checkpoint_files(
                size, seed=1000 + source, layout="safetensors" if source in safetensors else None)
        hub.add_model(repo_id, f"step{step}", cache[source])
    final = max(s for s in steps if s not in missing)
    hub.add_model(repo_id, "main", cache[same_as.get(final, final)])


def use_endpoint(monkeypatch, server: HubServer, tmp_path: Path, timeout: float = 2) -> None:
    """Point the already imported ``huggingface_hub`` at ``server`` (the constants it read from
    HF_ENDPOINT etc. at import), with a private cache and short timeouts; also set the
    environment so subprocesses (snakemake jobs) do the same."""
    from huggingface_hub import constants

    cache = tmp_path / "hf_home"
    monkeypatch.setattr(constants, "ENDPOINT", server.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        server.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", timeout)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", timeout)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
    for key, value in {"HF_ENDPOINT": server.url, "HF_HOME": str(cache),
                       "HF_HUB_ETAG_TIMEOUT": str(int(timeout)),
                       "HF_HUB_DOWNLOAD_TIMEOUT": str(int(timeout)),
                       "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)


# --- non-Pythia suites under their real naming (tests/suite_files.py) ------------------------

OLMO_REPO = "allenai/OLMo-1B-hf"
MISTRAL_REPO = "stanford-crfm/alias-gpt2-small-x21"


def add_olmo(hub: HubServer, steps: list[int], repo_id: str = OLMO_REPO,
             names: dict[int, str] | None = None) -> dict[int, str]:
    """Publish an OLMo-style repo: branches ``step<N>-tokens<M>B`` (and ``main`` = the last
    step), each with ``config.json`` and ``model.safetensors``, the revisions of one training
    trajectory (:func:`support.suite_files.olmo_files`); ``names`` gives a step's branch name where
    the repo's own differs from :func:`support.suite_files.olmo_branch` (OLMo-1B-hf's last,
    ``step738020-tokens3094B``). Returns step -> branch name."""
    from support.suite_files import olmo_branch, olmo_files

    names = dict(names or {})
    for step in sorted(steps):
        files = olmo_files(step, max(steps), TEST_VOCAB)
        names.setdefault(step, olmo_branch(step))
        hub.add_model(repo_id, names[step], files)
    hub.add_model(repo_id, "main", olmo_files(max(steps), max(steps), TEST_VOCAB))
    return names


def add_mistral_gpt2(hub: HubServer, steps: list[int], repo_id: str = MISTRAL_REPO) -> None:
    """Publish a Mistral GPT-2 repo: branches ``checkpoint-<step>`` (and ``main``) with
    ``config.json`` and ``pytorch_model.bin``, the revisions of one training trajectory
    (:func:`support.suite_files.gpt2_files`)."""
    from support.suite_files import gpt2_files

    for step in sorted(steps):
        hub.add_model(repo_id, f"checkpoint-{step}", gpt2_files(step, max(steps), TEST_VOCAB))
    hub.add_model(repo_id, "main", gpt2_files(max(steps), max(steps), TEST_VOCAB))

"""Pythia revisions from the Hugging Face hub, through the real ``huggingface_hub`` client.

:func:`download_revision` fetches one revision's ``config.json`` and weights into the same
model directory the tiny suite writes (``config.json`` + ``model.safetensors``), plus a
``revision.json`` record (repo, revision, commit, sha256 and size of the weights). Only those
files are fetched; pickled weights (``pytorch_model.bin``, or shards) are read only with
``torch.load(weights_only=True)`` (:func:`lmdynamics.sources.checkpoints.read_state_dict`) and
rewritten as ``model.safetensors``, so extraction always loads the same way; no code from the
hub is ever run (no ``trust_remote_code``).

Failure handling: transient errors (HTTP 408/429/5xx, timeouts, dropped
connections) are retried with exponential backoff and then fail naming the request; a
revision that does not exist fails naming it and the nearest available steps; a download
whose size or sha256 does not match the hub's metadata fails naming the file and leaves
nothing behind, so the next run fetches it again; a download that would not fit on the disk
(sizes from the hub's metadata) fails before writing anything. Every request has a timeout
(``HF_HUB_ETAG_TIMEOUT`` for metadata, ``HF_HUB_DOWNLOAD_TIMEOUT`` otherwise).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import httpx2
from huggingface_hub import HfApi, constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
from huggingface_hub.errors import (
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lmdynamics.options import defaults
from lmdynamics.sources.checkpoints import CONFIG_NAME, SAFETENSORS_NAME, read_model_config
from lmdynamics.sources.revision import REVISION_FILE
from lmdynamics.sources.schedule import nearest_step
from lmdynamics.store import file_sha256, write_text_atomic

if TYPE_CHECKING:
    from lmdynamics.sources.blobs import SharedBlobs

log = logging.getLogger(__name__)
T = TypeVar("T")
#: Schema defaults of config section ``hub`` (retries and backoff of every hub request).
_HUB = defaults("hub")

#: HTTP statuses worth retrying (timeouts, rate limits, server errors).
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
#: Transport errors worth retrying.
TRANSIENT_ERRORS = (httpx2.TimeoutException, httpx2.NetworkError, httpx2.RemoteProtocolError)
#: Weight layouts in order of preference: (file pattern, needs conversion to one
#: model.safetensors, the index a sharded layout comes with). Shards and their index are
#: transformers' sharded format: ``{"metadata": {...}, "weight_map": {tensor: shard}}``.
WEIGHT_LAYOUTS = (
    (r"model\.safetensors", False, None),
    (r"model-(\d+)-of-(\d+)\.safetensors", True, "model.safetensors.index.json"),
    (r"pytorch_model\.bin", True, None),
    (r"pytorch_model-(\d+)-of-(\d+)\.bin", True, "pytorch_model.bin.index.json"),
)
_SHA256 = re.compile(r"[0-9a-f]{64}")


class HubError(RuntimeError):
    """A hub request failed for good; the message names the repo, revision or file."""


class RevisionNotFound(HubError):
    """The revision does not exist; the message lists the nearest available steps."""


class CorruptDownloadError(HubError):
    """A downloaded file does not match the hub's size or sha256; it has been deleted."""


class NotEnoughDiskError(HubError):
    """The files would not fit on the disk; raised before anything is written."""


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is worth retrying."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (RevisionNotFoundError, RepositoryNotFoundError,
                            RemoteEntryNotFoundError)):
            return False
        if isinstance(exc, HfHubHTTPError) and exc.response is not None:
            if exc.response.status_code in TRANSIENT_STATUS:
                return True
        elif isinstance(exc, TRANSIENT_ERRORS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def with_retries(func: Callable[[], T], *, what: str, retries: int = _HUB["retries"],
                 backoff: float = _HUB["backoff"],
                 max_wait: float = 60.0, sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``func``; on a transient error wait ``backoff * 2**i`` s (at most ``max_wait``)
    and try again, ``retries`` times; then raise :class:`HubError` naming ``what``."""
    for attempt in range(retries + 1):
        try:
            return func()
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt == retries:
                raise HubError(f"{what}: gave up after {retries + 1} attempts; last error: "
                               f"{type(exc).__name__}: {_first_line(exc)} (transient hub "
                               "errors: rerun later, or raise hub.retries)") from exc
            wait = min(max_wait, backoff * 2 ** attempt)
            log.warning("%s: %s (%s); retry %d/%d in %.1fs", what, type(exc).__name__,
                        _first_line(exc), attempt + 1, retries, wait)
            sleep(wait)
    raise AssertionError("unreachable")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def set_default_timeout(seconds: float | None = None) -> None:
    """Give the client's shared HTTP session (``huggingface_hub.get_session``) a default
    timeout (``HF_HUB_DOWNLOAD_TIMEOUT``), so that calls without their own (refs and tree
    listings) cannot wait forever. Public API only: the session is an ``httpx2.Client``, whose
    ``timeout`` is its own public attribute."""
    from huggingface_hub import get_session

    get_session().timeout = httpx2.Timeout(float(seconds or constants.HF_HUB_DOWNLOAD_TIMEOUT))


def steps_from_refs(names: Iterable[str]) -> list[int]:
    """Steps of branch names ``step<N>`` (ASCII digits; others, and names too long to be a
    step's, ignored), sorted."""
    from lmdynamics.sources.suites import step_of

    return sorted({s for n in names if (s := step_of(_STEP_BRANCH, n)) is not None})


#: Pythia's step branches (``step<N>``, ASCII digits only).
_STEP_BRANCH = re.compile(r"step(?P<step>[0-9]+)", re.ASCII)
#: A git commit id as the hub reports it.
_COMMIT = re.compile(r"[0-9a-f]{40}", re.ASCII)


def checked_commit(sha: object, repo: str, revision: str) -> str:
    """The commit id the hub reported for ``repo@revision``, which must be 40 lowercase hex
    digits (it is recorded in ``revision.json`` and pins every file fetched); anything else
    raises :class:`HubError`."""
    if not isinstance(sha, str) or not _COMMIT.fullmatch(sha):
        raise HubError(f"{repo}@{revision}: the hub reported the commit {str(sha)[:80]!r}, "
                       f"not 40 hex digits; check HF_ENDPOINT ({constants.ENDPOINT}) is the "
                       "Hugging Face hub or a faithful mirror")
    return sha


def branch_names(refs: object, repo: str) -> list[str]:
    """The branch names of a ``list_repo_refs`` answer, checked: a listing without
    ``branches``, or with a name that is not a string, raises :class:`HubError`."""
    branches = getattr(refs, "branches", None)
    names = [getattr(b, "name", None) for b in branches] if isinstance(branches, list) else None
    if names is None or not all(isinstance(n, str) for n in names):
        bad = "no branch list" if names is None else \
            f"a branch name {next(n for n in names if not isinstance(n, str))!r:.60}"
        raise HubError(f"{repo}: the hub's refs listing has {bad}; expected branches with "
                       f"string names; check HF_ENDPOINT ({constants.ENDPOINT})")
    return names


def list_branches(api: HfApi, repo: str, *, retries: int, backoff: float) -> list[str]:
    """The branch names of ``repo`` (:func:`branch_names`); an answer that is not a refs
    listing (HTML, JSON of another shape) raises :class:`HubError` in one line."""
    try:
        refs = with_retries(lambda: api.list_repo_refs(repo), what=f"{repo}: list branches",
                            retries=retries, backoff=backoff)
    except (RepositoryNotFoundError, HubError):
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # JSONDecodeError too
        raise HubError(f"{repo}: the hub's refs listing is not a JSON listing of branches "
                       f"({type(exc).__name__}: {_first_line(exc)[:120]}); check HF_ENDPOINT "
                       f"({constants.ENDPOINT})") from exc
    return branch_names(refs, repo)


def nearest_steps(available: list[int], step: int, k: int = 3) -> list[int]:
    """The ``k`` available steps closest to ``step``, sorted."""
    chosen, pool = [], list(available)
    while pool and len(chosen) < k:
        best = nearest_step(pool, step)
        chosen.append(best)
        pool.remove(best)
    return sorted(chosen)


def _missing_revision(api: HfApi, repo: str, revision: str, retries: int,
                      backoff: float) -> RevisionNotFound:
    """The error for a missing revision, listing the nearest steps the repo does have."""
    step = re.search(r"([0-9]{1,15})", revision)
    try:
        available = steps_from_refs(list_branches(api, repo, retries=retries, backoff=backoff))
        source = "branches on the hub"
    except Exception as exc:  # the listing is a courtesy: fall back to the published schedule
        from lmdynamics.sources.schedule import pythia_schedule
        available, source = pythia_schedule(), f"Pythia's published schedule ({exc})"
    if step and available:
        near = ", ".join(f"step{s}" for s in nearest_steps(available, int(step.group(1))))
        hint = f"nearest available: {near} (from {source})"
    else:
        hint = f"available step branches: {len(available)} (from {source})"
    return RevisionNotFound(f"revision {revision!r} of {repo} does not exist on the hub "
                            f"({constants.ENDPOINT}); {hint}")


def resolve_revision(repo: str, step: int, pattern: str, *, retries: int = _HUB["retries"],
                     backoff: float = _HUB["backoff"]) -> str:
    """The branch of ``repo`` holding ``step``, found in ``list_repo_refs`` by ``pattern``
    (a regular expression with a named group ``step``), for suites whose revision names
    carry facts not computable from the step (OLMo's ``step<N>-tokens<M>B``)."""
    from lmdynamics.sources.suites import SuiteError, compile_pattern, step_refs

    try:
        compiled = compile_pattern(pattern)
    except SuiteError as exc:
        raise ValueError(f"--revision-pattern: {exc}") from None
    api = HfApi()
    try:
        names = list_branches(api, repo, retries=retries, backoff=backoff)
    except RepositoryNotFoundError as exc:
        raise HubError(f"repository {repo} not found on {constants.ENDPOINT} (check the "
                       "suite's repo and the size label)") from exc
    found = step_refs(names, compiled, repo)
    if step in found:
        return found[step]
    near = ", ".join(found[s] for s in nearest_steps(list(found), step)) if found else "none"
    raise RevisionNotFound(f"{repo} has no branch for step {step} matching {pattern!r} on "
                           f"{constants.ENDPOINT}; nearest available: {near} "
                           f"({len(found)} step branches)")


@dataclass(frozen=True)
class RemoteFile:
    """A file of one revision: name, size in bytes, and the hub's ETag (sha256 for LFS)."""

    name: str
    size: int
    etag: str


def weight_files(names: Iterable[str]) -> tuple[list[str], bool, str | None]:
    """The weight files of a revision, whether they must be converted to one
    ``model.safetensors`` (pickles and shards are), and the index of a sharded layout.

    A sharded layout must be whole: shards numbered 1..N, all of the same N, and the index
    present; otherwise :class:`HubError` names what is missing.
    """
    names = list(names)
    for pattern, convert, index in WEIGHT_LAYOUTS:
        matches = {n: m for n in names if (m := re.fullmatch(pattern, n))}
        if not matches:
            continue
        found = sorted(matches)
        if index is not None:
            totals = {int(m.group(2)) for m in matches.values()}
            numbers = sorted(int(m.group(1)) for m in matches.values())
            if len(totals) != 1 or numbers != list(range(1, max(totals) + 1)):
                raise HubError(f"incomplete or inconsistent shard set {found}: expected shards "
                               f"1 to N of one N; the revision cannot be loaded")
            if index not in names:
                raise HubError(f"shards {found} come without their index {index}; the "
                               "revision cannot be checked for completeness")
        return found, convert, index
    raise HubError(f"no weights file among {sorted(names)}; expected one of model.safetensors, "
                   "model-NNNNN-of-NNNNN.safetensors, pytorch_model.bin, "
                   "pytorch_model-NNNNN-of-NNNNN.bin")


def shard_map(index_path: Path, shards: list[str]) -> dict[str, str]:
    """The ``weight_map`` (tensor name -> shard file) of a shard index, checked against the
    shards the revision has: every shard the index names exists, and every shard is named.
    """
    try:
        data = json.loads(Path(index_path).read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as exc:
        raise HubError(f"{index_path.name}: not a shard index (a JSON object with a "
                       f"'weight_map'): {type(exc).__name__}: {exc}") from exc
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise HubError(f"{index_path.name}: 'weight_map' must map tensor names to file names")
    named, present = set(weight_map.values()), set(shards)
    if named != present:
        raise HubError(f"{index_path.name} names shards {sorted(named - present)} that the "
                       f"revision lacks and omits {sorted(present - named)}; incomplete "
                       "shard set, the revision cannot be loaded")
    return weight_map


def remote_file(repo: str, name: str, commit: str, *, retries: int, backoff: float,
                repo_type: str | None = None) -> RemoteFile:
    """Size and ETag of one file from a HEAD request (the hub's file metadata)."""
    url = hf_hub_url(repo, name, revision=commit, repo_type=repo_type)
    meta = with_retries(lambda: get_hf_file_metadata(url), what=f"{repo}@{commit[:12]}: {name}",
                        retries=retries, backoff=backoff)
    if meta.size is None or meta.etag is None:
        raise HubError(f"{url}: the hub sent no size or ETag for {name}")
    return RemoteFile(name, int(meta.size), meta.etag)


def check_free_space(directory: Path, need: int, reserve: int = 0) -> None:
    """Raise :class:`NotEnoughDiskError` unless ``need + reserve`` bytes are free where
    ``directory`` is (or would be created)."""
    probe = Path(directory).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + reserve:
        kept = f" + {human_bytes(reserve)} kept free (hub.min_free_gb)" if reserve else ""
        raise NotEnoughDiskError(
            f"not enough free disk for the download into {directory}: it needs "
            f"{human_bytes(need)} (hub metadata){kept}, {human_bytes(free)} free on {probe}; "
            "free space, or lower the concurrent downloads (--resources network=1)")


def human_bytes(n: float) -> str:
    """``1234567`` -> ``'1.23 MB'`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the hub sends as ETag for non-LFS files)."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def verify_download(path: Path, remote: RemoteFile, label: str = "") -> str:
    """Check a downloaded file against the hub's size and ETag; return its sha256.

    The ETag is the sha256 of LFS files and the git blob id of others. On a mismatch the
    file is deleted and :class:`CorruptDownloadError` names it.
    """
    size = path.stat().st_size
    sha = file_sha256(path)
    etag = remote.etag.strip('"').lower()
    problem = None
    if size != remote.size:
        problem = f"{size} bytes, the hub's metadata says {remote.size} (truncated?)"
    elif _SHA256.fullmatch(etag) and sha != etag:
        problem = f"sha256 {sha}, the hub's is {etag}"
    elif re.fullmatch(r"[0-9a-f]{40}", etag) and (blob := git_blob_sha1(path)) != etag:
        problem = f"git blob id {blob}, the hub's is {etag}"
    if problem:
        path.unlink(missing_ok=True)
        raise CorruptDownloadError(f"downloaded {remote.name}{label} is corrupt: {problem}; the "
                                   "file was deleted, rerun to download it again")
    return sha


def _fetch(repo: str, remote: RemoteFile, commit: str, staging: Path, *, retries: int,
           backoff: float, blobs: SharedBlobs | None = None) -> tuple[Path, str]:
    """Download one file into ``staging`` and verify it; returns (path, sha256). With
    ``blobs``, a blob another planned revision serves is taken from there when a download
    already holds it (and verified all the same), and kept there when fetched."""
    t0 = time.perf_counter()
    etag = remote.etag.strip('"').lower()
    if blobs is not None and blobs.take(etag, remote.size, staging / remote.name):
        try:
            sha = verify_download(staging / remote.name, remote, f" of {repo}@{commit[:12]}")
        except CorruptDownloadError as exc:  # a damaged kept copy: drop it, fetch the blob
            log.warning("kept blob %s is damaged (%s); fetching it again", etag[:12], exc)
            blobs.path(etag).unlink(missing_ok=True)
        else:
            log.info("%s: blob %s is served by another planned revision too: taken from %s, "
                     "not fetched again", remote.name, etag[:12], blobs.directory)
            return staging / remote.name, sha

    def get() -> str:
        try:
            return hf_hub_download(repo, remote.name, revision=commit, local_dir=staging)
        except OSError as exc:
            if "Consistency check failed" in str(exc):  # the client's own size check
                raise CorruptDownloadError(
                    f"downloaded {remote.name} of {repo}@{commit[:12]} is truncated "
                    f"({_first_line(exc)}); nothing was kept, rerun to download it "
                    "again") from exc
            raise

    path = Path(with_retries(get, what=f"{repo}@{commit[:12]}: download {remote.name}",
                             retries=retries, backoff=backoff))
    sha = verify_download(path, remote, f" of {repo}@{commit[:12]}")
    if blobs is not None:
        blobs.keep(sha, path)
    seconds = time.perf_counter() - t0
    log.info("%s: %.1f MB in %.1fs (%.1f MB/s), sha256 %s", remote.name, remote.size / 1e6,
             seconds, remote.size / 1e6 / max(seconds, 1e-9), sha)
    return path, sha


def convert_to_safetensors(paths: list[Path], out: Path,
                           weight_map: dict[str, str] | None = None) -> None:
    """Merge weight files (pickles read with ``weights_only=True``, or safetensors shards)
    into one ``model.safetensors``, names and dtypes unchanged (the loader accepts
    transformers 4.x's names, :mod:`lmdynamics.sources.checkpoints`); shared storage is copied
    (safetensors refuses it).

    The files must be disjoint (a tensor in two files is refused, never resolved by order),
    and with ``weight_map`` (a shard index) every tensor must sit in the shard the index
    names and every tensor the index names must be present.
    """
    import safetensors.torch

    from lmdynamics.sources.checkpoints import read_state_dict

    state: dict = {}
    origin: dict[str, str] = {}
    for path in paths:
        for name, tensor in read_state_dict(path).items():
            if name in state:
                raise HubError(f"tensor {name!r} is in both {origin[name]} and {path.name}; "
                               "conflicting shards, the revision cannot be loaded")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise HubError(f"tensor {name!r} is in {path.name}, the shard index says "
                               f"{weight_map.get(name)!r}; inconsistent shard set")
            state[name], origin[name] = tensor, path.name
    if weight_map is not None and (absent := sorted(set(weight_map) - set(state))):
        raise HubError(f"the shard index names tensors no shard holds: {absent[:8]}"
                       f"{' ...' if len(absent) > 8 else ''}; incomplete shard set")
    seen: set[int] = set()
    for name, tensor in state.items():
        t = tensor.contiguous()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        state[name] = t
    safetensors.torch.save_file(state, out, metadata={"format": "pt"})


def download_revision(repo: str, revision: str, out_dir: Path | str, *,
                      retries: int = _HUB["retries"], backoff: float = _HUB["backoff"],
                      min_free_bytes: int = 0, blobs: SharedBlobs | None = None) -> dict:
    """Fetch ``config.json`` and the weights of ``repo`` at ``revision`` into ``out_dir``.

    Writes ``out_dir/{config.json, model.safetensors, revision.json}`` (the record last);
    downloads go to a hidden staging folder next to ``out_dir`` that is removed afterwards.
    Returns the record: ``repo``, ``revision``, ``commit``, ``weights_files`` (name, bytes,
    sha256 each), ``converted``, ``sha256`` and ``bytes`` of ``model.safetensors``.
    ``blobs``: the weight blobs several planned revisions share
    (:class:`lmdynamics.sources.blobs.SharedBlobs`), each fetched once.
    """
    out_dir = Path(out_dir)
    api = HfApi()
    try:
        info = with_retries(
            lambda: api.model_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT),
            what=f"{repo}@{revision}: revision info", retries=retries, backoff=backoff)
    except RevisionNotFoundError as exc:
        raise _missing_revision(api, repo, revision, retries, backoff) from exc
    except RepositoryNotFoundError as exc:
        raise HubError(f"repository {repo} not found on {constants.ENDPOINT} (check hub.repo "
                       "and the size label)") from exc
    commit = checked_commit(info.sha, repo, revision)
    names = [s.rfilename for s in info.siblings or []]
    if CONFIG_NAME not in names:
        raise HubError(f"{repo}@{revision} ({commit}) has no {CONFIG_NAME}; files: {names}")
    weights, convert, index = weight_files(names)
    remotes = [remote_file(repo, n, commit, retries=retries, backoff=backoff)
               for n in [CONFIG_NAME, *weights, *([index] if index else [])]]
    index_remote = remotes.pop() if index else None
    weight_bytes = sum(r.size for r in remotes[1:])
    need = sum(r.size for r in remotes) + (weight_bytes if convert else 0)
    check_free_space(out_dir, need, min_free_bytes)
    log.info("%s@%s -> commit %s; fetching %s (%.1f MB)", repo, revision, commit,
             ", ".join(r.name for r in remotes), need / 1e6)

    staging = out_dir.parent / f".{out_dir.name}.download-{os.getpid()}"
    for stale in out_dir.parent.glob(f".{out_dir.name}.download-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        fetched = [_fetch(repo, r, commit, staging, retries=retries, backoff=backoff,
                          blobs=blobs if r.name != CONFIG_NAME else None)
                   for r in remotes]
        config_path = fetched[0][0]
        read_model_config(config_path.parent)  # refuses remote code / unknown architectures
        weight_map = None
        if index_remote is not None:
            index_path, _ = _fetch(repo, index_remote, commit, staging, retries=retries,
                                   backoff=backoff)
            weight_map = shard_map(index_path, weights)
        if convert:
            target = staging / f"converted-{SAFETENSORS_NAME}"
            convert_to_safetensors([p for p, _ in fetched[1:]], target, weight_map)
            log.info("converted %s to %s", ", ".join(weights), SAFETENSORS_NAME)
        else:
            target = fetched[1][0]
        record = {
            "repo": repo, "revision": revision, "commit": commit,
            "weights_files": [{"name": r.name, "bytes": r.size, "sha256": sha}
                              for r, (_, sha) in zip(remotes[1:], fetched[1:], strict=True)],
            "converted": convert,
            "sha256": file_sha256(target) if convert else fetched[1][1],
            "bytes": target.stat().st_size,
            "endpoint": constants.ENDPOINT,
        }
        out_dir.mkdir(parents=True, exist_ok=True)
        os.replace(config_path, out_dir / CONFIG_NAME)
        os.replace(target, out_dir / SAFETENSORS_NAME)
        write_text_atomic(json.dumps(record, indent=2) + "\n", out_dir / REVISION_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if blobs is not None:
        for entry in record["weights_files"]:
            blobs.release(entry["sha256"], blobs.downloaded)
    return record

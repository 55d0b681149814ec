"""Zarr stores written atomically, checksummed, and opened only after verification.

Writing (:func:`write_store`). A store is written to a hidden temporary sibling, its
integrity records are added, it is marked complete in its attrs, and only then renamed into
place, so a store at its final path is always complete: an interrupted job leaves at most a
``.<name>.tmp-<pid>`` (or, while replacing a store, ``.<name>.old-<pid>``) directory, which
the next write of the same path removes. Every chunk is written, even one holding only the
fill value, so :func:`open_store` can tell a missing chunk file from a NaN one.

Integrity. Every chunk of every array carries zarr's own ``crc32c`` codec as its last
bytes-to-bytes codec (:data:`CHECKSUM_CODEC`), so zarr itself refuses a chunk whose bytes
changed (a flipped byte, a truncated file). At write time the store also records, in its
attrs, a sha256 of each array's decoded content (dtype, shape and values; read back from
the written store) under :data:`DIGESTS_ATTR`, and a sha256 of its other attrs under
:data:`ATTRS_DIGEST_ATTR`: chunks copied in from another store pass their checksums but not
the digest, an edited attribute fails the attrs digest. :data:`FORMAT_ATTR` records the
store format. Cost: docs/benchmarks/2026-11-30.md ("Store checksums and digests").

Reading (:func:`open_store`) verifies all of it before returning anything and raises
:class:`IncompleteStoreError` with one line naming the store, the array or attribute, and the
redo command. A store written before this format (no checksums, no digests; any store without
``lmdynamics_store_format`` = :data:`STORE_FORMAT`) is refused the same way, not trusted:
nothing partial or damaged is ever taken for complete, and an unverifiable store cannot be
told apart from a damaged one. Rewrite it (the redo command), which is what the workflow
does on its next run after ``--forcerun``.

Other files (:func:`atomic_path` and the writers built on it) follow the same rule: written to
a hidden ``.<name>.tmp-<pid>`` sibling and renamed into place; the next write of the same
path removes what killed writers left (also the visible ``<name>.tmp-<pid>`` names of
earlier versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
import zarr
import zarr.codecs

#: Attribute set last, just before the rename; must be exactly ``True`` when read.
COMPLETE_ATTR = "complete"
#: Store format: 2 = crc32c on every chunk and sha256 digests of arrays and attrs.
STORE_FORMAT = 2
FORMAT_ATTR = "lmdynamics_store_format"
#: attrs key: {array name: sha256 hex of its decoded content} (:func:`array_digest`).
DIGESTS_ATTR = "lmdynamics_array_sha256"
#: attrs key: sha256 hex of every other attr (:func:`attrs_digest`).
ATTRS_DIGEST_ATTR = "lmdynamics_attrs_sha256"
#: Attrs that :func:`write_store` sets itself (dropped from the dataset it is given).
INTEGRITY_ATTRS = (COMPLETE_ATTR, FORMAT_ATTR, DIGESTS_ATTR, ATTRS_DIGEST_ATTR)
#: zarr's checksum codec, appended to every array's bytes-to-bytes codecs.
CHECKSUM_CODEC = zarr.codecs.Crc32cCodec()
#: Compressor of arrays whose encoding names none (zarr's own v3 default).
DEFAULT_COMPRESSOR = zarr.codecs.ZstdCodec(level=0)


class IncompleteStoreError(RuntimeError):
    """A store is missing, half-written, damaged or inconsistent; the message (one line)
    names it and says how to redo it."""


def redo_hint(path: Path | str) -> str:
    """How a user redoes the job that writes ``path``."""
    return (f"redo it by adding `--forcerun {path}` to your snakemake command (this rewrites "
            f"it and everything computed from it), or delete {path} and rerun the same "
            f"command")


def string_coords(ds: xr.Dataset) -> xr.Dataset:
    """Cast fixed-width string coordinates to variable-length strings (zarr v3 specifies these)."""
    casts = {name: c.astype(object) for name, c in ds.coords.items() if c.dtype.kind == "U"}
    return ds.assign_coords(casts) if casts else ds


# --------------------------------------------------------------------------- atomic writes


def tmp_path_for(path: Path) -> Path:
    """Hidden temporary sibling of ``path`` for this process: ``.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary siblings left by killed writers of ``path`` (files or folders):
    ``.<name>.tmp-*``, ``.<name>.old-*`` and earlier versions' ``<name>.tmp-*``."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*", f"{path.name}.tmp-*"):
        for stale in path.parent.glob(pattern):
            _remove(stale)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_dir(tmp: Path, path: Path) -> None:
    """Move directory ``tmp`` to ``path``, replacing an existing ``path`` without a window in
    which a half-deleted store sits at ``path``: the old one is renamed aside, then removed."""
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Write ``path`` (a file or a folder) atomically: yields its hidden temporary sibling.

    Creates the parent folder and removes what killed writers of ``path`` left
    (:func:`remove_stale_tmp`); when the block ends normally the temporary is renamed onto
    ``path`` (a folder through :func:`replace_dir`), when it raises the temporary is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(path)
    tmp = tmp_path_for(path)
    try:
        yield tmp
        if tmp.is_dir():
            replace_dir(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def write_array_atomic(array: np.ndarray, path: Path | str) -> Path:
    """Save a small numpy array to ``path`` (.npy) through a temporary file and rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)
        fh.flush()
        os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(text: str, path: Path | str) -> Path:
    """Write text to ``path`` through a temporary file and rename."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


class TokenArrayError(ValueError):
    """A token file (eval batch, gradient batches) is not an integer array of the expected
    shape; the message names the file."""


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (the one file hash of the package:
    downloaded weights, checkpoint identities)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def npy_problem(path: Path | str) -> str | None:
    """Why ``path`` cannot be read as a ``.npy`` array of numbers, checked from its header
    before anything is allocated, or None when it can: not a regular file (a FIFO would
    block, /dev/zero never end), no valid header, a pickled object dtype, or a shape whose
    bytes differ from what the file holds (a header claiming 10^12 values)."""
    import stat

    from numpy.lib import format as npy_format

    path = Path(path)
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read = {(1, 0): npy_format.read_array_header_1_0,
                    (2, 0): npy_format.read_array_header_2_0}.get(version)
            if read is None:
                return f"a .npy format version {version} this reader does not know"
            shape, _, dtype = read(f)
            offset = f.tell()
    except OSError as exc:
        return f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    except (ValueError, EOFError, SyntaxError) as exc:
        return f"no valid .npy header ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if dtype.hasobject or dtype.kind not in "biuf":
        return f"holds {dtype} values, not numbers"
    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if offset + need != info.st_size:
        return (f"its header says shape {shape} of {dtype} ({need} bytes of data), the file "
                f"holds {info.st_size - offset}; truncated or damaged")
    return None


def open_npy(path: Path | str) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped (nothing read until used), after
    :func:`npy_problem` found nothing wrong; :class:`TokenArrayError` names what is."""
    problem = npy_problem(path)
    if problem is not None:
        raise TokenArrayError(f"{path}: {problem}")
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return array if array.size else np.zeros(array.shape, array.dtype)


def load_token_array(path: Path | str, *, ndim: int, what: str) -> np.ndarray:
    """Load an .npy of token ids, refusing anything but a non-empty ``ndim``-D integer array.

    A float batch would be truncated to ids silently, a 1-D or 3-D one misread as other
    sequences: each raises :class:`TokenArrayError`, one line naming the file, what it holds
    and what is expected. No pickled object is ever loaded.
    """
    try:
        array = np.array(open_npy(path))  # in memory, as a batch is used
    except (OSError, ValueError, EOFError) as exc:
        raise TokenArrayError(f"{path}: cannot be read as a .npy {what} "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())}); "
                              "delete it and rerun to remake it") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu" \
            or array.ndim != ndim or array.size == 0:
        raise TokenArrayError(
            f"{path}: holds a {getattr(array, 'ndim', '?')}-D {getattr(array, 'dtype', '?')} "
            f"array of shape {getattr(array, 'shape', '?')}; expected the {what} as a non-empty "
            f"{ndim}-D integer array of token ids; delete it and rerun to remake it")
    return array


# --------------------------------------------------------------------------- digests


def _blocks(array: zarr.Array) -> Iterator[np.ndarray]:
    """The array's values in C order, one block per chunk along the leading dims of chunk
    size 1 (one (component, layer) of activations at a time, not the whole array)."""
    lead = 0
    while lead < array.ndim - 1 and array.chunks[lead] == 1:
        lead += 1
    for index in np.ndindex(*array.shape[:lead]):
        yield np.asarray(array[index])


def _digest_start(array: zarr.Array) -> Any:
    strings = array.dtype.kind in "OTU"
    return hashlib.sha256(
        f"{'str' if strings else np.dtype(array.dtype).str}{array.shape}".encode())


def _digest_update(digest: Any, block: np.ndarray) -> None:
    if block.dtype.kind in "OTU":
        for item in np.ravel(block):
            data = str(item).encode("utf-8")
            digest.update(len(data).to_bytes(8, "little") + data)
    else:
        digest.update(np.ascontiguousarray(block).tobytes())


def array_digest(array: zarr.Array) -> str:
    """sha256 (hex) of a zarr array's decoded content: dtype, shape, then values in C order
    (strings as length-prefixed UTF-8). Independent of the chunking."""
    digest = _digest_start(array)
    for block in _blocks(array):
        _digest_update(digest, block)
    return digest.hexdigest()


class DigestedReader:
    """Reads one array of a store block by block, checking its digest on the way.

    For a reader that reads every value of a large array exactly once anyway (the reduction
    reads each (component, layer) of ``activations`` once): :func:`open_store` with
    ``defer=(name,)`` checks everything but that array's content, and this reader hashes the
    blocks as they are read, so the store is not read twice. ``read(index)`` must visit the
    leading indices in C order (``(0, 0), (0, 1), ...``); :meth:`finish` raises
    :class:`IncompleteStoreError` unless every value was read and the digest matches. A
    damaged chunk raises the same error, naming the store and the array, when read.
    """

    def __init__(self, path: Path | str, name: str, group: zarr.Group | None = None):
        self.path, self.name = Path(path), name
        if group is None:  # a reader of many arrays passes the group it opened once
            group = zarr.open_group(self.path, mode="r", use_consolidated=False)
        self.array = group[name]
        self.expected = group.attrs[DIGESTS_ATTR][name]
        self.digest = _digest_start(self.array)
        self.left = self.array.size

    def read(self, index: tuple[int, ...]) -> np.ndarray:
        try:
            block = np.asarray(self.array[index])
        except Exception as exc:  # crc32c mismatch, truncated or undecodable chunk
            raise _damaged(self.path, self.name, exc) from exc
        _digest_update(self.digest, block)
        self.left -= block.size
        return block

    def finish(self) -> None:
        if self.left != 0 or self.digest.hexdigest() != self.expected:
            raise _other_data(self.path, self.name)


def _damaged(path: Path, name: str, exc: BaseException) -> IncompleteStoreError:
    return IncompleteStoreError(
        f"{path}: array {name!r} has a damaged chunk ({type(exc).__name__}: "
        f"{_one_line(exc)}); {redo_hint(path)}")


def _other_data(path: Path, name: str) -> IncompleteStoreError:
    return IncompleteStoreError(
        f"{path}: array {name!r} holds other data than was written (sha256 of its values "
        f"differs from the one recorded; chunks copied from another store?); "
        f"{redo_hint(path)}")


def attrs_digest(attrs: Mapping[str, Any]) -> str:
    """sha256 (hex) of a store's attrs other than the completion mark and this digest, as
    canonical JSON."""
    rest = {k: v for k, v in attrs.items() if k not in (COMPLETE_ATTR, ATTRS_DIGEST_ATTR)}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, allow_nan=True).encode()).hexdigest()


def _checksummed(ds: xr.Dataset, encoding: Mapping[str, Mapping[str, Any]] | None
                 ) -> dict[str, dict[str, Any]]:
    """``encoding`` with :data:`CHECKSUM_CODEC` last among every variable's compressors."""
    out = {}
    for name in map(str, ds.variables):
        enc = dict((encoding or {}).get(name, {}))
        compressors = tuple(enc.get("compressors") or (DEFAULT_COMPRESSOR,))
        enc["compressors"] = (*compressors, CHECKSUM_CODEC)
        out[name] = enc
    return out


def write_store(ds: xr.Dataset, path: Path | str,
                encoding: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """Write ``ds`` as a zarr v3 group at ``path`` atomically; return ``path``.

    ``encoding`` is passed to :meth:`xarray.Dataset.to_zarr` (e.g. chunks per variable);
    every array gets :data:`CHECKSUM_CODEC` after its compressors. The digests of every
    array (read back from the written store) and of the attrs are recorded before the
    completion mark. An existing store at ``path`` is replaced.
    """
    path = Path(path)
    ds = string_coords(ds.drop_encoding())
    ds.attrs = {k: v for k, v in ds.attrs.items() if k not in INTEGRITY_ATTRS}
    with atomic_path(path) as tmp:
        ds.to_zarr(tmp, mode="w", encoding=_checksummed(ds, encoding), consolidated=False,
                   zarr_format=3, write_empty_chunks=True)
        group = zarr.open_group(tmp, mode="r+")
        group.attrs.update({FORMAT_ATTR: STORE_FORMAT, DIGESTS_ATTR: {
            name: array_digest(array) for name, array in sorted(group.arrays())}})
        group.attrs[ATTRS_DIGEST_ATTR] = attrs_digest(group.attrs.asdict())
        group.attrs[COMPLETE_ATTR] = True
        with warnings.catch_warnings():  # "not part of the Zarr format 3 specification"
            warnings.filterwarnings("ignore", "Consolidated metadata", category=UserWarning)
            # last, so a user's xr.open_zarr reads one document, without warnings (it would
            # otherwise list the directory, including Snakemake's .snakemake_timestamp)
            zarr.consolidate_metadata(tmp)
    return path


# --------------------------------------------------------------------------- reading


def open_store(path: Path | str, *, required: tuple[str, ...] = (),
               required_attrs: tuple[str, ...] = (), defer: tuple[str, ...] = ()) -> xr.Dataset:
    """Open a store written by :func:`write_store`, refusing incomplete or damaged ones.

    Raises :class:`IncompleteStoreError` (one line naming the store and how to redo it)
    when the store is missing or unreadable, its completion mark is not exactly ``True``, it
    lacks a ``required`` variable or a ``required_attrs`` attribute, or :func:`verify_store`
    finds its data is not what was written (the content of the arrays in ``defer`` is left
    to the caller's :class:`DigestedReader`). Variables are read lazily through zarr itself,
    not dask: a reduction reads one chunk at a time, and dask's scheduling per read costs
    more than the read (docs/benchmarks/2026-11-29.md).
    """
    with warnings.catch_warnings():  # Snakemake's mark in directory() outputs: not ours
        warnings.filterwarnings("ignore", r"Object at \.snakemake_timestamp")
        return _open_store(Path(path), required, required_attrs, defer)


def _open_store(path: Path, required: tuple[str, ...], required_attrs: tuple[str, ...],
                defer: tuple[str, ...]) -> xr.Dataset:
    if not (path / "zarr.json").exists():
        raise IncompleteStoreError(f"{path} is not a zarr store (no zarr.json); {redo_hint(path)}")
    try:
        ds = xr.open_zarr(path, consolidated=False, chunks=None)
    except Exception as exc:  # unreadable metadata, arrays of conflicting sizes, ...
        raise IncompleteStoreError(f"{path} cannot be read ({type(exc).__name__}: "
                                   f"{_one_line(exc)}); {redo_hint(path)}") from exc
    mark = ds.attrs.get(COMPLETE_ATTR)
    if mark is not True:
        why = ("no '{0}' mark" if mark is None else "'{0}' is {1!r}, not true").format(
            COMPLETE_ATTR, mark)
        raise IncompleteStoreError(f"{path} is incomplete ({why}: its writer was interrupted "
                                   f"or the store was edited); {redo_hint(path)}")
    missing = [v for v in required if v not in ds.variables]
    if missing:
        raise IncompleteStoreError(f"{path} lacks {', '.join(missing)}; {redo_hint(path)}")
    missing = [a for a in required_attrs if a not in ds.attrs]
    if missing:
        raise IncompleteStoreError(f"{path} lacks attribute(s) {', '.join(missing)}; "
                                   f"{redo_hint(path)}")
    verify_store(path, defer=defer)
    return ds


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def verify_store(path: Path | str, *, defer: tuple[str, ...] = ()) -> None:
    """Check every array of a store against its recorded integrity; raise if it differs.

    In order: the store format (:data:`FORMAT_ATTR`; older stores carry no checksums and are
    refused), the attrs digest, the set of arrays against the recorded digests, each array's
    chunk files (zarr reads a missing chunk as the fill value, NaN), its last codec
    (:data:`CHECKSUM_CODEC`), and its content: every chunk is read, so zarr checks its crc32c,
    and the sha256 of the decoded values must equal the recorded one (except for the
    arrays in ``defer``, read later through :class:`DigestedReader`). Raises
    :class:`IncompleteStoreError` naming the store, the array and the redo command.
    """
    path = Path(path)
    group = zarr.open_group(path, mode="r", use_consolidated=False)
    attrs = group.attrs.asdict()
    if attrs.get(FORMAT_ATTR) != STORE_FORMAT:
        raise IncompleteStoreError(
            f"{path} has no checksums to verify (store format {attrs.get(FORMAT_ATTR)!r}, "
            f"this version writes and reads format {STORE_FORMAT}; written by an earlier "
            f"version of lmdynamics?); {redo_hint(path)}")
    if attrs.get(ATTRS_DIGEST_ATTR) != attrs_digest(attrs):
        raise IncompleteStoreError(f"{path}: its attributes (zarr.json) differ from what was "
                                   f"written (sha256 mismatch); {redo_hint(path)}")
    recorded = attrs.get(DIGESTS_ATTR)
    arrays = dict(group.arrays())
    if not isinstance(recorded, dict):
        raise IncompleteStoreError(f"{path}: attribute {DIGESTS_ATTR} is not a table of "
                                   f"digests; {redo_hint(path)}")
    lost = sorted(set(recorded) - set(arrays))
    if lost:
        raise IncompleteStoreError(f"{path} lacks {', '.join(lost)} (arrays it was written "
                                   f"with); {redo_hint(path)}")
    for name, array in sorted(arrays.items()):
        where = f"{path}: array {name!r}"
        if name not in recorded:
            raise IncompleteStoreError(f"{where} was not written with the store (no digest "
                                       f"recorded); {redo_hint(path)}")
        if array.nchunks_initialized < array.nchunks:
            raise IncompleteStoreError(
                f"{where} has {array.nchunks_initialized} of its {array.nchunks} chunk "
                f"files; {redo_hint(path)}")
        if not isinstance(array.metadata.codecs[-1], zarr.codecs.Crc32cCodec):
            raise IncompleteStoreError(f"{where} has no crc32c checksum codec (its metadata "
                                       f"was changed); {redo_hint(path)}")
        if name in defer:
            continue
        try:
            digest = array_digest(array)
        except Exception as exc:  # crc32c mismatch, truncated or undecodable chunk
            raise _damaged(path, name, exc) from exc
        if digest != recorded[name]:
            raise _other_data(path, name)


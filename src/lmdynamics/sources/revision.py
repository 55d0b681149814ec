"""The revision record (``revision.json``) a hub download leaves beside a checkpoint's
weights: which commit, which file, its sha256 and size. Written by :mod:`lmdynamics.sources.hub`,
read by the extraction into each store's attrs."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lmdynamics.sources.checkpoints import CorruptCheckpointError, weights_path
from lmdynamics.sources.suites import DISCOVERED_PREFIX

#: Name of the record inside a checkpoint directory.
REVISION_FILE = "revision.json"


def read_revision_record(checkpoint: Path | str) -> dict | None:
    """The ``revision.json`` of a downloaded checkpoint, or None (tiny suite)."""
    path = Path(checkpoint) / REVISION_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def revision_attrs(checkpoint: Path | str) -> dict:
    """Store attrs from ``revision.json``: ``revision`` (the name downloaded, e.g. the branch
    a discover suite found for its step), ``revision_commit``, ``hub_weights_sha256``,
    ``hub_weights_bytes``, ``hub_repo`` (empty for checkpoints not from the hub)."""
    record = read_revision_record(checkpoint)
    if record is None:
        return {}
    return {"revision": record["revision"], "revision_commit": record["commit"],
            "hub_repo": record["repo"],
            "hub_weights_sha256": record["sha256"], "hub_weights_bytes": int(record["bytes"])}


def discard_corrupt_download(checkpoint: Path | str, exc: Exception) -> Exception:
    """A downloaded checkpoint whose files are corrupt is removed (weights and
    ``revision.json``) so the next run downloads it again; returns the error to raise, which
    says so. Checkpoints not from the hub are left alone."""
    checkpoint = Path(checkpoint)
    if not (checkpoint / REVISION_FILE).is_file():
        return exc
    for name in ("model.safetensors", "pytorch_model.bin", REVISION_FILE):
        (checkpoint / name).unlink(missing_ok=True)
    return type(exc)(f"{exc}; deleted the downloaded weights of {checkpoint}: the next run "
                     "downloads them again")


class WeightsMismatchError(CorruptCheckpointError):
    """A checkpoint's weights are not the ones its ``revision.json`` records."""


def verified_revision_attrs(checkpoint: Path | str, weights_sha256: str,
                            revision: str | None = None) -> dict:
    """:func:`revision_attrs`, after checking that the weights' sha256 (``weights_sha256``,
    of the file extraction loads) is the one the download recorded, and that the record is
    of ``revision`` (the job's revision name; not checked when None or a ``discover`` label,
    :data:`DISCOVERED_PREFIX`): weights replaced after the download, or another step's
    download copied in with its record, raise :class:`WeightsMismatchError` (one line; the
    caller discards the download, :func:`discard_corrupt_download`); an unreadable record
    too. Checkpoints not from the hub: ``{}``."""
    path = Path(checkpoint) / REVISION_FILE
    try:
        attrs = revision_attrs(checkpoint)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise WeightsMismatchError(f"{path}: not a revision record ({type(exc).__name__}: "
                                   f"{exc})") from None
    if (attrs and revision and not revision.startswith(DISCOVERED_PREFIX)
            and attrs["revision"] != revision):
        raise WeightsMismatchError(
            f"{path}: records {attrs['hub_repo']}@{attrs['revision']}, but this job extracts "
            f"revision {revision}: another revision's download is in its folder")
    if attrs and attrs["hub_weights_sha256"] != weights_sha256:
        raise WeightsMismatchError(
            f"{weights_path(checkpoint)}: sha256 {weights_sha256}, {path} records "
            f"{attrs['hub_weights_sha256']} for {attrs['hub_repo']}@{attrs['revision']}: the "
            "weights changed after the download")
    return attrs


#: ``config.json`` keys that do not change what a checkpoint computes from its weights
#: (provenance, generation and training-only settings); every other key is recorded.
CONFIG_BOOKKEEPING = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
    "hidden_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_first_dropout",
    "initializer_range", "gradient_checkpointing", "task_specific_params",
})


def config_attrs(checkpoint: Path | str) -> dict:
    """Store attrs of the checkpoint's ``config.json``: ``config_sha256`` (of the file's
    bytes) and ``checkpoint_config``, the JSON (sorted keys) of every key that can change the
    computation (all but :data:`CONFIG_BOOKKEEPING`: ``hidden_act``,
    ``use_parallel_residual``, ``partial_rotary_factor``, ...), so an edited config is seen
    in the store, never only in a changed loss."""
    data = (Path(checkpoint) / "config.json").read_bytes()
    config = json.loads(data)
    kept = {k: v for k, v in config.items() if k not in CONFIG_BOOKKEEPING}
    return {"config_sha256": hashlib.sha256(data).hexdigest(),
            "checkpoint_config": json.dumps(kept, sort_keys=True)}

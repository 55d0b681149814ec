"""The revision record (``revision.json``) a hub download leaves beside a checkpoint's
weights: which commit, which file, its sha256 and size. Written by :mod:`lmdynamics.sources.hub`,
read by the extraction into each store's attrs."""

from __future__ import annotations

import json
from pathlib import Path

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

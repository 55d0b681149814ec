"""Extraction of checkpoints read in place from your own run (config ``source: local``).

Each checkpoint is waited for until complete (:func:`lmdynamics.sources.local.wait_complete`),
fingerprinted (path, sha256, size, mtime of its weights file: store attrs
``checkpoint_*``) and extracted by :func:`~lmdynamics.extraction.extract.extract_checkpoint`;
if its weights changed while they were read (the sha256 taken after loading differs from the
one taken before), the store is removed and the job fails in one line.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xarray as xr

from lmdynamics.extraction.extract import CheckpointStep, extract_checkpoint
from lmdynamics.sources.local import IncompleteCheckpointError, fingerprint, wait_complete

log = logging.getLogger(__name__)


def extract_local(checkpoints: Sequence[CheckpointStep], eval_batch: Path | str, *,
                  settle_seconds: float, wait_seconds: float, **options: Any) -> list[Path]:
    """:func:`extract_checkpoint` of each local checkpoint once it is complete, its store
    recording the checkpoint's fingerprint. ``options``: as for
    :func:`~lmdynamics.extraction.extract.extract_checkpoints`."""
    outs = []
    for c in checkpoints:
        why = wait_complete(c.checkpoint, c.step, settle_seconds=settle_seconds,
                            wait_seconds=wait_seconds)
        log.info("%s: complete (%s)", c.checkpoint, why)
        before = fingerprint(c.checkpoint)
        out = extract_checkpoint(c.checkpoint, eval_batch, c.out, step=c.step,
                                 revision=c.revision, gradient_batches=c.gradient_batches,
                                 extra_attrs=before, **options)
        with xr.open_zarr(out) as ds:
            after = ds.attrs["weights_sha256"]
        if after != before["checkpoint_sha256"]:
            shutil.rmtree(out)
            raise IncompleteCheckpointError(
                f"{c.checkpoint}: the weights changed while they were read (sha256 "
                f"{before['checkpoint_sha256'][:12]} before, {after[:12]} after); store "
                "removed, rerun once the checkpoint is no longer being written")
        outs.append(Path(out))
    return outs

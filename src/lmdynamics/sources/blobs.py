"""Weight blobs that several planned revisions of a run serve, fetched once
(:class:`SharedBlobs`; the pre-flight hub audit, :mod:`lmdynamics.hub_audit`, lists them)."""

from __future__ import annotations

import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)


class SharedBlobs:
    """Weight blobs that several planned revisions serve, fetched once.

    ``directory`` (``checkpoints/.blobs``) holds a hard link (or copy) of each blob that the
    hub audit (``audit``: its table) lists for more than one planned revision; its file name is
    the blob's sha256. A download finding its blob there takes it instead of fetching it
    (:func:`lmdynamics.sources.hub.download_revision` checks size and sha256 either way), and
    the last revision that needs a blob removes it (:meth:`release`), so the directory holds
    a blob only while some revision still has to be downloaded.
    """

    def __init__(self, directory: Path | str, audit_table: pd.DataFrame):
        self.directory = Path(directory)
        self.users: dict[str, set[tuple[str, int, int]]] = defaultdict(set)
        for row in audit_table[audit_table["step"].astype(str) != ""].itertuples():
            for entry in filter(None, str(row.weight_files).split(";")):
                self.users[entry.rpartition("=")[2]].add((row.size, int(row.seed),
                                                          int(row.step)))

    def shared(self, sha: str) -> bool:
        """Whether more than one planned revision serves blob ``sha``."""
        return len(self.users.get(sha, ())) > 1

    def path(self, sha: str) -> Path:
        return self.directory / sha

    def take(self, sha: str, size: int, dest: Path) -> bool:
        """Link (or copy) a kept blob to ``dest``; False when it is not kept (or not whole)."""
        src = self.path(sha)
        if not self.shared(sha) or not src.is_file() or src.stat().st_size != size:
            return False
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, dest)
        return True

    def keep(self, sha: str, path: Path) -> None:
        """Keep a verified download of a shared blob (atomically: linked under a temporary
        name, then renamed)."""
        if not self.shared(sha) or self.path(sha).is_file():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.directory / f".{sha}.tmp-{os.getpid()}"
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
        os.replace(tmp, self.path(sha))

    def downloaded(self, size: str, seed: int, step: int) -> bool:
        """Whether the revision of (size, seed, step) is downloaded: its ``revision.json``,
        written last, is in ``checkpoints/<size>/seed<k>/step<step>/`` (the folder above
        :attr:`directory`)."""
        from lmdynamics.sources.revision import REVISION_FILE

        return (self.directory.parent / size / f"seed{seed}" / f"step{step}" /
                REVISION_FILE).is_file()

    def release(self, sha: str, done: Callable[[str, int, int], bool]) -> None:
        """Remove a kept blob once every revision serving it is downloaded (``done(size,
        seed, step)``)."""
        if self.path(sha).is_file() and all(done(*u) for u in self.users.get(sha, ())):
            self.path(sha).unlink(missing_ok=True)
            log.info("released shared blob %s", sha[:12])

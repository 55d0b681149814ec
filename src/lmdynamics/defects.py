"""Defective revisions: the one record the audits write and the tables and figures read.

A revision is *defective* when what the hub serves for it is not what its step says: its
weights are another revision's (Pythia issues #195, #205; allenai/OLMo #915), part of them are
(#206), it has none (#202), or its values break the run's trajectory. Two audits find them:

- the pre-flight hub audit (:mod:`lmdynamics.hub_audit`), from the LFS sha256 and size
  of every weight file the hub lists, before any weight is downloaded
  (``tables/hub_audit.csv``);
- the content audit (:mod:`lmdynamics.reduction.audit`), after extraction, from per-tensor
  digests and the distance and cosine statistics of every matrix (``tables/tensor_audit.csv``).

Both end up here, one row per finding, in ``tables/defective.csv`` (:data:`COLUMNS`):
``size``, ``seed``, ``step``, ``audit`` (``hub`` | ``content``), ``kind``
(:data:`KINDS`), ``detail`` (what was found, in words), ``evidence`` (the numbers that
flagged it) and ``source`` (the tracker issue of a matching known defect, if any).

What a run does with them is one option, ``audit.defective`` (:data:`POLICIES`):
``exclude`` (default: Table 1, the sensitivity figure, the convergence statistics of
Figures 1-5 and the Conjecture figures leave them out and say so; figures draw them hollow),
``mark`` (counted, but drawn hollow and listed), ``fail`` (the run stops, one line naming
them: :class:`DefectiveRevisionsError`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import pandas as pd

from lmdynamics.store import write_text_atomic

#: ``audit.defective``: what a run does with defective revisions (module docstring).
POLICIES: tuple[str, ...] = ("exclude", "mark", "fail")
#: Columns of ``tables/defective.csv``.
COLUMNS: tuple[str, ...] = ("size", "seed", "step", "audit", "kind", "detail", "evidence",
                            "source")
#: What a finding says about a revision.
KINDS: dict[str, str] = {
    "no_weights": "the hub lists no weights for it",
    "same_as_main": "serves the same weights as main (the finished model)",
    "same_as_final": "serves the same weights as the final step",
    "same_as_step0": "serves the same weights as step 0",
    "shared_content": "serves the same weights as another step",
    "shared_shard": "a weight file is another revision's",
    "tensors_equal": "some tensors are another step's, byte for byte",
    "trajectory": "its values break the run's trajectory",
}


class DefectiveRevisionsError(RuntimeError):
    """``audit.defective: fail`` and revisions were flagged; the message lists them."""


def check_policy(policy: str) -> str:
    """``policy`` if it is one of :data:`POLICIES`, else ValueError naming the key."""
    if policy not in POLICIES:
        raise ValueError(f"audit.defective={policy!r}: allowed {', '.join(POLICIES)}")
    return policy


def frame(rows: Iterable[Mapping]) -> pd.DataFrame:
    """Findings as a table of :data:`COLUMNS`, sorted by size, seed, step (one row each)."""
    table = pd.DataFrame(list(rows), columns=list(COLUMNS))
    bad = sorted(set(table["kind"]) - set(KINDS))
    if bad:
        raise ValueError(f"unknown defect kind(s) {bad}; known: {', '.join(KINDS)}")
    table = table.fillna({"detail": "", "evidence": "", "source": ""})
    table["seed"] = table["seed"].astype(int)
    table["step"] = table["step"].astype(int)
    return table.sort_values(["size", "seed", "step", "audit"], kind="stable").reset_index(
        drop=True)


def write_defects(table: pd.DataFrame, path: Path | str) -> None:
    """Write ``tables/defective.csv`` (atomically)."""
    write_text_atomic(table.to_csv(index=False), path)


def read_defects(path: Path | str | None) -> pd.DataFrame:
    """``tables/defective.csv`` (no path: no findings). A file without the columns of
    :data:`COLUMNS` is refused naming it."""
    if path is None:
        return frame([])
    table = pd.read_csv(path, dtype={"size": str}, keep_default_na=False)
    missing = [c for c in COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a defective-revisions table (missing columns "
                         f"{missing}); rerun the checkpoint_audit rule")
    return frame(table[list(COLUMNS)].to_dict("records"))


def flagged(table: pd.DataFrame) -> dict[tuple[str, int, int], str]:
    """(size, seed, step) -> why, in words (the findings of one revision joined)."""
    out: dict[tuple[str, int, int], list[str]] = {}
    for row in table.itertuples():
        text = row.detail or KINDS[row.kind]
        if row.evidence:
            text += f" ({row.evidence})"
        if row.source:
            text += f" [{row.source}]"
        out.setdefault((str(row.size), int(row.seed), int(row.step)), [])
        if text not in out[(str(row.size), int(row.seed), int(row.step))]:
            out[(str(row.size), int(row.seed), int(row.step))].append(text)
    return {key: "; ".join(texts) for key, texts in sorted(out.items())}


def fail_line(table: pd.DataFrame, what: str = "the audits") -> str:
    """The one line of ``audit.defective: fail``: every flagged revision with its kinds."""
    kinds: dict[tuple[str, int, int], list[str]] = {}
    for row in table.itertuples():
        kinds.setdefault((str(row.size), int(row.seed), int(row.step)), [])
        if row.kind not in kinds[(str(row.size), int(row.seed), int(row.step))]:
            kinds[(str(row.size), int(row.seed), int(row.step))].append(row.kind)
    listed = ", ".join(f"{size} seed {seed} step {step} ({'+'.join(k)})"
                       for (size, seed, step), k in sorted(kinds.items()))
    return (f"{what} flagged {len(kinds)} revision(s) as not what their step says: {listed}; "
            "audit.defective is fail: set it to exclude (leave them out) or mark (count "
            "them, drawn hollow), or drop those steps")

"""Checkpoint audit: revisions whose weights are byte-identical to another revision's.

Some Pythia step branches serve the same weights as ``main`` (Pythia issues #195, #205,
#206; e.g. pythia-2.8b ``step0`` to about ``step53000``; shared/notes/reference-facts.md).
Every per-pair store records the sha256 of the weights it was computed from
(attr ``weights_sha256``; for hub revisions also ``revision_commit`` and
``hub_weights_sha256`` from ``revision.json``). This module finds revisions of one size and
seed replicate (store attr ``seed``, 0 when absent) that share a sha256, writes
``tables/checkpoint_audit.csv``, and gives the metrics the boolean
``flag_duplicate`` (step) that figures mark through ``flagged``
(:func:`lmdynamics.reduction.flags.set_flagged`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.store import open_store, write_text_atomic

#: Columns of ``tables/checkpoint_audit.csv``.
AUDIT_COLUMNS = ["size", "seed", "step", "model", "revision", "revision_commit", "weights_sha256",
                 "hub_weights_sha256", "hub_weights_bytes", "duplicate", "duplicate_of"]


def duplicates(shas: Mapping[int, str]) -> dict[int, list[int]]:
    """For each step, the other steps whose weights have the same sha256 (empty if none)."""
    by_sha: dict[str, list[int]] = defaultdict(list)
    for step, sha in shas.items():
        by_sha[sha].append(step)
    return {step: sorted(s for s in by_sha[sha] if s != step) for step, sha in shas.items()}


def duplicate_flag(stores: Mapping[int, xr.Dataset]) -> xr.DataArray:
    """Boolean ``flag_duplicate`` over ``step``: the step's weights equal another step's."""
    steps = sorted(stores)
    dups = duplicates({s: str(stores[s].attrs.get("weights_sha256", f"unknown-{s}"))
                       for s in steps})
    return xr.DataArray(np.array([bool(dups[s]) for s in steps]), dims=("step",),
                        coords={"step": np.array(steps, dtype=np.int64)},
                        attrs={"long_name": "weights byte-identical to another step's"})


def audit_table(attrs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per store (attrs of per-pair stores), duplicates found within each (size,
    seed): the revisions of one training run."""
    rows = [{**{c: a.get(c) for c in AUDIT_COLUMNS[:9]}, "seed": int(a.get("seed", 0))}
            for a in attrs]
    table = pd.DataFrame(rows, columns=AUDIT_COLUMNS[:9])
    table["duplicate"], table["duplicate_of"] = False, ""
    for _, grp in table.groupby(["size", "seed"], sort=False):
        dups = duplicates(dict(zip(grp.step, grp.weights_sha256, strict=True)))
        for idx, step in zip(grp.index, grp.step, strict=True):
            table.loc[idx, "duplicate"] = bool(dups[step])
            table.loc[idx, "duplicate_of"] = " ".join(f"step{s}" for s in dups[step])
    return table.sort_values(["size", "seed", "step"], kind="stable").reset_index(drop=True)


def write_audit(stores: Sequence[Path | str], out_csv: Path | str) -> pd.DataFrame:
    """Read the attrs of per-pair stores and write the audit CSV; returns the table."""
    table = audit_table([open_store(p, defer=("activations",)).attrs for p in stores])
    write_text_atomic(table.to_csv(index=False), out_csv)
    return table

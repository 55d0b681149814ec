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

The content audit (:func:`content_audit`) goes further, per run (size, seed): it compares the
sha256 of every tensor (attr ``tensor_sha256``, written by the extraction) across the steps,
so a revision that serves part of another step's weights is named per tensor (Pythia #206),
and checks each revision's place on the run's trajectory from the distance and cosine
statistics the extraction computes per matrix (:func:`trajectory_findings`). Its findings and
the pre-flight hub audit's go to ``tables/defective.csv`` (:mod:`lmdynamics.defects`).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.store import open_store, write_text_atomic

log = logging.getLogger(__name__)

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


# --- content audit: per-tensor digests and trajectories across the steps of a run -----------

#: Columns of ``tables/tensor_audit.csv``: one row per (revision, tensor) whose bytes equal
#: the same tensor of other steps of the run.
TENSOR_COLUMNS = ["size", "seed", "step", "tensor", "equal_to"]
#: The per-matrix statistics of the trajectory check (``stat_param``, Conjecture statistics):
#: cosine to the initialisation and to the final weights, and the relative distance from the
#: initialisation.
TRAJECTORY_STATS = ("cos_init", "cos_final", "rel_dist_init")


@dataclass(frozen=True)
class RevisionFacts:
    """What the content audit reads of one per-pair store: its (size, seed, step), the
    digests of its tensors (attr ``tensor_sha256``) and, when the Conjecture statistics were
    computed, :data:`TRAJECTORY_STATS` per 2-D weight matrix (stat -> matrix -> value)."""

    size: str
    seed: int
    step: int
    tensors: Mapping[str, str]
    trajectory: Mapping[str, Mapping[str, float]] | None = None


def revision_facts(path: Path | str) -> RevisionFacts:
    """Read :class:`RevisionFacts` from a per-pair store (verified, activations not read)."""
    ds = open_store(path, defer=("activations",))
    trajectory = None
    if "stat_param" in ds and "matrix" in ds.coords:
        names = [f"{m}.weight" for m in ds["matrix"].to_numpy().tolist()]
        names = [n for n in names if n in set(ds["param"].to_numpy().tolist())]
        values = ds["stat_param"].sel(param=names)
        trajectory = {stat: dict(zip(names, values.sel(param_stat=stat).to_numpy().astype(
            float).tolist(), strict=True)) for stat in TRAJECTORY_STATS
            if stat in ds["param_stat"].to_numpy().tolist()}
    return RevisionFacts(str(ds.attrs["size"]), int(ds.attrs.get("seed", 0)),
                         int(ds.attrs["step"]), dict(ds.attrs.get("tensor_sha256") or {}),
                         trajectory)


def tensor_equalities(run: Mapping[int, Mapping[str, str]]) -> dict[int, dict[str, list[int]]]:
    """step -> tensor -> the other steps whose tensor of that name has the same digest."""
    by_digest: dict[tuple[str, str], list[int]] = defaultdict(list)
    for step, tensors in run.items():
        for name, digest in tensors.items():
            by_digest[(name, digest)].append(step)
    return {step: {name: sorted(s for s in by_digest[(name, digest)] if s != step)
                   for name, digest in tensors.items() if len(by_digest[(name, digest)]) > 1}
            for step, tensors in run.items()}


def _names(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def digest_findings(run: Mapping[int, Mapping[str, str]],
                    final_step: int) -> dict[int, tuple[str, str, str]]:
    """step -> (kind, detail, evidence) from the tensor digests of one run (step -> tensor ->
    digest). A revision all of whose tensors are another step's is ``same_as_final``,
    ``same_as_step0`` (a non-zero step) or ``shared_content``; one some of whose tensors are
    is ``tensors_equal`` (Pythia #206: the final checkpoint's first shard), named per tensor.
    The final step is the reference and is never flagged; step 0 only when it repeats the
    final step or shares tensors with it."""
    equal = tensor_equalities(run)
    out: dict[int, tuple[str, str, str]] = {}
    for step in sorted(run):
        if step == final_step or not equal[step]:
            continue
        n = len(run[step])
        per_other: dict[int, list[str]] = defaultdict(list)
        for name, others in equal[step].items():
            for other in others:
                per_other[other].append(name)
        whole = [o for o, names in per_other.items() if len(names) == n == len(run[o])]
        evidence = "; ".join(f"{len(names)} of {n} tensors equal step {o}'s"
                             for o, names in sorted(per_other.items()))
        if final_step in whole:
            out[step] = ("same_as_final", f"every tensor equals the final step {final_step}'s",
                         evidence)
        elif step != 0 and 0 in whole:
            out[step] = ("same_as_step0", "every tensor equals step 0's", evidence)
        elif whole and step != 0:
            out[step] = ("shared_content", "every tensor equals that of step(s) "
                         f"{', '.join(map(str, sorted(whole)))}", evidence)
        elif step == 0 and final_step not in per_other:
            continue  # the initialisation, repeated by later steps: they are flagged
        elif not whole:
            other = final_step if final_step in per_other else max(
                per_other, key=lambda o: len(per_other[o]))
            names = sorted(per_other[other])
            out[step] = ("tensors_equal", f"tensors equal to step {other}'s byte for byte: "
                         f"{_names(names)}", evidence)
    return out


def trajectory_excess(values: Mapping[int, float]) -> dict[int, float]:
    """step -> how far a statistic lies outside the range of its two neighbours' (0 when
    between them); the first and last steps have one neighbour and are not scored."""
    steps = sorted(values)
    out = {}
    for left, step, right in zip(steps, steps[1:], steps[2:], strict=False):
        lo, hi = sorted((values[left], values[right]))
        v = values[step]
        out[step] = max(0.0, v - hi, lo - v)
    return out


def trajectory_findings(run: Mapping[int, Mapping[str, Mapping[str, float]]],
                        tolerance: float) -> dict[int, tuple[str, str]]:
    """step -> (detail, evidence) of the revisions that break the run's trend.

    ``run``: step -> :data:`TRAJECTORY_STATS` -> matrix -> value, for the steps still
    trusted (those other findings flagged are left out, so a genuine step is never judged
    against a defective neighbour). For each matrix and statistic, a step's *excess* is how
    far its value lies outside the range spanned by its two neighbouring steps' values
    (:func:`trajectory_excess`; ``rel_dist_init`` divided by its largest value over the run,
    so all three are on the scale of their whole trajectory): in training, cosine to the
    initialisation falls, cosine to the final weights rises and the distance from the
    initialisation grows, so a genuine revision lies
    between its neighbours up to noise. A step's score is the median over matrices of its
    largest excess. The step with the largest score above ``tolerance``
    (``audit.trajectory_tolerance``) is flagged and left out, and the scores are taken again
    over the remaining steps, until none exceeds it: a misplaced revision does not drag its
    genuine neighbours with it.
    """
    trusted = dict(run)
    out: dict[int, tuple[str, str]] = {}
    while True:
        scores = _trajectory_scores(trusted)
        if not scores:
            return out
        step, (median, entries, neighbours) = max(scores.items(), key=lambda kv: kv[1][0])
        if median <= tolerance:
            return out
        excess, matrix, stat = max(entries)
        left, right = neighbours
        out[step] = ("its weights break the run's trajectory between steps "
                     f"{left} and {right}",
                     f"median over {len(entries)} matrices of the excess outside the "
                     f"neighbours' range {median:.3f} > tolerance {tolerance:g}; largest: "
                     f"{matrix} {stat} {trusted[step][stat][matrix]:.4f} against "
                     f"{trusted[left][stat][matrix]:.4f} and "
                     f"{trusted[right][stat][matrix]:.4f}")
        del trusted[step]


def _trajectory_scores(run: Mapping[int, Mapping[str, Mapping[str, float]]]
                       ) -> dict[int, tuple[float, list[tuple[float, str, str]],
                                        tuple[int, int]]]:
    """step -> (median over matrices of the largest excess, [(excess, matrix, stat)], its
    neighbours) over the steps of ``run`` (:func:`trajectory_findings`)."""
    steps = sorted(run)
    if len(steps) < 3:
        return {}
    matrices = sorted(set.intersection(*(set(run[s].get("cos_final", {})) for s in steps)))
    entries: dict[int, list[tuple[float, str, str]]] = defaultdict(list)
    for matrix in matrices:
        worst: dict[int, tuple[float, str]] = {}
        for stat in TRAJECTORY_STATS:
            values = {s: run[s][stat][matrix] for s in steps if stat in run[s]}
            if len(values) < 3 or not all(np.isfinite(v) for v in values.values()):
                continue
            scale = max(max(abs(v) for v in values.values()), 1e-12) \
                if stat == "rel_dist_init" else 1.0
            for step, excess in trajectory_excess(values).items():
                excess /= scale
                if excess > worst.get(step, (-1.0, ""))[0]:
                    worst[step] = (excess, stat)
        for step, (excess, stat) in worst.items():
            entries[step].append((excess, matrix, stat))
    return {step: (float(np.median([e for e, _, _ in found])), found,
                   (steps[steps.index(step) - 1], steps[steps.index(step) + 1]))
            for step, found in entries.items()}


def content_audit(facts: Sequence[RevisionFacts], final_step: int, tolerance: float,
                  flagged_before: Iterable[tuple[str, int, int]] = ()) -> tuple[
                      pd.DataFrame, list[dict]]:
    """(``tables/tensor_audit.csv``, rows of ``tables/defective.csv``) of per-pair store
    facts: per run (size, seed), :func:`digest_findings`, then :func:`trajectory_findings`
    over the steps neither they nor ``flagged_before`` (the hub audit's) flagged."""
    runs: dict[tuple[str, int], dict[int, RevisionFacts]] = defaultdict(dict)
    for f in facts:
        runs[(f.size, f.seed)][f.step] = f
    earlier = set(flagged_before)
    tensor_rows, rows = [], []
    for (size, seed), run in sorted(runs.items()):
        digests = {s: f.tensors for s, f in run.items() if f.tensors}
        for step, names in sorted(tensor_equalities(digests).items()):
            tensor_rows += [{"size": size, "seed": seed, "step": step, "tensor": name,
                             "equal_to": ";".join(f"step{o}" for o in others)}
                            for name, others in sorted(names.items())]
        found = digest_findings(digests, final_step) if digests else {}
        for step, (kind, detail, evidence) in found.items():
            rows.append({"size": size, "seed": seed, "step": step, "audit": "content",
                         "kind": kind, "detail": detail, "evidence": evidence, "source": ""})
        trusted = {s: f.trajectory for s, f in run.items() if f.trajectory
                   and s not in found and (size, seed, s) not in earlier}
        for step, (detail, evidence) in trajectory_findings(trusted, tolerance).items():
            rows.append({"size": size, "seed": seed, "step": step, "audit": "content",
                         "kind": "trajectory", "detail": detail, "evidence": evidence,
                         "source": ""})
        if not any(f.trajectory for f in run.values()):
            log.info("%s seed %d: no Conjecture statistics in the stores (conjecture.enabled "
                     "false): no trajectory check", size, seed)
    return pd.DataFrame(tensor_rows, columns=TENSOR_COLUMNS), rows

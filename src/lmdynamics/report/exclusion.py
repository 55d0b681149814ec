"""Defective revisions in the report: left out of Table 1, the sensitivity figure and the
figures' statistics, drawn hollow, and listed (config ``audit.defective``).

``tables/defective.csv`` (:mod:`lmdynamics.defects`) lists every (size, seed, step) the audits
flagged. With ``audit.defective: exclude`` (the default):

- **Table 1** (:func:`table_without`) is computed as usual wherever the early and the final
  step of a run are trusted: the other steps do not enter it. Where the early step of a run is
  flagged, the nearest trusted analysed step at or before it is used instead (its row's
  ``early_step`` says which; a footnote says why); where there is none, or the final step
  itself is flagged, the run's cells are undefined, with the reason.
- **The sensitivity figure** (:func:`grid_without`) follows the same rule per run.
- **Figures 1-5 and the Conjecture figures** (:func:`mark_dataset`) get a boolean
  ``excluded`` (size, step), true where any seed's revision is flagged: their lines and bands
  leave those steps out and draw them as hollow markers, with a legend entry.

With ``mark`` everything is computed as if nothing were flagged, and the flagged revisions
are still drawn hollow and listed. Every output lists each flagged (size, seed, step) and why
(:func:`footnotes`, :func:`figure_note`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.defects import check_policy, flagged
from lmdynamics.report.tables import (
    SENSITIVITY_CKA,
    SENSITIVITY_PER,
    MCCOptions,
    combine_run_grids,
    early_step,
    final_step,
    mcc_table,
    replicates,
    run_grid,
)
from lmdynamics.store import write_text_atomic

#: Columns of Table 1 that are counts of layers, not results: zero in an undefined row.
COUNT_COLUMNS = ("n_layers", "n_early", "n_large", "n_both", "n_relabellings")


def _seeds(ds: xr.Dataset) -> list[int]:
    return [int(s) for s in ds["seed"].to_numpy()] if "seed" in ds.dims else [0]


def excluded_array(ds: xr.Dataset, defects: pd.DataFrame) -> xr.DataArray:
    """Boolean (size, seed, step) over ``ds``'s coordinates: the flagged revisions (a dataset
    without ``seed`` counts as seed 0)."""
    sizes = [str(s) for s in ds["size"].to_numpy()]
    seeds, steps = _seeds(ds), [int(s) for s in ds["step"].to_numpy()]
    mask = np.zeros((len(sizes), len(seeds), len(steps)), dtype=bool)
    for size, seed, step in flagged(defects):
        if size in sizes and seed in seeds and step in steps:
            mask[sizes.index(size), seeds.index(seed), steps.index(step)] = True
    return xr.DataArray(mask, dims=("size", "seed", "step"),
                        coords={"size": ds["size"].to_numpy(), "seed": seeds,
                                "step": ds["step"].to_numpy()})


def mark_dataset(ds: xr.Dataset, defects: pd.DataFrame, policy: str) -> xr.Dataset:
    """``ds`` (metrics or statistics) with ``excluded`` (size, step): true where a seed's
    revision is flagged; attrs ``audit_policy`` (``exclude`` leaves those steps out of the
    drawn statistics, ``mark`` and ``fail`` only mark them) and ``audit_note``."""
    check_policy(policy)
    mask = excluded_array(ds, defects).any("seed")
    out = ds.assign(excluded=mask.assign_attrs(
        description="revision flagged by the checkpoint audits (tables/defective.csv)"))
    out.attrs["audit_policy"] = policy
    out.attrs["audit_note"] = figure_note(ds, defects, policy)
    return out


@dataclasses.dataclass(frozen=True)
class EarlyStep:
    """The early step of one run: the configured one, the one used (None: undefined) and,
    when they differ, why."""

    configured: int
    used: int | None
    reason: str = ""


def early_steps(ds: xr.Dataset, defects: pd.DataFrame,
                options: MCCOptions) -> dict[tuple[str, int], EarlyStep]:
    """Per run (size, seed) whose early or final step is flagged: the early step Table 1 uses
    instead (the latest trusted analysed step at or before the configured one) or none."""
    last = final_step(ds)
    steps = [int(s) for s in ds["step"].to_numpy()]
    configured = early_step(np.array(steps), last, options.early_fraction, options.early_step)
    why = flagged(defects)
    out = {}
    for size in [str(s) for s in ds["size"].to_numpy()]:
        for seed in _seeds(ds):
            bad = {s for s in steps if (size, seed, s) in why}
            if last in bad:
                out[(size, seed)] = EarlyStep(configured, None, (
                    f"the final step {last}, the reference of CKA and PER, is flagged: "
                    f"{why[(size, seed, last)]}"))
            elif configured in bad:
                trusted = [s for s in steps if s <= configured and s not in bad]
                reason = f"early step {configured} is flagged: {why[(size, seed, configured)]}"
                out[(size, seed)] = EarlyStep(configured, max(trusted) if trusted else None,
                                              reason)
    return out


def _run(ds: xr.Dataset, size: str, seed: int, steps: list[int]) -> xr.Dataset:
    sub = ds.sel(size=[size], step=steps)
    return sub.sel(seed=[seed]) if "seed" in sub.dims else sub


def _at(options: MCCOptions, step: int, last: int) -> MCCOptions:
    """Options whose early step, over the steps (``step``, ``last``), is ``step``."""
    return dataclasses.replace(options, early_step="at_or_before",
                               early_fraction=max(step, 0.5) / last)


def table_without(ds: xr.Dataset, defects: pd.DataFrame, options: MCCOptions,
                  table: pd.DataFrame, policy: str
                  ) -> tuple[pd.DataFrame, dict[tuple[str, int], EarlyStep]]:
    """Table 1 (``table``, :func:`lmdynamics.report.tables.mcc_table` of ``ds``) with the
    flagged revisions left out (``policy`` ``exclude``; otherwise ``table`` as it is), and
    the runs whose early step changed (module docstring)."""
    check_policy(policy)
    if policy != "exclude" or defects.empty:
        return table, {}
    early = early_steps(ds, defects, options)
    last = final_step(ds)
    out = table.copy()
    for (size, seed), choice in early.items():
        rows = (out["size"].astype(str) == size) & (out["seed"].astype(int) == seed)
        if choice.used is not None:
            sub = mcc_table(_run(ds, size, seed, [choice.used, last]),
                            _at(options, choice.used, last))
            for column in sub.columns:
                out.loc[rows, column] = sub[column].to_numpy()
            continue
        for column in out.columns:
            if column in COUNT_COLUMNS:
                out.loc[rows, column] = 0
            elif column != "n_params" and pd.api.types.is_float_dtype(out[column]):
                out.loc[rows, column] = math.nan
        if "interval_spans_zero" in out:
            out.loc[rows, "interval_spans_zero"] = False
        if "verdict" in out:
            out.loc[rows, "verdict"] = "undefined"
        trusted = "no trusted analysed step at or before it" if not choice.reason.startswith(
            "the final") else "no trusted reference"
        out.loc[rows, "undefined_reason"] = f"undefined: {choice.reason}; {trusted}"
    out.attrs = table.attrs
    return out, early


def grid_without(ds: xr.Dataset, defects: pd.DataFrame, options: MCCOptions,
                 policy: str) -> xr.Dataset | None:
    """The sensitivity grids (:func:`lmdynamics.report.tables.mcc_grids`: MCC and p-value)
    with the flagged revisions left out as in :func:`table_without`: a run without a trusted
    early step counts as undefined at every threshold; None when nothing changes (``mark``,
    or no run's early or final step flagged)."""
    check_policy(policy)
    early = early_steps(ds, defects, options) if policy == "exclude" else {}
    if not early:
        return None
    last = final_step(ds)
    steps = [int(s) for s in ds["step"].to_numpy()]
    sizes = []
    for size in [str(s) for s in ds["size"].to_numpy()]:
        runs = []
        for seed in _seeds(ds):
            choice = early.get((size, seed))
            if choice is not None and choice.used is not None:
                run, run_options = (_run(ds, size, seed, [choice.used, last]),
                                    _at(options, choice.used, last))
            else:
                run, run_options = _run(ds, size, seed, steps), options
            ((_, one),) = replicates(run)
            values, counts, used = run_grid(one, run_options, SENSITIVITY_CKA, SENSITIVITY_PER)
            if choice is not None and choice.used is None:
                values, counts = np.full_like(values, np.nan), np.zeros_like(counts)
            runs.append((values, counts, used))
        sizes.append(combine_run_grids(runs, options))
    out = xr.concat(sizes, dim="size")
    for name in out.data_vars:
        out[name].attrs = {**dataclasses.asdict(options), "final_step": last}
    return out


def _listing(defects: pd.DataFrame, ds: xr.Dataset | None = None) -> list[str]:
    """One line per flagged (size, seed, step) of ``ds`` (all, without ``ds``) and why."""
    steps = None if ds is None else {int(s) for s in ds["step"].to_numpy()}
    sizes = None if ds is None else {str(s) for s in ds["size"].to_numpy()}
    return [f"{size} seed {seed} step {step}: {why}"
            for (size, seed, step), why in flagged(defects).items()
            if (steps is None or step in steps) and (sizes is None or size in sizes)]


def footnotes(ds: xr.Dataset, defects: pd.DataFrame, policy: str,
              early: Mapping[tuple[str, int], EarlyStep]) -> str:
    """Table 1's notes on the flagged revisions: each (size, seed, step) and why, whether
    they were left out, and which early step each affected run uses."""
    lines = _listing(defects, ds)
    if not lines:
        return ""
    counted = {"exclude": "left out of this table (audit.defective: exclude)",
               "mark": "counted in this table (audit.defective: mark)",
               "fail": "flagged (audit.defective: fail)"}[check_policy(policy)]
    text = [f"**Flagged revisions** ({len(lines)}, {counted}; tables/defective.csv):", ""]
    text += [f"- {line}" for line in lines]
    for (size, seed), choice in sorted(early.items()):
        if choice.used is None:
            text.append(f"- {size} seed {seed}: Table 1 is undefined: {choice.reason}")
        else:
            text.append(f"- {size} seed {seed}: {choice.reason}; Table 1 uses step "
                        f"{choice.used}, the nearest trusted analysed step at or before it")
    return "\n".join(text) + "\n"


def figure_note(ds: xr.Dataset, defects: pd.DataFrame, policy: str) -> str:
    """A figure's note on the flagged revisions of ``ds`` (empty when there are none)."""
    lines = _listing(defects, ds)
    if not lines:
        return ""
    how = "left out of the statistics, drawn hollow" if policy == "exclude" else \
        "drawn hollow (counted: audit.defective mark)"
    steps: dict[str, set[int]] = {}
    for size, _, step in (k for k in flagged(defects) if any(
            k[0] == str(s) for s in ds["size"].to_numpy())):
        steps.setdefault(size, set()).add(step)
    listed = "; ".join(f"{size}: steps {', '.join(map(str, sorted(s)))}"
                       for size, s in sorted(steps.items()))
    return f"flagged revisions ({how}; tables/defective.csv): {listed}"


def append_notes(md_path: Path | str, notes: str) -> None:
    """Append ``notes`` to Table 1's markdown (nothing when empty)."""
    if notes:
        path = Path(md_path)
        write_text_atomic(path.read_text(encoding="utf-8") + "\n" + notes, path)

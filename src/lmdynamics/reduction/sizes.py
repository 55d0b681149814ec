"""Across sizes and seeds: the one way the per-(size, seed) datasets (metrics and Conjecture
statistics) are loaded, checked for one configuration and stacked over ``seed`` and ``size``
dimensions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.store import open_store


def load_sizes(paths: Sequence[Path | str], *, required: Sequence[str],
               required_attrs: Sequence[str]) -> list[xr.Dataset]:
    """Per-size stores, loaded and ordered by parameter count (attr ``n_params``), not by the
    text of their labels; each must hold ``required`` variables and ``required_attrs``."""
    per_size = [open_store(p, required=tuple(required),
                           required_attrs=tuple(required_attrs)).load() for p in paths]
    per_size.sort(key=lambda d: d.attrs["n_params"])
    return per_size


def stack_seeds(datasets: Sequence[xr.Dataset], what: str) -> list[xr.Dataset]:
    """Group per-(size, seed) datasets by size and stack each group over a ``seed`` dimension.

    A dataset's replicate is its attr ``seed`` (0 when absent: stores written before seeds
    were a dimension). Every size must have the same seeds, each once: a missing replicate
    would make the across-seed mean of one size a mean over fewer runs than another's.
    Returns one dataset per size (seed first among the dims of every variable, ascending),
    in the order of ``datasets``, each with the attrs of its first replicate minus ``seed``.
    ``what`` names the datasets in messages (e.g. ``metrics``). ValueError on a duplicate
    (size, seed) or an incomplete grid.
    """
    groups: dict[str, dict[int, xr.Dataset]] = {}
    for d in datasets:
        size, seed = str(d.attrs["size"]), int(d.attrs.get("seed", 0))
        group = groups.setdefault(size, {})
        if seed in group:
            raise ValueError(f"two {what} datasets for size {size} seed {seed}; give each "
                             "(size, seed) once")
        group[seed] = d
    seeds = sorted({s for g in groups.values() for s in g})
    lacking = {size: sorted(set(seeds) - set(g)) for size, g in groups.items()}
    lacking = {size: missing for size, missing in lacking.items() if missing}
    if lacking:
        size, missing = next(iter(lacking.items()))
        raise ValueError(f"per-size {what} lack seed(s) {missing} of size {size} (seeds "
                         f"given: {seeds}); every size needs every seed: reduce the "
                         "missing replicates or drop them from seeds")
    out = []
    for group in groups.values():
        first = group[seeds[0]]
        stacked = xr.concat([group[s].drop_attrs(deep=False).expand_dims(seed=[s])
                             for s in seeds], dim="seed", join="exact",
                            combine_attrs="override")
        out.append(stacked.assign_attrs({k: v for k, v in first.attrs.items()
                                         if k != "seed"}))
    return out


def agreed_attrs(per_size: Sequence[xr.Dataset], keys: Sequence[str],
                 what: str) -> dict[str, Any]:
    """The attrs ``keys`` (those present) of per-size datasets that must all agree; ValueError
    naming the first key they disagree on (``what``: e.g. ``metrics``, for the message)."""
    shared = {}
    for key in keys:
        values = {repr(d.attrs.get(key)) for d in per_size}
        if len(values) != 1:
            raise ValueError(f"per-size {what} disagree on {key}: {sorted(values)}; rerun "
                             "the reductions with one configuration")
        if key in per_size[0].attrs:
            shared[key] = per_size[0].attrs[key]
    return shared


def stack_sizes(per_size: Sequence[xr.Dataset], sizes: Sequence[str]) -> xr.Dataset:
    """Concatenate datasets over a new ``size`` dimension labelled ``sizes``; what a size lacks
    (layers, steps, parameters) is NaN. The datasets' own attrs are dropped (the caller sets
    the combined ones); the variables keep those of the first size (e.g. ``description``)."""
    return xr.concat([d.drop_attrs(deep=False) for d in per_size],
                     dim=pd.Index(list(sizes), name="size"), join="outer",
                     combine_attrs="override", coords="minimal", compat="override",
                     fill_value=np.nan)

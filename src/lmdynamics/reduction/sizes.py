"""Across sizes: the one way the per-size datasets (metrics and Conjecture statistics) are
loaded, checked for one configuration and stacked over a ``size`` dimension."""

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

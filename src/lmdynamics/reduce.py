"""Reductions: per-pair stores -> per-size metrics -> one dataset across sizes.

Per size (``reduce_size``): linear CKA of each step's activations against the final step's,
and the proportional effective rank (PER) of the write matrices and their gradients, as
float64 arrays over (component, layer, step). Across sizes (``combine_sizes``): one dataset
over (size, component, layer, step), sizes ordered by parameter count, missing layers NaN.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.cka_reduce import CKAOptions, cka_dataset
from lmdynamics.metrics import per_divisor, proportional_effective_rank
from lmdynamics.store import (
    IncompleteStoreError,
    open_store,
    redo_hint,
    write_store,
    write_text_atomic,
)

log = logging.getLogger(__name__)

PAIR_VARIABLES = ("activations", "weight_singular_values", "grad_singular_values")
METRIC_VARIABLES = ("cka", "per_weight", "per_grad")
#: Attributes every per-size metrics store records and the combined one keeps (must agree).
SHARED_ATTRS = ("final_step", "per_divisor", "per_truncate", "bootstrap_samples",
                "bootstrap_level", "bootstrap_seed", "standardize")


def open_pair_stores(paths: Sequence[Path | str]) -> dict[int, xr.Dataset]:
    """Open per-pair stores keyed by step, checking completeness and required variables."""
    stores = {}
    for p in paths:
        ds = open_store(p, required=PAIR_VARIABLES)
        step = int(ds.attrs["step"])
        if step in stores:
            raise ValueError(f"two stores for step {step}: {p} and another")
        stores[step] = ds.assign_attrs(path=str(p))
    return dict(sorted(stores.items()))


def check_consistent(stores: dict[int, xr.Dataset], final_step: int) -> xr.Dataset:
    """Every store must match the final one in size, shapes and sampled token positions.

    Returns the final step's store. Raises :class:`IncompleteStoreError` naming the
    offending store and how to redo it.
    """
    if final_step not in stores:
        raise IncompleteStoreError(f"no store for the final step {final_step} among steps "
                                   f"{sorted(stores)}")
    ref = stores[final_step]
    for ds in stores.values():
        path = ds.attrs["path"]
        for attr in ("size", "num_layers", "hidden_size"):
            if ds.attrs.get(attr) != ref.attrs.get(attr):
                raise IncompleteStoreError(
                    f"{path}: attr {attr}={ds.attrs.get(attr)!r} differs from the final "
                    f"step's {ref.attrs.get(attr)!r}; {redo_hint(path)}")
        for var in PAIR_VARIABLES:
            if ds[var].shape != ref[var].shape:
                raise IncompleteStoreError(
                    f"{path}: {var} has shape {ds[var].shape}, the final step's store has "
                    f"{ref[var].shape}; {redo_hint(path)}")
        for coord in ("sequence", "position"):
            if not np.array_equal(ds[coord].values, ref[coord].values):
                raise IncompleteStoreError(
                    f"{path}: sampled token {coord}s differ from the final step's "
                    f"({ref.attrs['path']}), so CKA would compare different tokens; "
                    f"{redo_hint(path)}")
    return ref


def _per(ds: xr.Dataset, var: str, divisor_kind: str, truncate: bool = True) -> np.ndarray:
    sv = ds[var].values.astype(np.float64)  # (component, layer, k)
    n_comp, n_layers, k = sv.shape
    div = per_divisor(divisor_kind, n_singular_values=k, hidden_size=ds.attrs["hidden_size"],
                      num_attention_heads=ds.attrs["num_attention_heads"])
    return np.array([[proportional_effective_rank(sv[c, i], div, truncate=truncate)
                      for i in range(n_layers)] for c in range(n_comp)])


def reduce_size(paths: Sequence[Path | str], out: Path | str, *, final_step: int,
                per_divisor_kind: str = "min_dim", per_truncate: bool = True,
                cka_options: CKAOptions | None = None) -> xr.Dataset:
    """Reduce one size's per-pair stores into CKA and PER variables.

    ``cka`` (biased), ``cka_debiased``, ``per_weight``, ``per_grad`` have dims (component,
    layer, step), float64; ``cka_options`` adds bootstrap intervals, standardised variants
    (see :mod:`lmdynamics.cka_reduce`); ``cka_pairwise``/``cka_debiased_pairwise`` are over
    (component, layer, step, step_ref). The final step's centred activations and their
    self-products are computed once per (component, layer) and reused for every step. An
    undefined CKA (zero variance, non-finite input) is NaN and logged with size, step and
    layer. ``per_truncate``: keep only the top ``divisor`` singular values when there are
    more (the paper's code; see :func:`~lmdynamics.metrics.proportional_effective_rank`).
    """
    options = cka_options or CKAOptions()
    stores = open_pair_stores(paths)
    ref = check_consistent(stores, final_step)
    steps = list(stores)
    cka = cka_dataset({s: ds.activations for s, ds in stores.items()}, ref.sequence.values,
                      final_step=final_step, size=str(ref.attrs["size"]), options=options)
    per_w = np.stack([_per(stores[s], "weight_singular_values", per_divisor_kind, per_truncate)
                      for s in steps], axis=-1)
    per_g = np.stack([_per(stores[s], "grad_singular_values", per_divisor_kind, per_truncate)
                      for s in steps], axis=-1)
    dims = ("component", "layer", "step")
    ds = xr.Dataset(
        {"per_weight": (dims, per_w, {"long_name": "proportional effective rank of weights"}),
         "per_grad": (dims, per_g, {"long_name": "proportional effective rank of gradients"}),
         "eval_loss": (("step",), np.array([float(stores[s].loss) for s in steps]),
                       {"units": "nats/token"})},
        coords={"component": cka.component.values, "layer": cka.layer.values,
                "step": np.array(steps, dtype=np.int64)},
        attrs={"size": ref.attrs["size"], "n_params": int(ref.attrs["n_params"]),
               "num_layers": int(ref.sizes["layer"]),
               "hidden_size": int(ref.attrs["hidden_size"]), "final_step": int(final_step),
               "per_divisor": per_divisor_kind, "per_truncate": bool(per_truncate),
               "model": ref.attrs["model"]},
    )
    ds = xr.merge([cka, ds], combine_attrs="no_conflicts")
    ds = ds[["cka", *sorted(v for v in map(str, ds.data_vars) if v != "cka")]]
    write_store(ds, out)
    log.info("reduced %d steps of size %s into %s", len(steps), ref.attrs["size"], out)
    return ds


def combine_sizes(paths: Sequence[Path | str]) -> xr.Dataset:
    """Stack per-size metrics into dims (size, component, layer, step).

    Sizes are ordered by parameter count (not by label text); layers a size lacks are NaN.
    """
    per_size = [open_store(p, required=METRIC_VARIABLES).load() for p in paths]
    per_size.sort(key=lambda d: d.attrs["n_params"])
    shared = {}
    for key in SHARED_ATTRS:
        values = {repr(d.attrs.get(key)) for d in per_size}
        if len(values) != 1:
            raise ValueError(f"per-size metrics disagree on {key}: {sorted(values)}; rerun "
                             "the reductions with one configuration")
        if key in per_size[0].attrs:
            shared[key] = per_size[0].attrs[key]
    sizes = [d.attrs["size"] for d in per_size]
    combined = xr.concat(
        [d.drop_attrs() for d in per_size], dim=pd.Index(sizes, name="size"), join="outer",
        combine_attrs="drop", coords="minimal", compat="override", fill_value=np.nan)
    combined = combined.assign_coords(
        size=np.array(sizes, dtype=object),
        n_params=("size", np.array([d.attrs["n_params"] for d in per_size], dtype=np.int64)),
        num_layers=("size", np.array([d.attrs["num_layers"] for d in per_size])))
    combined.attrs = shared
    return combined


def tidy_metrics(ds: xr.Dataset) -> pd.DataFrame:
    """Long-form table: (size, component, layer, step, cka, per_weight, per_grad, ...).

    Every variable over exactly (size, component, layer, step) becomes a column, the
    :data:`METRIC_VARIABLES` first (e.g. ``cka_debiased``, ``cka_low`` follow).
    """
    dims = {"size", "component", "layer", "step"}
    extra = sorted(str(v) for v in ds.data_vars
                   if set(ds[v].dims) == dims and v not in METRIC_VARIABLES)
    columns = [*METRIC_VARIABLES, *extra]
    df = ds[columns].to_dataframe().reset_index()
    df = df.dropna(subset=columns, how="all")
    return df[["size", "component", "layer", "step", *columns]]


def write_combined(paths: Sequence[Path | str], out_zarr: Path | str,
                   out_csv: Path | str) -> xr.Dataset:
    """Combine per-size metrics and write ``metrics.zarr`` and the tidy ``metrics.csv``."""
    ds = combine_sizes(paths)
    write_store(ds, out_zarr)
    write_text_atomic(tidy_metrics(ds).to_csv(index=False), out_csv)
    return ds

"""Reductions: per-pair stores -> per-size metrics -> one dataset across sizes.

Per size (``reduce_size``): linear CKA of each step's activations against the final step's,
and the proportional effective rank (PER) of the write matrices and their gradients, as
float64 arrays over (component, layer, step). Across sizes (``combine_sizes``): one dataset
over (size, component, layer, step), sizes ordered by parameter count, missing layers NaN.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.audit import duplicate_flag, flags
from lmdynamics.metrics import (
    CKAReference,
    linear_cka_to_reference,
    per_divisor,
    proportional_effective_rank,
)
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


def _per(ds: xr.Dataset, var: str, divisor_kind: str) -> np.ndarray:
    sv = ds[var].values.astype(np.float64)  # (component, layer, k)
    n_comp, n_layers, k = sv.shape
    div = per_divisor(divisor_kind, n_singular_values=k, hidden_size=ds.attrs["hidden_size"],
                      num_attention_heads=ds.attrs["num_attention_heads"])
    return np.array([[proportional_effective_rank(sv[c, i], div) for i in range(n_layers)]
                     for c in range(n_comp)])


def reduce_size(paths: Sequence[Path | str], out: Path | str, *, final_step: int,
                per_divisor_kind: str = "min_dim") -> xr.Dataset:
    """Reduce one size's per-pair stores into ``cka``, ``per_weight``, ``per_grad``.

    Each output variable has dims (component, layer, step), float64. The final step's
    centred activations and their self-product are computed once per (component, layer)
    and reused for every step. A CKA that is undefined (zero variance, non-finite input)
    is NaN and logged with size, step and layer.
    """
    stores = open_pair_stores(paths)
    ref = check_consistent(stores, final_step)
    steps = list(stores)
    components = [str(c) for c in ref.component.values]
    n_layers = ref.sizes["layer"]
    cka = np.full((len(components), n_layers, len(steps)), np.nan)
    for ci, comp in enumerate(components):
        for layer in range(n_layers):
            reference = CKAReference.from_activations(
                ref.activations.isel(component=ci, layer=layer).values)
            for si, step in enumerate(steps):
                x = stores[step].activations.isel(component=ci, layer=layer).values
                value = linear_cka_to_reference(x, reference)
                if not np.isfinite(value):
                    msg = (f"CKA undefined (zero variance or non-finite activations) for size "
                           f"{ref.attrs['size']} step {step} {comp} layer {layer}")
                    log.warning(msg)
                    warnings.warn(msg, RuntimeWarning, stacklevel=2)
                cka[ci, layer, si] = value
    per_w = np.stack([_per(stores[s], "weight_singular_values", per_divisor_kind)
                      for s in steps], axis=-1)
    per_g = np.stack([_per(stores[s], "grad_singular_values", per_divisor_kind)
                      for s in steps], axis=-1)
    dims = ("component", "layer", "step")
    ds = xr.Dataset(
        {"cka": (dims, cka, {"long_name": "linear CKA vs final step"}),
         "per_weight": (dims, per_w, {"long_name": "proportional effective rank of weights"}),
         "per_grad": (dims, per_g, {"long_name": "proportional effective rank of gradients"}),
         "eval_loss": (("step",), np.array([float(stores[s].loss) for s in steps]),
                       {"units": "nats/token"})},
        coords={"component": np.array(components, dtype=object),
                "layer": np.arange(n_layers), "step": np.array(steps, dtype=np.int64)},
        attrs={"size": ref.attrs["size"], "n_params": int(ref.attrs["n_params"]),
               "num_layers": int(n_layers), "hidden_size": int(ref.attrs["hidden_size"]),
               "final_step": int(final_step), "per_divisor": per_divisor_kind,
               "model": ref.attrs["model"]},
    )
    ds["flag_duplicate"] = duplicate_flag(stores)
    write_store(ds, out)
    log.info("reduced %d steps of size %s into %s", len(steps), ref.attrs["size"], out)
    return ds


def combine_sizes(paths: Sequence[Path | str]) -> xr.Dataset:
    """Stack per-size metrics into dims (size, component, layer, step).

    Sizes are ordered by parameter count (not by label text); layers a size lacks are NaN.
    """
    per_size = [open_store(p, required=METRIC_VARIABLES).load() for p in paths]
    per_size.sort(key=lambda d: d.attrs["n_params"])
    finals = {d.attrs["final_step"] for d in per_size}
    divisors = {d.attrs["per_divisor"] for d in per_size}
    if len(finals) != 1 or len(divisors) != 1:
        raise ValueError(f"per-size metrics disagree on final_step {finals} or per_divisor "
                         f"{divisors}; rerun the reductions with one configuration")
    sizes = [d.attrs["size"] for d in per_size]
    combined = xr.concat(
        [d.drop_attrs() for d in per_size], dim=pd.Index(sizes, name="size"), join="outer",
        combine_attrs="drop", coords="minimal", compat="override", fill_value=np.nan)
    combined = combined.assign_coords(
        size=np.array(sizes, dtype=object),
        n_params=("size", np.array([d.attrs["n_params"] for d in per_size], dtype=np.int64)),
        num_layers=("size", np.array([d.attrs["num_layers"] for d in per_size])))
    combined.attrs = {"final_step": finals.pop(), "per_divisor": divisors.pop()}
    return combined


def tidy_metrics(ds: xr.Dataset) -> pd.DataFrame:
    """Long-form table (size, component, layer, step, cka, per_weight, per_grad)."""
    df = ds[list(METRIC_VARIABLES)].to_dataframe().reset_index()
    df = df.dropna(subset=list(METRIC_VARIABLES), how="all")
    return df[["size", "component", "layer", "step", *METRIC_VARIABLES]]


def write_combined(paths: Sequence[Path | str], out_zarr: Path | str,
                   out_csv: Path | str) -> xr.Dataset:
    """Combine per-size metrics and write ``metrics.zarr`` and the tidy ``metrics.csv``."""
    ds = flags(combine_sizes(paths))
    write_store(ds, out_zarr)
    write_text_atomic(tidy_metrics(ds).to_csv(index=False), out_csv)
    return ds

"""Flags on checkpoints: booleans that mark a (size, step) whose metrics need a second look.

Every flag is a boolean variable whose name starts with :data:`FLAG_PREFIX`:

- per size (``metrics/<size>.zarr``): any dims that include ``step``, e.g. ``flag_nonfinite``
  (component, layer, step): NaN or inf in that layer's activations, write matrix or gradient,
  as recorded by the extraction (``nonfinite_*`` in the per-pair store);
- combined (``metrics.zarr``): each flag reduced to (size, step) (any over the other dims),
  and ``flagged`` (size, step), the OR of every flag, which Figure 2 marks on its x axis.

Flags added later (e.g. ``flag_duplicate`` for byte-identical hub revisions) need no change
here: :func:`split_flags`, :func:`stack_flags` and :func:`set_flagged` handle every
``flag_*`` variable alike.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

log = logging.getLogger(__name__)

FLAG_PREFIX = "flag_"
#: Per-pair store variables (component, layer) written by the extraction.
NONFINITE_VARIABLES = ("nonfinite_activations", "nonfinite_weights", "nonfinite_grads")


def nonfinite_layers(ds: xr.Dataset, activations: np.ndarray | None = None) -> np.ndarray:
    """Boolean (component, layer): NaN or inf in a per-pair store ``ds``.

    Computed from the data, not taken from the store's word: non-finite sampled activations
    (``activations``, (component, layer), when the caller already looked at every value;
    else read here one (component, layer) at a time) or singular values (NaN when the matrix
    or its gradient was not finite), OR the store's recorded ``nonfinite_*`` variables (the
    whole batch's activations, which the sampled tokens may miss).
    """
    if activations is None:
        acts = ds["activations"]
        activations = np.array([[not np.isfinite(acts[c, layer].values).all()
                                 for layer in range(acts.shape[1])]
                                for c in range(acts.shape[0])], dtype=bool)
    flags = np.array(activations, dtype=bool)
    for name in ("weight_singular_values", "grad_singular_values"):
        flags |= ~np.isfinite(ds[name].values).all(axis=2)
    for name in NONFINITE_VARIABLES:
        if name in ds:
            flags |= ds[name].values.astype(bool)
    return flags


def flag_nonfinite(stores: Mapping[int, xr.Dataset],
                   activations: Mapping[int, np.ndarray] | None = None) -> np.ndarray:
    """Boolean (component, layer, step) over the per-pair ``stores`` (step -> store, in order).

    ``activations``: step -> (component, layer) non-finite sampled activations, when the
    caller computed them (:func:`nonfinite_layers`). Warns once per flagged (step,
    component, layer), naming size, step, component, layer and the store, so a diverged
    checkpoint never passes silently.
    """
    flags = np.stack([nonfinite_layers(ds, None if activations is None else activations[s])
                      for s, ds in stores.items()], axis=-1)
    for (step, ds), layer_flags in zip(stores.items(), np.moveaxis(flags, -1, 0), strict=True):
        for ci, layer in zip(*np.nonzero(layer_flags), strict=True):
            warn(f"non-finite values (NaN or inf) recorded for size {ds.attrs.get('size')} "
                 f"step {step} {ds.component.values[ci]} layer {layer} "
                 f"({ds.attrs.get('path', 'store')}); its metrics are NaN where computed "
                 "from them and the step is flagged (flag_nonfinite)")
    return flags


def warn(message: str) -> None:
    """Log ``message`` as a warning and issue it as a :class:`RuntimeWarning`."""
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def warn_nan_metrics(ds: xr.Dataset, variables: Sequence[str]) -> None:
    """Warn for every NaN of ``variables`` (component, layer, step) of one size's metrics."""
    for var in variables:
        values = ds[var].transpose("component", "layer", "step").values
        for ci, layer, si in zip(*np.nonzero(np.isnan(values)), strict=True):
            warn(f"{var} is NaN (undefined) for size {ds.attrs.get('size')} step "
                 f"{int(ds.step.values[si])} {ds.component.values[ci]} layer {layer}")


def split_flags(ds: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset]:
    """Split one size's metrics into (metrics without flags, flags reduced to dims (step,))."""
    names = [str(v) for v in ds.data_vars if str(v).startswith(FLAG_PREFIX)]
    flags = xr.Dataset({name: ds[name].astype(bool).any(
        dim=[d for d in ds[name].dims if d != "step"]) for name in names})
    return ds.drop_vars(names), flags


def stack_flags(flags: Sequence[xr.Dataset], sizes: Sequence[str]) -> xr.Dataset:
    """Stack per-size flags (step,) into (size, step); a flag a size lacks is False."""
    names = sorted({str(v) for f in flags for v in f.data_vars})
    out = {}
    for name in names:
        parts = [f[name] if name in f else xr.DataArray(False) for f in flags]
        stacked = xr.concat(parts, dim="size", join="outer", fill_value=False)
        out[name] = stacked.astype(bool).assign_coords(size=np.array(sizes, dtype=object))
    return xr.Dataset(out)


def set_flagged(ds: xr.Dataset) -> xr.Dataset:
    """Add ``flagged`` (size, step) = OR of every ``flag_*`` variable, unless already set.

    Each flag is first reduced to (size, step) (any over other dims); with no flags at all,
    ``flagged`` is all False.
    """
    if "flagged" in ds:
        return ds
    flagged = xr.zeros_like(ds["step"], dtype=bool).expand_dims(size=ds["size"].values)
    for name in ds.data_vars:
        if str(name).startswith(FLAG_PREFIX):
            da = ds[name].astype(bool)
            flagged = flagged | da.any(dim=[d for d in da.dims if d not in ("size", "step")])
    return ds.assign(flagged=flagged.transpose("size", "step").assign_attrs(
        description="checkpoint flagged by any flag_* variable"))

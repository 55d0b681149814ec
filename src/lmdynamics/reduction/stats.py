"""Conjecture statistics: per-pair stores -> per-(size, seed) stacks -> one dataset across
sizes and seeds.

Per size and seed replicate (:func:`reduce_stats`): the ``stat_*`` variables of every step's
per-pair store stacked along ``step``. Across sizes and seeds (:func:`combine_stats`): one
dataset over ``size`` (ordered by parameter count) and ``seed``; parameters, matrices,
layers and singular values a size lacks are NaN; coordinates ``param_layer``/
``param_module``/``param_kind`` (and ``matrix_*``) say where each parameter sits.
Layouts: ``docs/architecture.md``, "Conjecture statistics".
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics import families
from lmdynamics.extraction.names import param_parts, param_sort_key
from lmdynamics.reduction.sizes import agreed_attrs, load_sizes, stack_seeds, stack_sizes
from lmdynamics.store import IncompleteStoreError, open_store, redo_hint, write_store

log = logging.getLogger(__name__)

#: The ``stat_*`` variables every per-pair store written with statistics holds.
STAT_VARIABLES: tuple[str, ...] = (
    "stat_param", "stat_weight", "stat_weight_quantile", "stat_grad", "stat_grad_quantile",
    "stat_act", "stat_act_quantile", "stat_resid_max_abs", "stat_spectrum",
    "stat_spectrum_slope", "stat_direction_closeness", "stat_embedding_corr")
_SIZE_ATTRS = ("size", "n_params", "num_layers", "hidden_size", "num_attention_heads", "model",
               "family")


def _open_with_stats(path: Path | str) -> xr.Dataset:
    """A per-pair store's ``stat_*`` variables, refusing a store written without them."""
    ds = open_store(path, required_attrs=("step", *_SIZE_ATTRS[:4]),
                    defer=("activations",))  # not read here: its content is not checked
    missing = [v for v in STAT_VARIABLES if v not in ds]
    if missing:
        raise IncompleteStoreError(
            f"{path} has no Conjecture statistics ({', '.join(missing[:3])}...): it was "
            f"extracted with conjecture.enabled false or by an older version; "
            f"{redo_hint(path)}")
    return ds[list(STAT_VARIABLES)].assign_attrs(ds.attrs)


def reduce_stats(paths: Sequence[Path | str], out: Path | str, *,
                 final_step: int) -> xr.Dataset:
    """Stack one size's per-pair statistics along ``step`` (ascending) and write ``out``.

    Every store must be of the same size and hold the same parameters; the final step's
    store must be among them. Raises :class:`IncompleteStoreError` naming the store.
    """
    stores: dict[int, xr.Dataset] = {}
    for p in paths:
        ds = _open_with_stats(p)
        step = int(ds.attrs["step"])
        if step in stores:
            raise IncompleteStoreError(f"two stores for step {step}: {stores[step].attrs['path']} "
                                       f"and {p}; {redo_hint(p)}")
        stores[step] = ds.assign_attrs(path=str(p))
    if final_step not in stores:
        raise IncompleteStoreError(f"no store for the final step {final_step} among steps "
                                   f"{sorted(stores)}")
    ref = stores[final_step]
    for ds in stores.values():
        for attr in ("size", "seed", "num_layers", "hidden_size"):
            if ds.attrs.get(attr) != ref.attrs.get(attr):
                raise IncompleteStoreError(
                    f"{ds.attrs['path']}: attr {attr}={ds.attrs.get(attr)!r} differs from the "
                    f"final step's {ref.attrs.get(attr)!r}; {redo_hint(ds.attrs['path'])}")
        if list(ds.param.values) != list(ref.param.values):
            raise IncompleteStoreError(f"{ds.attrs['path']}: parameters differ from the final "
                                       f"step's; {redo_hint(ds.attrs['path'])}")
    steps = sorted(stores)
    stacked = xr.concat([stores[s].drop_attrs(deep=False).load() for s in steps],
                        dim=pd.Index(steps, name="step"), join="exact", combine_attrs="override")
    stacked.attrs = {a: ref.attrs[a] for a in _SIZE_ATTRS if a in ref.attrs}
    stacked.attrs["final_step"] = int(final_step)
    stacked.attrs["seed"] = int(ref.attrs.get("seed", 0))
    write_store(stacked, out)
    log.info("stacked the statistics of %d steps of size %s into %s", len(steps),
             ref.attrs["size"], out)
    return stacked


def location_coords(names: Sequence[str], prefix: str) -> dict[str, tuple]:
    """Coordinates ``<prefix>_layer`` (-1 outside blocks), ``<prefix>_module`` and
    ``<prefix>_kind`` (weight/bias) over dimension ``prefix`` from parameter names."""
    parts = [param_parts(str(n)) for n in names]
    return {f"{prefix}_layer": (prefix, np.array([p[0] for p in parts], dtype=np.int64)),
            f"{prefix}_module": (prefix, np.array([p[1] for p in parts], dtype=object)),
            f"{prefix}_kind": (prefix, np.array([p[2] for p in parts], dtype=object))}


def combine_stats(paths: Sequence[Path | str]) -> xr.Dataset:
    """Stack per-(size, seed) statistics into one dataset over ``size`` (by parameter count)
    and ``seed`` (:func:`~lmdynamics.reduction.sizes.stack_seeds`)."""
    per_run = load_sizes(paths, required=STAT_VARIABLES,
                         required_attrs=(*_SIZE_ATTRS[:4], "final_step"))
    final = agreed_attrs(per_run, ("final_step",), "statistics")["final_step"]
    per_size = stack_seeds(per_run, "statistics")
    sizes = [d.attrs["size"] for d in per_size]
    combined = stack_sizes(per_size, sizes)
    family = _family(per_size)
    params = sorted({str(p) for p in combined.param.values},
                    key=lambda k: param_sort_key(k, family))
    matrices = sorted({str(m) for m in combined.matrix.values},
                      key=lambda k: param_sort_key(k, family))
    combined = combined.reindex(param=params, matrix=matrices, layer=np.sort(combined.layer),
                                sv=np.sort(combined.sv), step=np.sort(combined.step))
    combined = combined.assign_coords(
        size=np.array(sizes, dtype=object),
        param=np.array(params, dtype=object), matrix=np.array(matrices, dtype=object),
        **location_coords(params, "param"), **location_coords(matrices, "matrix"),
        **{a: ("size", np.array([d.attrs[a] for d in per_size]))
           for a in ("n_params", "num_layers", "hidden_size")})
    combined.attrs = {"final_step": final, "family": family}
    return combined


def _family(per_size: Sequence[xr.Dataset]) -> str:
    """The model family all sizes share (stores without the attr are GPT-NeoX's)."""
    found = {str(d.attrs.get("family", families.DEFAULT)) for d in per_size}
    if len(found) > 1:
        raise IncompleteStoreError(f"the sizes' statistics are of different model families "
                                   f"({', '.join(sorted(found))}); one run is one family")
    return found.pop()


def write_combined_stats(paths: Sequence[Path | str], out: Path | str) -> xr.Dataset:
    """Combine per-size statistics and write ``stats.zarr``."""
    ds = combine_stats(paths)
    write_store(ds, out)
    log.info("combined the statistics of %d sizes into %s", ds.sizes["size"], out)
    return ds

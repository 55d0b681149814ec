"""Reductions: per-pair stores -> per-(size, seed) metrics -> one dataset across sizes, seeds.

Per size and seed replicate (``reduce_size``): linear CKA of each step's activations against
the final step's, and the proportional effective rank (PER) of the write matrices and their
gradients, as float64 arrays over (component, layer, step). Across sizes and seeds
(``combine_sizes``): one dataset over (size, seed, component, layer, step), sizes ordered by
parameter count, missing layers NaN; a suite without replicates has one seed (0).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from lmdynamics.estimators.rank import (
    per_divisor,
    proportional_effective_rank,
    random_gaussian_per,
)
from lmdynamics.heap import reuse_freed_memory
from lmdynamics.options import defaults
from lmdynamics.reduction.audit import duplicate_flag
from lmdynamics.reduction.cka import CKAOptions, cka_dataset
from lmdynamics.reduction.flags import (
    flag_nonfinite,
    set_flagged,
    split_flags,
    stack_flags,
    warn,
    warn_nan_metrics,
)
from lmdynamics.reduction.measures import MeasureOptions, MeasureReduction
from lmdynamics.reduction.sizes import agreed_attrs, load_sizes, stack_seeds, stack_sizes
from lmdynamics.store import (
    DigestedReader,
    IncompleteStoreError,
    open_store,
    redo_hint,
    write_store,
    write_text_atomic,
)

log = logging.getLogger(__name__)

PAIR_VARIABLES = ("activations", "weight_singular_values", "grad_singular_values")
#: Coordinates a per-pair store must hold besides its variables (the sampled tokens).
PAIR_COORDS = ("sequence", "position")
#: Attributes the reduction reads from every per-pair store.
PAIR_ATTRS = ("step", "size", "model", "num_layers", "hidden_size", "num_attention_heads",
              "n_params")
#: Store attrs that must agree with the final step's store (when both stores have them).
CONSISTENT_ATTRS = ("size", "seed", "model", "num_layers", "hidden_size", "dtype",
                    "token_seed", "eval_batch_shape", "eval_batch_sha256")
METRIC_VARIABLES = ("cka", "per_weight", "per_grad")
#: Attributes every per-size metrics store records and the combined one keeps (must agree).
SHARED_ATTRS = ("final_step", "per_divisor", "per_truncate", "bootstrap_samples",
                "bootstrap_level", "bootstrap_seed", "standardize", "measures")


#: Schema defaults of config section ``metrics``.
_DEFAULTS = defaults("metrics")

def open_pair_stores(paths: Sequence[Path | str], *, defer: tuple[str, ...] = ()
                     ) -> dict[int, xr.Dataset]:
    """Open per-pair stores keyed by step, verified (:func:`~lmdynamics.store.open_store`:
    completeness, checksums, digests; the content of ``defer`` arrays is left to the caller's
    :class:`~lmdynamics.store.DigestedReader`) and holding the variables and attrs the
    reduction reads."""
    stores: dict[int, xr.Dataset] = {}
    for p in paths:
        ds = open_store(p, required=PAIR_VARIABLES + PAIR_COORDS + ("loss",),
                        required_attrs=PAIR_ATTRS, defer=defer).assign_attrs(path=str(p))
        check_pair_layout(ds)
        step = int(ds.attrs["step"])
        named = re.fullmatch(r"step(\d+)\.zarr", Path(p).name)
        if named and int(named[1]) != step:
            raise IncompleteStoreError(f"{p}: attr step={step} but the path names step "
                                       f"{named[1]} (a store copied or moved?); {redo_hint(p)}")
        if step in stores:
            other = stores[step].attrs["path"]
            raise IncompleteStoreError(f"two stores for step {step}: {other} and {p}; "
                                       f"{redo_hint(p)}")
        stores[step] = ds
    return dict(sorted(stores.items()))


def check_pair_layout(ds: xr.Dataset) -> None:
    """Shapes of one per-pair store must fit its own attrs (layers, hidden size, tokens).

    activations (component, layer, token, dim) = (2, num_layers, len(sequence), hidden_size);
    singular values (component, layer, k) = (2, num_layers, k). Raises
    :class:`IncompleteStoreError` naming the store and how to redo it.
    """
    path = ds.attrs["path"]
    n_layers, hidden = ds.attrs.get("num_layers"), ds.attrs.get("hidden_size")
    expected = {
        "activations": (("component", "layer", "token", "dim"),
                        (2, n_layers, ds["sequence"].size, hidden)),
        "weight_singular_values": (("component", "layer", "k"), (2, n_layers, None)),
        "grad_singular_values": (("component", "layer", "k"), (2, n_layers, None)),
    }
    for var, (dims, shape) in expected.items():
        got = ds[var]
        ok = got.dims == dims and all(e is None or e == g
                                      for e, g in zip(shape, got.shape, strict=True))
        if not ok:
            want = ", ".join(f"{d}={'any' if e is None else e}"
                             for d, e in zip(dims, shape, strict=True))
            raise IncompleteStoreError(
                f"{path}: {var} has dims {got.dims} shape {got.shape}; expected ({want}) "
                f"from the store's attrs num_layers={n_layers}, hidden_size={hidden}; "
                f"{redo_hint(path)}")


def check_consistent(stores: dict[int, xr.Dataset], final_step: int) -> xr.Dataset:
    """Every store must match the final one in attrs, shapes and sampled token positions.

    Returns the final step's store. Raises :class:`IncompleteStoreError` naming the
    offending store and how to redo it: a store that differs from the final one, or the
    final store itself when every other store (two or more, all alike) differs from it.
    """
    if final_step not in stores:
        raise IncompleteStoreError(f"no store for the final step {final_step} among steps "
                                   f"{sorted(stores)}")
    ref = stores[final_step]
    always = ("size", "num_layers", "hidden_size")
    for attr in CONSISTENT_ATTRS:
        _agree(stores, ref, f"attr {attr}", lambda ds, a=attr: ds.attrs.get(a),
               skip=lambda ds, a=attr: a not in ds.attrs and a not in always)
    for var in PAIR_VARIABLES:
        _agree(stores, ref, f"{var} shape", lambda ds, v=var: tuple(ds[v].shape))
    for coord in ("sequence", "position"):
        _agree(stores, ref, f"sampled token {coord}s", lambda ds, c=coord: ds[c].values,
               show=False)
    return ref


def _agree(stores: dict[int, xr.Dataset], ref: xr.Dataset, what: str, value: Callable,
           skip: Callable = lambda ds: False, show: bool = True) -> None:
    """Raise naming the odd store out when ``value(ds)`` differs from ``value(ref)``."""
    def same(a: xr.Dataset, b: xr.Dataset) -> bool:
        return bool(np.array_equal(np.asarray(value(a), dtype=object),
                                   np.asarray(value(b), dtype=object)))

    others = [ds for ds in stores.values() if ds is not ref and not skip(ds)]
    differing = [ds for ds in others if not same(ds, ref)]
    if not differing:
        return
    if len(differing) == len(others) >= 2 and all(same(ds, others[0]) for ds in others):
        odd, other = ref, others[0]
        where = f"the other {len(others)} steps' stores (e.g. {other.attrs['path']})"
    else:
        odd, other = differing[0], ref
        where = f"the final step's store ({ref.attrs['path']})"
    path = odd.attrs["path"]
    detail = (f"is {value(odd)!r}, but {value(other)!r} in {where}" if show
              else f"differ from those in {where}, so CKA would compare different tokens")
    raise IncompleteStoreError(f"{path}: {what} {detail}; {redo_hint(path)}")


def _per(ds: xr.Dataset, var: str, divisor_kind: str, truncate: bool = True) -> np.ndarray:
    sv = ds[var].values.astype(np.float64)  # (component, layer, k)
    n_comp, n_layers, k = sv.shape
    div = _divisor(ds, divisor_kind, k)
    return np.array([[proportional_effective_rank(sv[c, i], div, truncate=truncate)
                      for i in range(n_layers)] for c in range(n_comp)])


def _divisor(ds: xr.Dataset, divisor_kind: str, k: int) -> int:
    return per_divisor(divisor_kind, n_singular_values=k, hidden_size=ds.attrs["hidden_size"],
                       num_attention_heads=ds.attrs["num_attention_heads"])


def write_matrix_shape(component: str, attrs: dict) -> tuple[int, int] | None:
    """Shape of a component's write matrix: ``attention.dense`` (hidden, hidden) and
    ``mlp.dense_4h_to_h`` (hidden, intermediate_size); None when the store's attrs lack it."""
    hidden = attrs.get("hidden_size")
    other = {"attention": hidden, "mlp": attrs.get("intermediate_size")}.get(component)
    return None if hidden is None or other is None else (int(hidden), int(other))


def per_baseline(ref: xr.Dataset, components: Sequence[str], divisor_kind: str,
                 truncate: bool) -> xr.Dataset:
    """``per_random`` / ``per_random_se`` (component,): PER of a Gaussian write matrix.

    The same shape, divisor and truncation as the measured PER
    (:func:`~lmdynamics.estimators.rank.random_gaussian_per`, seeded, cached per shape); NaN with a
    warning when the store's attrs do not give the shape (``intermediate_size``).
    """
    k = ref["weight_singular_values"].sizes["k"]
    mean, se = np.full(len(components), np.nan), np.full(len(components), np.nan)
    for ci, comp in enumerate(components):
        shape = write_matrix_shape(comp, ref.attrs)
        if shape is None or min(shape) != k:
            warn(f"per_random is NaN (undefined) for size {ref.attrs.get('size')} {comp}: "
                 f"the write matrix's shape is unknown (store attrs give {shape}, {k} "
                 "singular values)")
            continue
        base = random_gaussian_per(shape, _divisor(ref, divisor_kind, k), truncate=truncate)
        mean[ci], se[ci] = base.mean, base.stderr
    desc = "PER of an i.i.d. Gaussian matrix of the write matrix's shape (same divisor)"
    return xr.Dataset(
        {"per_random": (("component",), mean, {"long_name": desc + ", Monte-Carlo mean"}),
         "per_random_se": (("component",), se, {"long_name": "its standard error"})},
        coords={"component": np.array(components, dtype=object)})


#: Variables of the gradient PER on sub-batches of the eval batch (:func:`sub_batch_per`).
SUB_BATCH_VARIABLES = ("per_grad_sub", "per_grad_sub_normalized", "per_grad_sub_head_dim")


def sub_batch_per(stores: dict[int, xr.Dataset], divisor_kind: str,
                  truncate: bool) -> xr.Dataset:
    """``per_grad_sub`` and ``per_grad_sub_head_dim`` (component, layer, step, sub_batch): the
    PER of the write matrices' gradients on each sub-batch of the eval batch, from the stores'
    ``grad_sub_singular_values`` (``extraction.grad_sub_batches``). Empty (with a warning
    when only some stores hold them, or with different numbers of sub-batches) unless every
    store of the size holds the same number of sub-batches."""
    counts = {s: ds["grad_sub_singular_values"].sizes["sub_batch"]
              if "grad_sub_singular_values" in ds else 0 for s, ds in stores.items()}
    if len(set(counts.values())) != 1:
        warn(f"per_grad_sub left out for size {next(iter(stores.values())).attrs.get('size')}: "
             f"the stores hold different numbers of gradient sub-batches {counts} (step: "
             "count); redo the extractions with one extraction.grad_sub_batches")
        return xr.Dataset()
    if not next(iter(counts.values())):
        return xr.Dataset()
    dims = ("component", "layer", "step", "sub_batch")
    out = {}
    desc = "PER of gradients on each sub-batch of the eval batch"
    for name, kind, trunc, long_name in (
            ("per_grad_sub", divisor_kind, truncate, desc),
            ("per_grad_sub_head_dim", "head_dim", True,
             desc + ", top head_dim singular values / head_dim")):
        values = np.stack([np.stack([_per(sub, "grad_singular_values", kind, trunc)
                                     for sub in _sub_batches(ds)], axis=-1)
                           for ds in stores.values()], axis=-2)
        out[name] = (dims, values, {"long_name": long_name})
    return xr.Dataset(out, coords={"step": np.array(list(stores), dtype=np.int64)})


def _sub_batches(ds: xr.Dataset) -> list[xr.Dataset]:
    """One store's sub-batch spectra, each as a dataset whose ``grad_singular_values`` they
    are (so :func:`_per` reads them like the whole batch's)."""
    sub = ds["grad_sub_singular_values"]
    return [xr.Dataset({"grad_singular_values": sub.isel(sub_batch=j, drop=True)},
                       attrs=ds.attrs) for j in range(sub.sizes["sub_batch"])]


def reduce_size(paths: Sequence[Path | str], out: Path | str, *, final_step: int,
                per_divisor: str = _DEFAULTS["per_divisor"],
                per_truncate: bool = _DEFAULTS["per_truncate"],
                cka_options: CKAOptions | None = None,
                measure_options: MeasureOptions | None = None) -> xr.Dataset:
    """Reduce one size's per-pair stores into CKA and PER variables, and the measures of
    ``measure_options`` (default: the schema's; :mod:`lmdynamics.reduction.measures`).

    ``cka`` (biased), ``cka_debiased``, ``per_weight``, ``per_grad`` have dims (component,
    layer, step), float64; ``cka_options`` adds bootstrap intervals, standardised variants
    (see :mod:`lmdynamics.reduction.cka`); ``cka_pairwise``/``cka_debiased_pairwise`` are over
    (component, layer, step, step_ref). The final step's centred activations and their
    self-products are computed once per (component, layer) and reused for every step. An
    undefined CKA (zero variance, non-finite input) is NaN and logged with size, step and
    layer. ``per_truncate``: keep only the top ``divisor`` singular values when there are
    more (the paper's code; see :func:`~lmdynamics.estimators.rank.proportional_effective_rank`).
    The process keeps freed memory for reuse (:func:`~lmdynamics.heap.reuse_freed_memory`).

    Every store is verified (:func:`~lmdynamics.store.open_store`); the activations' digest
    is checked while the CKA reads them, once (:class:`~lmdynamics.store.DigestedReader`),
    and the same reads give the non-finite flags. A damaged store raises
    :class:`IncompleteStoreError` before anything is written.
    """
    reuse_freed_memory()
    options = cka_options or CKAOptions()
    stores = open_pair_stores(paths, defer=("activations",))
    ref = check_consistent(stores, final_step)
    steps = list(stores)
    readers = {s: DigestedReader(ds.attrs["path"], "activations") for s, ds in stores.items()}
    shape = ref.activations.shape[:2]
    finite = {s: np.ones(shape, dtype=bool) for s in steps}

    def read_block(s: int, ci: int, layer: int) -> np.ndarray:
        block = readers[s].read((ci, layer))
        finite[s][ci, layer] = bool(np.isfinite(block).all())
        return block

    measures = MeasureReduction(measure_options or MeasureOptions(), stores,
                                final_step=final_step, per_divisor_kind=per_divisor,
                                per_truncate=per_truncate)
    cka = cka_dataset({s: ds.activations for s, ds in stores.items()}, ref.sequence.values,
                      final_step=final_step, size=str(ref.attrs["size"]), options=options,
                      read_block=read_block, on_blocks=measures.on_blocks)
    for reader in readers.values():  # every value was read once: its digest is complete
        reader.finish()
    per_w = np.stack([_per(stores[s], "weight_singular_values", per_divisor, per_truncate)
                      for s in steps], axis=-1)
    per_g = np.stack([_per(stores[s], "grad_singular_values", per_divisor, per_truncate)
                      for s in steps], axis=-1)
    head_w = np.stack([_per(stores[s], "weight_singular_values", "head_dim")
                       for s in steps], axis=-1)
    head_g = np.stack([_per(stores[s], "grad_singular_values", "head_dim")
                       for s in steps], axis=-1)
    baseline = per_baseline(ref, [str(c) for c in cka.component.values], per_divisor,
                            per_truncate)
    flags = flag_nonfinite(stores, {s: ~f for s, f in finite.items()})
    dims = ("component", "layer", "step")
    ds = xr.Dataset(
        {"per_weight": (dims, per_w, {"long_name": "proportional effective rank of weights"}),
         "per_grad": (dims, per_g, {"long_name": "proportional effective rank of gradients"}),
         "per_weight_head_dim": (dims, head_w, {"long_name": "PER of weights, top head_dim "
                                                "singular values / head_dim (paper's code)"}),
         "per_grad_head_dim": (dims, head_g, {"long_name": "PER of gradients, top head_dim "
                                              "singular values / head_dim (paper's code)"}),
         "eval_loss": (("step",), np.array([float(stores[s].loss) for s in steps]),
                       {"units": "nats/token"}),
         "flag_nonfinite": (dims, flags, {"description": "NaN or inf in the layer's "
                                          "activations, weights or gradients"})},
        coords={"component": cka.component.values, "layer": cka.layer.values,
                "step": np.array(steps, dtype=np.int64)},
        attrs={"size": ref.attrs["size"], "n_params": int(ref.attrs["n_params"]),
               "num_layers": int(ref.sizes["layer"]),
               "hidden_size": int(ref.attrs["hidden_size"]), "final_step": int(final_step),
               "per_divisor": per_divisor, "per_truncate": bool(per_truncate),
               "model": ref.attrs["model"], "seed": int(ref.attrs.get("seed", 0))},
    )
    ds["flag_duplicate"] = duplicate_flag(stores)
    ds = ds.merge(baseline).merge(sub_batch_per(stores, per_divisor, per_truncate))
    ds = ds.merge(measures.dataset()).assign_attrs(measures.options.attrs())
    for var in ("per_weight", "per_grad", *(["per_grad_sub"] if "per_grad_sub" in ds else [])):
        normalized = (ds[var] / ds["per_random"]).transpose(*dims, ...)
        ds[f"{var}_normalized"] = normalized.assign_attrs(
            long_name=f"{var} / per_random (1 = as spread as a random Gaussian matrix)")
    ds = xr.merge([cka, ds], combine_attrs="no_conflicts")
    ds = ds[["cka", *sorted(v for v in map(str, ds.data_vars) if v != "cka")]]
    warn_nan_metrics(ds, ("per_weight", "per_grad", "per_weight_head_dim", "per_grad_head_dim"))
    write_store(ds, out)
    log.info("reduced %d steps of size %s into %s", len(steps), ref.attrs["size"], out)
    return ds


def combine_sizes(paths: Sequence[Path | str]) -> xr.Dataset:
    """Stack per-(size, seed) metrics into dims (size, seed, component, layer, step).

    Sizes are ordered by parameter count (not by label text); layers a size lacks are NaN.
    Every size must have the same seeds (:func:`~lmdynamics.reduction.sizes.stack_seeds`).
    Flags (size, step) are ORed over seeds: a step flagged in one replicate is flagged.
    """
    per_run = load_sizes(paths, required=METRIC_VARIABLES,
                         required_attrs=("size", "n_params", "num_layers"))
    shared = agreed_attrs(per_run, SHARED_ATTRS, "metrics")
    per_run = _same_sub_batches(per_run)
    per_size = stack_seeds(per_run, "metrics")
    sizes = [d.attrs["size"] for d in per_size]
    per_size, flags = zip(*(split_flags(d) for d in per_size), strict=True)
    combined = stack_sizes(per_size, sizes)
    combined = combined.assign_coords(
        size=np.array(sizes, dtype=object),
        n_params=("size", np.array([d.attrs["n_params"] for d in per_size], dtype=np.int64)),
        num_layers=("size", np.array([d.attrs["num_layers"] for d in per_size])))
    combined = combined.merge(stack_flags(flags, sizes), join="left", fill_value=False)
    combined.attrs = shared
    return set_flagged(combined)


def _same_sub_batches(per_run: list[xr.Dataset]) -> list[xr.Dataset]:
    """``per_run`` as is when every run has the same number of gradient sub-batches (or
    none has any); else without :data:`SUB_BATCH_VARIABLES`, with a warning."""
    counts = {(d.attrs["size"], int(d.attrs.get("seed", 0))):
              d.sizes.get("sub_batch", 0) for d in per_run}
    if len(set(counts.values())) <= 1:
        return per_run
    warn(f"per_grad_sub left out of the combined metrics: the runs hold different numbers of "
         f"gradient sub-batches {counts} ((size, seed): count); redo the extractions with one "
         "extraction.grad_sub_batches")
    return [d.drop_vars([v for v in SUB_BATCH_VARIABLES if v in d]) for d in per_run]


def tidy_metrics(ds: xr.Dataset) -> pd.DataFrame:
    """Long-form table: (size, seed, component, layer, step, cka, per_weight, per_grad, ...).

    Every variable over exactly (size, seed, component, layer, step) becomes a column, the
    :data:`METRIC_VARIABLES` first (e.g. ``cka_debiased``, ``cka_low`` follow). Rows are
    ordered by size, seed, component, layer, step (with one seed, the rows of the table
    before seeds were a dimension, plus a ``seed`` column of zeros).
    """
    dims = {"size", "seed", "component", "layer", "step"}
    extra = sorted(str(v) for v in ds.data_vars
                   if set(ds[v].dims) == dims and v not in METRIC_VARIABLES)
    columns = [*METRIC_VARIABLES, *extra]
    df = ds[columns].to_dataframe().reset_index()
    if "num_layers" in ds.coords:  # one row per layer a size has; undefined -> empty cell
        n_layers = dict(zip(ds["size"].values, ds["num_layers"].values, strict=True))
        df = df[df["layer"] < df["size"].map(n_layers)]
    else:
        df = df.dropna(subset=columns, how="all")
    return df[["size", "seed", "component", "layer", "step", *columns]]


def write_combined(paths: Sequence[Path | str], out_zarr: Path | str,
                   out_csv: Path | str) -> xr.Dataset:
    """Combine per-size metrics and write ``metrics.zarr`` and the tidy ``metrics.csv``."""
    ds = combine_sizes(paths)
    write_store(ds, out_zarr)
    write_text_atomic(tidy_metrics(ds).to_csv(index=False), out_csv)
    return ds

"""The CKA part of the per-size reduction: both estimators, bootstrap intervals, pairwise CKA.

For one size, from its per-pair stores (one per step), per (component, layer):

- ``cka`` / ``cka_debiased`` (component, layer, step): biased / debiased linear CKA of each
  step's activations against the final step's (:mod:`lmdynamics.estimators.rank`,
  :mod:`lmdynamics.estimators.cka`), read off the pairwise matrices below (the same numbers as
  ``linear_cka``/``debiased_linear_cka``; computing all pairs in Gram space costs about what
  the comparisons with the final step alone cost in feature space when n < 2d);
- with ``bootstrap_samples > 0``: ``<var>_low`` / ``<var>_high`` (component, layer, step), a
  percentile interval at ``bootstrap_level`` from resampling *sequences*
  (:mod:`lmdynamics.estimators.bootstrap`), and ``<var>_layer_mean_low`` / ``_high``
  (component, step),
  the interval of the mean over layers (what figure 2 draws: every layer is evaluated on the
  same resamples, so the mean's distribution is the distribution of the per-resample means),
  and ``<var>_resamples`` (component, layer, step, resample), every resample's value (not
  for the standardised variants), from which Table 1 draws its MCC intervals;
- with ``standardize``: the same variables for per-dimension standardised activations, named
  with ``_standardized`` after the estimator (``cka_standardized``,
  ``cka_debiased_standardized_low``, ...);
- ``cka_pairwise`` / ``cka_debiased_pairwise`` (component, layer, step, step_ref): every
  step against every step (``step_ref`` = the final step gives ``cka``/``cka_debiased``).

Undefined values are NaN with a warning naming size, step, component and layer.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from lmdynamics.estimators.bootstrap import (
    BootstrapReference,
    bootstrap_cka_to_reference,
    bootstrap_weights,
    percentile_interval,
)
from lmdynamics.estimators.cka import CKA_ESTIMATORS, cka_variable, pairwise_cka, standardize
from lmdynamics.options import defaults, resolve

log = logging.getLogger(__name__)

UNDEFINED_REASON = {
    "biased": "zero variance or non-finite activations",
    "debiased": "zero variance, non-finite activations or fewer than 4 tokens",
}


#: Schema defaults of config section ``metrics`` (the defaults below).
_DEFAULTS = defaults("metrics")


@dataclass(frozen=True)
class CKAOptions:
    """How the CKA variables are computed (config keys under ``metrics``).

    ``bootstrap_samples``: resamples of sequences (0 disables the intervals);
    ``bootstrap_level``: interval coverage in (0, 1); ``seed``: seeds the resamples;
    ``standardize``: also compute CKA of per-dimension standardised activations.
    """

    bootstrap_samples: int = _DEFAULTS["bootstrap"]["samples"]
    bootstrap_level: float = _DEFAULTS["bootstrap"]["level"]
    seed: int = resolve("seed")
    standardize: bool = _DEFAULTS["standardize"]

    @classmethod
    def from_config(cls, metrics: Mapping[str, Any], *, seed: int) -> CKAOptions:
        """The options of config section ``metrics`` (as :func:`lmdynamics.options.resolve`
        returns it) and the config's ``seed``."""
        return cls(bootstrap_samples=metrics["bootstrap"]["samples"],
                   bootstrap_level=metrics["bootstrap"]["level"], seed=seed,
                   standardize=metrics["standardize"])

    def __post_init__(self) -> None:
        if isinstance(self.bootstrap_samples, bool) or self.bootstrap_samples < 0:
            raise ValueError(f"metrics.bootstrap.samples={self.bootstrap_samples!r}: allowed "
                             "an integer >= 0 (0 disables the intervals)")
        if not 0.0 < self.bootstrap_level < 1.0:
            raise ValueError(f"metrics.bootstrap.level={self.bootstrap_level!r}: allowed a "
                             "number in (0, 1)")

    def attrs(self) -> dict[str, object]:
        """Store attributes recording the options."""
        return {"bootstrap_samples": int(self.bootstrap_samples),
                "bootstrap_level": float(self.bootstrap_level),
                "bootstrap_seed": int(self.seed), "standardize": bool(self.standardize)}


def _warn(msg: str) -> None:
    log.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


def _variants(options: CKAOptions) -> list[bool]:
    return [False, True] if options.standardize else [False]


def cka_dataset(activations: dict[int, xr.DataArray], sequences: np.ndarray, *,
                final_step: int, size: str, options: CKAOptions,
                read_block: Callable[[int, int, int], np.ndarray] | None = None,
                on_blocks: Callable[[int, int, list[np.ndarray]], None] | None = None
                ) -> xr.Dataset:
    """All CKA variables of one size (see the module docstring).

    ``activations``: step -> DataArray (component, layer, token, dim) of that step's store,
    the same tokens at every step; ``sequences`` (token,): the sequence each token comes
    from (the bootstrap's resampling unit). ``read_block(step, component index, layer)``,
    when given, reads the (token, dim) block instead of ``activations`` (the reduction
    reads through :class:`lmdynamics.store.DigestedReader`); every block is read once, the
    (component, layer) pairs in C order. ``on_blocks(component index, layer, blocks)``, when
    given, receives each (component, layer)'s float64 (token, dim) blocks of every step (in
    step order) before the CKA uses them, and must not modify them (the other measures of
    :mod:`lmdynamics.reduction.measures` read the same blocks in the same pass). Returns a
    dataset over (component, layer, step)
    [+ step_ref] with float64 variables and the options as attrs.
    """
    steps = sorted(activations)
    final = activations[final_step]
    components = [str(c) for c in final.component.values]
    n_comp, n_layers, n_steps = len(components), final.sizes["layer"], len(steps)
    fi = steps.index(final_step)
    variants = _variants(options)
    point = {(e, v): np.full((n_comp, n_layers, n_steps), np.nan)
             for e in CKA_ESTIMATORS for v in variants}
    pair = {e: np.full((n_comp, n_layers, n_steps, n_steps), np.nan) for e in CKA_ESTIMATORS}
    n_groups = int(np.unique(sequences).size)
    boot = options.bootstrap_samples > 0 and n_groups >= 2
    if options.bootstrap_samples > 0 and not boot:
        _warn(f"bootstrap intervals undefined for size {size}: the sampled tokens come from "
              f"{n_groups} sequence; resampling sequences needs at least 2")
    weights = bootstrap_weights(n_groups, options.bootstrap_samples, options.seed) if boot \
        else None
    resamples = {k: np.full((n_comp, n_layers, n_steps, options.bootstrap_samples), np.nan)
                 for k in point} if boot else {}
    if read_block is None:
        def read_block(s: int, ci: int, layer: int) -> np.ndarray:
            return activations[s].isel(component=ci, layer=layer).values
    for ci in range(n_comp):
        for layer in range(n_layers):
            raw = [np.array(read_block(s, ci, layer), dtype=np.float64) for s in steps]
            if on_blocks is not None:
                on_blocks(ci, layer, raw)
            for standardized in variants:
                xs = [standardize(x) for x in raw] if standardized else raw
                # every step against every step; the final step's column is the CKA to it.
                # xs are our own float64 copies: centred in place (CKA is shift-invariant)
                biased, debiased = pairwise_cka(xs, overwrite=True)
                point["biased", standardized][ci, layer] = biased[:, fi]
                point["debiased", standardized][ci, layer] = debiased[:, fi]
                if not standardized:
                    pair["biased"][ci, layer], pair["debiased"][ci, layer] = biased, debiased
                if boot:
                    bref = BootstrapReference.from_activations(xs[fi], sequences, weights)
                    for si, x in enumerate(xs):
                        rb, rd = bootstrap_cka_to_reference(x, bref)
                        resamples["biased", standardized][ci, layer, si] = rb
                        resamples["debiased", standardized][ci, layer, si] = rd
    _warn_undefined(point, steps, components, size)
    dims = ("component", "layer", "step")
    data: dict[str, tuple] = {}
    for (est, standardized), values in point.items():
        name = cka_variable(est, standardized=standardized)
        data[name] = (dims, values, {"long_name": f"linear CKA ({est}) vs final step"
                                     + (", standardised dimensions" if standardized else "")})
        if boot:
            data.update(_intervals(name, values, resamples[est, standardized],
                                   options.bootstrap_level, size))
            if not standardized:  # Table 1's intervals relabel layers on every resample
                data[name + "_resamples"] = (
                    ("component", "layer", "step", "resample"), resamples[est, standardized],
                    {"long_name": f"linear CKA ({est}) vs final step on each bootstrap "
                                  "resample of sequences"})
    for est, values in pair.items():
        data[cka_variable(est) + "_pairwise"] = (
            ("component", "layer", "step", "step_ref"), values,
            {"long_name": f"linear CKA ({est}) of step vs step_ref"})
    return xr.Dataset(
        data, coords={"component": np.array(components, dtype=object),
                      "layer": np.arange(n_layers), "step": np.array(steps, dtype=np.int64),
                      "step_ref": np.array(steps, dtype=np.int64)},
        attrs={**options.attrs(), "bootstrap_unit": "sequence",
               "bootstrap_sequences": n_groups})


def _intervals(name: str, values: np.ndarray, res: np.ndarray, level: float,
               size: str) -> dict[str, tuple]:
    """``<name>_low/_high`` (component, layer, step) and the layer-mean ones (component, step)."""
    n_comp, n_layers, n_steps, _ = res.shape
    low, high = np.full(values.shape, np.nan), np.full(values.shape, np.nan)
    for idx in np.ndindex(n_comp, n_layers, n_steps):
        low[idx], high[idx] = percentile_interval(res[idx], level)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN layers: NaN mean
        means = np.nanmean(res, axis=1)  # (component, step, resample)
    mean_low, mean_high = np.full((n_comp, n_steps), np.nan), np.full((n_comp, n_steps), np.nan)
    for idx in np.ndindex(n_comp, n_steps):
        mean_low[idx], mean_high[idx] = percentile_interval(means[idx], level)
    lost = int(np.sum(np.isfinite(values) & ~np.isfinite(low)))
    if lost:
        _warn(f"{name}: {lost} bootstrap interval(s) of size {size} are NaN although the "
              "estimate is defined (most resamples were degenerate)")
    pct = f"{100 * level:g}%"
    dims, mdims = ("component", "layer", "step"), ("component", "step")
    return {f"{name}_low": (dims, low, {"long_name": f"{pct} bootstrap interval, lower"}),
            f"{name}_high": (dims, high, {"long_name": f"{pct} bootstrap interval, upper"}),
            f"{name}_layer_mean_low": (mdims, mean_low,
                                       {"long_name": f"{pct} interval of the layer mean, lower"}),
            f"{name}_layer_mean_high": (mdims, mean_high,
                                        {"long_name": f"{pct} interval of the layer mean, upper"})}


def _warn_undefined(point: dict, steps: list[int], components: list[str], size: str) -> None:
    for (est, standardized), values in point.items():
        for ci, layer, si in zip(*np.nonzero(~np.isfinite(values)), strict=True):
            label = "CKA" if est == "biased" else "debiased CKA"
            label += " of standardised activations" if standardized else ""
            _warn(f"{label} undefined ({UNDEFINED_REASON[est]}) for size {size} step "
                  f"{steps[si]} {components[ci]} layer {layer}")

"""The measures of :mod:`lmdynamics.estimators.measures` in the per-size reduction.

For one (size, seed), from its per-pair stores (one per step), for every measure config
section ``measures`` turns on (:class:`MeasureOptions`) and every data kind chosen for it:

- a single-checkpoint measure on ``weights``, ``gradients`` or ``activations``:
  ``<name>_<weight|grad|act>`` (component, layer, step), from the store's singular values or
  element statistics (:data:`lmdynamics.extraction.names.MEASURE_INPUTS`);
- on ``ov_circuit``: ``<name>_ov_heads`` (layer, head, step), one value per attention head,
  and ``<name>_ov`` (component, layer, step), their mean over heads in the ``attention`` row
  (NaN when any head's is; the ``mlp`` row is NaN: an MLP has no OV circuit);
- a comparative measure (PWCCA, SVCCA) of each step's activations against the final step's,
  ``<name>`` (component, layer, step), and with ``reference: [pairwise]`` against every step,
  ``<name>_pairwise`` (component, layer, step, step_ref), entry [s, t] comparing step s with
  reference step t (PWCCA weighted by step s's side). They read the activations the CKA
  reduction reads, in the same pass (:func:`lmdynamics.reduction.cka.cka_dataset`'s
  ``on_blocks``), so every block is still read and digest-checked once; one thin SVD per
  step and one product per pair serve every comparative measure
  (:class:`lmdynamics.estimators.cca.ActivationPair`).

Missing and undefined values. A store written before the extraction computed a measure's
input (:mod:`lmdynamics.extraction.measure_data`) lacks that variable: the measure is NaN at
those steps, and one warning per variable names the steps and how to add it (rerun those
extractions). Undefined values (zero variance, non-finite data, a condition number beyond
the spectrum's resolution) are NaN with one warning per variable giving their count and the
first places. Canonical correlations of exactly 1 between two different steps (shared
directions: :mod:`lmdynamics.estimators.cca`, "Shared directions") get one warning per size
with the largest count and where.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xarray as xr

from lmdynamics.estimators.cca import ActivationPair, CenteredSVD, unit_correlations
from lmdynamics.estimators.measures import (
    MEASURES,
    Choice,
    SpectrumContext,
    chosen,
)
from lmdynamics.estimators.rank import per_divisor
from lmdynamics.estimators.sparsity import ELEMENT_STATS
from lmdynamics.extraction.names import MEASURE_INPUTS
from lmdynamics.options import defaults
from lmdynamics.reduction.flags import warn
from lmdynamics.store import IncompleteStoreError, redo_hint

log = logging.getLogger(__name__)

#: Schema defaults of config section ``measures``.
_DEFAULTS = defaults("measures")
#: Undefined values listed by place in a warning; the rest are counted.
_SHOWN = 5


@dataclass(frozen=True)
class MeasureOptions:
    """Which measures the reduction computes, on which data (config section ``measures``).

    ``choices``: one :class:`~lmdynamics.estimators.measures.Choice` per measure turned on;
    the default is the schema's defaults (:meth:`from_config` of them). Build from a config
    with :meth:`from_config`; ``MeasureOptions(())`` computes none.
    """

    choices: tuple[Choice, ...] = field(default_factory=lambda: tuple(chosen(_DEFAULTS)))

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> MeasureOptions:
        """The options of config section ``measures`` as :func:`lmdynamics.options.resolve`
        returns it (every measure's entry, defaults filled in)."""
        return cls(tuple(chosen(section)))

    def config(self) -> dict[str, dict[str, Any]]:
        """The choices as a config section (measures turned off are absent)."""
        return {c.measure.name: {"data": list(c.data),
                                 **({"reference": list(c.reference)}
                                    if c.measure.comparative else {}),
                                 **c.parameters} for c in self.choices}

    def attrs(self) -> dict[str, str]:
        """Store attribute ``measures``: :meth:`config` as canonical JSON (per-size metrics
        must agree on it to be combined)."""
        return {"measures": json.dumps(self.config(), sort_keys=True, separators=(",", ":"))}


class MeasureReduction:
    """The measures of one size (module docstring). Call :meth:`on_blocks` with each
    (component, layer)'s activations at every step (the CKA pass does), then
    :meth:`dataset`."""

    def __init__(self, options: MeasureOptions, stores: Mapping[int, xr.Dataset], *,
                 final_step: int, per_divisor_kind: str, per_truncate: bool):
        self.options, self.stores = options, stores
        self.steps = list(stores)
        self.final_index = self.steps.index(final_step)
        ref = stores[final_step]
        self.attrs = ref.attrs
        self.size = str(ref.attrs.get("size"))
        self.components = [str(c) for c in ref.component.values]
        self.n_layers = int(ref.sizes["layer"])
        self.divisor_kind, self.truncate = per_divisor_kind, per_truncate
        #: stored precision of the activations: the CCA bases' rank threshold
        self.unit_roundoff = float(np.finfo(ref["activations"].dtype).eps) / 2
        self.comparative = [c for c in options.choices if c.measure.comparative]
        shape = (len(self.components), self.n_layers, len(self.steps))
        self.values: dict[tuple[str, str], np.ndarray] = {}
        for c in self.comparative:
            for reference in c.reference:
                full = shape if reference == "final" else (*shape, len(self.steps))
                self.values[c.measure.name, reference] = np.full(full, np.nan)
        #: most canonical correlations equal to 1 in one comparison, and where
        self.shared: tuple[int, str] = (0, "")

    @property
    def reads_activations(self) -> bool:
        """Whether a comparative measure is on (then the CKA pass hands over its blocks)."""
        return bool(self.comparative)

    def on_blocks(self, ci: int, layer: int, blocks: Sequence[np.ndarray]) -> None:
        """Every comparative measure of (component ``ci``, ``layer``) from its (token, dim)
        activations at each step (in step order); the blocks are not modified."""
        if not self.comparative:
            return
        fi = self.final_index
        if not any("pairwise" in c.reference for c in self.comparative):
            # against the final step only: one step's basis at a time besides the final's
            final = CenteredSVD.from_activations(blocks[fi], self.unit_roundoff)
            for si, block in enumerate(blocks):
                basis = final if si == fi else CenteredSVD.from_activations(
                    block, self.unit_roundoff)
                self._compare(ci, layer, si, fi, ActivationPair.of(basis, final))
            return
        bases = [CenteredSVD.from_activations(b, self.unit_roundoff) for b in blocks]
        for si, basis in enumerate(bases):
            for ti in range(si, len(bases)):
                pair = ActivationPair.of(basis, bases[ti])
                self._compare(ci, layer, si, ti, pair)
                if ti != si:
                    self._compare(ci, layer, ti, si, pair.reversed())

    def _compare(self, ci: int, layer: int, si: int, ti: int, pair: ActivationPair) -> None:
        if si != ti:  # a step against itself shares everything
            shared = unit_correlations(pair)
            if shared > self.shared[0]:
                self.shared = (shared, f"{self.components[ci]} layer {layer}, steps "
                                       f"{self.steps[si]} and {self.steps[ti]}")
        for c in self.comparative:
            value = c.measure.function(pair, c.parameters)
            if "pairwise" in c.reference:
                self.values[c.measure.name, "pairwise"][ci, layer, si, ti] = value
            if "final" in c.reference and ti == self.final_index:
                self.values[c.measure.name, "final"][ci, layer, si] = value

    def dataset(self) -> xr.Dataset:
        """Every measure variable (module docstring), float64, with ``long_name``,
        ``units`` and ``source`` attrs; warns about missing and undefined values."""
        data: dict[str, tuple] = {}
        dims = ("component", "layer", "step")
        for c in self.comparative:
            m = c.measure
            for reference in c.reference:
                name = m.variable("activations", reference)
                var_dims = dims if reference == "final" else (*dims, "step_ref")
                title = m.title if reference == "final" else m.title.replace(
                    "vs final step", "of step vs step_ref")
                data[name] = (var_dims, self.values[m.name, reference],
                              self._attrs(m, "activations", title))
        if self.shared[0]:
            count, where = self.shared
            warn(f"PWCCA/SVCCA of size {self.size}: up to {count} canonical correlations "
                 f"are exactly 1 ({where}): directions both steps' activations share, as when "
                 "the width exceeds what the distinct tokens span (too few tokens, or a layer "
                 "whose output depends on the token alone); SVCCA counts them as 1"
                 + (", and PWCCA's weights within them depend on an arbitrary basis (not "
                    "unique)" if count >= 2 else "")
                 + "; sample more tokens than twice the width (docs/guide/measures.md)")
        missing: dict[str, tuple[list[int], set[str]]] = {}
        for c in self.options.choices:
            if c.measure.comparative:
                continue
            for kind in c.data:
                data.update(self._single(c, kind, missing))
        for variable, (steps, names) in missing.items():
            warn(f"size {self.size}: the stores of steps {steps} lack {variable} (written "
                 f"before the extraction computed it), so {', '.join(sorted(set(names)))} "
                 "are NaN there; rerun those extractions to add it (snakemake --forcerun "
                 "extract, or delete the stores)")
        ds = xr.Dataset(data, coords={"component": np.array(self.components, dtype=object),
                                      "layer": np.arange(self.n_layers),
                                      "step": np.array(self.steps, dtype=np.int64)})
        if "step_ref" in ds.dims:
            ds = ds.assign_coords(step_ref=np.array(self.steps, dtype=np.int64))
        if "head" in ds.dims:  # sizes with other head counts: NaN where a size has no head
            ds = ds.assign_coords(head=np.arange(ds.sizes["head"]))
        absent = {name: set(steps) for steps, names in missing.values() for name in names}
        self._warn_undefined(ds, absent)
        return ds

    @staticmethod
    def _attrs(m: Any, kind: str, title: str | None = None) -> dict[str, str]:
        return {"long_name": f"{title or m.title} ({kind})", "units": m.unit,
                "source": m.source, "measure": m.name}

    def _single(self, c: Choice, kind: str, missing: dict) -> dict[str, tuple]:
        """One single-checkpoint measure on one data kind, over every step."""
        m = c.measure
        variable = MEASURE_INPUTS[m.input, kind]
        name = m.variable(kind)
        ov = kind == "ov_circuit"
        per_step = []
        for step, ds in self.stores.items():
            if variable not in ds:
                steps, names = missing.setdefault(variable, ([], set()))
                if step not in steps:
                    steps.append(step)
                names.update({name, f"{name}_heads"} if ov else {name})
                per_step.append(None)
                continue
            per_step.append(self._apply(c, self._checked(ds, variable, ov)))
        if ov:
            heads = max((v.shape[1] for v in per_step if v is not None), default=0)
            values = np.full((self.n_layers, heads, len(self.steps)), np.nan)
            for si, v in enumerate(per_step):
                if v is not None:
                    values[:, :v.shape[1], si] = v
            mean = np.full((len(self.components), self.n_layers, len(self.steps)), np.nan)
            if "attention" in self.components and heads:
                mean[self.components.index("attention")] = values.mean(axis=1)
            return {f"{name}_heads": (("layer", "head", "step"), values,
                                      self._attrs(m, "each head's OV circuit")),
                    name: (("component", "layer", "step"), mean,
                           self._attrs(m, "OV circuit, mean over heads"))}
        values = np.full((len(self.components), self.n_layers, len(self.steps)), np.nan)
        for si, v in enumerate(per_step):
            if v is not None:
                values[..., si] = v
        return {name: (("component", "layer", "step"), values, self._attrs(m, kind))}

    def _checked(self, ds: xr.Dataset, variable: str, ov: bool) -> xr.DataArray:
        """``ds[variable]`` if its layout is what the extraction writes (leading dims
        (component, layer) or (layer, head), the store's sizes, every element statistic);
        else :class:`~lmdynamics.store.IncompleteStoreError` naming the store."""
        da = ds[variable]
        lead = (("layer", "head"), (self.n_layers, None)) if ov else (
            ("component", "layer"), (len(self.components), self.n_layers))
        ok = da.ndim == 3 and da.dims[:2] == lead[0] and all(
            want is None or want == got for want, got in zip(lead[1], da.shape, strict=False))
        if ok and da.dims[2] == "element_stat":
            ok = set(ELEMENT_STATS) <= {str(k) for k in da["element_stat"].values}
        if not ok:
            path = ds.attrs.get("path", "a per-pair store")
            raise IncompleteStoreError(
                f"{path}: {variable} has dims {da.dims} shape {da.shape}, not what the "
                f"extraction writes (leading dims {lead[0]} of sizes "
                f"{tuple('any' if w is None else w for w in lead[1])}); {redo_hint(path)}")
        return da

    def _apply(self, c: Choice, da: xr.DataArray) -> np.ndarray:
        """The measure on every matrix of one store's input variable: its leading two dims
        (component, layer) or (layer, head) -> values."""
        m = c.measure
        arr = da.values.astype(np.float64)
        out = np.full(arr.shape[:2], np.nan)
        if m.input == "elements":
            keys = [str(k) for k in da["element_stat"].values]
            for idx in np.ndindex(*arr.shape[:2]):
                out[idx] = m.function(dict(zip(keys, arr[idx], strict=True)))
            return out
        ctx = SpectrumContext(self._divisor(arr.shape[-1]), self.truncate)
        for idx in np.ndindex(*arr.shape[:2]):
            s = arr[idx]
            out[idx] = m.function(s, ctx) if np.isfinite(s).all() else np.nan
        return out

    def _divisor(self, k: int) -> int:
        return per_divisor(self.divisor_kind, n_singular_values=k,
                           hidden_size=int(self.attrs["hidden_size"]),
                           num_attention_heads=int(self.attrs["num_attention_heads"]))

    def _warn_undefined(self, ds: xr.Dataset, absent: Mapping[str, set[int]]) -> None:
        """One warning per variable with NaN values at steps whose stores have its input
        (the means over heads repeat their heads' warnings; pairwise variables repeat the
        final step's column)."""
        for name in ds.data_vars:
            da = ds[name]
            if str(name).endswith("_ov") or "step_ref" in da.dims:
                continue
            present = ~da["step"].isin(sorted(absent.get(str(name), ())))
            values = da.where(present, 0.0).values
            nan = np.argwhere(np.isnan(values))
            if nan.size == 0:
                continue
            places = "; ".join(", ".join(f"{d} {da[d].values[i]}" for d, i in
                                         zip(da.dims, idx, strict=True))
                               for idx in nan[:_SHOWN])
            more = f" and {len(nan) - _SHOWN} more" if len(nan) > _SHOWN else ""
            why = MEASURES[str(da.attrs["measure"])].undefined
            warn(f"{name} of size {self.size} is NaN (undefined: {why}) at {len(nan)} "
                 f"place(s): {places}{more}")


"""Per-checkpoint statistics of the Conjecture post, collected during the extraction pass.

After :func:`lmdynamics.extraction.passes.run_pass` the model holds its weights and the gradients of
the LM loss on the eval batch; :class:`ResidualRecorder` hooks (passed to ``run_pass`` as
``extra_hooks``) have seen every block's output. :func:`checkpoint_stats` turns those,
the sampled layer outputs of the pass and the size's reference store (what the statistics
need of the step-0 and final checkpoints, computed once per size:
:mod:`lmdynamics.extraction.reference`) into an :class:`xarray.Dataset` of ``stat_*``
variables that the extraction job merges into the per-pair store (layout:
``docs/architecture.md``, "Conjecture statistics"). No second forward pass is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import xarray as xr

from lmdynamics import families
from lmdynamics.estimators.spectrum import power_law_slope
from lmdynamics.extraction.names import MODULE_ORDER, param_key  # noqa: F401
from lmdynamics.extraction.spectra import singular_values
from lmdynamics.extraction.stats import (
    DISTRIBUTIONS,
    QUANTILES,
    circuit_directions,
    compare_to_reference,
    direction_closeness,
    distribution_summary,
    embedding_correlation,
)
from lmdynamics.options import defaults, resolve

if TYPE_CHECKING:
    from lmdynamics.extraction.reference import ReferenceStore

#: Activation sites: the residual stream after each block, and what attention and the MLP
#: write to it (the ``activations`` variable of the per-pair store).
SITES: tuple[str, ...] = ("residual", "attention", "mlp")
#: Circuits whose top singular directions are compared with the final checkpoint's.
CIRCUITS: tuple[str, ...] = ("mlp", "ov")
#: Entries of the ``shape_stat`` dimension (see
#: :func:`lmdynamics.extraction.stats.distribution_summary`).
SHAPE_STATS: tuple[str, ...] = (
    "mean", "std", "kurtosis", "max_abs", "loglik_gaussian", "loglik_logistic",
    "ppcc_gaussian", "ppcc_logistic", "tail_ratio_gaussian", "tail_ratio_logistic",
    "logistic_scale")
#: Entries of the ``param_stat`` dimension.
PARAM_STATS: tuple[str, ...] = ("norm", "grad_norm", "dist_init", "rel_dist_init", "cos_init",
                                "cos_final")



_DEFAULTS = defaults("conjecture")
#: The keys of config section ``conjecture`` that :class:`StatsOptions` holds.
STATS_KEYS = ("max_elements", "top_k", "embedding_tokens", "spectrum_fit")


@dataclass(frozen=True)
class StatsOptions:
    """What :func:`checkpoint_stats` needs besides the model.

    ``reference``: the size's reference store (:func:`lmdynamics.extraction.reference.
    build_reference` of its step-0 and final checkpoints). ``max_elements``: sample size of
    quantiles and fits (moments and max |x| use every element). ``top_k``: singular
    directions compared with the final checkpoint's. ``embedding_tokens``: rows of the
    embedding correlation. ``spectrum_fit``: rank window (fractions) of the power-law fit.
    Defaults, ranges and their checks: config section ``conjecture`` of the schema
    (:func:`lmdynamics.options.resolve`); ``seed``: config ``seed``.
    """

    reference: Path
    max_elements: int = _DEFAULTS["max_elements"]
    top_k: int = _DEFAULTS["top_k"]
    embedding_tokens: int = _DEFAULTS["embedding_tokens"]
    spectrum_fit: tuple[float, float] = tuple(_DEFAULTS["spectrum_fit"])
    seed: int = resolve("seed")

    @classmethod
    def from_config(cls, reference: Path, conjecture: Mapping[str, Any], *,
                    seed: int) -> StatsOptions:
        """The options of config section ``conjecture`` (as :func:`lmdynamics.options.resolve`
        returns it) and the config's ``seed``, for the reference store ``reference``."""
        return cls(Path(reference), seed=seed,
                   **{k: tuple(v) if k == "spectrum_fit" else v
                      for k, v in conjecture.items() if k in STATS_KEYS})

    def __post_init__(self) -> None:
        resolve("conjecture", {k: list(v) if k == "spectrum_fit" else v
                               for k, v in asdict(self).items() if k in STATS_KEYS})
        resolve("seed", self.seed)
        lo, hi = self.spectrum_fit
        if not lo < hi:
            raise ValueError(f"conjecture.spectrum_fit={list(self.spectrum_fit)!r}: allowed "
                             "two fractions lo < hi")


class ResidualRecorder:
    """Forward hooks on every block (the family's layers): the residual stream after each.

    Records max |x| over every position of the batch (:attr:`max_abs`, (L,), NaN when the
    block's output holds a NaN) and the block output at the sampled positions
    (:meth:`sampled`, (L, N, D) float32 on CPU). Pass :meth:`hooks` as ``extra_hooks`` to
    :func:`lmdynamics.extraction.passes.run_pass`. Both stay on the model's device until
    read, so the hooks never wait for the GPU.
    """

    def __init__(self, model: torch.nn.Module):
        self.blocks = families.for_model(model).blocks(model)
        self._max: list[torch.Tensor | None] = [None] * len(self.blocks)
        self._sampled: list[list[torch.Tensor]] = [[] for _ in self.blocks]

    def hooks(self, seq: torch.Tensor, pos: torch.Tensor, first: bool = False) -> list[Any]:
        """Register the hooks for one micro-batch (``seq``, ``pos`` index its sampled
        positions; ``first``: a new pass starts, forget what was recorded); returns the
        handles, which the caller removes."""
        if first:
            self._max = [None] * len(self.blocks)
            self._sampled = [[] for _ in self.blocks]
        return [block.register_forward_hook(self._hook(i, seq, pos))
                for i, block in enumerate(self.blocks)]

    def _hook(self, i: int, seq: torch.Tensor, pos: torch.Tensor) -> Callable:
        def hook(_module, _inputs, output):
            hidden = (output[0] if isinstance(output, tuple) else output).detach()
            # amax and maximum propagate NaN: a NaN anywhere makes the layer's maximum NaN
            peak = hidden.abs().amax().float()
            self._max[i] = peak if self._max[i] is None else torch.maximum(self._max[i], peak)
            self._sampled[i].append(hidden[seq, pos])
        return hook

    @property
    def max_abs(self) -> np.ndarray:
        """(L,) float64: max |x| of each block's output over the batch (0 before a pass)."""
        return np.array([0.0 if m is None else float(m) for m in self._max], dtype=np.float64)

    def sampled(self) -> np.ndarray:
        """Block outputs at the sampled positions, (L, N, D) float32."""
        return np.stack([torch.cat(parts).to("cpu", torch.float32).numpy()
                         for parts in self._sampled])


def shape_row(summary: dict[str, Any] | None) -> np.ndarray:
    """One :func:`distribution_summary` as a float64 row over :data:`SHAPE_STATS` (NaN for
    None, e.g. a parameter without a gradient)."""
    if summary is None:
        return np.full(len(SHAPE_STATS), np.nan)
    row = []
    for name in SHAPE_STATS:
        key, _, dist = name.rpartition("_")
        if key in ("loglik", "ppcc", "tail_ratio"):
            row.append(summary[key][DISTRIBUTIONS.index(dist)])
        else:
            row.append(summary[name])
    return np.array(row, dtype=np.float64)


def _shape_vars(prefix: str, dims: tuple[str, ...], summaries: list[dict[str, Any] | None],
                shape: tuple[int, ...]) -> dict[str, tuple]:
    """``<prefix>`` (dims, shape_stat) and ``<prefix>_quantile`` (dims, quantile)."""
    nan_q = np.full(len(QUANTILES), np.nan)
    return {
        prefix: ((*dims, "shape_stat"),
                 np.stack([shape_row(s) for s in summaries]).reshape(*shape, -1)),
        f"{prefix}_quantile": ((*dims, "quantile"), np.stack(
            [s["quantile"] if s is not None else nan_q for s in summaries]).reshape(*shape, -1)),
    }


def parameter_stats(model: torch.nn.Module, opts: StatsOptions,
                    refs: ReferenceStore) -> tuple[list[str], dict]:
    """Per parameter: norms, distance and cosine to step 0 and to the final checkpoint
    (``refs``: the size's reference store, each tensor read once), distribution of weights
    and of gradients. Returns (store names, variables over ``param``)."""
    family = families.for_model(model)
    names: list[str] = []
    rows: list[list[float]] = []
    w_sum: list[dict[str, Any] | None] = []
    g_sum: list[dict[str, Any] | None] = []
    for name, p in model.named_parameters():
        w = p.detach()
        # references in the model's dtype: at step 0 the distance is exactly 0
        to_init = compare_to_reference(w, refs.init(name).to(w.dtype))
        to_final = compare_to_reference(w, refs.final(name).to(w.dtype))
        grad = p.grad
        names.append(param_key(name, family))
        rows.append([float(torch.linalg.vector_norm(w.double())),
                     float(torch.linalg.vector_norm(grad.double())) if grad is not None
                     else np.nan,
                     to_init["dist"], to_init["rel_dist"], to_init["cos"], to_final["cos"]])
        w_sum.append(distribution_summary(w, max_elements=opts.max_elements, seed=opts.seed))
        g_sum.append(distribution_summary(grad, max_elements=opts.max_elements, seed=opts.seed)
                     if grad is not None else None)
    n = len(names)
    return names, {
        "stat_param": (("param", "param_stat"), np.array(rows, dtype=np.float64), {
            "description": "Frobenius norms of weights and gradient; distance, relative "
                           "distance and cosine to step 0; cosine to the final step"}),
        **_shape_vars("stat_weight", ("param",), w_sum, (n,)),
        **_shape_vars("stat_grad", ("param",), g_sum, (n,)),
    }


def spectrum_stats(model: torch.nn.Module, opts: StatsOptions) -> tuple[list[str], dict]:
    """Singular values (descending, NaN-padded to the longest) and the power-law exponent
    of every 2-D weight. Returns (matrix names, variables over ``matrix``)."""
    names, spectra = [], []
    family = families.for_model(model)
    for name, p in model.named_parameters():
        if p.ndim == 2:  # singular values: the same for GPT-2's transposed Conv1D weights
            names.append(param_key(name, family).removesuffix(".weight"))
            spectra.append(singular_values(p.detach()))
    width = max(len(s) for s in spectra)
    padded = np.full((len(spectra), width), np.nan)
    for i, s in enumerate(spectra):
        padded[i, :len(s)] = s
    lo, hi = opts.spectrum_fit
    slopes = np.array([power_law_slope(s, lo, hi) for s in spectra])
    return names, {
        "stat_spectrum": (("matrix", "sv"), padded, {"long_name": "singular values"}),
        "stat_spectrum_slope": (("matrix",), slopes, {
            "long_name": "alpha of sigma_k ~ k^-alpha", "fit_ranks": [lo, hi]}),
    }


def activation_stats(sites: dict[str, np.ndarray], opts: StatsOptions) -> dict:
    """Distribution of each site's sampled activations per layer; ``sites`` maps each of
    :data:`SITES` to an (L, N, D) array. Variables over (site, layer)."""
    summaries = [distribution_summary(torch.from_numpy(sites[s][layer]),
                                      max_elements=opts.max_elements, seed=opts.seed)
                 for s in SITES for layer in range(sites[SITES[0]].shape[0])]
    n_layers = sites[SITES[0]].shape[0]
    return _shape_vars("stat_act", ("site", "layer"), summaries, (len(SITES), n_layers))


def direction_stats(model: torch.nn.Module, opts: StatsOptions, refs: ReferenceStore) -> dict:
    """Closeness of the top-k singular directions of each MLP-out and (mean over heads) OV
    matrix to the final checkpoint's (read from the reference store ``refs``):
    ``stat_direction_closeness`` (circuit, layer)."""
    params = dict(model.named_parameters())
    family = families.for_model(model)
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    out = np.full((len(CIRCUITS), n_layers), np.nan)
    for layer in range(n_layers):
        now = circuit_directions(lambda n: params[n].detach(), layer, n_heads, opts.top_k,
                                 family)
        ref = refs.directions(layer)
        for c, circuit in enumerate(CIRCUITS):
            out[c, layer] = np.mean([direction_closeness(u, r)
                                     for u, r in zip(now[circuit], ref[circuit], strict=True)])
    return {"stat_direction_closeness": (("circuit", "layer"), out, {
        "long_name": "mean best |cosine| of the final top-k singular directions",
        "top_k": opts.top_k})}


def checkpoint_stats(model: torch.nn.Module, sampled: dict[str, np.ndarray],
                     residual_max_abs: np.ndarray, opts: StatsOptions,
                     refs: ReferenceStore) -> xr.Dataset:
    """Every ``stat_*`` variable of one checkpoint (see docs/architecture.md).

    ``model``: after the pass (weights and ``.grad`` populated). ``refs``: the size's
    reference store, opened (and checked against ``model``) by the caller. ``sampled``: (L, N, D)
    activations per site of :data:`SITES`. ``residual_max_abs``: (L,) max |x| of each
    block's output over the whole eval batch.
    """
    family = families.for_model(model)
    with torch.no_grad():
        params, param_vars = parameter_stats(model, opts, refs)
        matrices, spectrum_vars = spectrum_stats(model, opts)
        act_vars = activation_stats(sampled, opts)
        direction_vars = direction_stats(model, opts, refs)
        corr = embedding_correlation(family.token_embedding(model).weight,
                                     opts.embedding_tokens)
    n_layers = len(residual_max_abs)
    sv_width = spectrum_vars["stat_spectrum"][1].shape[1]
    return xr.Dataset(
        {**param_vars, **spectrum_vars, **act_vars, **direction_vars,
         "stat_resid_max_abs": (("layer",), np.asarray(residual_max_abs, np.float64), {
             "long_name": "max |x| of the block output over the eval batch"}),
         "stat_embedding_corr": (("emb_row", "emb_col"), corr.astype(np.float32), {
             "long_name": "Pearson correlation of token embeddings "
                          f"({family.input_embeddings[0]} rows)"})},
        coords={"param": np.array(params, dtype=object),
                "matrix": np.array(matrices, dtype=object),
                "quantile": np.array(QUANTILES),
                "shape_stat": np.array(SHAPE_STATS, dtype=object),
                "param_stat": np.array(PARAM_STATS, dtype=object),
                "site": np.array(SITES, dtype=object), "layer": np.arange(n_layers),
                "circuit": np.array(CIRCUITS, dtype=object), "sv": np.arange(sv_width),
                "emb_row": np.arange(corr.shape[0]), "emb_col": np.arange(corr.shape[0])},
    )

"""What the measures (:mod:`lmdynamics.estimators.measures`) need of a checkpoint beyond the
activations and the write matrices' spectra, computed in the extraction job on the model's
device after its pass, so no matrix is stored:

- ``activation_singular_values`` (component, layer, act_k): singular values of each layer's
  sampled activations (tokens x dim, uncentred), descending, act_k = min(tokens, dim), by the
  Gram route of :func:`lmdynamics.extraction.spectra.singular_values` (as the write matrices');
- ``ov_singular_values`` (layer, head, ov_k): singular values of each attention head's OV
  circuit ``W_O^h W_V^h`` (d x d, rank <= head_dim; the family's ``ov_weights``), from the
  factors (:func:`~lmdynamics.extraction.spectra.factored_singular_values`), ov_k = head_dim;
- ``weight_element_stats``, ``grad_element_stats``, ``activation_element_stats`` (component,
  layer, element_stat): :data:`lmdynamics.estimators.sparsity.ELEMENT_STATS` of each write
  matrix, its gradient and the sampled activations, from which the reduction takes the Gini
  index, Hoyer sparsity and max norm (exact up to float64 rounding: the module docstring of
  :mod:`lmdynamics.estimators.sparsity`).

Gradients are the write matrices' ``.grad`` after the pass: the eval batch's LM-loss gradient,
reduced in float32 and held in the model's dtype (as the Conjecture statistics read them).
With ``extraction.gradient_protocol: paper_code`` there is no single gradient (its singular
values are a mean over two batches), so ``grad_element_stats`` is NaN. The extraction computes
all of this whatever measures the config turns on (it costs a few sorts and small
factorisations next to the pass: benchmarks/measures.py), so choosing measures never reruns
an extraction; stores written before this module existed lack these variables, and the
measures that need them are NaN with a logged reason until those extractions are rerun.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import xarray as xr

from lmdynamics import families
from lmdynamics.estimators.sparsity import ELEMENT_STATS, element_stats_sorted
from lmdynamics.extraction.names import MEASURE_INPUTS
from lmdynamics.extraction.passes import COMPONENTS
from lmdynamics.extraction.spectra import factored_singular_values, singular_values

__all__ = ["element_statistics", "measure_data", "ov_singular_values"]


def element_statistics(x: torch.Tensor | None) -> np.ndarray:
    """:data:`~lmdynamics.estimators.sparsity.ELEMENT_STATS` of every element of ``x``, float64
    (len(ELEMENT_STATS),), computed on ``x``'s device: the magnitudes sorted in ``x``'s own
    dtype (exact; on the CPU by numpy, float32 for half precision, which holds every such
    value), then summed in float64. All NaN for None (no gradient); all but the count NaN when
    an element is not finite."""
    if x is None:
        return np.full(len(ELEMENT_STATS), np.nan)
    flat = x.detach().reshape(-1)
    n = flat.numel()
    if n == 0 or not bool(torch.isfinite(flat).all()):
        return np.array([float(n), *[math.nan] * (len(ELEMENT_STATS) - 1)])
    if flat.device.type == "cpu":  # numpy's sort is several times faster than torch's here
        c = np.sort(np.abs(flat.to(torch.float64 if flat.dtype == torch.float64
                                   else torch.float32).numpy())).astype(np.float64)
        return element_stats_sorted(c)
    c = torch.sort(flat.abs()).values.to(torch.float64)
    weights = 2.0 * torch.arange(1, n + 1, dtype=torch.float64, device=c.device) - (n + 1)
    values = {"count": float(n), "l1": float(c.sum()),
              "l2": float(torch.linalg.vector_norm(c)), "max_abs": float(c[-1]),
              "gini_sum": float((weights * c).sum())}
    return np.array([values[k] for k in ELEMENT_STATS], dtype=np.float64)


def ov_singular_values(model: torch.nn.Module) -> np.ndarray:
    """(layer, head, head_dim) float64: singular values of every head's ``W_O^h W_V^h``,
    descending (the family's ``ov_weights``; grouped-query heads share their value rows)."""
    family = families.for_model(model)
    params = dict(model.named_parameters())
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    out = []
    for layer in range(n_layers):
        stored, values = family.ov_weights(lambda n: params[n].detach(), layer, n_heads)
        w_out = family.write_matrix(stored)  # (d, heads * head_dim)
        head = w_out.shape[1] // n_heads
        lefts = w_out.reshape(w_out.shape[0], n_heads, head).permute(1, 0, 2)
        out.append(factored_singular_values(lefts, torch.stack(list(values))))
    return np.stack(out)


def measure_data(model: torch.nn.Module, activations: np.ndarray) -> xr.Dataset:
    """The variables of the module docstring for one checkpoint after its pass.

    ``model``: weights and the write matrices' ``.grad`` populated; ``activations``:
    (component, layer, token, dim) of the pass (what the store holds). Coordinates
    ``component`` and ``layer`` as the store's; ``element_stat`` names the statistics.
    """
    family = families.for_model(model)
    modules = family.write_modules(model)
    device = next(model.parameters()).device
    n_comp, n_layers = activations.shape[:2]
    with torch.no_grad():
        act_sv, weight, grad, act = [], [], [], []
        for ci, comp in enumerate(COMPONENTS):
            blocks = [torch.from_numpy(np.ascontiguousarray(activations[ci, layer])).to(device)
                      for layer in range(n_layers)]
            act_sv.append(np.stack([singular_values(b) for b in blocks]))
            act.append([element_statistics(b) for b in blocks])
            weight.append([element_statistics(family.write_matrix(m.weight))
                           for m in modules[comp]])
            grad.append([element_statistics(m.weight.grad) for m in modules[comp]])
        ov = ov_singular_values(model)
    dims = ("component", "layer", "element_stat")
    stats = {"weights": weight, "gradients": grad, "activations": act}
    data = {MEASURE_INPUTS["elements", kind]: (dims, np.array(values, dtype=np.float64), {
        "description": f"statistics of the |elements| of each layer's {kind} (Gini sum: "
                       "sum_k (2k - N - 1) c_(k) over the ascending magnitudes)"})
        for kind, values in stats.items()}
    data[MEASURE_INPUTS["spectrum", "activations"]] = (
        ("component", "layer", "act_k"), np.stack(act_sv),
        {"description": "singular values of the sampled activations (tokens x dim, "
                        "uncentred), descending"})
    data[MEASURE_INPUTS["spectrum", "ov_circuit"]] = (
        ("layer", "head", "ov_k"), ov,
        {"description": "singular values of each head's OV circuit W_O^h W_V^h, descending"})
    return xr.Dataset(data, coords={
        "component": np.array(COMPONENTS[:n_comp], dtype=object),
        "layer": np.arange(n_layers),
        "element_stat": np.array(ELEMENT_STATS, dtype=object)})

"""Store names of model parameters, shared by the extraction, which writes them, and the
reduction, which sorts and splits them. No torch: the reductions import this module.

A block parameter is ``layer<i>.<module>.<kind>`` (the family's module path, e.g.
``layer3.mlp.dense_4h_to_h.weight``, ``layer3.self_attn.o_proj.weight``); any other is its
name under the family's trunk (``embed_in.weight``, ``model.norm.weight`` ->
``norm.weight``), renamed by the family's ``store_renames`` (GPT-NeoX's ``lm_head`` is
``embed_out``, as in Pythia's files). GPT-NeoX's names are those the stores have always had.
"""

from __future__ import annotations

import re

from lmdynamics import families
from lmdynamics.families import Family

#: Order of a GPT-NeoX block's modules in the stores (other families: ``module_order``).
MODULE_ORDER: tuple[str, ...] = families.get("gpt_neox").module_order


def _family(family: Family | str | None) -> Family:
    return family if isinstance(family, Family) else families.get(family)


def param_key(name: str, family: Family | str | None = None) -> str:
    """Store name of a parameter (default family GPT-NeoX):
    ``gpt_neox.layers.3.mlp.dense_4h_to_h.weight`` -> ``layer3.mlp.dense_4h_to_h.weight``;
    ``gpt_neox.embed_in.weight`` -> ``embed_in.weight``; ``lm_head.weight`` ->
    ``embed_out.weight``."""
    fam = _family(family)
    rest = name.removeprefix(f"{fam.base}.")
    m = re.match(rf"^{re.escape(fam.layers)}\.(\d+)\.(.+)$", rest)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}"
    module, _, kind = rest.rpartition(".")
    if not module:
        return fam.store_renames.get(rest, rest)
    return f"{fam.store_renames.get(module, module)}.{kind}"


def param_parts(key: str) -> tuple[int, str, str]:
    """(layer or -1, module, kind) of a store name: ``layer3.mlp.dense_4h_to_h.weight`` ->
    (3, ``mlp.dense_4h_to_h``, ``weight``); ``embed_in`` -> (-1, ``embed_in``, ``weight``)."""
    m = re.match(r"^layer(\d+)\.(.+)$", key)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (-1, key)
    module, _, kind = rest.rpartition(".")
    if kind not in ("weight", "bias"):
        module, kind = rest, "weight"
    return layer, module, kind


def param_sort_key(key: str, family: Family | str | None = None) -> tuple[int, int, int, str]:
    """Model order: input embeddings (in the family's order), layers in numeric order
    (modules in the family's ``module_order``, weight before bias), final norm,
    unembedding."""
    fam = _family(family)
    layer, module, kind = param_parts(key)
    order = fam.module_order if layer >= 0 else fam.input_embeddings
    rank = order.index(module) if module in order else len(order)
    unembedding = fam.store_renames.get(fam.unembedding, fam.unembedding)
    group = (1 if layer >= 0 else 0 if module in fam.input_embeddings
             else 3 if module == unembedding else 2)
    return (group, layer, 2 * rank + (kind == "bias"), key)


#: Per-pair store variable holding each measure's input, by (input, data kind) of
#: :mod:`lmdynamics.estimators.measures`; the extraction writes the last four
#: (:mod:`lmdynamics.extraction.measure_data`), the measures' reduction reads them all.
MEASURE_INPUTS: dict[tuple[str, str], str] = {
    ("activation_pair", "activations"): "activations",
    ("spectrum", "weights"): "weight_singular_values",
    ("spectrum", "gradients"): "grad_singular_values",
    ("spectrum", "activations"): "activation_singular_values",
    ("spectrum", "ov_circuit"): "ov_singular_values",
    ("elements", "weights"): "weight_element_stats",
    ("elements", "gradients"): "grad_element_stats",
    ("elements", "activations"): "activation_element_stats",
}

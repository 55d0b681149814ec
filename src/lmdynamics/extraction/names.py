"""Store names of model parameters (GPT-NeoX order), shared by the extraction, which
writes them, and the reduction, which sorts and splits them. No torch: the reductions import
this module."""

from __future__ import annotations

import re

#: Order of a block's modules in the stores (GPT-NeoX's own order).
MODULE_ORDER: tuple[str, ...] = (
    "input_layernorm", "post_attention_layernorm", "attention.query_key_value",
    "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h")
_LAYER_NAME = re.compile(r"^(?:gpt_neox\.)?layers\.(\d+)\.(.+)$")


def param_key(name: str) -> str:
    """Store name of a parameter: ``gpt_neox.layers.3.mlp.dense_4h_to_h.weight`` ->
    ``layer3.mlp.dense_4h_to_h.weight``; ``gpt_neox.embed_in.weight`` -> ``embed_in.weight``."""
    m = _LAYER_NAME.match(name)
    if m:
        return f"layer{m.group(1)}.{m.group(2)}"
    return "embed_out.weight" if name == "lm_head.weight" else name.removeprefix("gpt_neox.")


def param_parts(key: str) -> tuple[int, str, str]:
    """(layer or -1, module, kind) of a store name: ``layer3.mlp.dense_4h_to_h.weight`` ->
    (3, ``mlp.dense_4h_to_h``, ``weight``); ``embed_in`` -> (-1, ``embed_in``, ``weight``)."""
    m = re.match(r"^layer(\d+)\.(.+)$", key)
    layer, rest = (int(m.group(1)), m.group(2)) if m else (-1, key)
    module, _, kind = rest.rpartition(".")
    if kind not in ("weight", "bias"):
        module, kind = rest, "weight"
    return layer, module, kind


def param_sort_key(key: str) -> tuple[int, int, int, str]:
    """Model order: embed_in, layers in numeric order (modules in :data:`MODULE_ORDER`,
    weight before bias), final layer norm, embed_out."""
    layer, module, kind = param_parts(key)
    rank = MODULE_ORDER.index(module) if module in MODULE_ORDER else len(MODULE_ORDER)
    group = 1 if layer >= 0 else 0 if module == "embed_in" else 3 if module == "embed_out" else 2
    return (group, layer, 2 * rank + (kind == "bias"), key)

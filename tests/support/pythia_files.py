"""Pythia revisions as the Hugging Face hub serves them, written from facts, not by our code.

Every Pythia revision on the hub predates transformers 5; these builders write the files such
a revision holds from written-down facts about the real repositories, never by saving a
model with today's transformers (which would share our assumptions):

- ``config.json`` has the fields of the real ``EleutherAI/pythia-*-deduped`` configs,
  written by transformers 4.24.0 (``rotary_pct``, ``rotary_emb_base``,
  ``use_parallel_residual``, ``tie_word_embeddings: false``, ``torch_dtype: "float16"``;
  the list is the one ``tests/test_checkpoints.py::test_reads_pythia_style_config`` has
  carried, checked against published copies of those files); only the sizes are shrunk.
- Tensor names are transformers 4.x's GPT-NeoX names (shared/notes/reference-facts.md, "Key
  names as written by transformers 4.x"): the unembedding is ``embed_out.weight``, and each
  layer persists the buffers ``attention.bias`` (the causal mask, bool, 1 x 1 x context x
  context), ``attention.masked_bias`` (a scalar fill value) and
  ``attention.rotary_emb.inv_freq`` (the rotary frequencies).
- Weights are stored in float16 (reference-facts: "Weights are stored in float16").
- Layouts: ``pytorch_model.bin`` (what transformers 4.x ``save_pretrained`` wrote: a zip
  ``torch.save`` of the state dict), ``model.safetensors`` with the same names (the hub's
  safetensors conversion keeps every tensor), and, for larger sizes, shards
  ``pytorch_model-0000k-of-0000n.bin`` with ``pytorch_model.bin.index.json``
  (``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard}}``, transformers'
  sharded format).

The values are seeded random numbers shaped as the architecture requires; they only have to
be the same bytes every time a revision is asked for.
"""

from __future__ import annotations

import io
import json

import numpy as np
import safetensors.torch
import torch

#: Test architectures per Pythia size label: (hidden, layers, heads); tiny, but ordered like
#: the real ones (70m: 512 x 6 x 8, 160m: 768 x 12 x 12).
TEST_ARCHITECTURES = {"70m": (16, 2, 2), "160m": (24, 3, 2)}
#: Pythia's context (reference-facts: "context 2048"): the size of the persisted mask.
CONTEXT = 2048
ROTARY_PCT = 0.25
ROTARY_BASE = 10000


def pythia_config(hidden: int, layers: int, heads: int, vocab: int) -> dict:
    """``config.json`` as a Pythia revision has it (transformers 4.24.0's fields)."""
    return {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": "gelu", "hidden_size": hidden, "initializer_range": 0.02,
            "intermediate_size": 4 * hidden, "layer_norm_eps": 1e-05,
            "max_position_embeddings": CONTEXT, "model_type": "gpt_neox",
            "num_attention_heads": heads, "num_hidden_layers": layers,
            "rotary_emb_base": ROTARY_BASE, "rotary_pct": ROTARY_PCT,
            "tie_word_embeddings": False, "torch_dtype": "float16",
            "transformers_version": "4.24.0", "use_cache": True,
            "use_parallel_residual": True, "vocab_size": vocab}


def legacy_state_dict(hidden: int, layers: int, heads: int, vocab: int,
                      seed: int) -> dict[str, torch.Tensor]:
    """Tensors under transformers 4.x's GPT-NeoX names, float16, with the legacy buffers."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 0.02) -> torch.Tensor:
        return torch.from_numpy(rng.normal(0.0, scale, shape).astype(np.float16))

    def ones_ish(n: int) -> torch.Tensor:
        return torch.from_numpy((1.0 + rng.normal(0.0, 0.05, n)).astype(np.float16))

    rotary_dims = int(hidden // heads * ROTARY_PCT)
    inv_freq = 1.0 / ROTARY_BASE ** (torch.arange(0, rotary_dims, 2).float() / rotary_dims)
    mask = torch.tril(torch.ones(CONTEXT, CONTEXT, dtype=torch.bool)).view(1, 1, CONTEXT,
                                                                             CONTEXT)
    state = {"gpt_neox.embed_in.weight": normal(vocab, hidden)}
    for i in range(layers):
        p = f"gpt_neox.layers.{i}."
        state.update({
            p + "input_layernorm.weight": ones_ish(hidden),
            p + "input_layernorm.bias": normal(hidden),
            p + "post_attention_layernorm.weight": ones_ish(hidden),
            p + "post_attention_layernorm.bias": normal(hidden),
            p + "attention.bias": mask.clone(),
            p + "attention.masked_bias": torch.tensor(-1e9),
            p + "attention.rotary_emb.inv_freq": inv_freq.clone(),
            p + "attention.query_key_value.weight": normal(3 * hidden, hidden),
            p + "attention.query_key_value.bias": normal(3 * hidden),
            p + "attention.dense.weight": normal(hidden, hidden),
            p + "attention.dense.bias": normal(hidden),
            p + "mlp.dense_h_to_4h.weight": normal(4 * hidden, hidden),
            p + "mlp.dense_h_to_4h.bias": normal(4 * hidden),
            p + "mlp.dense_4h_to_h.weight": normal(hidden, 4 * hidden),
            p + "mlp.dense_4h_to_h.bias": normal(hidden),
        })
    state["gpt_neox.final_layer_norm.weight"] = ones_ish(hidden)
    state["gpt_neox.final_layer_norm.bias"] = normal(hidden)
    state["embed_out.weight"] = normal(vocab, hidden)
    return state


def torch_bytes(state: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def revision_files(size: str, seed: int, vocab: int, layout: str = "bin",
                   shards: int = 2) -> dict[str, bytes]:
    """The files of one revision of ``pythia-<size>-deduped``.

    ``layout``: ``bin`` (``pytorch_model.bin`` only, as most step branches), ``safetensors``
    (``model.safetensors`` with the legacy names) or ``sharded`` (``shards`` pickled shards
    and their index, tensors split in name order).
    """
    hidden, layers, heads = TEST_ARCHITECTURES[size]
    files = {"config.json": json.dumps(pythia_config(hidden, layers, heads, vocab), indent=2,
                                       sort_keys=True).encode() + b"\n"}
    state = legacy_state_dict(hidden, layers, heads, vocab, seed)
    if layout == "bin":
        files["pytorch_model.bin"] = torch_bytes(state)
    elif layout == "safetensors":
        files["model.safetensors"] = safetensors.torch.save(state, metadata={"format": "pt"})
    elif layout == "sharded":
        names = list(state)
        parts = np.array_split(np.arange(len(names)), shards)
        weight_map = {}
        for k, idx in enumerate(parts, start=1):
            shard = f"pytorch_model-{k:05d}-of-{shards:05d}.bin"
            files[shard] = torch_bytes({names[i]: state[names[i]] for i in idx})
            weight_map.update({names[i]: shard for i in idx})
        total = sum(t.numel() * t.element_size() for t in state.values())
        files["pytorch_model.bin.index.json"] = json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2).encode()
    else:
        raise ValueError(f"layout {layout!r}: bin, safetensors or sharded")
    return files

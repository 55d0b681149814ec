"""GPT-NeoX (``GPTNeoXForCausalLM``): Pythia and the PolyPythias.

Names and layout from transformers' ``models/gpt_neox/modeling_gpt_neox.py`` and Pythia's
checkpoints (shared/notes/reference-facts.md): blocks ``gpt_neox.layers.<i>`` with
``input_layernorm``, ``post_attention_layernorm``, ``attention.query_key_value`` (fused, laid
out per head as ``[q_h; k_h; v_h]``: ``GPTNeoXAttention`` views its output as
(..., heads, 3 * head_dim)), ``attention.dense``, ``mlp.dense_h_to_4h``, ``mlp.dense_4h_to_h``;
``gpt_neox.embed_in``, ``gpt_neox.final_layer_norm`` and the unembedding, ``embed_out`` in
Pythia's files and ``lm_head`` in transformers 5. Pre-LN, and with Pythia's
``use_parallel_residual`` attention and MLP read the same residual stream and add in parallel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmdynamics.families import Family, default_dims, known


def dims(config: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`lmdynamics.families.DIMS`; a missing ``intermediate_size`` stays None
    (transformers' default, 4 x hidden, is checked by the model built from it)."""
    return default_dims(config)


def parameters(config: Mapping[str, Any]) -> int:
    """Parameters: per layer two layer norms (4D), fused QKV (3D^2 + 3D), output (D^2 + D),
    MLP (2DI + I + D); input and (unless tied) output embeddings (VD each); final norm (2D).
    With I = 4D: ``L (12 D^2 + 13 D) + 2 V D + 2 D`` (Pythia-70m: 70,426,624)."""
    d = dims(config)
    h, n, v = d["hidden_size"], d["num_hidden_layers"], d["vocab_size"]
    i = d["intermediate_size"] or 4 * h
    per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * i + i + h
    embeddings = v * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return n * per_layer + embeddings + 2 * h


def tiny_config(*, hidden_size: int, num_layers: int, num_heads: int, seq_len: int,
                vocab_size: int) -> dict[str, Any]:
    """Pythia-like: MLP width 4 x hidden, rotary on 25% of each head's dimensions (base
    10000), parallel residual, untied embeddings, no dropout, initializer range 0.02."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, intermediate_size=4 * hidden_size, hidden_act="gelu",
        max_position_embeddings=seq_len, rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_dropout=0.0,
        attention_dropout=0.0, initializer_range=0.02, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=0, use_cache=False)


def shape_config(shape: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config.json`` of a documented shape (:attr:`Family.shape_config`): needs layers,
    hidden, vocab, MLP width and whether the embeddings are tied (not the heads)."""
    if not known(shape, "layers", "hidden", "vocab", "intermediate",
                 "tied_embeddings"):
        return None
    config = {"model_type": "gpt_neox", "hidden_size": shape["hidden"],
              "num_hidden_layers": shape["layers"], "num_attention_heads": shape.get("heads"),
              "intermediate_size": shape["intermediate"], "vocab_size": shape["vocab"],
              "tie_word_embeddings": shape["tied_embeddings"],
              "max_position_embeddings": shape.get("context")}
    return {k: v for k, v in config.items() if v is not None}


def ov_weights(weight, layer: int, n_heads: int):
    """``attention.dense.weight`` (d, d) and each head's value rows (head_dim, d) of the fused
    ``attention.query_key_value.weight`` (3d, d), viewed as (heads, [q, k, v], head_dim, d)."""
    pre = f"gpt_neox.layers.{layer}.attention."
    dense = weight(pre + "dense.weight")
    qkv = weight(pre + "query_key_value.weight")
    d = dense.shape[0]
    value = qkv.reshape(n_heads, 3, d // n_heads, d)[:, 2]
    return dense, [value[h] for h in range(n_heads)]


#: Persistent non-parameter buffers of GPT-NeoX files written by transformers 4.x (every
#: Pythia revision; shared/notes/reference-facts.md, "Key names as written by transformers
#: 4.x"): the causal mask ``attention.bias``, the fill value ``attention.masked_bias`` and the
#: rotary frequencies ``attention.rotary_emb.inv_freq`` of each layer.
LEGACY_BUFFERS = (r"(^|\.)layers\.\d+\.attention\.bias$",
                  r"(^|\.)layers\.\d+\.attention\.masked_bias$",
                  r"(^|\.)layers\.\d+\.attention\.rotary_emb\.inv_freq$")


GPT_NEOX = Family(
    name="gpt_neox",
    model_class="GPTNeoXForCausalLM",
    config_class="GPTNeoXConfig",
    model_types=("gpt_neox",),
    architectures=("GPTNeoXForCausalLM",),
    base="gpt_neox",
    layers="layers",
    attention_write="attention.dense",
    mlp_write="mlp.dense_4h_to_h",
    input_embeddings=("embed_in",),
    unembedding="embed_out",
    store_renames={"lm_head": "embed_out"},
    norm_placement="pre-LN (LayerNorm with bias) before attention and before the MLP; with "
                   "use_parallel_residual both read the block input and add in parallel; "
                   "final_layer_norm before the unembedding",
    module_order=("input_layernorm", "post_attention_layernorm", "attention.query_key_value",
                  "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    block_matrices=(("attention.query_key_value", "Attention QKV"),
                    ("attention.dense", "Attention write (dense)"),
                    ("mlp.dense_h_to_4h", "MLP in (h to 4h)"),
                    ("mlp.dense_4h_to_h", "MLP write (4h to h)")),
    dims=dims,
    parameters=parameters,
    tiny_config=tiny_config,
    shape_config=shape_config,
    ov_weights=ov_weights,
    paper_code_attention=True,
    legacy_buffers=LEGACY_BUFFERS,
)

"""Llama-style decoders: ``LlamaForCausalLM``, ``OlmoForCausalLM``, ``Olmo2ForCausalLM``.

Names and layout from transformers' ``models/llama/modeling_llama.py``,
``models/olmo/modeling_olmo.py`` and ``models/olmo2/modeling_olmo2.py`` (the checkpoints of
``meta-llama/Llama-2-7b-hf``, ``allenai/OLMo-1B-hf`` and ``allenai/OLMo-2-0425-1B`` use the same
keys): blocks ``model.layers.<i>`` with ``self_attn.{q,k,v,o}_proj`` (separate projections,
grouped-query attention when ``num_key_value_heads`` < ``num_attention_heads``: query head h
reads key/value head ``h // (heads / kv_heads)``), a gated MLP ``mlp.{gate,up,down}_proj``
(``down_proj(act(gate_proj(x)) * up_proj(x))``), ``model.embed_tokens``, ``model.norm`` and
``lm_head``; no biases by default. Rotary position embeddings on every head dimension.

Norm placement: Llama is pre-norm (RMSNorm ``input_layernorm`` before attention,
``post_attention_layernorm`` before the MLP); OLMo 1 the same with non-parametric LayerNorm
(no weights); OLMo 2 normalises each sublayer's *output* (``post_attention_layernorm`` after
``o_proj``, ``post_feedforward_layernorm`` after ``down_proj``) and adds RMSNorm on queries and
keys (``self_attn.q_norm``, ``k_norm``). So for OLMo 2 what a block writes to the residual
stream is the output of those norms (:attr:`Family.activation_sites`), while the write
matrices whose spectra give PER stay ``o_proj`` and ``down_proj``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmdynamics.families import Family, default_dims, known


def dims(config: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`lmdynamics.families.DIMS` (all written in a Llama-style ``config.json``)."""
    return default_dims(config)


def parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a Llama/OLMo/OLMo 2 config: per layer Q and O (D x H hd each), K and V
    (D x KV hd each), gate, up and down (D x I each), biases when ``attention_bias`` /
    ``mlp_bias``, and the norms of the model type (Llama: two RMSNorm weights of D; OLMo 1:
    none; OLMo 2: two of D plus q_norm (H hd) and k_norm (KV hd)); embeddings (VD, twice
    unless ``tie_word_embeddings``) and the final norm (D; none for OLMo 1)."""
    d = dims(config)
    h, n, v, i = (d["hidden_size"], d["num_hidden_layers"], d["vocab_size"],
                  d["intermediate_size"])
    heads = d["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    hd = config.get("head_dim") or h // heads
    attn = 2 * h * heads * hd + 2 * h * kv * hd
    if config.get("attention_bias"):
        attn += heads * hd + 2 * kv * hd + h
    mlp = 3 * h * i + ((2 * i + h) if config.get("mlp_bias") else 0)
    model_type = config.get("model_type")
    norms = {"olmo": 0, "olmo2": 2 * h + heads * hd + kv * hd}.get(model_type, 2 * h)
    final = 0 if model_type == "olmo" else h
    embeddings = v * h * (1 if config.get("tie_word_embeddings", False) else 2)
    return n * (attn + mlp + norms) + embeddings + final


def tiny_config(*, hidden_size: int, num_layers: int, num_heads: int, seq_len: int,
                vocab_size: int) -> dict[str, Any]:
    """Llama with the tiny suite's shape: MLP width 4 x hidden (the gated MLP then has 1.5x
    the MLP parameters of GPT-NeoX's; the width, not the count, is kept), one key/value head
    per query head, SiLU, RMSNorm eps 1e-5, rotary base 10000, no biases, untied
    embeddings, no dropout, initializer range 0.02."""
    return dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=num_heads, num_key_value_heads=num_heads,
        intermediate_size=4 * hidden_size, hidden_act="silu", max_position_embeddings=seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, initializer_range=0.02, bos_token_id=0, eos_token_id=0,
        use_cache=False)


def shape_config(shape: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config.json`` of a documented shape (:attr:`Family.shape_config`): needs layers,
    hidden, heads, vocab, MLP width, whether the embeddings are tied and the model type
    (whose norms have weights: none for ``olmo``); as many key/value heads as heads (a
    definition does not give their number; OLMo's configs) and no biases."""
    if not known(shape, "layers", "hidden", "heads", "vocab", "intermediate",
                 "tied_embeddings", "model_type"):
        return None
    config = {"model_type": shape["model_type"], "hidden_size": shape["hidden"],
              "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
              "num_key_value_heads": shape["heads"], "intermediate_size": shape["intermediate"],
              "vocab_size": shape["vocab"], "tie_word_embeddings": shape["tied_embeddings"],
              "attention_bias": False, "mlp_bias": False,
              "max_position_embeddings": shape.get("context")}
    return {k: v for k, v in config.items() if v is not None}


def ov_weights(weight, layer: int, n_heads: int):
    """``self_attn.o_proj.weight`` (d, H hd) and each query head's value rows (hd, d) of
    ``self_attn.v_proj.weight`` (KV hd, d): head h uses key/value head h // (H / KV)."""
    pre = f"model.layers.{layer}.self_attn."
    out = weight(pre + "o_proj.weight")
    value = weight(pre + "v_proj.weight")
    hd = out.shape[1] // n_heads
    group = n_heads // (value.shape[0] // hd)
    return out, [value[(h // group) * hd:(h // group + 1) * hd] for h in range(n_heads)]


LLAMA = Family(
    name="llama",
    model_class="LlamaForCausalLM",
    config_class="LlamaConfig",
    model_types=("llama", "olmo", "olmo2"),
    architectures=("LlamaForCausalLM", "OlmoForCausalLM", "Olmo2ForCausalLM"),
    base="model",
    layers="layers",
    attention_write="self_attn.o_proj",
    mlp_write="mlp.down_proj",
    input_embeddings=("embed_tokens",),
    unembedding="lm_head",
    norm_placement="Llama: pre-norm RMSNorm (input_layernorm, post_attention_layernorm), final "
                   "norm; OLMo: the same with non-parametric LayerNorm; OLMo 2: RMSNorm on each "
                   "sublayer's output before the residual add, and on queries and keys",
    module_order=("input_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                  "self_attn.v_proj", "self_attn.q_norm", "self_attn.k_norm",
                  "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj", "post_feedforward_layernorm"),
    block_matrices=(("self_attn.q_proj", "Attn Q"), ("self_attn.k_proj", "Attn K"),
                    ("self_attn.v_proj", "Attn V"),
                    ("self_attn.o_proj", "Attn write (o_proj)"),
                    ("mlp.gate_proj", "MLP gate"), ("mlp.up_proj", "MLP up"),
                    ("mlp.down_proj", "MLP write (down)")),
    dims=dims,
    parameters=parameters,
    tiny_config=tiny_config,
    shape_config=shape_config,
    ov_weights=ov_weights,
    activation_key="hidden_act",
    default_activation="silu",
    classes={"olmo": ("OlmoForCausalLM", "OlmoConfig"),
             "olmo2": ("Olmo2ForCausalLM", "Olmo2Config")},
    activation_sites={"olmo2": ("post_attention_layernorm", "post_feedforward_layernorm")},
)

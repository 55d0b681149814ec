"""GPT-2 (``GPT2LMHeadModel``).

Names and layout from transformers' ``models/gpt2/modeling_gpt2.py`` and the checkpoint of
``openai-community/gpt2``: blocks ``transformer.h.<i>`` with ``ln_1``, ``attn.c_attn`` (fused
QKV, output ``[q | k | v]`` each of width D, heads contiguous inside each: ``GPT2Attention``
splits the output in three along features, then views each as (..., heads, head_dim)),
``attn.c_proj``, ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``; ``transformer.wte`` (tokens),
``transformer.wpe`` (learned positions), ``transformer.ln_f`` and ``lm_head`` (tied to ``wte``
in the released models). The projections are ``Conv1D`` modules that store ``weight`` as
(in, out), the transpose of ``nn.Linear``'s, so :meth:`Family.write_matrix` transposes them;
singular values (PER) and activations (CKA) do not depend on it, singular vectors do.
Pre-LN with a final ``ln_f``. Files written by transformers 4.x also hold the causal-mask
buffers ``h.<i>.attn.bias`` and ``h.<i>.attn.masked_bias`` (:data:`LEGACY_BUFFERS`), and the
released checkpoint's keys lack the ``transformer.`` prefix (it was saved from ``GPT2Model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmdynamics.families import Family, default_dims, known

#: Persistent non-parameter buffers of GPT-2 files written by transformers before 4.30 (its
#: attention registered them with ``register_buffer`` and no ``persistent=False``): the causal
#: mask ``h.<i>.attn.bias`` (uint8 or bool, 1 x 1 x n_positions x n_positions) and the fill
#: value ``h.<i>.attn.masked_bias`` (a float scalar, -1e4). Today's
#: ``GPT2LMHeadModel._keys_to_ignore_on_load_unexpected`` lists ``attn.bias`` but not
#: ``masked_bias``, so transformers refuses Stanford CRFM's Mistral runs (transformers 4.5,
#: ``pytorch_model.bin``) with ``unexpected keys transformer.h.0.attn.masked_bias``. Sources:
#: transformers PR #11213 (both keys in ``_keys_to_ignore_on_load_missing``), issues #3974
#: (``masked_bias`` in 4.x files) and #29725 (4.24 files refused by 4.38 for both keys).
LEGACY_BUFFERS = (r"(^|\.)h\.\d+\.attn\.bias$", r"(^|\.)h\.\d+\.attn\.masked_bias$")
#: GPT-2's config keys for transformers' common names (``GPT2Config.attribute_map``).
RENAMES = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer",
           "num_attention_heads": "n_head", "max_position_embeddings": "n_positions",
           "intermediate_size": "n_inner"}


def dims(config: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`lmdynamics.families.DIMS` from GPT-2's keys (``n_embd``, ...); ``n_inner``
    null means 4 x ``n_embd``."""
    hidden = config.get("n_embd")
    default = 4 * hidden if isinstance(hidden, int) and not isinstance(hidden, bool) else None
    return default_dims(config, default_intermediate=default, renames=RENAMES)


def parameters(config: Mapping[str, Any]) -> int:
    """Per layer two layer norms (4D), ``c_attn`` (3D^2 + 3D), ``attn.c_proj`` (D^2 + D),
    ``c_fc`` (DI + I), ``mlp.c_proj`` (ID + D); token (VD) and position (PD) embeddings,
    ``ln_f`` (2D) and, unless tied (the default), ``lm_head`` (VD). GPT-2 small:
    124,439,808."""
    d = dims(config)
    h, n, v, i = (d["hidden_size"], d["num_hidden_layers"], d["vocab_size"],
                  d["intermediate_size"])
    per_layer = 4 * h + 3 * h * h + 3 * h + h * h + h + 2 * h * i + i + h
    tied = config.get("tie_word_embeddings", True)
    return (n * per_layer + v * h * (1 if tied else 2) + d["max_position_embeddings"] * h
            + 2 * h)


def tiny_config(*, hidden_size: int, num_layers: int, num_heads: int, seq_len: int,
                vocab_size: int) -> dict[str, Any]:
    """GPT-2 with the tiny suite's shape: MLP width 4 x hidden, ``gelu_new``, learned
    positions for ``seq_len`` tokens, no dropout, LayerNorm eps 1e-5, untied embeddings
    (as the other tiny families; the released GPT-2 ties them), initializer range 0.02."""
    return dict(
        vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
        n_inner=None, n_positions=seq_len, activation_function="gelu_new", resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5, initializer_range=0.02,
        tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, use_cache=False)


def shape_config(shape: Mapping[str, Any]) -> dict[str, Any] | None:
    """``config.json`` of a documented shape (:attr:`Family.shape_config`): needs layers,
    hidden, vocab, MLP width, whether the embeddings are tied and the context
    (``n_positions``, the rows of the learned position embedding)."""
    if not known(shape, "layers", "hidden", "vocab", "intermediate",
                 "tied_embeddings", "context"):
        return None
    config = {"model_type": "gpt2", "n_embd": shape["hidden"], "n_layer": shape["layers"],
              "n_head": shape.get("heads"), "n_inner": shape["intermediate"],
              "vocab_size": shape["vocab"], "tie_word_embeddings": shape["tied_embeddings"],
              "n_positions": shape["context"]}
    return {k: v for k, v in config.items() if v is not None}


def ov_weights(weight, layer: int, n_heads: int):
    """``attn.c_proj.weight`` as stored (the caller applies :meth:`Family.write_matrix`) and
    each head's value rows (hd, d) of ``attn.c_attn.weight`` (a ``Conv1D``, stored (d, 3d))
    transposed to (3d, d): rows ``2d + h hd`` to ``2d + (h + 1) hd``."""
    pre = f"transformer.h.{layer}.attn."
    out = weight(pre + "c_proj.weight")
    qkv = weight(pre + "c_attn.weight").T
    d = qkv.shape[1]
    hd = d // n_heads
    return out, [qkv[2 * d + h * hd:2 * d + (h + 1) * hd] for h in range(n_heads)]


GPT2 = Family(
    name="gpt2",
    model_class="GPT2LMHeadModel",
    config_class="GPT2Config",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel",),
    base="transformer",
    layers="h",
    attention_write="attn.c_proj",
    mlp_write="mlp.c_proj",
    input_embeddings=("wte", "wpe"),
    unembedding="lm_head",
    norm_placement="pre-LN (LayerNorm with bias: ln_1 before attention, ln_2 before the MLP), "
                   "final ln_f before the unembedding",
    module_order=("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"),
    block_matrices=(("attn.c_attn", "Attn QKV (c_attn)"),
                    ("attn.c_proj", "Attn write (c_proj)"),
                    ("mlp.c_fc", "MLP in (c_fc)"), ("mlp.c_proj", "MLP write (c_proj)")),
    dims=dims,
    parameters=parameters,
    tiny_config=tiny_config,
    shape_config=shape_config,
    ov_weights=ov_weights,
    transposed_writes=True,
    config_keys=RENAMES,
    activation_key="activation_function",
    default_activation="gelu_new",
    legacy_buffers=LEGACY_BUFFERS,
)

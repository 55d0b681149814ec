"""Llama, OLMo, OLMo 2 and GPT-2 checkpoints as published, written from facts, not by our code.

Each builder writes ``config.json`` and ``model.safetensors`` from the documented tensor names
and shapes (``safetensors.torch.save_file`` of a dict built here), never by saving a model:

- Llama (``meta-llama/Llama-2-7b-hf``; transformers ``models/llama/modeling_llama.py``):
  ``model.embed_tokens.weight`` (V, D); per layer ``model.layers.<i>.`` ``input_layernorm.weight``
  (D), ``self_attn.q_proj.weight`` (H hd, D), ``self_attn.k_proj.weight`` and
  ``self_attn.v_proj.weight`` (KV hd, D), ``self_attn.o_proj.weight`` (D, H hd),
  ``post_attention_layernorm.weight`` (D), ``mlp.gate_proj.weight`` and ``mlp.up_proj.weight``
  (I, D), ``mlp.down_proj.weight`` (D, I); ``model.norm.weight`` (D); ``lm_head.weight`` (V, D).
  No biases. Config keys as in that repository's ``config.json`` (``rms_norm_eps``,
  ``rope_theta``, ``num_key_value_heads``, ``hidden_act: silu``, ``torch_dtype: float16``).
  Grouped-query attention (KV < H) as in Llama-2-70b / Llama 3.
- OLMo 1 (``allenai/OLMo-1B-hf``; ``models/olmo/modeling_olmo.py``): the same projections, no
  norm weights (``OlmoLayerNorm`` is non-parametric), ``tie_word_embeddings: true`` (no
  ``lm_head.weight`` in the file), ``clip_qkv: null``.
- OLMo 2 (``allenai/OLMo-2-0425-1B``; ``models/olmo2/modeling_olmo2.py``): no
  ``input_layernorm``; ``self_attn.q_norm.weight`` (H hd), ``self_attn.k_norm.weight`` (KV hd),
  ``post_attention_layernorm.weight`` and ``post_feedforward_layernorm.weight`` (D), applied to
  the sublayer outputs.
- GPT-2 (``openai-community/gpt2``'s ``model.safetensors``; ``models/gpt2/modeling_gpt2.py``):
  keys *without* the ``transformer.`` prefix (the file was saved from ``GPT2Model``):
  ``wte.weight`` (V, D), ``wpe.weight`` (P, D), per layer ``h.<i>.`` ``ln_1.{weight,bias}``,
  ``attn.bias`` (the causal mask buffer, float32 (1, 1, P, P) lower-triangular ones),
  ``attn.c_attn.weight`` (D, 3D) and ``.bias`` (3D), ``attn.c_proj.weight`` (D, D),
  ``ln_2``, ``mlp.c_fc.weight`` (D, 4D), ``mlp.c_proj.weight`` (4D, D): ``Conv1D`` stores
  (in, out); ``ln_f``; no ``lm_head.weight`` (tied to ``wte``). Config keys ``n_embd``,
  ``n_layer``, ``n_head``, ``n_positions``, ``n_ctx``, ``n_inner: null``,
  ``activation_function: gelu_new``, ``layer_norm_epsilon``.

Values are seeded random numbers of the documented shapes, stored in float32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

#: Small shapes: hidden, layers, heads, key/value heads, MLP width, vocabulary, context.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, CONTEXT = 16, 2, 4, 2, 24, 64, 32


class _Rng:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def normal(self, *shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.from_numpy(self.rng.normal(0.0, scale, shape).astype(np.float32))

    def ones_ish(self, n: int) -> torch.Tensor:
        return torch.from_numpy((1.0 + self.rng.normal(0.0, 0.1, n)).astype(np.float32))


def llama_files(model_type: str = "llama", seed: int = 0) -> tuple[dict, dict]:
    """(config.json dict, tensors) of a Llama (``llama``), OLMo (``olmo``) or OLMo 2
    (``olmo2``) checkpoint."""
    r = _Rng(seed)
    hd = HIDDEN // HEADS
    state = {"model.embed_tokens.weight": r.normal(VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        if model_type == "llama":
            state[p + "input_layernorm.weight"] = r.ones_ish(HIDDEN)
        state.update({
            p + "self_attn.q_proj.weight": r.normal(HEADS * hd, HIDDEN),
            p + "self_attn.k_proj.weight": r.normal(KV_HEADS * hd, HIDDEN),
            p + "self_attn.v_proj.weight": r.normal(KV_HEADS * hd, HIDDEN),
            p + "self_attn.o_proj.weight": r.normal(HIDDEN, HEADS * hd),
            p + "mlp.gate_proj.weight": r.normal(INTERMEDIATE, HIDDEN),
            p + "mlp.up_proj.weight": r.normal(INTERMEDIATE, HIDDEN),
            p + "mlp.down_proj.weight": r.normal(HIDDEN, INTERMEDIATE)})
        if model_type in ("llama", "olmo2"):
            state[p + "post_attention_layernorm.weight"] = r.ones_ish(HIDDEN)
        if model_type == "olmo2":
            state[p + "self_attn.q_norm.weight"] = r.ones_ish(HEADS * hd)
            state[p + "self_attn.k_norm.weight"] = r.ones_ish(KV_HEADS * hd)
            state[p + "post_feedforward_layernorm.weight"] = r.ones_ish(HIDDEN)
    if model_type != "olmo":
        state["model.norm.weight"] = r.ones_ish(HIDDEN)
        state["lm_head.weight"] = r.normal(VOCAB, HIDDEN)
    arch = {"llama": "LlamaForCausalLM", "olmo": "OlmoForCausalLM",
            "olmo2": "Olmo2ForCausalLM"}[model_type]
    config = {"architectures": [arch], "model_type": model_type, "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS,
              "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
              "max_position_embeddings": CONTEXT, "vocab_size": VOCAB, "hidden_act": "silu",
              "rope_theta": 10000.0, "attention_bias": False, "attention_dropout": 0.0,
              "initializer_range": 0.02, "bos_token_id": 1, "eos_token_id": 2,
              "pad_token_id": None, "tie_word_embeddings": model_type == "olmo",
              "torch_dtype": "float32", "transformers_version": "4.40.0", "use_cache": True}
    if model_type == "llama":
        config.update(rms_norm_eps=1e-5, pretraining_tp=1, mlp_bias=False)
    elif model_type == "olmo":
        config.update(clip_qkv=None, eos_token_id=50279 % VOCAB, pad_token_id=1)
    else:
        config.update(rms_norm_eps=1e-6)
    return config, state


def gpt2_files(seed: int = 0) -> tuple[dict, dict]:
    """(config.json dict, tensors) of a GPT-2 checkpoint as ``openai-community/gpt2``."""
    r = _Rng(seed)
    mask = torch.tril(torch.ones(CONTEXT, CONTEXT)).view(1, 1, CONTEXT, CONTEXT)
    state = {"wte.weight": r.normal(VOCAB, HIDDEN), "wpe.weight": r.normal(CONTEXT, HIDDEN)}
    for i in range(LAYERS):
        p = f"h.{i}."
        state.update({
            p + "ln_1.weight": r.ones_ish(HIDDEN), p + "ln_1.bias": r.normal(HIDDEN),
            p + "attn.bias": mask.clone(),
            p + "attn.c_attn.weight": r.normal(HIDDEN, 3 * HIDDEN),
            p + "attn.c_attn.bias": r.normal(3 * HIDDEN),
            p + "attn.c_proj.weight": r.normal(HIDDEN, HIDDEN),
            p + "attn.c_proj.bias": r.normal(HIDDEN),
            p + "ln_2.weight": r.ones_ish(HIDDEN), p + "ln_2.bias": r.normal(HIDDEN),
            p + "mlp.c_fc.weight": r.normal(HIDDEN, 4 * HIDDEN),
            p + "mlp.c_fc.bias": r.normal(4 * HIDDEN),
            p + "mlp.c_proj.weight": r.normal(4 * HIDDEN, HIDDEN),
            p + "mlp.c_proj.bias": r.normal(HIDDEN)})
    state.update({"ln_f.weight": r.ones_ish(HIDDEN), "ln_f.bias": r.normal(HIDDEN)})
    config = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "attn_pdrop": 0.1, "bos_token_id": 0, "embd_pdrop": 0.1, "eos_token_id": 0,
              "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
              "n_ctx": CONTEXT, "n_embd": HIDDEN, "n_head": HEADS, "n_layer": LAYERS,
              "n_positions": CONTEXT, "resid_pdrop": 0.1, "summary_activation": None,
              "summary_first_dropout": 0.1, "summary_proj_to_labels": True,
              "summary_type": "cls_index", "summary_use_proj": True, "vocab_size": VOCAB}
    return config, state


#: Builders by family name and model type.
BUILDERS = {"llama": lambda seed=0: llama_files("llama", seed),
            "olmo": lambda seed=0: llama_files("olmo", seed),
            "olmo2": lambda seed=0: llama_files("olmo2", seed),
            "gpt2": gpt2_files}
#: The family each builder's checkpoint belongs to.
FAMILY = {"llama": "llama", "olmo": "llama", "olmo2": "llama", "gpt2": "gpt2"}


def write_checkpoint(directory: Path, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write the ``kind`` checkpoint (a key of :data:`BUILDERS`) into ``directory``; returns
    the tensors written."""
    config, state = BUILDERS[kind](seed)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    safetensors.torch.save_file(state, directory / "model.safetensors",
                                metadata={"format": "pt"})
    return state

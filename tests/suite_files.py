"""Revisions of two non-Pythia suites as the Hugging Face hub serves them, written from
documented facts, never by saving a model with today's transformers:

OLMo (``allenai/OLMo-1B-hf``, a Llama-family model, ``OlmoForCausalLM``):

- ``config.json`` has the fields of the published ``allenai/OLMo-1B-hf`` config
  (``architectures: [OlmoForCausalLM]``, ``model_type: olmo``, ``attention_bias: false``,
  ``clip_qkv: null``, ``hidden_act: silu``, ``num_key_value_heads`` = heads,
  ``rope_theta: 10000.0``, ``tie_word_embeddings: true``, ``pretraining_tp: 1``; quoted by
  repos derived from it, e.g. onnx-community/OLMo-1B-hf/config.json); only sizes shrunk;
- tensor names of transformers' ``modeling_olmo`` (as ``modeling_llama``):
  ``model.embed_tokens.weight``, ``model.layers.N.self_attn.{q,k,v,o}_proj.weight`` (no
  biases), ``model.layers.N.mlp.{gate,up,down}_proj.weight``; OLMo's layer norms have no
  parameters (``OlmoLayerNorm``), so no norm tensors; tied embeddings: no ``lm_head.weight``;
  the rotary frequencies are a non-persistent buffer (not saved);
- one ``model.safetensors`` per revision (the repo's file listing);
- branches ``step<N>-tokens<M>B`` (model card), listed by ``list_repo_refs``; M here is
  ``round(N x 4,194,304 / 1e9)``, which gives the card's examples step1000-tokens4B and
  step20000-tokens84B: the code under test reads M from the name, never computes it.

Mistral GPT-2 (``stanford-crfm/alias-gpt2-small-x21``, ``GPT2LMHeadModel``):

- ``config.json`` with the fields of ``stanford-crfm/battlestar-gpt2-small-x49/config.json``
  (transformers 4.12.5: ``activation_function: gelu_new``, ``n_ctx``/``n_positions``,
  ``reorder_and_upcast_attn: true``, ``scale_attn_by_inverse_layer_idx: true``, ...);
  sizes shrunk (``n_positions`` too, which sizes the persisted mask);
- tensor names of transformers' ``modeling_gpt2``: ``transformer.wte/wpe.weight``,
  ``transformer.h.N.ln_1/ln_2.{weight,bias}``, ``attn.c_attn``, ``attn.c_proj``,
  ``mlp.c_fc``, ``mlp.c_proj`` (weights and biases), ``transformer.ln_f``; ``Conv1D`` stores
  its weight as (in, out): ``c_attn.weight`` is (D, 3D), ``mlp.c_fc.weight`` (D, 4D),
  ``mlp.c_proj.weight`` (4D, D); transformers 4.12 persisted the buffers ``attn.bias``
  (the causal mask, uint8, 1 x 1 x n_positions x n_positions) and ``attn.masked_bias``
  (-1e4); the unembedding is tied to ``wte`` (``lm_head.weight`` is listed in
  ``_keys_to_ignore_on_load_missing``) and not written here;
- ``pytorch_model.bin`` (the repo's commit history: "checkpoint-<step> contents" touching
  pytorch_model.bin), on branches ``checkpoint-<step>``.

Values are seeded random numbers; they only have to be the same bytes each time.
"""

from __future__ import annotations

import json

import numpy as np
import safetensors.torch
import torch

from pythia_files import torch_bytes

#: Test shapes: (hidden, layers, heads, intermediate or positions).
OLMO_TEST = (16, 2, 2, 32)
GPT2_TEST = (16, 2, 2, 64)
#: Tokens per step used only to write OLMo-style branch names (see the module docstring).
OLMO_NAME_TOKENS_PER_STEP = 4_194_304


def olmo_branch(step: int) -> str:
    """``step<N>-tokens<M>B`` as the OLMo repos name their branches."""
    return f"step{step}-tokens{round(step * OLMO_NAME_TOKENS_PER_STEP / 1e9)}B"


def olmo_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> dict:
    return {"architectures": ["OlmoForCausalLM"], "attention_bias": False,
            "attention_dropout": 0.0, "clip_qkv": None, "eos_token_id": 50279,
            "hidden_act": "silu", "hidden_size": hidden, "initializer_range": 0.02,
            "intermediate_size": intermediate, "max_position_embeddings": 2048,
            "model_type": "olmo", "num_attention_heads": heads, "num_hidden_layers": layers,
            "num_key_value_heads": heads, "pad_token_id": 1, "pretraining_tp": 1,
            "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": True,
            "torch_dtype": "float32", "transformers_version": "4.40.1", "use_cache": True,
            "vocab_size": vocab}


def olmo_state_dict(hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.normal(0.0, 0.02, shape).astype(np.float32))

    state = {"model.embed_tokens.weight": normal(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = normal(hidden, hidden)
        state[p + "mlp.gate_proj.weight"] = normal(intermediate, hidden)
        state[p + "mlp.up_proj.weight"] = normal(intermediate, hidden)
        state[p + "mlp.down_proj.weight"] = normal(hidden, intermediate)
    return state


def olmo_files(seed: int, vocab: int) -> dict[str, bytes]:
    hidden, layers, heads, intermediate = OLMO_TEST
    config = olmo_config(hidden, layers, heads, intermediate, vocab)
    state = olmo_state_dict(hidden, layers, heads, intermediate, vocab, seed)
    return {"config.json": json.dumps(config, indent=2).encode() + b"\n",
            "model.safetensors": safetensors.torch.save(state, metadata={"format": "pt"})}


def gpt2_config(hidden: int, layers: int, heads: int, positions: int, vocab: int) -> dict:
    return {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "gradient_checkpointing": False, "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "n_ctx": positions,
            "n_embd": hidden, "n_head": heads, "n_inner": None, "n_layer": layers,
            "n_positions": positions, "reorder_and_upcast_attn": True, "resid_pdrop": 0.1,
            "scale_attn_by_inverse_layer_idx": True, "scale_attn_weights": True,
            "summary_activation": None, "summary_first_dropout": 0.1,
            "summary_proj_to_labels": True, "summary_type": "cls_index",
            "summary_use_proj": True, "transformers_version": "4.12.5", "use_cache": False,
            "vocab_size": vocab}


def gpt2_state_dict(hidden: int, layers: int, heads: int, positions: int, vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """transformers 4.12's GPT-2 names; Conv1D weights as (in, out)."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> torch.Tensor:
        return torch.from_numpy(rng.normal(0.0, 0.02, shape).astype(np.float32))

    def ones_ish(n: int) -> torch.Tensor:
        return torch.from_numpy((1.0 + rng.normal(0.0, 0.05, n)).astype(np.float32))

    mask = torch.tril(torch.ones(positions, positions, dtype=torch.uint8)).view(
        1, 1, positions, positions)
    state = {"transformer.wte.weight": normal(vocab, hidden),
             "transformer.wpe.weight": normal(positions, hidden)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        state.update({
            p + "ln_1.weight": ones_ish(hidden), p + "ln_1.bias": normal(hidden),
            p + "attn.bias": mask.clone(), p + "attn.masked_bias": torch.tensor(-1e4),
            p + "attn.c_attn.weight": normal(hidden, 3 * hidden),
            p + "attn.c_attn.bias": normal(3 * hidden),
            p + "attn.c_proj.weight": normal(hidden, hidden),
            p + "attn.c_proj.bias": normal(hidden),
            p + "ln_2.weight": ones_ish(hidden), p + "ln_2.bias": normal(hidden),
            p + "mlp.c_fc.weight": normal(hidden, 4 * hidden),
            p + "mlp.c_fc.bias": normal(4 * hidden),
            p + "mlp.c_proj.weight": normal(4 * hidden, hidden),
            p + "mlp.c_proj.bias": normal(hidden),
        })
    state["transformer.ln_f.weight"] = ones_ish(hidden)
    state["transformer.ln_f.bias"] = normal(hidden)
    return state


def gpt2_files(seed: int, vocab: int) -> dict[str, bytes]:
    hidden, layers, heads, positions = GPT2_TEST
    config = gpt2_config(hidden, layers, heads, positions, vocab)
    state = gpt2_state_dict(hidden, layers, heads, positions, vocab, seed)
    return {"config.json": json.dumps(config, indent=2).encode() + b"\n",
            "pytorch_model.bin": torch_bytes(state)}

"""Llama, OLMo, OLMo 2 and GPT-2 checkpoints as published, written from facts, not by our code.

The one place the tests write these architectures' files (tests/suite_files.py packages them
as hub revisions; tests/pythia_files.py keeps the legacy Pythia format). Each builder returns
the ``config.json`` dict and the tensors from the documented tensor names and shapes (the
files are written with ``safetensors.torch.save_file`` / ``torch.save`` of a dict built here),
never by saving a model with today's transformers:

- Llama (``meta-llama/Llama-2-7b-hf``; transformers ``models/llama/modeling_llama.py``):
  ``model.embed_tokens.weight`` (V, D); per layer ``model.layers.<i>.`` ``input_layernorm.weight``
  (D), ``self_attn.q_proj.weight`` (H hd, D), ``self_attn.k_proj.weight`` and
  ``self_attn.v_proj.weight`` (KV hd, D), ``self_attn.o_proj.weight`` (D, H hd),
  ``post_attention_layernorm.weight`` (D), ``mlp.gate_proj.weight`` and ``mlp.up_proj.weight``
  (I, D), ``mlp.down_proj.weight`` (D, I); ``model.norm.weight`` (D); ``lm_head.weight`` (V, D).
  No biases. Config keys as in that repository's ``config.json`` (``rms_norm_eps``,
  ``rope_theta``, ``num_key_value_heads``, ``hidden_act: silu``, ``torch_dtype: float16``).
  Grouped-query attention (KV < H) as in Llama-2-70b / Llama 3.
- OLMo 1 (``allenai/OLMo-1B-hf``, ``OlmoForCausalLM``; ``models/olmo/modeling_olmo.py``): the
  same projections (no biases), no norm weights (``OlmoLayerNorm`` is non-parametric), tied
  embeddings (no ``lm_head.weight`` in the file); the rotary frequencies are a non-persistent
  buffer (not saved). ``config.json`` has the fields of the published ``allenai/OLMo-1B-hf``
  config (``architectures: [OlmoForCausalLM]``, ``model_type: olmo``,
  ``attention_bias: false``, ``clip_qkv: null``, ``hidden_act: silu``, ``eos_token_id: 50279``,
  ``pad_token_id: 1``, ``rope_theta: 10000.0``, ``tie_word_embeddings: true``,
  ``pretraining_tp: 1``; quoted by repos derived from it, e.g.
  onnx-community/OLMo-1B-hf/config.json); only sizes shrunk (there
  ``num_key_value_heads`` = heads; :class:`Dims` may set fewer).
- OLMo 2 (``allenai/OLMo-2-0425-1B``; ``models/olmo2/modeling_olmo2.py``): no
  ``input_layernorm``; ``self_attn.q_norm.weight`` (H hd), ``self_attn.k_norm.weight`` (KV hd),
  ``post_attention_layernorm.weight`` and ``post_feedforward_layernorm.weight`` (D), applied to
  the sublayer outputs.
- GPT-2 (``models/gpt2/modeling_gpt2.py``): ``wte.weight`` (V, D), ``wpe.weight`` (P, D), per
  layer ``h.<i>.`` ``ln_1.{weight,bias}``, ``attn.bias`` (the causal mask buffer,
  (1, 1, P, P) lower-triangular ones), ``attn.c_attn.weight`` (D, 3D) and ``.bias`` (3D),
  ``attn.c_proj.weight`` (D, D), ``ln_2``, ``mlp.c_fc.weight`` (D, 4D),
  ``mlp.c_proj.weight`` (4D, D) (weights and biases): ``Conv1D`` stores (in, out); ``ln_f``;
  no ``lm_head.weight`` (tied to ``wte``; listed in ``_keys_to_ignore_on_load_missing``).
  Two published layouts (``layout``):

  - ``released``: ``openai-community/gpt2``'s ``model.safetensors``, keys *without* the
    ``transformer.`` prefix (the file was saved from ``GPT2Model``), a float32 mask; config
    keys ``n_embd``, ``n_layer``, ``n_head``, ``n_positions``, ``n_ctx``,
    ``activation_function: gelu_new``, ``layer_norm_epsilon``.
  - ``mistral``: Stanford CRFM's Mistral runs (``stanford-crfm/alias-gpt2-small-x21``,
    ``GPT2LMHeadModel``) as transformers 4.12 saved them: keys with the ``transformer.``
    prefix, the mask in uint8 and the buffer ``attn.masked_bias`` (-1e4) persisted;
    ``config.json`` with the fields of ``stanford-crfm/battlestar-gpt2-small-x49/config.json``
    (transformers 4.12.5: ``activation_function: gelu_new``, ``n_ctx``/``n_positions``,
    ``n_inner: null``, ``reorder_and_upcast_attn: true``,
    ``scale_attn_by_inverse_layer_idx: true``, ...); sizes shrunk (``n_positions`` too,
    which sizes the persisted mask).

Values are seeded normal numbers of the documented shapes (standard deviation ``scale``; norm
weights 1 + normal(``spread``)), stored in float32; they only have to be the same bytes each
time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import safetensors.torch
import torch


@dataclass(frozen=True)
class Dims:
    """Shape of a written checkpoint: hidden D, layers, heads H, key/value heads KV, MLP
    width I (Llama-style; GPT-2's is 4D), vocabulary V and context P (GPT-2's learned
    positions; Llama-style ``max_position_embeddings``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    context: int


#: Small shapes of the family tests: hidden, layers, heads, key/value heads, MLP width,
#: vocabulary, context.
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, CONTEXT = 16, 2, 4, 2, 24, 64, 32
SMALL = Dims(HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB, CONTEXT)


class _Rng:
    def __init__(self, seed: int, scale: float, spread: float):
        self.rng = np.random.default_rng(seed)
        self.scale, self.spread = scale, spread

    def normal(self, *shape: int) -> torch.Tensor:
        return torch.from_numpy(self.rng.normal(0.0, self.scale, shape).astype(np.float32))

    def ones_ish(self, n: int) -> torch.Tensor:
        return torch.from_numpy((1.0 + self.rng.normal(0.0, self.spread, n)).astype(np.float32))


def llama_state(model_type: str, dims: Dims = SMALL, seed: int = 0, *, scale: float = 0.2,
                spread: float = 0.1) -> dict[str, torch.Tensor]:
    """Tensors of a Llama (``llama``), OLMo (``olmo``) or OLMo 2 (``olmo2``) checkpoint."""
    r = _Rng(seed, scale, spread)
    d, hd = dims.hidden, dims.hidden // dims.heads
    state = {"model.embed_tokens.weight": r.normal(dims.vocab, d)}
    for i in range(dims.layers):
        p = f"model.layers.{i}."
        if model_type == "llama":
            state[p + "input_layernorm.weight"] = r.ones_ish(d)
        state.update({
            p + "self_attn.q_proj.weight": r.normal(dims.heads * hd, d),
            p + "self_attn.k_proj.weight": r.normal(dims.kv_heads * hd, d),
            p + "self_attn.v_proj.weight": r.normal(dims.kv_heads * hd, d),
            p + "self_attn.o_proj.weight": r.normal(d, dims.heads * hd),
            p + "mlp.gate_proj.weight": r.normal(dims.intermediate, d),
            p + "mlp.up_proj.weight": r.normal(dims.intermediate, d),
            p + "mlp.down_proj.weight": r.normal(d, dims.intermediate)})
        if model_type in ("llama", "olmo2"):
            state[p + "post_attention_layernorm.weight"] = r.ones_ish(d)
        if model_type == "olmo2":
            state[p + "self_attn.q_norm.weight"] = r.ones_ish(dims.heads * hd)
            state[p + "self_attn.k_norm.weight"] = r.ones_ish(dims.kv_heads * hd)
            state[p + "post_feedforward_layernorm.weight"] = r.ones_ish(d)
    if model_type != "olmo":
        state["model.norm.weight"] = r.ones_ish(d)
        state["lm_head.weight"] = r.normal(dims.vocab, d)
    return state


def llama_config(model_type: str, dims: Dims = SMALL) -> dict:
    """``config.json`` of a Llama, OLMo or OLMo 2 checkpoint of shape ``dims``."""
    shape = {"hidden_size": dims.hidden, "intermediate_size": dims.intermediate,
             "max_position_embeddings": dims.context, "num_attention_heads": dims.heads,
             "num_hidden_layers": dims.layers, "num_key_value_heads": dims.kv_heads,
             "vocab_size": dims.vocab}
    if model_type == "olmo":  # allenai/OLMo-1B-hf
        return dict(sorted({
            **shape, "architectures": ["OlmoForCausalLM"], "attention_bias": False,
            "attention_dropout": 0.0, "clip_qkv": None, "eos_token_id": 50279,
            "hidden_act": "silu", "initializer_range": 0.02, "model_type": "olmo",
            "pad_token_id": 1, "pretraining_tp": 1, "rope_scaling": None,
            "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
            "transformers_version": "4.40.1", "use_cache": True}.items()))
    arch = {"llama": "LlamaForCausalLM", "olmo2": "Olmo2ForCausalLM"}[model_type]
    config = {"architectures": [arch], "model_type": model_type, **shape,
              "hidden_act": "silu", "rope_theta": 10000.0, "attention_bias": False,
              "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": None, "tie_word_embeddings": False,
              "torch_dtype": "float32", "transformers_version": "4.40.0", "use_cache": True}
    if model_type == "llama":
        config.update(rms_norm_eps=1e-5, pretraining_tp=1, mlp_bias=False)
    else:
        config.update(rms_norm_eps=1e-6)
    return config


def gpt2_state(dims: Dims = SMALL, seed: int = 0, *, layout: str = "released",
               scale: float = 0.2, spread: float = 0.1) -> dict[str, torch.Tensor]:
    """Tensors of a GPT-2 checkpoint in ``layout`` ``released`` or ``mistral`` (module
    docstring); MLP width 4D, ``dims.context`` positions."""
    r = _Rng(seed, scale, spread)
    d, n = dims.hidden, dims.context
    mistral = {"released": False, "mistral": True}[layout]
    prefix = "transformer." if mistral else ""
    mask = torch.tril(torch.ones(n, n, dtype=torch.uint8 if mistral else torch.float32)).view(
        1, 1, n, n)
    state = {prefix + "wte.weight": r.normal(dims.vocab, d),
             prefix + "wpe.weight": r.normal(n, d)}
    for i in range(dims.layers):
        p = f"{prefix}h.{i}."
        state.update({p + "ln_1.weight": r.ones_ish(d), p + "ln_1.bias": r.normal(d),
                      p + "attn.bias": mask.clone()})
        if mistral:
            state[p + "attn.masked_bias"] = torch.tensor(-1e4)
        state.update({
            p + "attn.c_attn.weight": r.normal(d, 3 * d),
            p + "attn.c_attn.bias": r.normal(3 * d),
            p + "attn.c_proj.weight": r.normal(d, d),
            p + "attn.c_proj.bias": r.normal(d),
            p + "ln_2.weight": r.ones_ish(d), p + "ln_2.bias": r.normal(d),
            p + "mlp.c_fc.weight": r.normal(d, 4 * d),
            p + "mlp.c_fc.bias": r.normal(4 * d),
            p + "mlp.c_proj.weight": r.normal(4 * d, d),
            p + "mlp.c_proj.bias": r.normal(d)})
    state.update({prefix + "ln_f.weight": r.ones_ish(d), prefix + "ln_f.bias": r.normal(d)})
    return state


def gpt2_config(dims: Dims = SMALL, layout: str = "released") -> dict:
    """``config.json`` of a GPT-2 checkpoint in ``layout`` ``released`` or ``mistral``."""
    shape = {"n_ctx": dims.context, "n_embd": dims.hidden, "n_head": dims.heads,
             "n_layer": dims.layers, "n_positions": dims.context, "vocab_size": dims.vocab}
    common = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
              "attn_pdrop": 0.1, "embd_pdrop": 0.1, "initializer_range": 0.02,
              "layer_norm_epsilon": 1e-05, "model_type": "gpt2", "resid_pdrop": 0.1,
              "summary_activation": None, "summary_first_dropout": 0.1,
              "summary_proj_to_labels": True, "summary_type": "cls_index",
              "summary_use_proj": True}
    published = {
        "released": {"bos_token_id": 0, "eos_token_id": 0},
        "mistral": {"bos_token_id": 50256, "eos_token_id": 50256,
                    "gradient_checkpointing": False, "n_inner": None,
                    "reorder_and_upcast_attn": True, "scale_attn_by_inverse_layer_idx": True,
                    "scale_attn_weights": True, "transformers_version": "4.12.5",
                    "use_cache": False}}[layout]
    return dict(sorted({**common, **shape, **published}.items()))


def llama_files(model_type: str = "llama", seed: int = 0) -> tuple[dict, dict]:
    """(config.json dict, tensors) of a small Llama (``llama``), OLMo (``olmo``) or OLMo 2
    (``olmo2``) checkpoint (:data:`SMALL`)."""
    return llama_config(model_type), llama_state(model_type, seed=seed)


def gpt2_files(seed: int = 0) -> tuple[dict, dict]:
    """(config.json dict, tensors) of a small GPT-2 checkpoint as ``openai-community/gpt2``."""
    return gpt2_config(), gpt2_state(seed=seed)


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

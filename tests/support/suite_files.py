"""Revisions of two non-Pythia suites as the Hugging Face hub serves them: what is specific
to the suites (shapes, branch names, files per revision); the checkpoints themselves (tensor
names, shapes, ``config.json``) are written by tests/family_files.py from documented facts.

OLMo (``allenai/OLMo-1B-hf``, ``OlmoForCausalLM``; family_files' ``olmo``, as many key/value
heads as heads):

- one ``model.safetensors`` per revision (the repo's file listing);
- branches ``step<N>-tokens<M>B`` (model card), listed by ``list_repo_refs``; M here is
  ``round(N x 4,194,304 / 1e9)``, which gives the card's examples step1000-tokens4B and
  step20000-tokens84B: the code under test reads M from the name, never computes it.

Mistral GPT-2 (``stanford-crfm/alias-gpt2-small-x21``, ``GPT2LMHeadModel``; family_files'
GPT-2 ``mistral`` layout):

- ``pytorch_model.bin`` (the repo's commit history: "checkpoint-<step> contents" touching
  pytorch_model.bin), on branches ``checkpoint-<step>``.

Revisions of one repo lie on a training trajectory (:func:`on_trajectory`): the content audit
checks that a revision sits between its neighbours, as real checkpoints of one run do.
"""

from __future__ import annotations

import json

import safetensors.torch
import torch

from support.family_files import Dims, gpt2_config, gpt2_state, llama_config, llama_state
from support.pythia_files import torch_bytes

#: Test shapes: (hidden, layers, heads, intermediate or positions).
OLMO_TEST = (16, 2, 2, 32)
GPT2_TEST = (16, 2, 2, 64)
#: Positions of the OLMo test config (``max_position_embeddings`` of OLMo-1B-hf).
OLMO_CONTEXT = 2048
#: Standard deviation of the weights and spread of the norm weights around 1.
SCALE, SPREAD = 0.02, 0.05
#: Tokens per step used only to write OLMo-style branch names (see the module docstring).
OLMO_NAME_TOKENS_PER_STEP = 4_194_304


def on_trajectory(init: dict[str, torch.Tensor], end: dict[str, torch.Tensor], step: int,
                  final: int, noise: float = 0.002) -> dict[str, torch.Tensor]:
    """The checkpoint of ``step`` of a run from ``init`` to ``end`` (its ``final`` step):
    ``(1 - t) init + t end`` plus a seeded noise, ``t = sqrt(step / final)``; tensors that are
    not floating point (masks) are ``init``'s."""
    t = (step / final) ** 0.5
    gen = torch.Generator().manual_seed(7_000_000 + step)
    out = {}
    for name, a in init.items():
        if not a.is_floating_point() or a.ndim == 0:
            out[name] = a.clone()
            continue
        w = (1 - t) * a.float() + t * end[name].float()
        out[name] = (w + noise * torch.randn(w.shape, generator=gen)).to(a.dtype)
    return out


def olmo_branch(step: int) -> str:
    """``step<N>-tokens<M>B`` as the OLMo repos name their branches."""
    return f"step{step}-tokens{round(step * OLMO_NAME_TOKENS_PER_STEP / 1e9)}B"


def olmo_dims(hidden: int, layers: int, heads: int, intermediate: int, vocab: int) -> Dims:
    """The OLMo test shape: as many key/value heads as heads, 2048 positions."""
    return Dims(hidden, layers, heads, heads, intermediate, vocab, OLMO_CONTEXT)


def olmo_state_dict(hidden: int, layers: int, heads: int, intermediate: int, vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    return llama_state("olmo", olmo_dims(hidden, layers, heads, intermediate, vocab), seed,
                       scale=SCALE, spread=SPREAD)


def olmo_files(step: int, final: int, vocab: int, seed: int = 2000) -> dict[str, bytes]:
    """An OLMo revision: step ``step`` of a run (seeded ``seed``) ending at ``final``."""
    dims = olmo_dims(*OLMO_TEST, vocab)
    state = on_trajectory(llama_state("olmo", dims, seed, scale=SCALE, spread=SPREAD),
                          llama_state("olmo", dims, seed + 1, scale=SCALE, spread=SPREAD),
                          step, final)
    return {"config.json": json.dumps(llama_config("olmo", dims), indent=2).encode() + b"\n",
            "model.safetensors": safetensors.torch.save(state, metadata={"format": "pt"})}


def gpt2_dims(hidden: int, layers: int, heads: int, positions: int, vocab: int) -> Dims:
    """The GPT-2 test shape (MLP width 4 x hidden)."""
    return Dims(hidden, layers, heads, heads, 4 * hidden, vocab, positions)


def gpt2_state_dict(hidden: int, layers: int, heads: int, positions: int, vocab: int,
                    seed: int) -> dict[str, torch.Tensor]:
    """transformers 4.12's GPT-2 names; Conv1D weights as (in, out)."""
    return gpt2_state(gpt2_dims(hidden, layers, heads, positions, vocab), seed,
                      layout="mistral", scale=SCALE, spread=SPREAD)


def gpt2_files(step: int, final: int, vocab: int, seed: int = 3000) -> dict[str, bytes]:
    """A Mistral GPT-2 revision: step ``step`` of a run (seeded ``seed``) ending at
    ``final``, with the persistent buffers of transformers 4.x."""
    dims = gpt2_dims(*GPT2_TEST, vocab)
    config = gpt2_config(dims, layout="mistral")
    state = on_trajectory(
        gpt2_state(dims, seed, layout="mistral", scale=SCALE, spread=SPREAD),
        gpt2_state(dims, seed + 1, layout="mistral", scale=SCALE, spread=SPREAD), step, final)
    return {"config.json": json.dumps(config, indent=2).encode() + b"\n",
            "pytorch_model.bin": torch_bytes(state)}

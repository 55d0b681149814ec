"""Checks of an intervention study's inputs at their boundary (config section, token file,
device), each failure one line naming the key or file, what is wrong and what to do, before
any model is built. :func:`input_errors` runs with the config check; :func:`check_tokens`
and :func:`check_device` run in the job, where the file and the machine are."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Most parameters a study's model may have (it is trained from scratch in one job; 12 x
#: layers x hidden^2 of 65536 x 1024 layers would be 5 x 10^13).
MAX_PARAMETERS = 2_000_000_000
#: Token ids checked per block of a token file (the whole file is checked, a block at a time).
CHECK_BLOCK = 1 << 22


def model_parameters(arch: Mapping[str, int], *, vocab_size: int, seq_len: int) -> int:
    """Parameters of the study's GPT-NeoX model of ``arch`` (the family's own count)."""
    from lmdynamics import families

    family = families.get("gpt_neox")
    return family.parameters(family.tiny_config(
        hidden_size=arch["hidden_size"], num_layers=arch["num_layers"],
        num_heads=arch["num_heads"], seq_len=seq_len, vocab_size=vocab_size))


def input_errors(section: Mapping[str, Any]) -> list[str]:
    """What the schema cannot say about the inputs of an ``interventions`` section: the
    size of each model (the schema bounds layers and width one at a time)."""
    errors = []
    for label, arch in section["sizes"].items():
        n = model_parameters(arch, vocab_size=section["vocab_size"],
                             seq_len=section["training"]["seq_len"])
        if n > MAX_PARAMETERS:
            errors.append(f"interventions.sizes.{label}: about {n:.3g} parameters "
                          f"({arch['num_layers']} layers of hidden_size {arch['hidden_size']}); "
                          f"allowed: at most {MAX_PARAMETERS:.3g} (fewer layers or a smaller "
                          "hidden_size)")
    return errors


def check_device(device: str) -> None:
    """``cuda`` needs a CUDA device on the machine that runs the job."""
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("interventions.device: 'cuda', but no CUDA device is available on "
                         "this machine; set interventions.device: cpu, or run the job where "
                         "a GPU is")


def check_tokens(tokens: np.ndarray, path: Path | str, *, vocab_size: int, batch_size: int,
                 seq_len: int, final_step: int) -> None:
    """Every id of a token file in ``[0, vocab_size)`` (all of them, a block at a time), and
    enough tokens for one batch of distinct sequences; a file that a run reads more than
    once is logged (one line)."""
    what = f"interventions.tokens: {path}"
    for start in range(0, tokens.size, CHECK_BLOCK):
        block = np.asarray(tokens[start:start + CHECK_BLOCK])
        low, high = int(block.min()), int(block.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            at = start + int(np.flatnonzero(block == bad)[0])
            raise ValueError(f"{what}: token id {bad} at position {at} is outside 0.."
                             f"{vocab_size - 1} (interventions.vocab_size {vocab_size}); "
                             "give ids of that vocabulary, or raise vocab_size")
    sequences = tokens.size // seq_len
    if sequences < batch_size:
        raise ValueError(f"{what}: {tokens.size} tokens make {sequences} sequences of seq_len "
                         f"{seq_len}, fewer than one batch of {batch_size}; give a file of at "
                         f"least {batch_size * seq_len} tokens, or lower batch_size / seq_len")
    epochs = final_step * batch_size / sequences
    if epochs > 1:
        log.warning("%s: %d sequences of %d tokens are read %.1f times over %d updates",
                    what, sequences, seq_len, epochs, final_step)

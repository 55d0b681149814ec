"""Options that reproduce what the paper's code measured, for comparison with its numbers.

The paper's text and its code (github rdiehlmartinez/pretraining-playground,
``checkpoint_metric_extractor.py``; shared/notes/reference-facts.md) differ in two places that
this module reproduces as options (``config/paper_code.yaml`` selects them):

Attention activation (``extraction.attention_activation: paper_code``)
    The text analyses what attention writes to the residual stream (the output of
    ``attention.dense``; our default, ``residual_write``). The code hooks the fused
    ``attention.query_key_value`` projection, takes the last third of its output features as
    "values" and applies ``attention.dense`` to them at the same token:
    ``F.linear(qkv[..., 2*3D//3:], W_O, b_O)`` (bias included, as its ``F.linear`` call does;
    a constant bias does not change centred CKA). That is not the attention output, for two
    reasons: no attention pattern is applied (each token's own "value" is used), and GPT-NeoX
    lays the fused output out per head, ``[q_h; k_h; v_h]`` for h = 0..H-1 (transformers'
    ``GPTNeoXAttention`` views it as (..., H, 3 * head_dim)), so the last third holds the
    queries, keys and values of the last third of the heads (for H divisible by 3; otherwise
    it starts inside a head), not the values of all heads. :func:`paper_code_attention`
    reproduces that slice exactly.

Gradients (``extraction.gradient_protocol: paper_code``)
    Our default (``eval_batch``) takes the gradient of the LM loss on the eval batch. The code
    takes, for checkpoint c, the training batches of the steps ``range(max(0, c-5), ...)``,
    and the figures use the first two of them (steps c-5 and c-4, or 0 and 1 for c < 5), the
    first 128 sequences of each (fewer when a batch holds fewer). Each batch's gradient is
    accumulated over sub-batches of 1, 2, 4, ... sequences (its automatic batch sizing when
    nothing runs out of memory), each contributing the gradient of its own *mean* loss, so
    the loss is a sum over sub-batches, weighting a sequence by 1 / (its sub-batch's size);
    the singular values of the two batches' gradients are averaged.
    :func:`paper_code_sub_batches` gives that schedule; micro-batching inside a sub-batch
    (to fit memory) does not change the gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from lmdynamics import families
from lmdynamics.extraction.lm_loss import lm_loss
from lmdynamics.extraction.spectra import singular_values

if TYPE_CHECKING:
    from lmdynamics.sources.pile import TokenSource

ATTENTION_ACTIVATIONS: tuple[str, ...] = ("residual_write", "paper_code")
GRADIENT_PROTOCOLS: tuple[str, ...] = ("eval_batch", "paper_code")
#: Sequences of each training batch the paper's code used for gradients (REDUCED_BATCH_SIZE).
PAPER_GRADIENT_SEQUENCES = 128


def check_choice(key: str, value: str, allowed: tuple[str, ...]) -> str:
    """Return ``value`` if allowed, else raise ValueError naming the key and the choices."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r}: allowed {', '.join(allowed)}")
    return value


def paper_code_values(qkv_out: torch.Tensor) -> torch.Tensor:
    """The code's "values": the last third of the fused qkv output's features.

    ``qkv_out`` (..., 3 D) -> (..., D): features ``[2 * 3D // 3, 3D)``, i.e. (per-head
    layout) q, k and v of the last third of the heads, not the values of every head.
    """
    width = qkv_out.shape[-1]
    return qkv_out[..., 2 * width // 3:]


def paper_code_attention(qkv_out: torch.Tensor, dense: torch.nn.Linear) -> torch.Tensor:
    """``attention.dense`` applied to :func:`paper_code_values` at the same token (float32).

    ``qkv_out`` (..., 3 D) output of ``attention.query_key_value``; returns (..., D) float32,
    bias included.
    """
    bias = None if dense.bias is None else dense.bias.detach().float()
    return F.linear(paper_code_values(qkv_out.detach()).float(), dense.weight.detach().float(),
                    bias)


def attention_hook_target(layer: torch.nn.Module, kind: str) -> tuple[
        torch.nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The module to hook for a GPT-NeoX layer's attention activation and how to map its output.

    ``kind``: ``residual_write`` (``attention.dense``, identity) or ``paper_code``
    (``attention.query_key_value``, :func:`paper_code_attention`).
    """
    check_choice("extraction.attention_activation", kind, ATTENTION_ACTIVATIONS)
    if kind == "residual_write":
        return layer.attention.dense, lambda out: out
    dense = layer.attention.dense
    return layer.attention.query_key_value, lambda out: paper_code_attention(out, dense)


def gradient_steps(step: int) -> tuple[int, int]:
    """Training steps whose batches the paper's gradients of checkpoint ``step`` used.

    ``(max(0, step - 5), max(0, step - 5) + 1)``: the first two of the code's
    ``range(max(0, step - 5), min(step + 6, 143000))``.
    """
    if step < 0:
        raise ValueError(f"step={step}: allowed a step >= 0")
    first = max(0, step - 5)
    return first, first + 1


def paper_code_sub_batches(n_sequences: int) -> list[tuple[int, int]]:
    """Sub-batches (start, stop) of the code's forward pass: sizes 1, 2, 4, ... up to n.

    >>> paper_code_sub_batches(128)[-2:]
    [(63, 127), (127, 128)]
    """
    if n_sequences < 1:
        raise ValueError(f"n_sequences={n_sequences}: allowed >= 1")
    out, start, size = [], 0, 1
    while start < n_sequences:
        stop = min(start + size, n_sequences)
        out.append((start, stop))
        start, size = stop, size * 2
    return out


def paper_code_gradient_singular_values(model: torch.nn.Module, batches: torch.Tensor, *,
                                        micro_batch: int | None = None) -> np.ndarray:
    """Singular values of the write matrices' gradients, the paper code's protocol.

    ``batches`` (2, S, T) int64 token ids: the training batches of :func:`gradient_steps`,
    ``S <= 128`` sequences each. For each batch: zero the gradients, accumulate the gradient
    of each :func:`paper_code_sub_batches` sub-batch's mean LM loss (labels = inputs),
    take the singular values (float64) of the write matrices' gradients per layer
    (``attention.dense`` and ``mlp.dense_4h_to_h`` for GPT-NeoX; the family's write modules
    otherwise, :mod:`lmdynamics.families`). Returns their mean over the batches,
    float64 (component = attention, mlp; layer; k), descending.
    """
    if batches.ndim != 3:
        raise ValueError(f"gradient batches must have shape (batches, sequences, positions); "
                         f"got {tuple(batches.shape)}")
    device = next(model.parameters()).device
    family = families.for_model(model)
    modules = family.write_modules(model)
    mats = [modules["attention"], modules["mlp"]]
    per_batch = []
    for batch in batches:
        model.zero_grad(set_to_none=True)
        for start, stop in paper_code_sub_batches(batch.shape[0]):
            step = micro_batch or (stop - start)
            for lo in range(start, stop, step):
                hi = min(lo + step, stop)
                inputs = batch[lo:hi].to(device)
                lm_loss(model, inputs, scale=(hi - lo) / (stop - start))
        per_batch.append(np.stack([np.stack([singular_values(family.write_matrix(m.weight.grad))
                                             for m in comp]) for comp in mats]))
    model.zero_grad(set_to_none=True)
    return np.mean(per_batch, axis=0)


def tiny_gradient_batches(step: int, *, batch_size: int, seq_len: int, seed: int,
                          corpus: np.ndarray | None = None) -> np.ndarray:
    """The tiny suite's training batches of :func:`gradient_steps` ``(step)``.

    int64 (2, min(batch_size, 128), seq_len): the first sequences of the batches consumed by
    updates ``max(0, step - 5)`` and the next one (:func:`lmdynamics.sources.tiny.training_batch`).
    """
    from lmdynamics.sources.tiny import load_corpus, training_batch

    data = load_corpus() if corpus is None else corpus
    keep = min(batch_size, PAPER_GRADIENT_SEQUENCES)
    return np.stack([training_batch(data, s, batch_size=batch_size, seq_len=seq_len,
                                    seed=seed)[:keep] for s in gradient_steps(step)])


def hub_gradient_batches(step: int, source: TokenSource) -> tuple[np.ndarray, list[dict]]:
    """Pythia's training batches of :func:`gradient_steps` ``(step)`` for the paper's gradients.

    Reads, by byte range from ``source`` (the preshuffled Pile on the hub, or local shards:
    :class:`lmdynamics.sources.pile.HubTokens` /
    :class:`~lmdynamics.sources.pile.LocalTokens`), the first
    :data:`PAPER_GRADIENT_SEQUENCES` sequences of the batches consumed by updates
    ``step - 5`` and ``step - 4`` (batch N = sequences [N * 1024, (N + 1) * 1024), as for the
    last batch): 2 x 128 x 2049 tokens, 1 MiB. Steps below 5 take batches 0 and 1, as the
    paper's code did (its ``range(max(0, c - 5), ...)``; step 0's gradient is then measured
    on the first two batches, which the step-0 weights have not been trained on either).
    Returns int64 (2, 128, 2049) and the two provenance records of
    :func:`lmdynamics.sources.pile.read_sequences`.
    """
    from lmdynamics.sources.pile import read_sequences

    batches, records = [], []
    for batch in gradient_steps(step):
        tokens, record = read_sequences(source, batch, count=PAPER_GRADIENT_SEQUENCES)
        batches.append(tokens.astype(np.int64))
        records.append(record)
    return np.stack(batches), records

"""One forward and backward pass of a causal LM on the eval batch, with capture hooks.

The modules hooked and the write matrices are the model family's
(:mod:`lmdynamics.families`: ``attention.dense`` / ``mlp.dense_4h_to_h`` for GPT-NeoX,
``self_attn.o_proj`` / ``mlp.down_proj`` for Llama-style, ``attn.c_proj`` / ``mlp.c_proj``
for GPT-2, whose ``Conv1D`` weights are transposed to (out, in) before anything is taken of
them).

What a pass yields (:class:`Extraction`): the activations each layer writes to the residual
stream at the sampled token positions, the singular values of the write matrices and of
their gradients, the loss, and which layers went non-finite. The loss and its gradient go
through :func:`lmdynamics.extraction.lm_loss.lm_loss` (chunked unembedding).
:func:`run_pass_fitting`
adds the micro-batch policy: :func:`default_micro_batch` sequences at a time, halved on
CUDA out-of-memory.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from lmdynamics import families
from lmdynamics.extraction.lm_loss import lm_loss
from lmdynamics.extraction.paper_code import attention_hook_target
from lmdynamics.extraction.spectra import singular_values

log = logging.getLogger(__name__)

COMPONENTS = ("attention", "mlp")

def write_modules(model: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """The per-layer write-matrix modules (the family's attention and MLP write modules)."""
    return families.for_model(model).write_modules(model)


@dataclass
class Extraction:
    """What one pass yields. Shapes: activations (2, L, N, D); singular values (2, L, D);
    ``nonfinite_*`` booleans (2, L): NaN or inf anywhere in that layer's output over the whole
    batch (not only the sampled tokens), in its write matrix, in that matrix's gradient.
    When left None they are derived from the arrays above by :func:`nonfinite_flags`."""

    activations: np.ndarray
    weight_singular_values: np.ndarray
    grad_singular_values: np.ndarray
    loss: float
    nonfinite_activations: np.ndarray | None = None
    nonfinite_weights: np.ndarray | None = None
    nonfinite_grads: np.ndarray | None = None
    #: Sequences per forward/backward the pass ran with (after any out-of-memory halving).
    micro_batch: int | None = None


def nonfinite_flags(result: Extraction) -> dict[str, np.ndarray]:
    """The three (component, layer) booleans of ``result``, derived from its arrays if unset.

    Derived: a layer's sampled activations, or its weight / gradient singular values (NaN when
    the matrix has a non-finite entry, :func:`lmdynamics.extraction.spectra.singular_values`).
    """
    derived = {
        "nonfinite_activations": ~np.isfinite(result.activations).all(axis=(2, 3)),
        "nonfinite_weights": ~np.isfinite(result.weight_singular_values).all(axis=2),
        "nonfinite_grads": ~np.isfinite(result.grad_singular_values).all(axis=2),
    }
    out = {}
    for name, fallback in derived.items():
        recorded = getattr(result, name)
        out[name] = np.asarray(fallback if recorded is None else recorded, dtype=bool)
    return out


def _capture(buffer: list[list[torch.Tensor]], seq: torch.Tensor,
             pos: torch.Tensor, finite: list[torch.Tensor] | None = None,
             transform: Callable | None = None) -> Callable:
    """A forward hook appending the output's sampled rows to ``buffer`` and whether the whole
    output is finite to ``finite``, both left on the model's device: nothing here waits for
    the GPU (a ``bool()`` or a host copy per layer would synchronise it 2L times per pass);
    :func:`_host_rows` and :func:`_all_true` bring them over once the pass is done."""
    def hook(_module, _inputs, output):
        out = output.detach()
        if finite is not None:
            finite.append(torch.isfinite(out).all())
        out = out[seq, pos]
        buffer.append(out if transform is None else transform(out))
    return hook


def _host_rows(parts: list[torch.Tensor]) -> np.ndarray:
    """Captured rows of one layer, concatenated over micro-batches, as float32 on the host
    (exact for float16/bfloat16 models: float32 holds every such value)."""
    return torch.cat(parts).to("cpu", torch.float32).numpy()


def _all_true(flags: list[torch.Tensor]) -> bool:
    """Whether every captured device boolean is true (one host transfer)."""
    return bool(torch.stack(flags).all()) if flags else True


def hook_targets(model: torch.nn.Module, attention_activation: str = "residual_write"
                 ) -> dict[str, list[tuple[torch.nn.Module, Callable | None]]]:
    """Per component and layer: the module whose output is captured and how it is mapped.

    ``residual_write`` hooks what each block writes to the residual stream (the write
    modules, or the family's ``activation_sites``: OLMo 2's output norms); ``paper_code``
    (GPT-NeoX only) hooks attention's fused ``query_key_value`` instead
    (:func:`lmdynamics.extraction.paper_code.attention_hook_target`).
    """
    family = families.for_model(model)
    sites = family.activation_modules(model)
    mlp = [(m, None) for m in sites["mlp"]]
    if attention_activation == "residual_write":
        return {"attention": [(m, None) for m in sites["attention"]], "mlp": mlp}
    families.check_attention_activation(family, attention_activation)
    return {"attention": [attention_hook_target(layer, attention_activation)
                          for layer in family.blocks(model)], "mlp": mlp}


def run_pass(model: torch.nn.Module, batch: torch.Tensor, seq_idx: np.ndarray,
             pos_idx: np.ndarray, *, micro_batch: int | None = None,
             attention_activation: str = "residual_write",
             gradients: bool = True,
             extra_hooks: Callable[[torch.Tensor, torch.Tensor, bool], list] | None = None,
             ) -> Extraction:
    """Forward and backward of the LM loss on ``batch`` (S, T) with activation hooks.

    ``micro_batch`` sequences are processed at a time (all by default); the loss is the mean
    over all predicted tokens and gradients accumulate to those of the whole batch.
    ``attention_activation``: see :func:`hook_targets`. ``gradients=False`` runs the
    forward pass only (``grad_singular_values`` is then all NaN, to be filled by the caller).
    ``extra_hooks(seq, pos, first)``, if given, registers more hooks for each micro-batch
    (``seq``, ``pos``: its sampled positions; ``first``: the pass starts over, e.g. after an
    out-of-memory retry) and returns their handles, removed after the micro-batch.
    """
    device = next(model.parameters()).device
    family = families.for_model(model)
    modules = family.write_modules(model)
    targets = hook_targets(model, attention_activation)
    n_layers = len(modules["attention"])
    n_seq = batch.shape[0]
    micro = micro_batch or n_seq
    model.zero_grad(set_to_none=True)
    captured: dict[tuple[str, int], list[torch.Tensor]] = {
        (c, i): [] for c in COMPONENTS for i in range(n_layers)}
    finite: dict[tuple[str, int], list[torch.Tensor]] = {key: [] for key in captured}
    loss_total = 0.0
    grads: dict[tuple[str, int], torch.Tensor] = {}
    for start in range(0, n_seq, micro):
        stop = min(start + micro, n_seq)
        keep = (seq_idx >= start) & (seq_idx < stop)
        seq = torch.as_tensor(seq_idx[keep] - start, device=device)
        pos = torch.as_tensor(pos_idx[keep], device=device)
        handles = [mod.register_forward_hook(_capture(captured[(c, i)], seq, pos,
                                                      finite[(c, i)], fn))
                   for c in COMPONENTS for i, (mod, fn) in enumerate(targets[c])]
        if extra_hooks is not None:
            handles += extra_hooks(seq, pos, start == 0)
        try:
            inputs = batch[start:stop].to(device)
            weight = (stop - start) / n_seq  # equal-length sequences: token-weighted mean
            with torch.set_grad_enabled(gradients):
                loss = lm_loss(model, inputs, scale=weight, backward=gradients)
            if gradients:
                _accumulate_float32(grads, modules)
            loss_total += loss * weight
        finally:
            for h in handles:
                h.remove()
    acts = np.stack([np.stack([_host_rows(captured[(c, i)]) for i in range(n_layers)])
                     for c in COMPONENTS])
    # one batched call per component (layers stacked: same shape), on (out, in) matrices
    w_sv = np.stack([singular_values(torch.stack([family.write_matrix(m.weight.detach())
                                                  for m in modules[c]])) for c in COMPONENTS])
    if gradients:
        g_sv = np.stack([singular_values(torch.stack([family.write_matrix(grads[(c, i)])
                                                      for i in range(n_layers)]))
                         for c in COMPONENTS])
        grad_finite = np.array([[bool(torch.isfinite(grads[(c, i)]).all())
                                 for i in range(n_layers)] for c in COMPONENTS], dtype=bool)
        for c in COMPONENTS:  # the whole batch's gradient back in place, for statistics
            for i, m in enumerate(modules[c]):
                m.weight.grad = grads[(c, i)].to(m.weight.dtype)
    else:
        g_sv = np.full_like(w_sv, np.nan)
        grad_finite = np.ones(w_sv.shape[:2], dtype=bool)

    def nonfinite(test: Callable[[torch.nn.Linear], bool]) -> np.ndarray:
        return np.array([[not test(m) for m in modules[c]] for c in COMPONENTS], dtype=bool)

    return Extraction(
        acts, w_sv, g_sv, loss_total,
        nonfinite_activations=np.array([[not _all_true(finite[(c, i)]) for i in range(n_layers)]
                                        for c in COMPONENTS], dtype=bool),
        nonfinite_weights=nonfinite(lambda m: bool(torch.isfinite(m.weight).all())),
        nonfinite_grads=~grad_finite, micro_batch=micro)


def _accumulate_float32(grads: dict[tuple[str, int], torch.Tensor],
                        modules: dict[str, list[torch.nn.Linear]]) -> None:
    """Add each write matrix's gradient of this micro-batch to a float32 sum and clear it,
    so bfloat16/float16 models reduce gradients across micro-batches in float32."""
    for c in COMPONENTS:
        for i, m in enumerate(modules[c]):
            g = m.weight.grad.float()
            grads[(c, i)] = g if (c, i) not in grads else grads[(c, i)] + g
            m.weight.grad = None


def sub_batch_bounds(n_sequences: int, sub_batches: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of ``min(sub_batches, n_sequences)`` contiguous sub-batches of a
    batch's sequences, sizes differing by at most one (``np.array_split``)."""
    if sub_batches < 1 or n_sequences < 1:
        raise ValueError(f"sub-batches need sub_batches >= 1 and a sequence; got "
                         f"sub_batches={sub_batches}, {n_sequences} sequences")
    parts = np.array_split(np.arange(n_sequences), min(sub_batches, n_sequences))
    return [(int(p[0]), int(p[-1]) + 1) for p in parts]


def sub_batch_gradient_singular_values(model: torch.nn.Module, batch: torch.Tensor,
                                       sub_batches: int, *,
                                       micro_batch: int | None = None) -> np.ndarray:
    """Singular values of the write matrices' gradients on each sub-batch of ``batch``.

    ``batch`` (S, T) token ids is cut into :func:`sub_batch_bounds` ``(S, sub_batches)``
    (disjoint sequences: independent draws of the data, so the spread over sub-batches
    measures the gradient's sampling noise); each sub-batch's gradient is that of its own
    mean LM loss, summed over micro-batches of ``micro_batch`` sequences in float32, as
    :func:`run_pass` does for the whole batch. Returns float64 (sub_batch, component, layer,
    k), descending; NaN for a matrix with a non-finite entry. Leaves no gradients behind.
    """
    device = next(model.parameters()).device
    family = families.for_model(model)
    modules = family.write_modules(model)
    out = []
    for lo, hi in sub_batch_bounds(batch.shape[0], sub_batches):
        model.zero_grad(set_to_none=True)
        grads: dict[tuple[str, int], torch.Tensor] = {}
        step = micro_batch or (hi - lo)
        for start in range(lo, hi, step):
            stop = min(start + step, hi)
            lm_loss(model, batch[start:stop].to(device), scale=(stop - start) / (hi - lo))
            _accumulate_float32(grads, modules)
        out.append(np.stack([singular_values(torch.stack(
            [family.write_matrix(grads[(c, i)]) for i in range(len(modules[c]))]))
            for c in COMPONENTS]))
    model.zero_grad(set_to_none=True)
    return np.stack(out)


def only_write_weights_train(model: torch.nn.Module) -> None:
    """Require gradients for the write matrices only: their gradients are unchanged, and no
    memory or time goes to the gradients of the other parameters."""
    model.requires_grad_(False)
    for mods in write_modules(model).values():
        for m in mods:
            m.weight.requires_grad_(True)


def run_pass_fitting(model: torch.nn.Module, batch: torch.Tensor, seq_idx: np.ndarray,
                     pos_idx: np.ndarray, *, micro_batch: int | None = None,
                     **options) -> Extraction:
    """:func:`run_pass` with ``micro_batch`` sequences at a time (all by default), halved on
    CUDA out-of-memory until it fits (an error only when one sequence does not fit).
    ``options`` go to :func:`run_pass`."""
    micro = micro_batch or batch.shape[0]
    while True:
        try:
            return run_pass(model, batch, seq_idx, pos_idx, micro_batch=micro, **options)
        except torch.cuda.OutOfMemoryError as exc:
            model.zero_grad(set_to_none=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if micro == 1:
                raise RuntimeError("CUDA out of memory with a micro-batch of one sequence; "
                                   "use a larger GPU or extraction.dtype bfloat16") from exc
            micro = max(1, micro // 2)
            log.warning("CUDA out of memory; retrying with micro-batches of %d sequences", micro)




#: Tokens per micro-batch on CPU when none is configured (:func:`default_micro_batch`).
CPU_MICRO_BATCH_TOKENS = 4096


def default_micro_batch(device: torch.device, seq_len: int) -> int | None:
    """Sequences per micro-batch when ``extraction.micro_batch`` is 0 (None = all at once).

    CUDA: all (:func:`run_pass_fitting` halves it on out-of-memory). CPU: as many sequences as
    fit in :data:`CPU_MICRO_BATCH_TOKENS` tokens, at least one: the GEMMs keep thousands of
    rows, and the pass's buffers stay small enough to be reused from one micro-batch to the
    next instead of being faulted in afresh (docs/benchmarks/2026-11-29.md). The tiny
    suite's 16 x 129-token batch stays one micro-batch.
    """
    if device.type == "cuda":
        return None
    return max(1, CPU_MICRO_BATCH_TOKENS // seq_len)

"""Per-checkpoint extraction: one forward and backward pass on the eval batch.

For each layer of a GPT-NeoX model we record what the layer writes to the residual stream:

- attention activation: the output of ``attention.dense`` (bias included), the paper's text;
- MLP activation: the output of ``mlp.dense_4h_to_h`` (bias included),

at a fixed, seeded subsample of token positions, and the singular values of the two write
matrices (``attention.dense.weight``, ``mlp.dense_4h_to_h.weight``) and of their gradients
of the language-modelling loss (labels = inputs) on the same batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from lmdynamics import __version__
from lmdynamics.checkpoints import load_model, n_parameters, weights_sha256
from lmdynamics.conjecture import SITES, ResidualRecorder, StatsOptions, checkpoint_stats
from lmdynamics.metrics import singular_values
from lmdynamics.store import write_store

log = logging.getLogger(__name__)

COMPONENTS = ("attention", "mlp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def sample_token_positions(n_sequences: int, seq_len: int, n_tokens: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subsample of ``n_tokens`` distinct (sequence, position) pairs of the eval batch.

    Depends only on the batch shape and the seed, so every step and size gets the same
    positions. Returns two int64 arrays of length ``n_tokens`` in row-major order.
    """
    total = n_sequences * seq_len
    if not 1 <= n_tokens <= total:
        raise ValueError(f"tokens={n_tokens}: allowed 1..{total} (the eval batch holds "
                         f"{n_sequences} sequences x {seq_len} positions)")
    flat = np.sort(np.random.default_rng(seed).choice(total, size=n_tokens, replace=False))
    return (flat // seq_len).astype(np.int64), (flat % seq_len).astype(np.int64)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("extraction.device: 'cuda' was asked for but no CUDA device is "
                           "available; allowed here: auto, cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device={name!r}: allowed auto, cpu, cuda")
    return torch.device(name)


def write_modules(model: torch.nn.Module) -> dict[str, list[torch.nn.Linear]]:
    """The per-layer modules whose outputs are written to the residual stream."""
    layers = model.gpt_neox.layers
    return {"attention": [layer.attention.dense for layer in layers],
            "mlp": [layer.mlp.dense_4h_to_h for layer in layers]}


@dataclass
class Extraction:
    """What one pass yields. Shapes: activations (2, L, N, D); singular values (2, L, D)."""

    activations: np.ndarray
    weight_singular_values: np.ndarray
    grad_singular_values: np.ndarray
    loss: float


def _capture(buffer: list[list[torch.Tensor]], seq: torch.Tensor,
             pos: torch.Tensor) -> Callable:
    def hook(_module, _inputs, output):
        buffer.append(output.detach()[seq, pos].to("cpu", torch.float32))
    return hook


def run_pass(model: torch.nn.Module, batch: torch.Tensor, seq_idx: np.ndarray,
             pos_idx: np.ndarray, *, micro_batch: int | None = None,
             extra_hooks: Callable[[torch.Tensor, torch.Tensor], list] | None = None,
             ) -> Extraction:
    """Forward and backward of the LM loss on ``batch`` (S, T) with activation hooks.

    ``micro_batch`` sequences are processed at a time (all by default); the loss is the mean
    over all predicted tokens and gradients accumulate to those of the whole batch.
    ``extra_hooks(seq, pos)``, if given, registers more hooks for each micro-batch (``seq``,
    ``pos``: its sampled positions) and returns their handles, removed after the micro-batch.
    """
    device = next(model.parameters()).device
    modules = write_modules(model)
    n_layers = len(modules["attention"])
    n_seq = batch.shape[0]
    micro = micro_batch or n_seq
    model.zero_grad(set_to_none=True)
    captured: dict[tuple[str, int], list[torch.Tensor]] = {
        (c, i): [] for c in COMPONENTS for i in range(n_layers)}
    loss_total = 0.0
    for start in range(0, n_seq, micro):
        stop = min(start + micro, n_seq)
        keep = (seq_idx >= start) & (seq_idx < stop)
        seq = torch.as_tensor(seq_idx[keep] - start, device=device)
        pos = torch.as_tensor(pos_idx[keep], device=device)
        handles = [mod.register_forward_hook(_capture(captured[(c, i)], seq, pos))
                   for c in COMPONENTS for i, mod in enumerate(modules[c])]
        if extra_hooks is not None:
            handles += extra_hooks(seq, pos)
        try:
            inputs = batch[start:stop].to(device)
            out = model(input_ids=inputs, labels=inputs)
            weight = (stop - start) / n_seq  # equal-length sequences: token-weighted mean
            (out.loss.float() * weight).backward()
            loss_total += out.loss.item() * weight
        finally:
            for h in handles:
                h.remove()
    acts = np.stack([np.stack([torch.cat(captured[(c, i)]).numpy() for i in range(n_layers)])
                     for c in COMPONENTS])
    w_sv = np.stack([np.stack([singular_values(m.weight.detach()) for m in modules[c]])
                     for c in COMPONENTS])
    g_sv = np.stack([np.stack([singular_values(m.weight.grad) for m in modules[c]])
                     for c in COMPONENTS])
    return Extraction(acts, w_sv, g_sv, loss_total)


def extraction_dataset(result: Extraction, seq_idx: np.ndarray, pos_idx: np.ndarray,
                       attrs: dict) -> xr.Dataset:
    """Package one pass as the per-pair dataset described in docs/architecture.md."""
    n_comp, n_layers, n_tokens, dim = result.activations.shape
    k = result.weight_singular_values.shape[-1]
    coords = {
        "component": np.array(COMPONENTS, dtype=object),
        "layer": np.arange(n_layers),
        "token": np.arange(n_tokens),
        "sequence": ("token", seq_idx),
        "position": ("token", pos_idx),
        "dim": np.arange(dim),
        "k": np.arange(k),
    }
    ds = xr.Dataset(
        {
            "activations": (("component", "layer", "token", "dim"), result.activations,
                            {"description": "layer output written to the residual stream"}),
            "weight_singular_values": (("component", "layer", "k"),
                                       result.weight_singular_values),
            "grad_singular_values": (("component", "layer", "k"), result.grad_singular_values),
            "loss": ((), result.loss, {"units": "nats/token"}),
        },
        coords=coords,
        attrs=attrs,
    )
    return ds


def extract_checkpoint(checkpoint: Path | str, eval_batch: Path | str, out: Path | str, *,
                       tokens: int, seed: int, size: str, step: int, model_name: str,
                       revision: str, device: str = "auto", dtype: str = "float32",
                       micro_batch: int | None = None,
                       stats: StatsOptions | None = None) -> Path:
    """Load one checkpoint, run the eval batch through it and write its store to ``out``.

    With ``stats``, the Conjecture statistics (:mod:`lmdynamics.conjecture`) of the same pass
    are added to the store as ``stat_*`` variables.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {', '.join(DTYPES)}")
    model = load_model(checkpoint, dtype=DTYPES[dtype], device=dev)
    batch = torch.as_tensor(np.load(eval_batch), dtype=torch.long)
    seq_idx, pos_idx = sample_token_positions(*batch.shape, tokens, seed)
    log.info("loaded %s step %d (%s) on %s in %.1fs; eval batch %s, %d sampled tokens",
             size, step, checkpoint, dev, time.perf_counter() - t0, tuple(batch.shape), tokens)
    residual = ResidualRecorder(model) if stats is not None else None
    result = run_pass(model, batch, seq_idx, pos_idx, micro_batch=micro_batch,
                      extra_hooks=residual.hooks if residual is not None else None)
    cfg = model.config
    attrs = {
        "model": model_name, "revision": revision, "size": size, "step": int(step),
        "dtype": dtype, "lmdynamics_version": __version__,
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_hidden_layers,
        "n_params": n_parameters(model), "weights_sha256": weights_sha256(checkpoint),
        "eval_batch_shape": list(batch.shape), "token_seed": seed,
    }
    ds = extraction_dataset(result, seq_idx, pos_idx, attrs)
    if stats is not None and residual is not None:
        t_stats = time.perf_counter()
        sampled = dict(zip(SITES, (residual.sampled(), *result.activations), strict=True))
        ds = ds.merge(checkpoint_stats(model, sampled, residual.max_abs, stats))
        log.info("Conjecture statistics in %.2fs", time.perf_counter() - t_stats)
    chunks = (1, 1, *result.activations.shape[2:])
    write_store(ds, out, encoding={"activations": {"chunks": chunks}})
    log.info("wrote %s (loss %.4f) in %.1fs", out, result.loss, time.perf_counter() - t0)
    return Path(out)

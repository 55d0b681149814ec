"""Per-checkpoint extraction: one forward and backward pass on the eval batch.

For each layer of a GPT-NeoX model we record what the layer writes to the residual stream:

- attention activation: the output of ``attention.dense`` (bias included), the paper's text;
- MLP activation: the output of ``mlp.dense_4h_to_h`` (bias included),

at a fixed, seeded subsample of token positions, and the singular values of the two write
matrices (``attention.dense.weight``, ``mlp.dense_4h_to_h.weight``) and of their gradients
of the language-modelling loss (labels = inputs) on the same batch.

A diverged checkpoint (NaN or inf in a layer's output over the whole batch, in its write
matrix or in that matrix's gradient) is recorded, not refused: booleans
``nonfinite_activations``, ``nonfinite_weights``, ``nonfinite_grads`` (component, layer) and
the store attr ``nonfinite``, with a warning naming size, step, component and layer.
The paper code's attention activation, gradient protocol and token sampling are options
(:mod:`lmdynamics.paper_code`, :func:`token_positions`).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import xarray as xr
import zarr.codecs

from lmdynamics import __version__
from lmdynamics.audit import discard_corrupt_download, revision_attrs
from lmdynamics.checkpoints import (
    CorruptCheckpointError,
    load_model,
    n_parameters,
    weights_sha256,
)
from lmdynamics.conjecture import SITES, ResidualRecorder, StatsOptions, checkpoint_stats
from lmdynamics.metrics import singular_values
from lmdynamics.paper_code import (
    GRADIENT_PROTOCOLS,
    attention_hook_target,
    check_choice,
    gradient_steps,
    paper_code_gradient_singular_values,
)
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


#: Token sampling protocols (config ``sampling.protocol``).
SAMPLING_PROTOCOLS = ("random_positions", "paper_code")


def token_positions(protocol: str, n_sequences: int, seq_len: int, n_tokens: int, seed: int,
                    context: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (sequence, position) pairs whose activations are stored, by sampling protocol.

    ``random_positions``: :func:`sample_token_positions` over the positions inside the
    model's context (``min(seq_len, context)``: Pythia's 2049-token sequences feed a
    2048-position model, whose last input position only serves as a label).
    ``paper_code``: the last position of each of the first ``n_tokens`` sequences, as the
    paper's code did (``hidden_states[:, -1, :]`` of the first 128 sequences of the last
    batch; shared/notes/reference-facts.md).
    """
    if protocol == "random_positions":
        usable = seq_len if context is None else min(seq_len, context)
        return sample_token_positions(n_sequences, usable, n_tokens, seed)
    if protocol == "paper_code":
        if not 1 <= n_tokens <= n_sequences:
            raise ValueError(f"tokens={n_tokens} with sampling protocol paper_code (one token "
                             f"per sequence): allowed 1..{n_sequences}, the eval batch's "
                             "sequences")
        return (np.arange(n_tokens, dtype=np.int64),
                np.full(n_tokens, seq_len - 1, dtype=np.int64))
    raise ValueError(f"sampling protocol {protocol!r}: allowed {', '.join(SAMPLING_PROTOCOLS)}")


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


def nonfinite_flags(result: Extraction) -> dict[str, np.ndarray]:
    """The three (component, layer) booleans of ``result``, derived from its arrays if unset.

    Derived: a layer's sampled activations, or its weight / gradient singular values (NaN when
    the matrix has a non-finite entry, :func:`lmdynamics.metrics.singular_values`).
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
             pos: torch.Tensor, finite: list[bool] | None = None,
             transform: Callable | None = None) -> Callable:
    def hook(_module, _inputs, output):
        out = output.detach()
        if finite is not None:
            finite.append(bool(torch.isfinite(out).all()))
        out = out[seq, pos]
        buffer.append((out if transform is None else transform(out)).to("cpu", torch.float32))
    return hook


def hook_targets(model: torch.nn.Module, attention_activation: str = "residual_write"
                 ) -> dict[str, list[tuple[torch.nn.Module, Callable | None]]]:
    """Per component and layer: the module whose output is captured and how it is mapped.

    ``residual_write`` hooks :func:`write_modules`; ``paper_code`` hooks attention's fused
    ``query_key_value`` instead (:func:`lmdynamics.paper_code.attention_hook_target`).
    """
    mlp = [(m, None) for m in write_modules(model)["mlp"]]
    if attention_activation == "residual_write":
        return {"attention": [(m, None) for m in write_modules(model)["attention"]], "mlp": mlp}
    return {"attention": [attention_hook_target(layer, attention_activation)
                          for layer in model.gpt_neox.layers], "mlp": mlp}


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
    modules = write_modules(model)
    targets = hook_targets(model, attention_activation)
    n_layers = len(modules["attention"])
    n_seq = batch.shape[0]
    micro = micro_batch or n_seq
    model.zero_grad(set_to_none=True)
    captured: dict[tuple[str, int], list[torch.Tensor]] = {
        (c, i): [] for c in COMPONENTS for i in range(n_layers)}
    finite: dict[tuple[str, int], list[bool]] = {key: [] for key in captured}
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
            with torch.set_grad_enabled(gradients):
                out = model(input_ids=inputs, labels=inputs)
            weight = (stop - start) / n_seq  # equal-length sequences: token-weighted mean
            if gradients:
                (out.loss.float() * weight).backward()
                _accumulate_float32(grads, modules)
            loss_total += out.loss.item() * weight
        finally:
            for h in handles:
                h.remove()
    acts = np.stack([np.stack([torch.cat(captured[(c, i)]).numpy() for i in range(n_layers)])
                     for c in COMPONENTS])
    # one batched call per component (layers stacked: same shape)
    w_sv = np.stack([singular_values(torch.stack([m.weight.detach() for m in modules[c]]))
                     for c in COMPONENTS])
    if gradients:
        g_sv = np.stack([singular_values(torch.stack([grads[(c, i)] for i in range(n_layers)]))
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
        nonfinite_activations=np.array([[not all(finite[(c, i)]) for i in range(n_layers)]
                                        for c in COMPONENTS], dtype=bool),
        nonfinite_weights=nonfinite(lambda m: bool(torch.isfinite(m.weight).all())),
        nonfinite_grads=~grad_finite)


def _accumulate_float32(grads: dict[tuple[str, int], torch.Tensor],
                        modules: dict[str, list[torch.nn.Linear]]) -> None:
    """Add each write matrix's gradient of this micro-batch to a float32 sum and clear it,
    so bfloat16/float16 models reduce gradients across micro-batches in float32."""
    for c in COMPONENTS:
        for i, m in enumerate(modules[c]):
            g = m.weight.grad.float()
            grads[(c, i)] = g if (c, i) not in grads else grads[(c, i)] + g
            m.weight.grad = None


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
    flags = nonfinite_flags(result)
    for name, value in flags.items():
        ds[name] = (("component", "layer"), value,
                    {"description": f"NaN or inf in the layer's {name.split('_')[1]}"})
    ds.attrs["nonfinite"] = bool(any(v.any() for v in flags.values())
                                 or not np.isfinite(result.loss))
    return ds


def warn_nonfinite(ds: xr.Dataset) -> None:
    """Log a warning per (component, layer) of ``ds`` with non-finite values recorded."""
    for name in ("nonfinite_activations", "nonfinite_weights", "nonfinite_grads"):
        for comp, layer in zip(*np.nonzero(ds[name].values), strict=True):
            log.warning("non-finite %s (NaN or inf) for size %s step %s %s layer %d: recorded "
                        "in the store; metrics computed from them will be NaN",
                        name.split("_")[1], ds.attrs.get("size"), ds.attrs.get("step"),
                        ds.component.values[comp], layer)
    if not np.isfinite(float(ds.loss)):
        log.warning("non-finite loss %s for size %s step %s", float(ds.loss),
                    ds.attrs.get("size"), ds.attrs.get("step"))


def extract_checkpoint(checkpoint: Path | str, eval_batch: Path | str, out: Path | str, *,
                       tokens: int, seed: int, size: str, step: int, model_name: str,
                       revision: str, device: str = "auto", dtype: str = "float32",
                       micro_batch: int | None = None,
                       sampling: str = "random_positions",
                       attention_activation: str = "residual_write",
                       gradient_protocol: str = "eval_batch",
                       gradient_batches: Path | str | None = None,
                       stats: StatsOptions | None = None) -> Path:
    """Load one checkpoint, run the eval batch through it and write its store to ``out``.

    ``gradient_protocol="paper_code"`` needs ``gradient_batches``: an .npy (2, S, T) of
    the training batches of :func:`lmdynamics.paper_code.gradient_steps` ``(step)``.
    With ``stats``, the Conjecture statistics (:mod:`lmdynamics.conjecture`) of the same pass
    are added to the store as ``stat_*`` variables.
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {', '.join(DTYPES)}")
    check_choice("extraction.gradient_protocol", gradient_protocol, GRADIENT_PROTOCOLS)
    if gradient_protocol == "paper_code" and gradient_batches is None:
        raise ValueError("extraction.gradient_protocol='paper_code' needs the training "
                         "batches of steps c-5 and c-4 (--gradient-batches); none was given")
    try:
        model = load_model(checkpoint, dtype=DTYPES[dtype], device=dev)
    except CorruptCheckpointError as exc:
        raise discard_corrupt_download(checkpoint, exc) from exc
    batch_array = np.load(eval_batch)
    batch = torch.as_tensor(batch_array, dtype=torch.long)
    check_vocabulary(batch, model.config.vocab_size, eval_batch)
    seq_idx, pos_idx = token_positions(sampling, *batch.shape, tokens, seed,
                                       context=model.config.max_position_embeddings)
    if stats is None:  # the Conjecture statistics need every parameter's gradient
        only_write_weights_train(model)
    log.info("loaded %s step %d (%s) on %s in %.1fs; eval batch %s, %d sampled tokens",
             size, step, checkpoint, dev, time.perf_counter() - t0, tuple(batch.shape), tokens)
    residual = ResidualRecorder(model) if stats is not None else None
    t_pass = time.perf_counter()
    result = run_pass_fitting(model, batch, seq_idx, pos_idx, micro_batch=micro_batch,
                              attention_activation=attention_activation,
                              gradients=gradient_protocol == "eval_batch",
                              extra_hooks=residual.hooks if residual is not None else None)
    log.info("forward+backward pass in %.2fs", time.perf_counter() - t_pass)
    if gradient_protocol == "paper_code":
        grad_batches = torch.as_tensor(np.load(gradient_batches), dtype=torch.long)
        result.grad_singular_values = paper_code_gradient_singular_values(
            model, grad_batches, micro_batch=micro_batch)
    cfg = model.config
    attrs = {
        "model": model_name, "revision": revision, "size": size, "step": int(step),
        "dtype": dtype, "lmdynamics_version": __version__,
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": cfg.intermediate_size, "num_layers": cfg.num_hidden_layers,
        "n_params": n_parameters(model), "weights_sha256": weights_sha256(checkpoint),
        "eval_batch_shape": list(batch.shape), "token_seed": seed,
        "sampling_protocol": sampling, **revision_attrs(checkpoint),
        "eval_batch_sha256": hashlib.sha256(
            np.ascontiguousarray(batch_array, dtype=np.int64).tobytes()).hexdigest(),
        "attention_activation": attention_activation, "gradient_protocol": gradient_protocol,
    }
    if gradient_protocol == "paper_code":
        attrs["gradient_steps"] = list(gradient_steps(step))
    ds = extraction_dataset(result, seq_idx, pos_idx, attrs)
    warn_nonfinite(ds)
    if stats is not None and residual is not None:
        t_stats = time.perf_counter()
        sampled = dict(zip(SITES, (residual.sampled(), *result.activations), strict=True))
        ds = ds.merge(checkpoint_stats(model, sampled, residual.max_abs, stats))
        log.info("Conjecture statistics in %.2fs", time.perf_counter() - t_stats)
    write_store(ds, out, encoding=activation_encoding(result.activations.shape))
    log.info("wrote %s (loss %.4f) in %.1fs", out, result.loss, time.perf_counter() - t0)
    return Path(out)


def activation_encoding(shape: tuple[int, ...]) -> dict[str, dict]:
    """Zarr encoding of a per-pair store's ``activations`` (component, layer, token, dim).

    Measured (benchmarks/store_encoding.py on real tiny-suite activations; figures in
    benchmarks/RESULTS.md), not guessed:

    - one chunk per (component, layer): the reduction reads one layer of one component at
      a time; chunks of a whole component read slower, quarter-layer chunks compress worse
      and write and read at about half the speed;
    - blosc zstd level 3 with bit-shuffle: float32 activations are nearly incompressible
      (mantissa noise); bit-shuffle lets zstd find the sign and exponent bits, 1.30x against
      1.22x for zarr's default (zstd level 0, no shuffle) and for zstd up to level 9, and
      1.28x for byte-shuffle, at a write and read speed within the noise of the others.
    """
    codec = zarr.codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
    return {"activations": {"chunks": (1, 1, *shape[2:]), "compressors": (codec,)}}


def check_vocabulary(batch: torch.Tensor, vocab_size: int, source: Path | str) -> None:
    """Refuse an eval batch with token ids the model's embedding does not have."""
    top = int(batch.max())
    if top >= vocab_size or int(batch.min()) < 0:
        raise ValueError(f"{source}: token ids span {int(batch.min())}..{top}, the model's "
                         f"vocabulary has {vocab_size}; the eval batch does not belong to "
                         "this suite")

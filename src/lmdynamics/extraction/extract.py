"""Per-checkpoint extraction: one forward and backward pass on the eval batch.

For each layer of a GPT-NeoX model we record what the layer writes to the residual stream:

- attention activation: the output of ``attention.dense`` (bias included), the paper's text;
- MLP activation: the output of ``mlp.dense_4h_to_h`` (bias included),

at a fixed, seeded subsample of token positions, and the singular values of the two write
matrices (``attention.dense.weight``, ``mlp.dense_4h_to_h.weight``) and of their gradients
of the language-modelling loss (labels = inputs) on the same batch. Those are GPT-NeoX's
names; other families hook their own write modules (``self_attn.o_proj`` / ``mlp.down_proj``,
``attn.c_proj`` / ``mlp.c_proj``; :mod:`lmdynamics.families`), and the store records the
family in its attr ``family``.

A diverged checkpoint (NaN or inf in a layer's output over the whole batch, in its write
matrix or in that matrix's gradient) is recorded, not refused: booleans
``nonfinite_activations``, ``nonfinite_weights``, ``nonfinite_grads`` (component, layer) and
the store attr ``nonfinite``, with a warning naming size, step, component and layer.
The paper code's attention activation, gradient protocol and token sampling are options
(:mod:`lmdynamics.extraction.paper_code`, :func:`token_positions`).

Besides the sha256 of the weights file (attr ``weights_sha256``) the store records the sha256
of every floating-point tensor of that file (attr ``tensor_sha256``, name -> digest,
:func:`lmdynamics.sources.checkpoints.weights_digests`), which the content audit compares
across the steps of a run (:mod:`lmdynamics.reduction.audit`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
import zarr.codecs

from lmdynamics import __version__, families
from lmdynamics.extraction.conjecture import (
    SITES,
    ResidualRecorder,
    StatsOptions,
    checkpoint_stats,
)
from lmdynamics.extraction.measure_data import measure_data
from lmdynamics.extraction.paper_code import (
    GRADIENT_PROTOCOLS,
    check_choice,
    gradient_steps,
    paper_code_gradient_singular_values,
)
from lmdynamics.extraction.passes import (
    COMPONENTS,
    Extraction,
    default_micro_batch,
    nonfinite_flags,
    only_write_weights_train,
    run_pass_fitting,
    sub_batch_gradient_singular_values,
)
from lmdynamics.extraction.positions import sample_token_positions
from lmdynamics.extraction.reference import ReferenceStore
from lmdynamics.heap import reuse_freed_memory
from lmdynamics.options import defaults, resolve
from lmdynamics.sources.checkpoints import (
    CorruptCheckpointError,
    config_family,
    load_model,
    n_parameters,
    read_model_config,
    weights_digests,
    weights_sha256,
)
from lmdynamics.sources.revision import (
    WeightsMismatchError,
    config_attrs,
    discard_corrupt_download,
    verified_revision_attrs,
)
from lmdynamics.store import load_token_array, write_store

log = logging.getLogger(__name__)

#: Schema defaults of config section ``extraction``.
_DEFAULTS = defaults("extraction")

#: Allowed values of ``extraction.device``: ``auto`` = CUDA when available, else CPU.
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: Token sampling protocols (config ``sampling.protocol``).
SAMPLING_PROTOCOLS = ("random_positions", "paper_code")


@dataclass(frozen=True)
class ExtractionOptions:
    """How a checkpoint is run: the keys of config section ``extraction`` and the token
    sampling protocol (config ``sampling.protocol``). Their defaults, allowed values and
    ranges are the schema's (:func:`lmdynamics.options.resolve` checks them); their meaning:
    :func:`extract_checkpoint`.
    """

    device: str = _DEFAULTS["device"]
    dtype: str = _DEFAULTS["dtype"]
    micro_batch: int = _DEFAULTS["micro_batch"]
    attention_activation: str = _DEFAULTS["attention_activation"]
    attention_implementation: str = _DEFAULTS["attention_implementation"]
    gradient_protocol: str = _DEFAULTS["gradient_protocol"]
    grad_sub_batches: int = _DEFAULTS["grad_sub_batches"]
    sampling: str = defaults("sampling")["protocol"]

    @classmethod
    def from_config(cls, extraction: Mapping[str, Any],
                    sampling: Mapping[str, Any]) -> ExtractionOptions:
        """The options of config sections ``extraction`` and ``sampling`` (as
        :func:`lmdynamics.options.resolve` returns them)."""
        return cls(**extraction, sampling=sampling["protocol"])

    def __post_init__(self) -> None:
        resolve("extraction", {k: v for k, v in asdict(self).items() if k != "sampling"})
        resolve("sampling", {"protocol": self.sampling})


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
    if name not in DEVICES:
        raise ValueError(f"device={name!r}: allowed {', '.join(DEVICES)}")
    return torch.device(name)


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
                       revision: str, options: ExtractionOptions = ExtractionOptions(),
                       gradient_batches: Path | str | None = None,
                       stats: StatsOptions | None = None,
                       family: str | None = None, replicate: int = 0,
                       extra_attrs: dict[str, Any] | None = None) -> Path:
    """Load one checkpoint, run the eval batch through it and write its store to ``out``.

    ``replicate``: the seed replicate the checkpoint belongs to (config ``seeds``), recorded
    as attr ``seed`` (``token_seed`` is the seed of the sampled token positions).

    ``options`` (:class:`ExtractionOptions`): ``micro_batch`` sequences per
    forward/backward, 0: :func:`default_micro_batch`; ``attention_implementation``:
    :data:`lmdynamics.sources.checkpoints.ATTENTION_IMPLEMENTATIONS`.
    On CPU the process keeps freed memory for reuse (:func:`reuse_freed_memory`).
    ``family``: the configured model family (:mod:`lmdynamics.families`; None: the one its
    ``config.json`` names); the checkpoint must be of it, and it is recorded in the store's
    attrs.

    ``gradient_protocol="paper_code"`` needs ``gradient_batches``: an .npy (2, S, T) of
    the training batches of :func:`lmdynamics.extraction.paper_code.gradient_steps` ``(step)``.
    ``grad_sub_batches`` > 1 (``gradient_protocol="eval_batch"`` only): also the gradient
    singular values of that many disjoint sub-batches of the eval batch, variable
    ``grad_sub_singular_values`` (sub_batch, component, layer, k), from a second
    forward and backward pass after everything else
    (:func:`~lmdynamics.extraction.passes.sub_batch_gradient_singular_values`).
    With ``stats``, the Conjecture statistics (:mod:`lmdynamics.extraction.conjecture`) of the
    same pass are added to the store as ``stat_*`` variables; the size's reference store
    (``stats.reference``) is opened and checked before the model is loaded, so a damaged or
    mismatched one fails before any work. ``extra_attrs`` are added to the store's attrs
    (a local checkpoint's path, sha256, size and mtime: :func:`lmdynamics.sources.local.
    fingerprint`). The pass itself is :func:`extract_model`'s.
    """
    t0 = time.perf_counter()
    device, dtype, micro_batch = options.device, options.dtype, options.micro_batch
    attention_activation, gradient_protocol = (options.attention_activation,
                                               options.gradient_protocol)
    attention_implementation, sampling = options.attention_implementation, options.sampling
    grad_sub_batches = options.grad_sub_batches
    dev = resolve_device(device)
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: allowed {', '.join(DTYPES)}")
    check_choice("extraction.gradient_protocol", gradient_protocol, GRADIENT_PROTOCOLS)
    try:
        fam = (families.get(family) if family is not None
               else config_family(read_model_config(checkpoint)))
    except CorruptCheckpointError as exc:
        raise discard_corrupt_download(checkpoint, exc) from exc
    families.check_attention_activation(fam, attention_activation)
    if gradient_protocol == "paper_code" and gradient_batches is None:
        raise ValueError("extraction.gradient_protocol='paper_code' needs the training "
                         "batches of steps c-5 and c-4 (--gradient-batches); none was given")
    refs = (ReferenceStore(stats.reference, size=size, top_k=stats.top_k)
            if stats is not None else None)
    try:  # before the model is loaded: weights that are not the download's never count
        try:
            weights_sha, tensor_sha256 = weights_digests(checkpoint, fam)
        except CorruptCheckpointError:  # unreadable: say first whether it is the download's
            verified_revision_attrs(checkpoint, weights_sha256(checkpoint), revision)
            raise
        hub_attrs = verified_revision_attrs(checkpoint, weights_sha, revision)
    except (WeightsMismatchError, CorruptCheckpointError) as exc:
        raise discard_corrupt_download(checkpoint, exc) from exc
    try:
        model = load_model(checkpoint, dtype=DTYPES[dtype], device=dev,
                           attention=attention_implementation, family=fam.name)
    except CorruptCheckpointError as exc:
        raise discard_corrupt_download(checkpoint, exc) from exc
    batch_array = load_token_array(eval_batch, ndim=2, what="eval batch (sequences, positions)")
    log.info("loaded %s step %d (%s) on %s in %.1fs", size, step, checkpoint, dev,
             time.perf_counter() - t0)
    return extract_model(
        model, fam, batch_array, out, eval_batch_source=eval_batch, tokens=tokens, seed=seed,
        size=size, step=step, model_name=model_name, revision=revision, dtype=dtype,
        micro_batch=micro_batch, sampling=sampling, attention_activation=attention_activation,
        attention_implementation=attention_implementation,
        gradient_protocol=gradient_protocol, gradient_batches=gradient_batches,
        stats=stats, refs=refs, replicate=replicate, grad_sub_batches=grad_sub_batches,
        checkpoint_attrs={"weights_sha256": weights_sha, "tensor_sha256": tensor_sha256,
                          **hub_attrs,
                          **config_attrs(checkpoint), **(extra_attrs or {})})


def extract_model(model: torch.nn.Module, fam: families.Family, batch_array: np.ndarray,
                  out: Path | str, *, eval_batch_source: Path | str, tokens: int, seed: int,
                  size: str, step: int, model_name: str, revision: str, dtype: str,
                  micro_batch: int | None, sampling: str, attention_activation: str,
                  attention_implementation: str, gradient_protocol: str,
                  gradient_batches: Path | str | None, stats: StatsOptions | None,
                  refs: Any, replicate: int, grad_sub_batches: int,
                  checkpoint_attrs: dict[str, Any]) -> Path:
    """The pass of :func:`extract_checkpoint` on a loaded ``model`` (eval mode, its weights
    the checkpoint's; it is run through, its gradients and ``requires_grad`` flags are
    changed) and the store written to ``out``. ``batch_array``: the eval batch (S, T)
    token ids; ``refs``: the opened reference store when ``stats`` is given (anything with
    its ``check_model``, ``init``, ``final`` and ``directions``); ``checkpoint_attrs``:
    what identifies the weights (``weights_sha256`` and the source's attrs).
    """
    t0 = time.perf_counter()
    dev = next(model.parameters()).device
    batch = torch.tensor(batch_array, dtype=torch.long)  # a copy: the array may be read-only
    check_vocabulary(batch, model.config.vocab_size, eval_batch_source)
    seq_idx, pos_idx = token_positions(sampling, *batch.shape, tokens, seed,
                                       context=model.config.max_position_embeddings)
    if refs is not None:
        refs.check_model(model)
    if stats is None:  # the Conjecture statistics need every parameter's gradient
        only_write_weights_train(model)
    log.info("%s step %d on %s: eval batch %s, %d sampled tokens", size, step, dev,
             tuple(batch.shape), tokens)
    residual = ResidualRecorder(model) if stats is not None else None
    if dev.type == "cpu":
        reuse_freed_memory()
    micro = micro_batch or default_micro_batch(dev, batch.shape[1])
    t_pass = time.perf_counter()
    result = run_pass_fitting(model, batch, seq_idx, pos_idx, micro_batch=micro,
                              attention_activation=attention_activation,
                              gradients=gradient_protocol == "eval_batch",
                              extra_hooks=residual.hooks if residual is not None else None)
    log.info("forward+backward pass in %.2fs (%s attention, micro-batches of %s sequences)",
             time.perf_counter() - t_pass, attention_implementation, micro or batch.shape[0])
    if gradient_protocol == "paper_code":
        grad_batches = torch.as_tensor(
            load_token_array(gradient_batches, ndim=3,
                             what="gradient batches (batches, sequences, positions)"),
            dtype=torch.long)
        result.grad_singular_values = paper_code_gradient_singular_values(
            model, grad_batches, micro_batch=micro_batch)
    cfg = model.config
    attrs = {
        "model": model_name, "revision": revision, "size": size, "step": int(step),
        "seed": int(replicate),
        "dtype": dtype, "lmdynamics_version": __version__,
        "hidden_size": cfg.hidden_size, "num_attention_heads": cfg.num_attention_heads,
        "intermediate_size": fam.dims(cfg.to_dict())["intermediate_size"],
        "num_layers": cfg.num_hidden_layers,
        "n_params": n_parameters(model),
        "eval_batch_shape": list(batch.shape), "token_seed": seed,
        "sampling_protocol": sampling, **checkpoint_attrs,
        "eval_batch_sha256": hashlib.sha256(
            np.ascontiguousarray(batch_array, dtype=np.int64).tobytes()).hexdigest(),
        "attention_activation": attention_activation, "gradient_protocol": gradient_protocol,
        "attention_implementation": attention_implementation, "family": fam.name,
    }
    if gradient_protocol == "paper_code":
        attrs["gradient_steps"] = list(gradient_steps(step))
    ds = extraction_dataset(result, seq_idx, pos_idx, attrs)
    ds = ds.merge(measure_data(model, result.activations))  # lmdynamics.estimators.measures
    warn_nonfinite(ds)
    if stats is not None and residual is not None and refs is not None:
        t_stats = time.perf_counter()
        sampled = dict(zip(SITES, (residual.sampled(), *result.activations), strict=True))
        ds = ds.merge(checkpoint_stats(model, sampled, residual.max_abs, stats, refs))
        log.info("Conjecture statistics in %.2fs", time.perf_counter() - t_stats)
    if grad_sub_batches > 1 and gradient_protocol == "eval_batch":
        t_sub = time.perf_counter()
        only_write_weights_train(model)  # the statistics have read every gradient
        sub = sub_batch_gradient_singular_values(model, batch, grad_sub_batches,
                                                 micro_batch=result.micro_batch)
        ds["grad_sub_singular_values"] = (
            ("sub_batch", "component", "layer", "k"), sub,
            {"description": "singular values of the write matrices' gradients on disjoint "
                            "sub-batches of the eval batch's sequences"})
        ds.attrs["grad_sub_batches"] = int(sub.shape[0])
        log.info("gradients of %d sub-batches in %.2fs", sub.shape[0],
                 time.perf_counter() - t_sub)
    write_store(ds, out, encoding=activation_encoding(result.activations.shape))
    log.info("wrote %s (loss %.4f) in %.1fs", out, result.loss, time.perf_counter() - t0)
    return Path(out)


@dataclass(frozen=True)
class CheckpointStep:
    """One checkpoint of :func:`extract_checkpoints`: its model directory, training step,
    revision name, the path of its store and, for ``gradient_protocol="paper_code"``, its
    gradient batches (the arguments of :func:`extract_checkpoint` that differ per checkpoint).
    """

    checkpoint: Path | str
    step: int
    revision: str
    out: Path | str
    gradient_batches: Path | str | None = None


def extract_checkpoints(checkpoints: Sequence[CheckpointStep], eval_batch: Path | str,
                        **options: Any) -> list[Path]:
    """:func:`extract_checkpoint` of each of ``checkpoints`` in turn, in this process.

    ``options``: the keyword arguments of :func:`extract_checkpoint` that every checkpoint
    shares (``tokens``, ``seed``, ``size``, ``model_name``, ...). Each store is the one
    :func:`extract_checkpoint` writes for that checkpoint alone, written atomically when it is
    finished; the first error stops the loop, the stores finished before it stay complete.
    Returns the stores' paths, in the order given.
    """
    outs = [Path(c.out) for c in checkpoints]
    repeated = sorted({str(o) for o in outs if outs.count(o) > 1})
    if repeated:
        raise ValueError(f"store path(s) {', '.join(repeated)} given for more than one "
                         "checkpoint; give each checkpoint its own --out")
    t0 = time.perf_counter()
    for c in checkpoints:
        extract_checkpoint(c.checkpoint, eval_batch, c.out, step=c.step, revision=c.revision,
                           gradient_batches=c.gradient_batches, **options)
    if len(checkpoints) > 1:
        log.info("%d checkpoints extracted in %.1fs", len(checkpoints),
                 time.perf_counter() - t0)
    return outs


def activation_encoding(shape: tuple[int, ...]) -> dict[str, dict]:
    """Zarr encoding of a per-pair store's ``activations`` (component, layer, token, dim).

    Chosen by measurement (benchmarks/store_encoding.py on real tiny-suite activations;
    figures in docs/benchmarks/2026-11-23.md, "Store encoding"):

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

"""Saving and loading GPT-NeoX checkpoints: the tiny suite's and Pythia's hub revisions.

A checkpoint is a Hugging Face model directory: ``config.json`` plus ``model.safetensors``
(or, for some Pythia revisions, ``pytorch_model.bin``). Loading never runs code from the
checkpoint: ``config.json`` is parsed as plain JSON and refused when it asks for remote code
or names an architecture other than :data:`KNOWN_ARCHITECTURES`; the model is built from the
config with :class:`transformers.GPTNeoXForCausalLM` (never ``trust_remote_code``), and
pickled weights are read only with ``torch.load(weights_only=True)``
(shared/notes/reference-facts.md: "never unpickle untrusted files except with
``torch.load(weights_only=True)``").
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

#: Architectures :func:`load_model` builds (``config.json`` key ``architectures``).
KNOWN_ARCHITECTURES = ("GPTNeoXForCausalLM",)
#: ``config.json`` key ``model_type`` of every known architecture.
KNOWN_MODEL_TYPES = ("gpt_neox",)
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
#: Weight files in order of preference.
WEIGHT_NAMES = (SAFETENSORS_NAME, PICKLE_NAME)
#: Buffers that older GPT-NeoX checkpoints (Pythia's, transformers < 4.3x) persisted but the
#: current model recomputes: the causal mask, its fill value and the rotary frequencies.
IGNORED_KEY_SUFFIXES = (".attention.bias", ".attention.masked_bias", ".rotary_emb.inv_freq")
_BLOCK = 1 << 20  # bytes per read when hashing (1 MiB)


class UntrustedCheckpointError(ValueError):
    """The checkpoint asks for code execution (remote code, or pickled non-tensor objects)."""


class UnknownArchitectureError(ValueError):
    """``config.json`` names an architecture or model type this package does not build."""


class CorruptCheckpointError(ValueError):
    """A weights or config file is truncated or unreadable; the message names the file."""


class CheckpointMismatchError(ValueError):
    """Weights do not fit the model built from ``config.json`` (missing/unexpected/shape)."""


def save_checkpoint(model: torch.nn.Module, directory: Path | str) -> Path:
    """Write ``model`` as a Hugging Face model directory, atomically.

    Writes ``config.json`` and ``model.safetensors`` (float tensors in the model's dtype,
    contiguous, metadata ``format=pt``) into the hidden ``.<directory>.tmp-<pid>`` and renames
    it to ``directory``, replacing a previous one (:func:`lmdynamics.store.atomic_path`, which
    also removes what killed writers left), so a half-written checkpoint never exists under
    the final name. The bytes are a deterministic function of the weights and config.

    Returns the directory.
    """
    from lmdynamics.store import atomic_path

    directory = Path(directory)
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        config = model.config
        config.architectures = [type(model).__name__]
        config.dtype = next(model.parameters()).dtype
        config.to_json_file(tmp / CONFIG_NAME)
        safetensors.torch.save_file(_plain_state_dict(model), tmp / SAFETENSORS_NAME,
                                    metadata={"format": "pt"})
    return directory


def _plain_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors; a tensor sharing storage with an earlier one is cloned
    (safetensors refuses shared storage, e.g. tied embeddings)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def read_model_config(directory: Path | str) -> GPTNeoXConfig:
    """Parse and vet ``<directory>/config.json``; return the GPT-NeoX config it describes.

    Raises
    ------
    FileNotFoundError
        No ``config.json`` in ``directory``.
    CorruptCheckpointError
        ``config.json`` is not a JSON object.
    UntrustedCheckpointError
        The config asks for remote code (an ``auto_map`` key, or ``trust_remote_code`` true).
    UnknownArchitectureError
        ``architectures`` is not a list of :data:`KNOWN_ARCHITECTURES`, or ``model_type`` is
        not ``gpt_neox``.
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME} in checkpoint directory {directory}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CorruptCheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    _refuse_remote_code(data, path)
    known = ", ".join(KNOWN_ARCHITECTURES)
    archs = data.get("architectures")
    if not isinstance(archs, list) or not archs or any(a not in KNOWN_ARCHITECTURES
                                                        for a in archs):
        raise UnknownArchitectureError(f"{path}: key 'architectures' is {archs!r}; "
                                       f"known architectures: {known}")
    if data.get("model_type") not in KNOWN_MODEL_TYPES:
        raise UnknownArchitectureError(
            f"{path}: key 'model_type' is {data.get('model_type')!r}; known model types: "
            f"{', '.join(KNOWN_MODEL_TYPES)} (architectures {known})")
    try:
        return GPTNeoXConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not a valid GPT-NeoX config ({exc})") from exc


def _refuse_remote_code(data: dict[str, Any], path: Path) -> None:
    if "auto_map" in data:
        raise UntrustedCheckpointError(
            f"{path}: key 'auto_map' asks for remote code ({data['auto_map']!r}); refused, "
            "only built-in architectures are loaded")
    if data.get("trust_remote_code"):
        raise UntrustedCheckpointError(
            f"{path}: key 'trust_remote_code' is {data['trust_remote_code']!r}; refused, "
            "only built-in architectures are loaded")


def weights_path(directory: Path | str) -> Path:
    """The weights file of a checkpoint: ``model.safetensors``, else ``pytorch_model.bin``."""
    directory = Path(directory)
    for name in WEIGHT_NAMES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory}: no weights file; expected one of "
                            f"{', '.join(WEIGHT_NAMES)}")


def read_state_dict(path: Path | str) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a pickle read with ``weights_only=True``).

    Raises :class:`CorruptCheckpointError` (truncated/unreadable file, or not a mapping of
    names to tensors) or :class:`UntrustedCheckpointError` (a pickle holding objects other
    than tensors and plain containers); both messages name the file.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            return safetensors.torch.load_file(path, device="cpu")
        except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            raise CorruptCheckpointError(f"{path}: unreadable safetensors file ({exc})") from exc
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():
            raise UntrustedCheckpointError(
                f"{path}: refused, the pickle holds objects other than tensors "
                f"(torch.load weights_only=True: {str(exc).splitlines()[0]})") from exc
        raise CorruptCheckpointError(f"{path}: unreadable pickle ({exc})") from exc
    except (EOFError, RuntimeError, OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path}: unreadable weights file ({exc})") from exc
    if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CorruptCheckpointError(f"{path}: expected a mapping of names to tensors, "
                                     f"got {type(obj).__name__}")
    return obj


#: Attention implementations :func:`load_model` accepts (transformers' names).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


def load_model(directory: Path | str, *, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu",
               attention: str = "sdpa") -> GPTNeoXForCausalLM:
    """Build the GPT-NeoX model of ``directory`` and load its weights strictly.

    ``attention``: the attention implementation, one of :data:`ATTENTION_IMPLEMENTATIONS`.
    ``sdpa`` (default) is torch's fused ``scaled_dot_product_attention``, causal, with no
    T x T score matrix (flash attention on CPU and GPU); ``eager`` is transformers' plain
    matmul/softmax path. Both give the same outputs up to float rounding (2e-4 relative in
    float32), and sdpa repeats bit for bit on CPU (tests/test_lm_loss.py); sdpa took the
    CPU benchmark pass from 119 s to 69 s (RESULTS.md). Weights load in float32
    and are then cast to ``dtype`` and moved to ``device``; the rotary frequencies stay float32.
    Buffers older checkpoints persisted (:data:`IGNORED_KEY_SUFFIXES`) are skipped; any other
    missing or unexpected key, or a shape that does not fit the config, raises
    :class:`CheckpointMismatchError` naming the file.

    Returns the model in eval mode (Pythia has no dropout; eval mode makes that explicit).
    """
    directory = Path(directory)
    config = read_model_config(directory)
    path = weights_path(directory)
    state = read_state_dict(path)
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"extraction.attention_implementation={attention!r}: allowed "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    config._attn_implementation = attention
    with _skip_init():  # every persistent tensor is overwritten below (checked strictly)
        model = GPTNeoXForCausalLM(config)
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_KEY_SUFFIXES)}
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointMismatchError(f"{path}: weights do not fit {CONFIG_NAME}; missing keys "
                                      f"{_short(missing)}; unexpected keys {_short(unexpected)}")
    try:
        model.load_state_dict(state, strict=not config.tie_word_embeddings)
    except RuntimeError as exc:
        raise CheckpointMismatchError(f"{path}: weights do not fit {CONFIG_NAME} ({exc})") from exc
    return _cast(model, dtype=dtype, device=device).eval()


def _cast(model: torch.nn.Module, *, dtype: torch.dtype,
          device: str | torch.device) -> torch.nn.Module:
    """Move to ``device`` and cast weights to ``dtype``; non-persistent buffers (rotary
    frequencies) keep their float32 precision, as ``from_pretrained(dtype=...)`` does."""
    persistent = set(model.state_dict())
    keep = {name: buf for name, buf in model.named_buffers() if name not in persistent}
    model.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, buf.to(device))
    return model


def _skip_init() -> contextlib.AbstractContextManager[None]:
    """Skip random initialisation while building a model whose weights are loaded next
    (seconds per checkpoint for Pythia 1.4b+ on CPU); a no-op if transformers lacks it."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - other transformers versions
        return contextlib.nullcontext()
    return no_init_weights()


def _short(keys: list[str], limit: int = 8) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def n_parameters(model: torch.nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in model.parameters())


def weights_sha256(directory: Path | str) -> str:
    """Hex sha256 of the checkpoint's weights file (:func:`weights_path`), read in 1 MiB blocks.

    For hub revisions this equals the LFS object id, which identifies byte-identical revisions
    (Pythia issues #195, #205, #206 in shared/notes/reference-facts.md).
    """
    digest = hashlib.sha256()
    with weights_path(directory).open("rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()

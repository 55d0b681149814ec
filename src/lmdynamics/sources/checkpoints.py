"""Saving and loading checkpoints of the known model families: the tiny suite's and the hub's.

A checkpoint is a Hugging Face model directory: ``config.json`` plus ``model.safetensors``
(or, for some Pythia revisions, ``pytorch_model.bin``). Loading never runs code from the
checkpoint: ``config.json`` is parsed as plain JSON and refused when it asks for remote code
or names a model type or architecture no :mod:`lmdynamics.families` family loads
(:data:`KNOWN_ARCHITECTURES`); the model is built from the config with the family's
transformers class (``GPTNeoXForCausalLM``, ``LlamaForCausalLM``, ``GPT2LMHeadModel``; never
``trust_remote_code``), and pickled weights are read only with ``torch.load(weights_only=True)``
(shared/notes/reference-facts.md: "never unpickle untrusted files except with
``torch.load(weights_only=True)``").

Key names. Every Pythia revision on the hub was written by transformers 4.x: the unembedding
is ``embed_out.weight`` (transformers 5 calls it ``lm_head``), and older revisions also
persist per-layer buffers (``attention.bias``, ``attention.masked_bias``,
``attention.rotary_emb.inv_freq``) that today's model recomputes
(shared/notes/reference-facts.md, "Key names as written by transformers 4.x"). Both namings
load: :func:`load_model` hands the tensors it read to ``from_pretrained(None, config=...,
state_dict=...)``, so transformers applies its own conversion mapping
(``transformers.conversion_mapping``: ``embed_out.`` -> ``lm_head.``) and its own lists of
keys to ignore (GPT-2's ``attn.bias`` masks, and the ``transformer.`` prefix its released
files lack); whatever is still missing, unexpected or of the wrong shape after that is a
:class:`CheckpointMismatchError` naming the file and the keys. No name table is kept here.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from transformers import PretrainedConfig, PreTrainedModel

from lmdynamics import families
from lmdynamics.families import Family, UnknownFamilyError

log = logging.getLogger(__name__)

#: Architectures :func:`load_model` builds (``config.json`` key ``architectures``).
KNOWN_ARCHITECTURES = tuple(a for f in families.registry().values() for a in f.architectures)
#: ``config.json`` key ``model_type`` of every known architecture.
KNOWN_MODEL_TYPES = tuple(t for f in families.registry().values() for t in f.model_types)
CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
PICKLE_NAME = "pytorch_model.bin"
#: Weight files in order of preference.
WEIGHT_NAMES = (SAFETENSORS_NAME, PICKLE_NAME)
#: Upper bounds on ``config.json``'s integer sizes, checked before anything is allocated
#: (Pythia 12b, the largest GPT-NeoX on the hub: hidden 5120, 36 layers, vocabulary 50688).
CONFIG_LIMITS = {"hidden_size": 1 << 16, "num_hidden_layers": 1 << 10,
                 "num_attention_heads": 1 << 12, "intermediate_size": 1 << 18,
                 "vocab_size": 1 << 22, "max_position_embeddings": 1 << 20}
#: A config implying more parameters than this multiple of the values in the weights file is
#: refused before anything is allocated (:func:`load_model`).
MAX_IMPLIED_RATIO = 2


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


def config_family(config: PretrainedConfig) -> Family:
    """The family of a transformers config object (by its ``model_type``)."""
    try:
        return families.for_model_type(config.model_type)
    except UnknownFamilyError as exc:
        raise UnknownArchitectureError(str(exc)) from None


def read_model_config(directory: Path | str, family: str | None = None) -> PretrainedConfig:
    """Parse and vet ``<directory>/config.json``; return the config it describes.

    ``family``: the configured model family (``family`` config key); the checkpoint's must
    be it. None accepts any known family.

    Raises
    ------
    FileNotFoundError
        No ``config.json`` in ``directory``.
    CorruptCheckpointError
        ``config.json`` is not a JSON object.
    UntrustedCheckpointError
        The config asks for remote code (an ``auto_map`` key, or ``trust_remote_code`` true).
    UnknownArchitectureError
        ``model_type`` is no family's, ``architectures`` not a list of that family's
        architectures, or the family is not ``family``.
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
    try:
        fam = families.for_config(data, where=str(path))
    except UnknownFamilyError as exc:
        raise UnknownArchitectureError(str(exc)) from None
    if family is not None and fam.name != family:
        raise UnknownArchitectureError(
            f"{path}: a {fam.name} checkpoint (model_type {data.get('model_type')!r}), but "
            f"config key 'family' is {family!r}; set family: {fam.name} or use this family's "
            "checkpoints")
    _check_config_values(data, path, fam)
    try:
        return fam.config_from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{path}: not a valid {fam.config_class} ({exc})") from exc


def _check_config_values(data: dict[str, Any], path: Path, family: Family) -> None:
    """Refuse sizes that are not positive integers within :data:`CONFIG_LIMITS`, heads that
    do not divide the hidden size, and an activation transformers does not know, before any
    tensor is allocated (a hostile ``vocab_size: 1e12`` would otherwise ask for terabytes)."""
    from transformers.activations import ACT2FN

    dims = family.dims(data)
    spelled = {key: family.config_keys.get(key, key) for key in dims}
    for key, limit in CONFIG_LIMITS.items():
        value = dims.get(key)
        if value is None and key == "intermediate_size":
            continue  # transformers' default (4 x hidden)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise CorruptCheckpointError(
                f"{path}: key {spelled[key]!r} is {data.get(spelled[key])!r}; expected an "
                f"integer from 1 to {limit}")
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise CorruptCheckpointError(
            f"{path}: key {spelled['hidden_size']!r} ({dims['hidden_size']}) is not a multiple "
            f"of {spelled['num_attention_heads']!r} ({dims['num_attention_heads']})")
    act = data.get(family.activation_key, family.default_activation)
    if act not in ACT2FN:
        raise CorruptCheckpointError(f"{path}: key {family.activation_key!r} is {act!r}; "
                                     f"transformers knows {', '.join(sorted(ACT2FN))}")


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
               attention: str = "sdpa", family: str | None = None) -> PreTrainedModel:
    """Build the model of ``directory`` (its family's class) and load its weights strictly.

    ``family``: the configured family; a checkpoint of another is refused
    (:func:`read_model_config`).

    ``attention``: the attention implementation, one of :data:`ATTENTION_IMPLEMENTATIONS`.
    ``sdpa`` (default) is torch's fused ``scaled_dot_product_attention``, causal, with no
    T x T score matrix (flash attention on CPU and GPU); ``eager`` is transformers' plain
    matmul/softmax path. Both give the same outputs up to float rounding (2e-4 relative in
    float32), and sdpa repeats bit for bit on CPU (tests/extraction/test_lm_loss.py); sdpa is
    the faster of the two on CPU (docs/benchmarks/2026-11-29.md).

    The tensors are read here (:func:`read_state_dict`: safetensors, or a pickle with
    ``weights_only=True``); the family's legacy buffers are dropped by name
    (:func:`drop_legacy_buffers`); the rest must all be floating point, except the boolean
    and integer buffers transformers itself ignores on load; before the model is allocated, the
    parameters ``config.json`` implies (counted on the meta device) must not exceed twice
    the values the file holds. The tensors are then loaded through
    ``from_pretrained(None, config=..., state_dict=...)`` in float32, so both key namings
    load (module docstring), and cast to ``dtype`` and moved to ``device``; the rotary
    frequencies stay float32. A key still missing or unexpected after transformers' renaming
    and ignore lists, or a shape that does not fit the config, raises
    :class:`CheckpointMismatchError` naming the file and the keys.

    Returns the model in eval mode (Pythia has no dropout; eval mode makes that explicit).
    A tied GPT-2 unembedding missing from the file is filled by transformers from ``wte``.
    """
    directory = Path(directory)
    if attention not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"extraction.attention_implementation={attention!r}: allowed "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    config = read_model_config(directory, family)
    path = weights_path(directory)
    state = read_state_dict(path)
    with torch.device("meta"):  # allocates nothing: names and counts only
        meta = config_family(config).model_cls(config.model_type)(config)
    state = drop_legacy_buffers(state, config_family(config), set(meta.state_dict()), path)
    _refuse_non_float(state, path)
    _check_weights_fit(meta, state, path)
    model = _load_state(config, state, path, attention)
    return _cast(model, dtype=dtype, device=device).eval()


def drop_legacy_buffers(state: dict[str, torch.Tensor], family: Family, model_keys: set[str],
                        path: Path) -> dict[str, torch.Tensor]:
    """``state`` without the keys that are ``family``'s :attr:`~Family.legacy_buffers`
    (persistent non-parameter buffers older transformers wrote, e.g. GPT-2's
    ``attn.masked_bias``) and that the model built from the config does not have
    (``model_keys``, its ``state_dict`` names); each dropped name is logged. Nothing else
    is dropped: an unknown key still fails the strict load."""
    dropped = sorted(k for k in state if family.is_legacy_buffer(k) and k not in model_keys)
    if dropped:
        log.info("%s: dropped %d persistent buffers of older transformers that are not "
                 "parameters (%s)", path, len(dropped), _short(dropped, 4))
    return {k: v for k, v in state.items() if k not in set(dropped)}


def _check_weights_fit(meta: torch.nn.Module, state: dict[str, torch.Tensor],
                       path: Path) -> None:
    """Refuse a config that implies more than :data:`MAX_IMPLIED_RATIO` times the values the
    file holds, before the model is allocated (``meta``: the model built on the meta device,
    which allocates nothing), so a hostile size costs at most that multiple of the file's
    memory; smaller differences are named key by key by the strict check that follows."""
    implied = n_parameters(meta)
    held = sum(t.numel() for t in state.values() if t.is_floating_point())
    if implied > MAX_IMPLIED_RATIO * held:
        raise CheckpointMismatchError(
            f"{path}: {CONFIG_NAME} implies {implied:,} parameters, the weights file holds "
            f"{held:,} values; the config and the weights are of different models")


def _refuse_non_float(state: dict[str, torch.Tensor], path: Path) -> None:
    """Weights must be floating point; only buffers that a known family's transformers class
    lists in ``_keys_to_ignore_on_load_unexpected`` (old causal masks) may be boolean or
    integer."""
    ignored = [re.compile(p) for f in families.registry().values()
               for p in f.model_cls()._keys_to_ignore_on_load_unexpected or ()]
    bad = sorted(f"{k} ({v.dtype})" for k, v in state.items()
                 if not v.is_floating_point() and not any(p.search(k) for p in ignored))
    if bad:
        raise CheckpointMismatchError(f"{path}: weights must be floating point; "
                                      f"{_short(bad)} are not")


def _load_state(config: PretrainedConfig, state: dict[str, torch.Tensor], path: Path,
                attention: str) -> PreTrainedModel:
    """``from_pretrained`` on tensors already read and vetted, float32, strictly checked."""
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:  # mismatched shapes come back in the loading info and are refused below
        model, info = config_family(config).model_cls(config.model_type).from_pretrained(
            None, config=config, state_dict=state, dtype=torch.float32,
            attn_implementation=attention, output_loading_info=True,
            ignore_mismatched_sizes=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
    mismatched = sorted(f"{k} (file {tuple(a)}, model {tuple(b)})"
                        for k, a, b in info["mismatched_keys"])
    if missing or unexpected or mismatched or info["error_msgs"]:
        raise CheckpointMismatchError(
            f"{path}: weights do not fit {CONFIG_NAME}; missing keys {_short(missing)}; "
            f"unexpected keys {_short(unexpected)}; shapes differ {_short(mismatched)} (names "
            "after transformers' renaming of legacy keys)"
            + (f"; {info['error_msgs'][0]}" if info["error_msgs"] else ""))
    return model


def key_renaming(config: PretrainedConfig) -> Callable[[str], str]:
    """The renaming ``from_pretrained`` applies to a checkpoint key of this architecture
    (transformers' own conversion mapping: ``embed_out.weight`` -> ``lm_head.weight``), for
    readers that take tensors one at a time from a file instead of loading a model."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import WeightRenaming

    rules = []
    for name in (*(config.architectures or ()), config.model_type):
        for transform in get_checkpoint_conversion_mapping(name) or ():
            if not isinstance(transform, WeightRenaming):
                raise NotImplementedError(f"{name}: transformers converts (not only renames) "
                                          f"checkpoint tensors ({transform!r})")
            for source, target in zip(transform.source_patterns, transform.target_patterns,
                                      strict=True):
                rules.append((re.compile(source), target))
        if rules:
            break

    def rename(key: str) -> str:
        for pattern, target in rules:
            key = pattern.sub(target, key)
        return key
    return rename


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
    from lmdynamics.store import file_sha256

    return file_sha256(weights_path(directory))


class ReferenceWeights:
    """Tensors of another checkpoint, read one at a time (safetensors) or all at once (what
    :func:`lmdynamics.extraction.reference.build_reference` reads the two reference
    checkpoints with)."""

    def __init__(self, directory: Path | str):
        self.path = weights_path(directory)
        self._state: dict[str, torch.Tensor] | None = None
        if self.path.suffix != ".safetensors":
            self._state = read_state_dict(self.path)
            keys = list(self._state)
        else:
            with safetensors.safe_open(self.path, framework="pt", device="cpu") as fh:
                keys = list(fh.keys())
        config = read_model_config(directory)
        rename = key_renaming(config)
        #: today's state-dict name -> the name in the file (Pythia's files: ``embed_out``)
        self._names = {rename(key): key for key in keys}
        #: the trunk's prefix, absent from files saved from the trunk (GPT-2's released files)
        self._base = f"{config_family(config).base}."

    def raw(self, name: str) -> torch.Tensor:
        """The tensor ``name`` (today's state-dict name, e.g. ``lm_head.weight``, whatever
        the file calls it) in the file's dtype, on CPU."""
        if name not in self._names and name.removeprefix(self._base) in self._names:
            name = name.removeprefix(self._base)
        if name not in self._names:
            raise CheckpointMismatchError(f"{self.path}: no tensor {name!r}; the reference "
                                          "checkpoint must have the same architecture")
        if self._state is not None:
            return self._state[self._names[name]]
        with safetensors.safe_open(self.path, framework="pt", device="cpu") as fh:
            return fh.get_tensor(self._names[name])

    def __getitem__(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as float32 on CPU."""
        return self.raw(name).float()


#: safetensors' dtype codes of floating-point tensors (the only ones a tensor digest covers);
#: torch's dtypes of a pickle are written in the same codes, so both layouts digest alike.
FLOAT_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
               torch.bfloat16: "BF16"}
#: The safetensors format's largest header (its specification: 100 MB).
MAX_HEADER = 100_000_000
#: Bytes read at a time while digesting.
DIGEST_BLOCK = 1 << 24


def _tensor_digest(code: str, shape: list[int]) -> Any:
    """A sha256 already fed with a tensor's dtype code and shape (so equal bytes of another
    dtype or shape never share a digest)."""
    import hashlib

    return hashlib.sha256(f"{code}|{','.join(map(str, shape))}|".encode())


def weights_digests(directory: Path | str, family: Family) -> tuple[str, dict[str, str]]:
    """(sha256 of the weights file, {tensor name: sha256 of its dtype, shape and bytes}).

    The tensor digests cover every floating-point tensor of the file under the name the file
    gives it, except ``family``'s :attr:`~Family.legacy_buffers`; they are what the content
    audit compares across the steps of a run (:mod:`lmdynamics.reduction.audit`: which tensors
    of which step equal another step's, Pythia issue #206). A safetensors file is read once,
    in order, its header's byte ranges hashed as they pass (memory: one block); a pickle is
    read with :func:`read_state_dict`.
    """
    import hashlib

    path = weights_path(directory)
    if path.suffix != ".safetensors":
        from lmdynamics.store import file_sha256

        tensors = {}
        for name, t in read_state_dict(path).items():
            if t.dtype in FLOAT_CODES and not family.is_legacy_buffer(name):
                digest = _tensor_digest(FLOAT_CODES[t.dtype], list(t.shape))
                digest.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
                tensors[name] = digest.hexdigest()
        return file_sha256(path), tensors
    whole = hashlib.sha256()
    with open(path, "rb") as fh:
        head = fh.read(8)
        whole.update(head)
        try:
            length = int.from_bytes(head, "little")
            if len(head) != 8 or length > min(MAX_HEADER, path.stat().st_size - 8):
                raise ValueError(f"header length {length} beyond the file or the format's "
                                 f"{MAX_HEADER}-byte limit")
            header_bytes = fh.read(length)
            header = json.loads(header_bytes)
            if not isinstance(header, dict) or len(head) != 8 or len(header_bytes) != length:
                raise ValueError("truncated header")
            spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]), k,
                            v["dtype"], list(v["shape"]))
                           for k, v in header.items() if k != "__metadata__")
        except (ValueError, KeyError, TypeError, IndexError) as exc:
            raise CorruptCheckpointError(f"{path}: unreadable safetensors header ({exc})") \
                from exc
        whole.update(header_bytes)
        position, tensors = 0, {}
        for begin, end, name, code, shape in spans:
            if begin < position or end < begin:
                raise CorruptCheckpointError(f"{path}: tensor {name!r} overlaps another")
            whole.update(fh.read(begin - position))  # padding, if any
            keep = code in FLOAT_CODES.values() and not family.is_legacy_buffer(name)
            digest = _tensor_digest(code, shape) if keep else None
            remaining = end - begin
            while remaining:
                block = fh.read(min(DIGEST_BLOCK, remaining))
                if not block:
                    raise CorruptCheckpointError(f"{path}: truncated in tensor {name!r}")
                whole.update(block)
                if digest is not None:
                    digest.update(block)
                remaining -= len(block)
            if digest is not None:
                tensors[name] = digest.hexdigest()
            position = end
        while block := fh.read(DIGEST_BLOCK):
            whole.update(block)
    return whole.hexdigest(), tensors

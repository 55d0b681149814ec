"""The eval batch of a suite from a local file: token ids (``.npy``, or raw ``.bin`` of a
declared dtype) or text tokenized with the suite's own tokenizer.

Pythia's suites read their last training batch from the preshuffled Pile
(:mod:`lmdynamics.sources.pile`); every other suite names a file in the config's
``eval_data`` section. The batch is ``sequences`` rows of ``seq_len`` token ids, the same
for every step, size and seed of the suite (written once to ``results/<suite>/eval_batch.npy``;
each store records its sha256 as ``eval_batch_sha256``).

Which file format: by extension, ``.npy`` (an integer array, 1-D or ``(n, seq_len)``, never
a pickle), ``.bin`` (little-endian tokens of ``dtype``, one of :data:`BIN_DTYPES`), anything
else is UTF-8 text. Text is tokenized by ``transformers.AutoTokenizer`` from a local folder
or the hub cache only (``local_files_only``) unless downloads are allowed; remote code is
never run (``trust_remote_code=False``). Tokens are taken in file order, no special tokens
added, and cut into consecutive sequences; what is left over is not used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Token dtypes a raw ``.bin`` file may declare (``eval_data.dtype``).
BIN_DTYPES: tuple[str, ...] = ("uint16", "uint32", "int32", "int64")


class EvalDataError(ValueError):
    """The eval data file cannot give the batch; one line: file, what is wrong, what to do."""


def file_format(path: Path | str) -> str:
    """``npy``, ``bin`` or ``text``, from the file name's extension."""
    suffix = Path(path).suffix.lower()
    return {".npy": "npy", ".bin": "bin"}.get(suffix, "text")


def _cut(tokens: np.ndarray, path: Path, sequences: int, seq_len: int) -> np.ndarray:
    need = sequences * seq_len
    if tokens.size < need:
        raise EvalDataError(f"eval_data.path {path}: {tokens.size} tokens, fewer than the "
                            f"{need} needed ({sequences} sequences x seq_len {seq_len}); give a "
                            "longer file or lower hub.sequences / eval_data.seq_len")
    return np.ascontiguousarray(tokens.reshape(-1)[:need], dtype=np.int64).reshape(
        sequences, seq_len)


def read_npy(path: Path | str, sequences: int, seq_len: int) -> np.ndarray:
    """Token ids of a ``.npy`` file: 1-D (cut into sequences) or ``(n, seq_len)``."""
    from lmdynamics.store import npy_problem, open_npy

    path = Path(path)
    problem = npy_problem(path)
    if problem is not None:  # checked from the header, before anything is allocated
        raise EvalDataError(f"eval_data.path {path}: not a readable .npy array ({problem}); "
                            "give a NumPy .npy file of integer token ids (numpy.save)")
    array = open_npy(path)
    if array.dtype.kind not in "iu":
        raise EvalDataError(f"eval_data.path {path}: holds {array.dtype} values; token ids "
                            "must be integers (save them with an integer dtype)")
    if array.ndim == 2 and array.shape[1] != seq_len:
        raise EvalDataError(f"eval_data.path {path}: sequences of {array.shape[1]} tokens, "
                            f"eval_data.seq_len is {seq_len}; set seq_len to {array.shape[1]} "
                            "or give a 1-D array")
    if array.ndim not in (1, 2):
        raise EvalDataError(f"eval_data.path {path}: a {array.ndim}-D array; give a 1-D "
                            "array of tokens or a 2-D (sequences, seq_len) one")
    return _cut(array, path, sequences, seq_len)


#: Fewest tokens a wide-dtype check looks at (fewer say nothing about the pattern).
_WIDTH_SAMPLE = 64


def check_token_width(tokens: np.ndarray, dtype: str, path: Path | str) -> None:
    """Refuse tokens that are evidently a wider dtype read as ``dtype``: little-endian ids
    of ``uint32`` read as ``uint16`` (or ``int64`` as ``int32``) put the high halves, all 0,
    at every odd position (``[0 0 1 0 2 0 ...]``), which no real token stream does."""
    sample = np.asarray(tokens[: 1 << 16]).reshape(-1)
    if sample.size < _WIDTH_SAMPLE or np.dtype(dtype).itemsize > 4:
        return
    if not sample[1::2].any() and sample[0::2].any():
        wider = {"uint16": "uint32", "int32": "int64", "uint32": "int64"}.get(dtype, "a wider "
                                                                                "dtype")
        raise EvalDataError(f"eval_data.path {path}: every second token of the file read as "
                            f"{dtype} is 0, as {wider} ids read as {dtype} give; set "
                            f"eval_data.dtype to the dtype the file was written with "
                            f"({wider}?)")


def read_bin(path: Path | str, dtype: str, sequences: int, seq_len: int) -> np.ndarray:
    """Little-endian token ids of a raw ``.bin`` file of ``dtype``."""
    path = Path(path)
    if dtype not in BIN_DTYPES:
        raise EvalDataError(f"eval_data.dtype {dtype!r}: a .bin file needs its token dtype; "
                            f"allowed: {', '.join(BIN_DTYPES)}")
    width = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size % width:
        raise EvalDataError(f"eval_data.path {path}: {size} bytes is not a whole number of "
                            f"{dtype} tokens ({width} bytes each); wrong eval_data.dtype or a "
                            "truncated file")
    count = min(size // width, sequences * seq_len)
    tokens = np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"), count=count)
    check_token_width(tokens, dtype, path)
    return _cut(tokens, path, sequences, seq_len)


def tokenize_text(path: Path | str, tokenizer: str, sequences: int, seq_len: int, *,
                  allow_download: bool = False) -> np.ndarray:
    """Token ids of a UTF-8 text file through ``AutoTokenizer.from_pretrained(tokenizer)``
    (a local folder, or a hub id already in the cache unless ``allow_download``)."""
    from transformers import AutoTokenizer

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalDataError(f"eval_data.path {path}: not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); give a .npy or .bin token file, or UTF-8 "
                            "text") from None
    try:
        tok = AutoTokenizer.from_pretrained(tokenizer, local_files_only=not allow_download,
                                            trust_remote_code=False)
    except (OSError, ValueError) as exc:
        how = ("" if allow_download else "; it is read from a local folder or the hub cache "
               "only: download it once (huggingface-cli download) or set "
               "eval_data.allow_download: true")
        raise EvalDataError(f"eval_data.tokenizer {tokenizer!r}: cannot be loaded "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}){how}"
                            ) from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return _cut(np.asarray(ids, dtype=np.int64), path, sequences, seq_len)


def check_vocab(batch: np.ndarray, vocab: int | None, path: Path | str) -> None:
    """Every id in ``[0, vocab)``: an id out of range is another tokenizer's (or not tokens)."""
    low, high = int(batch.min()), int(batch.max())
    if low < 0:
        raise EvalDataError(f"eval_data.path {path}: token id {low} is negative; token ids "
                            "are >= 0 (wrong dtype?)")
    if vocab is not None and high >= vocab:
        raise EvalDataError(f"eval_data.path {path}: token id {high} >= the suite's "
                            f"vocabulary size {vocab}; the tokens are not this suite's (use its "
                            "tokenizer, or the right dtype)")


def check_npy_dtype(path: Path | str, dtype: str) -> None:
    """An ``eval_data.dtype`` set for a ``.npy`` file must be the dtype its header states."""
    from lmdynamics.store import open_npy

    held = open_npy(path).dtype
    if held != np.dtype(dtype):
        raise EvalDataError(f"eval_data.path {path}: the .npy holds {held} token ids, "
                            f"eval_data.dtype says {dtype}; unset eval_data.dtype (a .npy "
                            f"states its own) or set it to {held}")


def eval_batch(path: Path | str, *, sequences: int, seq_len: int, vocab: int | None = None,
               dtype: str | None = None, tokenizer: str | None = None,
               allow_download: bool = False) -> np.ndarray:
    """The eval batch ``(sequences, seq_len)`` int64 from ``path`` (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        what = "not a regular file" if path.exists() else "no such file"
        raise EvalDataError(f"eval_data.path {path}: {what}; give a local .npy, .bin or "
                            "text file")
    kind = file_format(path)
    if kind == "npy":
        batch = read_npy(path, sequences, seq_len)
        if dtype is not None:
            check_npy_dtype(path, dtype)
    elif kind == "bin":
        if dtype is None:
            raise EvalDataError(f"eval_data.path {path}: a .bin file needs eval_data.dtype; "
                                f"allowed: {', '.join(BIN_DTYPES)}")
        batch = read_bin(path, dtype, sequences, seq_len)
    else:
        if tokenizer is None:
            raise EvalDataError(f"eval_data.path {path}: text needs a tokenizer "
                                "(eval_data.tokenizer: a local folder or hub id)")
        batch = tokenize_text(path, tokenizer, sequences, seq_len,
                              allow_download=allow_download)
    check_vocab(batch, vocab, path)
    return batch

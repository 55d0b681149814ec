"""Helpers for the fault tests: small real checkpoints and stores, and store surgery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import GPTNeoXForCausalLM

from lmdynamics.extraction.extract import extract_checkpoint
from lmdynamics.sources import checkpoints as ck
from lmdynamics.sources.tiny import model_config
from lmdynamics.store import write_array_atomic

SPEC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
SEQ_LEN = 32
STEPS = (0, 4, 8)
FINAL = 8
TOKENS = 64


def tiny_checkpoint(directory: Path, seed: int, *, diverge: str | None = None) -> Path:
    """Save a randomly initialised tiny GPT-NeoX; ``diverge`` names a parameter set to inf."""
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(model_config(SPEC, seq_len=SEQ_LEN))
    if diverge:
        with torch.no_grad():
            model.get_parameter(diverge).fill_(float("inf"))
    return ck.save_checkpoint(model, directory)


def eval_batch(path: Path) -> Path:
    batch = np.random.default_rng(0).integers(0, 256, (4, SEQ_LEN), dtype=np.int64)
    return write_array_atomic(batch, path)


def extract(root: Path, step: int, *, seed: int = 0, diverge: str | None = None,
            out: Path | None = None) -> Path:
    """Checkpoint ``root/ck/step<step>`` (initialised with seed ``step``) -> its store."""
    batch = root / "batch.npy"
    if not batch.exists():
        eval_batch(batch)
    checkpoint = tiny_checkpoint(root / "ck" / f"step{step}", step, diverge=diverge)
    out = out or root / "extract" / f"step{step}.zarr"
    return extract_checkpoint(checkpoint, batch, out, tokens=TOKENS, seed=seed, size="s",
                              step=step, model_name="tiny-s", revision=f"step{step}")


def edit_attrs(store: Path, drop: tuple[str, ...] = (), **changes) -> None:
    """Edit the group attributes in ``store/zarr.json`` in place."""
    meta_path = store / "zarr.json"
    meta = json.loads(meta_path.read_text())
    for key in drop:
        meta["attributes"].pop(key, None)
    meta["attributes"].update(changes)
    meta_path.write_text(json.dumps(meta))


def chunk_files(store: Path, array: str) -> list[Path]:
    chunks = store / array / "c"
    if chunks.is_file():  # a 0-d array's one chunk
        return [chunks]
    return sorted(p for p in chunks.rglob("*") if p.is_file())


def copy_stores(src: Path, dest: Path) -> list[Path]:
    shutil.copytree(src, dest)
    return [dest / f"step{s}.zarr" for s in STEPS]


# --------------------------------------------------------------------------- broken stores
# Each case breaks one per-pair store in place; the reduction must refuse it with a message
# naming the store, the fault (fragment) and how to redo it.


def _rewrite(store: Path, change) -> None:
    from lmdynamics.store import open_store, write_store

    ds = open_store(store).load()
    write_store(change(ds), store)


def _rm(store: Path, name: str) -> None:
    shutil.rmtree(store / name)


def _not_a_store(store: Path) -> None:
    shutil.rmtree(store)
    store.mkdir()


def _assign_attrs(**changes):
    """A store rewritten with other attrs: a store from another run, digests and all."""
    return lambda s: _rewrite(s, lambda ds: ds.assign_attrs(**changes))


BROKEN_STORES = {
    # case: (break(store), fragment of the message)
    "no_completion_mark": (lambda s: edit_attrs(s, drop=("complete",)),
                           "is incomplete (no 'complete' mark"),
    "missing_array": (lambda s: _rm(s, "activations"), "lacks activations"),
    "missing_coordinate": (lambda s: _rm(s, "position"), "lacks position"),
    "missing_chunk": (lambda s: chunk_files(s, "activations")[1].unlink(),
                      "array 'activations' has 3 of its 4 chunk files"),
    "not_a_store": (_not_a_store, "is not a zarr store"),
    "corrupt_metadata": (lambda s: (s / "zarr.json").write_text("{"), "cannot be read"),
    "wrong_shape": (lambda s: _rewrite(s, lambda ds: ds.isel(token=slice(0, 16))),
                    "activations shape is (2, 2, 16, "),
    "shape_vs_attrs": (_assign_attrs(num_layers=3), "from the store's attrs"),
    "token_positions": (
        lambda s: _rewrite(s, lambda ds: ds.assign_coords(position=(ds.position + 1) % 32)),
        "sampled token positions differ from those in"),
    "token_seed": (_assign_attrs(token_seed=1), "attr token_seed is 1, but 0 in "),
    "eval_batch": (_assign_attrs(eval_batch_sha256="0" * 64),
                   "attr eval_batch_sha256 is '0000"),
    "step_mismatch": (_assign_attrs(step=2), "attr step=2 but the path names step"),
}


# --------------------------------------------------------------------------- hostile stores
# Damage that a store's checksums, digests and required attrs must catch (issue 16): each
# case breaks one per-pair store in place; every reader refuses it with one line naming the
# store, the array or attribute, and the redo command.


def _flip_byte(store: Path, array: str = "activations", index: int = 1) -> None:
    chunk = chunk_files(store, array)[index]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))


def _truncate(store: Path, array: str = "activations") -> None:
    chunk = chunk_files(store, array)[0]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


def _copy_chunks_from(other_step: int, array: str = "activations"):
    """Replace the store's chunks of ``array`` with those of another step's store (same
    shapes and codecs: every checksum holds, only the digest can tell)."""
    def breaker(store: Path) -> None:
        other = store.with_name(f"step{other_step}.zarr")
        shutil.rmtree(store / array / "c")
        shutil.copytree(other / array / "c", store / array / "c")
    return breaker


def _legacy(store: Path) -> None:
    """As written by the previous version: no checksums, no digests, no format attr."""
    from lmdynamics.store import open_store

    ds = open_store(store).load()
    ds.attrs = {k: v for k, v in ds.attrs.items() if not k.startswith("lmdynamics_")
                or k == "lmdynamics_version"}
    shutil.rmtree(store)
    ds.to_zarr(store, consolidated=False, zarr_format=3)
    edit_attrs(store, complete=True)


def _drop_codec(store: Path, array: str = "loss") -> None:
    meta_path = store / array / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["codecs"] = meta["codecs"][:-1]
    meta_path.write_text(json.dumps(meta))


def _extra_array(store: Path) -> None:
    import zarr

    zarr.open_group(store, mode="r+").create_array("extra", shape=(2,), dtype="f8",
                                                 dimension_names=["extra"])[:] = 1.0


HOSTILE_STORES = {
    "flipped_byte_activations": (_flip_byte, "array 'activations' has a damaged chunk"),
    "flipped_byte_loss": (lambda s: _flip_byte(s, "loss", 0), "array 'loss' has a damaged chunk"),
    "flipped_byte_singular_values": (lambda s: _flip_byte(s, "grad_singular_values", 0),
                                     "array 'grad_singular_values' has a damaged chunk"),
    "truncated_chunk": (_truncate, "array 'activations' has a damaged chunk"),
    "empty_chunk": (lambda s: chunk_files(s, "activations")[2].write_bytes(b""),
                    "array 'activations' has a damaged chunk"),
    "chunks_from_other_step": (_copy_chunks_from(0),
                               "array 'activations' holds other data than was written"),
    "singular_values_from_other_step": (_copy_chunks_from(0, "weight_singular_values"),
                                        "array 'weight_singular_values' holds other data"),
    "missing_loss": (lambda s: _rm(s, "loss"), "lacks loss"),
    "missing_attr_step": (lambda s: edit_attrs(s, drop=("step",)), "lacks attribute(s) step"),
    "missing_attr_heads": (lambda s: edit_attrs(s, drop=("num_attention_heads",)),
                           "lacks attribute(s) num_attention_heads"),
    "missing_attr_n_params": (lambda s: edit_attrs(s, drop=("n_params",)),
                              "lacks attribute(s) n_params"),
    "complete_is_no": (lambda s: edit_attrs(s, complete="no"), "'complete' is 'no', not true"),
    "complete_is_one": (lambda s: edit_attrs(s, complete=1), "'complete' is 1, not true"),
    "edited_attr_hidden_size": (lambda s: edit_attrs(s, hidden_size=32),
                                "its attributes (zarr.json) differ from what was written"),
    "edited_attr_nonfinite": (lambda s: edit_attrs(s, nonfinite=True),
                              "its attributes (zarr.json) differ from what was written"),
    "edited_digest": (lambda s: edit_attrs(s, lmdynamics_attrs_sha256="0" * 64),
                      "its attributes (zarr.json) differ from what was written"),
    "legacy_store": (_legacy, "has no checksums to verify (store format None"),
    "checksum_codec_removed": (_drop_codec, "array 'loss' has"),
    "extra_array": (_extra_array, "array 'extra' was not written with the store"),
    "activations_dir_emptied": (lambda s: _rm(s, "activations/c"),
                                "array 'activations' has 0 of its 4 chunk files"),
}

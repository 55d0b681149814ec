"""Helpers for the fault tests: small real checkpoints and stores, and store surgery."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

from lmdynamics import checkpoints as ck
from lmdynamics.extract import extract_checkpoint
from lmdynamics.store import write_array_atomic
from lmdynamics.tiny import model_config

SPEC = {"hidden_size": 16, "num_layers": 2, "num_heads": 2}
SEQ_LEN = 32
STEPS = (0, 4, 8)
FINAL = 8
TOKENS = 64


def tiny_checkpoint(directory: Path, seed: int, *, diverge: str | None = None) -> Path:
    """Save a randomly initialised tiny GPT-NeoX; ``diverge`` names a parameter set to inf."""
    torch.manual_seed(seed)
    model = ck.GPTNeoXForCausalLM(model_config(SPEC, seq_len=SEQ_LEN))
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
    return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())


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
    "shape_vs_attrs": (lambda s: edit_attrs(s, num_layers=3), "from the store's attrs"),
    "token_positions": (
        lambda s: _rewrite(s, lambda ds: ds.assign_coords(position=(ds.position + 1) % 32)),
        "sampled token positions differ from those in"),
    "token_seed": (lambda s: edit_attrs(s, token_seed=1), "attr token_seed is 1, but 0 in "),
    "eval_batch": (lambda s: edit_attrs(s, eval_batch_sha256="0" * 64),
                   "attr eval_batch_sha256 is '0000"),
    "step_mismatch": (lambda s: edit_attrs(s, step=2), "attr step=2 but the path names step"),
}

"""Per-pair store encoding, measured on real tiny-suite activations.

Takes the ``activations`` of real per-pair stores (``--stores``, default the stores of
``results/tiny/extract/*/seed*/``; without any, trains the tiny suite's 497k size for 128 updates
and extracts steps 0, 64 and 128 through the package's own path), rewrites each with
several zarr v3 chunk shapes and compressors (zstd levels, blosc, none) through
:func:`lmdynamics.store.write_store`, and reports the compression ratio (raw float32 bytes
over bytes on disk) and the write and read times (read: one (component, layer) at a time,
as the reduction reads them).

    python benchmarks/store_encoding.py
    python benchmarks/store_encoding.py --stores results/tiny/extract/497k/seed0
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr.codecs as codecs

from lmdynamics.store import open_store, write_store

ROOT = Path(__file__).resolve().parents[1]

COMPRESSORS = {
    "none": None,
    "zstd-0 (zarr default)": codecs.ZstdCodec(level=0),
    "zstd-3": codecs.ZstdCodec(level=3),
    "zstd-9": codecs.ZstdCodec(level=9),
    "blosc-lz4-shuffle": codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
    "blosc-zstd-shuffle": codecs.BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"),
    "blosc-zstd-bitshuffle": codecs.BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
}


def chunk_shapes(shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Candidate chunks of activations (component, layer, token, dim)."""
    c, n_layers, n, d = shape
    return {"(1, 1, N, D) per layer": (1, 1, n, d),
            "(1, L, N, D) per component": (1, n_layers, n, d),
            "(1, 1, N/4, D)": (1, 1, max(1, n // 4), d)}


def tiny_stores(root: Path) -> list[Path]:
    """Train the 497k tiny size briefly and extract three checkpoints (real activations)."""
    from lmdynamics.extraction.extract import ExtractionOptions, extract_checkpoint
    from lmdynamics.options import resolve
    from lmdynamics.sources.tiny import TRAINING_KEYS, eval_batch, load_corpus, train_tiny_model

    corpus = load_corpus()
    spec = {"hidden_size": 96, "num_layers": 4, "num_heads": 4}
    train_tiny_model(spec, size="497k", out_dir=root / "ckpt", loss_csv=root / "loss.csv",
                     final_step=128, log_until=64, interval=64, corpus=corpus, seed=0,
                     **resolve("tiny", keys=TRAINING_KEYS))
    batch = root / "batch.npy"
    np.save(batch, eval_batch(corpus, final_step=128, batch_size=16, seq_len=128, seed=0))
    return [extract_checkpoint(root / "ckpt" / f"step{s}", batch, root / f"step{s}.zarr",
                               tokens=1024, seed=0, size="497k", step=s, model_name="tiny",
                               revision=f"step{s}",
                               options=ExtractionOptions(device="cpu"))
            for s in (0, 64, 128)]


def measure(stores: list[Path], root: Path) -> None:
    datasets = [open_store(p)[["activations"]].load() for p in stores]
    raw = sum(ds.activations.nbytes for ds in datasets)
    shape = datasets[0].activations.shape
    print(f"{len(stores)} stores, activations {shape} float32, {raw / 2**20:.1f} MiB raw")
    print("| chunks | compressor | ratio | write MiB/s | read MiB/s |\n|---|---|---:|---:|---:|")
    for chunk_label, chunks in chunk_shapes(shape).items():
        for name, codec in COMPRESSORS.items():
            enc = {"chunks": chunks, "compressors": None if codec is None else (codec,)}
            out = [root / f"enc{i}.zarr" for i in range(len(datasets))]
            t = time.perf_counter()
            for ds, path in zip(datasets, out, strict=True):
                write_store(ds, path, encoding={"activations": enc})
            t_write = time.perf_counter() - t
            disk = sum(f.stat().st_size for p in out for f in (p / "activations").rglob("*")
                       if f.is_file())
            t = time.perf_counter()
            for path in out:
                act = xr.open_zarr(path, consolidated=False).activations
                for c in range(shape[0]):
                    for layer in range(shape[1]):
                        act.isel(component=c, layer=layer).load()
            t_read = time.perf_counter() - t
            mib = raw / 2**20
            print(f"| {chunk_label} | {name} | {raw / disk:.3f} | {mib / t_write:.0f} | "
                  f"{mib / t_read:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stores", type=Path, nargs="*", default=None,
                   help="per-pair stores or folders of them (default results/tiny/extract)")
    a = p.parse_args()
    found: list[Path] = []
    for item in a.stores or [ROOT / "results/tiny/extract"]:
        found += [item] if item.suffix == ".zarr" else sorted(item.rglob("step*.zarr"))
    with tempfile.TemporaryDirectory(prefix="lmdynamics-encoding-") as tmp:
        root = Path(tmp)
        stores = found or tiny_stores(root)
        measure(stores[:12], root)


if __name__ == "__main__":
    main()

"""Store encodings of the per-pair activations, measured on real stores (issue 7).

Reads the ``activations`` (component, layer, token, dim) float32 of finished per-pair stores
(e.g. a tiny run's ``results/tiny/extract/497k``) and writes them again with several chunk
shapes and compressors, reporting the compression ratio (raw bytes / bytes on disk) and the
write and read times (best of ``--repeats``). The reduction reads one (component, layer) slice
of every step at a time, so a chunk per slice is the natural unit; the question is the codec.

    python benchmarks/store_encoding.py results/tiny/extract/497k
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
from zarr.codecs import BloscCodec, ZstdCodec

from lmdynamics.store import open_store

CODECS = {
    "none": None,
    "zstd level 0 (zarr's default)": [ZstdCodec(level=0)],
    "zstd level 3": [ZstdCodec(level=3)],
    "zstd level 9": [ZstdCodec(level=9)],
    "blosc zstd 5 + byte shuffle": [BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")],
    "blosc lz4 5 + byte shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
}


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(acts: list[xr.DataArray], chunks: tuple[int, ...], compressors, repeats: int,
            root: Path) -> tuple[float, float, float]:
    """(ratio, write seconds, read seconds) for all ``acts`` with one encoding."""
    raw = sum(a.nbytes for a in acts)
    best_w = best_r = float("inf")
    size = 0
    for _ in range(repeats):
        shutil.rmtree(root, ignore_errors=True)
        t = time.perf_counter()
        for i, a in enumerate(acts):
            enc = {"activations": {"chunks": chunks, "compressors": compressors}}
            a.to_dataset(name="activations").to_zarr(root / f"{i}.zarr", mode="w",
                                                     encoding=enc, consolidated=False,
                                                     zarr_format=3)
        best_w = min(best_w, time.perf_counter() - t)
        size = disk_bytes(root)
        t = time.perf_counter()
        for i in range(len(acts)):
            xr.open_zarr(root / f"{i}.zarr", consolidated=False)["activations"].load()
        best_r = min(best_r, time.perf_counter() - t)
    return raw / size, best_w, best_r


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("stores", type=Path, help="a folder of per-pair stores (stepN.zarr)")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    paths = sorted(a.stores.glob("step*.zarr"))
    acts = [open_store(q)["activations"].load() for q in paths]
    acts = [x.drop_vars([c for c in x.coords]) for x in acts]
    n_comp, n_layers, n_tok, dim = acts[0].shape
    print(f"{len(acts)} stores of {a.stores}: activations {acts[0].shape} float32, "
          f"{sum(x.nbytes for x in acts) / 1e6:.1f} MB raw")
    chunkings = {"one chunk per (component, layer)": (1, 1, n_tok, dim),
                 "one chunk per store": (n_comp, n_layers, n_tok, dim)}
    with tempfile.TemporaryDirectory() as tmp:
        for cname, chunks in chunkings.items():
            for name, codec in CODECS.items():
                ratio, w, r = measure(acts, chunks, codec, a.repeats, Path(tmp) / "s")
                print(f"{cname:34s} {name:30s} ratio {ratio:5.2f}  write {w:6.2f} s  "
                      f"read {r:6.2f} s")
    print(f"(float32 activations of trained models are near-incompressible noise in their "
          f"low mantissa bits; max |x| {max(float(np.abs(x).max()) for x in acts):.3g})")


if __name__ == "__main__":
    main()

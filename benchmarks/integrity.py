"""Cost of the stores' integrity checks: crc32c on every chunk, sha256 digests of every array.

Measures, on synthetic per-pair stores of a Pythia-70m-shaped size (``--steps`` steps, 6
layers x 2 components, N = 4096 tokens, D = 512, written with the extraction's encoding):

1. **Writing** one store: :func:`lmdynamics.store.write_store` (crc32c codec, digests read
   back from the written store) against the same dataset written by ``to_zarr`` with the same
   encoding and no checksum or digest (what earlier versions wrote); best of ``--repeats``.
2. **Reading**: the activations of one store through zarr with and without the crc32c codec
   (the checksum is checked on every chunk read, by the reduction too).
3. **Verifying** for the reduction: :func:`lmdynamics.store.open_store` of every store with
   the activations deferred (every other array read and hashed; attrs digest) against opening
   without verification, plus the work the reduction adds per activation block it reads
   (sha256 and the finiteness check, :class:`lmdynamics.store.DigestedReader`).
4. :func:`lmdynamics.reduction.metrics.reduce_size` of the size with the workflow's default CKA
   options
   (both estimators, pairwise, B = 1000 bootstrap), which includes 3's costs; their share of it.

    PYTHONPATH=src python benchmarks/integrity.py            # 27 steps, about 5 min on 2 cores
    PYTHONPATH=src python benchmarks/integrity.py --steps 4 --bootstrap 0   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import machine, write_size_stores  # noqa: E402

from lmdynamics.extraction.extract import activation_encoding  # noqa: E402
from lmdynamics.reduction.cka import CKAOptions  # noqa: E402
from lmdynamics.reduction.metrics import reduce_size  # noqa: E402
from lmdynamics.store import open_store, string_coords, write_store  # noqa: E402


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=27)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    print(f"# store integrity cost\n\n{machine()}\n")
    with tempfile.TemporaryDirectory(prefix="lmd-integrity-") as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        paths = write_size_stores(root / "stores", a.steps, a.layers, a.tokens, a.dim, 8)
        print(f"- wrote {a.steps} stores in {time.perf_counter() - t:.1f} s")
        ds = open_store(paths[-1]).load()
        encoding = activation_encoding(ds.activations.shape)
        plain = string_coords(ds.drop_encoding())
        plain.attrs = {k: v for k, v in plain.attrs.items() if not k.startswith("lmdynamics_")
                       and k != "complete"}

        def write_plain() -> None:
            plain.to_zarr(root / "plain.zarr", mode="w", encoding=encoding, consolidated=False,
                          zarr_format=3, write_empty_chunks=True)

        t_plain = best(write_plain, a.repeats)
        t_checked = best(lambda: write_store(ds, root / "checked.zarr", encoding=encoding),
                         a.repeats)
        mb = ds.activations.nbytes / 2**20
        print(f"- 1. write one store ({mb:.0f} MiB of activations): with checksums and digests "
              f"{t_checked:.3f} s, without {t_plain:.3f} s: **+{t_checked - t_plain:.3f} s**")

        def read(path: Path) -> None:
            arr = zarr.open_group(path, mode="r")["activations"]
            for c in range(arr.shape[0]):
                for layer in range(arr.shape[1]):
                    arr[c, layer]

        r_plain = best(lambda: read(root / "plain.zarr"), a.repeats)
        r_checked = best(lambda: read(root / "checked.zarr"), a.repeats)
        print(f"- 2. read one store's activations: with crc32c {r_checked:.3f} s, without "
              f"{r_plain:.3f} s: **+{r_checked - r_plain:.3f} s**")

        def open_all(verify: bool) -> None:
            for path in paths:
                if verify:
                    open_store(path, defer=("activations",))
                else:
                    xr.open_zarr(path, consolidated=False, chunks=None)

        o_plain = best(lambda: open_all(False), a.repeats)
        o_checked = best(lambda: open_all(True), a.repeats)
        arr = zarr.open_group(paths[-1], mode="r")["activations"]
        blocks = [np.asarray(arr[c, layer]) for c in range(arr.shape[0])
                  for layer in range(arr.shape[1])]

        def per_block() -> None:
            digest = hashlib.sha256()
            for block in blocks:
                digest.update(np.ascontiguousarray(block).tobytes())
                np.isfinite(block).all()

        t_block = best(per_block, a.repeats) * len(paths)
        verify = (o_checked - o_plain) + t_block
        print(f"- 3. open {len(paths)} stores verified (activations deferred) {o_checked:.2f} s, "
              f"unverified {o_plain:.2f} s; sha256 + finiteness of every activation block "
              f"{t_block:.2f} s: **{verify:.2f} s** added to the reduction")
        t = time.perf_counter()
        reduce_size(paths, root / "metrics.zarr", final_step=a.steps - 1,
                    cka_options=CKAOptions(bootstrap_samples=a.bootstrap))
        wall = time.perf_counter() - t
        print(f"- 4. reduce_size of the size: {wall:.1f} s; verification's share "
              f"**{100 * verify / wall:.1f}%**, crc32c on the reads "
              f"{100 * len(paths) * (r_checked - r_plain) / wall:.1f}%")
        print(f"- a per-pair store write adds {t_checked - t_plain:.2f} s to its extraction job")


if __name__ == "__main__":
    main()

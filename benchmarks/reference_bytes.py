"""Bytes one extraction with the Conjecture statistics reads, on a Pythia-70m-shaped checkpoint.

    PYTHONPATH=src python benchmarks/reference_bytes.py --root /tmp/bytes [--arch 70m]

Builds (once, under ``--root``) three revisions of a Pythia-shaped model as the hub serves them
after the download's conversion: ``config.json`` with transformers 4.24.0's Pythia fields and a
legacy-named float16 ``model.safetensors`` (tests/support/pythia_files.py, whose facts come from
shared/notes/reference-facts.md: layers, hidden, heads, vocabulary 50304, float16). Then runs
one extraction of the middle revision with the statistics, in this process, and reports what it
read:

- ``loader_bytes``: bytes read through the loaders, counted by wrapping them: the tensors
  returned by ``safetensors.torch.load_file`` and ``safetensors.safe_open(...).get_tensor``
  (safetensors maps the file and copies out what is asked for), whole files for
  ``torch.load`` and ``lmdynamics.store.file_sha256``, and the chunk and metadata bytes zarr's
  ``LocalStore.get`` returns for the reference store (not the job's own output store), by file;
- ``storage_read_bytes`` / ``syscall_rchar``: ``read_bytes`` and ``rchar`` of
  ``/proc/self/io`` over the extraction, after evicting the files from the page cache
  (``posix_fadvise(DONTNEED)``). On this VM ``read_bytes`` stays far below the bytes the loaders
  copy out (memory-mapped reads are not all attributed to the process), and ``rchar`` misses
  memory-mapped reads altogether: reported, but the loader count is the figure.

Works with the code before the reference store (``StatsOptions(init, final)``) and after it
(``StatsOptions(reference)``, the store built first and not counted): run it with each
checkout's ``src`` on ``PYTHONPATH``. Results: docs/benchmarks/2026-12-04.md, "Bytes read per
extraction".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

#: hidden, layers, heads (shared/notes/reference-facts.md, "Pythia suite").
ARCHS = {"70m": (512, 6, 8), "160m": (768, 12, 12)}
VOCAB = 50304


def io_counters() -> dict[str, int]:
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return {k: int(v) for k, v in fields.items()}


def evict(path: Path) -> None:
    """Drop ``path``'s files (recursively) from the page cache."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class LoaderBytes:
    """Bytes read through the loaders, by file (module docstring)."""

    def __init__(self, count_zarr_under: Path | None):
        self.by_file: dict[str, int] = {}
        self.zarr_root = None if count_zarr_under is None else str(count_zarr_under)

    def add(self, path: object, n: int) -> None:
        key = str(path)
        if self.zarr_root and key.startswith(self.zarr_root):
            key = self.zarr_root
        self.by_file[key] = self.by_file.get(key, 0) + n

    def install(self) -> None:
        import safetensors
        import safetensors.torch
        import torch
        import zarr.storage

        import lmdynamics.store as store

        counter, safe_open, load_file = self, safetensors.safe_open, safetensors.torch.load_file
        torch_load, sha, get = torch.load, store.file_sha256, zarr.storage.LocalStore.get

        class CountingHandle:
            def __init__(self, path, *args, **kw):
                self.path, self.handle = path, safe_open(path, *args, **kw)

            def __enter__(self):
                self.inner = self.handle.__enter__()
                return self

            def __exit__(self, *exc):
                return self.handle.__exit__(*exc)

            def get_tensor(self, name):
                t = self.inner.get_tensor(name)
                counter.add(self.path, t.numel() * t.element_size())
                return t

            def __getattr__(self, name):
                return getattr(self.inner, name)

        def counting_load_file(path, *args, **kw):
            state = load_file(path, *args, **kw)
            counter.add(path, sum(t.numel() * t.element_size() for t in state.values()))
            return state

        def counting_torch_load(path, *args, **kw):
            counter.add(path, Path(path).stat().st_size)
            return torch_load(path, *args, **kw)

        def counting_sha(path):
            counter.add(path, Path(path).stat().st_size)
            return sha(path)

        async def counting_get(self, key, *args, **kw):
            buf = await get(self, key, *args, **kw)
            if buf is not None and counter.zarr_root and str(self.root).startswith(
                    counter.zarr_root):
                counter.add(Path(self.root) / key, len(buf.to_bytes()))
            return buf

        safetensors.safe_open = CountingHandle
        safetensors.torch.load_file = counting_load_file
        torch.load = counting_torch_load
        store.file_sha256 = counting_sha
        zarr.storage.LocalStore.get = counting_get


def revisions(arch: str, root: Path) -> list[Path]:
    import safetensors.torch

    from support.pythia_files import legacy_state_dict, pythia_config

    hidden, layers, heads = ARCHS[arch]
    dirs = []
    for step, seed in ((0, 1), (1, 2), (2, 3)):
        d = root / f"step{step}"
        if not (d / "model.safetensors").is_file():
            d.mkdir(parents=True, exist_ok=True)
            (d / "config.json").write_text(json.dumps(pythia_config(hidden, layers, heads,
                                                                    VOCAB)))
            state = legacy_state_dict(hidden, layers, heads, VOCAB, seed=seed)
            safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()
                                         if v.is_floating_point() and v.ndim}, d /
                                        "model.safetensors")
        dirs.append(d)
    return dirs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--arch", default="70m", choices=sorted(ARCHS))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    from lmdynamics.cli import pin_threads

    pin_threads(a.threads)
    from lmdynamics.extraction import conjecture
    from lmdynamics.extraction.extract import extract_checkpoint

    init, mid, final = revisions(a.arch, a.root)
    batch = a.root / "batch.npy"
    np.save(batch, np.random.default_rng(0).integers(0, VOCAB, (1, 65)))
    try:
        from lmdynamics.extraction.reference import build_reference
    except ImportError:  # before the reference store
        stats = conjecture.StatsOptions(init, final)
        layout = "two reference checkpoints"
        reference = None
    else:
        reference = a.root / "reference.zarr"
        if not reference.exists():
            build_reference(init, final, reference, size=a.arch, top_k=30)
        stats = conjecture.StatsOptions(reference)
        layout = "reference store"
    out = a.root / f"store-{os.getpid()}.zarr"
    for path in (init, mid, final, *([reference] if reference else [])):
        evict(path)
    counter = LoaderBytes(reference)
    counter.install()
    before, start = io_counters(), time.perf_counter()
    extract_checkpoint(mid, batch, out, tokens=32, seed=0, size=a.arch, step=1,
                       model_name="bench", revision="step1", stats=stats)
    after, wall = io_counters(), time.perf_counter() - start
    sizes = {p.name: (p / "model.safetensors").stat().st_size for p in (init, mid, final)}
    ref_bytes = (sum(f.stat().st_size for f in reference.rglob("*") if f.is_file())
                 if reference else 0)
    print(json.dumps({"layout": layout, "arch": a.arch, "checkpoint_file_bytes": sizes,
                      "reference_store_bytes": ref_bytes,
                      "loader_bytes": sum(counter.by_file.values()),
                      "loader_bytes_by_file": {os.path.relpath(k, a.root): v
                                               for k, v in counter.by_file.items()},
                      "storage_read_bytes": after["read_bytes"] - before["read_bytes"],
                      "syscall_rchar": after["rchar"] - before["rchar"],
                      "extraction_seconds": round(wall, 1)}, indent=1))


if __name__ == "__main__":
    main()

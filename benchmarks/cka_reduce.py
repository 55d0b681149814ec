"""Time the CKA reduction of one (component, layer) at Pythia-like shapes.

Runs :func:`lmdynamics.cka_reduce.cka_dataset` on S synthetic steps of N tokens x D
features from G sequences (one component, one layer): pairwise CKA of every step against
every step (both estimators; the CKA to the final step is its last column), then the
sequence bootstrap (B resamples) of every step. Prints seconds per (component, layer) and
the extrapolation to a whole size (2 components x L layers). Float64 numpy on the CPU, as
``lmdynamics reduce`` runs; set OMP_NUM_THREADS to pin the BLAS threads.

    python benchmarks/cka_reduce.py            # the shapes below
    python benchmarks/cka_reduce.py --quick    # the tiny suite's largest size, seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import xarray as xr

from lmdynamics.cka_reduce import CKAOptions, cka_dataset

# name: (tokens N, hidden D, sequences G, steps S, layers L)
SHAPES = {
    "70m, 4096 tokens from 8 sequences": (4096, 512, 8, 27, 6),
    "2.8b, 4096 tokens from 8 sequences": (4096, 2560, 8, 27, 32),
    "2.8b, paper_code sampling (128 sequences x 1)": (128, 2560, 128, 27, 32),
}
QUICK = {"tiny 497k, 1024 tokens from 16 sequences": (1024, 96, 16, 15, 4)}


def synthetic(n: int, d: int, s: int) -> dict[int, xr.DataArray]:
    """S steps drifting towards the last one: float32 (component, layer, token, dim)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, d)).astype(np.float32)
    return {k: xr.DataArray((base + (s - k) * 0.3 * rng.normal(size=(n, d))
                             .astype(np.float32))[None, None],
                            dims=("component", "layer", "token", "dim"),
                            coords={"component": ["attention"], "layer": [0]})
            for k in range(s)}


def run(n: int, d: int, g: int, s: int, samples: int) -> dict[str, float]:
    acts = synthetic(n, d, s)
    sequences = np.repeat(np.arange(g), n // g)
    out = {}
    for label, boot in (("pairwise + point", 0), (f"with bootstrap B={samples}", samples)):
        t = time.perf_counter()
        cka_dataset(acts, sequences, final_step=s - 1, size="bench",
                    options=CKAOptions(bootstrap_samples=boot))
        out[label] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    for name, (n, d, g, s, layers) in (QUICK if args.quick else SHAPES).items():
        times = run(n, d, g, s, args.samples)
        total = max(times.values())
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
        print(f"{name}: N={n} D={d} G={g} S={s}: per (component, layer) {parts}; whole "
              f"size (2 x {layers} layers) ~{2 * layers * total / 60:.1f} min")


if __name__ == "__main__":
    main()

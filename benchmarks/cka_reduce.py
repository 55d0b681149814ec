"""Time the CKA reduction of one (component, layer) at Pythia-like shapes.

For S steps of N tokens x D features (G sequences), measures: both point estimates against
the final step for every step, the sequence bootstrap (B resamples) for every step, and the
pairwise matrices; prints seconds per (component, layer) and the extrapolation to a whole
size (2 components x L layers). Float64 numpy on the CPU, as in ``lmdynamics reduce``.

    python benchmarks/cka_reduce.py            # the shapes below
    python benchmarks/cka_reduce.py --quick    # small shapes, a few seconds
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lmdynamics.bootstrap import (
    BootstrapReference,
    bootstrap_cka_to_reference,
    bootstrap_weights,
)
from lmdynamics.cka import DebiasedCKAReference, debiased_cka_to_reference, pairwise_cka
from lmdynamics.metrics import CKAReference, linear_cka_to_reference

# name: (tokens N, hidden D, sequences G, steps S, layers L)
SHAPES = {
    "70m (4096 tokens from 8 seqs)": (4096, 512, 8, 27, 6),
    "2.8b (4096 tokens from 8 seqs)": (4096, 2560, 8, 27, 32),
    "2.8b paper_code (128 seqs x 1)": (128, 2560, 128, 27, 32),
}
QUICK = {"tiny 497k (1024 tokens, 16 seqs)": (1024, 96, 16, 15, 4)}


def run(n: int, d: int, g: int, s: int, samples: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    base = rng.normal(size=(n, d)).astype(np.float32)
    xs = [base + (s - k) * 0.3 * rng.normal(size=(n, d)).astype(np.float32)
          for k in range(s)]
    groups = np.repeat(np.arange(g), n // g)
    out = {}
    t = time.perf_counter()
    refs = CKAReference.from_activations(xs[-1]), DebiasedCKAReference.from_activations(xs[-1])
    for x in xs:
        linear_cka_to_reference(x, refs[0])
        debiased_cka_to_reference(x, refs[1])
    out["point (both)"] = time.perf_counter() - t
    t = time.perf_counter()
    bref = BootstrapReference.from_activations(xs[-1], groups, bootstrap_weights(g, samples, 0))
    for x in xs:
        bootstrap_cka_to_reference(x, bref)
    out[f"bootstrap B={samples}"] = time.perf_counter() - t
    t = time.perf_counter()
    pairwise_cka(xs)
    out["pairwise"] = time.perf_counter() - t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    for name, (n, d, g, s, layers) in (QUICK if args.quick else SHAPES).items():
        times = run(n, d, g, s, args.samples)
        total = sum(times.values())
        parts = ", ".join(f"{k} {v:.2f} s" for k, v in times.items())
        print(f"{name}: N={n} D={d} G={g} S={s}: per (component, layer) {total:.2f} s "
              f"({parts}); whole size (2 x {layers} layers) ~{2 * layers * total / 60:.1f} min")


if __name__ == "__main__":
    main()

"""What the measures (lmdynamics.estimators.measures) cost, next to the CKA reduction and the
extraction pass, as ratios measured in one run (the machine may be shared).

1. **Extraction**: the measures' data of one checkpoint
   (:func:`lmdynamics.extraction.measure_data.measure_data`: activation spectra and element
   statistics, OV spectra from the factors, weight and gradient element statistics) against
   the extraction's pass itself (:func:`lmdynamics.extraction.passes.run_pass`, write matrices'
   gradients only), on a random ``--arch`` model (default Pythia-70m's shape) and
   ``--sequences`` x ``--seq-len`` tokens, ``--tokens`` of them sampled; best of ``--repeats``.
2. **Reduction, one (component, layer)**: the 70m-shaped reduction benchmark's data
   (benchmarks/bench.py section 2: ``--steps`` steps of N = ``--reduce-tokens`` tokens from
   ``--reduce-sequences`` sequences, width D = ``--reduce-dim``) held in memory; the CKA part
   (:func:`lmdynamics.reduction.cka.cka_dataset`: both estimators, pairwise) without and with
   the B = ``--bootstrap`` bootstrap, against each comparative measure
   (:class:`lmdynamics.reduction.measures.MeasureReduction` ``on_blocks``) vs the final step and
   pairwise; and every single-checkpoint measure over the whole size (its ``dataset``).
3. **Reduction, whole size** (``--skip-full`` leaves it out): ``reduce_size`` on the same
   stores on disk (read, digest-checked) with CKA only (no measure), with the schema's
   default measures and with every measure on every data kind (comparative ones vs the final
   step), with the schema's CKA options (no bootstrap) and, unless ``--skip-bootstrap``, with
   B = ``--bootstrap``: the end-to-end ratios. Its cost is linear in the layers: fewer
   ``--reduce-layers`` give the same ratios sooner.

Threads: as benchmarks/bench.py (imported first), numpy's OpenBLAS on one thread, as the
workflow's reduction jobs.

    python benchmarks/measures.py                 # 70m shape, about 30 min on 2 busy cores
    python benchmarks/measures.py --quick         # a smoke run
    python benchmarks/measures.py --skip-extraction --skip-in-memory --skip-bootstrap \
        --reduce-layers 1                         # section 3 alone, about 5 min
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path

import bench  # first: pins the threads before numpy and torch load (benchmarks/bench.py)
import numpy as np
import torch
from integrity import best
from transformers import GPTNeoXForCausalLM

from lmdynamics.estimators.measures import MEASURES
from lmdynamics.extraction.measure_data import measure_data
from lmdynamics.extraction.passes import only_write_weights_train, run_pass
from lmdynamics.extraction.positions import sample_token_positions
from lmdynamics.options import defaults, resolve
from lmdynamics.reduction.cka import CKAOptions, cka_dataset
from lmdynamics.reduction.measures import MeasureOptions, MeasureReduction
from lmdynamics.reduction.metrics import open_pair_stores, reduce_size


def bench_extraction(a: argparse.Namespace) -> None:
    cfg = bench.pythia_config(a.arch)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(cfg).eval()
    only_write_weights_train(model)
    batch = torch.randint(0, cfg.vocab_size, (a.sequences, a.seq_len),
                          generator=torch.Generator().manual_seed(0))
    seq, pos = sample_token_positions(a.sequences, a.seq_len, a.tokens, 0)
    result = {}

    def one_pass():
        result["pass"] = run_pass(model, batch, seq, pos)

    t_pass = best(one_pass, a.repeats)
    t_data = best(lambda: measure_data(model, result["pass"].activations), a.repeats)
    print(f"\n## 1. extraction: pythia-{a.arch} shape, {a.sequences} x {a.seq_len} tokens, "
          f"{a.tokens} sampled, {torch.get_num_threads()} torch threads\n"
          f"- pass (forward + backward, write matrices' gradients): {t_pass:.2f} s\n"
          f"- the measures' data (measure_data): {t_data:.2f} s: **{100 * t_data / t_pass:.1f}%"
          "** of the pass")


def single_options(name: str) -> MeasureOptions:
    """Only measure ``name``, on every data kind it allows (both references if comparative)."""
    m = MEASURES[name]
    entry = {"data": list(m.data), **{p: defaults("measures")[name][p] for p in m.parameters}}
    if m.comparative:
        entry["reference"] = ["final"]
    return MeasureOptions.from_config({name: entry})


def comparative_options(names: list[str], references: list[str]) -> MeasureOptions:
    section = {n: {"data": ["activations"], "reference": references,
                   **{p: defaults("measures")[n][p] for p in MEASURES[n].parameters}}
               for n in names}
    return MeasureOptions.from_config(section)


def bench_in_memory(a: argparse.Namespace, paths: list[Path]) -> None:
    stores = open_pair_stores(paths)
    final = max(stores)
    one = {s: ds.activations.isel(component=[0], layer=[0]).load() for s, ds in stores.items()}
    seqs = stores[final].sequence.values
    blocks = [one[s].values[0, 0].astype(np.float64) for s in sorted(one)]
    n, d = blocks[0].shape
    print(f"\n## 2. reduction of one (component, layer): {len(blocks)} steps, N={n} tokens, "
          f"D={d}, in memory (float64 GEMM {bench.numpy_gemm_rate(1024) / 1e9:.1f} GFLOP/s)")
    rows = []
    for label, boot in (("CKA (both estimators, pairwise), no bootstrap", 0),
                        (f"CKA with bootstrap B={a.bootstrap}", a.bootstrap)):
        t = best(lambda b=boot: cka_dataset(one, seqs, final_step=final, size="bench",
                                            options=CKAOptions(bootstrap_samples=b)),
                 a.repeats)
        rows.append((label, t))
    base = rows[0][1]
    cases = [("PWCCA vs final", ["pwcca"], ["final"]),
             ("SVCCA vs final", ["svcca"], ["final"]),
             ("PWCCA and SVCCA vs final (config/tiny.yaml)", ["pwcca", "svcca"], ["final"]),
             ("PWCCA and SVCCA, final and pairwise", ["pwcca", "svcca"],
              ["final", "pairwise"])]
    for label, names, refs in cases:
        reduction = MeasureReduction(comparative_options(names, refs), stores,
                                     final_step=final, per_divisor_kind="min_dim",
                                     per_truncate=True)
        rows.append((label, best(lambda r=reduction: r.on_blocks(0, 0, blocks), a.repeats)))
    print("| part | seconds | over CKA without bootstrap |\n|---|---|---|")
    for label, t in rows:
        print(f"| {label} | {t:.2f} | {t / base:.3f} |")
    layers = stores[final].sizes["layer"]
    print(f"\nEvery single-checkpoint measure, all its data, over the whole size "
          f"({len(stores)} steps x 2 x {layers} matrices; CKA of the whole size is about "
          f"{2 * layers} x the first row):")
    print("| measure | seconds | over CKA of the whole size without bootstrap |\n"
          "|---|---|---|")
    for name, m in MEASURES.items():
        if m.comparative:
            continue
        reduction = MeasureReduction(single_options(name), stores, final_step=final,
                                     per_divisor_kind="min_dim", per_truncate=True)
        t = best(reduction.dataset, a.repeats)
        print(f"| {name} | {t:.3f} | {t / (2 * layers * base):.4f} |")


def bench_full(a: argparse.Namespace, paths: list[Path], root: Path) -> None:
    final = a.steps - 1
    every = {name: {"data": list(m.data), **({"reference": ["final"]} if m.comparative else {})}
             for name, m in MEASURES.items()}
    cases = (("CKA only", MeasureOptions(())), ("default measures", MeasureOptions()),
             ("every measure vs final", MeasureOptions.from_config(resolve("measures", every))))
    print(f"\n## 3. reduce_size of the whole size (stores on disk, {a.steps} steps); "
          "ratios over CKA only")
    print("| CKA options | " + " | ".join(label for label, _ in cases)
          + " |\n|---|---|---|---|")
    for label, boot in (("schema default (no bootstrap)", 0),
                        (f"bootstrap B={a.bootstrap}", a.bootstrap)):
        times = []
        for _, options in cases:
            out = root / f"metrics-{len(times)}-{boot}.zarr"
            start = time.perf_counter()
            reduce_size(paths, out, final_step=final,
                        cka_options=CKAOptions(bootstrap_samples=boot),
                        measure_options=options)
            times.append(time.perf_counter() - start)
        print(f"| {label} | {times[0]:.1f} s | "
              + " | ".join(f"{t:.1f} s (**{t / times[0]:.2f}**)" for t in times[1:]) + " |")
        if a.skip_bootstrap:
            break


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(bench.PYTHIA), default="70m")
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--tokens", type=int, default=4096)
    bench.reduction_arguments(p)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="see benchmarks/bench.py")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--skip-in-memory", action="store_true")
    p.add_argument("--skip-full", action="store_true")
    p.add_argument("--skip-bootstrap", action="store_true",
                   help="section 3 with the schema's CKA options only")
    p.add_argument("--quick", action="store_true",
                   help="smoke mode: 1 x 256 tokens, 5 steps x 1 layer of N=512, D=64")
    a = p.parse_args()
    if a.quick:
        a.sequences, a.seq_len, a.tokens, a.steps, a.reduce_layers = 1, 256, 256, 5, 1
        a.reduce_tokens, a.reduce_dim, a.bootstrap = 512, 64, 50
    logging.getLogger("lmdynamics").setLevel(logging.ERROR)  # the NaN warnings of random data
    warnings.simplefilter("ignore", RuntimeWarning)
    print(f"# lmdynamics measures benchmark\n{bench.machine()}")
    if not a.skip_extraction:
        bench_extraction(a)
    with tempfile.TemporaryDirectory(prefix="lmdynamics-measures-") as tmp:
        root = Path(tmp)
        paths = bench.write_size_stores(root / "stores", a.steps, a.reduce_layers, a.reduce_tokens,
                                  a.reduce_dim, a.reduce_sequences, measure_data=True)
        if not a.skip_in_memory:
            bench_in_memory(a, paths)
        if not a.skip_full:
            bench_full(a, paths, root)


if __name__ == "__main__":
    main()

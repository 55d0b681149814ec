"""A small intervention study in one process, for a GPU machine without zarr or snakemake.

Trains ``--variants`` x ``--seeds`` runs of one architecture (default: Pythia-14m-shaped,
hidden 128, 6 layers, 4 heads, vocabulary 50304) on a token file (.npy, 1-D token ids) or on
generated tokens, analyses every run's checkpoints in memory (lmdynamics.interventions.run),
and writes to ``--out``: runs.csv (per-step CKA/PER/loss), losses.csv, outcomes.csv,
effects.csv, effects_summary.csv, effects.md, timing.json; the effects table is printed.

Generated tokens (no file given): a first-order Markov chain over the vocabulary, each token
followed by one of 4 fixed successors with probabilities 0.6/0.25/0.1/0.05 (90%) or by a
Zipf(1.1)-distributed token (10%), seeded: learnable structure (bigrams) on a realistic
vocabulary size, with no data to download. Not natural text: an instrument check, not a
replication.

    python benchmarks/interventions_gpu.py --device cuda --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lmdynamics.interventions.report import effects_markdown  # noqa: E402
from lmdynamics.interventions.run import RunSettings  # noqa: E402
from lmdynamics.interventions.study import load_tokens, run_one, summarise  # noqa: E402

VARIANTS = {
    "baseline": {"kind": "baseline"},
    "rank_up": {"kind": "rank_regulariser", "strength": 0.1, "targets": "both"},
    "rank_down": {"kind": "rank_regulariser", "strength": -0.1, "targets": "both"},
    "orthogonal_init": {"kind": "orthogonal_init", "targets": "both"},
}


def markov_tokens(n: int, vocab: int, seed: int = 0) -> np.ndarray:
    """``n`` tokens of the seeded Markov chain described in the module docstring."""
    rng = np.random.default_rng(seed)
    succ = rng.integers(0, vocab, size=(vocab, 4))
    choice = rng.choice(4, size=n, p=[0.6, 0.25, 0.1, 0.05])
    jump = rng.random(n) < 0.1
    zipf = np.minimum(rng.zipf(1.1, size=n) - 1, vocab - 1)
    out = np.empty(n, dtype=np.int64)
    prev = int(rng.integers(vocab))
    for i in range(n):
        prev = int(zipf[i]) if jump[i] else int(succ[prev, choice[i]])
        out[i] = prev
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", default=None, help=".npy token file (default: generated)")
    p.add_argument("--n-tokens", type=int, default=2_000_000, help="generated tokens")
    p.add_argument("--vocab-size", type=int, default=50304)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-layers", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--final-step", type=int, default=300)
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="analysed steps (default: 0, then 16 evenly spaced to final)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tokens = (load_tokens(a.tokens) if a.tokens
              else markov_tokens(a.n_tokens, a.vocab_size))
    steps = a.steps or sorted({0, *np.linspace(0, a.final_step, 17).round().astype(int)})
    settings = RunSettings(final_step=a.final_step, steps=tuple(steps), batch_size=a.batch_size,
                           seq_len=a.seq_len, lr=a.lr, warmup=a.warmup,
                           eval_tokens=a.eval_tokens, vocab_size=a.vocab_size,
                           device=a.device, threads=a.threads)
    spec = {"hidden_size": a.hidden_size, "num_layers": a.num_layers,
            "num_heads": a.num_heads}
    size = f"h{a.hidden_size}L{a.num_layers}"
    timing = {"tokens_s": time.perf_counter() - t0, "runs": {},
              "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu",
              "torch": torch.__version__}
    print(f"tokens ready ({len(tokens)}) in {timing['tokens_s']:.1f} s", flush=True)
    metrics, losses = [], []
    for seed in a.seeds:
        for name in a.variants:
            t = time.perf_counter()
            m, lo = run_one(name, VARIANTS[name], size, spec, seed, settings, tokens)
            metrics.append(m)
            losses.append(lo)
            timing["runs"][f"{name}/seed{seed}"] = time.perf_counter() - t
            print(f"{name} seed {seed}: {timing['runs'][f'{name}/seed{seed}']:.1f} s, "
                  f"last loss {lo['train_loss'].iloc[-1]:.3f}", flush=True)
            pd.concat(metrics).to_csv(a.out / "runs.csv", index=False)
            pd.concat(losses).to_csv(a.out / "losses.csv", index=False)
    runs, loss_table = pd.concat(metrics), pd.concat(losses)
    outcomes, eff, summary = summarise(runs, loss_table, baseline="baseline",
                                       threshold=a.threshold, estimator="debiased",
                                       samples=2000, level=0.9)
    outcomes.to_csv(a.out / "outcomes.csv", index=False)
    eff.to_csv(a.out / "effects.csv", index=False)
    summary.to_csv(a.out / "effects_summary.csv", index=False)
    table = effects_markdown(eff, summary, level=0.9, threshold=a.threshold,
                             estimator="debiased")
    (a.out / "effects.md").write_text(table)
    timing["total_s"] = time.perf_counter() - t0
    timing["settings"] = {**vars(a), "out": str(a.out), "steps": [int(s) for s in steps]}
    (a.out / "timing.json").write_text(json.dumps(timing, indent=1, default=str))
    print(table)
    print(f"total {timing['total_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How often Table 1's large-gradient-PER labels change with the batch they are measured on.

Table 1 labels a layer's gradient PER "large" when it is at least ``per_grad_fraction`` (0.9)
x the largest layer value of its component. The workflow measures gradients on one batch, the
eval batch (the last training batch). This script measures, on the trained tiny suite
(``results/tiny/checkpoints``, from ``snakemake --cores 2 --configfile config/tiny.yaml``),
how much of a label is that batch: for every size and for the last checkpoints, it computes
the write matrices' gradient PER (``metrics.per_divisor: min_dim``) on ``--batches``
different training batches of the same size as the eval batch (the last ones: updates
``final_step - batches`` .. ``final_step - 1``, the eval batch among them), and on
``--sub-batches`` equal sub-batches of each. For each way of forming the label's PER
(``mcc.grad_steps`` = the mean over the last k analysed steps; the whole batch or the mean
over its sub-batches) it reports, per size and component, the fraction of batches whose
labels differ from those the same rule gives on the PER averaged over all batches (the
rule's own expectation), the fraction of layer labels that differ, and the between-batch
standard deviation of PER / layer maximum (the quantity thresholded). Last, it compares
the between-batch sd of the whole batch's gradient PER with its estimate from one batch's
sub-batches (sd over sub-batches / sqrt(sub-batches)), which is what
``extraction.grad_sub_batches`` lets Table 1 compute from the eval batch alone.

    python benchmarks/grad_label_stability.py            # 16 batches, 4 sub-batches
    python benchmarks/grad_label_stability.py --batches 32
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np
import torch

from lmdynamics.estimators.rank import per_divisor, proportional_effective_rank
from lmdynamics.extraction.passes import (
    COMPONENTS,
    run_pass,
    sub_batch_gradient_singular_values,
)
from lmdynamics.sources.checkpoints import load_model
from lmdynamics.sources.tiny import load_corpus, training_batch

ROOT = Path(__file__).resolve().parents[1]
ANALYSED = (256, 384, 512)  # config/tiny.yaml's last analysed steps
FRACTION = 0.9  # mcc.per_grad_fraction


def gradient_per(model: torch.nn.Module, batch: np.ndarray,
                 sub_batches: int) -> tuple[np.ndarray, np.ndarray]:
    """PER (min_dim divisor) of each write matrix's gradient on ``batch`` (component, layer)
    and on each of its sub-batches (sub_batch, component, layer), through the extraction's
    own passes."""
    tokens = torch.as_tensor(batch, dtype=torch.long)
    none = np.zeros(0, dtype=np.int64)
    whole = run_pass(model, tokens, none, none).grad_singular_values  # (2, L, k)
    parts = sub_batch_gradient_singular_values(model, tokens, sub_batches)  # (J, 2, L, k)
    div = per_divisor("min_dim", n_singular_values=whole.shape[-1],
                      hidden_size=model.config.hidden_size,
                      num_attention_heads=model.config.num_attention_heads)
    per = np.vectorize(lambda sv: proportional_effective_rank(sv, div),
                       signature="(k)->()")
    return per(whole), per(parts)


def labels(per: np.ndarray) -> np.ndarray:
    """Large-gradient-PER labels of (..., layer) values: >= FRACTION x the layer maximum."""
    return per >= FRACTION * per.max(axis=-1, keepdims=True)


def compute(size: str, args: argparse.Namespace, corpus: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """full (S, B, 2, L) and sub (S, B, J, 2, L): gradient PERs at each of the last analysed
    steps on each batch, and on each of its sub-batches."""
    final = ANALYSED[-1]
    updates = range(final - args.batches, final)
    batches = [training_batch(corpus, u, batch_size=16, seq_len=128, seed=0) for u in updates]
    full, sub = [], []
    for step in ANALYSED:
        model = load_model(args.checkpoints / size / "seed0" / f"step{step}")
        model.eval()
        whole, parts = zip(*(gradient_per(model, b, args.sub_batches) for b in batches),
                           strict=True)
        full.append(whole)
        sub.append(parts)
    return np.array(full), np.array(sub)


def measure(size: str, args: argparse.Namespace, corpus: np.ndarray) -> None:
    cache = args.cache and args.cache / f"{size}-{args.batches}x{args.sub_batches}.npz"
    if cache and cache.is_file():
        with np.load(cache) as saved:
            full, sub = saved["full"], saved["sub"]
    else:
        full, sub = compute(size, args, corpus)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, full=full, sub=sub)
    print(f"\n## {size}: {args.batches} batches of 16 x 128 tokens, {args.sub_batches} "
          f"sub-batches of {16 // args.sub_batches} sequences each; threshold {FRACTION} x "
          "the layer maximum")
    print("| label PER | component | batches whose labels differ from the rule's "
          "expectation | layer labels that differ | between-batch sd of PER / max |")
    print("|---|---|---:|---:|---:|")
    for k, use_sub in itertools.product(range(1, len(ANALYSED) + 1), (False, True)):
        per = sub.mean(axis=2) if use_sub else full  # (S, B, 2, L)
        per = per[-k:].mean(axis=0)  # (B, 2, L)
        expected = labels(per.mean(axis=0))  # (2, L): the rule on the batch-averaged PER
        got = labels(per)  # (B, 2, L)
        ratio = per / per.max(axis=-1, keepdims=True)
        for c, comp in enumerate(COMPONENTS):
            differ = got[:, c] != expected[c]  # (B, L)
            rule = f"mean of the last {k} steps, " + (
                f"mean of {args.sub_batches} sub-batches" if use_sub else "whole batch")
            print(f"| {rule} | {comp} | {differ.any(axis=1).mean():.2f} | "
                  f"{differ.mean():.2f} | {ratio[:, c].std(axis=0, ddof=1).mean():.3f} |")
    sub_ratio = sub[-1] / sub[-1].max(axis=-1, keepdims=True)  # (B, J, 2, L)
    se = sub_ratio.std(axis=1, ddof=1) / np.sqrt(args.sub_batches)  # (B, 2, L)
    for c, comp in enumerate(COMPONENTS):
        print(f"final step, {comp}: sub-batch estimate of the se of PER / max (as Table 1's "
              f"n_uncertain computes it; mean over layers of the median over batches) "
              f"{np.median(se[:, c], axis=0).mean():.3f}")
    actual = full[-1].std(axis=0, ddof=1)  # (2, L): between-batch sd of the whole batch's PER
    predicted = np.median(sub[-1].std(axis=1, ddof=1), axis=0) / np.sqrt(args.sub_batches)
    print(f"final step, whole batch: between-batch sd of gradient PER "
          f"{np.round(actual, 4).tolist()} (component x layer), mean "
          f"{np.round(full[-1].mean(axis=0), 3).tolist()}; sub-batch estimate of that sd "
          f"(sd over one batch's sub-batches / sqrt({args.sub_batches}), median over "
          f"batches) {np.round(predicted, 4).tolist()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, default=ROOT / "results/tiny/checkpoints")
    parser.add_argument("--sizes", nargs="+", default=["42k", "183k", "497k"])
    parser.add_argument("--batches", type=int, default=16)
    parser.add_argument("--sub-batches", type=int, default=4)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep the computed PERs in this folder and reuse them")
    args = parser.parse_args()
    torch.manual_seed(0)
    corpus = load_corpus()
    for size in args.sizes:
        measure(size, args, corpus)


if __name__ == "__main__":
    main()

"""Command line of lmdynamics: one subcommand per workflow rule.

Each subcommand parses its flags and calls one function of the package, so a rule's
``shell:`` is a single ``lmdynamics <subcommand> ...`` line and a user can run any step by
hand. Logging goes to stderr (the rules redirect it to ``results/<suite>/logs/``).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

log = logging.getLogger("lmdynamics")

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register ``func(args)`` as subcommand ``name``."""
    def wrap(func: Callable[[argparse.Namespace], None]):
        COMMANDS[name] = (add_arguments, func)
        return func
    return wrap


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--num-heads", type=int, required=True)
    p.add_argument("--final-step", type=int, required=True)
    p.add_argument("--log-until", type=int, required=True)
    p.add_argument("--interval", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--loss-csv", type=Path, required=True)


@command("train-tiny", _train_args)
def _train(a: argparse.Namespace) -> None:
    from lmdynamics.tiny import train_tiny_model

    spec = {"hidden_size": a.hidden_size, "num_layers": a.num_layers, "num_heads": a.num_heads}
    train_tiny_model(spec, size=a.size, out_dir=a.out_dir, loss_csv=a.loss_csv,
                     final_step=a.final_step, log_until=a.log_until, interval=a.interval,
                     batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup,
                     seed=a.seed, threads=a.threads)


def _eval_batch_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--final-step", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)


@command("tiny-eval-batch", _eval_batch_args)
def _tiny_eval_batch(a: argparse.Namespace) -> None:
    from lmdynamics.store import write_array_atomic
    from lmdynamics.tiny import eval_batch, load_corpus

    batch = eval_batch(load_corpus(), final_step=a.final_step, batch_size=a.batch_size,
                       seq_len=a.seq_len, seed=a.seed)
    write_array_atomic(batch, a.out)
    log.info("eval batch (last training batch, update %d): %s -> %s", a.final_step - 1,
             batch.shape, a.out)


def _training_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csvs", nargs="+", type=Path)
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-stem", type=Path, required=True)


@command("training-loss", _training_loss_args)
def _training_loss(a: argparse.Namespace) -> None:
    import pandas as pd

    from lmdynamics.figures import training_loss_figure
    from lmdynamics.store import write_text_atomic

    loss = pd.concat([pd.read_csv(p) for p in a.csvs], ignore_index=True)
    write_text_atomic(loss.to_csv(index=False), a.out_csv)
    training_loss_figure(loss, a.out_stem)


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, required=True, help="HF model directory")
    p.add_argument("--eval-batch", type=Path, required=True, help=".npy (sequences, positions)")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--model", required=True, help="model name recorded in the store")
    p.add_argument("--revision", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward/backward (0 or unset: all on CUDA, about 4096 "
                   "tokens' worth on CPU)")
    p.add_argument("--sampling", default="random_positions",
                   help="token sampling protocol: random_positions | paper_code")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--attention-activation", default="residual_write",
                   help="residual_write | paper_code")
    p.add_argument("--attention-implementation", default="sdpa", help="sdpa | eager")
    p.add_argument("--gradient-protocol", default="eval_batch", help="eval_batch | paper_code")
    p.add_argument("--gradient-batches", type=Path, default=None,
                   help=".npy (2, sequences, positions) for --gradient-protocol paper_code")
    p.add_argument("--out", type=Path, required=True)
    _stats_args(p)


def _stats_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Conjecture statistics (added when both checkpoints are given)")
    g.add_argument("--init-checkpoint", type=Path, help="step-0 model directory, same size")
    g.add_argument("--final-checkpoint", type=Path, help="final-step model directory")
    g.add_argument("--stats-max-elements", type=int, default=1 << 16)
    g.add_argument("--stats-top-k", type=int, default=30)
    g.add_argument("--stats-embedding-tokens", type=int, default=256)
    g.add_argument("--stats-spectrum-fit", type=float, nargs=2, default=(0.0, 0.5),
                   metavar=("LO", "HI"))


def _stats_options(a: argparse.Namespace):
    from lmdynamics.conjecture import StatsOptions

    if (a.init_checkpoint is None) != (a.final_checkpoint is None):
        raise ValueError("--init-checkpoint and --final-checkpoint go together "
                         f"(got {a.init_checkpoint} and {a.final_checkpoint})")
    if a.init_checkpoint is None:
        return None
    return StatsOptions(a.init_checkpoint, a.final_checkpoint,
                        max_elements=a.stats_max_elements, top_k=a.stats_top_k,
                        embedding_tokens=a.stats_embedding_tokens,
                        spectrum_fit=tuple(a.stats_spectrum_fit), seed=a.seed)


@command("extract", _extract_args)
def _extract(a: argparse.Namespace) -> None:
    import torch

    from lmdynamics.extract import extract_checkpoint

    if a.threads:
        torch.set_num_threads(a.threads)
    extract_checkpoint(a.checkpoint, a.eval_batch, a.out, tokens=a.tokens, seed=a.seed,
                       size=a.size, step=a.step, model_name=a.model, revision=a.revision,
                       device=a.device, dtype=a.dtype, micro_batch=a.micro_batch,
                       sampling=a.sampling,
                       attention_activation=a.attention_activation,
                       attention_implementation=a.attention_implementation,
                       gradient_protocol=a.gradient_protocol,
                       gradient_batches=a.gradient_batches,
                       stats=_stats_options(a))


def _gradient_batches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", required=True, help="tiny | hub")
    p.add_argument("--step", type=int, required=True, help="the checkpoint c")
    p.add_argument("--batch-size", type=int, default=16, help="tiny: sequences per batch")
    p.add_argument("--seq-len", type=int, default=128, help="tiny: bytes per sequence")
    p.add_argument("--seed", type=int, default=0, help="tiny: data order seed")
    p.add_argument("--dataset", default="EleutherAI/pile-deduped-pythia-preshuffled",
                   help="hub: the preshuffled Pile")
    p.add_argument("--dataset-revision", default="main", help="hub: its revision")
    p.add_argument("--tokens-path", default="",
                   help="hub: local shards folder or concatenated file instead of the hub "
                        "(empty: read from the hub)")
    p.add_argument("--retries", type=int, default=5, help="hub: retries of transient errors")
    p.add_argument("--backoff", type=float, default=2.0, help="hub: first wait (s), doubled")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", type=Path, default=None, help="hub: .json provenance")


@command("gradient-batches", _gradient_batches_args)
def _gradient_batches(a: argparse.Namespace) -> None:
    """Training batches of steps c-5 and c-4 for the paper code's gradient protocol."""
    import json

    from lmdynamics.paper_code import hub_gradient_batches, tiny_gradient_batches
    from lmdynamics.store import write_array_atomic, write_text_atomic

    records: list[dict] = []
    if a.source == "tiny":
        batches = tiny_gradient_batches(a.step, batch_size=a.batch_size, seq_len=a.seq_len,
                                        seed=a.seed)
    elif a.source == "hub":
        from lmdynamics.hub import set_default_timeout
        from lmdynamics.pile import HubTokens, LocalTokens

        if a.tokens_path:
            source = LocalTokens(a.tokens_path)
        else:
            set_default_timeout()
            source = HubTokens(a.dataset, a.dataset_revision, retries=a.retries,
                               backoff=a.backoff)
        batches, records = hub_gradient_batches(a.step, source)
    else:
        raise ValueError(f"--source {a.source!r}: allowed tiny, hub")
    if a.record is not None:
        write_text_atomic(json.dumps({"step": a.step, "batches": records}, indent=2) + "\n",
                          a.record)
    write_array_atomic(batches, a.out)
    log.info("gradient batches of checkpoint %d: %s -> %s", a.step, batches.shape, a.out)


def _bool(text: str) -> bool:
    """Parse a boolean flag value: true/false, yes/no, 1/0 (any case)."""
    value = text.strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: allowed true or false")


def _reduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--final-step", type=int, required=True)
    p.add_argument("--per-divisor", default="min_dim")
    p.add_argument("--per-truncate", type=_bool, default=True)
    p.add_argument("--bootstrap-samples", type=int, default=0)
    p.add_argument("--bootstrap-level", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0, help="seeds the bootstrap resamples")
    p.add_argument("--standardize", type=_bool, default=False)
    p.add_argument("--out", type=Path, required=True)


@command("reduce", _reduce_args)
def _reduce(a: argparse.Namespace) -> None:
    from lmdynamics.cka_reduce import CKAOptions
    from lmdynamics.reduce import reduce_size

    options = CKAOptions(bootstrap_samples=a.bootstrap_samples,
                         bootstrap_level=a.bootstrap_level, seed=a.seed,
                         standardize=a.standardize)
    reduce_size(a.stores, a.out, final_step=a.final_step, per_divisor_kind=a.per_divisor,
                per_truncate=a.per_truncate, cka_options=options)


def _combine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out-zarr", type=Path, required=True)
    p.add_argument("--out-csv", type=Path, required=True)


@command("combine", _combine_args)
def _combine(a: argparse.Namespace) -> None:
    from lmdynamics.reduce import write_combined

    write_combined(a.stores, a.out_zarr, a.out_csv)


def _figure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--x-axis", default="step")
    p.add_argument("--cka-estimator", default="biased", help="biased | debiased")
    p.add_argument("--out-stem", type=Path, required=True)


@command("figure", _figure_args)
def _figure(a: argparse.Namespace) -> None:
    from lmdynamics.figures_cka import render_figure
    from lmdynamics.store import open_store

    render_figure(a.name, open_store(a.metrics).load(), a.out_stem,
                  estimator=a.cka_estimator, x_axis=a.x_axis)


#: Fields of lmdynamics.tables.MCCOptions (checked there); unset ones keep its defaults.
_MCC_NUMBERS = ("cka_threshold", "early_fraction", "per_weight_threshold", "per_grad_fraction")
_MCC_CHOICES = ("early_step", "per_quantity", "weight_threshold", "reference",
                "comparison")


def _mcc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", type=Path, required=True)
    for name in _MCC_NUMBERS + _MCC_CHOICES:
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                       type=float if name in _MCC_NUMBERS else str)
    p.add_argument("--cka-estimator", default="biased", help="biased | debiased")
    p.add_argument("--csv", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--sensitivity-stem", type=Path,
                   help="draw the threshold-sensitivity figure to <stem>.png/.pdf")


@command("mcc", _mcc_args)
def _mcc(a: argparse.Namespace) -> None:
    from lmdynamics.figures_cka import select_cka
    from lmdynamics.store import open_store
    from lmdynamics.tables import MCCOptions, mcc_table, write_mcc_table

    if not (a.csv and a.md) and not a.sensitivity_stem:
        raise ValueError("mcc: give --csv and --md (the table) and/or --sensitivity-stem")
    ds = select_cka(open_store(a.metrics).load(), a.cka_estimator)
    options = MCCOptions(**{k: v for k, v in vars(a).items()
                            if k in _MCC_NUMBERS + _MCC_CHOICES})
    if a.csv and a.md:
        table = mcc_table(ds, options)
        table.attrs["thresholds"]["cka_estimator"] = a.cka_estimator
        write_mcc_table(table, a.csv, a.md)
    if a.sensitivity_stem:
        from lmdynamics.figures_mcc import mcc_sensitivity

        mcc_sensitivity(ds, a.sensitivity_stem, options)


def _reduce_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--final-step", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)


@command("reduce-stats", _reduce_stats_args)
def _reduce_stats(a: argparse.Namespace) -> None:
    from lmdynamics.conjecture_reduce import reduce_stats

    reduce_stats(a.stores, a.out, final_step=a.final_step)


def _combine_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)


@command("combine-stats", _combine_stats_args)
def _combine_stats(a: argparse.Namespace) -> None:
    from lmdynamics.conjecture_reduce import write_combined_stats

    write_combined_stats(a.stores, a.out)


def _stats_figure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name")
    p.add_argument("--stats", type=Path, required=True)
    p.add_argument("--x-axis", default="step")
    p.add_argument("--steps", type=int, nargs="*", default=[],
                   help="steps of the snapshot figures (default: chosen automatically)")
    p.add_argument("--out-stem", type=Path, required=True)


@command("stats-figure", _stats_figure_args)
def _stats_figure(a: argparse.Namespace) -> None:
    from lmdynamics.conjecture_figures import render_stats
    from lmdynamics.store import open_store

    render_stats(a.name, open_store(a.stats).load(), a.out_stem, x_axis=a.x_axis,
                 steps=a.steps)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmdynamics", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, func) in COMMANDS.items():
        p = sub.add_parser(name, help=(func.__doc__ or "").strip().splitlines()[0]
                           if func.__doc__ else None)
        add_arguments(p)
        p.set_defaults(func=func)
    return parser


def run(argv: Sequence[str] | None = None) -> None:
    """Run one subcommand; its errors propagate (for callers in Python and tests)."""
    _run(build_parser().parse_args(argv), argv)


def _run(args: argparse.Namespace, argv: Sequence[str] | None) -> None:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log.info("lmdynamics %s", " ".join(sys.argv[1:] if argv is None else argv))
    if os.environ.get("SLURM_JOB_ID"):
        # which cluster job wrote this log (for sacct/seff, or the cluster's admins)
        log.info("SLURM job %s on %s", os.environ["SLURM_JOB_ID"], socket.gethostname())
    args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmdynamics`` command: exit status 0, or 1 after an error a user can fix, reported
    as one line (``lmdynamics <command>: error: <message>``) followed by its traceback; any
    other exception is a bug and keeps Python's own traceback."""
    args = build_parser().parse_args(argv)
    try:
        _run(args, argv)
    except Exception as exc:
        if not user_error(exc):
            raise
        print(f"lmdynamics {args.command}: error: {one_line(exc)}", file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        return 1
    return 0


def user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure a user can cause and its message explains: the package's
    own error classes, bad values (``ValueError``) and files (``OSError``: missing, unreadable,
    disk full)."""
    own = type(exc).__module__.split(".")[0] == "lmdynamics"
    return own or isinstance(exc, (ValueError, OSError))


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (``head: a; b`` for a message listing lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    return f"{head} {'; '.join(rest)}" if head.endswith(":") and rest else "; ".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())


# Subcommands of the hub source register themselves on COMMANDS.
from lmdynamics import cli_hub  # noqa: E402,F401

# Subcommands of the intervention study (lmdynamics.interventions) register themselves too.
from lmdynamics.interventions import cli as interventions_cli  # noqa: E402,F401

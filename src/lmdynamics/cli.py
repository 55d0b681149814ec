"""Command line of lmdynamics: one subcommand per workflow rule.

Each subcommand parses its flags and calls one function of the package, so a rule's
``shell:`` is a single ``lmdynamics <subcommand> ...`` line and a user can run any step by
hand. Logging goes to stderr (the rules redirect it to ``results/<suite>/logs/``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import socket
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

# The intervention study's subcommands register themselves on COMMANDS when imported.
from lmdynamics.commands import COMMANDS, PINNED, READS, command
from lmdynamics.interventions import cli as interventions_cli  # noqa: F401
from lmdynamics.threads import pin_threads

log = logging.getLogger("lmdynamics")


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", required=True)
    p.add_argument("--hidden-size", type=int, required=True)
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--num-heads", type=int, required=True)
    _replicate_arg(p)
    _options_arg(p, *READS["train-tiny"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--loss-csv", type=Path, required=True)


def _replicate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replicate", type=int, default=0,
                   help="tiny: seed replicate k (config seeds), trained with config seed + k")


@command("train-tiny", _train_args, threads=True)
def _train(a: argparse.Namespace) -> None:
    from lmdynamics import families
    from lmdynamics.sources.tiny import train_tiny_model

    opts = _options(a)
    tiny = dict(opts["tiny"])
    schedule = tiny.pop("schedule")
    spec = {"hidden_size": a.hidden_size, "num_layers": a.num_layers, "num_heads": a.num_heads}
    train_tiny_model(spec, size=a.size, out_dir=a.out_dir, loss_csv=a.loss_csv,
                     final_step=_final_step(opts), **schedule, **tiny,
                     seed=opts["seed"] + a.replicate, threads=a.threads,
                     family=opts["family"] or families.DEFAULT)


def _eval_batch_args(p: argparse.ArgumentParser) -> None:
    _options_arg(p, *READS["tiny-eval-batch"])
    p.add_argument("--out", type=Path, required=True)


@command("tiny-eval-batch", _eval_batch_args)
def _tiny_eval_batch(a: argparse.Namespace) -> None:
    from lmdynamics.sources.tiny import eval_batch, load_corpus
    from lmdynamics.store import write_array_atomic

    opts = _options(a)
    batch = eval_batch(load_corpus(), final_step=_final_step(opts), **opts["tiny"],
                       seed=opts["seed"])
    write_array_atomic(batch, a.out)
    log.info("eval batch (last training batch, update %d): %s -> %s", _final_step(opts) - 1,
             batch.shape, a.out)


def _training_loss_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("csvs", nargs="+", type=Path)
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="the seed replicate of each CSV, in order (default: all 0)")
    p.add_argument("--out-csv", type=Path, required=True)
    p.add_argument("--out-stem", type=Path, required=True)


@command("training-loss", _training_loss_args)
def _training_loss(a: argparse.Namespace) -> None:
    import pandas as pd

    from lmdynamics.report.figures import training_loss_figure
    from lmdynamics.store import write_text_atomic

    seeds = a.seeds if a.seeds is not None else [0] * len(a.csvs)
    if len(seeds) != len(a.csvs):
        raise ValueError(f"--seeds gives {len(seeds)} replicate ids for {len(a.csvs)} CSVs; "
                         "allowed: one per CSV, in the same order")
    loss = pd.concat([pd.read_csv(p).assign(seed=s) for p, s in zip(a.csvs, seeds,
                                                                     strict=True)],
                     ignore_index=True)
    write_text_atomic(loss.to_csv(index=False), a.out_csv)
    training_loss_figure(loss, a.out_stem)


def _extract_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                   help="HF model directory; several: one store each, in this process "
                        "(--step, --revision, --out and --gradient-batches: one per checkpoint, "
                        "in the same order)")
    p.add_argument("--eval-batch", type=Path, required=True, help=".npy (sequences, positions)")
    p.add_argument("--size", required=True)
    p.add_argument("--step", type=int, nargs="+", required=True)
    p.add_argument("--replicate", type=int, default=0,
                   help="seed replicate id (config seeds), recorded as store attr seed")
    p.add_argument("--model", required=True, help="model name recorded in the store")
    p.add_argument("--revision", nargs="+", required=True)
    _options_arg(p, *READS["extract"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--gradient-batches", type=Path, nargs="+", default=None,
                   help=".npy (2, sequences, positions) for extraction.gradient_protocol "
                        "paper_code")
    p.add_argument("--out", type=Path, nargs="+", required=True)
    g = p.add_argument_group("Conjecture statistics (added when --reference is given; their "
                             "options: config section conjecture)")
    g.add_argument("--reference", type=Path,
                   help="the size's reference store (lmdynamics reference)")
    g = p.add_argument_group("checkpoints of your own run (source local): each is read once "
                             "complete, and its store records its path, sha256, size, mtime")
    g.add_argument("--local-settle", type=float, default=None, metavar="SECONDS",
                   help="config local.settle_seconds; given: the checkpoints are local")
    g.add_argument("--local-wait", type=float, default=0.0, metavar="SECONDS",
                   help="config local.wait_seconds")


def _stats_options(a: argparse.Namespace, conjecture: dict, seed: int):
    from lmdynamics.extraction.conjecture import StatsOptions

    if a.reference is None:
        return None
    return StatsOptions.from_config(a.reference, conjecture, seed=seed)


def _checkpoint_steps(a: argparse.Namespace) -> list:
    """The checkpoints of ``lmdynamics extract``, one per ``--checkpoint``, with their
    ``--step``, ``--revision``, ``--out`` and ``--gradient-batches`` in the same order."""
    from lmdynamics.extraction.extract import CheckpointStep

    n = len(a.checkpoint)
    grads = a.gradient_batches if a.gradient_batches is not None else [None] * n
    given = {"--step": a.step, "--revision": a.revision, "--out": a.out,
             "--gradient-batches": grads}
    wrong = [f"{flag} {len(values)}" for flag, values in given.items() if len(values) != n]
    if wrong:
        raise ValueError(f"--checkpoint gives {n} checkpoint(s) but {', '.join(wrong)}; give "
                         "one value of each per checkpoint, in the same order")
    return [CheckpointStep(*row) for row in zip(a.checkpoint, a.step, a.revision, a.out, grads,
                                                strict=True)]


@command("extract", _extract_args, threads=True)
def _extract(a: argparse.Namespace) -> None:
    from lmdynamics.extraction.extract import ExtractionOptions, extract_checkpoints
    from lmdynamics.extraction.local import extract_local

    opts = _options(a)
    run = extract_checkpoints if a.local_settle is None else functools.partial(
        extract_local, settle_seconds=a.local_settle, wait_seconds=a.local_wait)
    run(_checkpoint_steps(a), a.eval_batch, tokens=opts["tokens"],
                        seed=opts["seed"], size=a.size, model_name=a.model,
                        options=ExtractionOptions.from_config(opts["extraction"],
                                                              opts["sampling"]),
                        family=opts["family"],
                        stats=_stats_options(a, opts["conjecture"], opts["seed"]),
                        replicate=a.replicate)


def _reference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--init-checkpoint", type=Path, required=True,
                   help="step-0 model directory of the size")
    p.add_argument("--final-checkpoint", type=Path, required=True,
                   help="final-step model directory of the size")
    p.add_argument("--size", required=True)
    p.add_argument("--model", default="", help="model name recorded in the store")
    _options_arg(p, *READS["reference"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, required=True)


@command("reference", _reference_args, threads=True)
def _reference(a: argparse.Namespace) -> None:
    """The per-size reference store of the Conjecture statistics, read by every extraction of
    the size (:mod:`lmdynamics.extraction.reference`)."""
    from lmdynamics.extraction.reference import build_reference

    opts = _options(a)
    build_reference(a.init_checkpoint, a.final_checkpoint, a.out, size=a.size,
                    top_k=opts["conjecture"]["top_k"], model_name=a.model,
                    final_step=opts["final_step"])
    log.info("reference store of %s -> %s", a.size, a.out)


def _gradient_batches_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--step", type=int, required=True, help="the checkpoint c")
    _replicate_arg(p)
    _options_arg(p, *READS["gradient-batches"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--record", type=Path, default=None, help="hub: .json provenance")


@command("gradient-batches", _gradient_batches_args)
def _gradient_batches(a: argparse.Namespace) -> None:
    """Training batches of steps c-5 and c-4 for the paper code's gradient protocol."""
    from lmdynamics.extraction.paper_code import hub_gradient_batches, tiny_gradient_batches
    from lmdynamics.store import write_array_atomic, write_text_atomic

    opts = _options(a)
    records: list[dict] = []
    if opts["source"] == "tiny":
        batches = tiny_gradient_batches(a.step, **opts["tiny"],
                                        seed=opts["seed"] + a.replicate)
    elif opts["source"] == "hub":
        batches, records = hub_gradient_batches(a.step, _token_source(opts["hub"]))
    else:
        raise ValueError(f"source {opts['source']!r}: gradient batches of the tiny and hub "
                         "sources only")
    if a.record is not None:
        write_text_atomic(json.dumps({"step": a.step, "batches": records}, indent=2) + "\n",
                          a.record)
    write_array_atomic(batches, a.out)
    log.info("gradient batches of checkpoint %d: %s -> %s", a.step, batches.shape, a.out)


def _options_arg(p: argparse.ArgumentParser, *reads: str) -> None:
    """``--options``: what a step reads of the config (``section`` or ``section.key``
    entries), as one JSON object of sections (inline or a file; see
    :func:`lmdynamics.options.parse`); keys left out take the schema's defaults."""
    p.add_argument("--options", default=None, metavar="JSON|FILE",
                   help=f"config {', '.join(reads)} as one JSON object of sections, inline or "
                        "in a file, e.g. '{\"%s\": {...}}'; unset keys take the defaults of "
                        "lmdynamics/schemas/config.schema.yaml" % reads[0].partition(".")[0])
    p.set_defaults(option_sections=reads)


def _token_source(hub: Mapping):
    """The Pile's tokens: local shards (config ``hub.tokens_path``) or the hub dataset
    (``hub.dataset``, else the default suite definition's, Pythia-deduped's) read by range
    requests."""
    from lmdynamics.config import DEFAULT_SUITE
    from lmdynamics.sources.hub import set_default_timeout
    from lmdynamics.sources.pile import HubTokens, LocalTokens
    from lmdynamics.sources.suites import load_suite

    if hub["tokens_path"]:
        return LocalTokens(hub["tokens_path"])
    set_default_timeout()
    dataset = hub["dataset"] or load_suite(DEFAULT_SUITE).eval_data["dataset"]
    return HubTokens(dataset, hub["dataset_revision"],
                     retries=hub["retries"], backoff=hub["backoff"])


def _final_step(opts: dict) -> int:
    """Config ``final_step`` of a step's ``--options`` (no default: the step needs it)."""
    if opts["final_step"] is None:
        raise ValueError("--options: final_step not given; this step needs the run's final "
                         "step, e.g. --options '{\"final_step\": 143000}'")
    return opts["final_step"]


def _options(a: argparse.Namespace) -> dict:
    from lmdynamics.options import parse

    return parse(a.options, a.option_sections)


def _reduce_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    _options_arg(p, *READS["reduce"])
    p.add_argument("--out", type=Path, required=True)


@command("reduce", _reduce_args)
def _reduce(a: argparse.Namespace) -> None:
    from lmdynamics.reduction.cka import CKAOptions
    from lmdynamics.reduction.measures import MeasureOptions
    from lmdynamics.reduction.metrics import reduce_size

    opts = _options(a)
    metrics = opts["metrics"]
    reduce_size(a.stores, a.out, final_step=_final_step(opts),
                per_divisor=metrics["per_divisor"],
                per_truncate=metrics["per_truncate"],
                cka_options=CKAOptions.from_config(metrics, seed=opts["seed"]),
                measure_options=MeasureOptions.from_config(opts["measures"]))


def _combine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out-zarr", type=Path, required=True)
    p.add_argument("--out-csv", type=Path, required=True)


@command("combine", _combine_args)
def _combine(a: argparse.Namespace) -> None:
    from lmdynamics.reduction.metrics import write_combined

    write_combined(a.stores, a.out_zarr, a.out_csv)


def _drawing_args(data: str, *sections: str,
                  defects: bool = False) -> Callable[[argparse.ArgumentParser], None]:
    """Arguments of a figure command: its name, ``--<data>`` (the dataset it draws), the config
    ``sections`` it reads (``--options``), ``--out-stem`` (``<stem>.png`` and ``.pdf``) and,
    with ``defects``, ``--defects`` (the revisions the audits flagged)."""
    def add(p: argparse.ArgumentParser) -> None:
        p.add_argument("name")
        p.add_argument(f"--{data}", type=Path, required=True)
        _options_arg(p, *sections)
        p.add_argument("--out-stem", type=Path, required=True)
        if defects:
            _defects_arg(p)
    return add


def _defects_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--defects", type=Path, default=None,
                   help="tables/defective.csv: revisions the audits flagged, left out or marked "
                        "as config audit.defective says")


def _marked(ds, a: argparse.Namespace, opts: dict):
    """``ds`` with the flagged revisions of ``--defects`` marked for the figures
    (:func:`lmdynamics.report.exclusion.mark_dataset`)."""
    from lmdynamics.defects import read_defects
    from lmdynamics.report.exclusion import mark_dataset

    return mark_dataset(ds, read_defects(a.defects), opts["audit"]["defective"])


@command("figure", _drawing_args("metrics", *READS["figure"], defects=True))
def _figure(a: argparse.Namespace) -> None:
    from lmdynamics.report.cka import render_figure
    from lmdynamics.store import open_store

    opts = _options(a)
    render_figure(a.name, _marked(open_store(a.metrics).load(), a, opts), a.out_stem,
                  estimator=opts["metrics"]["cka_estimator"], x_axis=opts["figures"]["x_axis"])


@command("measure-figure", _drawing_args("metrics", "figures"))
def _measure_figure(a: argparse.Namespace) -> None:
    """The layer x step figure of one measure (:mod:`lmdynamics.report.measures`)."""
    from lmdynamics.report.measures import measure_figure
    from lmdynamics.store import open_store

    opts = _options(a)
    measure_figure(a.name, open_store(a.metrics).load(), a.out_stem,
                   x_axis=opts["figures"]["x_axis"])


def _mcc_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", type=Path, required=True)
    _options_arg(p, *READS["mcc"])
    _defects_arg(p)
    p.add_argument("--csv", type=Path)
    p.add_argument("--md", type=Path)
    p.add_argument("--seeds-csv", type=Path,
                   help="with --csv: Table 1 across seeds (mean, min, max per size and column)")
    p.add_argument("--sensitivity-stem", type=Path,
                   help="draw the threshold-sensitivity figure to <stem>.png/.pdf")


@command("mcc", _mcc_args)
def _mcc(a: argparse.Namespace) -> None:
    from lmdynamics.report.cka import select_cka
    from lmdynamics.report.tables import MCCOptions, mcc_table, write_mcc_table
    from lmdynamics.store import open_store

    if not (a.csv and a.md) and not a.sensitivity_stem:
        raise ValueError("mcc: give --csv and --md (the table) and/or --sensitivity-stem")
    from lmdynamics.defects import read_defects
    from lmdynamics.report import exclusion

    opts = _options(a)
    estimator = opts["metrics"]["cka_estimator"]
    ds = select_cka(open_store(a.metrics).load(), estimator)
    options = MCCOptions(**opts["mcc"])
    policy, found = opts["audit"]["defective"], read_defects(a.defects)
    if a.csv and a.md:
        table = mcc_table(ds, options)
        table, early = exclusion.table_without(ds, found, options, table, policy)
        table.attrs["thresholds"]["cka_estimator"] = estimator
        write_mcc_table(table, a.csv, a.md, seeds_csv=a.seeds_csv)
        exclusion.append_notes(a.md, exclusion.footnotes(ds, found, policy, early))
    if a.sensitivity_stem:
        from lmdynamics.report.mcc import mcc_sensitivity

        grid = exclusion.grid_without(ds, found, options, policy)
        mcc_sensitivity(ds, a.sensitivity_stem, options, grids=grid,
                        note=exclusion.figure_note(ds, found, policy))


def _reduce_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    _options_arg(p, *READS["reduce-stats"])
    p.add_argument("--out", type=Path, required=True)


@command("reduce-stats", _reduce_stats_args)
def _reduce_stats(a: argparse.Namespace) -> None:
    from lmdynamics.reduction.stats import reduce_stats

    reduce_stats(a.stores, a.out, final_step=_final_step(_options(a)))


def _combine_stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)


@command("combine-stats", _combine_stats_args)
def _combine_stats(a: argparse.Namespace) -> None:
    from lmdynamics.reduction.stats import write_combined_stats

    write_combined_stats(a.stores, a.out)


def _stats_figure_args(p: argparse.ArgumentParser) -> None:
    _drawing_args("stats", *READS["stats-figure"], defects=True)(p)
    p.add_argument("--init-step", type=int, default=0,
                   help="the step of the reference initialisation (the earliest analysed step "
                        "when the suite has no step 0)")


@command("stats-figure", _stats_figure_args)
def _stats_figure(a: argparse.Namespace) -> None:
    from lmdynamics.report.conjecture import render_stats
    from lmdynamics.store import open_store

    opts = _options(a)
    ds = _marked(open_store(a.stats).load(), a, opts)
    ds.attrs["init_step"] = a.init_step
    render_stats(a.name, ds, a.out_stem,
                 x_axis=opts["figures"]["x_axis"], steps=opts["conjecture"]["figure_steps"])


# Subcommands of the hub source: download, pile-batch, hub-eval-batch, audit, plan.


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, help="e.g. EleutherAI/pythia-70m-deduped")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--revision", help="e.g. step1000")
    which.add_argument("--revision-pattern", metavar="REGEX",
                       help="find the branch of --step among the repo's branches by this "
                            "pattern (a named group 'step'), e.g. OLMo's "
                            "'step(?P<step>[0-9]+)-tokens[0-9]+B'")
    p.add_argument("--step", type=int, default=None, help="the step, with --revision-pattern")
    p.add_argument("--out-dir", type=Path, required=True)
    _options_arg(p, *READS["download"])
    p.add_argument("--hub-audit", type=Path, default=None,
                   help="tables/hub_audit.csv: weight blobs several planned revisions serve are "
                        "fetched once (with --blob-dir)")
    p.add_argument("--blob-dir", type=Path, default=None,
                   help="where a shared blob is kept until every revision serving it is "
                        "downloaded (default: .blobs beside the size folders)")


@command("download", _download_args)
def _download(a: argparse.Namespace) -> None:
    """Download one hub revision (config.json, weights as model.safetensors, revision.json)."""
    from huggingface_hub.utils import disable_progress_bars

    from lmdynamics.sources.hub import download_revision, resolve_revision, set_default_timeout

    hub = _options(a)["hub"]
    retry = {"retries": hub["retries"], "backoff": hub["backoff"]}
    disable_progress_bars()
    set_default_timeout()
    revision = a.revision
    if a.revision_pattern is not None:
        if a.step is None:
            raise ValueError("--revision-pattern needs --step (the step whose branch to find)")
        revision = resolve_revision(a.repo, a.step, a.revision_pattern, **retry)
        log.info("step %d of %s is branch %s", a.step, a.repo, revision)
    blobs = None
    if a.hub_audit is not None:
        from lmdynamics.hub_audit import read_audit
        from lmdynamics.sources.blobs import SharedBlobs

        blob_dir = a.blob_dir or a.out_dir.parent.parent.parent / ".blobs"
        blobs = SharedBlobs(blob_dir, read_audit(a.hub_audit))
    record = download_revision(a.repo, revision, a.out_dir, **retry,
                               min_free_bytes=int(hub["min_free_gb"] * 1e9), blobs=blobs)
    log.info("revision record: %s", json.dumps(record))


def _pile_args(p: argparse.ArgumentParser) -> None:
    _options_arg(p, *READS["pile-batch"])
    p.add_argument("--batch", type=int, required=True, help="training batch index (142999)")
    p.add_argument("--out", type=Path, required=True, help=".npy uint16 (1024, 2049)")
    p.add_argument("--record", type=Path, required=True, help=".json provenance")


@command("pile-batch", _pile_args)
def _pile_batch(a: argparse.Namespace) -> None:
    """Read one training batch of the preshuffled Pile by byte range (hub or local files)."""
    from lmdynamics.sources.pile import read_sequences
    from lmdynamics.store import write_array_atomic, write_text_atomic

    tokens, record = read_sequences(_token_source(_options(a)["hub"]), a.batch)
    write_array_atomic(tokens, a.out)
    write_text_atomic(json.dumps(record, indent=2) + "\n", a.record)
    log.info("batch %d: %s tokens from %s -> %s", a.batch, tokens.shape, record["source"], a.out)


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch", type=Path, help=".npy (sequences, 2049) from pile-batch")
    _options_arg(p, *READS["hub-eval-batch"])
    p.add_argument("--out", type=Path, required=True)


@command("hub-eval-batch", _select_args)
def _hub_eval_batch(a: argparse.Namespace) -> None:
    """The eval batch: the first N sequences of the last training batch, as int64."""
    from lmdynamics.sources.pile import select_eval_batch
    from lmdynamics.store import load_token_array, write_array_atomic

    tokens = load_token_array(a.batch, ndim=2, what="training batch (sequences, 2049 tokens)")
    batch = select_eval_batch(tokens, _options(a)["hub"]["sequences"])
    write_array_atomic(batch, a.out)
    log.info("eval batch %s -> %s", batch.shape, a.out)


def _suite_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, help=".npy / .bin token ids, or UTF-8 text")
    _options_arg(p, *READS["suite-eval-batch"])
    p.add_argument("--vocab", type=int, default=0, help="the suite's vocabulary (0: unknown)")
    p.add_argument("--tokenizer", default=None,
                   help="text: a local folder or hub id (the workflow gives config "
                        "eval_data.tokenizer, else the suite's tokenizer, else its repo)")
    p.add_argument("--out", type=Path, required=True)


@command("suite-eval-batch", _suite_eval_args)
def _suite_eval_batch(a: argparse.Namespace) -> None:
    """The eval batch of a suite from a local token or text file (eval_data), as int64."""
    from lmdynamics.sources.eval_data import eval_batch
    from lmdynamics.store import write_array_atomic

    opts = _options(a)
    data = opts["eval_data"]
    batch = eval_batch(a.source, sequences=opts["hub"]["sequences"], seq_len=data["seq_len"],
                       vocab=a.vocab or None, dtype=data["dtype"], tokenizer=a.tokenizer,
                       allow_download=data["allow_download"])
    write_array_atomic(batch, a.out)
    log.info("eval batch %s from %s -> %s (sha256 %s)", batch.shape, a.source, a.out,
             hashlib.sha256(batch.tobytes()).hexdigest())


def _adopt_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", type=Path, help="a store lmdynamics.record wrote during training")
    p.add_argument("--eval-batch", type=Path, required=True)
    p.add_argument("--size", required=True)
    p.add_argument("--step", type=int, required=True)
    p.add_argument("--replicate", type=int, default=0)
    _options_arg(p, *READS["extract"])
    p.add_argument("--statistics", action="store_true",
                   help="the workflow computes the Conjecture statistics (conjecture.enabled)")
    p.add_argument("--out", type=Path, required=True)


@command("adopt-store", _adopt_args)
def _adopt_store(a: argparse.Namespace) -> None:
    """Check a store recorded during training against this workflow's and copy it in place."""
    from lmdynamics.sources.local import adopt_recorded

    adopt_recorded(a.store, a.eval_batch, a.out, size=a.size, step=a.step,
                   replicate=a.replicate, opts=_options(a), statistics=a.statistics)
    log.info("adopted %s -> %s", a.store, a.out)


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True, help="tables/checkpoint_audit.csv")
    g = p.add_argument_group("content audit (with --defects; the run's final step from --options)")
    g.add_argument("--tensor-audit", type=Path, default=None,
                   help="tables/tensor_audit.csv: tensors equal to other steps' ones")
    g.add_argument("--defects", type=Path, default=None,
                   help="tables/defective.csv: every flagged revision, both audits")
    g.add_argument("--hub-audit", type=Path, default=None,
                   help="tables/hub_audit.csv of the pre-flight audit (hub suites)")
    _options_arg(p, *READS["audit"])


@command("audit", _audit_args)
def _audit(a: argparse.Namespace) -> None:
    """Checkpoint audit: byte-identical revisions, per-tensor digests and trajectories."""
    from lmdynamics.reduction.audit import write_audit

    table = write_audit(a.stores, a.out)
    dups = table[table.duplicate]
    for row in dups.itertuples():
        log.warning("%s step %s: weights identical to %s", row.size, row.step, row.duplicate_of)
    log.info("%d checkpoints audited, %d duplicates -> %s", len(table), len(dups), a.out)
    if a.defects is None:
        return
    from lmdynamics import defects
    from lmdynamics.reduction.audit import content_audit, revision_facts
    from lmdynamics.store import write_text_atomic

    if a.tensor_audit is None:
        raise ValueError("audit --defects needs --tensor-audit")
    options = _options(a)
    final_step, opts = _final_step(options), options["audit"]
    hub_rows = []
    if a.hub_audit is not None:
        from lmdynamics.hub_audit import defect_rows, read_audit

        hub_rows = defect_rows(read_audit(a.hub_audit))
    tensors, rows = content_audit([revision_facts(p) for p in a.stores], final_step,
                                  opts["trajectory_tolerance"],
                                  {(r["size"], r["seed"], r["step"]) for r in hub_rows})
    write_text_atomic(tensors.to_csv(index=False), a.tensor_audit)
    found = defects.frame([*hub_rows, *rows])
    defects.write_defects(found, a.defects)
    for (size, seed, step), why in defects.flagged(found).items():
        log.warning("%s seed %d step %d: %s", size, seed, step, why)
    log.info("%d revisions flagged (%d by the content audit) -> %s",
             len(defects.flagged(found)), len(rows), a.defects)
    content = defects.frame(rows)
    if opts["defective"] == "fail" and len(content):
        raise defects.DefectiveRevisionsError(defects.fail_line(content, "the content audit"))


def _hub_audit_args(p: argparse.ArgumentParser) -> None:
    _options_arg(p, *READS["hub-audit"])
    p.add_argument("--out", type=Path, required=True, help="tables/hub_audit.csv")


@command("hub-audit", _hub_audit_args)
def _hub_audit(a: argparse.Namespace) -> None:
    """Pre-flight hub audit: what the hub serves for every planned revision, no weights."""
    from huggingface_hub.utils import disable_progress_bars

    from lmdynamics.hub_audit import audit, enforce, write_audit
    from lmdynamics.sources.hub import set_default_timeout

    disable_progress_bars()
    set_default_timeout()
    config = {k: v for k, v in _options(a).items() if v is not None}
    result = audit(config)
    write_audit(result, a.out)
    for line in result.findings():
        log.warning("%s", line)
    log.info("%d revisions audited in %d requests (%.1fs), %d flagged -> %s",
             len(result.table), result.requests, result.seconds, len(result.defective), a.out)
    enforce(result.table, config["audit"]["defective"])


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"))
    p.add_argument("--schema", type=Path, default=None,
                   help="config schema (default: the package's, lmdynamics/schemas/)")
    p.add_argument("--offline", action="store_true",
                   help="estimate downloads from parameter counts (also with HF_HUB_OFFLINE=1)")
    p.add_argument("--tflops", type=float, default=None,
                   help="effective TFLOP/s for the GPU hours (default: measured on an H100)")
    p.add_argument("--download-mb-s", type=float, default=None,
                   help="download speed in MB/s for the download hours")


@command("plan", _plan_args)
def _plan(a: argparse.Namespace) -> None:
    """Print, per size, bytes to download, bytes of the stores and compute, before a run."""
    from lmdynamics.config import load_config
    from lmdynamics.plan import (
        DEFAULT_DOWNLOAD_MB_S,
        DEFAULT_TFLOPS,
        format_plan,
        offline_requested,
        plan,
    )

    config = load_config(a.configfile, a.schema)
    tflops = a.tflops or DEFAULT_TFLOPS
    speed = a.download_mb_s or DEFAULT_DOWNLOAD_MB_S
    online = not (a.offline or offline_requested())
    if online:
        from lmdynamics.sources.hub import set_default_timeout

        set_default_timeout()
    from lmdynamics.hub_audit import audit_report

    findings, sizes = audit_report(config, online=online)
    table = plan(config, online=online, tflops=tflops, download_mb_s=speed,
                 **({"revision_bytes": sizes} if sizes is not None else {}))
    print(f"plan for {a.configfile} (suite {config['suite']}, {config['tokens']} stored tokens "
          "per checkpoint)")
    print(format_plan(table, tflops=tflops, download_mb_s=speed))
    if findings:
        print("")
        print("\n".join(findings))


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
    if args.command in PINNED:
        pin_threads(args.threads)
    args.func(args)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``lmdynamics`` command: :func:`run_command` on ``argv`` (default: the process's
    arguments); its exit status."""
    return run_command(list(sys.argv[1:] if argv is None else argv))


def run_command(argv: Sequence[str]) -> int:
    """Run one subcommand in this process: exit status 0, or 1 after an error a user can fix,
    reported as one line (``lmdynamics <command>: error: <message>``) followed by its
    traceback; any other exception is a bug and keeps Python's own traceback."""
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
    # `python -m lmdynamics.cli` runs this file as __main__, a second copy of the module: run
    # the package's lmdynamics.cli (the one tests and the rest of the package patch and use).
    from lmdynamics.cli import main as _main

    raise SystemExit(_main())

"""Subcommands of the hub source (registered on :mod:`lmdynamics.cli`): ``download``,
``pile-batch``, ``hub-eval-batch``, ``audit`` and ``plan``."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from lmdynamics.cli import command

log = logging.getLogger("lmdynamics")


def _retry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--retries", type=int, default=5, help="retries of transient hub errors")
    p.add_argument("--backoff", type=float, default=2.0, help="first wait (s), doubled each time")


def _download_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repo", required=True, help="e.g. EleutherAI/pythia-70m-deduped")
    p.add_argument("--revision", required=True, help="e.g. step1000")
    p.add_argument("--out-dir", type=Path, required=True)
    p.add_argument("--min-free-gb", type=float, default=0.0,
                   help="fail before writing if the download would leave less free disk")
    _retry_args(p)


@command("download", _download_args)
def _download(a: argparse.Namespace) -> None:
    """Download one hub revision (config.json, weights as model.safetensors, revision.json)."""
    from huggingface_hub.utils import disable_progress_bars

    from lmdynamics.hub import download_revision, set_default_timeout

    disable_progress_bars()
    set_default_timeout()
    record = download_revision(a.repo, a.revision, a.out_dir, retries=a.retries,
                               backoff=a.backoff, min_free_bytes=int(a.min_free_gb * 1e9))
    log.info("revision record: %s", json.dumps(record))


def _pile_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default="EleutherAI/pile-deduped-pythia-preshuffled")
    p.add_argument("--dataset-revision", default="main")
    p.add_argument("--tokens-path", type=Path, default=None,
                   help="local shards folder or concatenated file instead of the hub")
    p.add_argument("--batch", type=int, required=True, help="training batch index (142999)")
    p.add_argument("--out", type=Path, required=True, help=".npy uint16 (1024, 2049)")
    p.add_argument("--record", type=Path, required=True, help=".json provenance")
    _retry_args(p)


@command("pile-batch", _pile_args)
def _pile_batch(a: argparse.Namespace) -> None:
    """Read one training batch of the preshuffled Pile by byte range (hub or local files)."""
    from lmdynamics.hub import set_default_timeout
    from lmdynamics.pile import HubTokens, LocalTokens, read_sequences
    from lmdynamics.store import write_array_atomic, write_text_atomic

    if a.tokens_path:
        source = LocalTokens(a.tokens_path)
    else:
        set_default_timeout()
        source = HubTokens(a.dataset, a.dataset_revision, retries=a.retries, backoff=a.backoff)
    tokens, record = read_sequences(source, a.batch)
    write_array_atomic(tokens, a.out)
    write_text_atomic(json.dumps(record, indent=2) + "\n", a.record)
    log.info("batch %d: %s tokens from %s -> %s", a.batch, tokens.shape, record["source"], a.out)


def _select_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("batch", type=Path, help=".npy (sequences, 2049) from pile-batch")
    p.add_argument("--sequences", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)


@command("hub-eval-batch", _select_args)
def _hub_eval_batch(a: argparse.Namespace) -> None:
    """The eval batch: the first N sequences of the last training batch, as int64."""
    from lmdynamics.pile import select_eval_batch
    from lmdynamics.store import load_token_array, write_array_atomic

    tokens = load_token_array(a.batch, ndim=2, what="training batch (sequences, 2049 tokens)")
    batch = select_eval_batch(tokens, a.sequences)
    write_array_atomic(batch, a.out)
    log.info("eval batch %s -> %s", batch.shape, a.out)


def _audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stores", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)


@command("audit", _audit_args)
def _audit(a: argparse.Namespace) -> None:
    """Table of revisions whose weights are byte-identical to another revision's."""
    from lmdynamics.audit import write_audit

    table = write_audit(a.stores, a.out)
    dups = table[table.duplicate]
    for row in dups.itertuples():
        log.warning("%s step %s: weights identical to %s", row.size, row.step, row.duplicate_of)
    log.info("%d checkpoints audited, %d duplicates -> %s", len(table), len(dups), a.out)


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", type=Path, default=Path("config/config.yaml"))
    p.add_argument("--schema", type=Path,
                   default=Path("workflow/schemas/config.schema.yaml"))
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
        from lmdynamics.hub import set_default_timeout

        set_default_timeout()
    table = plan(config, online=online, tflops=tflops, download_mb_s=speed)
    print(f"plan for {a.configfile} (suite {config['suite']}, {config['tokens']} stored tokens "
          "per checkpoint)")
    print(format_plan(table, tflops=tflops, download_mb_s=speed))

"""The registry of ``lmdynamics`` subcommands: :func:`command` registers one on
:data:`COMMANDS`, which :mod:`lmdynamics.cli` turns into its argument parser.

A leaf, so that a stage's own command module (:mod:`lmdynamics.interventions.cli`) registers
its subcommands without importing the command line that imports it.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}
#: Subcommands that run a model: :func:`lmdynamics.threads.pin_threads` on their ``--threads``
#: before they import.
PINNED: set[str] = set()


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None], *,
            threads: bool = False):
    """Register ``func(args)`` as subcommand ``name``; ``threads``: it has ``--threads`` and
    runs a model, so :func:`lmdynamics.cli.run_command` pins its threads before it starts."""
    def wrap(func: Callable[[argparse.Namespace], None]):
        COMMANDS[name] = (add_arguments, func)
        if threads:
            PINNED.add(name)
        return func
    return wrap


#: What a subcommand reads of the config, where it reads part of a section: ``section`` or
#: ``section.key`` entries. Its ``--options`` argument is cut to them, and its rule builds that
#: argument from the same list (``options.job_options(config, *READS[name])``), so changing a
#: key it reads reruns the job and changing one it does not read does not.
READS: dict[str, tuple[str, ...]] = {
    "extract": ("tokens", "seed", "extraction", "sampling", "conjecture.max_elements",
                "conjecture.top_k", "conjecture.embedding_tokens", "conjecture.spectrum_fit",
                "family"),
    # Only top_k shapes the reference store (the final checkpoint's top-k directions).
    "reference": ("conjecture.top_k", "final_step"),
    "reduce": ("metrics", "seed", "measures", "final_step"),
    "reduce-stats": ("final_step",),
    "train-tiny": ("tiny.batch_size", "tiny.seq_len", "tiny.lr", "tiny.warmup",
                   "tiny.schedule", "seed", "family", "final_step"),
    "tiny-eval-batch": ("tiny.batch_size", "tiny.seq_len", "seed", "final_step"),
    "gradient-batches": ("source", "tiny.batch_size", "tiny.seq_len", "seed", "hub.dataset",
                         "hub.dataset_revision", "hub.tokens_path", "hub.retries",
                         "hub.backoff"),
    "download": ("hub.retries", "hub.backoff", "hub.min_free_gb"),
    "pile-batch": ("hub.dataset", "hub.dataset_revision", "hub.tokens_path", "hub.retries",
                   "hub.backoff"),
    "hub-eval-batch": ("hub.sequences",),
    "suite-eval-batch": ("hub.sequences", "eval_data.seq_len", "eval_data.dtype",
                         "eval_data.allow_download"),
    # The drawings and Table 1 read the policy for flagged revisions, not the audit's
    # tolerance (which decides what is flagged: tables/defective.csv, their input).
    "figure": ("figures", "metrics", "audit.defective"),
    "stats-figure": ("figures", "conjecture", "audit.defective"),
    "mcc": ("mcc", "metrics", "audit.defective"),
    # The content audit: its tolerance and policy, and the run's final step (the trajectory's
    # end).
    "audit": ("audit", "final_step"),
    # What the pre-flight audit asks and how; the rest of the hub section changes nothing it
    # finds.
    "hub-audit": ("source", "suite", "suite_file", "sizes", "seeds", "steps", "final_step",
                  "hub.repo", "hub.revision", "hub.retries", "hub.backoff", "audit.defective"),
}

"""What a configuration will cost before it runs: downloads, store sizes, compute.

Per size: the bytes to download (the hub's file metadata of every revision when the hub can
be reached, else parameters x 2 bytes, float16 as Pythia publishes, and the table says
which), the bytes the per-pair stores take (activations in float32 plus float64 singular
values), and the floating-point operations of one forward and backward pass over the eval
batch, 6 x (parameters - input embedding) x tokens (attention scores not counted; the
backward pass computes only the write matrices' weight gradients, so this is an upper
bound).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from lmdynamics.config import eval_from_file, eval_sequences, hub_repo, hub_revision, suite_for
from lmdynamics.sources.pythia import CONTEXT as PYTHIA_CONTEXT
from lmdynamics.sources.suites import Shape

log = logging.getLogger(__name__)

TINY_VOCAB = 256
#: Bytes per parameter of the published weights (float16).
PUBLISHED_BYTES_PER_PARAM = 2
#: Effective throughput for the compute hours (TFLOP/s, ``--tflops``): measured on one H100
#: with bfloat16 and eager attention, 8 sequences x 2049 tokens, 6N-equivalent: 50 (70m) to
#: 160 (1.4b) TFLOP/s.
DEFAULT_TFLOPS = 50.0
#: Download speed for the download hours (MB/s, ``--download-mb-s``).
DEFAULT_DOWNLOAD_MB_S = 50.0


def store_bytes(tokens: int, hidden: int, layers: int) -> int:
    """Uncompressed size of one per-pair store: float32 activations (2 components x layers
    x tokens x hidden) and float64 singular values (weights and gradients, 2 components x
    layers x hidden each)."""
    return 2 * layers * tokens * hidden * 4 + 2 * 2 * layers * hidden * 8


def extraction_flops(params: int, vocab: int, hidden: int, eval_tokens: int) -> float:
    """6 x (parameters - input embedding) x tokens: forward and backward of one checkpoint."""
    return 6.0 * (params - vocab * hidden) * eval_tokens


def parameters(config: Mapping[str, Any], size: str) -> int | None:
    """Parameters of a size: the configured family's count (:mod:`lmdynamics.families`) of
    its tiny config for the tiny suite, else of the suite definition's documented shape
    (:func:`shape_parameters`; None when a fact the count needs is not documented)."""
    if config["source"] == "tiny":
        from lmdynamics import families

        family = families.get(config.get("family", families.DEFAULT))
        spec = config["tiny"]["models"][size]
        tiny = family.tiny_config(hidden_size=spec["hidden_size"],
                                  num_layers=spec["num_layers"], num_heads=spec["num_heads"],
                                  seq_len=config["tiny"].get("seq_len", 128),
                                  vocab_size=TINY_VOCAB)
        return family.parameters(tiny)
    suite = suite_for(config)
    return shape_parameters(suite.family, suite.sizes[size])


def shape_parameters(family: str, shape: Shape) -> int | None:
    """Parameters of a documented ``shape`` of a suite of ``family``: the family's exact
    count (:attr:`~lmdynamics.families.Family.parameters`) of the ``config.json`` its
    :attr:`~lmdynamics.families.Family.shape_config` builds; None when a fact the count
    needs is not documented (GPT-2: the context; Llama: the model type, whose norms may
    have no weights). Pythia-70m: 70,426,624, as its README."""
    from lmdynamics import families

    impl = families.get(family)
    facts = dataclasses.asdict(shape)
    facts.pop("note")
    config = impl.shape_config(facts)
    return None if config is None else impl.parameters(config)


def architecture(config: Mapping[str, Any], size: str) -> tuple[int, int, int]:
    """(layers, hidden, vocab) of a size of the configured suite (hub: the suite
    definition's shape; :class:`ValueError` when it is not documented)."""
    if config["source"] == "tiny":
        spec = config["tiny"]["models"][size]
        return spec["num_layers"], spec["hidden_size"], TINY_VOCAB
    shape = suite_for(config).sizes[size]
    if not shape.known:
        raise ValueError(f"size {size}: shape not documented in the suite definition")
    return shape.layers, shape.hidden, shape.vocab


def local_architecture(config: Mapping[str, Any], size: str) -> tuple[int, int, int, int]:
    """(layers, hidden, vocab, parameters) of a size of your own run, from the final
    checkpoint's ``config.json`` (:mod:`lmdynamics.sources.local`)."""
    from lmdynamics import families
    from lmdynamics.sources.checkpoints import read_model_config
    from lmdynamics.sources.local import checkpoint_dir, section, seeds_of

    folder = checkpoint_dir(section(config)["path"], size, seeds_of(config)[0],
                            config["final_step"])
    cfg = read_model_config(folder).to_dict()
    fam = families.get(config["family"])
    dims = fam.dims(cfg)
    return (dims["num_hidden_layers"], dims["hidden_size"], dims["vocab_size"],
            fam.parameters(cfg))


def eval_tokens(config: Mapping[str, Any]) -> int:
    """Tokens of the eval batch that go through the model per checkpoint."""
    if config["source"] == "tiny":
        return config["tiny"].get("batch_size", 16) * config["tiny"].get("seq_len", 128)
    if eval_from_file(config, suite_for(config)):
        return eval_sequences(config) * (config.get("eval_data") or {}).get("seq_len", 2049)
    return eval_sequences(config) * (PYTHIA_CONTEXT + 1)


def plan_seeds(config: Mapping[str, Any], suite) -> list[int | None]:
    """The seeds a config covers: its ``seeds`` list when set, else every seed of the
    suite definition, else one run (``[None]``)."""
    if config.get("seeds"):
        return list(config["seeds"])
    return list(suite.seeds) if suite is not None and suite.seeds else [None]


def hub_revision_bytes(repo: str, revision: str) -> int:
    """Bytes of config.json, the weights and a shard index of one hub revision (HEAD
    requests)."""
    from huggingface_hub import HfApi, constants

    from lmdynamics.sources.hub import remote_file, weight_files

    info = HfApi().model_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    names, _, index = weight_files(s.rfilename for s in info.siblings or [])
    return sum(remote_file(repo, n, info.sha, retries=1, backoff=1.0).size
               for n in ["config.json", *names, *([index] if index else [])])


def hub_refs(repo: str) -> list[str]:
    """Branch names of a hub repo (``list_repo_refs``, checked by
    :func:`lmdynamics.sources.hub.list_branches`)."""
    from huggingface_hub import HfApi

    from lmdynamics.sources.hub import list_branches

    return list_branches(HfApi(), repo, retries=1, backoff=1.0)


def _revisions(config: Mapping[str, Any], suite, repo: str, steps: list[int], online: bool,
               refs: Callable[[str], list[str]]) -> list[str]:
    names = [hub_revision(config, suite, s) for s in steps]
    if None not in names:
        return names
    if not online:
        raise LookupError("the revision names of this suite are discovered from the hub's "
                          "branch list, which needs the network")
    found = suite.step_refs(refs(repo))
    missing = [s for s in steps if s not in found]
    if missing:
        raise LookupError(f"{repo} has no branch for step(s) {missing[:5]}")
    return [found[s] for s in steps]


def plan(config: Mapping[str, Any], *, online: bool = True, tflops: float = DEFAULT_TFLOPS,
         download_mb_s: float = DEFAULT_DOWNLOAD_MB_S,
         revision_bytes: Callable[[str, str], int] = hub_revision_bytes,
         refs: Callable[[str], list[str]] = hub_refs) -> pd.DataFrame:
    """One row per size: parameters, steps, seeds and extraction jobs (steps x seeds),
    download bytes (and their source) and hours at ``download_mb_s``, store bytes, FLOPs per
    checkpoint and in all, and hours at ``tflops``. Offline it needs only the config and the
    suite definition; a shape the definition does not document leaves that size's counts
    NaN ("unknown")."""
    rows = []
    if config["source"] == "local":  # steps, final step and family from disk
        from lmdynamics.sources.local import resolve

        config = {**config, **resolve(config)}
    steps = sorted(config["steps"])
    n_tokens = eval_tokens(config)
    suite = suite_for(config)
    seeds = plan_seeds(config, suite)
    for size in config["sizes"]:
        if config["source"] == "local":
            layers, hidden, vocab, params = local_architecture(config, size)
        elif suite is None:
            layers, hidden, vocab = architecture(config, size)
            params = parameters(config, size)
        else:
            shape = suite.sizes[size]
            layers, hidden, vocab = shape.layers, shape.hidden, shape.vocab
            params = shape_parameters(suite.family, shape)
        jobs = len(steps) * len(seeds)
        download, source = 0, ("none (read in place)" if config["source"] == "local"
                               else "none (trained locally)")
        if config["source"] == "hub":
            download = (jobs * (params * PUBLISHED_BYTES_PER_PARAM + 1000)
                        if params is not None else math.nan)
            source = ("estimate: parameters x 2 bytes (float16)" if params is not None
                      else "unknown: the suite definition does not document this size's shape")
            try:
                if not online:
                    _revisions(config, suite, "", steps, False, refs)
                    raise _Offline
                total = 0
                for seed in seeds:
                    repo = hub_repo(config, suite, size, seed)
                    revs = _revisions(config, suite, repo, steps, True, refs)
                    first = revision_bytes(repo, revs[0])  # one probe before the rest
                    with ThreadPoolExecutor(8) as pool:
                        total += first + sum(pool.map(
                            lambda r, repo=repo: revision_bytes(repo, r), revs[1:]))
                download = total
                source = f"hub metadata of {jobs} revisions"
            except _Offline:
                pass
            except Exception as exc:  # offline or a missing revision: say so, estimate
                source += f"; hub metadata unavailable ({type(exc).__name__}: " \
                          f"{str(exc).splitlines()[0][:120] if str(exc) else ''})"
                online = False
        if params is None:
            flops = math.nan
            stores = math.nan if hidden is None or layers is None else \
                jobs * store_bytes(config["tokens"], hidden, layers)
        else:
            flops = extraction_flops(params, vocab, hidden, n_tokens)
            stores = jobs * store_bytes(config["tokens"], hidden, layers)
        rows.append({"size": size, "parameters": math.nan if params is None else params,
                     "steps": len(steps), "seeds": len(seeds), "jobs": jobs,
                     "download_bytes": download, "download_source": source,
                     "download_hours": download / (download_mb_s * 1e6) / 3600,
                     "store_bytes": stores,
                     "flops_per_checkpoint": flops, "flops_total": flops * jobs,
                     "hours": flops * jobs / (tflops * 1e12) / 3600})
    return pd.DataFrame(rows)


class _Offline(Exception):
    """No hub metadata asked for: the estimate stands."""


def format_plan(table: pd.DataFrame, *, tflops: float = DEFAULT_TFLOPS,
                download_mb_s: float = DEFAULT_DOWNLOAD_MB_S) -> str:
    """The plan as a text table with totals and the notes a user needs."""
    from lmdynamics.sources.hub import human_bytes

    def size_of(n: float) -> str:
        return "unknown" if math.isnan(n) else human_bytes(n)

    def number(n: float, scale: float, fmt: str) -> str:
        return "unknown" if math.isnan(n) else format(n / scale, fmt)

    head = (f"{'size':>6} {'params':>9} {'steps':>5} {'seeds':>5} {'jobs':>5} "
            f"{'download':>10} {'dl h':>6} {'stores':>10} {'PFLOP/ckpt':>10} {'PFLOP':>8} "
            f"{'GPU h':>7}  download from")
    lines = [head]
    for r in table.itertuples():
        params = number(r.parameters, 1e6, ".1f") + ("M" if not math.isnan(r.parameters)
                                                     else "")
        lines.append(f"{r.size:>6} {params:>9} {r.steps:>5} {r.seeds:>5} {r.jobs:>5} "
                     f"{size_of(r.download_bytes):>10} {number(r.download_hours, 1, '.2f'):>6} "
                     f"{size_of(r.store_bytes):>10} "
                     f"{number(r.flops_per_checkpoint, 1e15, '.3f'):>10} "
                     f"{number(r.flops_total, 1e15, '.2f'):>8} {number(r.hours, 1, '.3f'):>7}"
                     f"  {r.download_source}")
    lines.append(f"{'total':>6} {'':>9} {int(table.steps.sum()):>5} {'':>5} "
                 f"{int(table.jobs.sum()):>5} "
                 f"{size_of(table.download_bytes.sum(skipna=False)):>10} "
                 f"{number(table.download_hours.sum(skipna=False), 1, '.2f'):>6} "
                 f"{size_of(table.store_bytes.sum(skipna=False)):>10} {'':>10} "
                 f"{number(table.flops_total.sum(skipna=False), 1e15, '.2f'):>8} "
                 f"{number(table.hours.sum(skipna=False), 1, '.3f'):>7}")
    lines += ["", f"download: bytes fetched from the hub; hours at {download_mb_s:g} MB/s "
              "(--download-mb-s). Weights are deleted after extraction unless "
              "hub.keep_weights; the largest checkpoint x the downloads running at once "
              "(--resources network=N) must fit on disk.",
              "stores: per-pair zarr stores (float32 activations), uncompressed upper bound.",
              "jobs: extractions, steps x seeds (seeds: the config's seeds, else every seed "
              "of the suite definition); unknown: a shape the suite definition leaves "
              "undocumented.",
              "compute: 6 x (parameters - input embedding) x eval tokens per checkpoint, an "
              f"upper bound; GPU hours at {tflops:g} TFLOP/s effective (--tflops)."]
    return "\n".join(lines)


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

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

import logging
import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pandas as pd

from lmdynamics.config import eval_sequences
from lmdynamics.sources.pythia import ARCHITECTURES as PYTHIA_ARCHITECTURES
from lmdynamics.sources.pythia import CONTEXT as PYTHIA_CONTEXT

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


def gpt_neox_parameters(layers: int, hidden: int, vocab: int) -> int:
    """Parameters of a GPT-NeoX model with MLP width 4 x hidden and untied embeddings.

    Per layer: two layer norms (4D), fused QKV (3D^2 + 3D), output (D^2 + D), MLP
    (8D^2 + 5D); plus input and output embeddings (2VD) and the final layer norm (2D).
    ``gpt_neox_parameters(6, 512, 50304) == 70_426_624`` (Pythia-70m).
    """
    return layers * (12 * hidden * hidden + 13 * hidden) + 2 * vocab * hidden + 2 * hidden


def store_bytes(tokens: int, hidden: int, layers: int) -> int:
    """Uncompressed size of one per-pair store: float32 activations (2 components x layers
    x tokens x hidden) and float64 singular values (weights and gradients, 2 components x
    layers x hidden each)."""
    return 2 * layers * tokens * hidden * 4 + 2 * 2 * layers * hidden * 8


def extraction_flops(params: int, vocab: int, hidden: int, eval_tokens: int) -> float:
    """6 x (parameters - input embedding) x tokens: forward and backward of one checkpoint."""
    return 6.0 * (params - vocab * hidden) * eval_tokens


def architecture(config: Mapping[str, Any], size: str) -> tuple[int, int, int]:
    """(layers, hidden, vocab) of a size of the configured suite."""
    if config["source"] == "tiny":
        spec = config["tiny"]["models"][size]
        return spec["num_layers"], spec["hidden_size"], TINY_VOCAB
    return PYTHIA_ARCHITECTURES[size]


def eval_tokens(config: Mapping[str, Any]) -> int:
    """Tokens of the eval batch that go through the model per checkpoint."""
    if config["source"] == "tiny":
        return config["tiny"].get("batch_size", 16) * config["tiny"].get("seq_len", 128)
    return eval_sequences(config) * (PYTHIA_CONTEXT + 1)


def hub_revision_bytes(repo: str, revision: str) -> int:
    """Bytes of config.json, the weights and a shard index of one hub revision (HEAD
    requests)."""
    from huggingface_hub import HfApi, constants

    from lmdynamics.sources.hub import remote_file, weight_files

    info = HfApi().model_info(repo, revision=revision, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    names, _, index = weight_files(s.rfilename for s in info.siblings or [])
    return sum(remote_file(repo, n, info.sha, retries=1, backoff=1.0).size
               for n in ["config.json", *names, *([index] if index else [])])


def plan(config: Mapping[str, Any], *, online: bool = True, tflops: float = DEFAULT_TFLOPS,
         download_mb_s: float = DEFAULT_DOWNLOAD_MB_S,
         revision_bytes: Callable[[str, str], int] = hub_revision_bytes) -> pd.DataFrame:
    """One row per size: parameters, checkpoints (``steps`` x ``seeds``, the replicates of
    ``config["seeds"]``), download bytes (and their source) and hours at ``download_mb_s``,
    store bytes, FLOPs per checkpoint and in all, and hours at ``tflops``."""
    rows = []
    seeds = sorted(config.get("seeds", [0]))
    steps = sorted(config["steps"]) * len(seeds)  # one checkpoint per (seed, step)
    n_tokens = eval_tokens(config)
    for size in config["sizes"]:
        layers, hidden, vocab = architecture(config, size)
        params = gpt_neox_parameters(layers, hidden, vocab)
        download, source = 0, "none (trained locally)"
        if config["source"] == "hub":
            download = len(steps) * (params * PUBLISHED_BYTES_PER_PARAM + 1000)
            source = "estimate: parameters x 2 bytes (float16)"
            if online:
                hub = config.get("hub", {})
                template = hub.get("repo", "EleutherAI/pythia-{size}-deduped")
                revs = [(template.format(size=size, seed=k),
                         hub.get("revision", "step{step}").format(step=s))
                        for k in seeds for s in sorted(config["steps"])]
                try:
                    first = revision_bytes(*revs[0])  # one probe before the rest
                    with ThreadPoolExecutor(8) as pool:
                        download = first + sum(pool.map(lambda r: revision_bytes(*r),
                                                        revs[1:]))
                    source = f"hub metadata of {len(revs)} revisions"
                except Exception as exc:  # offline or a missing revision: say so, estimate
                    source += f"; hub metadata unavailable ({type(exc).__name__}: " \
                              f"{str(exc).splitlines()[0][:120] if str(exc) else ''})"
                    online = False
        flops = extraction_flops(params, vocab, hidden, n_tokens)
        rows.append({"size": size, "parameters": params, "seeds": len(seeds),
                     "steps": len(steps),
                     "download_bytes": download, "download_source": source,
                     "download_hours": download / (download_mb_s * 1e6) / 3600,
                     "store_bytes": len(steps) * store_bytes(config["tokens"], hidden, layers),
                     "flops_per_checkpoint": flops, "flops_total": flops * len(steps),
                     "hours": flops * len(steps) / (tflops * 1e12) / 3600})
    return pd.DataFrame(rows)


def format_plan(table: pd.DataFrame, *, tflops: float = DEFAULT_TFLOPS,
                download_mb_s: float = DEFAULT_DOWNLOAD_MB_S) -> str:
    """The plan as a text table with totals and the notes a user needs."""
    from lmdynamics.sources.hub import human_bytes

    head = (f"{'size':>6} {'params':>9} {'steps':>5} {'download':>10} {'dl h':>6} "
            f"{'stores':>10} {'PFLOP/ckpt':>10} {'PFLOP':>8} {'GPU h':>6}  download from")
    lines = [head]
    for r in table.itertuples():
        lines.append(f"{r.size:>6} {r.parameters / 1e6:>8.1f}M {r.steps:>5} "
                     f"{human_bytes(r.download_bytes):>10} {r.download_hours:>6.2f} "
                     f"{human_bytes(r.store_bytes):>10} {r.flops_per_checkpoint / 1e15:>10.3f} "
                     f"{r.flops_total / 1e15:>8.2f} {r.hours:>6.3f}  {r.download_source}")
    lines.append(f"{'total':>6} {'':>9} {int(table.steps.sum()):>5} "
                 f"{human_bytes(table.download_bytes.sum()):>10} "
                 f"{table.download_hours.sum():>6.2f} {human_bytes(table.store_bytes.sum()):>10} "
                 f"{'':>10} {table.flops_total.sum() / 1e15:>8.2f} {table.hours.sum():>6.3f}")
    lines += ["", f"download: bytes fetched from the hub; hours at {download_mb_s:g} MB/s "
              "(--download-mb-s). Weights are deleted after extraction unless "
              "hub.keep_weights; the largest checkpoint x the downloads running at once "
              "(--resources network=N) must fit on disk.",
              "stores: per-pair zarr stores (float32 activations), uncompressed upper bound.",
              "compute: 6 x (parameters - input embedding) x eval tokens per checkpoint, an "
              f"upper bound; GPU hours at {tflops:g} TFLOP/s effective (--tflops)."]
    return "\n".join(lines)


def offline_requested() -> bool:
    """``HF_HUB_OFFLINE`` set to a true value."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")

"""What the Conjecture statistics add to one extraction job.

Builds a randomly initialised GPT-NeoX of a Pythia architecture (or takes a tiny-suite size's
checkpoints), writes step-0, "mid" and "final" checkpoints (mid and final: step 0 plus
Gaussian perturbations, so distances and directions are non-trivial), and times
``extract_checkpoint`` on the mid checkpoint without and with statistics. The statistics'
own time is the ``Conjecture statistics in`` interval logged by the extraction.

Usage::

    python benchmarks/conjecture_overhead.py --arch 160m --device cuda --out result.json
    python benchmarks/conjecture_overhead.py --tiny-dir results/tiny/checkpoints/497k \
        --eval-batch results/tiny/eval_batch.npy --tokens 1024 --threads 1
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
import time
from io import StringIO
from pathlib import Path

import numpy as np
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from lmdynamics.checkpoints import save_checkpoint
from lmdynamics.conjecture import StatsOptions
from lmdynamics.extract import extract_checkpoint

#: Pythia architectures (hidden, layers, heads); vocab 50304, MLP 4x, rotary 25%.
PYTHIA = {"70m": (512, 6, 8), "160m": (768, 12, 12), "410m": (1024, 24, 16),
          "1.4b": (2048, 24, 16), "2.8b": (2560, 32, 32)}


def pythia_checkpoints(arch: str, root: Path) -> tuple[Path, Path, Path]:
    """step-0, mid and final checkpoint directories of a random Pythia-shaped model."""
    hidden, layers, heads = PYTHIA[arch]
    config = GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, intermediate_size=4 * hidden,
                           vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048,
                           use_parallel_residual=True, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    dirs = [root / name for name in ("step0", "mid", "final")]
    save_checkpoint(model, dirs[0])
    with torch.no_grad():
        for d in dirs[1:]:
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            save_checkpoint(model, d)
    return dirs[0], dirs[1], dirs[2]


def timed_extract(checkpoint: Path, batch: Path, out: Path, stats: StatsOptions | None,
                  **kw) -> tuple[float, float]:
    """(wall seconds of the whole job, seconds of the statistics step)."""
    stream = StringIO()
    handler = logging.StreamHandler(stream)
    logging.getLogger("lmdynamics").addHandler(handler)
    logging.getLogger("lmdynamics").setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        extract_checkpoint(checkpoint, batch, out, seed=0, size="bench", step=1,
                           model_name="bench", revision="bench", stats=stats, **kw)
        wall = time.perf_counter() - start
    finally:
        logging.getLogger("lmdynamics").removeHandler(handler)
    found = re.search(r"Conjecture statistics in ([\d.]+)s", stream.getvalue())
    return wall, float(found.group(1)) if found else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(PYTHIA))
    p.add_argument("--tiny-dir", type=Path, help="a tiny size's checkpoints/<size> folder")
    p.add_argument("--eval-batch", type=Path)
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if a.arch:
            init, mid, final = pythia_checkpoints(a.arch, root)
            batch = root / "batch.npy"
            rng = np.random.default_rng(0)
            np.save(batch, rng.integers(0, 50304, (a.sequences, 2049)))
        else:
            steps = sorted(int(d.name[4:]) for d in a.tiny_dir.glob("step*"))
            init, final = a.tiny_dir / "step0", a.tiny_dir / f"step{steps[-1]}"
            mid, batch = a.tiny_dir / f"step{steps[len(steps) // 2]}", a.eval_batch
        stats = StatsOptions(init, final)
        kw = {"tokens": a.tokens, "device": a.device, "dtype": a.dtype}
        rows = []
        for _ in range(a.repeats):  # alternate, so drift hits both alike
            plain, _ = timed_extract(mid, batch, root / "plain.zarr", None, **kw)
            full, stats_s = timed_extract(mid, batch, root / "stats.zarr", stats, **kw)
            rows.append({"without": plain, "with": full, "stats": stats_s})
    result = {"arch": a.arch or str(a.tiny_dir), "device": a.device, "dtype": a.dtype,
              "threads": torch.get_num_threads(), "runs": rows,
              "median_without_s": float(np.median([r["without"] for r in rows])),
              "median_with_s": float(np.median([r["with"] for r in rows])),
              "median_stats_s": float(np.median([r["stats"] for r in rows]))}
    a.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

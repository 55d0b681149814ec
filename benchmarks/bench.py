"""lmdynamics against the machine's own ceiling: extraction, reduction, Gram-form CKA, tiny DAG.

One run measures and prints, as ratios against rates measured in the same run:

1. **Extraction** of one checkpoint of a Pythia architecture (random weights built locally,
   ``--sequences`` x ``--seq-len`` tokens) through
   :func:`lmdynamics.extraction.extract.extract_checkpoint`
   on checkpoints saved to a temporary directory, with the Conjecture statistics (the
   workflow's default: first in the process, then again, warm) and without. Achieved FLOP/s
   of the forward+backward pass over the device's own GEMM rate in ``--dtype`` (a large
   ``torch.matmul``). FLOPs are counted analytically by :func:`pass_flops`:

   - forward: ``2 T P`` + ``4 L S T_seq^2 d``, with ``T`` = S x T_seq tokens, ``P`` the
     parameters of every matmul (per layer ``3d^2 + d^2 + 2 d i``; the unembedding ``d V``;
     the embedding lookup is no matmul) and the attention term the full ``QK^T`` and
     ``PV`` products (PaLM's convention: no causal discount). A causal kernel (sdpa, the
     default) visits only ``T_seq (T_seq + 1) / 2`` of the ``T_seq^2`` pairs, so the ratio
     is also printed with that stricter count;
   - backward with every parameter's gradient (the Conjecture statistics need them):
     twice the forward, so ``6 T P + 12 L S T_seq^2 d`` in all;
   - backward with the write matrices' gradients only (statistics off): input gradients of
     the unembedding and of layers 1..L-1 (matmuls and attention), plus the weight gradients
     of the write matrices ``2 T L (d^2 + i d)``; layer 0 needs no input gradient.

2. **Reduction** of one size through :func:`lmdynamics.reduction.metrics.reduce_size` on real zarr
   stores written with the extraction's own writer (``--steps`` steps, L layers x 2
   components, ``--reduce-tokens`` N tokens of width D), with the workflow's default CKA
   options (both estimators, pairwise, B=1000 sequence-bootstrap) and no other measure
   (``benchmarks/measures.py`` times those against this), over the GEMM floor of
   its products at the measured float64 GEMM rate (numpy, as the reduction runs). Floor per
   (component, layer), counting a symmetric product (``X'X``, ``XX'``) as half a GEMM:
   ``min(N D^2 S^2, S N^2 D + N^2 S(S+1)/2)`` for the pairwise CKA (feature or Gram route)
   plus ``3 N D^2 S`` for the bootstrap's per-sequence products (self and cross per step).
3. The same CKA (both estimators, each step against the final one) through a straightforward
   Gram-form implementation (N x N Gram matrices, as Kornblith et al.'s reference code):
   its time over ours.
4. The tiny DAG (``snakemake --cores N --configfile config/tiny.yaml``, N = ``--cores``,
   default every core; ``--skip-dag`` leaves it out) from a clean copy of the checkout (its
   git-tracked and unignored files: no results/, no .snakemake/): its wall time; its jobs'
   **work**, the CPU time (user + system) of every job's processes, measured exactly as the
   CPU time of Snakemake's waited-for children less Snakemake's own; the **overhead ratio**
   ``wall / (work / cores)`` (1: no per-job cost beyond the jobs' own CPU time and every core
   busy throughout); the training's share (its longest job's wall time over the DAG's, from
   Snakemake's ``benchmark:`` files: training sets the DAG's critical path); per rule, its
   jobs and their wall time; and that no process of the run is left once it has finished.
   Then the default test command (``python -m pytest``) in the same copy, its wall time
   (``--skip-pytest`` leaves it out).
5. Contention (``--contention``): a plain transformers forward+backward pass and the
   extraction's pass (with statistics) of a small Pythia-70m-shaped batch, each in a fresh
   process on ``--threads`` threads, on the machine as it is and beside ``--load-procs`` busy
   loops; each pass's slowdown under that load, with the threads left to the libraries'
   defaults and pinned by :func:`lmdynamics.threads.pin_threads` (as ``lmdynamics extract`` and
   this script do); ``--repeats N`` runs each N times and reports medians.

Threads: this script pins its own threads like the workflow's commands that run a model do
(:func:`lmdynamics.threads.pin_threads`, ``--threads``, default: every core), before numpy and
torch load: torch on ``--threads``, numpy's OpenBLAS on one thread (as every workflow job,
whose ``threads`` is 1) unless ``OPENBLAS_NUM_THREADS`` is set; the reduction section and its
float64 GEMM rate use that same OpenBLAS pool.

    python benchmarks/bench.py                       # CPU: 70m, float32, 8 x 2048
    python benchmarks/bench.py --quick               # a smoke run in about a minute
    python benchmarks/bench.py --arch 1.4b --device cuda --dtype bfloat16 --skip-dag
    python benchmarks/bench.py --skip-extraction --skip-reduction --contention
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from io import StringIO
from pathlib import Path

from lmdynamics.threads import THREAD_VARIABLES, pin_threads


def _threads_argument(argv: list[str]) -> int:
    """``--threads`` of the command line, before numpy and torch load (default: every core)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--_unpinned", action="store_true")
    known, _ = p.parse_known_args(argv)
    return 0 if known._unpinned else known.threads


pin_threads(_threads_argument(sys.argv[1:]))

import numpy as np  # noqa: E402  (after pin_threads: thread variables are read at load)
import torch  # noqa: E402
import xarray as xr  # noqa: E402
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM  # noqa: E402

from lmdynamics.estimators.sparsity import ELEMENT_STATS  # noqa: E402
from lmdynamics.extraction.conjecture import StatsOptions  # noqa: E402
from lmdynamics.extraction.extract import (  # noqa: E402
    ExtractionOptions,
    activation_encoding,
    extract_checkpoint,
    extraction_dataset,
    sample_token_positions,
)
from lmdynamics.extraction.names import MEASURE_INPUTS  # noqa: E402
from lmdynamics.extraction.passes import Extraction  # noqa: E402
from lmdynamics.extraction.reference import build_reference  # noqa: E402
from lmdynamics.interventions.machine import machine_facts  # noqa: E402
from lmdynamics.reduction.cka import CKAOptions, cka_dataset  # noqa: E402
from lmdynamics.reduction.measures import MeasureOptions  # noqa: E402
from lmdynamics.reduction.metrics import reduce_size  # noqa: E402
from lmdynamics.sources.checkpoints import save_checkpoint  # noqa: E402
from lmdynamics.store import write_store  # noqa: E402

#: Pythia architectures (hidden, layers, heads); vocab 50304, MLP 4x, rotary 25%.
PYTHIA = {"70m": (512, 6, 8), "160m": (768, 12, 12), "410m": (1024, 24, 16),
          "1.4b": (2048, 24, 16), "2.8b": (2560, 32, 32)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------ machine

def machine() -> str:
    """CPU model, cores, torch threads, GPU (if any), date."""
    cpu = machine_facts("cpu")["cpu"] or "unknown CPU"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    pinned = ", ".join(f"{k}={os.environ[k]}" for k in ("OMP_WAIT_POLICY", *THREAD_VARIABLES)
                       if k in os.environ)
    return (f"{datetime.datetime.now().isoformat(timespec='minutes')}; CPU {cpu}, "
            f"{os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()}"
            f" threads ({torch.get_num_interop_threads()} inter-op; {pinned or 'not pinned'});"
            f" GPU {gpu}; load average {load:.2f} at start")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(device: str, dtype: torch.dtype, n: int, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` (n x n) @ (n x n) torch matmuls (2 n^3 FLOPs)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def numpy_gemm_rate(n: int, repeats: int = 3) -> float:
    """FLOP/s of the best of ``repeats`` float64 numpy (n x n) @ (n x n) (the reduction's BLAS)."""
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(n, n)), rng.normal(size=(n, n))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# --------------------------------------------------------------------------- extraction

def pythia_config(arch: str) -> GPTNeoXConfig:
    """A Pythia architecture's GPT-NeoX config (Pythia's shapes, untied embeddings)."""
    hidden, layers, heads = PYTHIA[arch]
    return GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=4 * hidden,
                         vocab_size=50304, rotary_pct=0.25, max_position_embeddings=2048,
                         use_parallel_residual=True, tie_word_embeddings=False)


def pythia_checkpoints(arch: str, root: Path) -> tuple[Path, Path, Path]:
    """step-0, mid and final checkpoint directories of a random Pythia-shaped model (mid and
    final: step 0 plus Gaussian perturbations, so the statistics' distances are non-trivial)."""
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(pythia_config(arch))
    dirs = [root / name for name in ("step0", "mid", "final")]
    save_checkpoint(model, dirs[0])
    with torch.no_grad():
        for d in dirs[1:]:
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            save_checkpoint(model, d)
    return dirs[0], dirs[1], dirs[2]


def reference_options(init: Path, final: Path, root: Path) -> StatsOptions:
    """The statistics' options with the reference store of ``init`` and ``final`` (built once
    here, as the workflow's reference job does once per size; not part of any timing)."""
    top_k = StatsOptions(root).top_k
    store = root / "reference.zarr"
    if not store.exists():
        build_reference(init, final, store, size="bench", top_k=top_k)
    return StatsOptions(store, top_k=top_k)


def pass_flops(cfg: GPTNeoXConfig, sequences: int, seq_len: int, all_grads: bool,
               causal: bool = False) -> float:
    """FLOPs of one forward+backward pass (formula in the module docstring); ``causal``
    counts only the ``T(T+1)/2`` query-key pairs a causal kernel must visit."""
    d, i, n_layers, vocab = (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
                             cfg.vocab_size)
    tokens = sequences * seq_len
    layer_params = 3 * d * d + d * d + 2 * d * i
    matmul_fwd = 2 * tokens * layer_params
    pairs = seq_len * (seq_len + 1) / 2 if causal else seq_len**2
    attention_fwd = 4 * sequences * pairs * d  # QK^T and PV, every head
    head_fwd = 2 * tokens * d * vocab
    forward = n_layers * (matmul_fwd + attention_fwd) + head_fwd
    if all_grads:
        return 3 * forward
    # input gradients: one matmul each; attention's backward (dQ, dK, dV, dP) twice forward
    input_grads = head_fwd + (n_layers - 1) * (matmul_fwd + 2 * attention_fwd)
    write_weight_grads = 2 * tokens * n_layers * (d * d + i * d)
    return forward + input_grads + write_weight_grads


_INTERVALS = {"load": r"loaded .* in ([\d.]+)s", "pass": r"forward\+backward pass in ([\d.]+)s",
              "stats": r"Conjecture statistics in ([\d.]+)s", "total": r"wrote .* in ([\d.]+)s"}


def timed_extract(checkpoint: Path, batch: Path, out: Path, stats: StatsOptions | None,
                  **kw) -> dict[str, float]:
    """Seconds of the whole job and of its logged parts (load, pass, stats, total)."""
    stream = StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("lmdynamics")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        start = time.perf_counter()
        extract_checkpoint(checkpoint, batch, out, seed=0, size="bench", step=1,
                           model_name="bench", revision="bench", stats=stats, **kw)
        wall = time.perf_counter() - start
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    found = {k: re.search(p, text) for k, p in _INTERVALS.items()}
    return {"wall": wall, **{k: float(m.group(1)) if m else 0.0 for k, m in found.items()}}


def bench_extraction(a: argparse.Namespace, root: Path) -> None:
    cfg = pythia_config(a.arch)
    init, mid, final = pythia_checkpoints(a.arch, root)
    batch = root / "batch.npy"
    np.save(batch, np.random.default_rng(0).integers(0, cfg.vocab_size,
                                                     (a.sequences, a.seq_len + 1)))
    tokens = min(4096, a.sequences * a.seq_len)
    kw = {"tokens": tokens, "options": ExtractionOptions(device=a.device, dtype=a.dtype)}
    print(f"\n## 1. extraction: pythia-{a.arch} architecture, {a.sequences} x {a.seq_len} "
          f"tokens, {a.dtype} on {a.device}, {tokens} sampled tokens")
    stats_options = reference_options(init, final, root)
    # The first pass in a process also pays one-time costs (CUDA's lazy kernel loading and
    # cuBLAS set-up, the allocator's first growth); the second, "warm", is the steady state
    # a process that extracts many checkpoints (the tiny suite's extraction job) sees.
    for label, stats in (("with Conjecture statistics (default; first in process)",
                          stats_options),
                         ("with Conjecture statistics again (warm pass)", stats_options),
                         ("without statistics", None)):
        rate0 = gemm_rate(a.device, DTYPES[a.dtype], a.gemm_n)
        t = timed_extract(mid, batch, root / "store.zarr", stats, **kw)
        rate = max(rate0, gemm_rate(a.device, DTYPES[a.dtype], a.gemm_n))
        flops = pass_flops(cfg, a.sequences, a.seq_len, all_grads=stats is not None)
        causal = pass_flops(cfg, a.sequences, a.seq_len, all_grads=stats is not None,
                            causal=True)
        achieved = flops / t["pass"]
        print(f"- {label}: pass {t['pass']:.2f} s, {flops / 1e12:.3f} TFLOP -> "
              f"{achieved / 1e9:.1f} GFLOP/s; {a.dtype} GEMM {rate / 1e9:.1f} GFLOP/s; "
              f"**ratio {achieved / rate:.2f}** (target >= 0.7 on CPU); counting only the "
              f"causal half of attention ({causal / 1e12:.3f} TFLOP) "
              f"**{causal / t['pass'] / rate:.2f}**. Whole job "
              f"{t['wall']:.1f} s (load {t['load']:.1f}, statistics {t['stats']:.1f}, "
              f"job FLOP/s over GEMM {flops / t['wall'] / rate:.2f})")


# ---------------------------------------------------------------------------- reduction

def measure_inputs(layers: int, n: int, d: int, heads: int,
                   rng: np.random.Generator) -> xr.Dataset:
    """Synthetic per-pair variables of the measures' data (lmdynamics.extraction.measure_data)
    of the right shapes: spectra of the activations and OV circuits, element statistics."""
    def spectrum(*shape: int) -> np.ndarray:
        return np.sort(rng.random(shape))[..., ::-1].copy()

    counts = {"weights": (d * d, 4 * d * d), "gradients": (d * d, 4 * d * d),
              "activations": (n * d, n * d)}
    data = {}
    for kind, per_component in counts.items():
        stats = np.empty((2, layers, len(ELEMENT_STATS)))
        for ci, count in enumerate(per_component):
            l1 = 0.8 * count
            stats[ci] = [count, l1, np.sqrt(count), 4.0, 0.4 * count * l1]
        data[MEASURE_INPUTS["elements", kind]] = (("component", "layer", "element_stat"),
                                                  stats)
    data[MEASURE_INPUTS["spectrum", "activations"]] = (("component", "layer", "act_k"),
                                                       spectrum(2, layers, min(n, d)))
    data[MEASURE_INPUTS["spectrum", "ov_circuit"]] = (("layer", "head", "ov_k"),
                                                      spectrum(layers, heads, d // heads))
    return xr.Dataset(data, coords={"element_stat": list(ELEMENT_STATS)})


def write_size_stores(root: Path, steps: int, layers: int, n: int, d: int,
                      sequences: int, measure_data: bool = False) -> list[Path]:
    """``steps`` per-pair stores of one synthetic size through the extraction's writer; with
    ``measure_data``, the measures' data too (:func:`measure_inputs`)."""
    rng = np.random.default_rng(0)
    seq_idx, pos_idx = sample_token_positions(sequences, max(n // sequences, 1) * 4, n, 0)
    final = rng.normal(size=(2, layers, n, d)).astype(np.float32)
    paths = []
    for step in range(steps):
        noise = rng.normal(size=final.shape).astype(np.float32)
        acts = final + (steps - 1 - step) * 0.3 * noise
        sv = np.sort(rng.random((2, layers, d)))[..., ::-1].copy()
        ds = extraction_dataset(Extraction(acts, sv, sv, 2.0), seq_idx, pos_idx, {
            "model": "bench", "revision": f"step{step}", "size": "bench", "step": step,
            "dtype": "float32", "hidden_size": d, "num_attention_heads": 8,
            "intermediate_size": 4 * d, "num_layers": layers, "n_params": 1,
            "weights_sha256": f"{step:064d}", "token_seed": 0})
        if measure_data:
            ds = ds.merge(measure_inputs(layers, n, d, 8, rng))
        path = root / f"step{step}.zarr"
        write_store(ds, path, encoding=activation_encoding(acts.shape))
        paths.append(path)
    return paths


def reduction_floor(n: int, d: int, s: int, bootstrap: bool) -> float:
    """GEMM FLOPs per (component, layer) (module docstring)."""
    pairwise = min(n * d * d * s * s, s * n * n * d + n * n * s * (s + 1) / 2)
    return pairwise + (3 * n * d * d * s if bootstrap else 0)


def gram_form_cka(xs: list[np.ndarray], final: int) -> tuple[np.ndarray, np.ndarray]:
    """Biased and debiased CKA of every step vs ``xs[final]`` from N x N Gram matrices.

    Straightforward reference form (Kornblith et al. 2019's ``gram_linear`` and
    ``center_gram``, unbiased centring after Song et al. 2012), float64.
    """
    def grams(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        k = x @ x.T
        n = k.shape[0]
        biased = k - k.mean(0, keepdims=True) - k.mean(1, keepdims=True) + k.mean()
        u = k.copy()
        np.fill_diagonal(u, 0)
        means = u.sum(0) / (n - 2)
        means -= means.sum() / (2 * (n - 1))
        u -= means[:, None] + means[None, :]
        np.fill_diagonal(u, 0)
        return biased, u

    ref_b, ref_u = grams(xs[final])
    out_b, out_u = np.empty(len(xs)), np.empty(len(xs))
    for si, x in enumerate(xs):
        kb, ku = grams(x)
        out_b[si] = np.vdot(kb, ref_b) / np.sqrt(np.vdot(kb, kb) * np.vdot(ref_b, ref_b))
        out_u[si] = np.vdot(ku, ref_u) / np.sqrt(np.vdot(ku, ku) * np.vdot(ref_u, ref_u))
    return out_b, out_u


def bench_reduction(a: argparse.Namespace, root: Path) -> None:
    n, d, s, layers = a.reduce_tokens, a.reduce_dim, a.steps, a.reduce_layers
    print(f"\n## 2. reduction of one size: {s} steps, {layers} layers x 2 components, "
          f"N={n} tokens from {a.reduce_sequences} sequences, D={d}")
    paths = write_size_stores(root / "stores", s, layers, n, d, a.reduce_sequences)
    options = CKAOptions(bootstrap_samples=a.bootstrap, bootstrap_level=0.9)
    rate = numpy_gemm_rate(2048)
    t = time.perf_counter()
    reduce_size(paths, root / "metrics.zarr", final_step=s - 1, cka_options=options,
                measure_options=MeasureOptions(()))  # CKA and PER: benchmarks/measures.py
    wall = time.perf_counter() - t
    rate = max(rate, numpy_gemm_rate(2048))
    floor = 2 * layers * reduction_floor(n, d, s, a.bootstrap > 0) / rate
    print(f"- reduce_size, defaults (both estimators, pairwise, bootstrap B={a.bootstrap}): "
          f"{wall:.1f} s; float64 GEMM {rate / 1e9:.1f} GFLOP/s; GEMM floor {floor:.1f} s; "
          f"**time over floor {wall / floor:.2f}** (target <= 2)")
    # breakdown on one (component, layer), in memory
    acts = {k: xr.open_zarr(p, consolidated=False).activations.isel(
        component=[0], layer=[0]).load() for k, p in enumerate(paths)}
    seqs = xr.open_zarr(paths[-1], consolidated=False).sequence.values
    times = {}
    for label, boot in (("pairwise + point", 0), (f"with bootstrap B={a.bootstrap}", a.bootstrap)):
        t = time.perf_counter()
        cka_dataset(acts, seqs, final_step=s - 1, size="bench",
                    options=CKAOptions(bootstrap_samples=boot))
        times[label] = time.perf_counter() - t
    one = {k: reduction_floor(n, d, s, k != "pairwise + point") / rate for k in times}
    print("- per (component, layer): " + "; ".join(
        f"{k} {v:.2f} s (floor {one[k]:.2f} s, ratio {v / one[k]:.2f})"
        for k, v in times.items()))
    # 3. the same CKA (vs the final step) in Gram form
    xs = [acts[k].values[0, 0].astype(np.float64) for k in sorted(acts)]
    xs = [x - x.mean(0) for x in xs]
    t = time.perf_counter()
    gram_b, gram_u = gram_form_cka(xs, s - 1)
    t_gram = time.perf_counter() - t
    ours = cka_dataset(acts, seqs, final_step=s - 1, size="bench", options=CKAOptions())
    err = max(np.nanmax(np.abs(ours.cka.values[0, 0] - gram_b)),
              np.nanmax(np.abs(ours.cka_debiased.values[0, 0] - gram_u)))
    base = times["pairwise + point"]
    print(f"\n## 3. Gram-form (N x N) CKA of every step vs the final one, per (component, "
          f"layer): {t_gram:.2f} s; ours (which adds every pair) {base:.2f} s; **speed-up "
          f"{t_gram / base:.1f}x**; largest difference {err:.1e}")


# -------------------------------------------------------------------------------- DAG

def clean_copy(dest: Path) -> Path:
    """The checkout's git-tracked and unignored files copied to ``dest`` (what a fresh clone
    holds, with uncommitted edits): no results/, .snakemake/ or caches."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


#: Runs ``snakemake`` (arguments after the first) and writes its own CPU time, without its
#: children's, to the file named by the first argument when it exits.
_SNAKEMAKE = """
import atexit, resource, sys
out = sys.argv.pop(1)
sys.argv[0] = "snakemake"
def own():
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(out, "w") as f:
        f.write(str(r.ru_utime + r.ru_stime))
atexit.register(own)
from snakemake.cli import main
main()
"""


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's finished, waited-for descendants."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def processes_in(folder: Path) -> list[str]:
    """Processes (pid and command) whose working directory or command line is in ``folder``."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            cwd = os.readlink(proc / "cwd")
        except OSError:
            continue
        if int(proc.name) != os.getpid() and (str(folder) in cmdline
                                              or cwd.startswith(str(folder))):
            found.append(f"{proc.name} {cmdline[:120]}")
    return found


def rule_walls(results: Path) -> dict[str, list[float]]:
    """Wall seconds of every job of a finished run by rule: its ``benchmark:`` file, else the
    span of its log's timestamps (a job's log starts once Python has started)."""
    walls: dict[str, list[float]] = {}
    for log in sorted((results / "logs").rglob("*.log")):
        rel = log.relative_to(results / "logs").with_suffix("")
        bench = results / "benchmarks" / rel.with_suffix(".tsv")
        if bench.is_file():
            seconds = float(bench.read_text().splitlines()[1].split("\t")[0])
        else:
            stamps = [datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f")
                      for line in log.read_text(errors="replace").splitlines()
                      if (m := _STAMP.match(line))]
            if not stamps:
                continue
            seconds = (stamps[-1] - stamps[0]).total_seconds()
        walls.setdefault(rel.parts[0], []).append(seconds)
    return walls


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def bench_dag(a: argparse.Namespace, root: Path) -> None:
    """Section 4: the tiny DAG, then the default test command, in one clean copy."""
    cores = os.cpu_count() if a.cores == "all" else int(a.cores)
    work = clean_copy(root / "dag")
    env = {**os.environ, "PYTHONPATH": str(work / "src")}
    for name in ("OMP_WAIT_POLICY", *THREAD_VARIABLES):  # the jobs get Snakemake's own
        env.pop(name, None)
    args = ["--cores", str(cores), "--configfile", "config/tiny.yaml"]
    if a.quick:  # (--config would pass the steps as strings)
        (work / "config/quick.yaml").write_text(
            'sizes: ["42k"]\nsteps: [0, 64, 512]\ntokens: 256\n')
        args.append("config/quick.yaml")
    own = root / "snakemake-cpu.txt"
    load = os.getloadavg()[0]
    cpu0, t = children_cpu(), time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _SNAKEMAKE, str(own), *args, "--quiet",
                           "rules"], cwd=work, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t, children_cpu() - cpu0
    if done.returncode:
        sys.exit(f"tiny DAG failed:\n{done.stderr[-3000:]}")
    left = processes_in(work)
    snakemake_cpu = float(own.read_text())
    jobs_cpu = cpu - snakemake_cpu
    walls = rule_walls(work / "results/tiny")
    training = max(walls.get("train_tiny", [0.0]))
    print(f"\n## 4. tiny DAG from a clean copy (snakemake {' '.join(args)}), first run: "
          f"**{wall:.0f} s** wall (load average {load:.2f} before, {os.getloadavg()[0]:.2f} "
          f"after)")
    print(f"- work: the jobs' CPU time {jobs_cpu:.0f} s (Snakemake itself {snakemake_cpu:.0f} "
          f"s); **overhead ratio wall / (work / {cores} cores) = "
          f"{wall / (jobs_cpu / cores):.2f}** (target <= 1.15)")
    print(f"- training: the longest job {training:.0f} s, **{training / wall:.0%} of the "
          f"wall time**; all training jobs {sum(walls.get('train_tiny', [])):.0f} s")
    print("- per rule: jobs, wall time in all (median job)")
    for rule, seconds in sorted(walls.items(), key=lambda kv: -sum(kv[1])):
        print(f"  - {rule}: {len(seconds)}, {sum(seconds):.1f} s ({np.median(seconds):.2f} s)")
    print(f"- processes of the run left after it: {'; '.join(left) if left else 'none'}")
    if a.skip_pytest:
        return
    load = os.getloadavg()[0]
    t = time.perf_counter()
    tests = subprocess.run([sys.executable, "-m", "pytest"], cwd=work, env=env,
                           capture_output=True, text=True)
    wall = time.perf_counter() - t
    summary = (tests.stdout.strip().splitlines() or ["(no output)"])[-1]
    print(f"\n## 4b. default tests (python -m pytest) in the same copy: **{wall:.0f} s** wall "
          f"(target <= 480 s; load average {load:.2f} before); exit {tests.returncode}: "
          f"{summary}")


# ---------------------------------------------------------------------------- contention

def contention_pass(kind: str, root: Path) -> dict[str, float]:
    """One pass in this process (``--_pass``): ``plain`` (transformers' own loss and
    backward) or ``extract`` (the extraction with statistics); seconds of the pass (and
    the statistics)."""
    batch = root / "batch.npy"
    if kind == "plain":
        model = GPTNeoXForCausalLM.from_pretrained(root / "mid", attn_implementation="sdpa")
        ids = torch.from_numpy(np.load(batch)).long()[:, :-1]
        t = time.perf_counter()
        model(ids, labels=ids).loss.backward()
        return {"pass": time.perf_counter() - t}
    timed = timed_extract(root / "mid", batch, root / f"store-{os.getpid()}.zarr",
                          reference_options(root / "step0", root / "final", root),
                          tokens=128)
    return {"pass": timed["pass"] + timed["stats"], "wall": timed["wall"]}


def bench_contention(a: argparse.Namespace, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    pythia_checkpoints("70m", root)
    reference_options(root / "step0", root / "final", root)  # once, before the passes start
    np.save(root / "batch.npy", np.random.default_rng(0).integers(0, 50304, (1, 257)))
    print(f"\n## 5. contention: pythia-70m shape, 1 x 256 tokens, {a.threads} threads, "
          f"alone and beside {a.load_procs} busy loops (load average "
          f"{os.getloadavg()[0]:.2f} at start)")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    for name in ("OMP_WAIT_POLICY", *THREAD_VARIABLES):  # as a shell without them
        env.pop(name, None)

    def run(kind: str, pinned: bool) -> float:
        cmd = [sys.executable, __file__, "--_pass", kind, "--_root", str(root),
               "--threads", str(a.threads)] + ([] if pinned else ["--_unpinned"])
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1].split()[1])

    rows = {}
    for pinned in (False, True):
        for kind in ("plain", "extract"):
            alones = [run(kind, pinned) for _ in range(a.repeats)]
            busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    for _ in range(a.load_procs)]
            try:
                loadeds = [run(kind, pinned) for _ in range(a.repeats)]
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
            alone, loaded = float(np.median(alones)), float(np.median(loadeds))
            rows[pinned, kind] = (alone, loaded)
            each = (f" (each: {', '.join(f'{t:.2f}' for t in alones)} / "
                    f"{', '.join(f'{t:.2f}' for t in loadeds)})" if a.repeats > 1 else "")
            print(f"- {'pinned' if pinned else 'library defaults'}, {kind} pass: "
                  f"{alone:.2f} s alone, {loaded:.2f} s loaded: **{loaded / alone:.2f}x**{each}")
    for pinned in (False, True):
        (pa, pl), (ea, el) = rows[pinned, "plain"], rows[pinned, "extract"]
        print(f"- {'pinned' if pinned else 'library defaults'}: the extraction's slowdown "
              f"over the plain pass's **{(el / ea) / (pl / pa):.2f}**")


def reduction_arguments(p: argparse.ArgumentParser) -> None:
    """The 70m-shaped reduction benchmark's data (section 2): steps, layers, N, D, sequences,
    and the bootstrap's resamples."""
    p.add_argument("--steps", type=int, default=27)
    p.add_argument("--reduce-layers", type=int, default=6)
    p.add_argument("--reduce-tokens", type=int, default=4096)
    p.add_argument("--reduce-dim", type=int, default=512)
    p.add_argument("--reduce-sequences", type=int, default=8)
    p.add_argument("--bootstrap", type=int, default=1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(PYTHIA), default="70m")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--gemm-n", type=int, default=None, help="GEMM size (default 2048 on "
                   "CPU, 8192 on GPU)")
    reduction_arguments(p)
    p.add_argument("--cores", default="all")
    p.add_argument("--skip-extraction", action="store_true")
    p.add_argument("--skip-reduction", action="store_true")
    p.add_argument("--skip-dag", action="store_true")
    p.add_argument("--skip-pytest", action="store_true",
                   help="section 4 without the default test command")
    p.add_argument("--quick", action="store_true", help="smoke mode: 1 x 256 tokens, "
                   "5 steps x 1 layer of N=512, D=64, a reduced DAG")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of this process (pinned before numpy and torch load)")
    p.add_argument("--contention", action="store_true", help="run section 5")
    p.add_argument("--load-procs", type=int, default=os.cpu_count() or 1,
                   help="busy loops beside the contention passes")
    p.add_argument("--repeats", type=int, default=1,
                   help="contention: runs of each pass alone and loaded (medians reported)")
    p.add_argument("--_unpinned", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_pass", choices=("plain", "extract"), help=argparse.SUPPRESS)
    p.add_argument("--_root", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a._pass:
        print(a._pass, contention_pass(a._pass, a._root)["pass"])
        return
    if a.quick:
        a.sequences, a.seq_len, a.steps, a.reduce_layers = 1, 256, 5, 1
        a.reduce_tokens, a.reduce_dim, a.bootstrap = 512, 64, 50
    a.gemm_n = a.gemm_n or (8192 if a.device == "cuda" else 2048)
    print(f"# lmdynamics benchmark\n{machine()}")
    with tempfile.TemporaryDirectory(prefix="lmdynamics-bench-") as tmp:
        root = Path(tmp)
        if not a.skip_extraction:
            bench_extraction(a, root)
        if not a.skip_reduction:
            bench_reduction(a, root)
        if not a.skip_dag:
            bench_dag(a, root)
        if a.contention:
            bench_contention(a, root / "contention")


if __name__ == "__main__":
    main()

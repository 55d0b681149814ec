"""Extraction and reduction measured against this machine's own ceilings (issue 7).

One run measures and prints, as ratios:

1. extraction of one checkpoint of a Pythia architecture (random weights, built locally;
   default 70m, 8 sequences x 2048 tokens): achieved FLOP/s of the forward and backward pass
   over the machine's own GEMM FLOP/s (float32 on CPU, the model dtype on a GPU) measured in
   the same run; also the whole ``extract_checkpoint`` job (load, pass, singular values,
   Conjecture statistics, store) in seconds;
2. reduction of one size (default 27 steps, 6 layers x 2 components, 4096 tokens from 8
   sequences, D = 512) through :func:`lmdynamics.cka_reduce.cka_dataset` with the workflow's
   defaults (both estimators, pairwise CKA, 1000 sequence-bootstrap resamples): time over the
   float64 GEMM floor of the products it must form;
3. the CKA of every step against the final step through a straightforward Gram-form (N x N)
   implementation, against ours (feature space, the final step centred once): the speed-up;
4. wall time of the tiny DAG from an empty ``results/`` (``--skip-dag`` leaves it out).

FLOPs of one pass (stated, not measured): forward = 2 x (non-embedding parameters + the
unembedding) x tokens + 4 x layers x tokens x sequence length x hidden (QK' and AV over the
full causal matrix, as eager attention computes it); forward + backward = 3 x forward.

    python benchmarks/bench.py                      # CPU, the issue's shapes
    python benchmarks/bench.py --quick --skip-dag   # seconds: small shapes
    python benchmarks/bench.py --device cuda --dtype bfloat16 --arch 410m --skip-reduction
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xarray as xr

sys.path.insert(0, str(Path(__file__).parent))
from conjecture_overhead import PYTHIA, pythia_checkpoints, timed_extract  # noqa: E402

from lmdynamics.checkpoints import load_model  # noqa: E402
from lmdynamics.cka_reduce import CKAOptions, cka_dataset  # noqa: E402
from lmdynamics.conjecture import StatsOptions  # noqa: E402
from lmdynamics.extract import (  # noqa: E402
    DTYPES,
    only_write_weights_train,
    run_pass_fitting,
    sample_token_positions,
)
from lmdynamics.metrics import CKAReference, linear_cka_to_reference  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
VOCAB = 50304


def machine() -> str:
    """CPU model, cores, torch threads and GPU (if any), in one line."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), {gpu}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def gemm_rate(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n x n matmul (2 n^3 FLOPs) in ``dtype`` on ``device``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def pass_flops(arch: str, sequences: int, seq_len: int) -> float:
    """Forward + backward FLOPs of one pass (module docstring)."""
    hidden, layers, _ = PYTHIA[arch]
    tokens = sequences * seq_len
    block = 12 * hidden * hidden  # qkv 3D^2 + dense D^2 + MLP 8D^2 (weights, per layer)
    forward = 2 * (layers * block + hidden * VOCAB) * tokens
    forward += 4 * layers * tokens * seq_len * hidden
    return 3.0 * forward


def bench_extraction(arch: str, device: str, dtype: str, sequences: int, seq_len: int,
                     repeats: int, with_stats: bool) -> list[str]:
    ceiling = gemm_rate(DTYPES[dtype] if device == "cuda" else torch.float32, device)
    flops = pass_flops(arch, sequences, seq_len)
    rng = np.random.default_rng(0)
    batch = torch.as_tensor(rng.integers(0, VOCAB, (sequences, seq_len)))
    tokens = min(4096, sequences * seq_len // 2)
    seq_idx, pos_idx = sample_token_positions(sequences, seq_len, tokens, seed=0)
    lines = [f"GEMM ceiling ({'float32' if device == 'cpu' else dtype}, {device}): "
             f"{ceiling / 1e9:.1f} GFLOP/s"]
    with tempfile.TemporaryDirectory() as tmp:
        init, mid, final = pythia_checkpoints(arch, Path(tmp))
        variants = [("write matrices' gradients only", False)]
        if with_stats:
            variants.append(("every gradient (Conjecture statistics on)", True))
        for label, all_grads in variants:
            model = load_model(mid, dtype=DTYPES[dtype], device=torch.device(device))
            if not all_grads:
                only_write_weights_train(model)
            run_pass_fitting(model, batch[:1], seq_idx[seq_idx < 1], pos_idx[seq_idx < 1])
            times = []
            for _ in range(repeats):
                sync(device)
                t = time.perf_counter()
                run_pass_fitting(model, batch, seq_idx, pos_idx)
                sync(device)
                times.append(time.perf_counter() - t)
            best = min(times)
            lines.append(f"(1) {arch} {dtype} pass, {label}: {best:.2f} s, "
                         f"{flops / best / 1e9:.1f} GFLOP/s = {flops / best / ceiling:.2f} "
                         f"x the GEMM ceiling ({flops / 1e9:.0f} GFLOP per pass)")
            del model
        np.save(Path(tmp) / "batch.npy", batch.numpy())
        jobs = [("without statistics", None)]
        if with_stats:
            jobs.append(("with statistics", StatsOptions(init, final)))
        for label, stats in jobs:
            wall, stat_s = timed_extract(mid, Path(tmp) / "batch.npy",
                                         Path(tmp) / f"{label}.zarr", stats, tokens=tokens,
                                         device=device, dtype=dtype)
            lines.append(f"(1) whole extract_checkpoint job {label}: {wall:.2f} s"
                         + (f" (statistics {stat_s:.2f} s)" if stats else ""))
    return lines


def synthetic_size(n: int, d: int, steps: int, layers: int) -> dict[int, xr.DataArray]:
    """Activations (component, layer, token, dim) float32 of ``steps`` steps drifting towards
    the last one, as a per-size reduction reads them from the stores."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, layers, n, d)).astype(np.float32)
    return {s: xr.DataArray(base + (steps - 1 - s) * 0.2 * rng.normal(size=base.shape)
                            .astype(np.float32), dims=("component", "layer", "token", "dim"),
                            coords={"component": ["attention", "mlp"]})
            for s in range(steps)}


def reduction_floor(n: int, d: int, steps: int, groups: int, samples: int) -> float:
    """GEMM FLOPs per (component, layer): the pairwise inner products by the cheaper route
    (as :func:`lmdynamics.cka.gram_inner_products` picks), plus the bootstrap's per-group
    cross-products of each step with the final one and with itself (2 n d^2 each) and the
    resample contractions (2 x 2 B G^2)."""
    pairs = steps * (steps + 1) / 2
    feature = pairs * 2 * n * d * d
    gram = steps * 2 * n * n * d + pairs * 2 * n * n
    boot = steps * 2 * (2 * n * d * d + 2 * samples * groups * groups) if samples else 0.0
    return min(feature, gram) + boot


def naive_gram_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA as HSIC of centred N x N Gram matrices, recomputed for every pair."""
    k, ell = x @ x.T, y @ y.T
    k = k - k.mean(0) - k.mean(1)[:, None] + k.mean()
    ell = ell - ell.mean(0) - ell.mean(1)[:, None] + ell.mean()
    return float(np.vdot(k, ell) / np.sqrt(np.vdot(k, k) * np.vdot(ell, ell)))


def bench_reduction(n: int, d: int, steps: int, layers: int, groups: int,
                    samples: int) -> list[str]:
    rate = gemm_rate(torch.float64, "cpu", n=1024)
    acts = synthetic_size(n, d, steps, layers)
    sequences = np.repeat(np.arange(groups), n // groups)
    t = time.perf_counter()
    cka_dataset(acts, sequences, final_step=steps - 1, size="bench",
                options=CKAOptions(bootstrap_samples=samples))
    took = time.perf_counter() - t
    floor = 2 * layers * reduction_floor(n, d, steps, groups, samples) / rate
    lines = [f"float64 GEMM rate (CPU): {rate / 1e9:.1f} GFLOP/s",
             f"(2) reduction of one size ({steps} steps, {layers} layers x 2 components, "
             f"{n} tokens from {groups} sequences, D={d}, pairwise + bootstrap B={samples}): "
             f"{took:.1f} s = {took / floor:.2f} x its GEMM floor ({floor:.1f} s)"]
    # (3) the same CKA (every step vs the final step) on one (component, layer)
    xs = [acts[s].values[0, 0].astype(np.float64) for s in range(steps)]
    t = time.perf_counter()
    ref = CKAReference.from_activations(xs[-1])
    ours = [linear_cka_to_reference(x, ref) for x in xs]
    t_ours = time.perf_counter() - t
    t = time.perf_counter()
    naive = [naive_gram_cka(x, xs[-1]) for x in xs]
    t_naive = time.perf_counter() - t
    assert np.allclose(ours, naive, atol=1e-9), (ours, naive)
    lines.append(f"(3) CKA of {steps} steps vs the final one, one (component, layer): ours "
                 f"{t_ours:.2f} s, straightforward Gram form (N x N) {t_naive:.2f} s: "
                 f"{t_naive / t_ours:.1f}x faster (same values within 1e-9)")
    return lines


def bench_dag() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "wf"
        work.mkdir()
        for name in ("Snakefile", "workflow", "config", "envs"):
            src = REPO / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "snakemake", "--cores", "all", "--configfile",
                        "config/tiny.yaml", "--quiet"], cwd=work, env=env, check=True,
                       capture_output=True)
        took = time.perf_counter() - t
    return [f"(4) tiny DAG from an empty results/ (--cores all = {os.cpu_count()}): "
            f"{took / 60:.1f} min"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=list(PYTHIA), default="70m")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="small shapes, seconds")
    p.add_argument("--with-stats", action="store_true",
                   help="also time the pass with every gradient and the job with statistics")
    p.add_argument("--skip-reduction", action="store_true")
    p.add_argument("--skip-dag", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.sequences, a.seq_len = 2, 256
    print(f"# {dt.date.today()} {machine()}")
    for line in bench_extraction(a.arch, a.device, a.dtype, a.sequences, a.seq_len, a.repeats,
                                 a.with_stats):
        print(line, flush=True)
    if not a.skip_reduction:
        shape = (512, 64, 6, 2, 8, 100) if a.quick else (4096, 512, 27, 6, 8, 1000)
        for line in bench_reduction(*shape):
            print(line, flush=True)
    if not a.skip_dag:
        for line in bench_dag():
            print(line, flush=True)


if __name__ == "__main__":
    main()

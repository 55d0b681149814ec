"""Why intervention runs differ between machines, and that the pinned kernels remove it.

Runs one intervention run (the 183k shape, the rank-lowering regulariser -0.3 on mlp layer 1,
``--final-step`` constant-rate updates, seed 0) through ``lmdynamics intervention-run`` in
fresh processes, each under the environment another machine would give it:

- ``threads=2``: two intra-op threads instead of one;
- ``aten=avx2`` / ``aten=avx512``: ATen's vectorised kernels of a CPU without / with AVX-512;
- ``mkl=AVX2`` / ``mkl=COMPATIBLE``: MKL's conditional-reproducibility branches (on an AMD
  CPU ``AVX2`` falls back to ``AUTO``) instead of its default dispatch;
- ``openblas=Haswell`` / ``SkylakeX``: numpy's OpenBLAS kernels of a CPU without / with
  AVX-512.

once with ``reproducible_kernels: false`` (each process computes with what its environment
selects) and once with ``true`` (the run pins its kernels, whatever the environment says).
Prints, per setting, whether the run's tables are byte-identical to the first setting's, and
the largest difference of the per-step losses and of the within-run outcomes. Writes
determinism.json to ``--out``.

    python benchmarks/interventions_determinism.py --out /tmp/det --final-step 64
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

#: setting -> environment a different machine (or job) would give the process.
SETTINGS = {
    "reference": {},
    "threads=2": {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"},
    "aten=avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten=avx512": {"ATEN_CPU_CAPABILITY": "avx512"},
    "mkl=AVX2": {"MKL_CBWR": "AVX2"},
    "mkl=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
    "openblas=Haswell": {"OPENBLAS_CORETYPE": "Haswell"},
    "openblas=SkylakeX": {"OPENBLAS_CORETYPE": "SkylakeX"},
}
KERNEL_VARIABLES = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "OPENBLAS_CORETYPE", "OMP_NUM_THREADS",
                    "MKL_NUM_THREADS")


def one_run(out: Path, options: dict, env: dict[str, str]) -> Path:
    """Run ``lmdynamics intervention-run`` under ``env``; returns the output stem."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: v for k, v in os.environ.items() if k not in KERNEL_VARIABLES}
    cmd = [sys.executable, "-m", "lmdynamics", "intervention-run", "--variant", "rank_down",
           "--variant-spec", json.dumps({"kind": "rank_regulariser", "strength": -0.3}),
           "--size", "183k", "--architecture",
           json.dumps({"hidden_size": 64, "num_layers": 3, "num_heads": 4}), "--seed", "0",
           "--options", json.dumps(options), "--out-metrics", f"{out}_metrics.csv",
           "--out-losses", f"{out}_losses.csv", "--out-machine", f"{out}_machine.json"]
    subprocess.run(cmd, env={**clean, "PYTHONPATH": str(REPO / "src"), **env}, check=True,
                   capture_output=True, text=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--final-step", type=int, default=64)
    a = p.parse_args(argv)
    import pandas as pd

    from lmdynamics.interventions.outcomes import run_contrasts, run_outcomes

    results = {}
    for pinned in (False, True):
        options = {"tokens": "tiny", "vocab_size": 256, "device": "cpu",
                   "reproducible_kernels": pinned, "target": {"component": "mlp", "layer": 1},
                   "training": {"final_step": a.final_step, "batch_size": 16, "seq_len": 128,
                                "lr": 0.003, "warmup": 16, "schedule": "constant",
                                "decay_fraction": 0.2},
                   "checkpoint_every": 8, "gradient_every": 32, "eval_tokens": 1024}
        rows, ref = {}, None
        for name, env in SETTINGS.items():
            stem = one_run(a.out / f"{'pinned' if pinned else 'free'}" / name, options, env)
            m, lo = pd.read_csv(f"{stem}_metrics.csv"), pd.read_csv(f"{stem}_losses.csv")
            facts = json.loads(Path(f"{stem}_machine.json").read_text())
            did = run_contrasts(run_outcomes(m, lo, threshold=0.9, estimator="debiased"),
                                component="mlp", layer=1)
            digest = hashlib.sha256(Path(f"{stem}_metrics.csv").read_bytes()
                                    + Path(f"{stem}_losses.csv").read_bytes()).hexdigest()
            if ref is None:
                ref = (digest, lo, did)
            rows[name] = {
                "identical": digest == ref[0],
                "max_abs_train_loss_diff": float((lo["train_loss"] - ref[1]["train_loss"])
                                                 .abs().max()),
                "did_crossing_step": did["did_crossing_step"],
                "did_crossing_step_diff": did["did_crossing_step"]
                - ref[2]["did_crossing_step"],
                "torch_cpu_capability": facts["torch_cpu_capability"],
                "kernels_pinned": facts["kernels_pinned"]}
            print(f"{'pinned' if pinned else 'free  '} {name:18s} {rows[name]}", flush=True)
        results["pinned" if pinned else "free"] = rows
    (a.out / "determinism.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

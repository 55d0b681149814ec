"""Faults through the real Snakemake DAG on a reduced tiny suite (one size, 3 steps).

- kill -9 during training, extraction and reduction, then resume: results equal an
  uninterrupted run's bit for bit;
- a broken per-pair store stops the reduction with a message naming it and how to redo it,
  and following that advice gives the uninterrupted results back;
- a diverged (inf) checkpoint is recorded, flagged and the run goes on to figures and table.
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest
import safetensors.torch
import xarray as xr
import yaml

from lmdynamics.store import IncompleteStoreError, open_store
from support.faultlib import BROKEN_STORES
from support.workflow import REPO, copy_workflow, snakemake

pytestmark = pytest.mark.slow

SIZE = "42k"
#: One size, 3 analysed steps, 64 updates (long enough to be killed mid-training), 256 tokens.
CONFIG = {
    "suite": "faults", "source": "tiny", "sizes": [SIZE], "steps": [0, 8, 64],
    "final_step": 64, "tokens": 256,
    "tiny": {"warmup": 4, "schedule": {"log_until": 8, "interval": 8}},
}
R = "results/faults"
TARGET = f"{R}/metrics.zarr"
DIVERGE = "gpt_neox.layers.1.mlp.dense_4h_to_h.weight"


def workdir_for(path: Path) -> Path:
    workdir = copy_workflow(path)
    (workdir / "config" / "faults.yaml").write_text(yaml.safe_dump(CONFIG))
    return workdir


def run(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return snakemake(workdir, *args, "--configfile", "config/faults.yaml", check=check)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted run of the reduced suite up to the combined metrics."""
    workdir = workdir_for(tmp_path_factory.mktemp("reference"))
    run(workdir, TARGET)
    return workdir


def copy_run(reference: Path, dest: Path) -> Path:
    shutil.copytree(reference, dest, symlinks=True)
    return dest


# --------------------------------------------------------------------------- comparisons


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_store(a: Path, b: Path) -> None:
    """Every variable, coordinate (values and dtype) and attr of two zarr stores is equal."""
    x, y = open_store(a).load(), open_store(b).load()
    assert sorted(x.variables) == sorted(y.variables), (a, b)
    for name in x.variables:
        vx, vy = x[name].values, y[name].values
        assert vx.dtype == vy.dtype and vx.shape == vy.shape, (a, name)
        same = (np.array_equal(vx, vy, equal_nan=True) if vx.dtype.kind == "f"
                else np.array_equal(vx, vy))
        assert same, f"{b}: {name} differs from the uninterrupted run's"
    assert x.attrs == y.attrs, (a, b)


def assert_same_results(reference: Path, workdir: Path) -> None:
    """Checkpoints, training loss, per-pair stores and metrics: bit for bit."""
    ref, got = reference / R, workdir / R
    for path in sorted(ref.glob(f"checkpoints/{SIZE}/seed0/step*/*")):
        rel = path.relative_to(ref)
        assert _sha256(path) == _sha256(got / rel), rel
    for rel in (f"training/{SIZE}/seed0/loss.csv", "eval_batch.npy", "metrics.csv"):
        assert _sha256(ref / rel) == _sha256(got / rel), rel
    stores = [f"extract/{SIZE}/seed0/step{s}.zarr" for s in CONFIG["steps"]]
    for rel in [*stores, f"metrics/{SIZE}/seed0.zarr", "metrics.zarr"]:
        assert_same_store(ref / rel, got / rel)


# --------------------------------------------------------------------------- kill -9


def _live_processes_in(workdir: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cwd", "status"]):
        try:
            if proc.info["cwd"] == str(workdir) and proc.info["status"] != "zombie":
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def run_and_kill(workdir: Path, args: list[str], ready: Callable[[], bool], delay: float,
                 *, job: str | None = None, timeout: float = 600) -> str:
    """Start Snakemake, wait until ``ready()``, sleep ``delay`` s, then SIGKILL.

    ``job`` None kills Snakemake and its jobs at once (its process group: a lost node or a
    killed session); otherwise only the job process whose command line contains ``job``
    (a job killed by the scheduler), and Snakemake is left to notice. Returns the output.
    """
    log = workdir / f"snakemake-{time.monotonic_ns()}.out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "snakemake", "--cores", "2", *args, "--configfile",
             "config/faults.yaml"], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"finished before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "kill point not reached in time"
        time.sleep(0.002)
    time.sleep(delay)
    if job is None:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        targets = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if job in " ".join(p.cmdline())]
        for target in targets:
            target.send_signal(signal.SIGKILL)
    proc.wait(timeout=timeout)
    end = time.monotonic() + 30
    while _live_processes_in(workdir):  # nothing may go on writing after the kill
        assert time.monotonic() < end, _live_processes_in(workdir)
        time.sleep(0.05)
    return log.read_text()


def _exists(pattern: str) -> Callable[[], bool]:
    return lambda: bool(glob.glob(pattern))


def assert_absent_or_complete(store: Path) -> None:
    """What a kill may leave at a store's final path: nothing, or a complete store."""
    if store.exists():
        open_store(store)


def test_sigkill_in_training_extraction_and_reduction_then_resume(reference, tmp_path):
    """Three kills at random points; the resumed run equals the uninterrupted one."""
    seed = int(os.environ.get("LMDYNAMICS_KILL_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    print(f"LMDYNAMICS_KILL_SEED={seed}")
    workdir = workdir_for(tmp_path / "run")
    res = workdir / R

    # 1. training, after its step-8 checkpoint: the whole workflow dies (node lost)
    # (Snakemake creates the output folders before the job starts: wait for a file)
    run_and_kill(workdir, [TARGET], _exists(f"{res}/checkpoints/{SIZE}/seed0/step8/config.json"),
                 rng.uniform(0, 0.3))
    assert not (res / f"training/{SIZE}/seed0/loss.csv").exists(), "the kill came too late"
    assert (res / f"checkpoints/{SIZE}/seed0/step0/model.safetensors").exists()
    # Snakemake refuses to go on without redoing the job whose outputs it marked incomplete,
    # and, with --rerun-incomplete, before the killed run's lock is removed
    out = run(workdir, TARGET, check=False)
    assert out.returncode != 0 and "IncompleteFilesException" in out.stderr
    assert "--rerun-incomplete" in out.stderr
    out = run(workdir, TARGET, "--rerun-incomplete", check=False)
    assert out.returncode != 0 and "--unlock" in out.stderr
    run(workdir, "--unlock")

    # 2. extraction, while it writes the store of step 8: the whole workflow dies again
    run_and_kill(workdir, [TARGET, "--rerun-incomplete"],
                 _exists(f"{res}/extract/{SIZE}/seed0/.step8.zarr.tmp-*"), rng.uniform(0, 0.03))
    assert (res / f"training/{SIZE}/seed0/loss.csv").exists()
    assert_absent_or_complete(res / f"extract/{SIZE}/seed0/step8.zarr")
    run(workdir, "--unlock")

    # 3. reduction, while it writes its store: only the job is killed (as by a scheduler)
    out = run_and_kill(workdir, [TARGET, "--rerun-incomplete"],
                       _exists(f"{res}/metrics/{SIZE}/.seed0.zarr.tmp-*"), rng.uniform(0, 0.03),
                       job="lmdynamics reduce")
    if "Error in rule reduce_size" in out:
        assert not (res / f"metrics/{SIZE}/seed0.zarr").exists()
    assert_absent_or_complete(res / f"metrics/{SIZE}/seed0.zarr")

    # 4. resume: finishes and gives the uninterrupted run's results, bit for bit
    run(workdir, TARGET, "--rerun-incomplete")
    assert_same_results(reference, workdir)
    assert not list(res.rglob(".*.tmp-*")) and not list(res.rglob(".*.old-*"))


# --------------------------------------------------------------------------- broken stores


SNAKEMAKE_CASES = ["no_completion_mark", "missing_array", "wrong_shape", "token_positions",
                   "missing_chunk"]


@pytest.mark.parametrize("case", SNAKEMAKE_CASES)
def test_broken_store_stops_the_reduction(reference, tmp_path, case):
    """The reduce job fails naming the store and the fix; following the fix restores the
    uninterrupted results (shown for two cases, one per way the message offers)."""
    workdir = copy_run(reference, tmp_path / "run")
    rel = f"{R}/extract/{SIZE}/seed0/step8.zarr"
    breaker, fragment = BROKEN_STORES[case]
    breaker(workdir / rel)
    out = run(workdir, TARGET, "--forcerun", "reduce_size", check=False)
    assert out.returncode != 0 and "Error in rule reduce_size" in out.stdout + out.stderr
    log = (workdir / R / f"logs/reduce_size/{SIZE}/seed0.log").read_text()
    assert "IncompleteStoreError" in log and fragment in log, log[-3000:]
    assert f"`--forcerun {rel}`" in log and f"delete {rel} and rerun" in log
    assert not (workdir / R / f"metrics/{SIZE}/seed0.zarr").exists()
    if case == "token_positions":
        run(workdir, TARGET, "--forcerun", rel)
    elif case == "missing_chunk":  # delete it and rerun the same command
        shutil.rmtree(workdir / rel)
        run(workdir, TARGET, "--forcerun", "reduce_size")
    else:
        return
    assert_same_results(reference, workdir)


# --------------------------------------------------------------------------- NaN and inf


def test_diverged_checkpoint_is_flagged_and_the_run_goes_on(reference, tmp_path):
    """Step 8's layer-1 MLP write matrix set to inf: every output is still made."""
    workdir = copy_run(reference, tmp_path / "run")
    res = workdir / R
    weights = res / f"checkpoints/{SIZE}/seed0/step8/model.safetensors"
    state = safetensors.torch.load_file(weights)
    state[DIVERGE].fill_(float("inf"))
    safetensors.torch.save_file(state, weights, metadata={"format": "pt"})
    run(workdir)  # every target: figures and table too

    store = open_store(res / f"extract/{SIZE}/seed0/step8.zarr")
    assert store.attrs["nonfinite"] is True
    assert store.nonfinite_activations.sel(component="mlp").values.tolist() == [False, True]
    metrics = xr.open_zarr(res / "metrics.zarr", consolidated=False).load()
    assert metrics.flag_nonfinite.sel(size=SIZE).values.tolist() == [False, True, False]
    assert metrics.flagged.sel(size=SIZE).values.tolist() == [False, True, False]
    assert np.isnan(metrics.cka.sel(size=SIZE, step=8, component="mlp", layer=1))
    assert np.isnan(metrics.per_grad.sel(size=SIZE, step=8)).all()
    healthy = metrics.sel(size=SIZE).drop_sel(step=8)
    assert np.isfinite(healthy.cka).all() and np.isfinite(healthy.per_grad).all()
    extract_log = (res / f"logs/extract/{SIZE}/seed0.log").read_text()
    assert f"non-finite activations (NaN or inf) for size {SIZE} step 8 mlp layer 1" \
        in extract_log
    reduce_log = (res / f"logs/reduce_size/{SIZE}/seed0.log").read_text()
    assert f"non-finite values (NaN or inf) recorded for size {SIZE} step 8 mlp layer 1" \
        in reduce_log
    assert f"per_grad is NaN (undefined) for size {SIZE} step 8" in reduce_log
    for name in ("figure1", "figure2", "figure3", "figure4", "figure5"):
        for ext in ("png", "pdf"):
            assert (res / f"figures/{name}.{ext}").stat().st_size > 5000
    table = (res / "tables/mcc.csv").read_text()
    assert SIZE in table
    with pytest.raises(IncompleteStoreError):  # the healthy reference is untouched
        open_store(res / "no-such.zarr")

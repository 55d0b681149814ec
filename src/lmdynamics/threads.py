"""Thread pools of the numerical libraries a process loads: :func:`pin_threads` sizes them
before numpy and torch are imported (the commands that run a model,
:data:`lmdynamics.commands.PINNED`, and the intervention runs)."""

from __future__ import annotations

import os
from collections.abc import Mapping

#: What sizes the thread pools of the libraries one process loads: OpenMP (torch's intra-op
#: pool), OpenBLAS (numpy's BLAS and LAPACK), MKL, numexpr; Snakemake sets these to a job's
#: ``threads`` (snakemake/shell.py). Each is read once, when its library loads.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "GOTO_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
#: numpy's OpenBLAS pool, whose idle threads spin: one thread in a command that runs a model.
OPENBLAS_VARIABLES = ("OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS")


def thread_environment(threads: int | None, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables :func:`pin_threads` sets for ``threads`` in a process whose environment is
    ``environ`` (those ``environ`` has already are kept): ``OMP_WAIT_POLICY=PASSIVE``, every
    pool of :data:`THREAD_VARIABLES` at ``threads`` but numpy's OpenBLAS
    (:data:`OPENBLAS_VARIABLES`) at 1. Empty for ``None`` or 0."""
    if not threads:
        return {}
    if threads < 0:
        raise ValueError(f"--threads {threads}: must be a positive integer")
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", **dict.fromkeys(THREAD_VARIABLES, str(threads)),
              **dict.fromkeys(OPENBLAS_VARIABLES, "1")}
    return {name: environ.get(name, value) for name, value in wanted.items()}


def pin_threads(threads: int | None) -> None:
    """Run this process's numerical work on ``threads`` threads, and let idle ones sleep.

    Call it before numpy or torch is imported (the variables are read when they load; later only
    torch's own counts change); :func:`lmdynamics.cli.run_command` does, for the commands that
    run a model (:data:`lmdynamics.commands.PINNED`). One pass alternates torch kernels (OpenMP
    threads) with numpy's LAPACK and BLAS (OpenBLAS's own pthreads); by default each runtime's
    idle threads spin, waiting for more work, while the other runtime's run, and on a machine
    whose cores are all busy they take the cores the working threads need. So
    (:func:`thread_environment`): ``OMP_WAIT_POLICY=PASSIVE`` (OpenMP threads sleep when idle),
    torch's pools at ``threads`` with one inter-op thread (the passes never run operators side
    by side), and numpy's OpenBLAS at one thread: its calls in a pass are small (eigenvalues of
    D x D Gram matrices, fits) and gain nothing from a second thread, while a second thread's
    spinning slows the pass on a busy machine (measurements: docs/benchmarks/2026-12-05.md,
    "Contention"). A variable already set (by the user, or by Snakemake for a job's ``threads``)
    is kept. ``None`` or 0 changes nothing.
    """
    os.environ.update(thread_environment(threads, os.environ))
    if not threads:
        return
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or inter-op work already started in this process
        pass

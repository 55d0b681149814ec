"""``lmdynamics.threads.pin_threads``: what a command on ``--threads`` sets before numpy and torch
load (the cause and the measurement: docs/benchmarks/2026-12-05.md, "Contention")."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lmdynamics.threads import (
    OPENBLAS_VARIABLES,
    THREAD_VARIABLES,
    pin_threads,
)
from support.workflow import REPO

PROBE = """
import json, os, sys
from lmdynamics.threads import pin_threads
pin_threads(int(sys.argv[1]))
import numpy, torch
print(json.dumps({"env": {k: os.environ.get(k) for k in sys.argv[2:]},
                  "torch": torch.get_num_threads(),
                  "interop": torch.get_num_interop_threads()}))
"""


def probe(threads: int, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("OMP_WAIT_POLICY", *THREAD_VARIABLES)}
    clean["PYTHONPATH"] = str(REPO / "src")
    out = subprocess.run([sys.executable, "-c", PROBE, str(threads), "OMP_WAIT_POLICY",
                          *THREAD_VARIABLES], env={**clean, **env}, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def test_pinned_process_sizes_every_pool_and_lets_idle_threads_sleep():
    got = probe(2)
    assert got["env"] == {"OMP_WAIT_POLICY": "PASSIVE", **dict.fromkeys(THREAD_VARIABLES, "2"),
                          **dict.fromkeys(OPENBLAS_VARIABLES, "1")}
    assert got["torch"] == 2 and got["interop"] == 1


def test_variables_set_by_snakemake_or_the_user_are_kept():
    got = probe(2, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="ACTIVE", OPENBLAS_NUM_THREADS="2")
    assert got["env"]["OMP_NUM_THREADS"] == "1" and got["env"]["OMP_WAIT_POLICY"] == "ACTIVE"
    assert got["env"]["OPENBLAS_NUM_THREADS"] == "2" and got["torch"] == 2


def test_no_threads_changes_nothing_and_negative_is_refused():
    got = probe(0)
    assert set(got["env"].values()) == {None} and got["interop"] >= 1
    with pytest.raises(ValueError, match="--threads -1"):
        pin_threads(-1)

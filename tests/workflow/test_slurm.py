"""The tiny DAG on a real one-node SLURM cluster through profiles/slurm, against a local run.

Needs the `slurm` extra (Snakemake's SLURM executor), root and apt-get (Debian's slurm-wlm and
munge are installed when missing); skipped with the reason otherwise, or failed when
LMDYNAMICS_REQUIRE_SLURM=1 (as .ci/run sets it).
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import xarray as xr
import yaml

from support import slurm_cluster
from support.workflow import REPO, copy_workflow, snakemake

pytestmark = pytest.mark.slow

RESULTS = "results/tiny"
#: One size, three steps, a short training and few tokens: still training, extraction,
#: reductions, every figure and the table, on SLURM in a few minutes.
REDUCED = {"sizes": ["42k"], "steps": [0, 8, 64], "final_step": 64, "tokens": 256}


def _unavailable(reason: str):
    if os.environ.get("LMDYNAMICS_REQUIRE_SLURM") == "1":
        pytest.fail(f"LMDYNAMICS_REQUIRE_SLURM=1 but no SLURM test cluster: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        _unavailable("Snakemake's SLURM executor is not installed: pip install -e '.[slurm]'")
    if reason := slurm_cluster.why_unavailable():
        _unavailable(reason)
    try:
        slurm_cluster.install()
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"could not install {', '.join(slurm_cluster.PACKAGES)}: {exc}")
    with slurm_cluster.one_node_cluster(tmp_path_factory.mktemp("slurm-state")) as running:
        yield running


def reduced_workflow(dest):
    """A copy of the workflow with ``config/reduced.yaml`` (the tiny suite, cut down)."""
    workdir = copy_workflow(dest)
    config = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    config.update(REDUCED)
    (workdir / "config/reduced.yaml").write_text(yaml.safe_dump(config))
    return workdir


def local_profile(workdir, partition: str):
    """profiles/slurm as a user adapts it: their partition in default-resources.

    Also a first status check after 1 s instead of 40 s (jobs here take seconds; the plugin
    adds 10 s to the interval after each check that finds no finished job).
    """
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    profile["default-resources"]["slurm_partition"] = partition
    profile["slurm-init-seconds-before-status-checks"] = 1
    path = workdir / "profiles/test-slurm/config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(profile))
    return path.parent


def job_logs(workdir) -> dict[str, str]:
    """Every rule's log under results/tiny/logs, by path relative to it."""
    logs = workdir / RESULTS / "logs"
    return {str(p.relative_to(logs)): p.read_text() for p in sorted(logs.rglob("*.log"))}


def assert_same_metrics(a, b):
    ds_a = xr.open_zarr(a / RESULTS / "metrics.zarr", consolidated=False).load()
    ds_b = xr.open_zarr(b / RESULTS / "metrics.zarr", consolidated=False).load()
    assert set(ds_a.data_vars) == set(ds_b.data_vars)
    for var in ds_a.data_vars:
        np.testing.assert_allclose(ds_a[var].values, ds_b[var].values, rtol=1e-12, atol=0,
                                   err_msg=var)
    for name in ("metrics.csv", "tables/mcc.csv", "training_loss.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(a / RESULTS / name),
                                      pd.read_csv(b / RESULTS / name), rtol=1e-12, obj=name)


def test_tiny_dag_on_slurm_matches_a_local_run(tmp_path, cluster):
    on_slurm = reduced_workflow(tmp_path / "slurm")
    local = reduced_workflow(tmp_path / "local")
    profile = local_profile(on_slurm, cluster.partition)
    args = ("--configfile", "config/reduced.yaml")

    # The local reference runs alongside: SLURM's run mostly waits on scheduling and polls.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    local_run = subprocess.Popen([sys.executable, "-m", "snakemake", "--cores", "1", *args],
                                 cwd=local, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
    try:
        proc = snakemake(on_slurm, "--profile", str(profile), *args, timeout=900,
                         check=False)
    finally:
        local_out, _ = local_run.communicate(timeout=900)
    if proc.returncode != 0:
        pytest.fail(f"snakemake on SLURM failed ({proc.returncode}):\n"
                    f"{(proc.stdout + proc.stderr)[-6000:]}\n{cluster.logs()}")
    assert local_run.returncode == 0, local_out[-4000:]
    out = proc.stdout + proc.stderr

    # Every job was submitted with sbatch, ran under its own SLURM job id, and logged it.
    submitted = dict(re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", out))
    logs = job_logs(on_slurm)
    assert len(logs) == len(submitted) == len(job_logs(local)), (sorted(logs), submitted)
    ran_as = {}
    for name, text in logs.items():
        found = re.findall(r"SLURM job (\d+) on ", text)
        assert len(found) == 1, f"{name} does not name one SLURM job:\n{text[-1000:]}"
        ran_as[name] = found[0]
    assert sorted(ran_as.values()) == sorted(submitted.values())

    # ... in our partition, exiting 0; extraction with a GPU (`gpu: 1` -> --gpus=1), the rest
    # without one.
    ctld = cluster.ctld_log.read_text()
    for name, jobid in ran_as.items():
        # the main scheduler logs "Allocate JobId=.. Partition=..", the backfill scheduler
        # "_start_job: Started JobId=.. in <partition> on <node>"
        started = (rf"Allocate JobId={jobid} .*Partition={cluster.partition}\b"
                   rf"|Started JobId={jobid} in {cluster.partition} on ")
        assert re.search(started, ctld), name
        assert f"_job_complete: JobId={jobid} WEXITSTATUS 0" in ctld, name
        gpu = "TresPerJob=gres:gpu:1" in cluster.scontrol("show", "job", jobid)
        assert gpu == name.startswith("extract/"), (name, jobid, gpu)

    # The same numbers as the local run, and nothing left to do for a rerun.
    assert_same_metrics(on_slurm, local)
    for name in ("figure1", "figure2", "figure3", "figure4", "figure5", "training_loss"):
        assert (on_slurm / RESULTS / "figures" / f"{name}.png").stat().st_size > 5000, name
    rerun = snakemake(on_slurm, "--profile", str(profile), *args, "-n")
    assert "Nothing to be done" in rerun.stdout + rerun.stderr

"""Shared fixtures: a copy of the workflow in a temporary directory, a runner, and the two
end-to-end runs the workflow tests read (``mini_run`` by default, ``tiny_run`` when slow)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "envs")


def copy_workflow(dest: Path) -> Path:
    """Copy the Snakefile, rules, schemas and configs into ``dest`` (outputs land there)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, dest / name)
    return dest


def snakemake(workdir: Path, *args: str, check: bool = True,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``snakemake`` in ``workdir`` with the given arguments; output is captured."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    # The rules call the `lmdynamics` command: make it import this checkout's package.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=timeout,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The default tiny suite run once, end to end, in a temporary copy of the workflow
    (about 5 minutes on 2 cores: only tests marked slow use it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny"))
    snakemake(workdir, "--configfile", "config/tiny.yaml")
    return workdir


#: The smallest tiny suite that still runs every rule of the DAG: two sizes (so that the
#: combined outputs order sizes), three steps (0, one in between, the final one), 64 updates,
#: 128 tokens and 50 bootstrap resamples; everything else as config/tiny.yaml.
MINI = {"sizes": ["42k", "183k"], "steps": [0, 8, 64], "final_step": 64, "tokens": 128,
        "metrics": {"bootstrap": {"samples": 50}}}


def _merged(base: dict, overlay: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else copy.deepcopy(value))
    return out


@dataclass(frozen=True)
class Run:
    """A finished run of the workflow: its folder, its config file (relative to the folder)
    and that file's contents."""

    workdir: Path
    configfile: str
    config: dict

    @property
    def results(self) -> Path:
        return self.workdir / "results" / self.config["suite"]


def mini_config() -> dict:
    """config/tiny.yaml with :data:`MINI` applied."""
    return _merged(yaml.safe_load((REPO / "config/tiny.yaml").read_text()), MINI)


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory) -> Run:
    """The whole DAG once, end to end, on :data:`MINI` (about a minute on 2 cores): the
    default test run's end-to-end check. Tests only read it (or copy it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("mini"))
    run = Run(workdir, "config/mini.yaml", mini_config())
    (workdir / run.configfile).write_text(yaml.safe_dump(run.config))
    snakemake(workdir, "--configfile", run.configfile)
    return run

"""The workflow as the tests run it: a copy of it in a folder, the ``snakemake`` command on
that copy, and the smallest tiny suite that still runs every rule (:data:`MINI`)."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
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

"""What the core install needs is what the tiny suite and the hub suites use locally; the SLURM
executor is the ``slurm`` extra (Snakemake loads an installed executor plugin on every call, and
this one then asks ``scontrol`` for the cluster's configuration: docs/guide/performance.md)."""

from __future__ import annotations

import re
import tomllib

from support.workflow import REPO

PLUGIN = "snakemake-executor-plugin-slurm"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~\[;]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_slurm_executor_is_an_extra_and_not_a_core_dependency():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert PLUGIN not in _names(project["dependencies"])
    assert PLUGIN in _names(project["optional-dependencies"]["slurm"])
    assert PLUGIN not in (REPO / "envs/lmdynamics.yaml").read_text()  # the jobs' environment

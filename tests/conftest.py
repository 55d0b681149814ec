"""Shared fixtures: the two end-to-end runs the workflow tests read (``mini_run`` by default,
``tiny_run`` when slow), and a fresh copy of the workflow. The helpers
they are built on live in ``tests/support/``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from support.workflow import Run, copy_workflow, mini_config, snakemake


@pytest.fixture
def workflow_copy(tmp_path) -> Path:
    """A fresh copy of the workflow (Snakefile, rules, configs) in a temporary folder."""
    return copy_workflow(tmp_path / "workflow")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """The default tiny suite run once, end to end, in a temporary copy of the workflow
    (about 5 minutes on 2 cores: only tests marked slow use it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny"))
    snakemake(workdir, "--configfile", "config/tiny.yaml")
    return workdir


@pytest.fixture(scope="session")
def mini_run(tmp_path_factory) -> Run:
    """The whole DAG once, end to end, on :data:`MINI` (about a minute on 2 cores): the
    default test run's end-to-end check. Tests only read it (or copy it)."""
    workdir = copy_workflow(tmp_path_factory.mktemp("mini"))
    run = Run(workdir, "config/mini.yaml", mini_config())
    (workdir / run.configfile).write_text(yaml.safe_dump(run.config))
    snakemake(workdir, "--configfile", run.configfile)
    return run

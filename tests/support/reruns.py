"""Incremental reruns as the tests see them: what ``snakemake -n`` plans in a copy of a
finished ``mini_run``, as a set of (rule, wildcards) jobs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from lmdynamics.options import resolve
from lmdynamics.report import conjecture as conjecture_figures
from lmdynamics.report.registry import measure_figures, paper_figures
from support.workflow import copy_workflow, mini_config, snakemake

#: The configuration of ``mini_run`` and its file, relative to the run's folder.
CONFIG, CONFIGFILE = mini_config(), "config/mini.yaml"
SIZES, STEPS = CONFIG["sizes"], CONFIG["steps"]
FIGURES = paper_figures(CONFIG["metrics"].get("standardize", False))
STATS_FIGURES = list(conjecture_figures.STATS_FIGURES)
MEASURE_FIGURES = measure_figures(resolve("measures", CONFIG.get("measures")))
RESULTS = f"results/{CONFIG['suite']}"

Job = tuple[str, tuple[tuple[str, str], ...]]


def job(rule: str, **wildcards: object) -> Job:
    return rule, tuple(sorted((k, str(v)) for k, v in wildcards.items()))


def downstream_of_metrics(measures: list[str] = MEASURE_FIGURES) -> set[Job]:
    """Jobs that read the combined metrics: the combine itself, every figure (those of
    ``measures`` among the measures'), Table 1."""
    return {job("combine"), *table1_jobs(), *(job("figure", figure=f) for f in FIGURES),
            *(job("measure_figure", measure=m) for m in measures)}


def table1_jobs() -> set[Job]:
    """Table 1 and its threshold-sensitivity figure."""
    return {job("mcc_table"), job("mcc_sensitivity")}


def downstream_of_stores() -> set[Job]:
    """Jobs that read every per-pair store or the combined statistics: the checkpoint audit,
    the statistics' combine and their figures."""
    return {job("checkpoint_audit"), job("combine_stats"),
            *(job("stats_figure", stat_figure=f) for f in STATS_FIGURES)}


def parse_plan(text: str) -> set[Job]:
    """Jobs of a dry run's output as (rule, wildcards), without the target rule ``all``."""
    jobs, rule, wildcards = set(), None, ()

    def close():
        if rule is not None and rule != "all":
            jobs.add((rule, wildcards))

    for line in text.splitlines():
        if m := re.match(r"^(?:local)?rule (\w+):$", line):
            close()
            rule, wildcards = m.group(1), ()
        elif rule is not None and (m := re.match(r"^\s+wildcards: (.*)$", line)):
            wildcards = tuple(sorted(tuple(kv.split("=", 1)) for kv in m.group(1).split(", ")))
    close()
    return jobs


def plan(workdir: Path, *args: str, pythonpath: Path | None = None) -> set[Job]:
    """What ``snakemake -n`` would run in ``workdir``; ``pythonpath`` replaces the package."""
    if pythonpath is None:
        proc = snakemake(workdir, "-n", "--configfile", CONFIGFILE, *args)
    else:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--cores", "2",
                               "--configfile", CONFIGFILE, *args], cwd=workdir,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    jobs = parse_plan(out)
    if not jobs:
        assert "Nothing to be done" in out, out[-3000:]
    return jobs


def finished_copy(run: Path, dest: Path) -> Path:
    """A new copy of the workflow holding ``run``'s outputs, config file and metadata, mtimes
    kept."""
    workdir = copy_workflow(dest)
    shutil.copy2(run / CONFIGFILE, workdir / CONFIGFILE)
    shutil.copytree(run / "results", workdir / "results", symlinks=True)
    shutil.copytree(run / ".snakemake", workdir / ".snakemake", symlinks=True,
                    ignore=shutil.ignore_patterns("locks", "log", "incomplete", "slurm_logs"))
    return workdir


def with_config(workdir: Path, **changes: object) -> str:
    """A config file in ``workdir``: the run's config with ``changes`` (integers stay integers,
    which ``--config`` would pass as strings); its path, for ``--configfile`` (which then
    replaces the run's file)."""
    path = workdir / "config/changed.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, **changes}))
    return str(path.relative_to(workdir))

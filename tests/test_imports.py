"""Imports flow one way: the import-linter contracts of ``pyproject.toml`` (``[tool.importlinter]``:
layers from the entry point down to the validation leaf, covering every module, and no circle
in any package) hold, and they fail when an upward import or a circle is planted. Only the
extraction and the tiny suite's training import torch, so the reductions, figures and tables
start without it (~4-5 s of imports on 2 cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import lmdynamics

PACKAGE = Path(lmdynamics.__file__).parent
PYPROJECT = PACKAGE.parents[1] / "pyproject.toml"


def lint_imports(package_parent: Path, cwd: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` with this project's contracts on the package found in
    ``package_parent`` (no cache: nothing is written)."""
    code = "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([sys.executable, "-c", code, str(PYPROJECT), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold(tmp_path):
    proc = lint_imports(PACKAGE.parent, tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def _planted(tmp_path: Path, plants: dict[str, str]) -> Path:
    """A copy of the package with ``plants`` (path inside the package -> a line) appended."""
    site = tmp_path / "site"
    shutil.copytree(PACKAGE, site / "lmdynamics",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for rel, line in plants.items():
        with open(site / "lmdynamics" / rel, "a") as fh:
            fh.write(f"\n{line}  # planted\n")
    return site


@pytest.mark.parametrize("plants, broken", [
    # a leaf importing the command line: an upward import
    ({"store.py": "from lmdynamics import cli"}, "lmdynamics.store -> lmdynamics.cli"),
    # a source importing a stage above it
    ({"sources/tiny.py": "import lmdynamics.extraction.extract"},
     "lmdynamics.sources.tiny -> lmdynamics.extraction.extract"),
    # two modules of one package importing each other
    ({"extraction/names.py": "from lmdynamics.extraction import positions",
      "extraction/positions.py": "from lmdynamics.extraction import names"},
     ".positions -> .names"),
])
def test_a_planted_import_breaks_the_contracts(tmp_path, plants, broken):
    site = _planted(tmp_path, plants)
    proc = lint_imports(site, tmp_path)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" in proc.stdout and broken in proc.stdout, proc.stdout[-4000:]


def test_a_module_outside_every_layer_breaks_the_contract(tmp_path):
    site = _planted(tmp_path, {})
    (site / "lmdynamics" / "newcomer.py").write_text('"""A module no layer lists."""\n')
    proc = lint_imports(site, tmp_path)
    assert proc.returncode == 1 and "lmdynamics.newcomer" in proc.stdout, proc.stdout[-4000:]


@pytest.mark.parametrize("entry", [
    "lmdynamics.cli", "lmdynamics.estimators.cka", "lmdynamics.estimators.rank",
    "lmdynamics.estimators.bootstrap", "lmdynamics.estimators.mcc",
    "lmdynamics.reduction.metrics", "lmdynamics.reduction.stats", "lmdynamics.reduction.audit",
    "lmdynamics.report.cka", "lmdynamics.report.mcc", "lmdynamics.report.tables",
    "lmdynamics.report.conjecture", "lmdynamics.plan",
    "lmdynamics.families", "lmdynamics.extraction.names",
    "lmdynamics.estimators.measures", "lmdynamics.reduction.measures",
    "lmdynamics.report.measures", "lmdynamics.report.registry",
    "lmdynamics.sources.tiny",  # the corpus and the eval batch; training imports torch inside
])
def test_reductions_figures_and_tables_do_not_import_torch(entry):
    code = (f"import sys, {entry}; heavy = [m for m in ('torch', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout's package
        [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def _workflow_imports() -> list[str]:
    """The ``lmdynamics`` modules the workflow's rule files import while Snakemake parses
    them (``from lmdynamics.x import ...`` and ``import lmdynamics.x`` lines), but the
    intervention study's (included only when a config has a section ``interventions``; its
    parse builds the study's runs)."""
    import re

    rules = PACKAGE.parents[1] / "workflow" / "rules"
    found = set()
    for smk in rules.glob("*.smk"):
        if smk.name.startswith("interventions"):
            continue
        found.update(re.findall(r"^(?:from|import)\s+(lmdynamics(?:\.\w+)*)", smk.read_text(),
                                re.MULTILINE))
    return sorted(found)


def test_parsing_the_workflow_does_not_import_torch():
    """Every ``snakemake`` call (each rerun check, dry run and job submission) parses the rule
    files: what they import must start without torch (importing it and transformers took 3 s
    of every call, 0.3 s without)."""
    modules = _workflow_imports()
    assert "lmdynamics.config" in modules and "lmdynamics.sources.suites" in modules, modules
    code = (f"import sys, {', '.join(modules)}; heavy = [m for m in ('torch', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

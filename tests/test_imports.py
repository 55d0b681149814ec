"""Data and imports flow one way (issue 17): sources -> extraction -> reduction -> report, with
the estimators pure numpy. Only the extraction and the tiny suite's training import torch, so
the reductions, figures and tables start without it (~4-5 s of imports on 2 cores)."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmdynamics

PACKAGE = Path(lmdynamics.__file__).parent
#: Which stages a stage may import (besides itself and the top-level infrastructure modules).
ALLOWED = {
    "sources": set(),
    "estimators": set(),
    "extraction": {"sources", "estimators"},
    "reduction": {"extraction.names", "estimators"},
    "report": {"estimators"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "lmdynamics."):
            found.add(node.module.removeprefix("lmdynamics."))
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("lmdynamics.") for a in node.names
                      if a.name.startswith("lmdynamics.")}
    return found


@pytest.mark.parametrize("stage", sorted(ALLOWED))
def test_a_stage_imports_only_upstream_stages(stage):
    stages = set(ALLOWED)
    for path in sorted((PACKAGE / stage).glob("*.py")):
        for module in _imports(path):
            head = module.split(".")[0]
            if head not in stages or head == stage:
                continue  # top-level infrastructure (store, options, config, heap) or itself
            allowed = ALLOWED[stage]
            assert head in allowed or module in allowed, f"{path.name} imports {module}"


@pytest.mark.parametrize("entry", [
    "lmdynamics.cli", "lmdynamics.estimators.cka", "lmdynamics.estimators.rank",
    "lmdynamics.estimators.bootstrap", "lmdynamics.estimators.mcc",
    "lmdynamics.reduction.metrics", "lmdynamics.reduction.stats", "lmdynamics.reduction.audit",
    "lmdynamics.report.cka", "lmdynamics.report.mcc", "lmdynamics.report.tables",
    "lmdynamics.report.conjecture", "lmdynamics.sources.plan",
    "lmdynamics.families", "lmdynamics.extraction.names",
    "lmdynamics.sources.tiny",  # the corpus and the eval batch; training imports torch inside
])
def test_reductions_figures_and_tables_do_not_import_torch(entry):
    code = (f"import sys, {entry}; heavy = [m for m in ('torch', 'transformers') "
            "if m in sys.modules]; assert not heavy, heavy")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(  # this checkout's package
        [str(PACKAGE.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)

"""The ``lmdynamics`` command's entry points: each offers every registered subcommand."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmdynamics.cli import COMMANDS
from support.workflow import REPO


@pytest.mark.parametrize("entry", [["-m", "lmdynamics"], ["-m", "lmdynamics.cli"]])
def test_every_entry_point_offers_every_subcommand(entry):
    """``python -m lmdynamics.cli`` runs the module as ``__main__``, a second copy; the
    intervention study's subcommands register on the package's module, and must be there."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    offered = proc.stdout.split("{", 1)[1].split("}", 1)[0].split(",")
    assert "intervention-run" in COMMANDS
    assert sorted(offered) == sorted(COMMANDS)
    assert "Warning" not in proc.stderr, proc.stderr

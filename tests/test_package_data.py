"""The package works without its repository: what a wheel holds is enough to read the schemas.

A wheel built by setuptools holds the ``.py`` files of the packages ``find`` lists (directories
with an ``__init__.py`` under ``src/``) and the files matching ``[tool.setuptools.package-data]``
of ``pyproject.toml``. The test copies exactly those into a temporary directory and imports the
package from there in a fresh interpreter whose working directory is that copy, so a path into
the repository (``workflow/``, ``parents[N]``) or a data file missing from ``package-data``
fails it.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from support.workflow import REPO

SRC = REPO / "src"


def _wheel_files() -> list[Path]:
    """The files of ``src/`` a setuptools wheel of this project holds (relative to ``src``)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    package_data: dict[str, list[str]] = setuptools.get("package-data", {})
    files = []
    for init in SRC.rglob("__init__.py"):
        package_dir = init.parent
        if any(p.name.endswith(".egg-info") for p in package_dir.parents):
            continue
        package = ".".join(package_dir.relative_to(SRC).parts)
        files += [f.relative_to(SRC) for f in package_dir.glob("*.py")]
        for pattern in package_data.get(package, []):
            files += [f.relative_to(SRC) for f in package_dir.glob(pattern) if f.is_file()]
    return sorted(set(files))


def _install_copy(dest: Path) -> Path:
    for rel in _wheel_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(SRC / rel, dest / rel)
    return dest


def test_wheel_files_include_the_schemas():
    files = {str(f) for f in _wheel_files()}
    assert "lmdynamics/schemas/config.schema.yaml" in files
    assert "lmdynamics/schemas/interventions.schema.yaml" in files
    assert not [f for f in files if fnmatch.fnmatch(f, "*.egg-info*")]


def test_package_reads_its_schemas_without_the_repository(tmp_path):
    site = _install_copy(tmp_path / "site")
    code = (
        f"import sys; sys.path.insert(0, {str(site)!r})\n"
        "import lmdynamics, lmdynamics.options as o\n"
        f"assert lmdynamics.__file__.startswith({str(site)!r}), lmdynamics.__file__\n"
        "assert o.schema()['properties']['metrics']['type'] == 'object'\n"
        "assert 'interventions' in o.schema('interventions')['properties']\n"
        "assert o.schema_path('config').is_file()\n"
        "assert o.defaults('metrics')\n"
        "from lmdynamics.config import load_config\n"
        "import lmdynamics.reduction.cka, lmdynamics.report.tables, lmdynamics.cli\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip() == "ok"

"""lmdynamics: how the layers of language models converge during pretraining.

All logic of the Snakemake workflow lives here; the rules call :mod:`lmdynamics.cli`.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lmdynamics")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]

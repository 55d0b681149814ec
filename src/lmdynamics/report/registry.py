"""Names of every figure the workflow draws, and their report categories: the one registry
``workflow/rules/common.smk`` imports (no matplotlib: the Snakefile parses fast).

The drawing functions are registered under the same names in
:data:`lmdynamics.report.figures.FIGURES`
(1-5), :data:`lmdynamics.report.cka.CKA_FIGURES` (6) and
:data:`lmdynamics.report.conjecture.STATS_FIGURES`; ``tests/test_registry.py`` checks they agree.
The measure figures are one per measure of :mod:`lmdynamics.estimators.measures` a config turns
on (:func:`measure_figures`), each in its own report category.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lmdynamics.estimators.measures import MEASURES, chosen

#: The paper's figures: ``results/<suite>/figures/<name>.png``, one ``report()`` category each.
REPORT_CATEGORIES: dict[str, str] = {
    "figure1": "Figure 1: CKA, smallest vs largest size",
    "figure2": "Figure 2: mean CKA and PER per size",
    "figure3": "Figure 3: CKA per layer",
    "figure4": "Figure 4: PER of the weights per layer",
    "figure5": "Figure 5: PER of the gradients per layer",
    "figure6": "Figure 6: pairwise CKA between steps",
    "figure2_standardized": "Figure 2 with standardised dimensions",
    "cka_seed_sd": "Seed replicates: across-seed sd of CKA per layer",
}
#: Drawn only with ``metrics.standardize`` (from the ``*_standardized`` CKA variables).
STANDARDIZED_FIGURES: tuple[str, ...] = ("figure2_standardized",)
#: The Conjecture figures: ``results/<suite>/figures/conjecture_<name>.png``.
STATS_FIGURES: tuple[str, ...] = (
    "norms", "distance", "shape", "residual", "spectra", "embedding", "closeness")


def paper_figures(standardize: bool) -> list[str]:
    """The paper figures a configuration draws (``metrics.standardize`` adds one)."""
    return [name for name in REPORT_CATEGORIES
            if standardize or name not in STANDARDIZED_FIGURES]


def measure_figures(measures: Mapping[str, Any]) -> list[str]:
    """The measure figures (``figures/measure_<name>.png``, :mod:`lmdynamics.report.measures`)
    a config's section ``measures`` draws, its defaults filled in (as Snakemake's ``validate``
    and :func:`lmdynamics.options.resolve` leave it): one per measure it turns on."""
    return [choice.measure.name for choice in chosen(measures)]


def measure_category(name: str) -> str:
    """The report category of measure ``name``'s figure."""
    return f"Measure: {MEASURES[name].title.removesuffix(' vs final step')}"

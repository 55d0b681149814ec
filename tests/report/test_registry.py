"""The figure registry the Snakefile imports (lmdynamics.report.registry) names exactly the
figures the report modules draw, so a figure is added in one place and drawn by one rule."""

from __future__ import annotations

from lmdynamics.report import cka, conjecture, figures, registry


def test_registry_names_the_drawn_figures():
    drawn = {*figures.FIGURES, *cka.CKA_FIGURES}
    standardized = {name.removesuffix(cka.STANDARDIZED_SUFFIX)
                    for name in registry.STANDARDIZED_FIGURES}
    assert set(registry.REPORT_CATEGORIES) == drawn | set(registry.STANDARDIZED_FIGURES)
    assert standardized <= drawn  # drawn from the *_standardized CKA by render_figure
    assert registry.STATS_FIGURES == tuple(conjecture.STATS_FIGURES)


def test_standardize_adds_only_the_standardized_figure():
    plain, with_std = registry.paper_figures(False), registry.paper_figures(True)
    assert set(with_std) - set(plain) == set(registry.STANDARDIZED_FIGURES)
    assert plain == ["figure1", "figure2", "figure3", "figure4", "figure5", "figure6",
                     "cka_seed_sd"]


def test_measure_figures_follow_the_config_and_each_has_its_category():
    from lmdynamics.estimators.measures import MEASURES
    from lmdynamics.options import defaults, resolve

    # every one on by default but PWCCA and SVCCA (they cost more than the CKA reduction)
    def figures(section):
        return registry.measure_figures(resolve("measures", section))

    assert figures(None) == [m for m in MEASURES if m not in ("pwcca", "svcca")]
    off = {name: {"data": []} for name in MEASURES}
    assert figures({"pwcca": {"data": ["activations"]}})[0] == "pwcca"
    assert figures(off) == []
    assert figures({**off, "gini": {"data": ["weights"]}}) == ["gini"]
    assert figures({**off, "pwcca": {"data": ["activations"], "reference": []}}) == []
    categories = {registry.measure_category(name) for name in MEASURES}
    assert len(categories) == len(MEASURES)  # one report category per measure
    assert set(defaults("measures")) == set(MEASURES)

"""``snakemake --report`` after the tiny run: every figure and table, captioned, by paper figure."""

from __future__ import annotations

import base64
import json
import re
import zipfile

import pytest
import yaml

from lmdynamics.options import resolve
from lmdynamics.report import conjecture as conjecture_figures
from lmdynamics.report.registry import measure_category, measure_figures
from support.workflow import REPO, snakemake

pytestmark = pytest.mark.slow

TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
RESULTS = "results/tiny"
FIGURES = [f"figure{i}" for i in range(1, 6)]
#: The measure figures the tiny config turns on (its section measures, defaults filled in).
MEASURES = measure_figures(resolve("measures", TINY.get("measures")))
#: Every figure and table of a tiny run, with a phrase its caption must contain.
REPORTED = {
    **{f"{RESULTS}/figures/{f}.png": f"paper Fig. {f[-1]}" for f in FIGURES},
    f"{RESULTS}/figures/figure6.png": "Figure 6 (not in the paper)",
    f"{RESULTS}/figures/cka_seed_sd.png": "across-seed standard deviation",
    **{f"{RESULTS}/figures/conjecture_{f}.png": "Conjecture post"
       for f in conjecture_figures.STATS_FIGURES},
    f"{RESULTS}/tables/checkpoint_audit.csv": "Checkpoint audit",
    f"{RESULTS}/tables/defective.csv": "Revisions the checkpoint audits flagged",
    **{f"{RESULTS}/figures/measure_{m}.png": "not in the paper" for m in MEASURES},
    f"{RESULTS}/figures/training_loss.png": "Training loss",
    f"{RESULTS}/training_loss.csv": "Training loss",
    f"{RESULTS}/tables/mcc.csv": "Table 1 (paper Table 1)",
    f"{RESULTS}/tables/mcc_seeds.csv": "Table 1 (paper Table 1)",
    f"{RESULTS}/figures/mcc_sensitivity.png": "Table 1, threshold sensitivity",
    f"{RESULTS}/metrics.csv": "linear CKA",
}


def report_data(html: str) -> dict[str, object]:
    """The JSON objects the report page embeds (``var results = {...};`` and the like)."""
    found = re.findall(r"<script id=\"[\w-]+\">\s*var (\w+) = (.*);\s*</script>", html)
    return {name: json.loads(value) for name, value in found}


def check_report(data: dict[str, object]) -> None:
    results, categories = data["results"], data["categories"]
    assert set(results) == set(REPORTED), sorted(results)
    for path, phrase in REPORTED.items():
        assert phrase in results[path]["caption"], (path, results[path]["caption"])
    # one category per paper figure, named after it and holding exactly that figure
    for f in FIGURES:
        (name,) = [c for c, sub in categories.items()
                   if f"{RESULTS}/figures/{f}.png" in sum(sub.values(), [])]
        assert name.startswith(f"Figure {f[-1]}:"), name
        assert sum(categories[name].values(), []) == [f"{RESULTS}/figures/{f}.png"]
    # one category per measure, holding exactly its figure
    for m in MEASURES:
        assert sum(categories[measure_category(m)].values(), []) == [
            f"{RESULTS}/figures/measure_{m}.png"]
    (table1,) = [c for c in categories if c.startswith("Table 1")]
    assert sorted(sum(categories[table1].values(), [])) == [
        f"{RESULTS}/figures/mcc_sensitivity.png", f"{RESULTS}/tables/mcc.csv",
        f"{RESULTS}/tables/mcc_seeds.csv"]
    # the front page describes this run's configuration
    desc = " ".join(data["workflow_desc"].split())
    assert "Tending Towards Stability" in desc
    assert f"sizes {', '.join(TINY['sizes'])}, {len(TINY['steps'])} checkpoint steps" in desc


def test_zip_report_has_every_figure_and_table_with_caption_and_category(tiny_run, tmp_path):
    out = tmp_path / "report.zip"
    snakemake(tiny_run, "--configfile", "config/tiny.yaml", "--report", str(out))
    with zipfile.ZipFile(out) as z:
        (page,) = [n for n in z.namelist() if n.endswith("/report.html")]
        data = report_data(z.read(page).decode())
        check_report(data)
        # the files themselves, byte for byte
        root = page.rsplit("/", 1)[0]
        for path, entry in data["results"].items():
            packed = z.read(f"{root}/{entry['data_uri']}")
            assert packed == (tiny_run / path).read_bytes(), path


def test_html_report_is_self_contained(tiny_run, tmp_path):
    out = tmp_path / "report.html"
    snakemake(tiny_run, "--configfile", "config/tiny.yaml", "--report", str(out))
    data = report_data(out.read_text())
    check_report(data)
    for path, entry in data["results"].items():
        uri = entry["data_uri"]
        assert uri.startswith("data:"), (path, uri[:80])
        payload = base64.b64decode(uri.split("base64,", 1)[1])
        assert payload == (tiny_run / path).read_bytes(), path

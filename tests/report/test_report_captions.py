"""``snakemake --report`` builds without docutils errors (issue 17): every caption under
workflow/report/ is rendered as Snakemake renders it (Jinja2 first, then reStructuredText
through docutils, which reports e.g. ``|x|`` as an undefined substitution reference), and
docutils reports nothing at level warning or above."""

from __future__ import annotations

import io
from pathlib import Path

import docutils.core
import jinja2
import pytest
import yaml

REPORT = Path(__file__).resolve().parents[2] / "workflow" / "report"


@pytest.mark.parametrize("caption", sorted(REPORT.glob("*.rst")), ids=lambda p: p.name)
def test_caption_renders_without_docutils_messages(caption):
    env = jinja2.Environment(undefined=jinja2.ChainableUndefined)
    config = yaml.safe_load((REPORT.parents[1] / "config" / "tiny.yaml").read_text())
    context = {"snakemake": {"config": config, "wildcards": {}}}
    text = env.from_string(caption.read_text()).render(**context)
    messages = io.StringIO()
    docutils.core.publish_parts(text, writer_name="html", settings_overrides={
        "warning_stream": messages, "report_level": 2, "halt_level": 5})
    assert messages.getvalue() == "", messages.getvalue()

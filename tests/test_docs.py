"""The documentation: the generated configuration reference covers every key of every schema
(with its type, default and allowed values), and every link of the README points at an
existing page of the site. Cheap: no mkdocs needed (``mkdocs build --strict`` in CI checks the
site's own links and anchors)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
#: How the pages write JSON types that are not plain words.
TYPE_WORDS = {"array": ("list of",), "object": ("object", "mapping to")}


def _load_generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _deref(node: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    node = dict(node)
    while "$ref" in node:
        target = schema
        for part in node.pop("$ref").removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **node}
    return node


def schema_keys(node: Mapping[str, Any], schema: Mapping[str, Any],
                path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(regex of the key's row name, its schema) for every key below ``node``: properties,
    the keys of maps (any ``<name>``), list items' keys, and keys of every ``oneOf`` branch."""
    node = _deref(node, schema)
    for branch in node.get("oneOf", []) + node.get("anyOf", []):
        yield from schema_keys(branch, schema, path)
    for name, child in node.get("properties", {}).items():
        key = f"{path}\\.{re.escape(name)}" if path else re.escape(name)
        yield key, _deref(child, schema)
        yield from schema_keys(child, schema, key)
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_keys(node["additionalProperties"], schema, f"{path}\\.<[a-z_]+>")
    if isinstance(node.get("items"), dict):
        yield from schema_keys(node["items"], schema, f"{path}\\[\\]")


def _rows(markdown: str) -> dict[str, str]:
    """Row name -> the whole table row, for every key row of a reference page."""
    rows = {}
    for line in markdown.splitlines():
        if m := re.match(r"\| `([^`]+)` \|", line):
            assert m.group(1) not in rows, f"two rows for {m.group(1)}"
            rows[m.group(1)] = line
    return rows


def _type_cell(row: str, markdown: str) -> str:
    """The row's type cell, with the type line of each shared definition it links to."""
    cell = row.split("|")[2]
    for name in re.findall(r"\(#(def-[a-z-]+)\)", cell):
        section = markdown.split(f"{{#{name}}}", 1)[1]
        cell += re.search(r"Type: ([^.]*)\.", section).group(1)
    return cell


@pytest.mark.parametrize("uri", list(gen.PAGES))
def test_the_reference_has_a_row_for_every_schema_key(uri):
    page = gen.PAGES[uri]
    schema = page.load()
    root = _deref(schema, schema)
    prefix = ""
    if page.root is not None:
        root = _deref(root["properties"][page.root], schema)
        prefix = re.escape(page.root)
    expected = list(schema_keys(root, schema, prefix))
    assert len(expected) > 10
    markdown = gen.render(page)
    rows = _rows(markdown)
    for pattern, node in expected:
        found = [name for name in rows if re.fullmatch(pattern, name)]
        assert found, f"{uri}: no row for schema key {pattern}"
        row = rows[found[0]]
        if "default" in node:
            assert json.dumps(node["default"]) in row, f"{found[0]}: default missing"
        for value in node.get("enum", ()):
            assert json.dumps(value) in row, f"{found[0]}: allowed value {value!r} missing"
        types = node.get("type", ())
        shown = _type_cell(row, markdown)
        for kind in [types] if isinstance(types, str) else types:
            words = TYPE_WORDS.get(kind, (kind,))
            assert any(w in shown for w in words), f"{found[0]}: type {kind} missing"
        if node.get("description"):
            words = re.findall(r"[A-Za-z]{4,}", node["description"])[:3]
            assert all(w in row for w in words), f"{found[0]}: description missing"


def test_every_top_level_key_of_the_config_schema_has_a_row():
    """The config schema's own keys by name, independently of the walk above."""
    rows = _rows(gen.render(gen.PAGES["reference/configuration.md"]))
    for key in gen.config_schema()["properties"]:
        assert key in rows


def test_a_new_schema_key_gets_its_row(monkeypatch):
    """The page follows the schema it is given: nothing is listed by hand."""
    page = gen.PAGES["reference/configuration.md"]
    schema = json.loads(json.dumps(page.load()))
    schema["properties"]["metrics"]["properties"]["brand_new"] = {
        "type": "integer", "default": 7, "minimum": 3, "description": "a key added today"}
    monkeypatch.setattr(gen, "config_schema", lambda: schema)
    patched = gen.Page(page.title, page.intro, gen.config_schema)
    row = _rows(gen.render(patched))["metrics.brand_new"]
    assert "integer" in row and "`7`" in row and "≥ 3" in row and "a key added today" in row


def _nav_pages(nav: Any) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_pages(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def test_every_nav_page_exists_or_is_generated():
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    for page in _nav_pages(config["nav"]):
        assert (DOCS / page).is_file() or page in gen.PAGES, f"mkdocs.yml nav: {page} missing"


def _slugs(markdown: str) -> set[str]:
    """Heading anchors as mkdocs' toc makes them (lowercase, punctuation dropped, dashes)."""
    slugs = set()
    for line in markdown.splitlines():
        if m := re.match(r"#+ (.*)", line):
            text = re.sub(r"[^\w\s-]", "", m.group(1).replace("`", "")).strip().lower()
            slugs.add(re.sub(r"[-\s]+", "-", text))
    return slugs


def test_every_readme_link_points_at_an_existing_docs_page():
    readme = (REPO / "README.md").read_text()
    nav = set(_nav_pages(yaml.safe_load((REPO / "mkdocs.yml").read_text())["nav"]))
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    local = [link for link in links if not re.match(r"[a-z]+:", link)]
    assert len(local) >= 10
    for link in local:
        target, _, anchor = link.partition("#")
        path = (REPO / target).resolve()
        assert path.is_file(), f"README links to {link}: no such file"
        assert path.is_relative_to(DOCS) and path.suffix == ".md", f"{link}: not a docs page"
        assert str(path.relative_to(DOCS)) in nav, f"{link}: not in mkdocs.yml's nav"
        if anchor:
            assert anchor in _slugs(path.read_text()), f"{link}: no such heading"


def test_the_readme_stays_short_and_keeps_the_quick_start():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    ci = (REPO / ".ci" / "run").read_text()
    assert 'snakemake --cores all --configfile config/tiny.yaml' in readme
    assert "\npython -m pytest\n" in readme
    assert 'pip install -e ".[test]"' in readme and 'pip install --quiet -e ".[test]"' in ci

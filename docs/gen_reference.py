"""The configuration reference pages, generated from the JSON schemas every time the site builds.

``mkdocs.yml`` names this file under ``hooks:``; its :func:`on_files` adds the pages of
:data:`PAGES` to the site from the schemas as they are at build time (they are never written
into ``docs/``, so they cannot go stale): every key, nested ones included, with its type,
default, allowed values and the schema's own description.

- the workflow configuration: the schema :mod:`lmdynamics.options` reads;
- a suite definition: ``suite.schema.yaml`` of :mod:`lmdynamics.sources.suites`;
- the ``interventions`` section: the interventions schema :mod:`lmdynamics.options` reads.

``python docs/gen_reference.py OUT_DIR`` writes the same pages into ``OUT_DIR`` (to read them
without mkdocs). ``tests/test_docs.py`` checks that every key of every schema has its row.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: What a map's keys are called in its rows (``tiny.models.<size>.hidden_size``), by the
#: map's own key.
KEY_NAMES = {"models": "size", "sizes": "size", "variants": "variant"}


def config_schema() -> dict[str, Any]:
    from lmdynamics import options

    return options.schema()


def suite_schema() -> dict[str, Any]:
    from lmdynamics.sources import suites

    return suites.schema()


def interventions_schema() -> dict[str, Any]:
    from lmdynamics import options

    return options.schema("interventions")


@dataclass(frozen=True)
class Page:
    title: str
    intro: str
    load: Callable[[], dict[str, Any]]
    #: the schema's property that holds the keys documented (None: the schema's own)
    root: str | None = None
    #: key -> a link appended to its description (where another page documents it)
    see_also: Mapping[str, str] = field(default_factory=dict)


PAGES: dict[str, Page] = {
    "reference/configuration.md": Page(
        "Configuration reference",
        "Every key of the workflow configuration (`config/tiny.yaml`, `config/config.yaml`, "
        "or a file of your own given with `--configfile`), generated from the config schema "
        "that the workflow and `lmdynamics.options` read. A key without a default is unset "
        "unless the configuration sets it. How a configuration is checked: "
        "[Configuration files](../guide/configuring.md).",
        config_schema,
        see_also={"interventions": "[Interventions configuration reference](interventions.md)",
                  "suite_file": "[Suite definition reference](suite-definition.md)"}),
    "reference/suite-definition.md": Page(
        "Suite definition reference",
        "Every key of a suite definition (a shipped one in `src/lmdynamics/sources/suites/`, "
        "or your own named by the config's `suite_file`), generated from "
        "`suite.schema.yaml`. How to write one: [Suites](../guide/suites.md).",
        suite_schema),
    "reference/interventions.md": Page(
        "Interventions configuration reference",
        "Every key of the config's `interventions` section, generated from "
        "`src/lmdynamics/schemas/interventions.schema.yaml`. What the study does: "
        "[Interventions](../guide/interventions.md).",
        interventions_schema, root="interventions"),
}


@dataclass(frozen=True)
class Row:
    key: str
    type: str
    default: str
    allowed: str
    description: str


def _ref_name(node: Mapping[str, Any]) -> str | None:
    ref = node.get("$ref")
    return ref.removeprefix("#/$defs/") if isinstance(ref, str) else None


def resolve(node: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with its local ``$ref`` merged in (the node's own keys win)."""
    node = dict(node)
    name = _ref_name(node)
    if name is None:
        return node
    node.pop("$ref")
    return {**resolve(schema["$defs"][name], schema), **node}


def _is_object(node: Mapping[str, Any]) -> bool:
    return ("properties" in node or isinstance(node.get("additionalProperties"), dict)
            or node.get("type") == "object")


def _linked_def(node: Mapping[str, Any], schema: Mapping[str, Any]) -> str | None:
    """The name of a scalar definition ``node`` refers to (linked, not expanded)."""
    name = _ref_name(node)
    if name is None or _is_object(schema["$defs"][name]):
        return None
    return name


def value(v: Any) -> str:
    """A schema value as the config writes it (JSON/YAML: true, null, [0.0, 0.5])."""
    return f"`{json.dumps(v, ensure_ascii=False)}`"


def _types(node: Mapping[str, Any]) -> list[str]:
    t = node.get("type")
    if t is None:
        if "enum" in node:
            kinds = {type(v).__name__ for v in node["enum"]}
            return ["string"] if kinds == {"str"} else []
        return []
    return [t] if isinstance(t, str) else list(t)


def type_text(node: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
    """What kind of value a key takes: its JSON type(s), a linked definition, list items."""
    alternatives = node.get("oneOf") or node.get("anyOf")
    if alternatives:
        return " or ".join(type_text(resolve(a, schema) if _linked_def(a, schema) is None
                                     else a, schema) for a in alternatives)
    name = _linked_def(node, schema)
    if name is not None:
        return f"[{name}](#def-{name.replace('_', '-')})"
    node = resolve(node, schema)
    types = _types(node) or (["object"] if _is_object(node) else [])
    if "array" in types:
        items = node.get("items")
        inner = type_text(items, schema) if isinstance(items, dict) else "any"
        types = [f"list of {inner}" if t == "array" else t for t in types]
    if isinstance(node.get("additionalProperties"), dict) and "properties" not in node:
        inner = type_text(node["additionalProperties"], schema)
        types = [f"mapping to {inner}" if t == "object" else t for t in types] or [
            f"mapping to {inner}"]
    return " or ".join(types) if types else "any"


def _bound(node: Mapping[str, Any]) -> str:
    low = ("≥", node["minimum"]) if "minimum" in node else (
        (">", node["exclusiveMinimum"]) if "exclusiveMinimum" in node else None)
    high = ("≤", node["maximum"]) if "maximum" in node else (
        ("<", node["exclusiveMaximum"]) if "exclusiveMaximum" in node else None)
    return ", ".join(f"{op} {n}" for op, n in filter(None, (low, high)))


def allowed_text(node: Mapping[str, Any], schema: Mapping[str, Any]) -> str:
    """The values a key accepts beyond its type: choices, bounds, patterns, lengths."""
    if _linked_def(node, schema) is not None:
        node = {k: v for k, v in node.items() if k != "$ref"}
    parts = []
    if "enum" in node:
        parts.append("one of " + ", ".join(value(v) for v in node["enum"]))
    if bound := _bound(node):
        parts.append(bound)
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    if isinstance(node.get("not"), dict) and "pattern" in node["not"]:
        parts.append(f"must not match `{node['not']['pattern']}`")
    for key, bound, unit in (("minLength", "at least", "character"), ("maxLength", "at most",
                             "character"), ("minItems", "at least", "item"), ("maxItems",
                             "at most", "item"), ("minProperties", "at least", "key"),
                             ("maxProperties", "at most", "key")):
        if key in node:
            parts.append(f"{bound} {node[key]} {unit}{'' if node[key] == 1 else 's'}")
    if node.get("uniqueItems"):
        parts.append("no repeats")
    items = node.get("items")
    if isinstance(items, dict) and not _is_object(resolve(items, schema)):
        inner = allowed_text(items, schema)
        if inner:
            parts.append(f"each item: {inner}")
    names = node.get("propertyNames")
    if isinstance(names, dict):
        inner = type_text(names, schema) if _linked_def(names, schema) else allowed_text(
            names, schema)
        if inner:
            parts.append(f"keys: {inner}")
    return "; ".join(parts)


def text(description: str | None) -> str:
    """A schema description as one table cell: markup characters outside code spans escaped."""
    if not description:
        return ""
    pieces = " ".join(description.split()).split("`")
    for i in range(0, len(pieces), 2):  # even pieces are outside code spans
        pieces[i] = (pieces[i].replace("&", "&amp;").replace("<", "&lt;")
                     .replace(">", "&gt;").replace("*", r"\*"))
    return "`".join(pieces).replace("|", r"\|")


def _key_name(path: str) -> str:
    return KEY_NAMES.get(path.rpartition(".")[2], "key")


def rows(node: Mapping[str, Any], schema: Mapping[str, Any], path: str = "",
         required: bool = False) -> Iterator[Row]:
    """One row for ``node`` (unless it is the root) and one for every key below it."""
    node = resolve(node, schema) if _linked_def(node, schema) is None else dict(node)
    if path:
        if "default" in node:
            default = value(node["default"])
        else:
            default = "required" if required else "unset"
        yield Row(path, type_text(node, schema), default, allowed_text(node, schema),
                  text(node.get("description")))
    for alternative in node.get("oneOf", []) + node.get("anyOf", []):
        alternative = resolve(alternative, schema)
        if _is_object(alternative):
            yield from _children(alternative, schema, path)
    if _is_object(node):
        yield from _children(node, schema, path)
    items = node.get("items")
    if isinstance(items, dict) and "properties" in resolve(items, schema):
        yield from _children(resolve(items, schema), schema, f"{path}[]")


def _children(node: Mapping[str, Any], schema: Mapping[str, Any], path: str) -> Iterator[Row]:
    prefix = f"{path}." if path else ""
    required = set(node.get("required", ()))
    for name, child in node.get("properties", {}).items():
        yield from rows(child, schema, prefix + name, name in required)
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        inner = resolve(extra, schema)
        if _is_object(inner):
            yield from _children(inner, schema, f"{prefix}<{_key_name(path)}>")


def table(found: list[Row], see_also: Mapping[str, str]) -> list[str]:
    lines = ["| key | type | default | allowed | description |", "|---|---|---|---|---|"]
    for r in found:
        more = ""
        if r.key in see_also:
            more = f"{'. ' if r.description else ''}See {see_also[r.key]}."
        lines.append(f"| `{r.key}` | {r.type} | {r.default} | {r.allowed} | "
                     f"{r.description}{more} |")
    return lines


def _definitions(schema: Mapping[str, Any]) -> list[str]:
    """A section per scalar definition that rows link to (object ones are expanded inline)."""
    out = []
    for name, node in schema.get("$defs", {}).items():
        if _is_object(node):
            continue
        out += ["", f"### `{name}` {{#def-{name.replace('_', '-')}}}", ""]
        if node.get("description"):
            out += [text(node["description"]), ""]
        out += [f"Type: {type_text(node, schema)}. "
                f"Allowed: {allowed_text(node, schema) or 'any value of the type'}."]
    return ["", "## Shared definitions", *out] if out else []


def render(page: Page) -> str:
    """The markdown of one reference page."""
    schema = page.load()
    node = resolve(schema, schema)
    if page.root is not None:
        node = resolve(node["properties"][page.root], schema)
    out = [f"# {page.title}", "", page.intro, ""]
    if schema.get("description"):
        out += [f"Schema: {text(schema['description']).rstrip('.')}.", ""]
    props = node.get("properties", {})
    required = set(node.get("required", ()))
    prefix = f"{page.root}." if page.root else ""
    top = [name for name, child in props.items() if "properties" not in resolve(child, schema)]
    sections = [name for name in props if name not in top]
    if top:
        out += ["## Top-level keys", ""]
        out += table([r for name in top
                      for r in rows(props[name], schema, prefix + name, name in required)],
                     page.see_also)
    for name in sections:
        out += ["", f"## `{prefix}{name}`", ""]
        out += table(list(rows(props[name], schema, prefix + name, name in required)),
                     page.see_also)
    out += _definitions(schema)
    out += ["", "---", "", "*Generated by `docs/gen_reference.py` from the schema when the site "
            "builds; edit the schema's descriptions, not this page.*", ""]
    return "\n".join(out)


def on_files(files, config):  # mkdocs hook
    """Add the generated pages to the site's files (before the navigation is built)."""
    from mkdocs.structure.files import File

    for uri, page in PAGES.items():
        files.append(File.generated(config, uri, content=render(page)))
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    for uri, page in PAGES.items():
        out = Path(argv[0]) / uri
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(page), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

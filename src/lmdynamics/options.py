"""One source of truth from the config to the code: a job's options are one config section.

The package's JSON schema (``lmdynamics/schemas/config.schema.yaml``, package data) is the only
place where a config option, its type, its allowed values and its default are written down.
This module reads it once and gives the rest of the package (and the workflow, whose
``common.smk`` validates the config against the same file, :func:`schema_path`):

- :func:`defaults`: the schema's defaults of a section (nested sections as dicts), which the
  typed options classes (:class:`lmdynamics.report.tables.MCCOptions`,
  :class:`lmdynamics.reduction.cka.CKAOptions`, ...) use as their field defaults;
- :func:`enum`: a key's allowed values (``tests/test_options.py`` asserts that every enum of
  the schema equals the allowed values the code declares beside its use);
- :func:`resolve`: a section as a job receives it, checked against the schema (one line per
  bad key) with the schema's defaults filled in;
- :func:`job_options` / :func:`parse`: the ``--options`` argument of ``lmdynamics``
  subcommands, the config sections a job reads as one JSON object, built by the rule
  (``--options {params.options:q}``) or, for a step run by hand, given inline or as the path
  of a ``.json`` file; what it leaves out takes the schema's default. So a rule hands its job
  the options in one piece, and adding an option is one schema entry plus the code using it.

The schemas are read with :mod:`importlib.resources`, so an installed wheel reads them as a
source checkout does.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import functools
import importlib.resources
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

#: The schemas shipped with the package: ``<name>.schema.yaml`` for ``name`` in
#: ``config`` (the workflow config) and ``interventions`` (its ``interventions`` section).
SCHEMAS = importlib.resources.files("lmdynamics") / "schemas"
_FILES = contextlib.ExitStack()
atexit.register(_FILES.close)


def schema_path(name: str = "config") -> Path:
    """A file-system path of the package's schema ``name`` (for readers that take a path,
    such as Snakemake's ``validate``); valid until the process exits."""
    return _FILES.enter_context(importlib.resources.as_file(SCHEMAS / f"{name}.schema.yaml"))


@functools.cache
def schema(name: str = "config") -> dict[str, Any]:
    """The package's schema ``name`` (default: the config schema), parsed once per process."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: ~10x faster
    text = (SCHEMAS / f"{name}.schema.yaml").read_text(encoding="utf-8")
    return yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)


def _resolve_ref(node: Mapping[str, Any]) -> dict[str, Any]:
    """``node`` with a local ``$ref`` (``#/$defs/name``) merged in (its own keys win)."""
    node = dict(node)
    ref = node.pop("$ref", None)
    if ref is None:
        return node
    target: Any = schema()
    for part in ref.removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve_ref(target), **node}


def section_schema(section: str) -> dict[str, Any]:
    """The schema of top-level config key ``section`` (``$ref`` resolved)."""
    props = schema()["properties"]
    if section not in props:
        raise KeyError(f"{section!r} is not a section of the config schema; sections: "
                       + ", ".join(props))
    return _resolve_ref(props[section])


def _defaults_of(node: Mapping[str, Any]) -> Any:
    node = _resolve_ref(node)
    if node.get("type") == "object" and "properties" in node:
        return {k: _defaults_of(v) for k, v in node["properties"].items()
                if "default" in _resolve_ref(v) or _resolve_ref(v).get("type") == "object"}
    return copy.deepcopy(node.get("default"))


def defaults(section: str) -> dict[str, Any]:
    """The schema's default of every key of ``section`` (nested objects as dicts)."""
    return _defaults_of(section_schema(section))


def enum(section: str, *keys: str) -> tuple[Any, ...]:
    """Allowed values of ``section.keys...`` as the schema lists them, in its order."""
    node = section_schema(section)
    for key in keys:
        node = _resolve_ref(node["properties"][key])
    return tuple(node["enum"])


def _merge(default: Any, given: Any) -> Any:
    if isinstance(default, dict) and isinstance(given, Mapping):
        return {**default, **{k: _merge(default.get(k), v) for k, v in given.items()}}
    return default if given is None else given


def with_defaults(node: Mapping[str, Any], given: Mapping[str, Any]) -> dict[str, Any]:
    """``given`` with the defaults of the object schema ``node`` filled in where it leaves a
    key out (nested objects too), for a schema file of its own (e.g. the intervention
    study's); unchecked: validate ``given`` first."""
    return _merge(_defaults_of(node), given)


def resolve(section: str, given: Any = None, keys: Collection[str] | None = None) -> Any:
    """``given`` (config section ``section``, or a subset of it) checked against the schema,
    with the schema's defaults filled in. Raises ValueError listing every bad key as
    ``section.key: value — what is allowed``. ``keys``: only these keys of the section are
    read (the section's other keys, required ones too, are neither checked nor filled in; a
    read key without a default that ``given`` leaves out is None)."""
    from lmdynamics.validation import schema_errors

    node = section_schema(section)
    if keys is not None:
        node = {**node, "properties": {k: v for k, v in node["properties"].items() if k in keys},
                "required": [k for k in node.get("required", ()) if k in keys]}
    is_object = node.get("type") == "object"
    if given is None:
        given = {} if is_object else node.get("default")
        if given is None:  # a key without a default (e.g. family): unset stays unset
            return None
    root = {k: v for k, v in schema().items() if k not in ("properties", "required", "allOf")}
    errors = schema_errors({section: given}, {**root, "properties": {section: node}})
    if errors:
        raise ValueError("invalid options: " + "; ".join(errors))
    if not is_object:
        return given
    filled = _merge(defaults(section), given)
    if keys is None:
        return filled
    return {k: filled.get(k) for k in node["properties"]}  # unset without a default: None


def _heads(reads: Sequence[str]) -> list[str]:
    """The sections of ``reads`` (``section`` or ``section.key`` entries), in order, once."""
    return list(dict.fromkeys(entry.partition(".")[0] for entry in reads))


def _keys(reads: Sequence[str]) -> dict[str, set[str] | None]:
    """The keys ``reads`` names of each of its sections (None: the whole section)."""
    keys: dict[str, set[str] | None] = {}
    for entry in reads:
        section, _, key = entry.partition(".")
        if not key:
            keys[section] = None
        elif keys.get(section, set()) is not None:
            keys.setdefault(section, set()).add(key)
    return keys


def _only(chosen: dict[str, Any], reads: Sequence[str]) -> dict[str, Any]:
    """``chosen`` ({section: value}) cut to ``reads``: a ``section.key`` entry keeps only the
    keys of its section that ``reads`` names; a ``section`` entry keeps the whole section."""
    keys = _keys(reads)
    return {s: chosen[s] if keys[s] is None else {k: v for k, v in chosen[s].items()
                                                  if k in keys[s]}
            for s in keys}


def parse(text: str | None, reads: Sequence[str]) -> dict[str, Any]:
    """The ``--options`` argument of a job that reads ``reads`` of the config (a ``section``,
    or one key of it, ``section.key``): a JSON object ``{section: value}`` inline, or the path
    of a file holding one (``None``: all defaults). Every section is checked and completed by
    :func:`resolve`, then cut to what the job reads (so code reading a key its list lacks
    fails); sections it does not read are refused, and a required top-level key it reads
    (``tokens``) must be given."""
    sections = _heads(reads)
    value: Any = {}
    if text is not None:
        stripped, source = text.strip(), "--options"
        if not stripped.startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"--options {text!r}: neither a JSON object nor an existing "
                                 "file; give e.g. --options '{\"figures\": {\"x_axis\": "
                                 "\"step\"}}' or the path of a .json file")
            source, stripped = str(path), path.read_text()
        try:
            value = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}: not valid JSON ({exc}); give a JSON object of the "
                             "config sections " + ", ".join(sections)) from None
        if not isinstance(value, dict):
            raise ValueError(f"{source}: expected a JSON object of the config sections "
                             f"{', '.join(sections)}; got {type(value).__name__}")
        unknown = sorted(set(value) - set(sections))
        if unknown:
            raise ValueError(f"{source}: unknown section(s) {', '.join(unknown)}; this step "
                             "reads " + ", ".join(sections))
    keys = _keys(reads)
    parsed = {s: resolve(s, value.get(s), keys[s]) for s in sections}
    missing = [s for s in sections if parsed[s] is None and s in schema().get("required", ())]
    if missing:
        raise ValueError(f"--options: config key(s) {', '.join(missing)} required by this step "
                         f"and not given; give e.g. --options '{{\"{missing[0]}\": ...}}'")
    return _only(parsed, reads)


def job_options(config: Mapping[str, Any], *reads: str) -> str:
    """The ``--options`` argument a rule hands its job: what the job reads of the validated
    ``config`` (``section`` or ``section.key`` entries, the list its subcommand declares in
    :data:`lmdynamics.commands.READS` or ``--options`` help) as one JSON object, keys sorted
    (so reordering a config file reruns nothing). Snakemake reruns a job whose parameters
    changed: a key the job reads reruns it, and a key it does not read is not there."""
    chosen = _only({s: config[s] for s in _heads(reads)}, reads)
    return json.dumps(chosen, sort_keys=True, separators=(",", ":"))

"""Validation of configuration values, shared by the workflow config, suite definitions and
the options of a job: schema violations and YAML/JSON forms a loader would take silently, one
message per bad value, ``config key 'k': value is not allowed; allowed: ...``.

A leaf: it imports nothing of lmdynamics, so :mod:`lmdynamics.config`,
:mod:`lmdynamics.sources.suites` and :mod:`lmdynamics.options` can all use it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

#: Patterns of the schema's string values (``\A...\Z``: ``$`` would also match before a final
#: newline). Each must equal the schema's text, which is how :data:`PATTERN_HINTS` finds it.
#: Labels become path components (suite, sizes, model names).
LABEL_PATTERN = r"\A[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z"
#: ``hub.repo`` and ``hub.revision``: templates whose formatted values are checked in full below.
REPO_TEMPLATE_PATTERN = r"\A[A-Za-z0-9_./{}-]*\{size\}[A-Za-z0-9_./{}-]*\Z"
REVISION_TEMPLATE_PATTERN = r"\A[A-Za-z0-9_./+{}-]*\{step\}[A-Za-z0-9_./+{}-]*\Z"
#: A Hugging Face repo id: ``owner/name`` (hub rules: no '--' or '..', at most 96 characters).
REPO_ID = r"\A[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*\Z"
#: A git revision name as the hub accepts it (a branch or tag such as step143000, a sha, or
#: refs/pr/1): no leading '/' or '-', no '//' (and, checked separately, no '..').
REVISION_NAME = r"\A[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*\Z"
#: A local path (``hub.tokens_path``): anything but control characters (the rules quote it)
#: and braces (Snakemake would read them as wildcards of the rule's input).
PATH_PATTERN = r"\A[^\x00-\x1f\x7f{}]+\Z"
#: ``local.path`` and ``local.recorded``: path templates with ``{step}`` (fields checked by
#: :func:`lmdynamics.sources.local.template_fields`); ``steps: discover`` (source local).
LOCAL_TEMPLATE_PATTERN = r"\A[^\x00-\x1f\x7f]*\{step\}[^\x00-\x1f\x7f]*\Z"
DISCOVER_PATTERN = r"\Adiscover\Z"
REPO_ID_PATTERN = re.compile(REPO_ID)
REVISION_PATTERN = re.compile(REVISION_NAME)
#: What a schema ``pattern`` asks for, in words (patterns not listed are shown as regexes).
PATTERN_HINTS = {
    LABEL_PATTERN: "a plain name: letters, digits, '_', '.', '+', '-', not starting with '.' "
                   "or '-', no path separators",
    REPO_TEMPLATE_PATTERN: "a template of letters, digits, '_', '.', '-', '/' containing "
                           "'{size}', e.g. 'EleutherAI/pythia-{size}-deduped'",
    REVISION_TEMPLATE_PATTERN: "a template of letters, digits, '_', '.', '+', '-', '/' "
                               "containing '{step}', e.g. 'step{step}'",
    REPO_ID: "a repo id 'owner/name' of letters, digits, '_', '.', '-'",
    REVISION_NAME: "a branch, tag or commit name of letters, digits, '_', '.', '+', '-', '/' "
                   "(no leading or doubled '/')",
    PATH_PATTERN: "a file or folder path without control characters (newline, tab, NUL) "
                  "or braces",
    LOCAL_TEMPLATE_PATTERN: "a path template with {step} (and {size}, {seed}) without "
                            "control characters, e.g. 'runs/{size}/checkpoint-{step}'",
    DISCOVER_PATTERN: "a list of steps, or 'discover' (source local)",
}
#: Deepest nesting of a config value (the schema's deepest key is 4 levels down).
MAX_DEPTH = 16


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names key, value and what is allowed."""


def key_name(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


def show_value(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a message stays one readable line)."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a {type(value).__name__} nested too deeply to show"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _is_integer(checker: Any, instance: Any) -> bool:
    # JSON Schema counts 1024.0 as an integer; YAML's 1024.0 is a float that would be
    # truncated somewhere later, so only a real int (not a bool) is an integer here.
    return isinstance(instance, int) and not isinstance(instance, bool)


_Validator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def _allowed(error: jsonschema.ValidationError) -> str:
    v, kind = error.validator_value, error.validator
    if kind == "enum":
        return "one of " + ", ".join(map(str, v))
    if kind == "pattern":
        return PATTERN_HINTS.get(v, f"a string matching the regular expression {v!r}")
    if kind == "not":
        return "a plain name without '..'"
    if kind in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        ops = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=",
               "exclusiveMaximum": "<"}
        return f"a value {ops[kind]} {v}"
    if kind == "type" and v == "integer" and isinstance(error.instance, float):
        return "an integer, written without a decimal point or exponent"
    if kind == "type":
        return f"a value of type {v}"
    if kind == "required":
        return f"the key {error.message.split(' ')[0]} to be set"
    if kind == "additionalProperties":
        return "only the keys " + ", ".join(error.schema.get("properties", {}))
    if kind == "uniqueItems":
        seen: set[str] = set()
        repeated = [x for x in error.instance if repr(x) in seen or seen.add(repr(x))]
        return f"distinct values (repeated: {', '.join(map(repr, repeated))})"
    if kind in ("minItems", "minProperties"):
        return f"at least {v} {'item' if kind == 'minItems' else 'entry'}{'s' * (v != 1)}"
    if kind == "maxLength":
        return f"at most {v} characters"
    if kind in ("maxItems", "maxProperties"):
        return f"at most {v} {'items' if kind == 'maxItems' else 'entries'}"
    return error.message


def schema_errors(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Messages for every schema violation, each naming the key, the value and what is allowed."""
    validator = _Validator(schema)
    messages = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        while err.validator in ("oneOf", "anyOf") and err.context:  # the deepest branch's
            err = max(err.context, key=lambda e: len(e.relative_path))
        err.path = err.absolute_path
        if err.validator == "additionalProperties":
            known = set(err.schema.get("properties", {}))
            unknown = [k for k in err.instance if k not in known]
            messages.append(f"config key '{key_name(err.path)}': unknown key(s) "
                            f"{', '.join(map(show_value, unknown))}; allowed: {_allowed(err)}")
            continue
        messages.append(f"config key '{key_name(err.path)}': {show_value(err.instance)} is not "
                        f"allowed; allowed: {_allowed(err)}")
    return messages


def nonfinite_errors(config: Any) -> list[str]:
    """Every NaN or infinity in the config (range checks cannot see NaN: it compares false),
    and values nested deeper than any key of the schema (which would exhaust the recursion of
    the schema validator)."""
    errors, deep, stack = [], set(), [((), config)]
    while stack:  # no recursion: any nesting depth
        path, value = stack.pop()
        if len(path) > MAX_DEPTH:
            deep.add(path[0])
        elif isinstance(value, float) and not math.isfinite(value):
            errors.append(f"config key '{key_name(path)}': {value} is not allowed; "
                          f"allowed: a finite number")
        elif isinstance(value, Mapping):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    errors += [f"config key '{key}': a value nested more than {MAX_DEPTH} levels deep is not "
               f"allowed; allowed: the structure of the schema" for key in deep]
    return sorted(errors)


def config_file_errors(files: Iterable[Path | str]) -> list[str]:
    """What a strict reading of each config file refuses (see :func:`yaml_errors`)."""
    errors: list[str] = []
    seen: set[Path] = set()
    for file in files:
        path = Path(file).resolve()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        try:
            text = read_text_bounded(path, "config file")
        except ConfigError as exc:
            errors.append(str(exc))
            continue
        problems = json_errors(text)
        if problems is None:  # not JSON: YAML
            problems = yaml_errors(text)
        errors += [f"config file {file}, {e}" for e in problems]
    return errors


def json_errors(text: str) -> list[str] | None:
    """Repeated keys of a JSON document (Snakemake reads a config file as JSON first), or None
    when ``text`` is not JSON."""
    repeated: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        repeated.extend(k for i, k in enumerate(keys) if k in keys[:i])
        return dict(items)

    try:
        json.loads(text, object_pairs_hook=pairs)
    except ValueError:
        return None
    return [f"config key {k!r} is given twice; allowed: each key once" for k in repeated]


#: Integers that YAML 1.1 (PyYAML, Snakemake) reads differently from YAML 1.2 and from what
#: a reader sees: ``0777`` is octal 511, ``0b11`` binary 3, ``1:30`` sexagesimal 90.
_YAML11_NUMBER = re.compile(r"[-+]?(0[0-9_]+|0b[01_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?)")


def yaml_errors(text: str) -> list[str]:
    """Repeated keys and YAML 1.1 number forms in a YAML document, one message each.

    Walks the composed node tree (no values are built), visiting each node once, so
    aliases cannot make the work grow."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        return [f"not valid YAML: {' '.join(str(exc).split())}"]
    unsafe = unsafe_node_errors(root)
    if unsafe:  # nothing else is read from such a document
        return unsafe
    errors: list[str] = []
    visited: set[int] = set()
    stack: list[tuple[yaml.Node | None, tuple]] = [(root, ())]
    while stack:
        node, path = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        line = f"line {node.start_mark.line + 1}"
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                key = (key_node.tag, str(key_node.value))
                here = key_node.start_mark.line + 1
                if isinstance(key_node, yaml.ScalarNode) and key in first:
                    errors.append(f"line {here}: config key '{key_name((*path, key[1]))}' is given "
                                  f"twice (also line {first[key]}); allowed: each key once")
                first.setdefault(key, here)
                stack.append((value_node, (*path, key_node.value)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((item, (*path, i)) for i, item in enumerate(node.value))
        elif node.tag in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float") \
                and _YAML11_NUMBER.fullmatch(node.value):
            read = yaml.safe_load(node.value)
            errors.append(f"{line}: config key '{key_name(path)}': {node.value} is read by "
                          f"YAML 1.1 as {read!r}; allowed: a plain decimal number (or quote it)")
    return sorted(errors, key=lambda e: int(e.split()[1].rstrip(":")))


#: Most bytes read from a config or suite definition file (each is a few kB).
MAX_FILE_BYTES = 4_000_000


def read_text_bounded(path: Path | str, what: str, limit: int = MAX_FILE_BYTES) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes; anything else (a device
    such as /dev/zero, a FIFO, a folder, a larger file, not UTF-8) raises :class:`ConfigError`,
    one line naming ``what`` and the path. At most ``limit + 1`` bytes are ever read."""
    import stat

    try:
        mode = Path(path).stat().st_mode
        if not stat.S_ISREG(mode):
            raise ConfigError(f"{what} {path}: not a regular file; give the path of a YAML "
                              "file")
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({type(exc).__name__}: "
                          f"{exc.strerror or exc}); give the path of a YAML file") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path}: larger than {limit} bytes; allowed: a YAML file of "
                          f"at most {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "give a YAML file") from None


#: Most values a YAML document may hold once its aliases are expanded (a config or a suite
#: definition holds a few thousand; an alias bomb of a few hundred bytes, billions).
MAX_YAML_VALUES = 1_000_000


def unsafe_node_errors(root: yaml.Node | None) -> list[str]:
    """Tags the safe loader cannot build (``!!python/object/apply:...``) and aliases that
    expand the document beyond :data:`MAX_YAML_VALUES` values, one message each.

    Works on the composed node graph: each node is visited once and its expanded size is
    summed from its children's, so the check itself is bounded by the document's length."""
    if root is None:
        return []
    errors: list[str] = []
    size: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        if id(node) in size:
            continue
        children = ([n for pair in node.value for n in pair]
                    if isinstance(node, yaml.MappingNode) else
                    list(node.value) if isinstance(node, yaml.SequenceNode) else [])
        if not done:
            if node.tag not in yaml.SafeLoader.yaml_constructors:
                errors.append(f"line {node.start_mark.line + 1}: the tag {show_value(node.tag)} is "
                              "not allowed; allowed: plain YAML values (mappings, lists, "
                              "strings, numbers, booleans, null), no tags")
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in size)
        else:
            size[id(node)] = min(1 + sum(size.get(id(c), 1) for c in children),
                                 MAX_YAML_VALUES + 1)
    if size.get(id(root), 0) > MAX_YAML_VALUES:
        errors.append(f"line {root.start_mark.line + 1}: its aliases (*name) expand the "
                      f"document to more than {MAX_YAML_VALUES} values; allowed: at most "
                      f"{MAX_YAML_VALUES} (write the values out, or use fewer aliases)")
    return sorted(set(errors), key=lambda e: int(e.split()[1].rstrip(":")))


#: Most values a config may hold (walked by the checks below; a list of 10,000 steps is far
#: below it).
MAX_CONFIG_VALUES = 200_000


def config_size_errors(config: Any) -> list[str]:
    """A config holding more than :data:`MAX_CONFIG_VALUES` values (aliases of a YAML file
    that Snakemake expanded, or a generated config); the walk stops at the bound."""
    count, stack = 0, [((), config)]
    while stack:
        path, value = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            return [f"config key '{key_name(path[:1])}': more than {MAX_CONFIG_VALUES} values "
                    f"(aliases of a YAML file?); allowed: at most {MAX_CONFIG_VALUES}"]
        if isinstance(value, Mapping):
            stack.extend(((*path, k), v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend(((*path, i), v) for i, v in enumerate(value))
    return []

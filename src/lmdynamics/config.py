"""Checks of a workflow configuration, run before any job.

The JSON schema (``workflow/schemas/config.schema.yaml``) states types, ranges and enums;
:func:`check_config` reports its violations one per line as ``key: value — what is allowed``
and adds the checks a schema cannot express (steps in the suite's schedule, sizes known to
the source, the final step among the steps, enough eval tokens).
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from lmdynamics.schedule import checkpoint_schedule, pythia_schedule

#: Pythia sizes published as ``EleutherAI/pythia-<size>-deduped`` on the hub.
PYTHIA_SIZES = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")
#: Pythia's training sequence length (2049 tokens per sequence in the data files).
PYTHIA_SEQUENCE_TOKENS = 2049
#: Pythia's context: positions 0..2047 are inputs (the 2049th token is only a label).
PYTHIA_CONTEXT = 2048
#: The schema's pattern for labels that become path components (suite, sizes, model names).
LABEL_PATTERN = "^[A-Za-z0-9_][A-Za-z0-9_.+-]*$"
#: What a schema ``pattern`` asks for, in words (patterns not listed are shown as regexes).
PATTERN_HINTS = {
    LABEL_PATTERN: "a plain name: letters, digits, '_', '.', '+', '-', not starting with '.' "
                   "or '-', no path separators",
    "\\{size\\}": "a template containing '{size}', e.g. 'EleutherAI/pythia-{size}-deduped'",
    "\\{step\\}": "a template containing '{step}', e.g. 'step{step}'",
}
#: A Hugging Face repo id: ``owner/name`` (hub rules: no '--' or '..', at most 96 characters).
REPO_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
#: A git revision name as the hub accepts it (a branch or tag such as step143000, a sha, or
#: refs/pr/1): no leading '/' or '-', no '//' (and, checked separately, no '..').
REVISION_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*(/[A-Za-z0-9_][A-Za-z0-9_.+-]*)*")


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names key, value and what is allowed."""


def _key(path: Any) -> str:
    parts = [str(p) for p in path]
    return ".".join(parts) if parts else "<top level>"


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
    return error.message


def schema_errors(config: Mapping[str, Any], schema: Mapping[str, Any]) -> list[str]:
    """Messages for every schema violation, each naming the key, the value and what is allowed."""
    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        if err.validator == "additionalProperties":
            known = set(err.schema.get("properties", {}))
            unknown = [k for k in err.instance if k not in known]
            messages.append(f"config key '{_key(err.path)}': unknown key(s) "
                            f"{', '.join(map(repr, unknown))}; allowed: {_allowed(err)}")
            continue
        messages.append(f"config key '{_key(err.path)}': {err.instance!r} is not allowed; "
                        f"allowed: {_allowed(err)}")
    return messages


def schedule_for(config: Mapping[str, Any]) -> list[int]:
    """Checkpoint steps the configured source provides (the tiny schedule or Pythia's)."""
    if config["source"] == "tiny":
        sched = config["tiny"]["schedule"]
        return checkpoint_schedule(config["final_step"], sched["log_until"], sched["interval"])
    return pythia_schedule()


def _short(values: list[int], limit: int = 30) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def semantic_errors(config: Mapping[str, Any]) -> list[str]:
    """Checks the schema cannot express; assumes the config passed the schema."""
    errors: list[str] = []
    source = config["source"]
    if source == "tiny":
        if "tiny" not in config:
            return ["config key 'tiny': missing; allowed: a 'tiny' section (schedule, models) "
                    "when source is 'tiny'"]
        known = list(config["tiny"]["models"])
    else:
        known = list(PYTHIA_SIZES)
    for size in config["sizes"]:
        if size not in known:
            errors.append(f"config key 'sizes': {size!r} is not a known size for source "
                          f"'{source}'; allowed: {', '.join(known)}")
    final = config["final_step"]
    try:
        schedule = schedule_for(config)
    except ValueError as exc:
        return [*errors, f"config key 'tiny.schedule': {exc}"]
    if final not in schedule:
        errors.append(f"config key 'final_step': {final} is not in the {source} schedule; "
                      f"allowed: {_short(schedule)}")
    for step in config["steps"]:
        if step not in schedule:
            errors.append(f"config key 'steps': {step} is not in the {source} suite's "
                          f"checkpoint schedule; allowed: {_short(schedule)}")
        elif step > final:
            errors.append(f"config key 'steps': {step} is after final_step {final}; "
                          f"allowed: steps <= {final}")
    if final not in config["steps"]:
        errors.append(f"config key 'steps': the final step {final} is missing; allowed: a list "
                      f"that includes final_step {final} (the CKA reference)")
    errors += conjecture_errors(config)
    available = eval_positions(config)
    if config.get("sampling", {}).get("protocol") == "paper_code":
        n_seq = eval_sequences(config)
        if config["tokens"] > n_seq:
            errors.append(f"config key 'tokens': {config['tokens']} with sampling.protocol "
                          f"paper_code (one token per sequence) exceeds the {n_seq} sequences "
                          f"of the eval batch; allowed: 2..{n_seq}")
    elif config["tokens"] > available:
        errors.append(f"config key 'tokens': {config['tokens']} exceeds the {available} token "
                      f"positions of the eval batch; allowed: 2..{available}")
    return errors


def eval_sequences(config: Mapping[str, Any]) -> int:
    """Number of sequences in the eval batch the config feeds to extraction."""
    if config["source"] == "tiny":
        return config["tiny"].get("batch_size", 16)
    return config.get("hub", {}).get("sequences", 8)


def conjecture_errors(config: Mapping[str, Any]) -> list[str]:
    """Checks of the ``conjecture`` section the schema cannot express (fit window order,
    figure steps among the analysed steps)."""
    section = config.get("conjecture") or {}
    errors = []
    lo, hi = section.get("spectrum_fit", (0.0, 0.5))
    if not lo < hi:
        errors.append(f"config key 'conjecture.spectrum_fit': {[lo, hi]} is not allowed; "
                      f"allowed: two rank fractions [lo, hi] with lo < hi")
    extra = [s for s in section.get("figure_steps", []) if s not in config["steps"]]
    if extra:
        errors.append(f"config key 'conjecture.figure_steps': {extra} are not among 'steps'; "
                      f"allowed: a subset of {_short(sorted(config['steps']))}")
    return errors


def eval_positions(config: Mapping[str, Any]) -> int:
    """Number of token positions in the eval batch the config feeds to extraction."""
    if config["source"] == "tiny":
        tiny = config["tiny"]
        return tiny.get("batch_size", 16) * tiny.get("seq_len", 128)
    return eval_sequences(config) * PYTHIA_CONTEXT


def check_config(config: Mapping[str, Any], schema: Mapping[str, Any] | Path | str) -> None:
    """Raise :class:`ConfigError` listing every bad value, or return None when all is well."""
    if not isinstance(schema, Mapping):
        schema = yaml.safe_load(Path(schema).read_text())
    errors = schema_errors(config, schema)
    if not errors:
        errors = semantic_errors(config)
    if not errors:
        errors = model_spec_errors(config) + hub_errors(config)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def model_spec_errors(config: Mapping[str, Any]) -> list[str]:
    """Tiny model shapes the schema cannot check: heads must divide the hidden size."""
    errors = []
    for label, spec in config.get("tiny", {}).get("models", {}).items():
        hidden, heads = spec["hidden_size"], spec["num_heads"]
        if hidden % heads:
            divisors = [d for d in range(1, hidden + 1) if hidden % d == 0]
            errors.append(f"config key 'tiny.models.{label}.num_heads': {heads} does not divide "
                          f"hidden_size {hidden}; allowed: one of {_short(divisors, 12)}")
    return errors


def _template_errors(key: str, template: str, field: str, values: list[Any],
                     pattern: re.Pattern, allowed: str) -> list[str]:
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    if any(f != field for f in fields):
        return [f"config key '{key}': {template!r} has placeholder(s) "
                f"{', '.join(sorted(set(fields) - {field}))}; allowed: only {{{field}}}"]
    for value in values:
        name = template.format(**{field: value})
        if not pattern.fullmatch(name) or ".." in name or "--" in name or len(name) > 96:
            return [f"config key '{key}': {template!r} gives {name!r} for {field} {value!r}; "
                    f"allowed: {allowed}"]
    return []


def hub_errors(config: Mapping[str, Any]) -> list[str]:
    """The hub templates must give valid repo ids and revision names for every size and step."""
    hub = config.get("hub")
    if not hub:
        return []
    errors = []
    repo_rule = "'owner/name' of letters, digits, '_', '.', '-' (no '..' or '--', <= 96 chars)"
    if "repo" in hub:
        errors += _template_errors("hub.repo", hub["repo"], "size", list(config["sizes"]),
                                   REPO_ID_PATTERN, repo_rule)
    if "revision" in hub:
        errors += _template_errors("hub.revision", hub["revision"], "step",
                                   list(config["steps"]), REVISION_PATTERN,
                                   "a branch, tag or commit name of letters, digits, '_', '.', "
                                   "'+', '-', '/' (no '..', no leading or doubled '/')")
    if "dataset" in hub and not (REPO_ID_PATTERN.fullmatch(hub["dataset"])
                                 and ".." not in hub["dataset"]):
        errors.append(f"config key 'hub.dataset': {hub['dataset']!r} is not a dataset repo id; "
                      f"allowed: {repo_rule}")
    return errors


def load_config(path: Path | str, schema: Path | str) -> dict[str, Any]:
    """Read a YAML config file and check it (used by tests and the ``plan`` command)."""
    config = yaml.safe_load(Path(path).read_text())
    check_config(config, schema)
    return config


def canonical(value: Any) -> Any:
    """``value`` with every mapping's keys sorted, recursively (lists keep their order).

    Rule parameters built from config sections (e.g. ``tiny``, ``hub``, ``mcc``) are compared
    by Snakemake as text; sorting keys means reordering a YAML file reruns nothing.
    """
    if isinstance(value, Mapping):
        return {k: canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [canonical(v) for v in value]
    return value

"""One source of truth from the config to the code (issue 17): every enum of the config schema
equals the allowed values the code declares beside their use, the options classes take their
fields and defaults from the schema, and the ``--options`` argument of the command line is
checked against the schema."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from lmdynamics import config, defects, options
from lmdynamics.estimators.cka import CKA_ESTIMATORS
from lmdynamics.estimators.mcc import ALTERNATIVES
from lmdynamics.estimators.measures import MEASURES, REFERENCES
from lmdynamics.estimators.rank import PER_DIVISORS
from lmdynamics.extraction import extract, paper_code
from lmdynamics.extraction.conjecture import StatsOptions
from lmdynamics.reduction.cka import CKAOptions
from lmdynamics.reduction.measures import MeasureOptions
from lmdynamics.report import figures, tables
from lmdynamics.report.tables import MCCOptions
from lmdynamics.sources import checkpoints, eval_data

#: Every enum of the schema -> the code's allowed values (the test fails on a new enum
#: without an entry here, so a new choice is declared once, beside the code that uses it).
CODE_CHOICES = {
    ("source",): config.SOURCES,
    ("metrics", "per_divisor"): PER_DIVISORS,
    ("metrics", "cka_estimator"): CKA_ESTIMATORS,
    ("mcc", "early_step"): tables.EARLY_STEP_RULES,
    ("mcc", "per_quantity"): tuple(tables.PER_QUANTITIES),
    ("mcc", "weight_threshold"): tables.WEIGHT_THRESHOLDS,
    ("mcc", "reference"): tables.REFERENCES,
    ("mcc", "comparison"): tables.COMPARISONS,
    ("mcc", "alternative"): ALTERNATIVES,
    ("mcc", "grad_batches"): tables.GRAD_BATCHES,
    ("figures", "x_axis"): figures.X_AXES,
    ("extraction", "device"): extract.DEVICES,
    ("extraction", "dtype"): tuple(extract.DTYPES),
    ("extraction", "attention_activation"): paper_code.ATTENTION_ACTIVATIONS,
    ("extraction", "attention_implementation"): checkpoints.ATTENTION_IMPLEMENTATIONS,
    ("extraction", "gradient_protocol"): paper_code.GRADIENT_PROTOCOLS,
    ("sampling", "protocol"): extract.SAMPLING_PROTOCOLS,
    ("eval_data", "dtype"): (*eval_data.BIN_DTYPES, None),  # null: not a .bin file
    # every measure's data kinds and references, as its registry entry declares them
    **{("measures", name, "data"): m.data for name, m in MEASURES.items()},
    **{("measures", name, "reference"): REFERENCES for name, m in MEASURES.items()
       if m.comparative},
    ("audit", "defective"): defects.POLICIES,
}


def _schema_enums(node, path=()):
    node = options._resolve_ref(node)
    if "enum" in node:
        yield path, tuple(node["enum"])
    for key, child in node.get("properties", {}).items():
        yield from _schema_enums(child, (*path, key))
    if isinstance(node.get("items"), dict):
        yield from _schema_enums(node["items"], path)
    if isinstance(node.get("additionalProperties"), dict):
        yield from _schema_enums(node["additionalProperties"], path)


def test_every_schema_enum_equals_the_codes_allowed_values():
    enums = dict(_schema_enums(options.schema()))
    assert set(enums) == set(CODE_CHOICES), "schema enums and CODE_CHOICES differ"
    for path, values in enums.items():
        assert set(values) == set(CODE_CHOICES[path]), ".".join(path)


def test_options_classes_take_fields_and_defaults_from_the_schema():
    mcc = options.defaults("mcc")
    assert {f.name: f.default for f in dataclasses.fields(MCCOptions)} == mcc
    metrics = options.defaults("metrics")
    assert CKAOptions() == CKAOptions.from_config(metrics, seed=options.resolve("seed"))
    assert MeasureOptions() == MeasureOptions.from_config(options.resolve("measures"))
    assert extract.ExtractionOptions() == extract.ExtractionOptions.from_config(
        options.resolve("extraction"), options.resolve("sampling"))
    conjecture = options.resolve("conjecture")
    assert StatsOptions(Path("ref")) == StatsOptions.from_config(Path("ref"), conjecture, seed=0)
    assert StatsOptions("ref").spectrum_fit == tuple(conjecture["spectrum_fit"])
    # library functions restate no option default: these take them from the caller
    import inspect

    from lmdynamics.sources.tiny import TRAINING_KEYS, train_tiny_model

    params = inspect.signature(train_tiny_model).parameters
    assert all(params[k].default is inspect.Parameter.empty for k in (*TRAINING_KEYS, "seed"))
    # every measure has its schema entry, and its parameters are keys of it
    section = options.section_schema("measures")["properties"]
    assert list(section) == list(MEASURES)
    for name, m in MEASURES.items():
        keys = set(options._resolve_ref(section[name])["properties"])
        assert keys == {"data", *(["reference"] if m.comparative else []), *m.parameters}
    # the drift of issue 17: a figure drawn by hand uses the workflow's estimator
    import inspect

    from lmdynamics.report.cka import render_figure

    params = inspect.signature(render_figure).parameters
    assert params["estimator"].default == metrics["cka_estimator"] == "debiased"
    assert params["x_axis"].default == options.defaults("figures")["x_axis"]


def test_options_argument_inline_file_and_errors(tmp_path):
    got = options.parse('{"metrics": {"per_divisor": "hidden"}}', ["metrics", "seed"])
    assert got["metrics"]["per_divisor"] == "hidden" and got["seed"] == 0
    assert got["metrics"]["bootstrap"] == {"samples": 0, "level": 0.9}  # nested defaults
    path = tmp_path / "options.json"
    path.write_text(json.dumps({"figures": {"x_axis": "fraction"}}))
    assert options.parse(str(path), ["figures"]) == {"figures": {"x_axis": "fraction"}}
    assert options.parse(None, ["figures"]) == {"figures": {"x_axis": "step"}}
    with pytest.raises(ValueError, match="metrics.per_divisor.*allowed: one of min_dim"):
        options.parse('{"metrics": {"per_divisor": "rows"}}', ["metrics"])
    with pytest.raises(ValueError, match="unknown section.*mcc.*reads figures"):
        options.parse('{"mcc": {}}', ["figures"])
    with pytest.raises(ValueError, match="not valid JSON"):
        options.parse("{metrics: 1}", ["metrics"])
    with pytest.raises(ValueError, match="neither a JSON object nor an existing file"):
        options.parse(str(tmp_path / "missing.json"), ["metrics"])


def test_job_options_is_what_parse_reads_back():
    cfg = {"metrics": options.defaults("metrics"), "seed": 3, "figures": {"x_axis": "step"}}
    text = options.job_options(cfg, "metrics", "seed")
    assert options.parse(text, ["metrics", "seed"]) == {"metrics": cfg["metrics"], "seed": 3}


def _schema_leaves(node, path=()):
    """(dotted key, default) of every key of the schema that has a default."""
    node = options._resolve_ref(node) if "$ref" in node else node
    if node.get("type") == "object" and "properties" in node:
        for key, child in node["properties"].items():
            yield from _schema_leaves(child, (*path, key))
    elif "default" in node:
        yield ".".join(path), node["default"]


#: Flags whose name is a config key's but whose value is one job's, worked out by the workflow
#: from the config and the suite (not the key's value), or a file: flag -> the commands.
PER_JOB_FLAGS = {
    "--revision": {"download", "extract"},  # the branch of one step (suite revision pattern)
    "--repo": {"download"},  # the repository of one size and seed
    "--seeds": {"training-loss"},  # the replicate of each loss CSV
    "--tokenizer": {"suite-eval-batch"},  # eval_data.tokenizer, else the suite's, else its repo
    "--metrics": {"figure", "measure-figure", "mcc"},  # the metrics store (a path)
    "--reference": {"extract"},  # the size's reference store (a path)
    # the architecture of one size: its entry of tiny.models
    "--hidden-size": {"train-tiny"},
    "--num-layers": {"train-tiny"},
    "--num-heads": {"train-tiny"},
}
#: Subcommands of the intervention study: they read its own schema
#: (``interventions.schema.yaml``), so their flags are walked against that schema's keys.
INTERVENTION_COMMANDS = {"intervention-run", "intervention-summarise", "intervention-figures"}


#: A value of each required top-level config key (they have no default).
REQUIRED = {"final_step": 8, "source": "tiny", "tokens": 32, "steps": [0, 8], "sizes": ["a"],
            "suite": "tiny"}


def _config_key_names(schema: str = "config") -> set[str]:
    """Every key name of schema ``schema`` (``config`` or ``interventions``), at any depth."""
    names: set[str] = set()

    def walk(node):
        node = options._resolve_ref(node) if isinstance(node, dict) else node
        for key, sub in (node.get("properties") or {}).items():
            names.add(key)
            walk(sub)
        for sub in node.get("additionalProperties", None), node.get("items", None):
            if isinstance(sub, dict):
                walk(sub)

    walk(options.schema(schema))
    return names


def _flags_naming_config_keys(commands, schema: str = "config") -> tuple[int, list[str]]:
    """(flags walked, ``command --flag`` of each flag named after a key of schema ``schema``)
    of ``commands`` ({name: (add_arguments, func)}), but :data:`PER_JOB_FLAGS`."""
    import argparse
    import re

    keys, wrong, walked = _config_key_names(schema), [], 0
    for name, (add_arguments, _) in commands.items():
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        for flag in set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", parser.format_help())):
            walked += 1
            if (flag[2:].replace("-", "_") in keys
                    and name not in PER_JOB_FLAGS.get(flag, ())):
                wrong.append(f"{name} {flag}")
    return walked, wrong


def test_no_flag_names_a_config_key_and_every_read_is_a_schema_key():
    """Config keys reach a subcommand only through ``--options`` (what the schema gives, with
    its defaults): no flag of any subcommand is named after a config key, but for the per-job
    values of :data:`PER_JOB_FLAGS`; and every entry of ``commands.READS`` names a key of the
    schema and parses to the schema's default."""
    from lmdynamics.cli import COMMANDS
    from lmdynamics.commands import READS

    walked, wrong = _flags_naming_config_keys(
        {k: v for k, v in COMMANDS.items() if k not in INTERVENTION_COMMANDS})
    assert walked > 50 and not wrong, wrong
    walked, wrong = _flags_naming_config_keys(
        {k: v for k, v in COMMANDS.items() if k in INTERVENTION_COMMANDS}, "interventions")
    assert walked > 15 and not wrong, wrong
    required = options.schema()["required"]
    for name, reads in READS.items():
        given = {s: REQUIRED[s] for s in reads if s in required}  # no default
        if "tiny.schedule" in reads:  # required in its section
            given["tiny"] = {"schedule": {"log_until": 4, "interval": 4}}
        parsed = options.parse(json.dumps(given), reads)
        for entry in reads:
            section, _, key = entry.partition(".")
            if section in given and (not key or key in given[section]):
                want = given[section][key] if key else given[section]
                assert (parsed[section][key] if key else parsed[section]) == want, (name, entry)
            elif key:
                assert key in options.section_schema(section)["properties"], (name, entry)
                assert parsed[section][key] == options.defaults(section).get(key), (name, entry)
            else:
                assert parsed[section] == options.resolve(section), (name, entry)


def test_the_flag_walk_refuses_a_flag_named_after_a_config_key():
    """The walk above fails on a subcommand with a flag named after a config key."""
    def add(p):
        p.add_argument("--out")
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--retries", type=int)

    walked, wrong = _flags_naming_config_keys({"planted": (add, None)})
    assert walked == 4 and sorted(wrong) == ["planted --lr", "planted --retries"]
    # and on an intervention subcommand with a flag named after a key of its own schema
    walked, wrong = _flags_naming_config_keys({"planted": (add, None)}, "interventions")
    assert walked == 4 and sorted(wrong) == ["planted --lr"]


def test_a_job_gets_only_what_it_reads():
    from lmdynamics.commands import READS

    parsed = options.parse('{"final_step": 8}', READS["reference"])
    assert parsed == {"conjecture": {"top_k": options.defaults("conjecture")["top_k"]},
                      "final_step": 8}
    with pytest.raises(ValueError, match="tokens required by this step and not given"):
        options.parse(None, READS["extract"])
    extract = options.parse('{"tokens": 32}', READS["extract"])
    assert "figure_steps" not in extract["conjecture"] and "top_k" in extract["conjecture"]
    with pytest.raises(ValueError, match="unknown section"):
        options.parse('{"metrics": {}}', READS["reference"])


def test_a_key_a_job_reads_reruns_it_and_another_does_not():
    from lmdynamics.commands import READS

    config = {s: options.resolve(s) for s in ("tokens", "seed", "extraction", "sampling",
                                             "conjecture", "family")} | {"final_step": 8}

    def changed(section, key, value):
        return {**config, section: {**config[section], key: value}}

    for name, reads, key, value, reruns in [
            ("reference", READS["reference"], "top_k", 7, True),
            ("reference", READS["reference"], "max_elements", 1 << 10, False),
            ("extract", READS["extract"], "max_elements", 1 << 10, True),
            ("extract", READS["extract"], "figure_steps", [0], False)]:
        before = options.job_options(config, *reads)
        after = options.job_options(changed("conjecture", key, value), *reads)
        assert (before != after) == reruns, (name, key)

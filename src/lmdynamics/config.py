"""Checks of a workflow configuration, run before any job.

The JSON schema (``lmdynamics/schemas/config.schema.yaml``) states types, ranges and enums;
:func:`check_config` reports its violations (:mod:`lmdynamics.validation`) one per line as
``key: value — what is allowed``
and adds the checks a schema cannot express (steps in the suite's schedule, sizes known to
the source, the final step among the steps, enough eval tokens).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from lmdynamics.sources import pythia
from lmdynamics.sources.schedule import checkpoint_schedule
from lmdynamics.validation import (
    REPO_ID_PATTERN,
    REVISION_PATTERN,
    ConfigError,
    config_file_errors,
    config_size_errors,
    nonfinite_errors,
    read_text_bounded,
    schema_errors,
    show_value,
    yaml_errors,
)

#: Where checkpoints come from (config key ``source``).
SOURCES: tuple[str, ...] = ("tiny", "hub", "local")
#: Most checkpoints a tiny schedule may save (bounds the check's own work and the job list).
MAX_CHECKPOINTS = 10_000


#: Top-level config keys that no longer exist, and what a config that still sets one is told.
REMOVED_KEYS = {
    "execution": "removed (it held warm_start; warm start no longer exists and every job runs "
                 "as an ordinary process): delete the key",
}


#: The suite definition a hub config uses when ``suite`` names no shipped one and
#: ``suite_file`` is unset: the paper's (what the hub source always served before definitions).
DEFAULT_SUITE = "pythia-deduped"


def suite_for(config: Mapping[str, Any]):
    """The :class:`~lmdynamics.sources.suites.Suite` of a hub config (None for tiny): the
    file ``suite_file``, else the shipped definition named ``suite``, else
    :data:`DEFAULT_SUITE`."""
    from lmdynamics.sources import suites

    if config["source"] != "hub":
        return None
    if config.get("suite_file"):
        return suites.read_suite(config["suite_file"])
    name = config["suite"] if config["suite"] in suites.shipped() else DEFAULT_SUITE
    return suites.load_suite(name)


def hub_section(config: Mapping[str, Any], suite) -> dict[str, Any]:
    """The ``hub`` section with what it leaves unset taken from ``suite``: ``repo`` (its
    template, when it has one), ``revision`` (its template, when revisions are templated)
    and ``dataset`` (its preshuffled Pile, else Pythia-deduped's; also for the tiny source, whose
    rules read it). Keys the config sets win."""
    from lmdynamics.sources import suites

    hub = dict(config.get("hub") or {})
    if suite is not None and suite.repo is not None and not suite.repos:
        hub.setdefault("repo", suite.repo)
    if suite is not None and suite.revisions["kind"] == "template":
        hub.setdefault("revision", suite.revisions["template"])
    dataset = (suite.eval_data.get("dataset") if suite is not None else None) or \
        suites.load_suite(DEFAULT_SUITE).eval_data["dataset"]
    hub.setdefault("dataset", dataset)
    return hub


def hub_repo(config: Mapping[str, Any], suite, size: str, seed: int | None = None) -> str:
    """The hub repo of ``size`` (and ``seed``): ``hub.repo`` when the config sets it, else
    the suite definition's."""
    given = (config.get("hub") or {}).get("repo")
    return given.format(size=size, seed=seed) if given else suite.repo_id(size, seed)


def hub_revision(config: Mapping[str, Any], suite, step: int) -> str | None:
    """The revision of ``step``: ``hub.revision`` when set, else the definition's; ``None``
    for a ``discover`` suite (the download job finds the branch from the suite's pattern)."""
    given = (config.get("hub") or {}).get("revision")
    return given.format(step=step) if given else suite.revision(int(step))


def schedule_for(config: Mapping[str, Any]) -> list[int] | None:
    """Checkpoint steps the configured source provides: the tiny schedule, or the suite
    definition's; ``None`` when only the hub's branch list knows them (``discover``)."""
    if config["source"] == "tiny":
        sched = config["tiny"]["schedule"]
        return checkpoint_schedule(config["final_step"], sched["log_until"], sched["interval"])
    if config["source"] == "local":  # the steps on disk (resolved by sources.local)
        return sorted(config["steps"])
    schedule = suite_for(config).schedule
    return None if schedule is None else list(schedule)


def eval_from_file(config: Mapping[str, Any], suite) -> bool:
    """Whether the eval batch comes from ``eval_data.path`` (set, or needed because the
    suite has no public training batch; source local always) rather than the preshuffled Pile."""
    if suite is None:
        return config.get("source") == "local"
    return bool((config.get("eval_data") or {}).get("path")) or \
        suite.eval_data["kind"] != "pile_last_batch"


def suite_vocab(config: Mapping[str, Any], suite) -> int | None:
    """The smallest documented vocabulary of the configured sizes (every id of the shared
    eval batch must be below it), or None when no size's is known."""
    known = [suite.sizes[s].vocab for s in config["sizes"]
             if s in suite.sizes and suite.sizes[s].vocab is not None]
    return min(known) if known else None


def _short(values: list[int], limit: int = 30) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


def semantic_errors(config: Mapping[str, Any],
                    schema: Mapping[str, Any] | None = None) -> list[str]:
    """Checks the schema cannot express; assumes the config passed ``schema`` (whose
    defaults fill unset keys; default: the one :mod:`lmdynamics.options` reads)."""
    from lmdynamics.sources.suites import SuiteError

    errors: list[str] = []
    source = config["source"]
    suite = None
    if source == "tiny":
        if "tiny" not in config:
            return ["config key 'tiny': missing; allowed: a 'tiny' section (schedule, models) "
                    "when source is 'tiny'"]
        known = list(config["tiny"]["models"])
    elif source == "local":  # steps and final step from disk (lmdynamics.sources.local)
        from lmdynamics.sources import local

        errors = local.errors(config)
        if errors:
            return errors
        config = {**config, **local.resolve(config)}
        known = list(config["sizes"])
    else:
        try:
            suite = suite_for(config)
        except SuiteError as exc:
            return [f"config key 'suite_file': {' '.join(str(exc).split())}"]
        known = list(suite.sizes)
        errors += eval_data_errors(config, suite) + context_errors(config, suite)
    for size in config["sizes"]:
        if size not in known:
            errors.append(f"config key 'sizes': {size!r} is not a known size for source "
                          f"'{source}'; allowed: {', '.join(known)}")
    final = config["final_step"]
    if source == "tiny":
        # bounded work: count the checkpoints before building the list
        sched = config["tiny"]["schedule"]
        count = max(0, final - sched["log_until"]) // sched["interval"]
        if count > MAX_CHECKPOINTS:
            return [*errors, f"config key 'tiny.schedule.interval': {sched['interval']} with "
                    f"final_step {final} saves about {count} checkpoints; allowed: at most "
                    f"{MAX_CHECKPOINTS} (a larger interval or a smaller final_step)"]
    try:
        schedule = schedule_for(config)
    except ValueError as exc:
        return [*errors, f"config key 'tiny.schedule': {exc}"]
    if schedule is None:  # discover: the hub's branches say which steps exist, not the config
        schedule = sorted({*config["steps"], final})
    saved = set(schedule)
    if final not in saved:
        errors.append(f"config key 'final_step': {final} is not in the {source} schedule; "
                      f"allowed: {_short(schedule)}")
    unknown = [s for s in config["steps"] if s not in saved]
    if unknown:  # one line, however many
        errors.append(f"config key 'steps': {_short(unknown, 10)} "
                      f"{'is' if len(unknown) == 1 else 'are'} not in the {source} suite's "
                      f"checkpoint schedule; allowed: {_short(schedule)}")
    late = [s for s in config["steps"] if s in saved and s > final]
    if late:
        errors.append(f"config key 'steps': {_short(late, 10)} "
                      f"{'is' if len(late) == 1 else 'are'} after final_step {final}; "
                      f"allowed: steps <= {final}")
    if final not in config["steps"]:
        errors.append(f"config key 'steps': the final step {final} is missing; allowed: a list "
                      f"that includes final_step {final} (the CKA reference)")
    first = suite.first_step if suite is not None else None
    early = sorted(s for s in config["steps"] if first is not None and s < first)
    if early:
        verb = "is" if len(early) == 1 else "are"
        errors.append(f"config key 'steps': {_short(early, 10)} {verb} before step {first}, "
                      f"the first revision suite {suite.name} has (no step 0 branch); allowed: "
                      f"steps >= {first}; the Conjecture reference is then the earliest "
                      "analysed step")
    errors += early_step_errors(config, schema)
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


def early_step_errors(config: Mapping[str, Any],
                      schema: Mapping[str, Any] | None = None) -> list[str]:
    """Table 1's early step must exist: with ``mcc.early_step: at_or_before`` some analysed
    step must be at or before ``mcc.early_fraction`` x ``final_step`` (the rule of
    :func:`lmdynamics.report.tables.early_step`, checked here before any job runs).
    ``schema``: the config schema whose ``mcc`` defaults fill unset keys (default: the one
    :mod:`lmdynamics.options` reads)."""
    if schema is None:
        from lmdynamics.options import defaults

        unset = defaults("mcc")
    else:
        unset = {k: v.get("default") for k, v in schema["properties"]["mcc"]["properties"].items()}
    mcc = {**unset, **(config.get("mcc") or {})}
    if mcc["early_step"] != "at_or_before":
        return []
    target = mcc["early_fraction"] * config["final_step"]
    if any(s <= target + 1e-9 * max(1.0, target) for s in config["steps"]):
        return []
    return [f"config key 'steps': no analysed step is at or before mcc.early_fraction "
            f"{mcc['early_fraction']:g} x final_step {config['final_step']} = {target:g}, "
            f"Table 1's early step; allowed: steps including one <= {math.floor(target)}, "
            "or mcc.early_step: nearest"]


def eval_data_errors(config: Mapping[str, Any], suite) -> list[str]:
    """The eval data a hub config needs from its suite definition: a local file when the
    suite has no public training batch; the paper code's gradient batches only from the Pile."""
    section = config.get("eval_data") or {}
    errors = []
    if suite.eval_data["kind"] != "pile_last_batch" and not section.get("path"):
        errors.append(f"config key 'eval_data.path': unset, but suite {suite.name} has no "
                      f"public training batch ({suite.eval_data.get('note', '').strip()}); "
                      "allowed: a local .npy / .bin token file or a text file")
    path = section.get("path")
    if path and path.lower().endswith(".bin") and not section.get("dtype"):
        errors.append(f"config key 'eval_data.dtype': unset for the .bin file {path}; "
                      "allowed: uint16, uint32, int32, int64")
    if eval_from_file(config, suite) and \
            (config.get("extraction") or {}).get("gradient_protocol") == "paper_code":
        errors.append("config key 'extraction.gradient_protocol': paper_code reads training "
                      "batches of the preshuffled Pile, which an eval_data file does not give; "
                      "allowed: eval_batch")
    return errors


def context_errors(config: Mapping[str, Any], suite) -> list[str]:
    """An eval file's ``seq_len`` beyond the learned position embedding (``context``) of a
    configured size: the model has no position for the later tokens."""
    if not eval_from_file(config, suite):
        return []
    seq_len = (config.get("eval_data") or {}).get("seq_len", pythia.SEQUENCE_TOKENS)
    limits = {s: suite.sizes[s].context for s in config["sizes"]
              if s in suite.sizes and suite.sizes[s].context is not None}
    if limits and seq_len > min(limits.values()):
        size = min(limits, key=limits.get)
        return [f"config key 'eval_data.seq_len': {seq_len} tokens exceed the {limits[size]} "
                f"positions of size {size!r} of suite {suite.name!r}; allowed: "
                f"eval_data.seq_len <= {limits[size]}"]
    return []


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
    section = config.get("eval_data") or {}
    if section.get("path") or suite_for(config).eval_data["kind"] != "pile_last_batch":
        return eval_sequences(config) * (section.get("seq_len", pythia.SEQUENCE_TOKENS) - 1)
    return eval_sequences(config) * pythia.CONTEXT


#: List keys of integers that may be given on the command line (``--config 'seeds=[0,1]'``).
COMMAND_LINE_INTEGER_LISTS: tuple[str, ...] = ("seeds",)


def command_line_integers(config: Mapping[str, Any], overrides: Mapping[str, Any] | None,
                          keys: Iterable[str] = COMMAND_LINE_INTEGER_LISTS) -> dict[str, Any]:
    """The ``keys`` of ``config`` set on the command line, with their items read as integers.

    Snakemake's ``--config 'seeds=[0,1]'`` gives the strings ``'0'`` and ``'1'``; an item of
    digits only, from the command line (``overrides``: Snakemake's
    ``workflow.config_settings.config``), becomes an integer. Anything else, and every value
    of a config file, is left for :func:`check_config` to judge.
    """
    out = {}
    for key in keys:
        value = (overrides or {}).get(key)
        if isinstance(value, list) and key in config:
            out[key] = [int(v) if isinstance(v, str) and re.fullmatch(r"[0-9]{1,7}", v) else v
                        for v in value]
    return out


def check_config(config: Mapping[str, Any], schema: Mapping[str, Any] | Path | str,
                 files: Iterable[Path | str] = ()) -> None:
    """Raise :class:`ConfigError` listing every bad value, or return None when all is well.

    ``files`` are the YAML files the config was read from (Snakemake's ``workflow.configfiles``):
    they are read again strictly, refusing what a YAML 1.1 loader takes silently (a repeated
    key, ``0777`` read as octal 511, ``1:30`` read as 90). The work is bounded whatever the
    values: nothing here allocates in proportion to a number of the config.
    """
    if not isinstance(schema, Mapping):
        schema = yaml.safe_load(Path(schema).read_text())
    file_errors = config_file_errors(files)
    if too_large := config_size_errors(config):  # nothing else walks a file's alias bomb
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(file_errors + too_large))
    nonfinite = nonfinite_errors(config)
    errors = [*file_errors, *nonfinite]
    if not any("levels deep" in e for e in nonfinite):
        named = {e.split(":")[0] for e in nonfinite}  # "config key 'x'": reported once
        errors += [f"config key '{key}': {why}" for key, why in REMOVED_KEYS.items()
                   if key in config]
        current = {k: v for k, v in config.items() if k not in REMOVED_KEYS}
        errors += [e for e in schema_errors(current, schema) if e.split(":")[0] not in named]
    if not errors:
        errors = semantic_errors(config, schema)
    if not errors:
        errors = (model_spec_errors(config) + hub_errors(config) + family_errors(config)
                  + (seed_errors(config) or repo_collision_errors(config)))
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))


def resolved_family(config: Mapping[str, Any]) -> str:
    """The model family a config analyses: ``family`` when set, else the hub suite
    definition's (:func:`suite_for`), else :data:`lmdynamics.families.DEFAULT` (the tiny
    suite's GPT-NeoX)."""
    from lmdynamics import families

    if config.get("family") is not None:
        return config["family"]
    if config.get("source") == "local":  # the checkpoints' config.json
        from lmdynamics.sources.local import resolve

        return resolve(config)["family"]
    suite = suite_for(config) if config.get("source") == "hub" else None
    return suite.family if suite is not None else families.DEFAULT


def family_errors(config: Mapping[str, Any]) -> list[str]:
    """An unknown ``family`` (the registry, not the schema, knows the families), one that
    contradicts the hub suite definition's, and options that exist for one model family only
    (the paper code's attention slice)."""
    from lmdynamics import families
    from lmdynamics.sources.suites import SuiteError

    try:
        name = resolved_family(config)
    except SuiteError:  # a broken suite file: its own one-line error, raised by suite_for
        return []
    if name not in families.names():
        return [f"config key 'family': {name!r} is not a known model family "
                f"(src/lmdynamics/families/); allowed: {', '.join(families.names())}"]
    suite = suite_for(config) if config.get("source") == "hub" else None
    if suite is not None and suite.family != name:
        return [f"config key 'family': {name!r}, but suite {suite.name!r} is of family "
                f"{suite.family!r}; remove the key or set it to {suite.family!r}"]
    family = families.get(name)
    if (config.get("extraction", {}).get("attention_activation") == "paper_code"
            and not family.paper_code_attention):
        return [f"config key 'extraction.attention_activation': 'paper_code' slices GPT-NeoX's "
                f"fused query_key_value, which family {name!r} does not have; allowed: "
                "residual_write"]
    return []


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
                     pattern: re.Pattern, allowed: str,
                     optional: Mapping[str, list[Any]] | None = None) -> list[str]:
    """Errors of a template whose one required placeholder is ``field`` (filled with each of
    ``values``); ``optional`` placeholders, when used, are filled with each of theirs."""
    optional = dict(optional or {})
    names = [field, *optional]
    shown = " and ".join(f"{{{n}}}" for n in names)
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:  # a lone '{' or '}'
        return [f"config key '{key}': {show_value(template)} is not a template ({exc}); "
                f"allowed: only the placeholder(s) {shown}"]
    fields = [(f, spec, conv) for _, f, spec, conv in parsed if f is not None]
    if any(f not in names or spec or conv for f, spec, conv in fields):
        bad = sorted({f for f, _, _ in fields} - set(names)) or [f"{field} with a format"]
        return [f"config key '{key}': {show_value(template)} has placeholder(s) {', '.join(bad)}; "
                f"allowed: only {shown}"]
    used = {f for f, _, _ in fields}
    grid = [{}]
    for name, options in optional.items():
        if name in used:
            grid = [{**g, name: o} for g in grid for o in options]
    for value in values:
        for extra in grid:
            name = template.format(**{field: value}, **extra)
            if not pattern.fullmatch(name) or ".." in name or "--" in name or len(name) > 96:
                given = ", ".join(f"{k} {v!r}" for k, v in {field: value, **extra}.items())
                return [f"config key '{key}': {template!r} gives {name!r} for {given}; "
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
        seeds = list(config.get("seeds", [0]))
        errors += _template_errors("hub.repo", hub["repo"], "size", list(config["sizes"]),
                                   REPO_ID_PATTERN, repo_rule, optional={"seed": seeds})
    if "revision" in hub:
        errors += _template_errors("hub.revision", hub["revision"], "step",
                                   list(config["steps"]), REVISION_PATTERN,
                                   "a branch, tag or commit name of letters, digits, '_', '.', "
                                   "'+', '-', '/' (no '..', no leading or doubled '/')")
    if "dataset" in hub and not (REPO_ID_PATTERN.fullmatch(hub["dataset"])
                                 and ".." not in hub["dataset"] and "--" not in hub["dataset"]):
        errors.append(f"config key 'hub.dataset': {hub['dataset']!r} is not a dataset repo id; "
                      f"allowed: {repo_rule}")
    return errors


def resolved_seeds(config: Mapping[str, Any]) -> list[int]:
    """The replicate ids a config analyses: ``seeds`` when set, else every seed of a hub
    suite definition with replicates (what ``lmdynamics plan`` counts), else ``[0]``."""
    if config.get("seeds"):
        return sorted(config["seeds"])
    suite = suite_for(config) if config.get("source") == "hub" else None
    return sorted(suite.seeds) if suite is not None and suite.seeds else [0]


def seed_errors(config: Mapping[str, Any]) -> list[str]:
    """Hub seed replicates need their own repos (the suite definition's replicates, or
    ``{seed}`` in ``hub.repo``) and cannot use the paper code's gradient batches (read in the
    Pile's preshuffled order, replicate 0's)."""
    from lmdynamics.sources.suites import SuiteError

    if config.get("source") != "hub":
        return []
    try:
        suite, seeds = suite_for(config), resolved_seeds(config)
    except SuiteError:  # a broken suite file: its own one-line error, raised by suite_for
        return []
    repo = (config.get("hub") or {}).get("repo")
    if repo is None and suite.seeds:
        unknown = [s for s in seeds if s not in suite.seeds]
        if unknown:
            return [f"config key 'seeds': {unknown} are not replicates of suite "
                    f"{suite.name!r}; allowed: {list(suite.seeds)}"]
    if len(seeds) < 2:
        return []
    errors = []
    if repo is None and not suite.seeds:
        errors.append(f"config key 'seeds': suite {suite.name!r} has no seed replicates but "
                      f"seeds lists {len(seeds)}; allowed: one seed, or a suite with replicates "
                      "(e.g. polypythias), or hub.repo with {seed}")
    elif repo is not None and "{seed}" not in repo:
        errors.append(f"config key 'hub.repo': {repo!r} has no {{seed}} but seeds lists "
                      f"{len(seeds)} replicates, which would all download the same repo; "
                      "allowed: a template with {seed} (e.g. "
                      "'EleutherAI/pythia-{size}-seed{seed}'), or one seed")
    if config.get("extraction", {}).get("gradient_protocol") == "paper_code":
        errors.append("config key 'extraction.gradient_protocol': paper_code reads the training "
                      "batches of the Pile's preshuffled order, which hub seed replicates "
                      f"({len(seeds)} seeds) do not share; allowed: eval_batch, or one seed")
    return errors


def repo_collision_errors(config: Mapping[str, Any]) -> list[str]:
    """Two (size, seed) pairs of a hub config whose repos are one (``hub.repo`` or the suite
    definition's): their replicates would be the same checkpoints, counted twice."""
    from lmdynamics.sources.suites import SuiteError

    if config.get("source") != "hub":
        return []
    try:
        suite, seeds = suite_for(config), resolved_seeds(config)
    except SuiteError:  # a broken suite file: its own one-line error, raised by suite_for
        return []
    owners: dict[str, str] = {}
    for size in config["sizes"]:
        for seed in seeds:
            try:
                name = hub_repo(config, suite, size, seed if len(seeds) > 1 else None)
            except (SuiteError, KeyError, IndexError, ValueError):
                return []  # reported by hub_errors / seed_errors
            here = f"size {size!r} seed {seed}"
            if name in owners:
                return [f"config key 'seeds': {owners[name]} and {here} both download the "
                        f"repo {name!r}, two replicates of the same checkpoints; allowed: "
                        "seeds and sizes whose repos differ (hub.repo with {seed} and {size})"]
            owners[name] = here
    return []


def load_config(path: Path | str, schema: Path | str | None = None) -> dict[str, Any]:
    """Read a YAML config file and check it against ``schema`` (default: the package's config
    schema, :func:`lmdynamics.options.schema`); used by tests and the ``plan`` command."""
    text = read_text_bounded(path, "config file")
    try:  # as Snakemake reads it: JSON first, then YAML
        config = json.loads(text)
    except ValueError:
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError:  # a tag the safe loader refuses, or not YAML: say which line
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(
                f"config file {path}, {e}" for e in yaml_errors(text))) from None
    if schema is None:
        from lmdynamics.options import schema as package_schema

        schema = package_schema()
    check_config(config, schema, files=[path])
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

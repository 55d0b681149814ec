"""Checkpoint suites as data: one YAML definition per suite, shipped in this package.

A definition (``<name>.yaml`` beside this module, checked against ``suite.schema.yaml``)
says where a suite's checkpoints are and what is known about them, each fact cited in its
``sources`` list; a fact nobody documented is ``null`` with a note, never a guess:

- ``family``: the architecture adapter that loads it (``gpt_neox`` | ``llama`` | ``gpt2``);
- ``repo``: a hub repo id template with ``{size}`` (and ``{seed}`` for replicate suites), and
  ``repos``: explicit ids per size and seed where the template does not apply (PolyPythias'
  seed 0 is the original ``EleutherAI/pythia-<size>``; Mistral's GPT-2 runs are named per run);
- ``sizes``: size label -> shape (layers, hidden, heads, vocab; optionally the MLP width
  ``intermediate``, ``tied_embeddings``, ``config.json``'s ``model_type`` and the ``context``
  of a learned position embedding, which the family's parameter count may need,
  :attr:`lmdynamics.families.Family.shape_config`; ``null`` when unknown);
- ``seeds``: the replicate seeds, when the suite has replicates;
- ``revisions``: ``template`` (``step{step}``), an explicit ``list`` (step -> name), or
  ``discover``: a regular expression over the branch names that
  ``huggingface_hub.list_repo_refs`` lists, with a named group ``step`` (and optionally
  ``tokens``, scaled by ``tokens_unit``): the revision of a step is then read from the hub
  by the download job, never computed;
- ``schedule`` (the steps saved, as a list or ``[start, stop, every]`` ranges, or unknown),
  ``final_step``, ``tokens_per_step``;
- ``eval_data``: where the eval batch comes from (``pile_last_batch``: the last training batch
  of a preshuffled Pile dataset; ``tokens`` / ``text``: a local file the config names);
- ``schedule.first``: the earliest step that has a revision, when it is not 0 (OLMo-1B-hf);
- ``known_defects``: revisions the suite's own trackers report as defective (sizes, seeds,
  steps, kind, source URL; :class:`KnownDefect`), which ``lmdynamics plan`` and the pre-flight
  hub audit report; what a run leaves out is decided from the hashes the hub serves, so a
  defect fixed upstream stops being flagged (:mod:`lmdynamics.hub_audit`).

``facts_from: pythia`` takes the sizes' shapes, the schedule, the final step and the tokens
per step from :mod:`lmdynamics.sources.pythia`, the one place the Pythia facts are written.

Adding a suite is one YAML file here (or anywhere, named by the config's ``suite_file``).
"""

from __future__ import annotations

import functools
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lmdynamics.validation import REPO_ID_PATTERN

#: Most checkpoints a definition's schedule may list (bounds the work of reading a file).
MAX_STEPS = 100_000

#: Prefix of the revision label the workflow gives a step of a ``discover`` suite until its
#: download has read the branch name from the hub (``revision.json`` then holds the branch).
DISCOVERED_PREFIX = "discovered-"


class SuiteError(ValueError):
    """A suite definition is not valid or not found; the message names file, key and fix."""


@dataclass(frozen=True)
class Shape:
    """Documented shape of one size; ``None`` where no source states it."""

    layers: int | None
    hidden: int | None
    heads: int | None
    vocab: int | None
    intermediate: int | None = None
    tied_embeddings: bool | None = None
    model_type: str | None = None
    context: int | None = None
    note: str = ""

    @property
    def known(self) -> bool:
        """Whether layers, hidden and vocab (what a parameter count needs) are all known."""
        return None not in (self.layers, self.hidden, self.vocab)


@dataclass(frozen=True)
class KnownDefect:
    """A defect of served revisions, as a suite's tracker documents it (``known_defects``)."""

    sizes: tuple[str, ...]
    steps: tuple[int, ...]
    kind: str
    source: str
    seeds: tuple[int, ...] | None = None
    note: str = ""
    fixed: bool = False

    def covers(self, size: str, seed: int | None, step: int) -> bool:
        """Whether the revision of (``size``, ``seed``, ``step``) is one it names."""
        return (size in self.sizes and step in self.steps
                and (self.seeds is None or seed is None or seed in self.seeds))

    def describe(self) -> str:
        """One line: the kind, the note and the source."""
        fixed = " (reported fixed upstream)" if self.fixed else ""
        return f"{self.kind}{fixed}: {self.note.strip() or 'see the source'} ({self.source})"


@dataclass(frozen=True)
class Suite:
    """A checkpoint suite (see the module docstring for the meaning of each field)."""

    name: str
    family: str
    sizes: dict[str, Shape]
    revisions: dict[str, Any]
    schedule: tuple[int, ...] | None
    final_step: int | None
    eval_data: dict[str, Any]
    sources: tuple[str, ...]
    repo: str | None = None
    repos: dict[str, dict[int, str]] = field(default_factory=dict)
    seeds: tuple[int, ...] = ()
    tokens_per_step: int | None = None
    origin: str = ""
    first_step: int | None = None
    known_defects: tuple[KnownDefect, ...] = ()

    def defects_of(self, size: str, seed: int | None, step: int) -> list[KnownDefect]:
        """The :attr:`known_defects` that name the revision of (``size``, ``seed``, ``step``)
        of this definition's repos."""
        return [d for d in self.known_defects if d.covers(size, seed, step)]

    @property
    def discover(self) -> bool:
        """Whether the revision of a step is known only from the hub's branch listing."""
        return self.revisions["kind"] == "discover"

    def repo_id(self, size: str, seed: int | None = None) -> str:
        """The hub repo of ``size`` (and ``seed``, for replicate suites)."""
        if size not in self.sizes:
            raise SuiteError(f"suite {self.name}: size {size!r} is not defined; sizes: "
                             f"{', '.join(self.sizes)}")
        if seed is not None and self.seeds and seed not in self.seeds:
            raise SuiteError(f"suite {self.name}: seed {seed} is not defined; seeds: "
                             f"{', '.join(map(str, self.seeds))}")
        if self.seeds and seed is None:
            seed = self.seeds[0]
        explicit = self.repos.get(size, {}).get(seed) if seed is not None else None
        if explicit:
            return explicit
        if self.repo is None:
            raise SuiteError(f"suite {self.name}: no repo for size {size!r} seed {seed}")
        return self.repo.format(size=size, seed=seed)

    def revision(self, step: int) -> str | None:
        """The revision name of ``step``; ``None`` for a ``discover`` suite (the download job
        reads it from the hub's branch list, :func:`step_refs`)."""
        kind = self.revisions["kind"]
        if kind == "template":
            return self.revisions["template"].format(step=step)
        if kind == "list":
            names = self.revisions["list"]
            if step not in names:
                raise SuiteError(f"suite {self.name}: step {step} has no revision in the list; "
                                 f"steps: {_short(sorted(names))}")
            return names[step]
        return None

    @property
    def pattern(self) -> re.Pattern | None:
        """The compiled branch-name pattern of a ``discover`` suite."""
        return compile_pattern(self.revisions["pattern"]) if self.discover else None

    def step_refs(self, names: Iterable[str]) -> dict[int, str]:
        """Step -> branch name of the ``names`` that match the suite's pattern (``discover``)
        or its template; a step two branches claim raises :class:`SuiteError`."""
        if self.discover:
            pattern = self.pattern
        elif self.revisions["kind"] == "template":
            pattern = re.compile(re.escape(self.revisions["template"]).replace(
                re.escape("{step}"), r"(?P<step>[0-9]+)"), re.ASCII)
        else:
            return {s: n for s, n in self.revisions["list"].items() if n in set(names)}
        return step_refs(names, pattern, self.name)

    def tokens_of(self, ref: str) -> int | None:
        """Tokens seen by the checkpoint of branch ``ref``: the pattern's ``tokens`` group x
        ``tokens_unit`` when the suite has one, else step x ``tokens_per_step`` when
        documented, else ``None``."""
        if self.discover and "tokens" in self.pattern.groupindex:
            m = self.pattern.fullmatch(ref) if step_of(self.pattern, ref) is not None else None
            if m and len(m.group("tokens")) <= MAX_STEP_DIGITS:
                return int(m.group("tokens")) * int(self.revisions.get("tokens_unit", 1))
        m = self.step_refs([ref])
        if m and self.tokens_per_step:
            return next(iter(m)) * self.tokens_per_step
        return None


def step_refs(names: Iterable[str], pattern: re.Pattern, label: str = "") -> dict[int, str]:
    """Step -> name of the branch ``names`` that ``pattern`` matches in full (its ``step``
    group read as an integer); two branches of one step raise :class:`SuiteError`."""
    found: dict[int, str] = {}
    for name in names:
        step = step_of(pattern, name)
        if step is None:
            continue
        if step in found and found[step] != name:
            raise SuiteError(f"suite {label}: branches {found[step]!r} and {name!r} both claim "
                             f"step {step}; the revision of that step is ambiguous")
        found[step] = name
    return dict(sorted(found.items()))


#: Longest branch name read from a hub listing (longer names are no revision of a suite and
#: are never matched, which bounds the work of a pattern on a hostile name).
MAX_BRANCH_NAME = 256
#: Most digits of a step or token count read from a branch name (int64, with room).
MAX_STEP_DIGITS = 15
#: The named groups a ``discover`` pattern may hold, each exactly this subpattern (ASCII
#: digits, so ``step\u0661\u0660`` is no step).
PATTERN_GROUPS = {"step": r"(?P<step>[0-9]+)", "tokens": r"(?P<tokens>[0-9]+)"}
#: What a ``discover`` pattern is made of besides the groups: literal name characters
#: (``.`` and ``+`` escaped). No quantifier, alternation or class outside the groups, so
#: matching a name is linear in its length (no backtracking blow-up).
_PATTERN_LITERAL = re.compile(r"(?:[A-Za-z0-9_/-]|\\[.+_/-])*")


def pattern_error(pattern: str) -> str | None:
    """Why ``pattern`` is not a ``discover`` pattern (one line), or None when it is: literal
    branch-name text with :data:`PATTERN_GROUPS` (``step`` once, required; ``tokens`` at most
    once)."""
    rest = pattern
    for name, group in PATTERN_GROUPS.items():
        count = rest.count(group)
        if count > 1 or (name == "step" and count == 0):
            return (f"{pattern!r} needs the named group {PATTERN_GROUPS['step']} exactly once "
                    f"(and {PATTERN_GROUPS['tokens']} at most once)")
        rest = rest.replace(group, "")
    if not _PATTERN_LITERAL.fullmatch(rest):
        return (f"{pattern!r} holds regular-expression syntax besides its groups; allowed: "
                f"literal branch-name text (letters, digits, '_', '-', '/', and '\\.' or "
                f"'\\+' for a dot or plus) around {PATTERN_GROUPS['step']} and optionally "
                f"{PATTERN_GROUPS['tokens']}, e.g. "
                "'step(?P<step>[0-9]+)-tokens(?P<tokens>[0-9]+)B'")
    return None


def compile_pattern(pattern: str) -> re.Pattern:
    """The compiled ``discover`` pattern (ASCII digits only); :class:`SuiteError` names what
    is wrong with one that is not (:func:`pattern_error`)."""
    problem = pattern_error(pattern)
    if problem is not None:
        raise SuiteError(f"revision pattern {problem}")
    return re.compile(pattern, re.ASCII)


def step_of(pattern: re.Pattern, name: object) -> int | None:
    """The step ``pattern`` reads from branch ``name``; None when it does not match in full,
    or the name is not a string, longer than :data:`MAX_BRANCH_NAME`, or its step has more
    than :data:`MAX_STEP_DIGITS` digits or any but ASCII digits."""
    if not isinstance(name, str) or len(name) > MAX_BRANCH_NAME:
        return None
    m = pattern.fullmatch(name)
    digits = m.group("step") if m else None
    if not digits or len(digits) > MAX_STEP_DIGITS or not digits.isascii() \
            or not digits.isdigit():
        return None
    return int(digits)


def _short(values: list, limit: int = 12) -> str:
    shown = ", ".join(map(str, values[:limit]))
    return shown + (f", ... ({len(values)} in all)" if len(values) > limit else "")


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON schema of a definition (``suite.schema.yaml`` in this package)."""
    text = resources.files(__name__).joinpath("suite.schema.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def shipped() -> list[str]:
    """Names of the definitions shipped in this package."""
    return sorted(p.name.removesuffix(".yaml") for p in resources.files(__name__).iterdir()
                  if p.name.endswith(".yaml") and p.name != "suite.schema.yaml")


def load_suite(name: str) -> Suite:
    """The shipped definition ``name`` (:func:`shipped`)."""
    if name not in shipped():
        raise SuiteError(f"suite {name!r} is not a shipped definition; shipped: "
                         f"{', '.join(shipped())} (or name your own file with suite_file)")
    text = resources.files(__name__).joinpath(f"{name}.yaml").read_text(encoding="utf-8")
    return parse_suite(text, origin=f"shipped suite {name}")


def read_suite(path: Path | str) -> Suite:
    """A user's definition file."""
    from lmdynamics.validation import ConfigError, read_text_bounded

    path = Path(path)
    try:
        text = read_text_bounded(path, "suite_file")
    except ConfigError as exc:
        raise SuiteError(f"{exc} (a suite definition)") from None
    return parse_suite(text, origin=f"suite_file {path}")


def parse_suite(text: str, origin: str = "suite definition") -> Suite:
    """A definition from its YAML text, checked; :class:`SuiteError` lists every problem,
    one line each, prefixed with ``origin`` and the key."""
    from lmdynamics.validation import nonfinite_errors, schema_errors, yaml_errors

    problems = yaml_errors(text)
    if not problems:
        data = yaml.safe_load(text)
        if not isinstance(data, Mapping):
            problems = [f"a mapping of the keys {', '.join(schema()['properties'])} is "
                        f"needed, not {type(data).__name__}"]
        else:
            problems = [e.replace("config key", "key") for e in
                        nonfinite_errors(data) or schema_errors(data, schema())]
            if not problems:
                problems = _semantic_errors(data) or _hostile_errors(data)
    if problems:
        raise SuiteError(f"{origin}: invalid:\n  " + "\n  ".join(problems))
    return _build(data, origin)


def _template_fields(template: str) -> set[str] | None:
    try:
        return {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError:
        return None


def _expand_schedule(schedule: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    if not schedule or ("steps" not in schedule and "ranges" not in schedule):
        return None
    steps = set(schedule.get("steps", []))
    for start, stop, every in schedule.get("ranges", []):
        steps.update(range(start, stop + 1, every))
    return tuple(sorted(steps))


def _semantic_errors(data: Mapping[str, Any]) -> list[str]:
    """What the schema cannot say: templates, patterns, ranges, coverage of repos."""
    from lmdynamics.sources import pythia

    errors: list[str] = []
    seeds = data.get("seeds") or []
    sizes = data["sizes"]
    if data.get("facts_from") == "pythia":
        if not isinstance(sizes, list):
            errors.append("key 'sizes': with facts_from the sizes are a list of labels of "
                          "lmdynamics.sources.pythia, not shapes")
            sizes = []
        unknown = [s for s in sizes if s not in pythia.SIZES]
        if unknown:
            errors.append(f"key 'sizes': {unknown} are not Pythia sizes; allowed: "
                          f"{', '.join(pythia.SIZES)}")
    elif isinstance(sizes, list):
        errors.append("key 'sizes': a mapping of size label -> shape (layers, hidden, heads, "
                      "vocab) is needed without facts_from")
    repo = data.get("repo")
    if repo is not None:
        fields = _template_fields(repo)
        if fields is None or not fields <= {"size", "seed"}:
            errors.append(f"key 'repo': {repo!r} may hold only the placeholders {{size}} and "
                          "{seed}")
        elif "seed" in fields and not seeds:
            errors.append(f"key 'repo': {repo!r} uses {{seed}} but the suite lists no seeds")
    repos = data.get("repos") or {}
    for size, by_seed in repos.items():
        if size not in sizes:
            errors.append(f"key 'repos.{size}': not a size of the suite; sizes: "
                          f"{', '.join(sizes)}")
        for seed in by_seed:
            if int(seed) not in seeds:
                errors.append(f"key 'repos.{size}.{seed}': not a seed of the suite; seeds: "
                              f"{seeds}")
    if repo is None:
        missing = [f"{s}/{k}" for s in sizes for k in (seeds or [None])
                   if k is None or str(k) not in repos.get(s, {})]
        if missing:
            errors.append(f"key 'repo': missing, and 'repos' does not name {missing[:6]}; "
                          "give a template with {size} or every size and seed in 'repos'")
    elif fields is not None and fields <= {"size", "seed"}:
        for size in sizes:
            for seed in seeds or [None]:
                name = repo.format(size=size, seed=seed)
                if not REPO_ID_PATTERN.fullmatch(name) or ".." in name or "--" in name:
                    errors.append(f"key 'repo': {repo!r} gives {name!r} for size {size!r}; "
                                  "allowed: 'owner/name' of letters, digits, '_', '.', '-'")
                    break
    revisions = data["revisions"]
    kind = revisions["kind"]
    needed = {"template": "template", "list": "list", "discover": "pattern"}[kind]
    if needed not in revisions:
        errors.append(f"key 'revisions.{needed}': needed when revisions.kind is {kind!r}")
    elif kind == "template" and _template_fields(revisions["template"]) != {"step"}:
        errors.append(f"key 'revisions.template': {revisions['template']!r} may hold only "
                      "the placeholder {step}")
    elif kind == "discover":
        try:
            pattern = re.compile(revisions["pattern"])
        except re.error as exc:
            errors.append(f"key 'revisions.pattern': not a regular expression ({exc})")
        else:
            if "step" not in pattern.groupindex:
                errors.append("key 'revisions.pattern': needs a named group (?P<step>[0-9]+)")
            elif (problem := pattern_error(revisions["pattern"])) is not None:
                errors.append(f"key 'revisions.pattern': {problem}")
    schedule = data.get("schedule") or {}
    total = 0
    for i, (start, stop, every) in enumerate(schedule.get("ranges", [])):
        if every < 1 or stop < start:
            errors.append(f"key 'schedule.ranges.{i}': [{start}, {stop}, {every}] is not a "
                          "range; allowed: [start, stop, every] with start <= stop, every >= 1")
        else:
            total += (stop - start) // every + 1
    if total > MAX_STEPS:
        errors.append(f"key 'schedule.ranges': about {total} steps; allowed: at most "
                      f"{MAX_STEPS}")
    if not errors and kind == "list":
        listed = {int(s) for s in revisions["list"]}
        steps = _expand_schedule(schedule)
        if steps is not None and set(steps) != listed:
            errors.append("key 'schedule': differs from the steps of revisions.list; give one "
                          "or make them equal")
    final = data.get("final_step")
    steps = _expand_schedule(schedule) if not errors else None
    if final is not None and steps is not None and final not in steps:
        errors.append(f"key 'final_step': {final} is not in the schedule")
    first = schedule.get("first")
    if first is not None and steps is not None and first != min(steps):
        errors.append(f"key 'schedule.first': {first} is not the schedule's earliest step "
                      f"{min(steps)}")
    labels = list(sizes) if isinstance(sizes, (list, Mapping)) else []
    for i, defect in enumerate(data.get("known_defects") or []):
        unknown = [s for s in defect["sizes"] if s not in labels]
        if unknown:
            errors.append(f"key 'known_defects.{i}.sizes': {unknown} are not sizes of the "
                          f"suite; sizes: {', '.join(labels)}")
        odd = [k for k in defect.get("seeds") or [] if k not in seeds]
        if odd:
            errors.append(f"key 'known_defects.{i}.seeds': {odd} are not seeds of the suite; "
                          f"seeds: {seeds}")
    return errors


def _repo_name_error(name: str) -> str | None:
    """Why ``name`` is not a hub repo id (the hub refuses '..', '--' and more than 96
    characters), or None."""
    if not REPO_ID_PATTERN.fullmatch(name) or ".." in name or "--" in name or len(name) > 96:
        return (f"{name!r} is not a hub repo id; allowed: 'owner/name' of letters, digits, "
                "'_', '.', '-' (no '..' or '--', at most 96 characters)")
    return None


def _hostile_errors(data: Mapping[str, Any]) -> list[str]:
    """What :func:`_semantic_errors` leaves to the hub to find out: explicit repo and
    dataset ids the hub would refuse, two seeds or sizes of one repo (two replicates of the
    same checkpoints), a Pile batch without its dataset."""
    errors: list[str] = []
    for size, by_seed in (data.get("repos") or {}).items():
        for seed, name in by_seed.items():
            if (problem := _repo_name_error(name)) is not None:
                errors.append(f"key 'repos.{size}.{seed}': {problem}")
    for key in ("dataset", "tokenizer"):
        name = data["eval_data"].get(key)
        if name is not None and (problem := _repo_name_error(name)) is not None:
            errors.append(f"key 'eval_data.{key}': {problem}")
    if data["eval_data"]["kind"] == "pile_last_batch" and not data["eval_data"].get("dataset"):
        errors.append("key 'eval_data.dataset': unset, but eval_data.kind is pile_last_batch; "
                      "name the preshuffled Pile dataset the suite was trained on (e.g. "
                      "EleutherAI/pile-deduped-pythia-preshuffled)")
    if errors:
        return errors
    suite = _build(data, "")
    seeds = list(suite.seeds) or [None]
    owners: dict[str, str] = {}
    for size in suite.sizes:
        for seed in seeds:
            name = suite.repo_id(size, seed)
            here = f"size {size!r}" + (f" seed {seed}" if seed is not None else "")
            if name in owners:
                return [f"key 'repos': {owners[name]} and {here} both resolve to the repo "
                        f"{name!r}, which would make two replicates of the same checkpoints; "
                        "allowed: one repo per size and seed ({seed} in 'repo', or distinct "
                        "'repos' entries)"]
            owners[name] = here
    return errors


def _build(data: Mapping[str, Any], origin: str) -> Suite:
    from lmdynamics.sources import pythia
    from lmdynamics.sources.schedule import pythia_schedule

    revisions = dict(data["revisions"])
    if revisions["kind"] == "list":
        revisions["list"] = {int(s): n for s, n in revisions["list"].items()}
    if data.get("facts_from") == "pythia":
        sizes = {s: Shape(*pythia.ARCHITECTURES[s][:2], pythia.HEADS[s],
                          pythia.ARCHITECTURES[s][2], 4 * pythia.ARCHITECTURES[s][1], False,
                          note="lmdynamics.sources.pythia") for s in data["sizes"]}
        schedule = tuple(pythia_schedule())
        final, per_step = pythia.FINAL_STEP, pythia.BATCH_SEQUENCES * pythia.CONTEXT
    else:
        sizes = {s: Shape(**shape) for s, shape in data["sizes"].items()}
        schedule = _expand_schedule(data.get("schedule"))
        if schedule is None and revisions["kind"] == "list":
            schedule = tuple(sorted(revisions["list"]))
        final, per_step = data.get("final_step"), data.get("tokens_per_step")
    repos = {size: {int(k): v for k, v in by_seed.items()}
             for size, by_seed in (data.get("repos") or {}).items()}
    defects = tuple(
        KnownDefect(sizes=tuple(d["sizes"]), steps=tuple(d["steps"]), kind=d["kind"],
                    source=d["source"], seeds=tuple(d["seeds"]) if d.get("seeds") else None,
                    note=d.get("note", ""), fixed=bool(d.get("fixed", False)))
        for d in data.get("known_defects") or [])
    first = (data.get("schedule") or {}).get("first")
    if first is None and schedule is not None:
        first = min(schedule)
    return Suite(name=data["name"], family=data["family"], sizes=sizes, revisions=revisions,
                 schedule=schedule, final_step=final, eval_data=dict(data["eval_data"]),
                 sources=tuple(data["sources"]), repo=data.get("repo"), repos=repos,
                 seeds=tuple(data.get("seeds") or ()), tokens_per_step=per_step, origin=origin,
                 first_step=first, known_defects=defects)

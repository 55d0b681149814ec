"""Hostile configuration values (issue 16): every one ends in a one-line error naming the key,
the value and what is allowed, or is used literally. No config value is ever run by a shell.

Classes covered: shell metacharacters in every string key of the schema; floats, NaN,
infinities and huge values in every number key; YAML files with repeated keys or YAML 1.1
numbers (``0777``); labels with a trailing newline; configs that would make the check itself
allocate in proportion to a number; ``--config`` values; errors of the ``lmdynamics`` command.

``TALLY`` counts the cases: tried, refused with a clear error, accepted and used literally,
silently accepted (must stay 0), shell executed (must stay 0). It is printed at the end of the
module (``pytest -s``) and written to ``$HOSTILE_TALLY`` when that is set.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmdynamics import cli
from lmdynamics.config import ConfigError, check_config, load_config
from lmdynamics.options import schema_path
from lmdynamics.validation import LABEL_PATTERN, PATTERN_HINTS, yaml_errors
from support.workflow import REPO, snakemake

SCHEMA_PATH = schema_path()
TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
# Small job lists: the dry runs below stay cheap.
TINY_SMALL = {**copy.deepcopy(TINY), "sizes": ["42k"], "steps": [0, 1, 512]}
HUB_OVERLAY = {"sizes": ["70m"], "steps": [0, 1, 143000]}
PYTHIA_SMALL = {**copy.deepcopy(PYTHIA), **HUB_OVERLAY}

TALLY: collections.Counter = collections.Counter()


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    yield
    line = ", ".join(f"{k} {TALLY[k]}" for k in ("tried", "clear error", "correct result",
                                                   "silently accepted", "shell executed"))
    print(f"\nhostile cases: {line}")
    if os.environ.get("HOSTILE_TALLY"):
        Path(os.environ["HOSTILE_TALLY"]).write_text(json.dumps(dict(TALLY)) + "\n")


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


# ---------------------------------------------------------------------------------------------
# The schema's leaves, found by walking it (a key added later is covered without editing here)


def _resolve(node: dict) -> dict:
    if "$ref" in node:
        name = node["$ref"].rsplit("/", 1)[-1]
        return {**_schema()["$defs"][name], **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def schema_leaves(node: dict | None = None, path: tuple = ()) -> list[tuple[tuple, dict]]:
    """(path, schema) of every scalar key; ``[]`` marks a list item, ``<name>`` a free key."""
    node = _resolve(_schema() if node is None else node)
    if "properties" in node or "propertyNames" in node:
        out = []
        for key, sub in node.get("properties", {}).items():
            out += schema_leaves(sub, (*path, key))
        if "propertyNames" in node:
            out.append(((*path, "<name>"), _resolve(node["propertyNames"])))
            if isinstance(node.get("additionalProperties"), dict):
                out += schema_leaves(node["additionalProperties"], (*path, "<name>"))
        return out
    if node.get("type") == "array":
        return schema_leaves(node["items"], (*path, "[]"))
    return [(path, node)]


def _types(node: dict) -> set[str]:
    t = node.get("type", "string" if "enum" in node else None)
    return set(t) if isinstance(t, list) else {t}


STRING_KEYS = [p for p, n in schema_leaves() if "string" in _types(n)]
NUMBER_KEYS = [(p, n) for p, n in schema_leaves() if _types(n) & {"integer", "number"}]
SPEC = {"hidden_size": 32, "num_layers": 2, "num_heads": 2}


def dotted(path: tuple) -> str:
    return ".".join(path)


LABEL_PATHS = (("sizes", "[]"), ("tiny", "models", "<name>"))


def config_with(path: tuple, value) -> dict:
    """A small valid config (tiny, or Pythia for ``hub.*``) with ``value`` at ``path``."""
    return set_value(copy.deepcopy(PYTHIA_SMALL if path[0] == "hub" else TINY_SMALL), path, value)


def set_value(config: dict, path: tuple, value) -> dict:
    if path in LABEL_PATHS:  # a label both names a model and reaches the rules
        config["sizes"] = [value]
        config.setdefault("tiny", copy.deepcopy(TINY["tiny"]))
        config["tiny"]["models"] = {value: SPEC} if isinstance(value, str) else {"42k": SPEC}
        return config
    path = tuple("42k" if p == "<name>" else p for p in path)  # a model's field
    if path[-1] == "[]":
        *parents, name, _ = path
        value = {"steps": [0, value, 512], "spectrum_fit": [value, 0.5]}.get(name, [value])
    else:
        *parents, name = path
    node = config
    for key in parents:
        node = node.setdefault(key, {})
    node[name] = value
    return config


def refusal(config: dict, key: str) -> str | None:
    """check_config's message (each line asserted to be one clear refusal naming ``key``'s
    top-level section), or None when the config is accepted."""
    try:
        check_config(config, _schema())
    except ConfigError as exc:
        head, *lines = str(exc).splitlines()
        assert head == "invalid configuration:" and lines, str(exc)
        for line in lines:
            assert re.match(r"  config key '[^'\n]+': .+; allowed: .+", line), line
        assert any(f"config key '{key.split('.')[0]}" in line for line in lines), (key, lines)
        return str(exc)
    return None


# ---------------------------------------------------------------------------------------------
# 1. Strings: shell metacharacters in every string key


def hostile_fragments(marker: str) -> list[str]:
    return [f"$(touch {marker})", f"`touch {marker}`", f";touch {marker}", f" && touch {marker}",
            f"|touch {marker}", f"\ntouch {marker}", f"'$(touch {marker})'",
            f'"$(touch {marker})"', f" > {marker}", f"${{IFS}}touch${{IFS}}{marker}",
            f"\r\ntouch {marker}", f" ; touch {marker} #", "\n", " ", "\x00", "*", "~", "..",
            "-rf", "é", "x" * 5000]


def hostile_values(path: tuple, marker: str) -> list[str]:
    base = {"hub.repo": "EleutherAI/pythia-{size}-deduped", "hub.revision": "step{step}",
            "hub.dataset": "EleutherAI/pile-deduped-pythia-preshuffled"}.get(dotted(path), "main")
    out = []
    for frag in hostile_fragments(marker):
        out += [base + frag, frag + base, frag]
    return out


#: Keys whose value is any local path (or a tokenizer folder), which the rules quote: no
#: control characters or braces, anything else.
PATH_KEYS = ("hub.tokens_path", "suite_file", "eval_data.path", "eval_data.tokenizer")
#: Path templates: paths once their fields ({size}, {seed}, {step}) are filled in.
TEMPLATE_KEYS = ("local.path", "local.recorded")


def _literal_ok(path: tuple, value: str) -> bool:
    """Whether an accepted value is harmless as the rules use it: shell-safe as it is, or a
    path (:data:`PATH_KEYS`), which the rules quote."""
    shown = value.replace("{size}", "70m").replace("{step}", "0").replace("{seed}", "0")
    if dotted(path) in PATH_KEYS:
        return not re.search(r"[\x00-\x1f\x7f{}]", value)
    if dotted(path) in TEMPLATE_KEYS:
        return not re.search(r"[\x00-\x1f\x7f{}]", shown)
    return shlex.quote(shown) == shown


@pytest.mark.parametrize("path", STRING_KEYS, ids=map(dotted, STRING_KEYS))
def test_shell_metacharacters_in_every_string_key_are_refused_or_literal(path, tmp_path):
    marker = str(tmp_path / "MARKER")
    accepted = []
    for value in hostile_values(path, marker):
        TALLY["tried"] += 1
        if refusal(config_with(path, value), dotted(path)) is not None:
            TALLY["clear error"] += 1
            continue
        accepted.append(value)
        if _literal_ok(path, value):
            TALLY["correct result"] += 1  # passed literally: see the shell tests below
        else:
            TALLY["silently accepted"] += 1
    assert all(_literal_ok(path, v) for v in accepted), accepted
    assert dotted(path) in (*PATH_KEYS, *TEMPLATE_KEYS) or not any("touch" in v for v in accepted)
    assert not Path(marker).exists()


def test_every_string_key_of_the_schema_is_covered():
    keys = {dotted(p) for p in STRING_KEYS}
    assert {"suite", "sizes.[]", "tiny.models.<name>", "hub.repo", "hub.revision",
            "hub.dataset", "hub.dataset_revision", "hub.tokens_path",
            "extraction.device"} <= keys
    # every free-form string has a strict pattern (or an enum) anchored with \A ... \Z
    for path, node in schema_leaves():
        if "string" in _types(node) and "enum" not in node:
            assert node["pattern"].startswith("\\A") and node["pattern"].endswith("\\Z"), path
            assert node["pattern"] in PATTERN_HINTS, path  # the message says it in words


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(STRING_KEYS),
       value=st.one_of(st.text(max_size=40),
                       st.builds(lambda a, b, c: a + b + c,
                                 st.sampled_from(["", "main", "step{step}", "a/{size}",
                                                  "EleutherAI/pythia-{size}"]),
                                 st.text(alphabet="$`;|&<>()'\"\\\n\r\t {}!*?~#%:=", max_size=6),
                                 st.text(max_size=6))))
def test_arbitrary_strings_give_a_named_error_or_a_harmless_value(path, value):
    TALLY["tried"] += 1
    if refusal(config_with(path, value), dotted(path)) is not None:  # never another exception
        TALLY["clear error"] += 1
        return
    if _literal_ok(path, value):
        TALLY["correct result"] += 1
    else:
        TALLY["silently accepted"] += 1
    assert _literal_ok(path, value), (dotted(path), value)


# --- the shell itself: the commands Snakemake would run, run with a stand-in `lmdynamics`

FAKE_CLI = """#!/bin/sh
# stand-in for lmdynamics: records its argv (NUL-separated), creates the files it would write
f=$(mktemp "$LMD_ARGV/call.XXXXXX")
printf '%s\\0' "$@" > "$f"
prev=
for a in "$@"; do
  case "$prev" in --out|--record|--csv|--md|--out-csv) mkdir -p "$(dirname "$a")"; : > "$a";; esac
  prev=$a
done
"""


def fake_cli(tmp_path: Path) -> dict[str, str]:
    """Environment whose `lmdynamics` is FAKE_CLI, recording calls under tmp_path/argv."""
    bin_dir, argv_dir = tmp_path / "fakebin", tmp_path / "argv"
    bin_dir.mkdir(exist_ok=True)
    argv_dir.mkdir(exist_ok=True)
    (bin_dir / "lmdynamics").write_text(FAKE_CLI)
    (bin_dir / "lmdynamics").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
            "LMD_ARGV": str(argv_dir)}


def snakemake_with(env: dict, workdir: Path, *args: str) -> subprocess.CompletedProcess:
    """A real Snakemake run (jobs executed by its own shell) in ``env``."""
    cmd = [sys.executable, "-m", "snakemake", "--cores", "1", *args]
    env = {**env, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=300)


def recorded_calls(tmp_path: Path) -> list[list[str]]:
    return [p.read_bytes().decode().split("\0")[:-1]
            for p in sorted((tmp_path / "argv").glob("call.*"))]


def run_printed_commands(workdir: Path, env: dict, *args: str) -> int:
    """Run every shell command of `snakemake -n -p` with bash, as Snakemake would."""
    proc = snakemake(workdir, "-n", "-p", *args)
    commands = [line.removeprefix("Shell command: ")
                for line in (proc.stdout + proc.stderr).splitlines()
                if line.startswith("Shell command: ") and line != "Shell command: None"]
    assert commands, proc.stdout[-2000:]
    for command in commands:
        words = shlex.split(command)
        for i, word in enumerate(words[:-1]):
            if word == ">":
                (workdir / words[i + 1]).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["bash", "-c", f"set -euo pipefail; {command}"], cwd=workdir, env=env,
                       check=True, timeout=60)
    return len(commands)


TOKENS_PATHS = ["shards $(touch {m})", "a`touch {m}`b", "x; touch {m}", "my shards",
                "-starts-with-dash", "q'uote\"d > {m}", "$HOME*"]


@pytest.mark.parametrize("template", TOKENS_PATHS)
def test_accepted_path_reaches_the_command_as_one_literal_argument(template, tmp_path,
                                                                   workflow_copy):
    """hub.tokens_path is any path: every command of the hub workflow, run by bash with a
    stand-in lmdynamics, gets it as one argument, and nothing else runs."""
    marker = tmp_path / "MARKER"
    value = template.format(m=marker)
    workdir = workflow_copy
    (workdir / value).mkdir(parents=True)
    overlay = {**HUB_OVERLAY, "hub": {"tokens_path": value}}
    (workdir / "config/hostile.yaml").write_text(yaml.safe_dump(overlay))
    TALLY["tried"] += 1
    env = fake_cli(tmp_path)
    n = run_printed_commands(workdir, env, "--configfile", "config/config.yaml",
                             "config/hostile.yaml")
    calls = recorded_calls(tmp_path)
    assert len(calls) == n
    executed = marker.exists()
    TALLY["shell executed"] += executed
    assert not executed
    pile = [c for c in calls if c[0] == "pile-batch"]
    assert len(pile) == 1 and _options_of(pile[0])["hub"]["tokens_path"] == value, pile
    TALLY["correct result"] += 1


def _options_of(argv: list[str]) -> dict:
    """The ``--options`` JSON of a recorded ``lmdynamics`` call, parsed."""
    return json.loads(argv[argv.index("--options") + 1])


def test_snakemake_runs_a_hostile_path_literally(tmp_path, workflow_copy):
    """A real run (Snakemake's own shell) of the pile_batch job with a hostile tokens_path."""
    marker = tmp_path / "MARKER"
    value = f"shards $(touch {marker}); touch {marker}"
    workdir = workflow_copy
    (workdir / value).mkdir(parents=True)
    overlay = {**HUB_OVERLAY, "hub": {"tokens_path": value}}
    (workdir / "config/hostile.yaml").write_text(yaml.safe_dump(overlay))
    TALLY["tried"] += 1
    proc = snakemake_with(fake_cli(tmp_path), workdir, "results/pythia/data/batch142999.npy",
                          "--configfile", "config/config.yaml", "config/hostile.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    TALLY["shell executed"] += marker.exists()
    assert not marker.exists()
    (call,) = recorded_calls(tmp_path)
    hub = _options_of(call)["hub"]
    assert call[0] == "pile-batch"
    assert hub["dataset"] == "EleutherAI/pile-deduped-pythia-preshuffled"
    assert hub["tokens_path"] == value
    TALLY["correct result"] += 1


def test_snakemake_refuses_shell_in_dataset_revision_before_any_job(tmp_path, workflow_copy):
    """The issue's case: hub.dataset_revision "main$(touch ...)" ran as shell code."""
    marker = tmp_path / "MARKER"
    workdir = workflow_copy
    overlay = {**HUB_OVERLAY, "hub": {"dataset_revision": f"main$(touch {marker})"}}
    (workdir / "config/hostile.yaml").write_text(yaml.safe_dump(overlay))
    TALLY["tried"] += 1
    proc = snakemake_with(fake_cli(tmp_path), workdir, "--configfile", "config/config.yaml",
                          "config/hostile.yaml")
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert re.search(r"^  config key 'hub\.dataset_revision': 'main\$\(touch /.* is not allowed; "
                     r"allowed: a branch, tag or commit name", out, flags=re.M), out[-3000:]
    assert not marker.exists() and not (workdir / "results").exists()
    assert recorded_calls(tmp_path) == []
    TALLY["clear error"] += 1


def test_snakemake_refuses_shell_in_every_string_key_before_any_job(tmp_path, workflow_copy):
    """All string keys but the path at once, through Snakemake: each one named, no job run."""
    marker = tmp_path / "MARKER"
    config = copy.deepcopy(PYTHIA_SMALL)
    expected = []
    for path in STRING_KEYS:
        if dotted(path) in PATH_KEYS:
            continue  # any path is allowed: tested above, passed literally
        base = {"hub.repo": "a/{size}", "hub.revision": "{step}"}.get(dotted(path), "x")
        value = f"{base}$(touch {marker})"
        if path == ("tiny", "models", "<name>"):
            config["tiny"]["models"][value] = SPEC
            expected.append("tiny.models")
            continue
        set_value(config, path, value)
        # a list's item is named by its index (sizes.0, measures.gini.data.0)
        expected.append(dotted((*path[:-1], "0")) if path[-1] == "[]" else dotted(path))
    workdir = workflow_copy
    (workdir / "config/hostile.yaml").write_text(yaml.safe_dump(config))
    TALLY["tried"] += len(expected)
    proc = snakemake_with(fake_cli(tmp_path), workdir, "--configfile", "config/hostile.yaml")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    for key in expected:
        assert re.search(rf"^  config key '{re.escape(key)}': .*\$\(touch .*; allowed: ", out,
                         flags=re.M), (key, out[-4000:])
    assert not marker.exists() and recorded_calls(tmp_path) == []
    assert not (workdir / "results").exists()
    TALLY["clear error"] += len(expected)


SHELL_FIELD = re.compile(r"(?<!\{)\{([^{}]+)\}(?!\})")


def test_every_field_of_every_shell_command_is_quoted():
    """Static guard: in the rules' shell strings every {field} carries the :q format."""
    fields = 0
    for smk in sorted((REPO / "workflow/rules").glob("*.smk")):
        in_shell = False
        for line in smk.read_text().splitlines():
            stripped = line.strip()
            if stripped == "shell:":
                in_shell = True
                continue
            if in_shell and not stripped.startswith('"'):
                in_shell = False
            if in_shell:
                assert "$(" not in stripped and "`" not in stripped, (smk.name, line)
                for field in SHELL_FIELD.findall(stripped):
                    fields += 1
                    assert field.endswith(":q"), (smk.name, field)
    assert fields > 100


# ---------------------------------------------------------------------------------------------
# 2. Numbers: floats for integers, NaN, infinities, huge values, in every number key


def bad_numbers(node: dict) -> list:
    values = [math.nan, math.inf, -math.inf, 1e308, -1e308, 2**64, -(2**64), True, "1"]
    if "integer" in _types(node):
        lo = node.get("minimum", 0)
        values += [float(max(lo, 1)) + 0.0, 1e3, float(lo) + 0.5]
    return values


NUMBER_CASES = [(p, v) for p, n in NUMBER_KEYS for v in bad_numbers(n)]


@pytest.mark.parametrize(("path", "value"), NUMBER_CASES,
                         ids=[f"{dotted(p)}={v!r}" for p, v in NUMBER_CASES])
def test_every_bad_number_is_refused_naming_the_key(path, value):
    TALLY["tried"] += 1
    message = refusal(config_with(path, value), dotted(path))
    if message is None:
        TALLY["silently accepted"] += 1
    assert message is not None, (dotted(path), value)
    key = dotted(tuple(p for p in path if p not in ("[]", "<name>"))).split(".")[-1]
    assert key in message, message
    TALLY["clear error"] += 1


def test_every_number_key_is_bounded_above():
    for path, node in NUMBER_KEYS:
        assert "maximum" in node or "exclusiveMaximum" in node, dotted(path)


def test_issue_examples_of_numbers():
    cases = {("tokens",): 1024.0, ("steps", "[]"): 384.0, ("tiny", "lr"): math.nan,
             ("mcc", "cka_threshold"): math.nan, ("hub", "min_free_gb"): math.inf,
             ("seed",): 2**64, ("final_step",): 10**11}
    for path, value in cases.items():
        TALLY["tried"] += 1
        message = refusal(config_with(path, value), dotted(path))
        assert message is not None and path[0] in message, (path, value)
        TALLY["clear error"] += 1
    message = refusal(config_with(("tokens",), 1024.0), "tokens")
    assert "'tokens': 1024.0 is not allowed; allowed: an integer, written without a " \
           "decimal point or exponent" in message


def _tiny(**changes) -> dict:
    config = copy.deepcopy(TINY_SMALL)
    for dotted_key, value in changes.items():
        *parents, name = dotted_key.split("__")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[name] = value
    return config


@pytest.mark.parametrize(("key", "config"), [
    ("final_step", _tiny(final_step=10**11)),
    ("tiny", _tiny(final_step=10**9, tiny__schedule__log_until=1, tiny__schedule__interval=1)),
    ("steps", _tiny(steps=list(range(10_000)))),
    ("tiny", _tiny(tiny__models={"42k": {"hidden_size": 65536, "num_layers": 1,
                                         "num_heads": 7}})),
    ("conjecture", _tiny(conjecture={"figure_steps": list(range(10_000))})),
])
def test_the_check_does_bounded_work(key, config):
    """No allocation in proportion to a config number: each refusal within 2 s of this
    process's CPU time (not wall time, which a loaded machine stretches) and 20 MB, in a few
    lines."""
    TALLY["tried"] += 1
    tracemalloc.start()
    start = time.process_time()
    try:
        message = refusal(config, key)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert message is not None and len(message.splitlines()) < 5, message
    assert time.process_time() - start < 2 and peak < 20e6, (peak, message)
    TALLY["clear error"] += 1


@pytest.mark.parametrize("key", ["tokens", "hub", "metrics"])
def test_deeply_nested_values_are_refused_not_crashed(key):
    nested: list | dict = [1.5]
    for _ in range(5000):
        nested = [nested] if key == "tokens" else {"x": nested}
    TALLY["tried"] += 1
    config = copy.deepcopy(PYTHIA_SMALL)
    config[key] = nested
    assert refusal(config, key) is not None
    TALLY["clear error"] += 1


def test_snakemake_refuses_float_and_nan_config_overrides(workflow_copy):
    workdir = workflow_copy
    TALLY["tried"] += 3
    proc = snakemake(workdir, "-n", "--configfile", "config/tiny.yaml", "--config", "tokens=1e3",
                     "seed=nan", "final_step=100000000000", check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (workdir / "results").exists()
    assert "config key 'tokens': 1000.0 is not allowed; allowed: an integer" in out
    assert "config key 'seed': nan is not allowed; allowed: a finite number" in out
    assert "config key 'final_step': 100000000000 is not allowed; allowed: a value <= " in out
    TALLY["clear error"] += 3


# ---------------------------------------------------------------------------------------------
# 3. YAML files: repeated keys, YAML 1.1 numbers


YAML_CASES = [
    ("seed: 0777\n", "line 1: config key 'seed': 0777 is read by YAML 1.1 as 511"),
    ("tokens: 512\ntokens: 256\n", "line 2: config key 'tokens' is given twice (also line 1)"),
    ("hub:\n  retries: 1\n  retries: 2\n", "config key 'hub.retries' is given twice"),
    ("steps: [0, 0010, 512]\n", "config key 'steps.1': 0010 is read by YAML 1.1 as 8"),
    ("tokens: 1:30\n", "config key 'tokens': 1:30 is read by YAML 1.1 as 90"),
    ("seed: 0b11\n", "config key 'seed': 0b11 is read by YAML 1.1 as 3"),
    ("tiny:\n  models:\n    a: {hidden_size: 08, hidden_size: 8}\n",
     "config key 'tiny.models.a.hidden_size' is given twice"),
]


@pytest.mark.parametrize(("text", "expected"), YAML_CASES)
def test_yaml_pitfalls_in_a_config_file_are_refused(text, expected, tmp_path):
    TALLY["tried"] += 1
    assert any(expected in e for e in yaml_errors(text)), yaml_errors(text)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k not in
                                    yaml.safe_load(text)}) + text)
    with pytest.raises(ConfigError, match=re.escape(f"config file {path}, ")):
        load_config(path, SCHEMA_PATH)
    TALLY["clear error"] += 1


def test_json_config_files_are_read_as_json(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(TINY, indent="\t"))  # tabs: valid JSON, not valid YAML
    load_config(path, SCHEMA_PATH)
    TALLY["tried"] += 1
    path.write_text('{"seed": 1, "seed": 2, ' + json.dumps(TINY)[1:])
    with pytest.raises(ConfigError, match=r"c\.json, config key 'seed' is given twice"):
        load_config(path, SCHEMA_PATH)
    TALLY["clear error"] += 1


def test_plain_yaml_passes_the_strict_reading():
    for name in ("tiny.yaml", "config.yaml", "paper_code.yaml"):
        assert yaml_errors((REPO / "config" / name).read_text()) == []
    assert yaml_errors("a: 0\nb: 10\nc: 0.5\nd: '0777'\ne: 1_000\nf: [0, 1]\n") == []


def test_aliases_cannot_make_the_yaml_pass_grow():
    names = "abcdefghijklmnopqrstu"  # u holds 3**20 references to a: walked once each
    text = "a: &a [1, 2]\n" + "".join(f"{c}: &{c} [*{p}, *{p}, *{p}]\n"
                                      for p, c in zip(names, names[1:], strict=False))
    start = time.perf_counter()
    (error,) = yaml_errors(text)  # refused: a walk of the values would never end (issue 31)
    assert "aliases (*name) expand the document to more than 1000000 values" in error
    assert time.perf_counter() - start < 1
    small = "".join(line + "\n" for line in text.splitlines()[:10])  # 3**9 references
    assert yaml_errors(small) == []


def test_snakemake_refuses_a_config_file_with_yaml_pitfalls(workflow_copy):
    workdir = workflow_copy
    (workdir / "config/bad.yaml").write_text("seed: 0777\ntokens: 512\ntokens: 256\n")
    TALLY["tried"] += 2
    proc = snakemake(workdir, "-n", "--configfile", "config/tiny.yaml", "config/bad.yaml",
                     check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (workdir / "results").exists()
    assert "bad.yaml, line 1: config key 'seed': 0777 is read by YAML 1.1 as 511" in out
    assert "bad.yaml, line 3: config key 'tokens' is given twice (also line 2)" in out
    TALLY["clear error"] += 2


# ---------------------------------------------------------------------------------------------
# 4. Labels: \A...\Z, not ^...$


@pytest.mark.parametrize("label", ["tiny\n", "\ntiny", "ti\nny", "42k\n", "42k\r", "42k\t",
                                   "42k ", "42k\x00"])
@pytest.mark.parametrize("path", [("suite",), ("sizes", "[]"), ("tiny", "models", "<name>")])
def test_labels_with_line_breaks_are_refused(label, path):
    TALLY["tried"] += 1
    assert re.search(LABEL_PATTERN, label) is None
    message = refusal(config_with(path, label), dotted(path))
    assert message is not None and repr(label) in message
    TALLY["clear error"] += 1


# ---------------------------------------------------------------------------------------------
# 5. The lmdynamics command: one line saying what is wrong, then the traceback


def test_a_user_error_is_one_line_then_the_traceback(tmp_path, capsys):
    TALLY["tried"] += 1
    missing = tmp_path / "nowhere.zarr"
    assert cli.main(["audit", str(missing), "--out", str(tmp_path / "a.csv")]) == 1
    err = capsys.readouterr().err.splitlines()
    first = next(i for i, line in enumerate(err) if line.startswith("lmdynamics audit: error: "))
    assert str(missing) in err[first] and "--forcerun" in err[first]
    assert err[first + 1] == "Traceback (most recent call last):"
    TALLY["clear error"] += 1


def test_a_bad_config_in_plan_is_one_line(tmp_path, capsys):
    TALLY["tried"] += 1
    path = tmp_path / "bad.yaml"
    path.write_text((REPO / "config/config.yaml").read_text() + "tokens: 1024.0\n")
    assert cli.main(["plan", "--configfile", str(path), "--schema", str(SCHEMA_PATH),
                     "--offline"]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("lmdynamics plan: error: ")]
    assert "invalid configuration: config file" in line and "'tokens' is given twice" in line
    assert "config key 'tokens': 1024.0 is not allowed" in line
    TALLY["clear error"] += 1


def test_a_missing_file_is_one_line(tmp_path, capsys):
    TALLY["tried"] += 1
    out = tmp_path / "e.npy"
    assert cli.main(["hub-eval-batch", str(tmp_path / "none.npy"),
                     "--options", '{"hub": {"sequences": 2}}',
                     "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert re.search(r"^lmdynamics hub-eval-batch: error: .*none\.npy", err, flags=re.M)
    assert not out.exists()
    TALLY["clear error"] += 1


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def bug(_args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "combine", (cli.COMMANDS["combine"][0], bug))
    with pytest.raises(ZeroDivisionError):
        cli.main(["combine", "x.zarr", "--out-zarr", "y.zarr", "--out-csv", "y.csv"])


def test_one_line_joins_a_listing_message():
    assert cli.one_line(ValueError("invalid configuration:\n  a\n  b")) == \
        "invalid configuration: a; b"
    assert cli.one_line(OSError()) == "OSError"

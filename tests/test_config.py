"""Bad configuration values fail before any job, naming the key, the value and what is allowed."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdynamics.config import ConfigError, check_config, load_config
from lmdynamics.options import schema_path
from lmdynamics.sources.schedule import checkpoint_schedule, nearest_step, pythia_schedule
from support.workflow import REPO, snakemake

SCHEMA = schema_path()
TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())


def test_shipped_configs_are_valid():
    load_config(REPO / "config/tiny.yaml", SCHEMA)
    pythia = load_config(REPO / "config/config.yaml", SCHEMA)
    assert len(pythia["steps"]) == 27 and len(pythia["sizes"]) == 5


def _set(config, dotted, value):
    *parents, last = dotted.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value


BAD = [
    # (key, value, fragments the message must contain)
    ("sizes", ["42k", "9000k"], ["'sizes'", "9000k", "42k, 183k"]),
    ("steps", [0, 5, 512], ["'steps'", "5", "0, 1, 2, 4"]),
    ("steps", [0, 1, 2], ["'steps'", "final step 512 is missing"]),
    ("final_step", 500, ["final step 500 is missing", "512 is not in the tiny suite"]),
    ("tokens", 0, ["'tokens'", "0", ">= 2"]),
    ("tokens", 10**6, ["'tokens'", "1000000", "2..2048"]),
    ("tokens", 10**9, ["'tokens'", "1000000000", "<= 16777216"]),
    ("metrics.per_divisor", "rows", ["metrics.per_divisor", "'rows'", "min_dim, head_dim, hidden"]),
    ("source", "s3", ["'source'", "'s3'", "tiny, hub"]),
    ("suite", "../../etc", ["'suite'", "'../../etc'", "no path separators"]),
    ("suite", "a/b", ["'suite'", "'a/b'", "no path separators"]),
    ("sizes", ["42k", "../x"], ["sizes.1", "'../x'"]),
    ("mcc.cka_threshold", 1.5, ["mcc.cka_threshold", "1.5", "<= 1"]),
    ("mcc.early_fraction", 0, ["mcc.early_fraction", "0", "> 0"]),
    ("figures.x_axis", "epoch", ["figures.x_axis", "'epoch'", "step, fraction"]),
    ("extraction.dtype", "int8", ["extraction.dtype", "'int8'", "float32, bfloat16, float16"]),
    ("extraction.device", "tpu", ["extraction.device", "'tpu'", "auto, cpu, cuda"]),
    ("tiny.schedule.log_until", 48, ["tiny.schedule", "log_until=48", "power of two"]),
    ("tiny.batch_size", -1, ["tiny.batch_size", "-1", ">= 1"]),
    ("seed", "zero", ["'seed'", "'zero'", "integer"]),
    # duplicated and empty lists
    ("sizes", ["42k", "42k"], ["'sizes'", "['42k', '42k']", "distinct values (repeated: '42k')"]),
    ("steps", [0, 4, 4, 512], ["'steps'", "distinct values (repeated: 4)"]),
    ("sizes", [], ["'sizes'", "[]", "at least 1 item"]),
    ("steps", [0, -1, 512], ["'steps.1'", "-1", ">= 0"]),
    ("final_step", 0, ["'final_step'", "0", ">= 1"]),
    ("tokens", 2.5, ["'tokens'", "2.5", "integer"]),
    ("seed", -1, ["'seed'", "-1", ">= 0"]),
    ("seeds", [], ["'seeds'", "[]", "at least 1 item"]),
    ("seeds", [0, 0], ["'seeds'", "distinct values (repeated: 0)"]),
    ("seeds", [0, -1], ["'seeds.1'", "-1", ">= 0"]),
    ("seeds", [0, "x"], ["'seeds.1'", "'x'", "integer"]),
    ("mcc.per_grad_fraction", 1.5, ["mcc.per_grad_fraction", "1.5", "<= 1"]),
    ("mcc.per_weight_threshold", -0.1, ["mcc.per_weight_threshold", "-0.1", ">= 0"]),
    ("metrics", {"divisor": "x"}, ["'metrics'", "'divisor'", "only the keys per_divisor"]),
    # labels that become path components: every label-like key
    ("suite", "", ["'suite'", "''", "no path separators"]),
    ("suite", ".hidden", ["'suite'", "'.hidden'", "not starting with '.'"]),
    ("suite", "a\\b", ["'suite'", "'a\\\\b'", "no path separators"]),
    ("suite", "x" * 65, ["'suite'", "at most 64 characters"]),
    ("sizes", ["42k", "a..b"], ["'sizes.1'", "'a..b'", "without '..'"]),
    ("tiny.models", {"a/b": {"hidden_size": 8, "num_layers": 1, "num_heads": 1}},
     ["'tiny.models'", "'a/b'", "no path separators"]),
    ("tiny.models", {"..": {"hidden_size": 8, "num_layers": 1, "num_heads": 1}},
     ["'tiny.models'", "'..'", "without '..'"]),
    # tiny model specs and training
    ("tiny.models.42k.num_heads", 3, ["'tiny.models.42k.num_heads'", "3",
                                      "does not divide hidden_size 32", "1, 2, 4, 8, 16, 32"]),
    ("tiny.models.42k.hidden_size", 0, ["'tiny.models.42k.hidden_size'", "0", ">= 1"]),
    ("tiny.models.42k.num_layers", "two", ["'tiny.models.42k.num_layers'", "'two'", "integer"]),
    ("tiny.models.42k.dropout", 0.1, ["'tiny.models.42k'", "'dropout'",
                                      "hidden_size, num_layers, num_heads"]),
    ("tiny.models", {}, ["'tiny.models'", "{}", "at least 1 entry"]),
    ("tiny.lr", 0, ["'tiny.lr'", "0", "> 0"]),
    ("tiny.lr", 5, ["'tiny.lr'", "5", "<= 1"]),
    ("tiny.seq_len", 1, ["'tiny.seq_len'", "1", ">= 2"]),
    ("tiny.warmup", -1, ["'tiny.warmup'", "-1", ">= 0"]),
    ("tiny.schedule.interval", 0, ["'tiny.schedule.interval'", "0", ">= 1"]),
    ("extraction.attention_implementation", "flash",
     ["'extraction.attention_implementation'", "'flash'", "sdpa", "eager"]),
]

PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
HUB_BAD = [
    ("hub.repo", "EleutherAI/pythia", ["'hub.repo'", "'EleutherAI/pythia'", "'{size}'"]),
    ("hub.repo", "../{size}", ["'hub.repo'", "'../70m'", "'owner/name'", "no '..'"]),
    ("hub.repo", "a/b/{size}", ["'hub.repo'", "'a/b/70m'", "'owner/name'"]),
    ("hub.repo", "org/{size}-{foo}", ["'hub.repo'", "placeholder(s) foo", "only {size}"]),
    ("hub.revision", "main", ["'hub.revision'", "'main'", "'{step}'"]),
    ("hub.revision", "../{step}", ["'hub.revision'", "'../0'", "no '..'"]),
    ("hub.dataset", "pile", ["'hub.dataset'", "'pile'", "'owner/name'"]),
    ("hub.repo", "org/{size}-{seed}-{step}", ["'hub.repo'", "placeholder(s) step",
                                               "only {size} and {seed}"]),
    ("hub.sequences", 0, ["'hub.sequences'", "0", ">= 1"]),
    ("hub.sequences", 5000, ["'hub.sequences'", "5000", "<= 1024"]),
    ("hub.keep_weights", "yes", ["'hub.keep_weights'", "'yes'", "boolean"]),
    ("sizes", ["70m", "13b"], ["'sizes'", "'13b'", "not a known size for source 'hub'", "2.8b"]),
    ("steps", [0, 1500, 143000], ["'steps'", "1500", "not in the hub suite's"]),
]


@pytest.mark.parametrize(("key", "value", "fragments"), HUB_BAD,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in HUB_BAD])
def test_bad_hub_value_is_named(key, value, fragments):
    config = copy.deepcopy(PYTHIA)
    _set(config, key, value)
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_hub_seeds_need_a_seed_placeholder_in_the_repo():
    config = copy.deepcopy(PYTHIA)
    config["seeds"] = [0, 3]
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    (line,) = [x for x in str(info.value).splitlines() if "hub.repo" in x]
    assert "has no {seed}" in line and "2 replicates" in line and "{seed}" in line
    del config["hub"]["repo"]  # the suite definition's: Pythia has no replicates
    with pytest.raises(ConfigError, match="suite '[a-z-]+' has no seed replicates but seeds "
                                          "lists 2"):
        check_config(config, SCHEMA)
    config["hub"]["repo"] = "EleutherAI/pythia-{size}-seed{seed}"
    check_config(config, SCHEMA)  # PolyPythias' naming for seeds >= 1
    config["extraction"] = {"gradient_protocol": "paper_code"}
    with pytest.raises(ConfigError, match="'extraction.gradient_protocol': paper_code .* hub "
                                          "seed replicates"):
        check_config(config, SCHEMA)
    del config["extraction"]
    config["hub"]["repo"] = "EleutherAI/pythia-{size}--{seed}"
    with pytest.raises(ConfigError, match=r"gives 'EleutherAI/pythia-70m--0' for size '70m', "
                                          "seed 0"):
        check_config(config, SCHEMA)


def test_seeds_from_the_command_line_are_integers():
    from lmdynamics.config import command_line_integers

    config = {"seeds": ["0", "12"], "sizes": ["1"]}
    assert command_line_integers(config, {"seeds": ["0", "12"], "sizes": ["1"]}) == {
        "seeds": [0, 12]}
    # only what the command line gave, only digits: the rest is for the schema to refuse
    assert command_line_integers(config, {}) == {}
    assert command_line_integers(config, {"seeds": ["-1", "x", "1.5"]}) == {
        "seeds": ["-1", "x", "1.5"]}


def test_hub_revisions_with_slashes_are_allowed():
    config = copy.deepcopy(PYTHIA)
    config["hub"]["revision"] = "refs/pr/{step}"
    check_config(config, SCHEMA)


@functools.cache
def _schema() -> dict:
    return yaml.safe_load(SCHEMA.read_text())


LABEL_CHARS = "aZ09._-+/\\ ~$:*\x00é"


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(alphabet=LABEL_CHARS, max_size=8),
                 st.sampled_from(["..", ".", "../x", "a/..", "/abs", "~", "a\\..\\b", "..a",
                                  "a..", "-rf", "x/../../etc"])))
def test_accepted_labels_are_single_path_components(label):
    """Whatever a label key holds, if the config is accepted the label is one plain path
    component, so results/<suite>/.../<size>/... stays under results/<suite>/."""
    spec = {"hidden_size": 8, "num_layers": 1, "num_heads": 1}
    schema = _schema()
    for key in ("suite", "sizes", "tiny.models"):
        config = copy.deepcopy(TINY)
        if key == "suite":
            config["suite"] = label
        else:
            config["sizes"] = [label]
            config["tiny"]["models"] = {label: spec}
        try:
            check_config(config, schema)
        except ConfigError:
            continue
        assert Path(label).parts == (label,) and label not in (".", "..")
        assert not set("/\\\x00") & set(label) and ".." not in label
        root = Path("/w/results") / config["suite"]
        for size in config["sizes"]:
            for rel in (f"extract/{size}/seed0/step0.zarr", f"checkpoints/{size}/seed0/step0",
                        f"metrics/{size}/seed0.zarr", f"logs/train_tiny/{size}/seed0.log"):
                resolved = Path(os.path.normpath(root / rel))
                assert resolved.is_relative_to(root), (label, rel)


def test_snakemake_refuses_path_escaping_label_before_any_job(workflow_copy):
    workdir = workflow_copy
    config = copy.deepcopy(TINY)
    config["sizes"] = ["../../escape"]
    config["tiny"]["models"] = {"../../escape": {"hidden_size": 8, "num_layers": 1,
                                                 "num_heads": 1}}
    (workdir / "config" / "bad.yaml").write_text(yaml.safe_dump(config))
    proc = snakemake(workdir, "--configfile", "config/bad.yaml", "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key 'tiny.models': '../../escape' is not allowed" in out
    assert "no path separators" in out
    assert not (workdir / "results").exists() and not (workdir.parent / "escape").exists()


@pytest.mark.parametrize(("key", "value", "fragments"), BAD,
                         ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD])
def test_bad_value_is_named(key, value, fragments):
    config = copy.deepcopy(TINY)
    _set(config, key, value)
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_hub_final_step_must_be_a_pythia_revision():
    config = yaml.safe_load((REPO / "config/config.yaml").read_text())
    config["final_step"] = 142500
    with pytest.raises(ConfigError, match=r"'final_step': 142500 is not in the hub schedule"):
        check_config(config, SCHEMA)


def test_unknown_key_is_named():
    config = copy.deepcopy(TINY)
    config["tokenz"] = 5
    with pytest.raises(ConfigError, match="tokenz"):
        check_config(config, SCHEMA)


def test_the_removed_warm_start_option_is_refused_in_one_line():
    config = {**copy.deepcopy(TINY), "execution": {"warm_start": False}}
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    lines = str(info.value).splitlines()[1:]
    assert len(lines) == 1 and "config key 'execution': removed" in lines[0], lines
    assert "warm start no longer exists" in lines[0] and "delete the key" in lines[0]


def test_snakemake_refuses_bad_config_before_any_job(workflow_copy):
    workdir = workflow_copy
    proc = snakemake(workdir, "--configfile", "config/tiny.yaml", "--config", "tokens=-3",
                     "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "config key 'tokens': -3 is not allowed" in out
    assert not (workdir / "results").exists()


def test_schedules():
    assert checkpoint_schedule(512, 64, 64) == [0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320,
                                                384, 448, 512]
    pythia = pythia_schedule()
    assert len(pythia) == 154 and pythia[:3] == [0, 1, 2] and pythia[-1] == 143000
    assert 512 in pythia and 1000 in pythia and 1024 not in pythia
    assert nearest_step([3000, 13000, 23000], 14300) == 13000
    assert nearest_step([0, 32, 64], 48) == 64  # ties go to the later step
    with pytest.raises(ValueError, match="log_until=3"):
        checkpoint_schedule(512, 3, 64)


def test_canonical_sorts_keys_recursively_and_keeps_lists():
    from lmdynamics.config import canonical

    value = {"b": {"y": 1, "x": [{"d": 1, "c": 2}]}, "a": 0}
    out = canonical(value)
    assert list(out) == ["a", "b"] and list(out["b"]) == ["x", "y"]
    assert list(out["b"]["x"][0]) == ["c", "d"] and out == value


def test_hub_settings_left_unset_come_from_the_suite_definition():
    """suite: pythia without hub.repo/revision/dataset is the standard Pile suite; the paper's
    config sets them (Pythia deduped) and keeps them; a config naming no shipped suite gets
    pythia-deduped, as before definitions existed."""
    from lmdynamics.config import hub_repo, hub_section, suite_for

    paper = yaml.safe_load((REPO / "config/config.yaml").read_text())
    bare = {**paper, "hub": {k: v for k, v in paper["hub"].items()
                             if k not in ("repo", "revision", "dataset")}}
    hub = hub_section(bare, suite_for(bare))
    assert (hub["repo"], hub["revision"], hub["dataset"]) == (
        "EleutherAI/pythia-{size}", "step{step}", "EleutherAI/pile-standard-pythia-preshuffled")
    assert hub_section(paper, suite_for(paper)) == paper["hub"]
    assert hub_repo(paper, suite_for(paper), "70m") == "EleutherAI/pythia-70m-deduped"
    other = {**bare, "suite": "my-run"}
    assert suite_for(other).name == "pythia-deduped"
    assert hub_section(other, suite_for(other))["dataset"] == \
        "EleutherAI/pile-deduped-pythia-preshuffled"
    poly = {**bare, "suite": "polypythias"}
    assert "repo" not in hub_section(poly, suite_for(poly))  # per-seed repos: no one template
    assert hub_repo(poly, suite_for(poly), "160m", 0) == "EleutherAI/pythia-160m"


def test_unset_seeds_are_every_replicate_of_the_suite_and_others_are_refused():
    """``seeds`` unset: [0] for the tiny suite and suites without replicates, every seed of a
    suite with replicates (what ``lmdynamics plan`` counts); a seed the suite does not have
    is one line naming the key and the suite's seeds."""
    from lmdynamics.config import resolved_seeds

    assert resolved_seeds({"source": "tiny"}) == [0]
    assert resolved_seeds({"source": "hub", "suite": "pythia"}) == [0]
    assert resolved_seeds({"source": "hub", "suite": "polypythias"}) == list(range(10))
    assert resolved_seeds({"source": "hub", "suite": "mistral-gpt2", "seeds": [49, 21]}) == \
        [21, 49]
    config = {**copy.deepcopy(PYTHIA), "suite": "mistral-gpt2", "sizes": ["small"],
              "steps": [0, 400000], "final_step": 400000, "seeds": [21, 22],
              "eval_data": {"path": "tokens.npy", "seq_len": 1024}}
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key, None)
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    (line,) = [x for x in str(info.value).splitlines() if "seeds" in x]
    assert "[22] are not replicates of suite 'mistral-gpt2'" in line
    assert "[21, 49, 81, 343, 777]" in line


def _olmo(**overlay):
    config = {**copy.deepcopy(PYTHIA), "suite": "olmo-1b", "sizes": ["1B"],
              "steps": [1000, 2000, 20000, 738020], "final_step": 738020,
              "eval_data": {"path": "tokens.npy"}, **overlay}
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key, None)
    return config


def test_a_suite_without_step_0_refuses_it_before_any_job():
    """OLMo-1B-hf has no step0 branch (its first is step1000-tokens4B): the README's old
    example ``steps: [0, 1000, ...]`` is refused by the config check, not by a download."""
    check_config(_olmo(), SCHEMA)
    with pytest.raises(ConfigError) as info:
        check_config(_olmo(steps=[0, 1000, 20000, 738020]), SCHEMA)
    (line,) = str(info.value).splitlines()[1:]
    assert "config key 'steps': 0 is before step 1000, the first revision suite olmo-1b" in line


def test_table_1s_early_step_is_checked_before_any_job():
    """No analysed step at or before early_fraction x final: Table 1 could not be made; the
    config check says so instead of the last job of the run."""
    config = _olmo(steps=[100000, 200000, 738020])
    with pytest.raises(ConfigError) as info:
        check_config(config, SCHEMA)
    assert ("no analysed step is at or before mcc.early_fraction 0.1 x final_step 738020 = "
            "73802, Table 1's early step; allowed: steps including one <= 73802, or "
            "mcc.early_step: nearest") in str(info.value)
    check_config({**config, "mcc": {"early_step": "nearest"}}, SCHEMA)
    check_config({**config, "mcc": {"early_fraction": 0.2}}, SCHEMA)

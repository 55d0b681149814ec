"""Bad configuration values fail before any job, naming the key, the value and what is allowed."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO, copy_workflow, snakemake
from lmdynamics.config import ConfigError, check_config, load_config
from lmdynamics.schedule import checkpoint_schedule, nearest_step, pythia_schedule

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
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
    ("tokens", 10**9, ["'tokens'", "1000000000", "2..2048"]),
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
]


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


def test_snakemake_refuses_bad_config_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path)
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

"""The plan (bytes to download, store bytes, compute) and the hub source's config keys."""

from __future__ import annotations

import copy

import pytest
import yaml

from conftest import REPO
from hub_server import HubServer, add_pythia, checkpoint_files, use_endpoint
from lmdynamics.cli import run
from lmdynamics.config import ConfigError, check_config
from lmdynamics.sources import plan as pl

SCHEMA = REPO / "workflow/schemas/config.schema.yaml"
PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())

#: Total parameters published in the Pythia README.
PUBLISHED = {"14m": 14_067_712, "31m": 30_494_720, "70m": 70_426_624, "160m": 162_322_944,
             "410m": 405_334_016, "1b": 1_011_781_632, "1.4b": 1_414_647_808,
             "2.8b": 2_775_208_960, "6.9b": 6_857_302_016, "12b": 11_846_072_320}


def test_parameter_counts_match_the_published_ones():
    for size, count in PUBLISHED.items():
        assert pl.gpt_neox_parameters(*pl.PYTHIA_ARCHITECTURES[size]) == count, size


def test_offline_plan_of_the_paper_grid():
    table = pl.plan(PYTHIA, online=False, tflops=100, download_mb_s=100).set_index("size")
    assert list(table.index) == PYTHIA["sizes"] and (table.steps == 27).all()
    row = table.loc["2.8b"]
    assert row.download_bytes == 27 * (2 * 2_775_208_960 + 1000)
    assert row.download_source.startswith("estimate: parameters x 2 bytes")
    assert row.store_bytes == 27 * (2 * 32 * 4096 * 2560 * 4 + 4 * 32 * 2560 * 8)
    tokens = 8 * 2049
    assert row.flops_per_checkpoint == 6 * (2_775_208_960 - 50304 * 2560) * tokens
    assert row.hours == pytest.approx(row.flops_total / 100e12 / 3600)
    text = pl.format_plan(table.reset_index())
    assert "2.8b" in text and "total" in text and "TFLOP/s" in text


def test_online_plan_uses_the_hub_metadata_of_every_revision(monkeypatch, tmp_path):
    config = {**copy.deepcopy(PYTHIA), "sizes": ["70m"], "steps": [0, 143000]}
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_pythia(hub, "70m", [0, 143000])
        table = pl.plan(config)
    files = [checkpoint_files("70m", seed=1000 + s) for s in (0, 143000)]
    assert table.download_bytes[0] == sum(len(b) for f in files for b in f.values())
    assert table.download_source[0] == "hub metadata of 2 revisions"


def test_unreachable_hub_falls_back_to_estimates_and_says_why():
    def offline(repo, revision):
        raise ConnectionError("no route to host")

    table = pl.plan({**PYTHIA, "sizes": ["70m", "160m"]}, revision_bytes=offline)
    assert "hub metadata unavailable (ConnectionError: no route to host)" in \
        table.download_source[0]
    assert table.download_bytes[1] == 27 * (2 * 162_322_944 + 1000)


def test_seed_replicates_multiply_the_checkpoints_and_name_their_repos():
    config = {**copy.deepcopy(PYTHIA), "sizes": ["70m"], "steps": [0, 143000], "seeds": [0, 4]}
    config["hub"]["repo"] = "EleutherAI/pythia-{size}-seed{seed}"
    asked = []
    table = pl.plan(config, revision_bytes=lambda repo, rev: asked.append((repo, rev)) or 10)
    assert sorted(asked) == [(f"EleutherAI/pythia-70m-seed{k}", f"step{s}")
                             for k in (0, 4) for s in (0, 143000)]
    assert table.seeds[0] == 2 and table.steps[0] == 4 and table.download_bytes[0] == 40
    one = pl.plan({**config, "seeds": [0]}, online=False)
    assert table.store_bytes[0] == 2 * one.store_bytes[0]


def test_tiny_suite_plan_downloads_nothing():
    table = pl.plan(TINY, online=False)
    assert (table.download_bytes == 0).all() and len(table) == 3


def test_plan_command_prints_the_table(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    run(["plan", "--configfile", "config/config.yaml", "--offline"])
    out = capsys.readouterr().out
    assert "plan for config/config.yaml" in out and "2.8b" in out and "total" in out


BAD_HUB = [
    ("sampling.protocol", "last", ["sampling.protocol", "'last'",
                                   "random_positions, paper_code"]),
    ("hub.retries", -1, ["hub.retries", "-1", ">= 0"]),
    ("hub.backoff", 0, ["hub.backoff", "0", "> 0"]),
    ("hub.min_free_gb", -5, ["hub.min_free_gb", "-5", ">= 0"]),
    ("hub.tokens_path", 3, ["hub.tokens_path", "3", "string"]),
    ("extraction.micro_batch", -2, ["extraction.micro_batch", "-2", ">= 0"]),
    ("hub.sequences", 2000, ["hub.sequences", "2000", "<= 1024"]),
]


@pytest.mark.parametrize(("key", "value", "fragments"), BAD_HUB,
                         ids=[f"{k}={v!r}" for k, v, _ in BAD_HUB])
def test_bad_hub_values_are_named(key, value, fragments):
    config = copy.deepcopy(PYTHIA)
    section, name = key.split(".")
    config.setdefault(section, {})[name] = value
    with pytest.raises(ConfigError) as err:
        check_config(config, SCHEMA)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_paper_code_protocol_needs_one_sequence_per_token():
    config = copy.deepcopy(PYTHIA)
    config["sampling"] = {"protocol": "paper_code"}
    with pytest.raises(ConfigError, match=r"'tokens': 4096 with sampling.protocol paper_code.*"
                                          r"8 sequences of the eval batch; allowed: 2..8"):
        check_config(config, SCHEMA)
    config["tokens"], config["hub"]["sequences"] = 128, 128
    check_config(config, SCHEMA)
    config["sampling"]["protocol"] = "random_positions"
    config["tokens"], config["hub"]["sequences"] = 2 * 2048 + 1, 2
    with pytest.raises(ConfigError, match=r"exceeds the 4096 token positions"):
        check_config(config, SCHEMA)

"""The plan (bytes to download, store bytes, compute) and the hub source's config keys."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import yaml

from lmdynamics import plan as pl
from lmdynamics.cli import run
from lmdynamics.config import ConfigError, check_config
from lmdynamics.options import schema_path
from lmdynamics.sources.suites import Shape, load_suite
from support.hub_server import HubServer, add_pythia, checkpoint_files, use_endpoint
from support.workflow import REPO

SCHEMA = schema_path()
PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
TINY = yaml.safe_load((REPO / "config/tiny.yaml").read_text())

#: Total parameters published in the Pythia README.
PUBLISHED = {"14m": 14_067_712, "31m": 30_494_720, "70m": 70_426_624, "160m": 162_322_944,
             "410m": 405_334_016, "1b": 1_011_781_632, "1.4b": 1_414_647_808,
             "2.8b": 2_775_208_960, "6.9b": 6_857_302_016, "12b": 11_846_072_320}


def test_parameter_counts_match_the_published_ones():
    suite = load_suite("pythia-deduped")  # every size (the standard suite leaves out 31m)
    for size, count in PUBLISHED.items():
        assert pl.shape_parameters("gpt_neox", suite.sizes[size]) == count, size
        assert pl.parameters({**PYTHIA, "suite": "pythia-deduped", "sizes": [size]},
                             size) == count, size


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
    assert table.seeds[0] == 2 and table.jobs[0] == 4 and table.download_bytes[0] == 40
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


def _suite_config(**overlay):
    config = copy.deepcopy(PYTHIA)
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    config.update(overlay)
    return config


def test_offline_plan_of_suite_definitions():
    poly = pl.plan(_suite_config(suite="polypythias", sizes=["70m"],
                                 eval_data={"path": "t.npy"}), online=False).iloc[0]
    assert (poly.steps, poly.seeds, poly.jobs) == (27, 10, 270)
    assert poly.download_bytes == 270 * (2 * 70_426_624 + 1000)
    olmo = pl.plan(_suite_config(suite="olmo-1b", sizes=["1B"], steps=[0, 1000],
                                 final_step=1000, eval_data={"path": "t.npy"}),
                   online=False).iloc[0]
    # 16 x (4 x 2048^2 + 3 x 2048 x 8192) + 50304 x 2048 (tied), no norm weights (OLMo)
    assert olmo.parameters == 16 * (4 * 2048**2 + 3 * 2048 * 8192) + 50304 * 2048
    assert "discovered from the hub's branch list, which needs the network" in \
        olmo.download_source
    gpt2 = pl.plan(_suite_config(suite="mistral-gpt2", sizes=["small", "medium"],
                                 steps=[0, 400000], final_step=400000,
                                 eval_data={"path": "t.npy", "seq_len": 1024}),
                   online=False)
    assert gpt2.jobs.tolist() == [10, 10]
    # GPT-2 small and medium, tied embeddings, 1024 positions: the counts of
    # openai-community/gpt2 and gpt2-medium
    assert gpt2.parameters.tolist() == [124_439_808, 354_823_168]
    assert gpt2.store_bytes[0] == 10 * pl.store_bytes(4096, 768, 12)
    assert gpt2.store_bytes[1] == 10 * pl.store_bytes(4096, 1024, 24)
    assert "jobs" in pl.format_plan(gpt2)


def test_suite_shapes_are_counted_by_the_family():
    """A documented shape is counted by its family's exact count: GPT-2 small (12 x 768,
    MLP 3072, 1024 positions, tied) has the 124,439,808 parameters of
    ``openai-community/gpt2``; Llama counts the norms OLMo 1 does not have."""
    small = Shape(12, 768, 12, 50257, 3072, True, context=1024)
    assert pl.shape_parameters("gpt2", small) == 124_439_808
    assert pl.shape_parameters("gpt2", Shape(12, 768, 12, 50257, 3072, True)) is None
    olmo = load_suite("olmo-1b").sizes["1B"]
    llama = dataclasses.replace(olmo, model_type="llama")
    assert pl.shape_parameters("llama", llama) == \
        pl.shape_parameters("llama", olmo) + (16 * 2 + 1) * 2048
    assert pl.shape_parameters("llama", dataclasses.replace(olmo, model_type=None)) is None


def test_online_plan_of_a_discover_suite_reads_the_branches(monkeypatch, tmp_path):
    from support.hub_server import OLMO_REPO, add_olmo
    from support.suite_files import olmo_branch

    config = _suite_config(suite="olmo-1b", sizes=["1B"], steps=[0, 1000], final_step=1000,
                           eval_data={"path": "t.npy"})
    asked = []

    def revision_bytes(repo, revision):
        asked.append((repo, revision))
        return 5

    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_olmo(hub, [0, 1000, 2000])
        table = pl.plan(config, revision_bytes=revision_bytes)
    assert sorted(asked) == [(OLMO_REPO, olmo_branch(0)), (OLMO_REPO, olmo_branch(1000))]
    assert table.download_bytes[0] == 10 and table.download_source[0] == \
        "hub metadata of 2 revisions"

"""Suite definitions as data: the shipped files, hostile definitions, discovery of OLMo's
branches through the real huggingface_hub client, and the download of a revision of each
non-Pythia suite from the loopback hub (tests/hub_server.py, tests/suite_files.py)."""

from __future__ import annotations

import io
import json
import re

import pytest
import safetensors.torch
import torch
import yaml

from lmdynamics.cli import run
from lmdynamics.plan import hub_refs
from lmdynamics.sources import pythia
from lmdynamics.sources import suites as S
from lmdynamics.sources.checkpoints import KNOWN_ARCHITECTURES, read_state_dict
from lmdynamics.sources.hub import RevisionNotFound, resolve_revision
from lmdynamics.sources.schedule import pythia_schedule
from lmdynamics.validation import REPO_ID_PATTERN
from support.hub_server import (
    MISTRAL_REPO,
    OLMO_REPO,
    TEST_VOCAB,
    HubServer,
    add_mistral_gpt2,
    add_olmo,
    use_endpoint,
)
from support.suite_files import (
    GPT2_TEST,
    OLMO_TEST,
    gpt2_files,
    gpt2_state_dict,
    olmo_branch,
    olmo_files,
    olmo_state_dict,
)

OLMO_STEPS = [0, 1000, 2000, 20000]  # 3000..19000 "lost", as the model card warns


def test_every_shipped_definition_loads_and_cites_its_sources():
    names = S.shipped()
    assert {"pythia", "pythia-deduped", "polypythias", "olmo-1b", "olmo-7b-0424",
            "mistral-gpt2"} <= set(names)
    for name in names:
        suite = S.load_suite(name)
        assert suite.name == name and suite.sources and suite.family in (
            "gpt_neox", "llama", "gpt2")
        for size in suite.sizes:
            for seed in suite.seeds or [None]:
                assert REPO_ID_PATTERN.fullmatch(suite.repo_id(size, seed)), (name, size, seed)


def test_pythia_facts_come_from_one_place():
    deduped = S.load_suite("pythia-deduped")
    assert list(deduped.schedule) == pythia_schedule() and deduped.final_step == 143_000
    for size, shape in deduped.sizes.items():
        assert (shape.layers, shape.hidden, shape.vocab) == pythia.ARCHITECTURES[size]
    assert deduped.repo_id("70m") == "EleutherAI/pythia-70m-deduped"
    assert deduped.revision(13000) == "step13000"
    assert S.load_suite("pythia").eval_data["dataset"] == \
        "EleutherAI/pile-standard-pythia-preshuffled"


def test_polypythias_seed_zero_is_the_original_run():
    poly = S.load_suite("polypythias")
    assert poly.seeds == tuple(range(10)) and list(poly.sizes) == [
        "14m", "31m", "70m", "160m", "410m"]
    assert poly.repo_id("70m", 0) == "EleutherAI/pythia-70m"
    assert poly.repo_id("70m", 3) == "EleutherAI/pythia-70m-seed3"
    with pytest.raises(S.SuiteError, match="seed 10 is not defined"):
        poly.repo_id("70m", 10)


def test_olmo_and_mistral_facts():
    olmo = S.load_suite("olmo-1b")
    assert olmo.discover and olmo.schedule is None
    # OLMo-1B-hf's branches: step1000-tokens4B (no step0) to step738020-tokens3094B
    assert olmo.first_step == 1000 and olmo.final_step == 738_020
    assert olmo.tokens_per_step == 2048 * 2048
    assert olmo.revision(1000) is None  # never computed: read from the branch list
    assert olmo.tokens_of("step20000-tokens84B") == 84_000_000_000
    mistral = S.load_suite("mistral-gpt2")
    assert len(mistral.schedule) == 609 and mistral.final_step == 400_000
    assert mistral.schedule[:3] == (0, 10, 20) and 1950 in mistral.schedule
    assert mistral.repo_id("medium", 777) == "stanford-crfm/eowyn-gpt2-medium-x777"
    assert mistral.revision(400000) == "checkpoint-400000"
    medium = mistral.sizes["medium"]
    assert (medium.layers, medium.hidden, medium.heads, medium.context) == (24, 1024, 16, 1024)
    assert mistral.tokens_per_step == 512 * 1024
    assert mistral.eval_data["tokenizer"] == "openai-community/gpt2"


def test_corrected_facts_cite_their_sources():
    """The facts issue 27 corrected: Pythia's heads, pythia-31m's data, PolyPythias' data
    order, OLMo-7B's converted checkpoints, and the known defects of the trackers."""
    assert [pythia.HEADS[s] for s in ("14m", "31m", "1b", "6.9b", "12b")] == [4, 8, 8, 32, 40]
    standard, deduped = S.load_suite("pythia"), S.load_suite("pythia-deduped")
    assert "31m" not in standard.sizes and "31m" in deduped.sizes
    assert "pythia-31m" in " ".join(standard.sources)
    assert "reorders" in S.load_suite("polypythias").eval_data["note"]
    olmo7 = S.load_suite("olmo-7b-0424")
    assert olmo7.repo_id("7B") == "allenai/OLMo-7B-0424-hf" and olmo7.discover
    assert any("OLMo-7B-hf" in s and "not converted" in s for s in olmo7.sources)
    defect = standard.defects_of("2.8b", None, 13000)
    assert [d.kind for d in defect] == ["same_as_main"]
    assert defect[0].source == "https://github.com/EleutherAI/pythia/issues/205"
    assert [d.kind for d in standard.defects_of("12b", None, 50000)] == ["shared_shard"]
    assert {d.source for d in standard.defects_of("70m", None, 2)} == {
        "https://github.com/EleutherAI/pythia/issues/198"}
    poly = S.load_suite("polypythias")
    assert [d.kind for d in poly.defects_of("410m", 9, 40000)] == ["no_weights"]
    assert poly.defects_of("410m", 8, 40000) == []
    assert deduped.defects_of("12b", None, 32000)[0].fixed
    for name in S.shipped():
        for d in S.load_suite(name).known_defects:
            assert d.source.startswith("https://"), (name, d)


GOOD = yaml.safe_load(S.resources.files(S.__name__).joinpath("olmo-1b.yaml").read_text())

HOSTILE = [
    ({"family": "bert"}, "key 'family': 'bert' is not allowed"),
    ({"repo": "allenai/OLMo-{size}-{seed}"}, "uses {seed} but the suite lists no seeds"),
    ({"repo": "allenai/{size}/{foo}"}, "only the placeholders {size} and {seed}"),
    ({"repo": "../{size}"}, "key 'repo'"),
    ({"revisions": {"kind": "discover", "pattern": "step([0-9]+)"}},
     "needs a named group (?P<step>"),
    ({"revisions": {"kind": "discover", "pattern": "step(?P<step>[0-9]+"}},
     "not a regular expression"),
    ({"revisions": {"kind": "template"}}, "key 'revisions.template': needed"),
    ({"schedule": {"ranges": [[100, 0, 10]]}}, "key 'schedule.ranges.0'"),
    ({"schedule": {"ranges": [[0, 10**9, 1]]}}, "at most 100000"),
    ({"schedule": {"steps": [0, 10]}, "final_step": 7}, "key 'final_step': 7 is not in"),
    ({"sources": []}, "key 'sources'"),
    ({"sizes": {"1B": {"layers": 16}}}, "key 'sizes"),
    ({"repos": {"7B": {"0": "a/b"}}}, "not a size of the suite"),
    ({"known_defects": [{"sizes": ["9B"], "steps": [1], "kind": "no_weights",
                         "source": "https://x.org/1"}]}, "key 'known_defects.0.sizes'"),
    ({"known_defects": [{"sizes": ["1B"], "steps": [1], "kind": "rumour",
                         "source": "https://x.org/1"}]}, "key 'known_defects.0.kind'"),
    ({"known_defects": [{"sizes": ["1B"], "steps": [1], "kind": "no_weights",
                         "source": "see the forum"}]}, "key 'known_defects.0.source'"),
]


@pytest.mark.parametrize("change,expected", HOSTILE, ids=[str(c) for c, _ in HOSTILE])
def test_hostile_definitions_are_refused_naming_the_key(change, expected, tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(S.SuiteError) as info:
        S.read_suite(path)
    message = str(info.value)
    assert message.startswith(f"suite_file {path}: invalid:") and expected in message, message


def test_a_definition_that_is_not_yaml_or_not_a_file_is_named(tmp_path):
    with pytest.raises(S.SuiteError, match=r"suite_file .*missing.yaml: cannot be read"):
        S.read_suite(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: a\nname: b\n")
    with pytest.raises(S.SuiteError, match="is given twice"):
        S.read_suite(bad)
    with pytest.raises(S.SuiteError, match="not a shipped definition; shipped: mistral-gpt2"):
        S.load_suite("gpt-17")


def test_fixture_tensor_names_are_the_ones_transformers_declares():
    """The hand-written revisions use exactly the names transformers' own classes hold (less
    what the files leave out: OLMo's tied lm_head, GPT-2's tied lm_head), with Conv1D (in, out)
    shapes for GPT-2."""
    from transformers import GPT2Config, GPT2LMHeadModel, OlmoConfig, OlmoForCausalLM

    hidden, layers, heads, inter = OLMO_TEST
    olmo = OlmoForCausalLM(OlmoConfig(vocab_size=TEST_VOCAB, hidden_size=hidden,
                                      intermediate_size=inter, num_hidden_layers=layers,
                                      num_attention_heads=heads, tie_word_embeddings=True))
    ours = olmo_state_dict(hidden, layers, heads, inter, TEST_VOCAB, seed=0)
    theirs = {k: tuple(v.shape) for k, v in olmo.state_dict().items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in ours.items()} == theirs
    hidden, layers, heads, positions = GPT2_TEST
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=TEST_VOCAB, n_embd=hidden, n_layer=layers,
                                      n_head=heads, n_positions=positions))
    ours = gpt2_state_dict(hidden, layers, heads, positions, TEST_VOCAB, seed=0)
    buffers = {k for k in ours if k.endswith((".attn.bias", ".attn.masked_bias"))}
    theirs = {k: tuple(v.shape) for k, v in gpt2.state_dict().items() if k != "lm_head.weight"}
    assert {k: tuple(v.shape) for k, v in ours.items() if k not in buffers} == theirs
    assert theirs["transformer.h.0.mlp.c_fc.weight"] == (hidden, 4 * hidden)  # (in, out)


def test_olmo_steps_are_discovered_through_the_hub_client(monkeypatch, tmp_path):
    olmo = S.load_suite("olmo-1b")
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        names = add_olmo(hub, OLMO_STEPS)
        refs = hub_refs(OLMO_REPO)  # huggingface_hub.HfApi().list_repo_refs
        found = olmo.step_refs(refs)
        assert found == names and "main" in refs
        assert names[20000] == "step20000-tokens84B" and names[1000] == "step1000-tokens4B"
        assert olmo.tokens_of(found[2000]) == 8_000_000_000
        assert resolve_revision(OLMO_REPO, 2000, olmo.revisions["pattern"]) == olmo_branch(2000)
        with pytest.raises(RevisionNotFound, match=r"no branch for step 3000 .*nearest "
                                                   r"available: step0-tokens0B, "
                                                   r"step1000-tokens4B, step2000-tokens8B"):
            resolve_revision(OLMO_REPO, 3000, olmo.revisions["pattern"], retries=0)
    mistral = S.load_suite("mistral-gpt2")
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        add_mistral_gpt2(hub, [0, 10, 400000])
        assert mistral.step_refs(hub_refs(MISTRAL_REPO)) == {
            0: "checkpoint-0", 10: "checkpoint-10", 400000: "checkpoint-400000"}


@pytest.mark.parametrize("suite_name", ["olmo-1b", "mistral-gpt2"])
def test_download_command_fetches_a_revision_of_each_suite(suite_name, monkeypatch, tmp_path):
    arch = {"olmo-1b": "OlmoForCausalLM", "mistral-gpt2": "GPT2LMHeadModel"}[suite_name]
    suite = S.load_suite(suite_name)
    out = tmp_path / "ckpt"
    with HubServer() as hub:
        use_endpoint(monkeypatch, hub, tmp_path)
        if suite_name == "olmo-1b":
            add_olmo(hub, OLMO_STEPS)
            repo = suite.repo_id("1B")
            args = ["--step", "2000", "--revision-pattern", suite.revisions["pattern"]]
            branch = olmo_branch(2000)
            expected = safetensors.torch.load(  # the bytes the hub serves for step 2000
                olmo_files(2000, max(OLMO_STEPS), TEST_VOCAB)["model.safetensors"])
        else:
            add_mistral_gpt2(hub, [0, 10, 400000])
            repo = suite.repo_id("small", 21)
            args = ["--revision", suite.revision(10)]
            branch = "checkpoint-10"
            expected = torch.load(io.BytesIO(gpt2_files(10, 400000, TEST_VOCAB)[
                "pytorch_model.bin"]), weights_only=True)
        assert arch in KNOWN_ARCHITECTURES
        run(["download", "--repo", repo, *args, "--out-dir", str(out),
             "--options", '{"hub": {"retries": 0}}'])
        commit = hub.state.repo("models", repo).branches[branch]
    record = json.loads((out / "revision.json").read_text())
    assert record["revision"] == branch and record["commit"] == commit
    state = read_state_dict(out / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0)
    assert re.fullmatch(r"[0-9a-f]{64}", record["sha256"])

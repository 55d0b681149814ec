"""Hostile input on the surfaces added after the first round (issue 31): suite files, eval
data, revision discovery, checkpoints' configs and weights, interventions.

Each case is an input and what it must give: a one-line error naming the file or key, what
is wrong and what to do (``expected``, a fragment of that line), or a correct result. Nothing
may hang (each case runs under a CPU-time bound), raise anything but the named error, or be
accepted silently. ``TALLY`` counts tried / clear error / correct result per surface; it is
printed at the end of the module (``pytest -s``) and written to ``$HOSTILE_TALLY`` when set.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import re
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from numpy.lib import format as npy_format

from lmdynamics.config import ConfigError, check_config, load_config
from lmdynamics.interventions.inputs import check_device, check_tokens, input_errors
from lmdynamics.interventions.study import load_tokens
from lmdynamics.options import schema_path
from lmdynamics.sources import suites as S
from lmdynamics.sources.eval_data import EvalDataError, eval_batch
from lmdynamics.sources.hub import (
    HubError,
    branch_names,
    checked_commit,
    list_branches,
    steps_from_refs,
)
from lmdynamics.sources.revision import (
    WeightsMismatchError,
    config_attrs,
    verified_revision_attrs,
)
from lmdynamics.store import TokenArrayError, file_sha256, load_token_array
from support.hub_server import HubServer, use_endpoint
from support.workflow import REPO

SCHEMA = schema_path()
ISCHEMA = schema_path("interventions")
PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())
OLMO = (REPO / "src/lmdynamics/sources/suites/olmo-1b.yaml").read_text()
MISTRAL = (REPO / "src/lmdynamics/sources/suites/mistral-gpt2.yaml").read_text()
INTERVENTIONS = yaml.safe_load((REPO / "config/interventions.yaml").read_text())["interventions"]

TALLY: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)


@pytest.fixture(scope="module", autouse=True)
def _report_tally():
    yield
    for surface, counts in sorted(TALLY.items()):
        print(f"\nhostile cases, {surface}: tried {counts['tried']}, clear error "
              f"{counts['clear error']}, correct result {counts['correct result']}")
    if os.environ.get("HOSTILE_TALLY"):
        Path(os.environ["HOSTILE_TALLY"]).write_text(json.dumps(TALLY) + "\n")


def bounded(func, seconds: float = 5.0):
    """``func()`` in a thread, failing the test if it has not returned within ``seconds``
    (a hang is a defect, never a slow pass)."""
    box: dict = {}

    def target():
        try:
            box["value"] = func()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"no answer within {seconds} s (a hang)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


def refused(surface: str, func, error: type[BaseException], expected: str) -> str:
    """The one-line message ``func`` raises (``error``), which must contain ``expected``."""
    TALLY[surface]["tried"] += 1
    with pytest.raises(error) as info:
        bounded(func)
    lines = [x.strip() for x in str(info.value).splitlines() if x.strip()]
    problem = [x for x in lines if expected in x]
    assert problem, (expected, str(info.value)[:2000])
    assert len(problem[0]) < 1000, problem[0]
    TALLY[surface]["clear error"] += 1
    return problem[0]


def correct(surface: str) -> None:
    TALLY[surface]["tried"] += 1
    TALLY[surface]["correct result"] += 1


# ---------------------------------------------------------------------------------------------
# 1. Suite files and configs


def olmo_with(**changes) -> str:
    data = yaml.safe_load(OLMO)
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        node = data
        for key in parents:
            node = node[key]
        node[name] = value
    return yaml.safe_dump(data, sort_keys=False)


def alias_bomb(key: str, levels: int = 20) -> str:
    """A YAML mapping whose ``key`` expands to 3**levels strings in a few hundred bytes."""
    names = [f"a{i}" for i in range(levels + 1)]
    head = f"{names[0]}: &{names[0]} [lol, lol, lol]\n"
    body = "".join(f"{c}: &{c} [*{p}, *{p}, *{p}]\n" for p, c in zip(names, names[1:],
                                                                       strict=False))
    return head + body + f"{key}: *{names[-1]}\n"


SUITE_TEXTS = [
    ("alias bomb in sources", OLMO.split("sources:")[0] + alias_bomb("sources"),
     "expand the document to more than"),
    ("python tag", OLMO + "notes: !!python/object/apply:os.system ['touch /tmp/x']\n",
     "the tag 'tag:yaml.org,2002:python/object/apply:os.system' is not allowed"),
    ("repos with '..'", olmo_with(repos={"1B": {"0": "own/x..y"}}, seeds=[0]),
     "key 'repos.1B.0': 'own/x..y' is not a hub repo id"),
    ("repos with '--'", olmo_with(repos={"1B": {"0": "own/x--y"}}, seeds=[0]),
     "key 'repos.1B.0': 'own/x--y' is not a hub repo id"),
    ("tokenizer with '--'", olmo_with(eval_data__tokenizer="own/x--y"),
     "key 'eval_data.tokenizer'"),
    ("two seeds, one repo (template)", olmo_with(seeds=[1, 2]),
     "both resolve to the repo 'allenai/OLMo-1B-hf'"),
    ("two seeds, one repo (repos)", olmo_with(seeds=[1, 2], repos={"1B": {"1": "a/b",
                                                                          "2": "a/b"}}),
     "both resolve to the repo 'a/b'"),
    ("tokens_unit nan", olmo_with(revisions__tokens_unit=math.nan),
     "key 'revisions.tokens_unit': nan is not allowed"),
    ("tokens_unit inf", olmo_with(revisions__tokens_unit=math.inf),
     "key 'revisions.tokens_unit': inf is not allowed"),
    ("layers 10**30", olmo_with(sizes={"1B": {"layers": 10**30, "hidden": 2048, "heads": 16,
                                              "vocab": 50304}}),
     "key 'sizes.1B.layers'"),
    ("pile batch without dataset", olmo_with(eval_data={"kind": "pile_last_batch"}),
     "key 'eval_data.dataset': unset, but eval_data.kind is pile_last_batch"),
    ("optional step group", olmo_with(revisions__pattern="step(?P<step>[0-9]+)?"),
     "key 'revisions.pattern'"),
    ("non-numeric step group", olmo_with(revisions__pattern="step(?P<step>[a-z]+)"),
     "key 'revisions.pattern'"),
    ("nested quantifiers", olmo_with(revisions__pattern="(x+)+y(?P<step>[0-9]+)"),
     "holds regular-expression syntax besides its groups"),
    ("\\d (any script's digits)", olmo_with(revisions__pattern=r"step(?P<step>\d+)"),
     "key 'revisions.pattern'"),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in SUITE_TEXTS],
                         ids=[c[0] for c in SUITE_TEXTS])
def test_hostile_suite_definitions_are_one_line_each(text, expected):
    start = time.process_time()
    refused("suite files", lambda: S.parse_suite(text, origin="suite_file mine.yaml"),
            S.SuiteError, expected)
    assert time.process_time() - start < 3


def test_the_shipped_definitions_pass_the_new_checks():
    for name in S.shipped():
        S.load_suite(name)
    correct("suite files")


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "folder", "large", "binary"])
def test_a_suite_file_that_is_no_yaml_file_is_one_line(kind, tmp_path):
    path = {"/dev/zero": Path("/dev/zero"), "fifo": tmp_path / "s.yaml",
            "folder": tmp_path, "large": tmp_path / "big.yaml",
            "binary": tmp_path / "b.yaml"}[kind]
    if kind == "fifo":
        os.mkfifo(path)  # opening it for reading would block until a writer comes
    if kind == "large":
        path.write_text("# " + "x" * 5_000_000 + "\n")
    if kind == "binary":
        path.write_bytes(b"\xff\xfe\x00name: x\n")
    expected = {"large": "larger than", "binary": "not UTF-8 text"}.get(kind,
                                                                       "not a regular file")
    refused("suite files", lambda: S.read_suite(path), S.SuiteError, f"suite_file {path}")
    with pytest.raises(S.SuiteError, match=expected):
        S.read_suite(path)


def _hub(**overlay) -> dict:
    config = copy.deepcopy(PYTHIA)
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    config.update(overlay)
    return config


MISTRAL_SMALL = {"suite": "mistral-gpt2", "sizes": ["small"], "steps": [0, 400000],
                 "final_step": 400000}
CONFIG_CASES = [
    ("seq_len beyond GPT-2's context", _hub(**MISTRAL_SMALL, eval_data={"path": "t.npy"}),
     "config key 'eval_data.seq_len': 2049 tokens exceed the 1024 positions of size 'small'"),
    ("hub.dataset with '--'", {**copy.deepcopy(PYTHIA),
                               "hub": {**PYTHIA["hub"], "dataset": "own/pile--x"}},
     "config key 'hub.dataset': 'own/pile--x' is not a dataset repo id"),
    ("a suite file whose seeds share a repo", None, "both resolve to the repo"),
]


@pytest.mark.parametrize(("config", "expected"), [c[1:] for c in CONFIG_CASES],
                         ids=[c[0] for c in CONFIG_CASES])
def test_hostile_configs_are_one_line_each(config, expected, tmp_path):
    if config is None:
        (tmp_path / "mine.yaml").write_text(olmo_with(seeds=[1, 2]))
        config = _hub(suite="mine", suite_file=str(tmp_path / "mine.yaml"), sizes=["1B"],
                      steps=[0, 1000], final_step=1000, eval_data={"path": "t.npy"})
    line = refused("suite files", lambda: check_config(config, SCHEMA), ConfigError, expected)
    assert re.match(r"config key '[^']+': .+", line), line


def test_seq_len_within_the_context_is_accepted():
    check_config(_hub(**MISTRAL_SMALL, eval_data={"path": "t.npy", "seq_len": 1024}), SCHEMA)
    correct("suite files")


@pytest.mark.parametrize("key", ["conjecture", "steps"])
def test_an_alias_bomb_in_a_config_file_is_refused_in_bounded_work(key, tmp_path):
    """The issue's 414-byte bomb under conjecture.figure_steps hung the config check; here
    it is refused by `plan`'s reader (load_config) and by check_config with the config as
    Snakemake loads it (aliases shared, expanded by any walk)."""
    text = yaml.safe_dump({k: v for k, v in PYTHIA.items() if k != key})
    path = tmp_path / "bomb.yaml"
    path.write_text(text + (_nested_bomb() if key == "conjecture" else alias_bomb(key, 19)))
    start = time.process_time()
    refused("suite files", lambda: load_config(path, SCHEMA), ConfigError,
            "more than")
    assert time.process_time() - start < 5


def _nested_bomb() -> str:
    """conjecture.figure_steps expanding to 3**19 steps through anchors defined under a key
    the schema does not know (refused as well, but only after the walk)."""
    names = [f"a{i}" for i in range(20)]
    lines = [f"  {names[0]}: &{names[0]} [1000, 1000, 1000]"]
    lines += [f"  {c}: &{c} [*{p}, *{p}, *{p}]" for p, c in zip(names, names[1:],
                                                                 strict=False)]
    return "conjecture:\n" + "\n".join(lines) + f"\n  figure_steps: *{names[-1]}\n"


def test_a_python_tag_in_a_config_file_is_one_line(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text(yaml.safe_dump(PYTHIA) + "seed: !!python/object/apply:os.getpid []\n")
    refused("suite files", lambda: load_config(path, SCHEMA), ConfigError,
            "python/object/apply:os.getpid' is not allowed")


# ---------------------------------------------------------------------------------------------
# 2. Eval data


def npy_claiming(path: Path, shape: tuple, dtype: str = "<u2", data: bytes = b"\0" * 64):
    """An .npy whose header states ``shape`` but whose data is ``data``."""
    with open(path, "wb") as f:
        npy_format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False,
                                              "shape": shape})
        f.write(data)
    return path


def test_a_header_claiming_a_trillion_tokens_is_refused_before_allocating(tmp_path):
    path = npy_claiming(tmp_path / "t.npy", (10**12,))
    refused("eval data", lambda: eval_batch(path, sequences=2, seq_len=8), EvalDataError,
            "its header says shape (1000000000000,)")
    refused("eval data", lambda: load_token_array(path, ndim=1, what="eval batch"),
            TokenArrayError, "its header says shape (1000000000000,)")


@pytest.mark.parametrize(("kind", "expected"), [
    ("empty", "no valid .npy header"),
    ("pickle", "holds object values"),
    ("short", "truncated or damaged"),
])
def test_damaged_npy_files_are_one_line(kind, expected, tmp_path):
    path = tmp_path / "t.npy"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        np.save(path, np.arange(100, dtype=np.uint16))
        path.write_bytes(path.read_bytes()[:-10])
    refused("eval data", lambda: eval_batch(path, sequences=2, seq_len=8), EvalDataError,
            expected)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_an_eval_file_that_is_no_regular_file_is_one_line(kind, tmp_path):
    path = tmp_path / "t.npy" if kind == "fifo" else Path("/dev/zero")
    if kind == "fifo":
        os.mkfifo(path)
    refused("eval data", lambda: eval_batch(path, sequences=2, seq_len=8), EvalDataError,
            f"eval_data.path {path}: not a regular file")


def test_uint32_tokens_read_as_uint16_are_refused(tmp_path):
    ids = np.arange(1, 5000, dtype="<u4") % 50000
    ids.tofile(tmp_path / "t.bin")
    refused("eval data", lambda: eval_batch(tmp_path / "t.bin", sequences=4, seq_len=16,
                                            dtype="uint16", vocab=50304),
            EvalDataError, "every second token of the file read as uint16 is 0")
    batch = eval_batch(tmp_path / "t.bin", sequences=4, seq_len=16, dtype="uint32",
                       vocab=50304)
    np.testing.assert_array_equal(batch.reshape(-1), ids[:64])
    correct("eval data")


def test_a_npy_whose_dtype_differs_from_the_configured_one_is_refused(tmp_path):
    np.save(tmp_path / "t.npy", np.arange(1, 200, dtype=np.uint32))
    refused("eval data", lambda: eval_batch(tmp_path / "t.npy", sequences=2, seq_len=8,
                                            dtype="uint16"),
            EvalDataError, "the .npy holds uint32 token ids, eval_data.dtype says uint16")
    batch = eval_batch(tmp_path / "t.npy", sequences=2, seq_len=8)
    np.testing.assert_array_equal(batch.reshape(-1), np.arange(1, 17))
    correct("eval data")


# ---------------------------------------------------------------------------------------------
# 3. Revision discovery


OLMO_PATTERN = S.compile_pattern(S.load_suite("olmo-1b").revisions["pattern"])


def test_a_branch_of_5000_digits_breaks_no_other_step():
    names = ["main", "step" + "9" * 5000, "step1000", "step2000"]
    assert bounded(lambda: steps_from_refs(names)) == [1000, 2000]
    correct("revision discovery")
    olmo = ["step" + "1" * 5000 + "-tokens4B", "step1000-tokens4B"]
    assert S.step_refs(olmo, OLMO_PATTERN) == {1000: "step1000-tokens4B"}
    correct("revision discovery")


def test_non_ascii_digits_are_no_step():
    arabic = "step\u0661\u0660\u0660\u0660"  # step١٠٠٠
    assert steps_from_refs([arabic, "step10"]) == [10]
    assert S.step_refs([arabic + "-tokens4B"], OLMO_PATTERN) == {}
    TALLY["revision discovery"]["tried"] += 2
    TALLY["revision discovery"]["correct result"] += 2


def test_a_hostile_branch_name_does_not_make_matching_hang():
    names = ["step" + "1" * 200 + "-tokens" + "2" * 200 + "x" * 10_000, "a" * 100_000 + "!"]
    start = time.process_time()
    assert bounded(lambda: S.step_refs(names * 100, OLMO_PATTERN)) == {}
    assert time.process_time() - start < 2
    correct("revision discovery")


@pytest.mark.parametrize(("pattern", "expected"), [
    ("(x+)+(?P<step>[0-9]+)", "holds regular-expression syntax"),
    ("step(?P<step>[0-9]+)?", "holds regular-expression syntax"),
    ("step(?P<step>[a-z]+)", "needs the named group (?P<step>[0-9]+) exactly once"),
    ("step(?P<step>[0-9]+)-(?P<step2>.*)", "holds regular-expression syntax"),
])
def test_a_hostile_revision_pattern_on_the_command_line_is_one_line(pattern, expected):
    from lmdynamics.sources.hub import resolve_revision

    refused("revision discovery", lambda: resolve_revision("own/x", 1000, pattern, retries=0),
            ValueError, expected)


class _Refs(SimpleNamespace):
    """What ``HfApi.list_repo_refs`` returns (``GitRefs``: ``branches``, a list of
    ``GitRefInfo`` with ``name``, huggingface_hub.hf_api), here with hostile contents."""


@pytest.mark.parametrize(("refs", "expected"), [
    (_Refs(branches=[SimpleNamespace(name=12), SimpleNamespace(name="step1")]),
     "a branch name 12"),
    (_Refs(tags=[]), "no branch list"),
    (_Refs(branches={"name": "step1"}), "no branch list"),
])
def test_a_hostile_refs_listing_is_one_line(refs, expected):
    refused("revision discovery", lambda: branch_names(refs, "own/x"), HubError, expected)


def test_an_html_refs_listing_is_one_line(monkeypatch, tmp_path):
    """The real ``huggingface_hub`` client against the loopback hub answering the refs
    listing with a 200 HTML page (a proxy's login page, a wrong HF_ENDPOINT): the client's
    ``response.json()`` raises ``JSONDecodeError``, and the user gets one line."""
    from huggingface_hub import HfApi

    with HubServer() as hub:
        hub.add_model("own/x", "main", {"config.json": b"{}"})
        use_endpoint(monkeypatch, hub, tmp_path)
        page = hub.fault(r"^/api/models/own/x/refs", "body", status=200, times=5,
                         body=b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
        refused("revision discovery",
                lambda: list_branches(HfApi(endpoint=hub.url), "own/x", retries=0,
                                      backoff=0.0), HubError,
                "own/x: the hub's refs listing is not a JSON listing of branches "
                "(JSONDecodeError")
        assert page.hits == 1  # the client asked once and read the page (no retry)


@pytest.mark.parametrize("sha", ["../../etc/passwd", "A" * 40, "0" * 39, None, 12, "0" * 64])
def test_a_commit_that_is_not_40_hex_is_refused(sha):
    refused("revision discovery", lambda: checked_commit(sha, "own/x", "step1"), HubError,
            "not 40 hex digits")


def test_a_40_hex_commit_is_kept():
    assert checked_commit("0123456789abcdef" * 2 + "01234567", "own/x", "step1") == \
        "0123456789abcdef0123456789abcdef01234567"
    correct("revision discovery")


# ---------------------------------------------------------------------------------------------
# 4. Checkpoints: the config recorded, the weights verified


def downloaded(tmp_path: Path, config: dict | None = None) -> Path:
    """A checkpoint folder as lmdynamics.sources.hub.download_revision leaves it:
    config.json, model.safetensors and revision.json (repo, revision, commit, sha256, bytes)."""
    folder = tmp_path / "step512"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config or {
        "model_type": "gpt_neox", "hidden_act": "gelu", "use_parallel_residual": True,
        "rotary_pct": 0.25, "transformers_version": "4.24.0"}))
    (folder / "model.safetensors").write_bytes(b"weights of step 512")
    record = {"repo": "own/x", "revision": "step512", "commit": "a" * 40,
              "sha256": file_sha256(folder / "model.safetensors"), "bytes": 19}
    (folder / "revision.json").write_text(json.dumps(record))
    return folder


def test_the_config_and_what_changes_the_computation_are_recorded(tmp_path):
    folder = downloaded(tmp_path)
    before = config_attrs(folder)
    assert json.loads(before["checkpoint_config"]) == {
        "model_type": "gpt_neox", "hidden_act": "gelu", "use_parallel_residual": True,
        "rotary_pct": 0.25}
    for field, value in [("use_parallel_residual", False), ("partial_rotary_factor", 0.5),
                         ("hidden_act", "relu")]:
        config = json.loads((folder / "config.json").read_text())
        config[field] = value
        (folder / "config.json").write_text(json.dumps(config))
        after = config_attrs(folder)
        assert after["config_sha256"] != before["config_sha256"]
        assert json.loads(after["checkpoint_config"])[field] == value
        correct("checkpoints")


def test_weights_replaced_after_the_download_are_refused(tmp_path):
    folder = downloaded(tmp_path)
    sha = file_sha256(folder / "model.safetensors")
    assert verified_revision_attrs(folder, sha)["hub_weights_sha256"] == sha
    correct("checkpoints")
    (folder / "model.safetensors").write_bytes(b"weights of step 256")  # another step's
    refused("checkpoints",
            lambda: verified_revision_attrs(folder, file_sha256(folder / "model.safetensors")),
            WeightsMismatchError, "the weights changed after the download")
    (folder / "revision.json").write_text("{not json")
    refused("checkpoints", lambda: verified_revision_attrs(folder, sha),
            WeightsMismatchError, "not a revision record")


def test_another_revisions_download_with_its_record_is_refused(tmp_path):
    """Step 256's download (weights and revision.json) copied into step 512's folder: the
    sha256 agrees with the record, the record's revision is not the job's."""
    folder = downloaded(tmp_path)
    sha = file_sha256(folder / "model.safetensors")
    assert verified_revision_attrs(folder, sha, "step512")["revision"] == "step512"
    correct("checkpoints")
    record = json.loads((folder / "revision.json").read_text())
    (folder / "revision.json").write_text(json.dumps({**record, "revision": "step256"}))
    refused("checkpoints", lambda: verified_revision_attrs(folder, sha, "step512"),
            WeightsMismatchError, "records own/x@step256, but this job extracts revision "
                                  "step512: another revision's download is in its folder")
    # a discover suite's label is not a branch name: only the weights are checked
    assert verified_revision_attrs(folder, sha, "discovered-step512")["revision"] == "step256"
    correct("checkpoints")


def test_extraction_refuses_weights_that_are_not_the_downloads(tmp_path):
    """Through extract_checkpoint: the weights are checked before the model is loaded, and
    the download is discarded so the next run fetches it again."""
    from lmdynamics.extraction.extract import extract_checkpoint

    folder = downloaded(tmp_path)
    (folder / "model.safetensors").write_bytes(b"weights of step 256")
    np.save(tmp_path / "eval.npy", np.zeros((2, 8), dtype=np.int64))
    refused("checkpoints", lambda: extract_checkpoint(
        folder, tmp_path / "eval.npy", tmp_path / "out.zarr", tokens=4, seed=0, size="x",
        step=512, model_name="x", revision="step512", family="gpt_neox"),
        WeightsMismatchError, "the weights changed after the download")
    assert not (folder / "revision.json").exists() and not (tmp_path / "out.zarr").exists()


# ---------------------------------------------------------------------------------------------
# 5. Interventions


def section_with(**changes) -> dict:
    section = copy.deepcopy(INTERVENTIONS)
    for dotted, value in changes.items():
        *parents, name = dotted.split("__")
        node = section
        for key in parents:
            node = node[key]
        node[name] = value
    return section


def schema_and_section_errors(section: dict) -> list[str]:
    """Every problem the study's config check finds in ``section``, one line each."""
    from lmdynamics.interventions.study import resolve_section

    try:
        resolve_section({"interventions": section})
    except ConfigError as exc:
        return str(exc).split("\n  ")[1:]
    return []


def _raise_errors(section: dict) -> None:
    from lmdynamics.interventions.study import resolve_section

    resolve_section({"interventions": section})


@pytest.mark.parametrize(("section", "expected"), [
    (section_with(tokens="data/{seed}.npy"), "config key 'interventions.tokens'"),
    (section_with(seeds=list(range(20_000))), "config key 'interventions.seeds'"),
    (section_with(sizes={"huge": {"hidden_size": 65536, "num_layers": 1024,
                                  "num_heads": 64}}),
     "interventions.sizes.huge: about 5.28e+13 parameters"),
    (section_with(variants={**INTERVENTIONS["variants"],
                            "loud": {"kind": "rank_regulariser", "strength": 1e300}}),
     "config key 'interventions.variants.loud.strength'"),
    (section_with(eval_tokens=10**12), "config key 'interventions.eval_tokens'"),
], ids=["{seed} in tokens", "20000 seeds", "65536 x 1024 layers", "strength 1e300",
        "eval_tokens 1e12"])
def test_hostile_intervention_sections_are_one_line(section, expected):
    refused("interventions", lambda: _raise_errors(section), ConfigError, expected)


def test_the_shipped_intervention_sections_pass():
    for name in ("interventions.yaml", "interventions_gpu.yaml"):
        section = yaml.safe_load((REPO / "config" / name).read_text())["interventions"]
        assert schema_and_section_errors(section) == [] and input_errors(section) == []
    correct("interventions")


def test_cuda_without_a_gpu_is_one_line():
    import torch

    if torch.cuda.is_available():
        check_device("cuda")
        correct("interventions")
        return
    refused("interventions", lambda: check_device("cuda"), ValueError,
            "interventions.device: 'cuda', but no CUDA device is available")


@pytest.mark.parametrize(("kind", "expected"), [
    ("empty file", "no valid .npy header"),
    ("empty array", "holds no tokens"),
    ("fifo", "not a regular file"),
    ("trillion", "its header says shape (1000000000000,)"),
])
def test_hostile_token_files_are_one_line(kind, expected, tmp_path):
    path = tmp_path / "tokens.npy"
    if kind == "empty file":
        path.write_bytes(b"")
    elif kind == "empty array":
        np.save(path, np.zeros(0, dtype=np.uint16))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        npy_claiming(path, (10**12,))
    refused("interventions", lambda: load_tokens(path), ValueError, expected)


def test_an_id_out_of_vocabulary_anywhere_in_the_file_is_found(tmp_path):
    """Only a prefix (2^20 / 2^24 tokens) was checked; the last token is out of range here."""
    tokens = np.zeros((1 << 24) + 5, dtype=np.uint16)
    tokens[-1] = 300
    np.save(tmp_path / "tokens.npy", tokens)
    from lmdynamics.interventions.run import RunSettings

    settings = RunSettings(final_step=8, batch_size=4, seq_len=16, lr=1e-3, warmup=0,
                           schedule="constant", decay_fraction=0.2, checkpoint_every=8,
                           gradient_every=8, eval_tokens=16, vocab_size=256, device="cpu",
                           reproducible_kernels=False)
    refused("interventions", lambda: load_tokens(tmp_path / "tokens.npy", settings),
            ValueError, f"token id 300 at position {(1 << 24) + 4} is outside 0..255")


def test_a_file_shorter_than_one_batch_is_refused_and_a_reread_one_is_logged(tmp_path,
                                                                             caplog):
    np.save(tmp_path / "tokens.npy", np.arange(100, dtype=np.uint16) % 256)
    arr = load_tokens(tmp_path / "tokens.npy")
    refused("interventions", lambda: check_tokens(arr, "tokens.npy", vocab_size=256,
                                                  batch_size=16, seq_len=32, final_step=10),
            ValueError, "100 tokens make 3 sequences of seq_len 32, fewer than one batch of 16")
    with caplog.at_level("WARNING"):
        check_tokens(arr, "tokens.npy", vocab_size=256, batch_size=2, seq_len=32,
                     final_step=10)
    assert "3 sequences of 32 tokens are read 6.7 times over 10 updates" in caplog.text
    correct("interventions")

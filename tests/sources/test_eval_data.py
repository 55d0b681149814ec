"""Eval data per suite: token files (.npy, .bin of a declared dtype) and text through a local
tokenizer, the suite-eval-batch command, and the config checks of the eval_data section."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import yaml

from lmdynamics.cli import main
from lmdynamics.config import ConfigError, check_config
from lmdynamics.options import schema_path
from lmdynamics.sources.eval_data import EvalDataError, eval_batch
from support.workflow import REPO

SCHEMA = schema_path()
PYTHIA = yaml.safe_load((REPO / "config/config.yaml").read_text())


def test_npy_tokens_in_file_order(tmp_path):
    tokens = np.arange(100, dtype=np.uint16)
    np.save(tmp_path / "t.npy", tokens)
    batch = eval_batch(tmp_path / "t.npy", sequences=3, seq_len=10, vocab=1000)
    assert batch.dtype == np.int64 and batch.shape == (3, 10)
    np.testing.assert_array_equal(batch.ravel(), np.arange(30))
    np.save(tmp_path / "2d.npy", tokens.reshape(10, 10).astype(np.int32))
    np.testing.assert_array_equal(eval_batch(tmp_path / "2d.npy", sequences=2, seq_len=10),
                                  np.arange(20).reshape(2, 10))


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_bin_tokens_are_little_endian_of_the_declared_dtype(tmp_path, dtype):
    tokens = (np.arange(64) * 7 % 1000).astype(np.dtype(dtype).newbyteorder("<"))
    (tmp_path / "t.bin").write_bytes(tokens.tobytes())
    batch = eval_batch(tmp_path / "t.bin", sequences=4, seq_len=16, vocab=1000, dtype=dtype)
    np.testing.assert_array_equal(batch.ravel(), tokens.astype(np.int64))


def _local_tokenizer(folder):
    """A word-level tokenizer saved as a transformers folder (what a cached hub tokenizer
    looks like to AutoTokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[UNK]", "the", "cat", "sat", "on", "mat"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    return folder


def test_text_is_tokenized_offline_by_the_suite_tokenizer(tmp_path):
    (tmp_path / "t.txt").write_text("the cat sat on the mat " * 4)
    folder = _local_tokenizer(tmp_path / "tok")
    batch = eval_batch(tmp_path / "t.txt", sequences=2, seq_len=6, vocab=6,
                       tokenizer=str(folder))
    np.testing.assert_array_equal(batch, [[1, 2, 3, 4, 1, 5]] * 2)


def test_a_hub_tokenizer_not_in_the_cache_is_not_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(EvalDataError, match=r"eval_data.tokenizer 'nobody/no-such-tokenizer': "
                                            r"cannot be loaded .*local folder or the hub cache"):
        eval_batch(tmp_path / "t.txt", sequences=1, seq_len=2,
                   tokenizer="nobody/no-such-tokenizer")


HOSTILE = [
    ("floats.npy", lambda p: np.save(p, np.ones(100)), {}, "holds float64 values"),
    ("pickle.npy", lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
     {}, "not a readable .npy array"),
    ("short.npy", lambda p: np.save(p, np.arange(10)), {}, "10 tokens, fewer than the 40 needed"),
    ("wide.npy", lambda p: np.save(p, np.zeros((4, 11), dtype=np.int64)), {},
     "sequences of 11 tokens, eval_data.seq_len is 10"),
    ("odd.bin", lambda p: p.write_bytes(b"\x01" * 81), {"dtype": "uint16"},
     "81 bytes is not a whole number of uint16 tokens"),
    ("nodtype.bin", lambda p: p.write_bytes(b"\x01" * 80), {}, "needs eval_data.dtype"),
    ("big.npy", lambda p: np.save(p, np.full(40, 70000, dtype=np.uint32)), {},
     "token id 70000 >= the suite's vocabulary size 50304"),
    ("neg.bin", lambda p: p.write_bytes(np.full(40, -3, dtype="<i4").tobytes()),
     {"dtype": "int32"}, "token id -3 is negative"),
    ("latin1.txt", lambda p: p.write_bytes(b"caf\xe9 " * 20), {"tokenizer": "x"},
     "not UTF-8 text"),
    ("notext.txt", lambda p: p.write_text("a"), {}, "text needs a tokenizer"),
]


@pytest.mark.parametrize("name,write,kwargs,expected", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_eval_files_give_one_line_naming_the_file(tmp_path, name, write, kwargs,
                                                          expected):
    path = tmp_path / name
    write(path)
    with pytest.raises(EvalDataError) as info:
        eval_batch(path, sequences=4, seq_len=10, vocab=50304, **kwargs)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected in message, message


OPTIONS = '{"hub": {"sequences": 2}, "eval_data": {"seq_len": 33}}'


def test_suite_eval_batch_command_writes_the_batch_and_says_its_sha256(tmp_path, capsys,
                                                                       caplog):
    caplog.set_level("INFO", logger="lmdynamics")
    np.save(tmp_path / "t.npy", np.arange(200, dtype=np.uint16))
    out = tmp_path / "eval_batch.npy"
    assert main(["suite-eval-batch", str(tmp_path / "t.npy"), "--options",
                 OPTIONS, "--vocab", "512", "--out", str(out)]) == 0
    batch = np.load(out)
    assert batch.shape == (2, 33) and batch.dtype == np.int64
    assert hashlib.sha256(batch.tobytes()).hexdigest() in caplog.text
    capsys.readouterr()
    assert main(["suite-eval-batch", str(tmp_path / "t.npy"), "--options",
                 OPTIONS, "--vocab", "50", "--out", str(tmp_path / "x.npy")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("lmdynamics suite-eval-batch: error: eval_data.path ")
    assert "token id 65 >= the suite's vocabulary size 50" in err[0]
    assert not (tmp_path / "x.npy").exists()


def _hub(**overlay):
    config = copy.deepcopy(PYTHIA)
    for key in ("repo", "revision", "dataset"):
        config["hub"].pop(key)
    for key, value in overlay.items():
        config[key] = value
    return config


def test_config_names_what_a_suite_without_public_batch_needs():
    config = _hub(suite="olmo-1b", sizes=["1B"], steps=[1000, 20000], final_step=20000)
    with pytest.raises(ConfigError, match=r"config key 'eval_data.path': unset, but suite "
                                          r"olmo-1b has no public training batch"):
        check_config(config, SCHEMA)
    config["eval_data"] = {"path": "tokens.bin"}
    with pytest.raises(ConfigError, match=r"config key 'eval_data.dtype': unset for the .bin"):
        check_config(config, SCHEMA)
    config["eval_data"] = {"path": "tokens.npy"}
    config["extraction"] = {**config["extraction"], "gradient_protocol": "paper_code"}
    with pytest.raises(ConfigError, match=r"'extraction.gradient_protocol': paper_code reads"):
        check_config(config, SCHEMA)
    config["extraction"]["gradient_protocol"] = "eval_batch"
    check_config(config, SCHEMA)  # discover suite: any steps; the download job checks them


def test_config_sizes_and_steps_come_from_the_definition():
    config = _hub(suite="mistral-gpt2", sizes=["small"], steps=[0, 15, 400000],
                  final_step=400000, eval_data={"path": "t.npy", "seq_len": 1024})
    with pytest.raises(ConfigError, match=r"'steps': 15 is not in the hub suite's checkpoint "
                                          r"schedule; allowed: 0, 10, 20"):
        check_config(config, SCHEMA)
    config["sizes"] = ["large"]
    with pytest.raises(ConfigError, match=r"'large' is not a known size for source 'hub'; "
                                          r"allowed: small, medium"):
        check_config(config, SCHEMA)


def test_suite_file_of_the_user(tmp_path):
    text = (REPO / "src/lmdynamics/sources/suites/mistral-gpt2.yaml").read_text()
    (tmp_path / "mine.yaml").write_text(text.replace("name: mistral-gpt2", "name: mine"))
    config = _hub(suite="anything", suite_file=str(tmp_path / "mine.yaml"), sizes=["small"],
                  steps=[0, 400000], final_step=400000,
                  eval_data={"path": "t.npy", "seq_len": 1024})
    check_config(config, SCHEMA)
    (tmp_path / "mine.yaml").write_text(text.replace("family: gpt2", "family: rnn"))
    with pytest.raises(ConfigError, match=r"config key 'suite_file': suite_file .*mine.yaml: "
                                          r"invalid: key 'family': 'rnn' is not allowed"):
        check_config(config, SCHEMA)

"""Tests of lmdynamics.sources.tiny: schedule, data order, model config and deterministic
training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lmdynamics.options import defaults
from lmdynamics.sources import tiny
from lmdynamics.sources.checkpoints import SAFETENSORS_NAME, load_model

SPEC = {"hidden_size": 16, "num_layers": 1, "num_heads": 2}
SHORT = {"final_step": 8, "log_until": 4, "interval": 2, "batch_size": 4, "seq_len": 32,
         "threads": 1, "seed": 0, "lr": defaults("tiny")["lr"],
         "warmup": defaults("tiny")["warmup"]}


@pytest.fixture(scope="module")
def corpus() -> np.ndarray:
    return tiny.load_corpus()


def test_corpus(corpus):
    assert corpus.dtype == np.uint8 and corpus.ndim == 1
    assert len(corpus) > 300_000
    assert len(tiny.corpus_sha256(corpus)) == 64


@pytest.mark.parametrize(("args", "expected"), [
    ((512, 64, 64), [0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512]),
    ((10, 4, 4), [0, 1, 2, 4, 8, 10]),
    ((1, 1, 1), [0, 1]),
    ((8, 8, 100), [0, 1, 2, 4, 8]),
])
def test_checkpoint_schedule(args, expected):
    assert tiny.checkpoint_schedule(*args) == expected


@pytest.mark.parametrize(("args", "match"), [
    ((0, 1, 1), "final_step=0"),
    ((8, 3, 1), "log_until=3: must be a power of two"),
    ((8, 16, 1), "log_until=16: must be at most final_step=8"),
    ((8, 4, 0), "interval=0"),
    ((8.0, 4, 1), "final_step=8.0"),
])
def test_checkpoint_schedule_errors(args, match):
    with pytest.raises(ValueError, match=match):
        tiny.checkpoint_schedule(*args)


def test_training_batch_is_deterministic(corpus):
    kwargs = {"batch_size": 16, "seq_len": 128, "seed": 0}
    a = tiny.training_batch(corpus, 5, **kwargs)
    assert a.shape == (16, 128) and a.dtype == np.int64
    assert a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, tiny.training_batch(corpus, 5, **kwargs))
    assert not np.array_equal(a, tiny.training_batch(corpus, 6, **kwargs))
    assert not np.array_equal(a, tiny.training_batch(corpus, 5, **{**kwargs, "seed": 1}))


def test_training_batch_rows_are_corpus_sequences(corpus):
    batch = tiny.training_batch(corpus, 3, batch_size=8, seq_len=64, seed=0)
    sequences = corpus[: len(corpus) // 64 * 64].reshape(-1, 64).astype(np.int64)
    for row in batch:
        assert (sequences == row).all(axis=1).any()


def test_epoch_visits_every_sequence_once():
    corpus = np.arange(40, dtype=np.uint8)  # 10 sequences of 4 tokens
    kwargs = {"batch_size": 3, "seq_len": 4, "seed": 7}
    rows = np.concatenate([tiny.training_batch(corpus, u, **kwargs) for u in range(7)])
    starts = rows[:, 0] // 4
    assert sorted(starts[:10]) == list(range(10))
    assert sorted(starts[10:20]) == list(range(10))
    assert not np.array_equal(starts[:10], starts[10:20])


def test_eval_batch_is_last_training_batch(corpus):
    kwargs = {"batch_size": 4, "seq_len": 32, "seed": 3}
    np.testing.assert_array_equal(tiny.eval_batch(corpus, final_step=20, **kwargs),
                                  tiny.training_batch(corpus, 19, **kwargs))


def test_training_batch_errors(corpus):
    with pytest.raises(ValueError, match="update=-1"):
        tiny.training_batch(corpus, -1, batch_size=2, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="seq_len=0"):
        tiny.training_batch(corpus, 0, batch_size=2, seq_len=0, seed=0)
    with pytest.raises(ValueError, match="longer than the corpus"):
        tiny.training_batch(np.zeros(4, np.uint8), 0, batch_size=2, seq_len=8, seed=0)


def test_model_config():
    config = tiny.model_config({"hidden_size": 64, "num_layers": 3, "num_heads": 4}, seq_len=128)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 3, 4)
    assert config.intermediate_size == 256 and config.vocab_size == 256
    assert config.max_position_embeddings == 128
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert config.use_parallel_residual and not config.tie_word_embeddings
    assert config.hidden_dropout == config.attention_dropout == 0
    assert 0 <= config.bos_token_id < 256 and 0 <= config.eos_token_id < 256
    with pytest.raises(ValueError, match="divisible"):
        tiny.model_config({"hidden_size": 10, "num_layers": 1, "num_heads": 3}, seq_len=8)
    with pytest.raises(ValueError, match="missing keys"):
        tiny.model_config({"hidden_size": 10}, seq_len=8)


def test_learning_rate_schedule():
    lrs = [tiny.learning_rate(u, lr=1.0, warmup=4, final_step=20) for u in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == 1.0 and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))


def _train(tmp_path: Path, name: str, **kwargs) -> tuple[pd.DataFrame, Path]:
    out = tmp_path / name
    frame = tiny.train_tiny_model(SPEC, size="s", out_dir=out / "checkpoints",
                                  loss_csv=out / "loss.csv", **{**SHORT, **kwargs})
    return frame, out


def test_training_is_deterministic_and_saves_schedule(tmp_path):
    frame_a, a = _train(tmp_path, "a")
    frame_b, b = _train(tmp_path, "b")
    steps = [0, 1, 2, 4, 6, 8]
    assert sorted(p.name for p in (a / "checkpoints").iterdir()) == sorted(
        f"step{s}" for s in steps)
    for s in steps:
        assert ((a / "checkpoints" / f"step{s}" / SAFETENSORS_NAME).read_bytes()
                == (b / "checkpoints" / f"step{s}" / SAFETENSORS_NAME).read_bytes())
    assert not (a / "checkpoints" / "step0" / SAFETENSORS_NAME).read_bytes() == (
        a / "checkpoints" / "step8" / SAFETENSORS_NAME).read_bytes()
    pd.testing.assert_frame_equal(frame_a, frame_b)
    assert list(frame_a.columns) == ["size", "step", "loss"]
    assert frame_a["step"].tolist() == list(range(1, 9))
    pd.testing.assert_frame_equal(pd.read_csv(a / "loss.csv", dtype={"size": str}), frame_a)
    assert not list(a.rglob("*.tmp-*"))


def test_loss_is_the_loss_of_the_checkpoint_before_the_update(tmp_path, corpus):
    """Row step=s holds the loss of batch s-1 under checkpoint s-1."""
    frame, out = _train(tmp_path, "c")
    model = load_model(out / "checkpoints" / "step4")
    batch = torch.from_numpy(tiny.training_batch(corpus, 4, batch_size=4, seq_len=32, seed=0))
    with torch.no_grad():
        loss = model(input_ids=batch, labels=batch).loss.item()
    assert frame.loc[frame.step == 5, "loss"].item() == pytest.approx(loss, rel=1e-5)


def test_training_learns(tmp_path):
    frame, _ = _train(tmp_path, "learn", final_step=60, log_until=32, interval=64,
                      batch_size=8, seq_len=64, lr=1e-2, warmup=5)
    assert frame.loss.iloc[0] == pytest.approx(np.log(256), abs=0.1)  # uniform over bytes
    first, last = frame.loss.iloc[:10].mean(), frame.loss.iloc[-10:].mean()
    assert last < first - 1.0

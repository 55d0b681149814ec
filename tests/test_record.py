"""Your own run: a real ``transformers.Trainer`` training a tiny GPT-NeoX on CPU, recorded by
:class:`lmdynamics.record.TrainerCallback`, and its checkpoints read in place
(:mod:`lmdynamics.sources.local`, :mod:`lmdynamics.extraction.local`).

The checkpoint folders are the Trainer's own (``checkpoint-<step>`` with ``model.safetensors``
and ``trainer_state.json``, written by the installed transformers), not imitations.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, Trainer, TrainingArguments

from lmdynamics.extraction.extract import CheckpointStep
from lmdynamics.extraction.local import extract_local
from lmdynamics.record import TrainerCallback
from lmdynamics.sources import local

#: A real Trainer run with the callback and one without, about a minute on 2 busy cores.
pytestmark = pytest.mark.slow

VOCAB, SEQ, STEPS = 64, 33, 12


class Tokens(torch.utils.data.Dataset):
    """Random token sequences (labels = inputs, as for causal LM pretraining)."""

    def __init__(self):
        self.x = torch.as_tensor(np.random.default_rng(1).integers(0, VOCAB, size=(256, 32)))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def run_config(root: Path, run: str, **local_keys) -> dict:
    return {"source": "local", "suite": "own", "sizes": ["s"], "steps": "discover",
            "tokens": 64, "local": {"path": str(root / run / "checkpoint-{step}"),
                                    "settle_seconds": 0, **local_keys},
            "eval_data": {"path": str(root / "eval.npy"), "seq_len": SEQ},
            "hub": {"sequences": 4}}


def train(out: Path, *, save_steps: int, callbacks=()) -> dict[str, torch.Tensor]:
    """12 updates of a 2-layer GPT-NeoX with dropout (so a drawn random number shows)."""
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, hidden_dropout=0.1,
        attention_dropout=0.1))
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=3e-3, save_strategy="steps", save_steps=save_steps,
                             report_to=[], use_cpu=True, logging_steps=1000, disable_tqdm=True,
                             seed=0)
    Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=list(callbacks)).train()
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """``recorded``: trained with the callback (steps 0, 4, 8, 12), only the final checkpoint
    saved (and step 0's, by the callback); ``saved``: the same run without the callback,
    checkpoints every 4 steps."""
    root = tmp_path_factory.mktemp("own")
    np.save(root / "eval.npy", np.random.default_rng(0).integers(0, VOCAB, size=(8, SEQ)))
    cfg = run_config(root, "recorded", recorded=str(root / "stores/step{step}.zarr"))
    callback = TrainerCallback(cfg, size="s", every=4)
    t0 = time.perf_counter()
    with_cb = train(root / "recorded", save_steps=STEPS, callbacks=[callback])
    t_with = time.perf_counter() - t0
    t0 = time.perf_counter()
    without = train(root / "saved", save_steps=4)
    t_without = time.perf_counter() - t0
    return {"root": root, "config": cfg, "with": with_cb, "without": without,
            "recorded": callback.recorded, "times": (t_with, t_without)}


def test_the_callback_leaves_the_run_bit_identical(runs):
    assert runs["with"].keys() == runs["without"].keys()
    for name, value in runs["without"].items():
        assert torch.equal(runs["with"][name], value), name
    # the final checkpoints' bytes too
    a = local.fingerprint(runs["root"] / "recorded/checkpoint-12")["checkpoint_sha256"]
    b = local.fingerprint(runs["root"] / "saved/checkpoint-12")["checkpoint_sha256"]
    assert a == b


def test_the_run_keeps_step_0_and_the_final_checkpoint_only(runs):
    root = runs["root"]
    assert sorted(p.name for p in (root / "recorded").glob("checkpoint-*")) == \
        ["checkpoint-0", "checkpoint-12"]
    assert [p.name for p in runs["recorded"]] == [f"step{s}.zarr" for s in (0, 4, 8, 12)]
    assert local.discover_recorded(str(root / "stores/step{step}.zarr"), "s", 0) == [0, 4, 8, 12]


def test_discover_finds_the_trainers_checkpoints(runs):
    template = str(runs["root"] / "saved/checkpoint-{step}")
    assert local.discover_steps(template, "s", 0) == [4, 8, 12]
    resolved = local.resolve({**run_config(runs["root"], "saved"), "family": None})
    assert resolved == {"steps": [4, 8, 12], "final_step": 12, "family": "gpt_neox"}


def extract(root: Path, step: int, out: Path, run: str = "saved") -> Path:
    batch = root / "batch.npy"
    if not batch.exists():
        np.save(batch, np.load(root / "eval.npy")[:4])
    extract_local([CheckpointStep(root / run / f"checkpoint-{step}", step, f"step{step}", out)],
                  batch, settle_seconds=0, wait_seconds=0, tokens=64, seed=0, size="s",
                  model_name="m", stats=None)
    return out


def test_live_stores_equal_stores_extracted_from_the_saved_checkpoints(runs, tmp_path):
    """Float32 rounding: the two passes run the same float32 weights through the same code,
    one on a copy of the training model, one on the model loaded from the file; measured
    differences are 0 (bit-identical) here, the bound allows 1e-5 relative."""
    root = runs["root"]
    for step in (4, 8, 12):
        extracted = xr.open_zarr(extract(root, step, tmp_path / f"x{step}.zarr"))
        live = xr.open_zarr(root / f"stores/step{step}.zarr")
        assert extracted.attrs["eval_batch_sha256"] == live.attrs["eval_batch_sha256"]
        assert extracted.attrs["weights_sha256"] == \
            extracted.attrs["checkpoint_sha256"]
        for name in ("activations", "weight_singular_values", "grad_singular_values",
                     "grad_sub_singular_values", "loss"):
            np.testing.assert_allclose(live[name].values, extracted[name].values,
                                       rtol=1e-5, atol=1e-6, err_msg=f"{name} step {step}")
    # what needs the final checkpoint is NaN in a live store; what needs step 0 is there
    live = xr.open_zarr(root / "stores/step8.zarr")
    assert np.isnan(live["stat_direction_closeness"].values).all()
    param = live["stat_param"]
    assert np.isnan(param.sel(param_stat="cos_final").values).all()
    assert (param.sel(param_stat="dist_init").values > 0).all()


def test_a_store_records_the_checkpoint_it_was_read_from(runs, tmp_path):
    folder = runs["root"] / "saved/checkpoint-8"
    attrs = xr.open_zarr(extract(runs["root"], 8, tmp_path / "x.zarr")).attrs
    weights = folder / "model.safetensors"
    assert attrs["checkpoint_path"] == str(folder.resolve())
    assert attrs["checkpoint_bytes"] == weights.stat().st_size
    assert attrs["checkpoint_sha256"] == local.fingerprint(folder)["checkpoint_sha256"]
    assert attrs["checkpoint_mtime"].startswith(time.strftime("%Y", time.gmtime(
        weights.stat().st_mtime)))


def half_written(src: Path, dest: Path, keep: int) -> Path:
    """A copy of a Trainer checkpoint as a writer leaves it midway: the first ``keep`` bytes
    of the weights, no trainer_state.json yet."""
    dest.mkdir(parents=True)
    shutil.copy(src / "config.json", dest / "config.json")
    data = (src / "model.safetensors").read_bytes()
    (dest / "model.safetensors").write_bytes(data[:keep])
    return dest


@pytest.mark.parametrize("keep", [4, 200, -100])
def test_a_half_written_checkpoint_is_never_read(runs, tmp_path, keep):
    src = runs["root"] / "saved/checkpoint-8"
    size = (src / "model.safetensors").stat().st_size
    folder = half_written(src, tmp_path / "run/checkpoint-16", keep % size)
    ok, why = local.completeness(folder, 16, settle_seconds=0)
    assert not ok and "not whole" in why
    assert local.discover_steps(str(tmp_path / "run/checkpoint-{step}"), "s", 0) == []
    with pytest.raises(local.IncompleteCheckpointError, match="not complete"):
        extract_local([CheckpointStep(folder, 16, "step16", tmp_path / "x.zarr")],
                      runs["root"] / "eval.npy", settle_seconds=0, wait_seconds=0,
                      tokens=64, seed=0, size="s", model_name="m")
    assert not (tmp_path / "x.zarr").exists()


def test_a_whole_checkpoint_waits_for_its_trainer_state_or_the_settle_time(runs, tmp_path):
    src = runs["root"] / "saved/checkpoint-8"
    folder = tmp_path / "checkpoint-8"
    shutil.copytree(src, folder)
    (folder / local.TRAINER_STATE).unlink()
    assert not local.completeness(folder, 8, settle_seconds=3600)[0]
    assert local.completeness(folder, 8, settle_seconds=3600,
                              now=time.time() + 7200)[0]
    (folder / local.TRAINER_STATE).write_text(json.dumps({"global_step": 8}))
    assert local.completeness(folder, 8, settle_seconds=3600) == \
        (True, "trainer_state.json names the step")
    (folder / local.TRAINER_STATE).write_text(json.dumps({"global_step": 4}))
    assert not local.completeness(folder, 8, settle_seconds=3600)[0]


def test_an_unknown_architecture_is_refused_in_one_line(runs, tmp_path):
    folder = tmp_path / "run/checkpoint-1"
    shutil.copytree(runs["root"] / "saved/checkpoint-4", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "mamba"}))
    config = {**run_config(tmp_path, "run"), "steps": [1, 2], "final_step": 2}
    with pytest.raises(local.LocalRunError, match="config.json.*family") as info:
        local.resolve(config)
    assert "\n" not in str(info.value)

"""Tests of lmdynamics.sources.checkpoints: save/load roundtrip and refusal of unsafe or
broken files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GPTNeoXForCausalLM

from lmdynamics.sources import checkpoints as ck
from lmdynamics.sources.tiny import model_config

SPEC = {"hidden_size": 16, "num_layers": 1, "num_heads": 2}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(model_config(SPEC, seq_len=16)).eval()


@pytest.fixture
def saved(tmp_path: Path) -> tuple[torch.nn.Module, Path]:
    model = _model()
    return model, ck.save_checkpoint(model, tmp_path / "step0")


def _edit_config(directory: Path, **changes) -> Path:
    path = directory / ck.CONFIG_NAME
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


def test_save_writes_hf_directory_atomically(saved):
    _, directory = saved
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    assert not list(directory.parent.glob("*.tmp-*"))
    data = json.loads((directory / "config.json").read_text())
    assert data["architectures"] == ["GPTNeoXForCausalLM"]
    assert data["model_type"] == "gpt_neox"


def test_save_replaces_existing_directory(tmp_path):
    target = tmp_path / "step1"
    ck.save_checkpoint(_model(0), target)
    (target / "stale.txt").write_text("x")
    ck.save_checkpoint(_model(1), target)
    assert not (target / "stale.txt").exists()


def test_roundtrip_gives_identical_logits(saved):
    model, directory = saved
    assert ck.load_model(directory).config._attn_implementation == "sdpa"  # the default
    loaded = ck.load_model(directory, attention="eager")  # as the saved model: same kernels
    assert not loaded.training
    assert loaded.config._attn_implementation == "eager"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                  strict=True):
        assert k1 == k2 and torch.equal(v1, v2)


def test_load_casts_dtype(saved):
    _, directory = saved
    model = ck.load_model(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.gpt_neox.rotary_emb.inv_freq.dtype == torch.float32
    ids = torch.zeros(1, 4, dtype=torch.long)
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.bfloat16


@pytest.mark.parametrize("change", [{"auto_map": {"AutoModel": "evil.Model"}},
                                    {"trust_remote_code": True}])
def test_refuses_remote_code(saved, change):
    _, directory = saved
    path = _edit_config(directory, **change)
    with pytest.raises(ck.UntrustedCheckpointError, match=str(path)) as info:
        ck.load_model(directory)
    assert next(iter(change)) in str(info.value)


def test_unknown_architecture_lists_known_ones(saved):
    _, directory = saved
    _edit_config(directory, architectures=["MambaForCausalLM"])
    with pytest.raises(ck.UnknownArchitectureError, match="MambaForCausalLM") as info:
        ck.read_model_config(directory)
    assert "GPTNeoXForCausalLM" in str(info.value) and "config.json" in str(info.value)


def test_unknown_model_type(saved):
    _, directory = saved
    _edit_config(directory, model_type="mamba")
    with pytest.raises(ck.UnknownArchitectureError, match="mamba"):
        ck.read_model_config(directory)


def test_reads_pythia_style_config(tmp_path):
    """A config as Pythia's hub revisions have it (transformers 4.x keys rotary_pct etc.)."""
    data = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0,
            "hidden_act": "gelu", "hidden_size": 512, "initializer_range": 0.02,
            "intermediate_size": 2048, "layer_norm_eps": 1e-05,
            "max_position_embeddings": 2048, "model_type": "gpt_neox",
            "num_attention_heads": 8, "num_hidden_layers": 6, "rotary_emb_base": 10000,
            "rotary_pct": 0.25, "tie_word_embeddings": False, "torch_dtype": "float16",
            "transformers_version": "4.24.0", "use_cache": True,
            "use_parallel_residual": True, "vocab_size": 50304}
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = ck.read_model_config(tmp_path)
    assert config.rope_parameters["partial_rotary_factor"] == 0.25
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (512, 6, 50304)
    assert config.tie_word_embeddings is False and config.use_parallel_residual is True


def test_truncated_safetensors_is_corrupt(saved):
    _, directory = saved
    path = directory / ck.SAFETENSORS_NAME
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ck.CorruptCheckpointError, match=str(path)):
        ck.load_model(directory)


def test_garbage_header_is_corrupt(saved):
    _, directory = saved
    path = directory / ck.SAFETENSORS_NAME
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ck.CorruptCheckpointError, match=str(path)):
        ck.load_model(directory)


def test_missing_weights(saved):
    _, directory = saved
    (directory / ck.SAFETENSORS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors, pytorch_model.bin"):
        ck.load_model(directory)


def test_missing_and_unexpected_keys_are_named(saved):
    model, directory = saved
    state = dict(model.state_dict())
    del state["lm_head.weight"]
    state["extra.weight"] = torch.zeros(2)
    ck.safetensors.torch.save_file(state, directory / ck.SAFETENSORS_NAME)
    with pytest.raises(ck.CheckpointMismatchError, match="lm_head.weight") as info:
        ck.load_model(directory)
    assert "extra.weight" in str(info.value) and "model.safetensors" in str(info.value)


def test_shape_mismatch(saved):
    model, directory = saved
    state = dict(model.state_dict())
    state["lm_head.weight"] = torch.zeros(3, 3)
    ck.safetensors.torch.save_file(state, directory / ck.SAFETENSORS_NAME)
    with pytest.raises(ck.CheckpointMismatchError, match="lm_head.weight"):
        ck.load_model(directory)


def test_pickle_fallback_and_legacy_buffers(saved):
    """pytorch_model.bin (fp16, with the buffers old transformers persisted) loads."""
    model, directory = saved
    (directory / ck.SAFETENSORS_NAME).unlink()
    state = {k: v.half() for k, v in model.state_dict().items()}
    state["gpt_neox.layers.0.attention.bias"] = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    state["gpt_neox.layers.0.attention.masked_bias"] = torch.tensor(-1e9)
    state["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = torch.ones(1)
    torch.save(state, directory / ck.PICKLE_NAME)
    loaded = ck.load_model(directory)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.half().float())


class _Payload:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickle_with_non_tensor_object_is_refused(saved, capsys):
    model, directory = saved
    (directory / ck.SAFETENSORS_NAME).unlink()
    state = dict(model.state_dict())
    state["evil"] = _Payload()
    torch.save(state, directory / ck.PICKLE_NAME)
    with pytest.raises(ck.UntrustedCheckpointError, match="pytorch_model.bin"):
        ck.load_model(directory)
    assert "pwned" not in capsys.readouterr().out


def test_truncated_pickle_is_corrupt(saved):
    model, directory = saved
    (directory / ck.SAFETENSORS_NAME).unlink()
    path = directory / ck.PICKLE_NAME
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ck.CorruptCheckpointError, match=str(path)):
        ck.load_model(directory)


def test_n_parameters():
    model = _model()
    d, v, f = 16, 256, 64
    layer = 4 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d)
    assert ck.n_parameters(model) == v * d + layer + 2 * d + d * v


def test_weights_sha256(saved):
    _, directory = saved
    expected = hashlib.sha256((directory / ck.SAFETENSORS_NAME).read_bytes()).hexdigest()
    assert ck.weights_sha256(directory) == expected


def test_config_json_must_be_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2")
    with pytest.raises(ck.CorruptCheckpointError, match="config.json"):
        ck.read_model_config(tmp_path)


# --- Pythia revisions as the hub serves them (tests/pythia_files.py) -----------------------

@pytest.mark.parametrize("layout", ["bin", "safetensors", "sharded"])
def test_legacy_revisions_load_bit_identical_to_from_pretrained(tmp_path, layout):
    """transformers 4.x names (``embed_out``), float16 storage and the persisted buffers load
    exactly as transformers' own ``from_pretrained`` loads them; shards through the
    download's conversion to one ``model.safetensors``."""
    from transformers import GPTNeoXForCausalLM

    from lmdynamics.sources.hub import convert_to_safetensors, shard_map
    from support.pythia_files import revision_files

    source = tmp_path / "hub"
    source.mkdir()
    for name, data in revision_files("160m", seed=3, vocab=512, layout=layout).items():
        (source / name).write_bytes(data)
    directory = source
    if layout == "sharded":
        directory = tmp_path / "converted"
        directory.mkdir()
        shutil.copy(source / "config.json", directory / "config.json")
        shards = sorted(p.name for p in source.glob("pytorch_model-*.bin"))
        convert_to_safetensors([source / s for s in shards], directory / ck.SAFETENSORS_NAME,
                               shard_map(source / "pytorch_model.bin.index.json", shards))
    ours = ck.load_model(directory).state_dict()
    theirs = GPTNeoXForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    assert set(ours) == set(theirs) and "lm_head.weight" in ours
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def _pythia_dir(tmp_path, **config_changes):
    from support.pythia_files import revision_files

    files = revision_files("70m", seed=1, vocab=512, layout="safetensors")
    config = {**json.loads(files["config.json"]), **config_changes}
    files["config.json"] = json.dumps(config).encode()
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    return tmp_path


@pytest.mark.parametrize("change, message", [
    ({"vocab_size": 10**12}, "'vocab_size' is 1000000000000; expected an integer"),
    ({"vocab_size": 100_000}, "implies .* parameters, the weights file holds"),
    ({"hidden_size": "16"}, "'hidden_size' is '16'"),
    ({"num_hidden_layers": 2.0}, "'num_hidden_layers' is 2.0"),
    ({"num_attention_heads": 3}, "not a multiple of 'num_attention_heads'"),
    ({"hidden_act": "rm -rf"}, "'hidden_act' is 'rm -rf'"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' is True"),
])
def test_hostile_config_values_are_refused_before_allocating(tmp_path, change, message):
    directory = _pythia_dir(tmp_path, **change)
    with pytest.raises((ck.CorruptCheckpointError, ck.CheckpointMismatchError),
                       match=message) as info:
        ck.load_model(directory)
    assert "config.json" in str(info.value) or "model.safetensors" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_non_float_weights_are_refused(tmp_path, dtype):
    directory = _pythia_dir(tmp_path)
    state = ck.read_state_dict(directory / ck.SAFETENSORS_NAME)
    state["gpt_neox.layers.0.attention.dense.weight"] = state[
        "gpt_neox.layers.0.attention.dense.weight"].to(dtype)
    ck.safetensors.torch.save_file(state, directory / ck.SAFETENSORS_NAME)
    with pytest.raises(ck.CheckpointMismatchError,
                       match=r"floating point; gpt_neox.layers.0.attention.dense.weight"):
        ck.load_model(directory)


def test_a_legacy_key_still_unknown_after_renaming_is_named(tmp_path):
    """Only transformers' own renaming and ignore lists apply: any other key fails."""
    directory = _pythia_dir(tmp_path)
    state = ck.read_state_dict(directory / ck.SAFETENSORS_NAME)
    state["gpt_neox.layers.0.attention.rotary.inv_freq_old"] = torch.ones(2)
    state["embed_out.bias"] = torch.zeros(512)
    ck.safetensors.torch.save_file(state, directory / ck.SAFETENSORS_NAME)
    with pytest.raises(ck.CheckpointMismatchError, match="unexpected keys .*lm_head.bias"):
        ck.load_model(directory)

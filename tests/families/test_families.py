"""Model families against checkpoints written from documented key names (tests/family_files.py).

Each family's checkpoint loads through :func:`lmdynamics.sources.checkpoints.load_model` with
the values of the file; the hooks of the extraction pass capture the outputs of the family's
write modules, which equal a hand computation from the file's tensors (GPT-2's ``Conv1D``:
``x @ W + b`` with W stored (in, out); OLMo 2: RMSNorm of ``o_proj``'s output); the write
matrices' singular values and the Conjecture directions are those of the (out, in) matrix.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml

from lmdynamics import families
from lmdynamics.extraction import passes as ps
from lmdynamics.extraction.names import param_key, param_sort_key
from lmdynamics.extraction.stats import (
    circuit_directions,
    direction_closeness,
    top_left_singular_vectors,
)
from lmdynamics.families.gpt2 import GPT2
from lmdynamics.options import schema_path
from lmdynamics.sources import checkpoints as ck
from support.family_files import BUILDERS, FAMILY, HIDDEN, LAYERS, write_checkpoint

KINDS = sorted(BUILDERS)


@pytest.fixture(params=KINDS)
def checkpoint(request, tmp_path):
    kind = request.param
    state = write_checkpoint(tmp_path / kind, kind)
    return kind, tmp_path / kind, state


def _file_name(kind: str, name: str) -> str:
    """The file's key for a state-dict name (GPT-2's file lacks ``transformer.``)."""
    return name.removeprefix("transformer.") if kind == "gpt2" else name


def test_each_family_loads_its_published_key_names(checkpoint):
    kind, directory, state = checkpoint
    model = ck.load_model(directory, family=FAMILY[kind])
    family = families.for_model(model)
    assert family.name == FAMILY[kind]
    for name, tensor in model.state_dict().items():
        key = _file_name(kind, name)
        if key not in state:  # a tied unembedding (OLMo 1, GPT-2): the input embedding's
            assert name == "lm_head.weight", name
            key = _file_name(kind, f"{family.base}.{family.input_embeddings[0]}.weight")
        torch.testing.assert_close(tensor, state[key], rtol=0, atol=0, msg=name)


def test_the_configured_family_must_match_the_checkpoint(checkpoint):
    kind, directory, _ = checkpoint
    with pytest.raises(ck.UnknownArchitectureError, match="config key 'family' is 'gpt_neox'"
                       ) as info:
        ck.read_model_config(directory, family="gpt_neox")
    assert "\n" not in str(info.value) and str(directory) in str(info.value)


def _inputs_of(modules):
    """Forward pre-hooks recording each module's input."""
    seen = [[] for _ in modules]
    handles = [m.register_forward_pre_hook(
        lambda _m, args, i=i: seen[i].append(args[0].detach().clone()))
        for i, m in enumerate(modules)]
    return seen, handles


def _rms_norm(x, weight, eps):
    x64 = x.double()
    return weight.double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)


def test_hooks_capture_the_write_modules_outputs(checkpoint):
    """Activations of the pass = the write module applied by hand to its input, with the
    file's weight in its stored orientation (Conv1D: x W + b; Linear: x W^T + b)."""
    kind, directory, state = checkpoint
    model = ck.load_model(directory)
    family = families.for_model(model)
    batch = torch.from_numpy(np.random.default_rng(0).integers(0, 64, (2, 8)))
    seq, pos = np.repeat(np.arange(2), 8), np.tile(np.arange(8), 2)
    mods = family.write_modules(model)
    seen, handles = _inputs_of([*mods["attention"], *mods["mlp"]])
    try:
        result = ps.run_pass(model, batch, seq, pos)
    finally:
        for h in handles:
            h.remove()
    for c, comp in enumerate(("attention", "mlp")):
        module = family.attention_write if comp == "attention" else family.mlp_write
        for layer in range(LAYERS):
            x = seen[c * LAYERS + layer][0][seq, pos].double()
            name = _file_name(kind, family.param_name(layer, module))
            w = state[name].double()
            out = x @ w if kind == "gpt2" else x @ w.T
            bias = state.get(name.removesuffix("weight") + "bias")
            if bias is not None:
                out = out + bias.double()
            if kind == "olmo2":  # the block adds the normalised sublayer output
                site = ("post_attention_layernorm" if comp == "attention"
                        else "post_feedforward_layernorm")
                norm = state[family.param_name(layer, site)]
                out = _rms_norm(out, norm, json.loads(
                    (directory / "config.json").read_text())["rms_norm_eps"])
            np.testing.assert_allclose(result.activations[c, layer], out.numpy(),
                                       rtol=1e-4, atol=1e-5, err_msg=f"{comp} {layer}")
            # singular values of the (out, in) write matrix, whatever the storage
            np.testing.assert_allclose(result.weight_singular_values[c, layer],
                                       torch.linalg.svdvals(w).numpy(), rtol=1e-5)
            assert result.weight_singular_values.shape[2] == min(w.shape)


def _gpt2_with_linear_writes(model):
    """The same GPT-2 with each write ``Conv1D`` replaced by the equivalent ``nn.Linear``
    (weight transposed to (out, in)): the same function, the standard orientation."""
    for block in model.transformer.h:
        for parent, attr in ((block.attn, "c_proj"), (block.mlp, "c_proj")):
            conv = getattr(parent, attr)
            n_in, n_out = conv.weight.shape
            linear = torch.nn.Linear(n_in, n_out)
            with torch.no_grad():
                linear.weight.copy_(conv.weight.T)
                linear.bias.copy_(conv.bias)
            setattr(parent, attr, linear)
    return model


def test_per_and_conjecture_directions_ignore_the_conv1d_transpose(tmp_path, monkeypatch):
    """PER (singular values of weights and gradients), CKA's activations and the Conjecture
    directions agree between GPT-2's Conv1D writes and equivalent nn.Linear writes."""
    write_checkpoint(tmp_path / "gpt2", "gpt2")
    conv = ck.load_model(tmp_path / "gpt2")
    linear = _gpt2_with_linear_writes(ck.load_model(tmp_path / "gpt2"))
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 64, (2, 8)))
    seq, pos = np.repeat(np.arange(2), 8), np.tile(np.arange(8), 2)
    ref = ps.run_pass(conv, batch, seq, pos)
    as_linear = dataclasses.replace(families.get("gpt2"), transposed_writes=False)
    monkeypatch.setitem(families.registry(), "gpt2", as_linear)
    got = ps.run_pass(linear, batch, seq, pos)
    np.testing.assert_allclose(got.activations, ref.activations, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.weight_singular_values, ref.weight_singular_values,
                               rtol=1e-5)
    np.testing.assert_allclose(got.grad_singular_values, ref.grad_singular_values,
                               rtol=1e-4, atol=1e-9)
    conv_params = {n: p.detach() for n, p in conv.named_parameters()}
    lin_params = {n: p.detach() for n, p in linear.named_parameters()}
    for layer in range(LAYERS):
        a = circuit_directions(conv_params.__getitem__, layer, 4, 3, GPT2)
        b = circuit_directions(lin_params.__getitem__, layer, 4, 3, as_linear)
        for circuit in ("mlp", "ov"):
            for u, v in zip(a[circuit], b[circuit], strict=True):
                assert u.shape == (HIDDEN, 3)  # residual-stream directions
                assert direction_closeness(u, v) == pytest.approx(1.0, abs=1e-9)
        # and they are the left singular vectors of the (out, in) matrix
        w = lin_params[f"transformer.h.{layer}.mlp.c_proj.weight"]
        assert direction_closeness(a["mlp"][0], top_left_singular_vectors(w, 3)) == \
            pytest.approx(1.0, abs=1e-9)


def test_the_registry_not_the_schema_lists_the_families():
    """A new family needs no schema edit: the config check asks the registry."""
    from lmdynamics.config import family_errors, resolved_family

    schema = yaml.safe_load(schema_path().read_text())
    assert "enum" not in schema["properties"]["family"]
    assert "default" not in schema["properties"]["family"]  # unset: the suite's, or tiny's
    assert resolved_family({"source": "tiny"}) == families.DEFAULT
    assert resolved_family({"source": "hub", "suite": "olmo-1b"}) == "llama"
    assert resolved_family({"source": "hub", "suite": "olmo-1b", "family": "gpt2"}) == "gpt2"
    assert {"gpt_neox", "llama", "gpt2"} <= set(families.names())
    for name in families.names():
        assert family_errors({"family": name}) == []
    (error,) = family_errors({"family": "mamba"})
    assert "config key 'family'" in error and "'mamba'" in error
    assert all(name in error for name in families.names())
    (error,) = family_errors({"source": "hub", "suite": "olmo-1b", "family": "gpt2"})
    assert "suite 'olmo-1b' is of family 'llama'" in error


def test_unknown_family_and_model_type_are_one_line():
    with pytest.raises(families.UnknownFamilyError, match="family='mamba'.*gpt2, gpt_neox"):
        families.get("mamba")
    with pytest.raises(families.UnknownFamilyError) as info:
        families.for_config({"model_type": "mamba", "architectures": ["MambaForCausalLM"]},
                            where="x/config.json")
    message = str(info.value)
    assert "\n" not in message and "'mamba'" in message and "x/config.json" in message
    assert all(name in message for name in families.names())


def test_for_config_picks_by_model_type_and_architectures():
    for kind in KINDS:
        config, _ = BUILDERS[kind]()
        assert families.for_config(config).name == FAMILY[kind]
    with pytest.raises(families.UnknownFamilyError, match="GPT2LMHeadModel"):
        families.for_config({"model_type": "llama", "architectures": ["GPT2LMHeadModel"]})


def test_a_new_family_module_is_picked_up(tmp_path, monkeypatch):
    """Adding a family is one module in the package: discovered without any other edit."""
    (tmp_path / "toy_family.py").write_text(
        "from lmdynamics.families import Family\n"
        "from lmdynamics.families.gpt_neox import GPT_NEOX\n"
        "import dataclasses\n"
        "TOY = dataclasses.replace(GPT_NEOX, name='toy', model_types=('toy',),\n"
        "                          architectures=('ToyForCausalLM',))\n")
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    families.registry.cache_clear()
    try:
        assert "toy" in families.names()
        assert families.get("toy").model_types == ("toy",)
        assert families.for_config({"model_type": "toy",
                                    "architectures": ["ToyForCausalLM"]}).name == "toy"
    finally:
        monkeypatch.undo()
        families.registry.cache_clear()
        import sys

        sys.modules.pop("lmdynamics.families.toy_family", None)
    assert "toy" not in families.names()


@pytest.mark.parametrize("kind", KINDS)
def test_parameter_count_from_config_matches_the_model(kind):
    config, _ = BUILDERS[kind]()
    family = families.for_config(config)
    built = family.config_from_dict(config)
    with torch.device("meta"):
        model = family.model_cls(config["model_type"])(built)
    assert family.parameters(config) == ck.n_parameters(model)


@pytest.mark.parametrize("name", ["gpt_neox", "llama", "gpt2"])
def test_tiny_configs_count_and_build(name):
    family = families.get(name)
    spec = {"hidden_size": 32, "num_layers": 2, "num_heads": 4}
    config = family.build_tiny_config(spec, seq_len=16, vocab_size=256)
    model = family.model_cls()(config)
    assert family.parameters(family.tiny_config(hidden_size=32, num_layers=2, num_heads=4,
                                                seq_len=16, vocab_size=256)) \
        == ck.n_parameters(model)
    dims = family.dims(config.to_dict())
    assert (dims["hidden_size"], dims["num_hidden_layers"], dims["num_attention_heads"],
            dims["intermediate_size"], dims["vocab_size"]) == (32, 2, 4, 128, 256)


def test_store_names_keep_gpt_neox_and_follow_each_family():
    assert param_key("gpt_neox.layers.3.mlp.dense_4h_to_h.weight") == \
        "layer3.mlp.dense_4h_to_h.weight"
    assert param_key("lm_head.weight") == "embed_out.weight"
    assert param_key("model.layers.1.self_attn.o_proj.weight", "llama") == \
        "layer1.self_attn.o_proj.weight"
    assert param_key("model.norm.weight", "llama") == "norm.weight"
    assert param_key("lm_head.weight", "llama") == "lm_head.weight"
    assert param_key("transformer.h.0.attn.c_proj.bias", "gpt2") == "layer0.attn.c_proj.bias"
    assert param_key("transformer.wpe.weight", "gpt2") == "wpe.weight"
    names = ["lm_head.weight", "norm.weight", "layer0.mlp.down_proj.weight",
             "layer0.post_attention_layernorm.weight", "layer0.self_attn.o_proj.weight",
             "layer0.input_layernorm.weight", "embed_tokens.weight"]
    assert sorted(names, key=lambda k: param_sort_key(k, "llama")) == [
        "embed_tokens.weight", "layer0.input_layernorm.weight",
        "layer0.self_attn.o_proj.weight", "layer0.post_attention_layernorm.weight",
        "layer0.mlp.down_proj.weight", "norm.weight", "lm_head.weight"]
    gpt2 = ["lm_head.weight", "ln_f.bias", "layer0.ln_1.weight", "wpe.weight", "wte.weight",
            "layer0.attn.c_proj.weight", "layer0.attn.c_attn.bias", "ln_f.weight"]
    assert sorted(gpt2, key=lambda k: param_sort_key(k, "gpt2")) == [
        "wte.weight", "wpe.weight", "layer0.ln_1.weight", "layer0.attn.c_attn.bias",
        "layer0.attn.c_proj.weight", "ln_f.weight", "ln_f.bias", "lm_head.weight"]


def test_paper_code_attention_is_gpt_neox_only(tmp_path):
    from lmdynamics.config import family_errors

    errors = family_errors({"family": "llama",
                            "extraction": {"attention_activation": "paper_code"}})
    assert len(errors) == 1 and "extraction.attention_activation" in errors[0]
    assert "'llama'" in errors[0] and "\n" not in errors[0]
    assert family_errors({"family": "gpt_neox",
                          "extraction": {"attention_activation": "paper_code"}}) == []
    write_checkpoint(tmp_path / "llama", "llama")
    model = ck.load_model(tmp_path / "llama")
    with pytest.raises(ValueError, match="extraction.attention_activation.*'llama'"):
        ps.hook_targets(model, "paper_code")


@pytest.mark.parametrize("kind", ["gpt2", "olmo"])
def test_extraction_with_statistics_on_published_files(tmp_path, kind):
    """The extraction job on a released-style checkpoint (GPT-2's keys lack ``transformer.``;
    both tie the unembedding): the store records the family, its own parameter names, and
    statistics against the reference store built from the same files (distance 0)."""
    import xarray as xr

    from lmdynamics.extraction.conjecture import StatsOptions
    from lmdynamics.extraction.extract import ExtractionOptions, extract_checkpoint
    from lmdynamics.extraction.reference import build_reference

    directory = tmp_path / kind
    write_checkpoint(directory, kind)
    batch = tmp_path / "batch.npy"
    np.save(batch, np.random.default_rng(0).integers(0, 64, (2, 8)))
    reference = build_reference(directory, directory, tmp_path / "reference.zarr", size="s",
                                top_k=2, model_name=kind)
    out = extract_checkpoint(directory, batch, tmp_path / "out.zarr", tokens=8, seed=0,
                             size="s", step=0, model_name=kind, revision="main",
                             options=ExtractionOptions(device="cpu"), family=FAMILY[kind],
                             stats=StatsOptions(reference, top_k=2))
    ds = xr.open_zarr(out, consolidated=False)
    family = families.get(FAMILY[kind])
    assert ds.attrs["family"] == family.name
    params = [str(p) for p in ds.param.values]
    assert f"layer1.{family.mlp_write}.weight" in params
    assert "lm_head.weight" not in params  # tied: counted once, as the token embedding
    dist = ds.stat_param.sel(param_stat="dist_init").values
    np.testing.assert_array_equal(dist, 0.0)
    np.testing.assert_allclose(ds.stat_direction_closeness.values, 1.0, atol=1e-9)


#: Documented shapes (a suite definition's keys): OLMo-1B (allenai/OLMo-1B-hf), Pythia-70m
#: (its README), GPT-2 small (openai-community/gpt2: 1024 positions, MLP 3072, tied).
SHAPES = [
    ("llama", {"layers": 16, "hidden": 2048, "heads": 16, "vocab": 50304,
               "intermediate": 8192, "tied_embeddings": True, "model_type": "olmo"}),
    ("llama", {"layers": 2, "hidden": 64, "heads": 4, "vocab": 128, "intermediate": 96,
               "tied_embeddings": False, "model_type": "olmo2"}),
    ("gpt_neox", {"layers": 6, "hidden": 512, "heads": 8, "vocab": 50304,
                  "intermediate": 2048, "tied_embeddings": False}),
    ("gpt2", {"layers": 12, "hidden": 768, "heads": 12, "vocab": 50257, "intermediate": 3072,
              "tied_embeddings": True, "context": 1024}),
]


@pytest.mark.parametrize(("name", "shape"), SHAPES, ids=[f"{n}-{s['layers']}x{s['hidden']}"
                                                          for n, s in SHAPES])
def test_shape_config_counts_what_transformers_builds(name, shape):
    family = families.get(name)
    config = family.shape_config(shape)
    with torch.device("meta"):
        model = family.model_cls(config["model_type"])(family.config_from_dict(config))
    assert family.parameters(config) == ck.n_parameters(model)
    missing = {**shape, "intermediate": None}
    assert family.shape_config(missing) is None


def test_mistral_gpt2_files_with_persistent_buffers_load(tmp_path):
    """Stanford CRFM's Mistral runs (transformers 4.5, ``pytorch_model.bin``) persist
    ``h.<i>.attn.bias`` and ``h.<i>.attn.masked_bias``; today's transformers ignores only the
    first, so the family drops both, by name, and loads the values of the file. An unknown
    extra key still fails naming it."""
    from support.family_files import SMALL, gpt2_config, gpt2_state

    state = gpt2_state(SMALL, 0, layout="mistral")
    assert any(k.endswith("attn.masked_bias") for k in state)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config(SMALL, "mistral")))
    torch.save(state, tmp_path / "pytorch_model.bin")
    model = ck.load_model(tmp_path, family="gpt2")
    loaded = model.state_dict()
    for name, tensor in state.items():
        if GPT2.is_legacy_buffer(name):
            continue
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    torch.save({**state, "transformer.h.0.attn.unknown_buf": torch.tensor(1.0)},
               tmp_path / "pytorch_model.bin")
    with pytest.raises(ck.CheckpointMismatchError,
                       match=r"unexpected keys transformer\.h\.0\.attn\.unknown_buf"):
        ck.load_model(tmp_path, family="gpt2")


def test_legacy_buffers_are_matched_by_name_only():
    assert GPT2.is_legacy_buffer("transformer.h.11.attn.masked_bias")
    assert GPT2.is_legacy_buffer("h.0.attn.bias")  # the released files lack the prefix
    assert not GPT2.is_legacy_buffer("transformer.h.0.attn.c_attn.bias")
    assert not GPT2.is_legacy_buffer("transformer.h.0.attn.masked_bias_extra")
    neox = families.get("gpt_neox")
    assert neox.is_legacy_buffer("gpt_neox.layers.3.attention.rotary_emb.inv_freq")
    assert not neox.is_legacy_buffer("gpt_neox.layers.3.attention.dense.bias")

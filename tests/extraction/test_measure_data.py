"""What the extraction computes for the measures (lmdynamics.extraction.measure_data) against
float64 references computed here from the checkpoint files' own tensors.

- element statistics on the device (torch) equal :func:`lmdynamics.estimators.sparsity.
  element_stats` (numpy, float64) to 1e-12 relative, for float32, bfloat16 and float64 input;
- an OV circuit's singular values from its factors equal LAPACK's SVD of the d x d product
  ``W_O^h W_V^h`` formed in float64 (1e-12 relative to the largest), the head slices taken
  from the architectures' documented layouts (tests/measure_reference.py, not the families'
  ``ov_weights``), grouped-query attention included;
- the activations' singular values and element statistics are those of the activations
  stored beside them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import safetensors.torch
import torch

from lmdynamics.estimators.sparsity import ELEMENT_STATS, element_stats
from lmdynamics.extraction import passes
from lmdynamics.extraction.measure_data import element_statistics, measure_data
from lmdynamics.extraction.spectra import factored_singular_values
from lmdynamics.sources.checkpoints import load_model
from support.family_files import FAMILY, write_checkpoint
from support.measure_reference import ov_heads
from support.pythia_files import legacy_state_dict, pythia_config

REL = 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_element_statistics_on_the_device_equal_the_numpy_reference(dtype):
    x = torch.from_numpy(np.random.default_rng(0).laplace(size=(40, 70))).to(dtype)
    got = element_statistics(x)
    expected = element_stats(x.to(torch.float64).numpy())
    np.testing.assert_allclose(got, [expected[k] for k in ELEMENT_STATS], rtol=REL, atol=0)


def test_element_statistics_of_missing_and_non_finite_tensors():
    assert np.isnan(element_statistics(None)).all()
    bad = torch.ones(3, 4)
    bad[0, 0] = torch.inf
    got = element_statistics(bad)
    assert got[0] == 12 and np.isnan(got[1:]).all()


def test_factored_singular_values_equal_the_products():
    rng = np.random.default_rng(1)
    left, right = rng.normal(size=(5, 40, 8)), rng.normal(size=(5, 8, 30)) * 1e-3
    expected = np.linalg.svd(left @ right, compute_uv=False)[:, :8]
    got = factored_singular_values(torch.from_numpy(left), torch.from_numpy(right))
    np.testing.assert_allclose(got, expected, rtol=0, atol=REL * expected.max())
    left[2, 0, 0] = np.nan
    got = factored_singular_values(torch.from_numpy(left), torch.from_numpy(right))
    assert np.isnan(got[2]).all() and np.isfinite(np.delete(got, 2, axis=0)).all()
    with pytest.raises(ValueError, match="k <= m, n"):
        factored_singular_values(torch.zeros(4, 8), torch.zeros(8, 30))


def _pythia(directory):
    hidden, layers, heads = 16, 2, 4
    state = legacy_state_dict(hidden, layers, heads, 64, seed=3)
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(pythia_config(hidden, layers, heads, 64)))
    safetensors.torch.save_file(state, directory / "model.safetensors",
                                metadata={"format": "pt"})
    return state


@pytest.mark.parametrize("kind", ["gpt_neox", "llama", "gpt2"])
def test_ov_spectra_weights_and_activations_match_float64_references(kind, tmp_path):
    directory = tmp_path / kind
    if kind == "gpt_neox":
        state = _pythia(directory)
        model = load_model(directory)
    else:
        state = write_checkpoint(directory, kind)
        model = load_model(directory, family=FAMILY[kind])
    heads = model.config.num_attention_heads
    if kind == "llama":
        assert model.config.num_key_value_heads < heads  # grouped-query attention
    batch = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    seq, pos = np.repeat(np.arange(2), 12), np.tile(np.arange(12), 2)
    result = passes.run_pass(model, batch, seq, pos)
    ds = measure_data(model, result.activations)
    assert ds["ov_singular_values"].dims == ("layer", "head", "ov_k")
    for layer in range(model.config.num_hidden_layers):
        for h, ov in enumerate(ov_heads(kind, state, layer, heads)):
            hd = ds.sizes["ov_k"]
            expected = np.linalg.svd(ov, compute_uv=False)[:hd]
            got = ds["ov_singular_values"].values[layer, h]
            np.testing.assert_allclose(got, expected, rtol=0, atol=REL * expected[0])
    for ci in range(2):
        for layer in range(model.config.num_hidden_layers):
            acts = result.activations[ci, layer].astype(np.float64)
            np.testing.assert_allclose(ds["activation_singular_values"].values[ci, layer],
                                       np.linalg.svd(acts, compute_uv=False),
                                       rtol=1e-9, atol=1e-12)
            ref = element_stats(acts)
            np.testing.assert_allclose(ds["activation_element_stats"].values[ci, layer],
                                       [ref[k] for k in ELEMENT_STATS], rtol=REL)
            module = passes.write_modules(model)[passes.COMPONENTS[ci]][layer]
            ref = element_stats(module.weight.detach().double().numpy())
            np.testing.assert_allclose(ds["weight_element_stats"].values[ci, layer],
                                       [ref[k] for k in ELEMENT_STATS], rtol=REL)
            ref = element_stats(module.weight.grad.double().numpy())
            np.testing.assert_allclose(ds["grad_element_stats"].values[ci, layer],
                                       [ref[k] for k in ELEMENT_STATS], rtol=REL)

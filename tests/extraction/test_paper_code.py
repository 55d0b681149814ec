"""The paper code's attention activation and gradient protocol, checked by hand on small models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from transformers import GPTNeoXForCausalLM

from lmdynamics.extraction.extract import (
    ExtractionOptions,
    extract_checkpoint,
    sample_token_positions,
)
from lmdynamics.extraction.paper_code import (
    gradient_steps,
    paper_code_gradient_singular_values,
    paper_code_sub_batches,
    tiny_gradient_batches,
)
from lmdynamics.extraction.passes import run_pass
from lmdynamics.sources.checkpoints import save_checkpoint
from lmdynamics.sources.tiny import load_corpus, model_config, training_batch

HIDDEN, HEADS, LAYERS, SEQ = 24, 3, 2, 16
HEAD_DIM = HIDDEN // HEADS


def small_model(seed: int = 0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = model_config({"hidden_size": HIDDEN, "num_layers": LAYERS, "num_heads": HEADS},
                          seq_len=SEQ)
    model = GPTNeoXForCausalLM(config).eval()
    with torch.no_grad():  # non-zero biases, so a dropped bias would show
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.bias.normal_()
            layer.attention.dense.bias.normal_()
    return model


def batch_of(seed: int, n: int = 3) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, size=(n, SEQ)))


def test_paper_code_attention_is_wo_of_the_last_heads_qkv_by_hand():
    model = small_model()
    batch = batch_of(1)
    seq, pos = sample_token_positions(*batch.shape, 20, seed=0)
    paper = run_pass(model, batch, seq, pos, attention_activation="paper_code", gradients=False)
    text = run_pass(model, batch, seq, pos)
    torch.set_grad_enabled(False)
    try:
        check_layers(model, batch, seq, pos, paper, text)
    finally:
        torch.set_grad_enabled(True)
    np.testing.assert_array_equal(paper.activations[1], text.activations[1])  # MLP unchanged
    assert np.isnan(paper.grad_singular_values).all() and paper.loss == pytest.approx(text.loss)


def check_layers(model, batch, seq, pos, paper, text) -> None:
    hidden = model(input_ids=batch, output_hidden_states=True).hidden_states
    for i, layer in enumerate(model.gpt_neox.layers):
        att = layer.attention
        a = layer.input_layernorm(hidden[i])[seq, pos].double()  # (tokens, D)
        w, b = att.query_key_value.weight.double(), att.query_key_value.bias.double()
        wo, bo = att.dense.weight.double(), att.dense.bias.double()

        def rows(head: int, part: int) -> slice:  # part 0 = q, 1 = k, 2 = v of that head
            start = head * 3 * HEAD_DIM + part * HEAD_DIM
            return slice(start, start + HEAD_DIM)

        # GPT-NeoX layout: [q_h; k_h; v_h] per head, so with 3 heads the last third of the
        # features is query, key and value of head 2
        last_head = torch.cat([a @ w[rows(2, p)].T + b[rows(2, p)] for p in range(3)], dim=-1)
        expected = last_head @ wo.T + bo
        np.testing.assert_allclose(paper.activations[0, i], expected.numpy(), rtol=1e-4,
                                   atol=1e-4)
        # not the values of every head, and not what attention writes to the residual stream
        values = torch.cat([a @ w[rows(h, 2)].T + b[rows(h, 2)] for h in range(HEADS)], dim=-1)
        assert not np.allclose(paper.activations[0, i], (values @ wo.T + bo).numpy(), atol=1e-3)
        assert not np.allclose(paper.activations[0, i], text.activations[0, i], atol=1e-3)


def test_gradient_steps_and_sub_batches():
    assert gradient_steps(143000) == (142995, 142996)
    assert gradient_steps(13000) == (12995, 12996)
    assert gradient_steps(4) == (0, 1) and gradient_steps(0) == (0, 1)
    sizes = [b - a for a, b in paper_code_sub_batches(128)]
    assert sizes == [1, 2, 4, 8, 16, 32, 64, 1]
    assert [b - a for a, b in paper_code_sub_batches(16)] == [1, 2, 4, 8, 1]
    assert paper_code_sub_batches(1) == [(0, 1)]
    with pytest.raises(ValueError, match="step"):
        gradient_steps(-1)
    with pytest.raises(ValueError):
        paper_code_sub_batches(0)


def test_paper_code_gradients_by_hand():
    model = small_model(2)
    batches = torch.stack([batch_of(10, 7), batch_of(11, 7)])
    got = paper_code_gradient_singular_values(model, batches)
    assert got.shape == (2, LAYERS, HIDDEN)
    np.testing.assert_allclose(paper_code_gradient_singular_values(model, batches,
                                                                   micro_batch=2), got,
                               rtol=1e-5, atol=1e-8)
    params = [p for layer in model.gpt_neox.layers
              for p in (layer.attention.dense.weight, layer.mlp.dense_4h_to_h.weight)]
    per_batch = []
    for batch in batches:
        # sub-batches of 1, 2, 4 sequences: the sum of their mean-loss gradients
        total = [torch.zeros_like(p) for p in params]
        for lo, hi in ((0, 1), (1, 3), (3, 7)):
            x = batch[lo:hi]
            loss = model(input_ids=x, labels=x).loss
            for acc, g in zip(total, torch.autograd.grad(loss, params), strict=True):
                acc += g
        per_batch.append([np.linalg.svd(g.double().numpy(), compute_uv=False) for g in total])
    for layer in range(LAYERS):
        for comp in range(2):
            expected = (per_batch[0][2 * layer + comp] + per_batch[1][2 * layer + comp]) / 2
            np.testing.assert_allclose(got[comp, layer], expected, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="batches, sequences, positions"):
        paper_code_gradient_singular_values(model, batches[0])


def test_gradient_batches_for_the_tiny_suite():
    corpus = load_corpus()
    out = tiny_gradient_batches(64, batch_size=16, seq_len=128, seed=0, corpus=corpus)
    assert out.shape == (2, 16, 128) and out.dtype == np.int64
    np.testing.assert_array_equal(out[0], training_batch(corpus, 59, batch_size=16,
                                                         seq_len=128, seed=0))
    np.testing.assert_array_equal(out[1], training_batch(corpus, 60, batch_size=16,
                                                         seq_len=128, seed=0))
    big = tiny_gradient_batches(8, batch_size=200, seq_len=8, seed=0, corpus=corpus)
    assert big.shape == (2, 128, 8)  # the code's 128 sequences of a larger batch


def test_extract_with_paper_code_options(tmp_path):
    model = small_model(3)
    save_checkpoint(model, tmp_path / "ckpt")
    np.save(tmp_path / "eval.npy", batch_of(4, 4).numpy())
    grads = torch.stack([batch_of(5, 3), batch_of(6, 3)])
    np.save(tmp_path / "grads.npy", grads.numpy())
    common = {"tokens": 12, "seed": 0, "size": "s", "step": 7, "model_name": "m",
              "revision": "step7"}
    out = extract_checkpoint(tmp_path / "ckpt", tmp_path / "eval.npy", tmp_path / "s.zarr",
                             options=ExtractionOptions(device="cpu",
                                                       attention_activation="paper_code",
                                                       gradient_protocol="paper_code"),
                             gradient_batches=tmp_path / "grads.npy", **common)
    ds = xr.open_zarr(out, consolidated=False)
    assert ds.attrs["attention_activation"] == "paper_code"
    assert ds.attrs["gradient_protocol"] == "paper_code" and ds.attrs["gradient_steps"] == [2, 3]
    expected = paper_code_gradient_singular_values(small_model(3), grads)
    np.testing.assert_allclose(ds.grad_singular_values.values, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="--gradient-batches"):
        extract_checkpoint(tmp_path / "ckpt", tmp_path / "eval.npy", tmp_path / "t.zarr",
                           options=ExtractionOptions(device="cpu",
                                                     gradient_protocol="paper_code"), **common)
    with pytest.raises(ValueError, match="extraction.gradient_protocol.*last.*eval_batch, "
                                         "paper_code"):
        ExtractionOptions(gradient_protocol="last")
    with pytest.raises(ValueError, match="extraction.attention_activation.*qkv"):
        ExtractionOptions(attention_activation="qkv")


def test_paper_code_config_plans_hub_gradient_batches_with_quoted_paths(tmp_path, workflow_copy):
    """config/paper_code.yaml: 27 gradient_batches jobs whose shell line passes
    hub.tokens_path as one quoted argument (a space in it does not split it)."""
    import json
    import shlex

    from support.workflow import snakemake

    workdir = workflow_copy
    local = tmp_path / "my pile"
    local.mkdir()
    config = (workdir / "config/paper_code.yaml").read_text()
    (workdir / "config/local.yaml").write_text(
        config.replace("keep_weights: false", f"keep_weights: false\n  tokens_path: '{local}'"))
    out = snakemake(workdir, "-n", "-p", "--configfile", "config/local.yaml").stdout
    lines = [line for line in out.splitlines() if "lmdynamics gradient-batches" in line]
    assert len(lines) == 27, out[-3000:]
    argv = shlex.split(lines[0].split("Shell command: ", 1)[-1].split(" > ")[0])
    options = json.loads(argv[argv.index("--options") + 1])  # one item, whatever the path
    assert options["hub"]["tokens_path"] == str(local) and options["source"] == "hub"

"""Extraction at Pythia scale: sampling protocols, micro-batches halved on out-of-memory,
gradients reduced in float32, and only the write matrices' gradients computed."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from lmdynamics.extraction import extract as ex
from lmdynamics.extraction import passes as ps


def _model(dtype=torch.float32, context=16) -> GPTNeoXForCausalLM:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=context, rotary_pct=0.25,
                           tie_word_embeddings=False, hidden_dropout=0.0, attention_dropout=0.0,
                           use_cache=False, attn_implementation="eager")
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def _batch(n_seq=6, seq_len=17) -> torch.Tensor:
    return torch.randint(0, 64, (n_seq, seq_len), generator=torch.Generator().manual_seed(3))


def test_random_positions_stay_inside_the_model_context():
    seq, pos = ex.token_positions("random_positions", 4, 2049, 4000, seed=0, context=2048)
    assert pos.max() <= 2047 and len(set(zip(seq, pos, strict=True))) == 4000
    same = ex.token_positions("random_positions", 4, 128, 100, seed=0, context=128)
    np.testing.assert_array_equal(same, ex.sample_token_positions(4, 128, 100, 0))


def test_paper_code_takes_the_last_position_of_the_first_sequences():
    seq, pos = ex.token_positions("paper_code", 128, 2049, 128, seed=0)
    np.testing.assert_array_equal(seq, np.arange(128))
    assert (pos == 2048).all()
    with pytest.raises(ValueError, match="paper_code.*allowed 1..8"):
        ex.token_positions("paper_code", 8, 2049, 9, seed=0)
    with pytest.raises(ValueError, match="allowed random_positions, paper_code"):
        ex.token_positions("middle", 8, 2049, 4, seed=0)


def test_a_sequence_one_longer_than_the_context_runs():
    # Pythia: 2049-token sequences into a 2048-position model (the last token is a label)
    model = _model(context=16)
    seq, pos = ex.token_positions("random_positions", 6, 17, 20, seed=1, context=16)
    result = ps.run_pass(model, _batch(), seq, pos)
    assert np.isfinite(result.activations).all() and np.isfinite(result.loss)


def _run(model, batch, micro=None, fitting=False):
    seq, pos = ex.token_positions("random_positions", *batch.shape, 24, seed=0, context=16)
    fn = ps.run_pass_fitting if fitting else ps.run_pass
    return fn(model, batch, seq, pos, micro_batch=micro)


def test_only_write_weights_need_gradients_and_results_do_not_change():
    batch = _batch()
    full = _run(_model(), batch)
    frozen = _model()
    ps.only_write_weights_train(frozen)
    assert sum(p.requires_grad for p in frozen.parameters()) == 4  # 2 layers x 2 matrices
    result = _run(frozen, batch)
    np.testing.assert_array_equal(result.grad_singular_values, full.grad_singular_values)
    np.testing.assert_array_equal(result.activations, full.activations)


def test_micro_batches_are_halved_on_out_of_memory_until_they_fit():
    model = _model()
    forward, sizes = model.gpt_neox.forward, []  # the trunk: lm_loss runs the head itself

    def limited(*args, **kwargs):
        n = kwargs["input_ids"].shape[0]
        sizes.append(n)
        if n > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(*args, **kwargs)

    batch = _batch(n_seq=8)
    reference = _run(copy.deepcopy(model), batch, micro=2)
    model.gpt_neox.forward = limited
    result = _run(model, batch, fitting=True)
    assert sizes[:4] == [8, 4, 2, 2]
    np.testing.assert_array_equal(result.activations, reference.activations)
    np.testing.assert_allclose(result.grad_singular_values, reference.grad_singular_values,
                               rtol=0, atol=0)
    model.gpt_neox.forward = lambda *a, **k: (_ for _ in ()).throw(
        torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)"))
    with pytest.raises(RuntimeError, match="micro-batch of one sequence"):
        _run(model, batch, fitting=True)


def test_bfloat16_micro_batches_match_a_float64_reference():
    batch = _batch(n_seq=8)
    reference = _run(_model(torch.float64), batch)
    low = _run(_model(torch.bfloat16), batch, micro=2)
    # bfloat16 keeps 8 bits of mantissa: relative error of order 2**-8 per operation
    np.testing.assert_allclose(low.loss, reference.loss, rtol=2e-2)
    np.testing.assert_allclose(low.grad_singular_values, reference.grad_singular_values,
                               rtol=0.1, atol=1e-3 * reference.grad_singular_values.max())
    np.testing.assert_allclose(low.activations, reference.activations, rtol=0.1,
                               atol=2e-2 * np.abs(reference.activations).max())
    float32 = _run(_model(torch.float32), batch, micro=2)
    np.testing.assert_allclose(float32.grad_singular_values, reference.grad_singular_values,
                               rtol=1e-4, atol=1e-7)


def test_an_eval_batch_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="token ids span 0..70.*vocabulary has 64"):
        ex.check_vocabulary(torch.tensor([[0, 70]]), 64, "eval_batch.npy")


def test_sub_batches_cut_the_sequences_into_near_equal_blocks():
    assert ps.sub_batch_bounds(6, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    assert ps.sub_batch_bounds(16, 4) == [(0, 4), (4, 8), (8, 12), (12, 16)]
    assert ps.sub_batch_bounds(2, 4) == [(0, 1), (1, 2)]  # at most one sequence each
    with pytest.raises(ValueError, match="sub_batches=0"):
        ps.sub_batch_bounds(6, 0)


@pytest.mark.parametrize("micro", [None, 1])
def test_sub_batch_gradients_are_each_sub_batch_alone(micro):
    """Each sub-batch's gradient spectrum is the one a pass on that sub-batch alone gives
    (its own mean loss), whatever the micro-batches; no gradient is left behind."""
    model, batch = _model(), _batch(n_seq=6)
    got = ps.sub_batch_gradient_singular_values(model, batch, 3, micro_batch=micro)
    assert got.shape == (3, 2, 2, 16) and got.dtype == np.float64
    for j, (lo, hi) in enumerate(ps.sub_batch_bounds(6, 3)):
        alone = _run(_model(), batch[lo:hi]).grad_singular_values
        np.testing.assert_allclose(got[j], alone, rtol=1e-5, atol=1e-7)
    # the sub-batches differ from each other and from the whole batch
    assert not np.allclose(got[0], got[1])
    assert all(p.grad is None for p in model.parameters())


def test_extraction_stores_sub_batch_gradient_spectra(tmp_path):
    from lmdynamics.sources.checkpoints import save_checkpoint
    from lmdynamics.store import open_store

    save_checkpoint(_model(), tmp_path / "ckpt")
    np.save(tmp_path / "eval.npy", _batch(n_seq=8, seq_len=16).numpy())
    common = {"tokens": 12, "seed": 0, "size": "s", "step": 7, "model_name": "m",
              "revision": "step7"}
    out = ex.extract_checkpoint(tmp_path / "ckpt", tmp_path / "eval.npy", tmp_path / "a.zarr",
                                options=ex.ExtractionOptions(device="cpu", grad_sub_batches=4),
                                **common)
    ds = open_store(out).load()
    assert ds["grad_sub_singular_values"].dims == ("sub_batch", "component", "layer", "k")
    assert ds["grad_sub_singular_values"].shape == (4, 2, 2, 16)
    assert ds.attrs["grad_sub_batches"] == 4
    expected = ps.sub_batch_gradient_singular_values(_model(), _batch(n_seq=8, seq_len=16), 4)
    # the store's model runs sdpa attention, this one eager: equal to float32 rounding
    np.testing.assert_allclose(ds["grad_sub_singular_values"].values, expected, rtol=1e-4,
                               atol=1e-5 * expected.max())
    # without sub-batches: the store of before, the same values for everything else
    plain = open_store(ex.extract_checkpoint(tmp_path / "ckpt", tmp_path / "eval.npy",
                                             tmp_path / "b.zarr",
                                             options=ex.ExtractionOptions(device="cpu",
                                                                          grad_sub_batches=0),
                                             **common)).load()
    assert "grad_sub_singular_values" not in plain and "grad_sub_batches" not in plain.attrs
    for var in plain.data_vars:
        np.testing.assert_array_equal(plain[var].values, ds[var].values)

"""The chunked LM loss against transformers' own loss and autograd; sdpa against eager
attention; the CPU micro-batch and memory policies of the extraction pass."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from lmdynamics.extraction import passes as ps
from lmdynamics.extraction.extract import sample_token_positions
from lmdynamics.extraction.lm_loss import lm_loss
from lmdynamics.sources.checkpoints import load_model, save_checkpoint

VOCAB = 97


def _model(dtype=torch.float64, attention="eager", seed=0) -> GPTNeoXForCausalLM:
    torch.manual_seed(seed)
    config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=24, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=48,
                           max_position_embeddings=32, rotary_pct=0.25,
                           tie_word_embeddings=False, use_cache=False,
                           attn_implementation=attention)
    return GPTNeoXForCausalLM(config).to(dtype).eval()


def _batch(n_seq=3, seq_len=11) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_seq, seq_len), generator=torch.Generator().manual_seed(5))


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _reference(model, batch, scale=1.0):
    """Plain autograd through the whole batch's logits in the model's dtype (float64 here;
    transformers' own loss casts logits to float32, checked to that precision below)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=batch).logits[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
    (loss * scale).backward()
    return loss.item(), _grads(model)


@pytest.mark.parametrize("chunk", [None, 1, 7, 30, 1000])
def test_loss_and_every_gradient_match_transformers_loss(chunk):
    model, batch = _model(), _batch()
    loss_ref, grads_ref = _reference(model, batch, scale=0.25)
    model.zero_grad(set_to_none=True)
    loss = lm_loss(model, batch, scale=0.25, chunk_tokens=chunk)
    grads = _grads(model)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    with torch.no_grad():
        hf = model(input_ids=batch, labels=batch).loss.item()
    assert loss == pytest.approx(hf, rel=1e-6)
    assert grads.keys() == grads_ref.keys() and len(grads) == len(list(model.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_gradients_accumulate_and_frozen_parameters_get_none():
    model, batch = _model(), _batch()
    _, grads_ref = _reference(model, batch)
    model.zero_grad(set_to_none=True)
    model.get_output_embeddings().weight.requires_grad_(False)
    lm_loss(model, batch[:1], scale=1 / 3, chunk_tokens=4)
    lm_loss(model, batch[1:], scale=2 / 3, chunk_tokens=4)
    assert model.get_output_embeddings().weight.grad is None
    for name, g in _grads(model).items():
        torch.testing.assert_close(g, grads_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_a_head_with_a_bias_gets_its_gradient():
    model, batch = _model(), _batch()
    model.set_output_embeddings(torch.nn.Linear(24, VOCAB, bias=True, dtype=torch.float64))
    _, grads_ref = _reference(model, batch)
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch, chunk_tokens=9)
    head = model.get_output_embeddings()
    torch.testing.assert_close(head.bias.grad, grads_ref["lm_head.bias"])
    torch.testing.assert_close(head.weight.grad, grads_ref["lm_head.weight"])


def test_without_backward_only_the_loss_and_non_finite_logits_give_a_non_finite_loss():
    model, batch = _model(), _batch()
    with torch.no_grad():
        loss = lm_loss(model, batch, backward=False)
    assert loss == pytest.approx(_reference(model, batch)[0], rel=1e-12)
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.get_output_embeddings().weight[3, 0] = float("nan")
    assert np.isnan(lm_loss(model, batch))
    with pytest.raises(ValueError, match=r"positions >= 2.*shape \(3, 1\)"):
        lm_loss(model, batch[:, :1])


def test_sdpa_and_eager_attention_agree_and_sdpa_repeats_bit_for_bit(tmp_path):
    batch = _batch(n_seq=4, seq_len=17)
    seq, pos = sample_token_positions(4, 17, 30, 0)
    save_checkpoint(_model(torch.float32), tmp_path / "ckpt")
    eager = ps.run_pass(load_model(tmp_path / "ckpt", attention="eager").double(), batch,
                        seq, pos)
    runs = [ps.run_pass(load_model(tmp_path / "ckpt", attention="sdpa"), batch, seq, pos,
                        micro_batch=micro) for micro in (None, None, 1)]
    assert runs[0].activations.dtype == np.float32
    for name in ("activations", "weight_singular_values", "grad_singular_values"):
        np.testing.assert_array_equal(getattr(runs[0], name), getattr(runs[1], name))
        np.testing.assert_allclose(getattr(runs[0], name), getattr(eager, name), rtol=2e-4,
                                   atol=1e-5)
        np.testing.assert_allclose(getattr(runs[2], name), getattr(eager, name), rtol=2e-4,
                                   atol=1e-5)
    assert runs[0].loss == pytest.approx(eager.loss, rel=1e-6)
    with pytest.raises(ValueError, match="attention_implementation='flash': allowed sdpa, eager"):
        load_model(tmp_path / "ckpt", attention="flash")


def test_cpu_micro_batches_hold_about_4096_tokens_and_cuda_takes_all():
    cpu = torch.device("cpu")
    assert ps.default_micro_batch(cpu, 2049) == 1  # a Pythia sequence
    assert ps.default_micro_batch(cpu, 129) == 31  # the tiny suite's 16 sequences: one pass
    assert ps.default_micro_batch(cpu, 10_000) == 1
    assert ps.default_micro_batch(torch.device("cuda"), 2049) is None


#: Run in a fresh interpreter: allocate, fill and free 64 MiB of float64 (above glibc's
#: largest mmap threshold) twice and print the minor page faults of the second time
#: (numpy's huge-page advice off, so that a page is 4 KiB as for torch's allocations).
_FAULTS_OF_A_REUSED_BUFFER = """
import resource, sys
import numpy as np
from lmdynamics.heap import reuse_freed_memory
if sys.argv[1] == "on":
    assert reuse_freed_memory() is True
np.ones(1 << 23).sum()
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
np.ones(1 << 23).sum()
print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_memory_is_kept_for_reuse_under_glibc():
    env = {**os.environ, "NUMPY_MADVISE_HUGEPAGE": "0"}
    faults = {mode: int(subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BUFFER, mode],
                                       check=True, capture_output=True, text=True,
                                       env=env).stdout)
              for mode in ("off", "on")}
    pages = (64 << 20) // resource.getpagesize()
    assert faults["off"] > pages // 2, faults  # glibc's default: a fresh mmap, faulted again
    assert faults["on"] < pages // 16, faults  # the freed heap pages are reused

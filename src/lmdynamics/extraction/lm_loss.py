"""The language-modelling loss of a causal LM, its unembedding and gradient taken in token chunks.

``model(input_ids=x, labels=x).loss`` materialises the logits of every token at once, in
float32 for the loss: for Pythia's vocabulary (50,304) and the eval batch (8 x 2048 tokens)
that is 3.3 GB, and as much again for the log-softmax, its gradient, the zeros of the
NLL gradient and the shifted copy. On CPU those buffers, not the arithmetic, dominate the
pass (docs/benchmarks/2026-11-29.md). Here the trunk runs once under autograd; the unembedding and
the cross-entropy run on ``chunk_tokens`` rows at a time with their gradient written out
by hand (softmax minus one-hot: one log-softmax and one in-place ``exp`` per chunk), into
the unembedding's ``.grad`` and into the final hidden state's gradient, which is then
pushed back through the trunk in one ``backward``. The loss and every gradient are those
of the whole batch's mean loss, up to floating-point summation order (checked against
float64 autograd through the whole batch's logits, and against transformers' own loss, in
tests/test_lm_loss.py).
"""

from __future__ import annotations

import torch

#: Logit elements per chunk: 2^26 float32 values (256 MiB), 1334 tokens of Pythia's vocabulary.
CHUNK_LOGITS = 1 << 26


def lm_loss(model: torch.nn.Module, inputs: torch.Tensor, *, scale: float = 1.0,
            backward: bool = True, chunk_tokens: int | None = None) -> float:
    """Mean next-token cross-entropy (nats/token) of ``inputs`` (S, T) int64, labels = inputs.

    The mean runs over the S x (T - 1) predicted tokens, as transformers' causal-LM loss
    (the last position of each sequence has no label). With ``backward``, the gradient of
    ``scale`` times that mean is added to every parameter's ``.grad`` that requires one
    (micro-batches pass their share of the batch as ``scale``). Logits are computed in the
    model's dtype and reduced in float32 (float64 for a float64 model); the loss sums in
    float64. ``chunk_tokens``: tokens
    per unembedding chunk (default: :data:`CHUNK_LOGITS` logits per chunk). Returns the
    unscaled mean loss; NaN or inf logits give a NaN or inf loss, never an error.
    """
    if inputs.ndim != 2 or inputs.shape[1] < 2:
        raise ValueError(f"inputs must be (sequences, positions >= 2) token ids; got shape "
                         f"{tuple(inputs.shape)}")
    head = model.get_output_embeddings()
    hidden = model.base_model(input_ids=inputs).last_hidden_state[:, :-1]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = inputs[:, 1:].reshape(-1)
    n_tokens = targets.numel()
    rows = chunk_tokens or max(1, CHUNK_LOGITS // head.out_features)
    weight, bias = head.weight, head.bias
    reduce_dtype = torch.promote_types(weight.dtype, torch.float32)
    grad_hidden = torch.empty_like(hidden) if backward and hidden.requires_grad else None
    grad_weight = grad_bias = None
    if backward and weight.requires_grad:
        grad_weight = torch.zeros(weight.shape, dtype=reduce_dtype, device=weight.device)
        if bias is not None:
            grad_bias = torch.zeros(bias.shape, dtype=reduce_dtype, device=bias.device)
    total = torch.zeros((), dtype=torch.float64, device=inputs.device)
    factor = scale / n_tokens
    with torch.no_grad():
        for lo in range(0, n_tokens, rows):
            x, t = hidden[lo:lo + rows], targets[lo:lo + rows]
            logits = torch.nn.functional.linear(x, weight, bias)
            logp = torch.log_softmax(logits.to(reduce_dtype), -1)
            del logits
            picked = logp.gather(1, t[:, None])
            total -= picked.sum(dtype=torch.float64)
            if grad_hidden is None and grad_weight is None:
                continue
            dlogits = logp.exp_()  # softmax, in place
            dlogits.scatter_add_(1, t[:, None], torch.full_like(picked, -1.0))
            dlogits = dlogits.to(weight.dtype)
            if grad_hidden is not None:
                torch.mm(dlogits, weight, out=grad_hidden[lo:lo + rows])
                grad_hidden[lo:lo + rows] *= factor
            if grad_weight is not None:
                grad_weight.addmm_(dlogits.T.to(reduce_dtype), x.to(reduce_dtype), alpha=factor)
                if grad_bias is not None:
                    grad_bias.add_(dlogits.to(reduce_dtype).sum(0), alpha=factor)
    _add_grad(weight, grad_weight)
    _add_grad(bias, grad_bias)
    if grad_hidden is not None:
        hidden.backward(grad_hidden)
    return float(total) / n_tokens


def _add_grad(param: torch.Tensor | None, grad: torch.Tensor | None) -> None:
    """Accumulate ``grad`` (float32 or wider) into ``param.grad`` in the parameter's dtype."""
    if param is None or grad is None:
        return
    grad = grad.to(param.dtype)
    param.grad = grad if param.grad is None else param.grad + grad

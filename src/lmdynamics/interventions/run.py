"""One run of the intervention study: train one (variant, size, seed), analyse every checkpoint.

Training is the tiny suite's own loop, :func:`lmdynamics.sources.tiny.train_updates` (its
data order, learning-rate schedule, AdamW and gradient clip), plus the variant's
initialisation hook and loss term. Instead of writing checkpoint directories, the analysed
steps' weights are kept in memory and analysed in the same process at the end (one job per
run: nothing of one run waits on, or reruns with, another):

- each checkpoint runs the project's extraction pass
  (:func:`lmdynamics.extraction.passes.run_pass`) on the eval batch (the last training batch,
  as in the paper and the tiny suite): the outputs each layer writes to the residual stream
  (attention ``dense``, MLP ``dense_4h_to_h``) at ``eval_tokens`` seeded positions, the
  singular values of the write matrices and of their gradients of the language-modelling
  loss, the loss;
- CKA of each step's outputs to the final step's, biased
  (:func:`lmdynamics.estimators.cka.linear_cka_to_reference`) and debiased
  (:func:`lmdynamics.estimators.cka.debiased_cka_to_reference`);
- PER (:func:`lmdynamics.estimators.rank.proportional_effective_rank`, divisor ``min_dim``) of
  the weights and gradients.

The regulariser's term is never part of a recorded loss: ``train_loss`` is the language-model
cross-entropy of each update's batch, ``loss`` at a step is that of the eval batch.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from transformers import GPTNeoXForCausalLM

from lmdynamics.estimators.cka import (
    CKAReference,
    DebiasedCKAReference,
    debiased_cka_to_reference,
    linear_cka_to_reference,
)
from lmdynamics.estimators.rank import per_divisor, proportional_effective_rank
from lmdynamics.extraction.passes import COMPONENTS, only_write_weights_train, run_pass
from lmdynamics.extraction.positions import sample_token_positions
from lmdynamics.sources.tiny import (
    deterministic_torch,
    model_config,
    train_updates,
    training_batch,
)

from .variants import Variant

__all__ = ["RunResult", "RunSettings", "analyse_states", "train_run"]

log = logging.getLogger(__name__)

#: Per-step metric columns of a run's table (besides the keys).
METRIC_COLUMNS = ("cka", "cka_debiased", "per_weight", "per_grad", "loss")
#: Recorded losses of the last this-many updates are averaged into the final training loss.
FINAL_LOSS_WINDOW = 10


@dataclass(frozen=True)
class RunSettings:
    """Training and analysis settings shared by every variant of a study.

    ``steps``: analysed checkpoint steps (0 = initialisation, ``final_step`` must be among
    them); ``eval_tokens``: token positions sampled from the eval batch (batch_size x seq_len);
    ``vocab_size``: 256 for the byte-level tiny corpus, else the token file's vocabulary;
    ``device``: ``cpu`` or ``cuda``; ``threads``: torch CPU threads (None keeps the setting).
    """

    final_step: int
    steps: tuple[int, ...]
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 16
    eval_tokens: int = 1024
    vocab_size: int = 256
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        steps = tuple(sorted(set(int(s) for s in self.steps)))
        object.__setattr__(self, "steps", steps)
        if self.final_step not in steps:
            raise ValueError(f"steps {list(steps)}: must include final_step={self.final_step}")
        if steps[0] < 0 or steps[-1] > self.final_step:
            raise ValueError(f"steps {list(steps)}: allowed 0..final_step={self.final_step}")
        if not 4 <= self.eval_tokens <= self.batch_size * self.seq_len:
            raise ValueError(f"eval_tokens={self.eval_tokens}: allowed 4..batch_size x seq_len"
                             f" = {self.batch_size * self.seq_len}")


@dataclass
class RunResult:
    """``metrics``: one row per (component, layer, step) with :data:`METRIC_COLUMNS`;
    ``losses``: one row per update (``step`` = update + 1) with ``train_loss`` (LM only) and
    ``penalty`` (the variant's loss term, 0 without one)."""

    metrics: pd.DataFrame
    losses: pd.DataFrame


def _settings(device: torch.device, threads: int | None):
    """Deterministic algorithms on the CPU (bit-identical reruns at equal thread counts);
    a GPU run keeps torch's defaults (cuBLAS determinism needs an environment variable)."""
    if device.type == "cpu":
        return deterministic_torch(threads)
    return contextlib.nullcontext()


def train_run(variant: Variant, spec: Mapping[str, int], tokens: np.ndarray, *,
              settings: RunSettings, seed: int) -> RunResult:
    """Train one (variant, architecture, seed) and analyse its checkpoints.

    Parameters
    ----------
    variant : Variant
        Its ``init`` runs after the seeded initialisation, its ``loss`` is added every update.
    spec : {hidden_size, num_layers, num_heads}
        Architecture (:func:`lmdynamics.sources.tiny.model_config`, vocabulary
        ``settings.vocab_size``).
    tokens : 1-D integer array
        Training tokens; update ``u`` consumes :func:`lmdynamics.sources.tiny.training_batch`
        ``(u)``,
        which depends only on ``seed`` (the same for every variant).
    settings : RunSettings
    seed : int
        Seeds the initialisation (``torch.manual_seed``), the data order and the sampled
        token positions.
    """
    device = torch.device(settings.device)
    s = settings
    top = int(np.max(tokens[: min(len(tokens), 1 << 24)]))
    if top >= s.vocab_size:
        raise ValueError(f"token ids reach {top}; vocab_size={s.vocab_size} is too small")
    wanted = set(s.steps)
    states: dict[int, dict[str, torch.Tensor]] = {}
    with _settings(device, s.threads):
        config = model_config(spec, seq_len=s.seq_len)
        config.vocab_size = s.vocab_size
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config).to(device).train()
        if variant.init is not None:
            variant.init(model)

        def keep(step: int, _loss: float = 0.0) -> None:
            if step in wanted:
                states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        keep(0)
        start = time.perf_counter()
        losses, penalties = train_updates(
            model, tokens, final_step=s.final_step, batch_size=s.batch_size,
            seq_len=s.seq_len, lr=s.lr, warmup=s.warmup, seed=seed, extra_loss=variant.loss,
            after_update=keep)
        log.info("%s seed %d: trained %d updates in %.1f s, loss %.4f", variant.name, seed,
                 s.final_step, time.perf_counter() - start, losses[-1])
        eval_batch = training_batch(tokens, s.final_step - 1, batch_size=s.batch_size,
                                    seq_len=s.seq_len, seed=seed)
        metrics = analyse_states(model, states, eval_batch, eval_tokens=s.eval_tokens,
                                 seed=seed)
    frame = pd.DataFrame({"step": np.arange(1, s.final_step + 1), "train_loss": losses,
                          "penalty": penalties})
    return RunResult(metrics=metrics, losses=frame)


def analyse_states(model: torch.nn.Module, states: Mapping[int, Mapping[str, torch.Tensor]],
                   eval_batch: np.ndarray, *, eval_tokens: int, seed: int,
                   micro_batch: int | None = None) -> pd.DataFrame:
    """CKA to the final step, PER of weights and gradients and eval loss of every state.

    ``states``: step -> state dict of ``model``'s architecture; the largest step is the
    reference of CKA. ``eval_batch``: int64 (sequences, positions). Returns a table with one
    row per (component, layer, step) and columns :data:`METRIC_COLUMNS` (float64;
    dimensionless, ``loss`` in nats/token). ``model`` is left holding the last state.
    """
    device = next(model.parameters()).device
    batch = torch.as_tensor(eval_batch, dtype=torch.long, device="cpu")
    seq_idx, pos_idx = sample_token_positions(*batch.shape, eval_tokens, seed)
    only_write_weights_train(model)
    passes = {}
    for step in sorted(states):
        model.load_state_dict(states[step])
        passes[step] = run_pass(model, batch.to(device), seq_idx, pos_idx,
                                micro_batch=micro_batch)
    model.zero_grad(set_to_none=True)
    final = passes[max(passes)]
    n_layers = final.activations.shape[1]
    rows = []
    for ci, comp in enumerate(COMPONENTS):
        for layer in range(n_layers):
            ref = final.activations[ci, layer]
            biased, debiased = CKAReference.from_activations(ref), \
                DebiasedCKAReference.from_activations(ref)
            for step, res in passes.items():
                x = res.activations[ci, layer]
                w_sv, g_sv = res.weight_singular_values[ci, layer], res.grad_singular_values[
                    ci, layer]
                divisor = per_divisor("min_dim", n_singular_values=w_sv.size, hidden_size=0,
                                      num_attention_heads=1)
                rows.append({
                    "component": comp, "layer": layer, "step": step,
                    "cka": linear_cka_to_reference(x, biased),
                    "cka_debiased": debiased_cka_to_reference(x, debiased),
                    "per_weight": proportional_effective_rank(w_sv, divisor),
                    "per_grad": proportional_effective_rank(g_sv, divisor),
                    "loss": float(res.loss)})
    return pd.DataFrame(rows)

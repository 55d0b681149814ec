"""One run of the intervention study: train one (variant, size, seed), analyse its checkpoints.

Training is the tiny suite's own loop, :func:`lmdynamics.sources.tiny.train_updates` (its
data order, AdamW and gradient clip), with the study's learning-rate schedule
(:data:`SCHEDULES`) and the variant's initialisation hook, loss term and update rule. The
weights of every analysed step (every ``checkpoint_every`` updates up to the reference step)
are kept in memory, never written to disk, and analysed in the same process at the end (one
job per run: nothing of one run waits on, or reruns with, another):

- each checkpoint runs the project's extraction pass
  (:func:`lmdynamics.extraction.passes.run_pass`) on the eval batch (the batch of the last
  update before the reference step, as the paper's eval batch is the last training batch):
  the outputs each layer writes to the residual stream (attention ``dense``, MLP
  ``dense_4h_to_h``) at ``eval_tokens`` seeded positions, the singular values of the write
  matrices and, every ``gradient_every`` steps, of their gradients of the language-modelling
  loss; the loss;
- CKA of each step's outputs to the reference step's, biased
  (:func:`lmdynamics.estimators.cka.linear_cka_to_reference`) and debiased
  (:func:`lmdynamics.estimators.cka.debiased_cka_to_reference`);
- PER (:func:`lmdynamics.estimators.rank.proportional_effective_rank`, divisor ``min_dim``) of
  the weights and gradients.

The **reference step** is the last step before the learning rate decays (:attr:`RunSettings.
reference_step`): ``final_step`` for a constant schedule, the end of the stable phase for
warmup-stable-decay; with the tiny suite's cosine schedule there is no such step and the
reference is ``final_step``. So the outcome is measured before any cooldown, which otherwise
decides when every layer settles.

Determinism: on a CPU a run uses one intra-op thread and deterministic algorithms, and with
``reproducible_kernels`` the kernels of :mod:`lmdynamics.interventions.machine` (the same on
every x86-64 CPU with AVX2), so its numbers do not depend on the job's thread count or the
machine's instruction set; :func:`lmdynamics.interventions.machine.machine_facts` records
what the run actually used.

The regulariser's term is never part of a recorded loss: ``train_loss`` is the language-model
cross-entropy of each update's batch, ``loss`` at a step is that of the eval batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping
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
    MIN_LR_FRACTION,
    deterministic_torch,
    learning_rate,
    model_config,
    train_updates,
    training_batch,
)

from .variants import Variant

__all__ = ["METRIC_COLUMNS", "SCHEDULES", "RunResult", "RunSettings", "analyse_states",
           "train_run"]

log = logging.getLogger(__name__)

#: Per-step metric columns of a run's table (besides the keys).
METRIC_COLUMNS = ("cka", "cka_debiased", "per_weight", "per_grad", "loss")
#: Recorded losses of the last this-many updates before the reference step are averaged into
#: a run's training loss.
FINAL_LOSS_WINDOW = 10
#: Intra-op threads of a CPU run (results do not depend on the job's thread count).
CPU_THREADS = 1


def _cosine(update: int, s: RunSettings) -> float:
    return learning_rate(update, lr=s.lr, warmup=s.warmup, final_step=s.final_step)


def _constant(update: int, s: RunSettings) -> float:
    return s.lr * min(1.0, (update + 1) / s.warmup) if s.warmup else s.lr


def _wsd(update: int, s: RunSettings) -> float:
    """Warmup, stable at ``lr`` until the reference step, then linear to ``MIN_LR_FRACTION *
    lr`` at the last update."""
    if update < s.reference_step:
        return _constant(update, s)
    progress = (update - s.reference_step + 1) / max(1, s.final_step - s.reference_step)
    return s.lr * (1.0 - (1.0 - MIN_LR_FRACTION) * min(1.0, progress))


#: Learning-rate schedules: name -> rate of update ``u`` (0-based) under the settings.
#: ``cosine``: the tiny suite's (:func:`lmdynamics.sources.tiny.learning_rate`); ``constant``:
#: linear warmup then ``lr``; ``wsd``: warmup-stable-decay (:func:`_wsd`).
SCHEDULES: dict[str, Callable[[int, RunSettings], float]] = {
    "cosine": _cosine, "constant": _constant, "wsd": _wsd}


@dataclass(frozen=True)
class RunSettings:
    """Training and analysis settings shared by every variant of a study (the config's
    ``interventions.training`` with ``checkpoint_every``, ``gradient_every``, ``eval_tokens``,
    ``vocab_size``, ``device``, ``reproducible_kernels``; defaults in the schema).

    ``schedule``: a key of :data:`SCHEDULES`; ``decay_fraction``: the share of ``final_step``
    that ``wsd`` spends decaying; ``checkpoint_every``: analysed steps are every this many
    updates up to the reference step (plus the reference step); ``gradient_every``: the
    gradients' spectra are taken at analysed steps divisible by it (and the reference step);
    ``eval_tokens``: token positions sampled from the eval batch; ``vocab_size``: 256 for the
    byte-level tiny corpus, else the token file's vocabulary; ``device``: ``cpu`` or ``cuda``.
    """

    final_step: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int
    schedule: str
    decay_fraction: float
    checkpoint_every: int
    gradient_every: int
    eval_tokens: int
    vocab_size: int
    device: str
    reproducible_kernels: bool

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"interventions.training.schedule: {self.schedule!r}; allowed "
                             f"{', '.join(SCHEDULES)}")
        if self.reference_step <= self.warmup:
            raise ValueError(f"interventions.training: the reference step {self.reference_step}"
                             f" (before the decay) must come after warmup={self.warmup}; "
                             "lower warmup or decay_fraction")
        if not 1 <= self.checkpoint_every <= self.reference_step:
            raise ValueError(f"interventions.checkpoint_every={self.checkpoint_every}: allowed "
                             f"1..{self.reference_step} (the reference step)")
        if self.gradient_every < 1 or self.gradient_every % self.checkpoint_every:
            raise ValueError(f"interventions.gradient_every={self.gradient_every}: must be a "
                             f"positive multiple of checkpoint_every={self.checkpoint_every}")
        if not 4 <= self.eval_tokens <= self.batch_size * self.seq_len:
            raise ValueError(f"interventions.eval_tokens={self.eval_tokens}: allowed "
                             f"4..batch_size x seq_len = {self.batch_size * self.seq_len}")

    @property
    def reference_step(self) -> int:
        """The step CKA is measured against: the last step before the learning rate decays
        (``final_step`` unless the schedule is ``wsd``)."""
        if self.schedule != "wsd":
            return self.final_step
        return self.final_step - math.ceil(self.decay_fraction * self.final_step)

    @property
    def steps(self) -> tuple[int, ...]:
        """The analysed steps: 0, ``checkpoint_every``, ... and the reference step."""
        ref = self.reference_step
        return tuple(sorted({*range(0, ref, self.checkpoint_every), ref}))

    @property
    def gradient_steps(self) -> tuple[int, ...]:
        """The analysed steps whose gradients are analysed too."""
        return tuple(s for s in self.steps
                     if s % self.gradient_every == 0 or s == self.reference_step)

    def learning_rate(self, update: int) -> float:
        """The learning rate of update ``update`` (0-based)."""
        return SCHEDULES[self.schedule](update, self)


@dataclass
class RunResult:
    """``metrics``: one row per (component, layer, step) with :data:`METRIC_COLUMNS`
    (``per_grad`` NaN at steps without gradients); ``losses``: one row per update (``step`` =
    update + 1) with ``train_loss`` (LM only), ``penalty`` (the variant's loss term, 0
    without one) and ``lr``."""

    metrics: pd.DataFrame
    losses: pd.DataFrame


def _settings(device: torch.device):
    """One thread and deterministic algorithms on the CPU (bit-identical reruns); a GPU run
    asks for deterministic algorithms where torch has them (warnings, not errors, where it
    has not)."""
    if device.type == "cpu":
        return deterministic_torch(CPU_THREADS)
    return _deterministic_warn_only()


@contextlib.contextmanager
def _deterministic_warn_only():
    old, old_warn = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old, warn_only=old_warn)


def _update_hook(variant: Variant, model: torch.nn.Module) -> Callable[[], None] | None:
    """The variant's update rule bound to ``model``: call it after every optimizer step."""
    rule = variant.update
    if rule is None:
        return None
    params = rule.parameters(model)
    previous = [p.detach().clone() for p in params]

    @torch.no_grad()
    def apply() -> None:
        for p, prev in zip(params, previous, strict=True):
            p.copy_(rule.apply(prev, p))
            prev.copy_(p)

    return apply


def train_run(variant: Variant, spec: Mapping[str, int], tokens: np.ndarray, *,
              settings: RunSettings, seed: int) -> RunResult:
    """Train one (variant, architecture, seed) and analyse its checkpoints.

    Parameters
    ----------
    variant : Variant
        Its ``init`` runs after the seeded initialisation, its ``loss`` is added every
        update, its ``update`` rewrites every update of its parameters.
    spec : {hidden_size, num_layers, num_heads}
        Architecture (:func:`lmdynamics.sources.tiny.model_config`, vocabulary
        ``settings.vocab_size``).
    tokens : 1-D integer array
        Training tokens; update ``u`` consumes :func:`lmdynamics.sources.tiny.training_batch`
        ``(u)``, which depends only on ``seed`` (the same for every variant).
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
    with _settings(device):
        config = model_config(spec, seq_len=s.seq_len)
        config.vocab_size = s.vocab_size
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(config).to(device).train()
        if variant.init is not None:
            variant.init(model)
        rewrite = _update_hook(variant, model)

        def after_update(step: int, _loss: float = 0.0) -> None:
            if rewrite is not None and step > 0:
                rewrite()
            if step in wanted:
                states[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}

        after_update(0)
        start = time.perf_counter()
        losses, penalties = train_updates(
            model, tokens, final_step=s.final_step, batch_size=s.batch_size,
            seq_len=s.seq_len, lr=s.lr, warmup=s.warmup, seed=seed, extra_loss=variant.loss,
            after_update=after_update, lr_at=s.learning_rate)
        log.info("%s seed %d: trained %d updates in %.1f s, loss %.4f", variant.name, seed,
                 s.final_step, time.perf_counter() - start, losses[-1])
        eval_batch = training_batch(tokens, s.reference_step - 1, batch_size=s.batch_size,
                                    seq_len=s.seq_len, seed=seed)
        metrics = analyse_states(model, states, eval_batch, eval_tokens=s.eval_tokens,
                                 seed=seed, gradient_steps=set(s.gradient_steps))
    frame = pd.DataFrame({"step": np.arange(1, s.final_step + 1), "train_loss": losses,
                          "penalty": penalties,
                          "lr": [s.learning_rate(u) for u in range(s.final_step)]})
    return RunResult(metrics=metrics, losses=frame)


def analyse_states(model: torch.nn.Module, states: Mapping[int, Mapping[str, torch.Tensor]],
                   eval_batch: np.ndarray, *, eval_tokens: int, seed: int,
                   gradient_steps: set[int] | None = None,
                   micro_batch: int | None = None) -> pd.DataFrame:
    """CKA to the reference step, PER of weights and gradients and eval loss of every state.

    ``states``: step -> state dict of ``model``'s architecture; the largest step is the
    reference of CKA. ``eval_batch``: int64 (sequences, positions). ``gradient_steps``: the
    steps whose gradients are taken (all when None); elsewhere ``per_grad`` is NaN. Returns a
    table with one row per (component, layer, step) and columns :data:`METRIC_COLUMNS`
    (float64; dimensionless, ``loss`` in nats/token). ``model`` is left holding the last
    state.
    """
    device = next(model.parameters()).device
    batch = torch.as_tensor(eval_batch, dtype=torch.long, device="cpu")
    seq_idx, pos_idx = sample_token_positions(*batch.shape, eval_tokens, seed)
    only_write_weights_train(model)
    passes = {}
    for step in sorted(states):
        model.load_state_dict(states[step])
        passes[step] = run_pass(model, batch.to(device), seq_idx, pos_idx,
                                micro_batch=micro_batch,
                                gradients=gradient_steps is None or step in gradient_steps)
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

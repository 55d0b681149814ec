"""The embedded tiny suite: small models trained locally, Pythia-style.

Every size is trained with the same seed, data order and batch sequence (as Pythia's suite
is; shared/notes/reference-facts.md), on a byte-level (vocabulary 256) encoding of text that
ships with Python, :data:`pydoc_data.topics.topics` (~466 kB; its exact bytes depend on the
Python version, see :func:`corpus_sha256`). The architecture follows Pythia by default:
GPT-NeoX, rotary embeddings on 25% of each head's dimensions, parallel residual, untied
input/output embeddings, no dropout; ``family`` (config key ``family``) trains the same shapes
as Llama-style or GPT-2 models instead (:mod:`lmdynamics.families`, each family's
``tiny_config``). Training: AdamW with betas (0.9, 0.95), linear warmup then cosine decay to
10% of the peak learning rate, gradient clipping at 1.0.

Steps and batches
-----------------
The checkpoint of step ``s`` is the model after ``s`` optimizer updates (``step0`` is the
initialisation). Update ``u`` (0-based, ``u = 0 .. final_step - 1``) consumes batch ``u`` and
produces checkpoint ``u + 1``; the last training batch, ``final_step - 1``, is the eval batch
(Pythia's eval batch is the batch of step 142999, consumed by the update that produces
``step143000``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lmdynamics import families
from lmdynamics.sources.schedule import checkpoint_schedule

if TYPE_CHECKING:  # the corpus and its batches need numpy only (the eval batch's job)
    import pandas as pd
    import torch
    from transformers import PretrainedConfig

__all__ = ["VOCAB_SIZE", "DEFAULT_SPECS", "checkpoint_schedule", "load_corpus", "corpus_sha256",
           "n_sequences", "training_batch", "eval_batch", "model_config", "learning_rate",
           "deterministic_torch", "train_updates", "train_tiny_model"]

log = logging.getLogger(__name__)

#: Byte-level vocabulary: token id = byte value.
VOCAB_SIZE = 256
#: The default suite (config/tiny.yaml), label -> architecture.
DEFAULT_SPECS: dict[str, dict[str, int]] = {
    "42k": {"hidden_size": 32, "num_layers": 2, "num_heads": 2},
    "183k": {"hidden_size": 64, "num_layers": 3, "num_heads": 4},
    "497k": {"hidden_size": 96, "num_layers": 4, "num_heads": 4},
}
#: Pythia's AdamW betas and the suite's weight decay, gradient clip and final lr fraction.
BETAS = (0.9, 0.95)
WEIGHT_DECAY = 0.01
GRAD_CLIP = 1.0
MIN_LR_FRACTION = 0.1


def load_corpus() -> np.ndarray:
    """The training text as bytes: uint8 array (n_bytes,).

    The values of :data:`pydoc_data.topics.topics` joined in sorted-key order, UTF-8 encoded.
    """
    from pydoc_data.topics import topics

    text = "".join(topics[key] for key in sorted(topics))
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()


def corpus_sha256(corpus: np.ndarray | None = None) -> str:
    """Hex sha256 of the corpus bytes (record it: the text differs between Python versions)."""
    data = load_corpus() if corpus is None else np.ascontiguousarray(corpus, dtype=np.uint8)
    return hashlib.sha256(data.tobytes()).hexdigest()


def n_sequences(corpus: np.ndarray, seq_len: int) -> int:
    """Number of non-overlapping ``seq_len``-token sequences in the corpus (the tail is dropped)."""
    _check_positive("seq_len", seq_len)
    n = len(corpus) // seq_len
    if n < 1:
        raise ValueError(f"seq_len={seq_len}: longer than the corpus ({len(corpus)} tokens)")
    return n


def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def training_batch(corpus: np.ndarray, update: int, *, batch_size: int, seq_len: int,
                   seed: int) -> np.ndarray:
    """The batch consumed by update ``update`` (0-based): int64 (batch_size, seq_len) byte ids.

    The corpus is cut into ``n = len(corpus) // seq_len`` non-overlapping sequences. Epoch ``e``
    visits them in the order ``np.random.default_rng([seed, e]).permutation(n)``; the epoch
    orders are concatenated and batch ``u`` is entries ``[u * batch_size, (u + 1) *
    batch_size)`` of that stream. It depends only on the corpus, ``update``, ``batch_size``,
    ``seq_len`` and ``seed``: the same for every model size.
    """
    _check_nonnegative("update", update)
    _check_positive("batch_size", batch_size)
    n = n_sequences(corpus, seq_len)
    flat = np.arange(update * batch_size, (update + 1) * batch_size)
    epochs, slots = np.divmod(flat, n)
    rows = np.empty(batch_size, dtype=np.int64)
    for epoch in np.unique(epochs):
        mask = epochs == epoch
        rows[mask] = _epoch_order(seed, int(epoch), n)[slots[mask]]
    starts = rows * seq_len
    index = starts[:, None] + np.arange(seq_len)[None, :]
    return np.asarray(corpus)[index].astype(np.int64)  # any integer token ids, not only bytes


def eval_batch(corpus: np.ndarray, *, final_step: int, batch_size: int, seq_len: int,
               seed: int) -> np.ndarray:
    """The last training batch (update ``final_step - 1``): int64 (batch_size, seq_len)."""
    _check_positive("final_step", final_step)
    return training_batch(corpus, final_step - 1, batch_size=batch_size, seq_len=seq_len,
                          seed=seed)


def model_config(spec: Mapping[str, int], *, seq_len: int,
                 family: str = families.DEFAULT) -> PretrainedConfig:
    """The tiny config of ``family`` for ``spec`` = {hidden_size, num_layers, num_heads}.

    Vocabulary 256 (bytes), context ``seq_len``, eager attention; the rest is the family's
    ``tiny_config``. GPT-NeoX (default), Pythia-like: MLP width 4 x hidden, rotary on 25% of
    each head's dimensions (base 10000), parallel residual, untied embeddings, no dropout,
    initializer range 0.02.
    """
    fam = families.get(family)
    missing = {"hidden_size", "num_layers", "num_heads"} - set(spec)
    if missing:
        raise ValueError(f"spec={dict(spec)!r}: missing keys {sorted(missing)}; allowed: "
                         "hidden_size, num_layers, num_heads")
    hidden, layers, heads = spec["hidden_size"], spec["num_layers"], spec["num_heads"]
    for name, value in (("hidden_size", hidden), ("num_layers", layers), ("num_heads", heads),
                        ("seq_len", seq_len)):
        _check_positive(name, value)
    if hidden % heads:
        raise ValueError(f"hidden_size={hidden}: must be divisible by num_heads={heads}")
    return fam.build_tiny_config(spec, seq_len=seq_len, vocab_size=VOCAB_SIZE)


def learning_rate(update: int, *, lr: float, warmup: int, final_step: int) -> float:
    """Learning rate of update ``update`` (0-based): linear warmup, then cosine to 10% of ``lr``.

    Warmup: ``lr * (update + 1) / warmup`` for ``update < warmup``; after it the rate decays
    from ``lr`` at ``update = warmup`` to ``0.1 * lr`` at ``update = final_step - 1``.
    """
    if update < warmup:
        return lr * (update + 1) / warmup
    progress = (update - warmup) / max(1, final_step - 1 - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr * (MIN_LR_FRACTION + (1.0 - MIN_LR_FRACTION) * cosine)


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}={value!r}: must be a positive integer")


def _check_nonnegative(name: str, value: int) -> None:
    if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}={value!r}: must be a non-negative integer")


@contextlib.contextmanager
def deterministic_torch(threads: int | None) -> Iterator[None]:
    """Deterministic algorithms and (optionally) a fixed thread count, restored afterwards."""
    import torch

    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    old_threads = torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    if threads is not None:
        _check_positive("threads", threads)
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)
        torch.set_num_threads(old_threads)


def train_updates(model: torch.nn.Module, tokens: np.ndarray, *, final_step: int,
                  batch_size: int, seq_len: int, lr: float, warmup: int, seed: int,
                  extra_loss: Callable[[torch.nn.Module], torch.Tensor] | None = None,
                  after_update: Callable[[int, float], None] | None = None,
                  lr_at: Callable[[int], float] | None = None,
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The tiny suite's optimisation: ``final_step`` AdamW updates of ``model``.

    Update ``u`` sets the learning rate :func:`learning_rate` ``(u)`` (or ``lr_at(u)``, another
    schedule, when given), takes batch
    :func:`training_batch` ``(tokens, u)`` (onto the model's device), back-propagates the
    language-model loss plus ``extra_loss(model)`` if given (an intervention's term), clips
    the gradient norm at :data:`GRAD_CLIP` and steps; then ``after_update(u + 1, loss)`` (e.g.
    save checkpoint ``u + 1``). The one training loop of the tiny suite and of the
    intervention study (:mod:`lmdynamics.interventions.run`).

    Returns
    -------
    losses, extras : (final_step,) float64 arrays
        The language-model loss of each update (without the extra term) and the extra
        term's value (0 without one).
    """
    import torch

    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=BETAS,
                                  weight_decay=WEIGHT_DECAY)
    losses = np.empty(final_step, dtype=np.float64)
    extras = np.zeros(final_step, dtype=np.float64)
    for update in range(final_step):
        rate = (learning_rate(update, lr=lr, warmup=warmup, final_step=final_step)
                if lr_at is None else lr_at(update))
        for group in optimizer.param_groups:
            group["lr"] = rate
        batch = torch.from_numpy(training_batch(tokens, update, batch_size=batch_size,
                                                seq_len=seq_len, seed=seed)).to(device)
        loss = model(input_ids=batch, labels=batch).loss
        total = loss
        if extra_loss is not None:
            term = extra_loss(model)
            total = loss + term
            extras[update] = term.item()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        losses[update] = loss.item()
        if after_update is not None:
            after_update(update + 1, losses[update])
    return losses, extras


#: The keys of config section ``tiny`` that set how :func:`train_tiny_model` trains.
TRAINING_KEYS = ("batch_size", "seq_len", "lr", "warmup")


def train_tiny_model(spec: Mapping[str, int], *, size: str, out_dir: Path | str,
                     loss_csv: Path | str, final_step: int, log_until: int, interval: int,
                     batch_size: int, seq_len: int, lr: float, warmup: int, seed: int,
                     threads: int | None = None,
                     corpus: np.ndarray | None = None,
                     family: str = families.DEFAULT) -> pd.DataFrame:
    """Train one size of the tiny suite; save its checkpoints and training loss.

    Parameters
    ----------
    spec : {hidden_size, num_layers, num_heads}
        Architecture (:func:`model_config`).
    family : str
        Model family (:mod:`lmdynamics.families`), default GPT-NeoX.
    size : str
        Label written to the ``size`` column of the loss table.
    out_dir : path
        Checkpoints go to ``out_dir/step<s>`` for every ``s`` of
        ``checkpoint_schedule(final_step, log_until, interval)`` (each written atomically).
    loss_csv : path
        Written last and atomically, so its presence means the training finished.
    final_step : int
        Number of optimizer updates.
    batch_size, seq_len : int
        Sequences per batch and tokens per sequence (:func:`training_batch`).
    lr, warmup : float, int
        Peak learning rate and warmup updates (:func:`learning_rate`).
        ``batch_size``, ``seq_len``, ``lr``, ``warmup`` (:data:`TRAINING_KEYS`) are config
        section ``tiny``'s: ``lmdynamics.options.resolve("tiny", given, TRAINING_KEYS)``
        gives them with the schema's defaults.
    seed : int
        Seeds the model initialisation (``torch.manual_seed``) and the data order.
    threads : int, optional
        torch intra-op threads during training (restored afterwards); ``None`` keeps the
        current setting. Bit-identical results are guaranteed for equal thread counts.
    corpus : uint8 array, optional
        Training bytes; default :func:`load_corpus`.

    Returns
    -------
    pandas.DataFrame
        Columns ``size``, ``step``, ``loss``: row ``step`` is update ``step - 1``, i.e. the
        mean next-byte cross-entropy (nats/token) of batch ``step - 1`` under checkpoint
        ``step - 1``, measured in the forward pass of the update that produces checkpoint
        ``step``. Steps run 1..final_step.

    A killed run leaves no file under a final name half-written; rerunning starts over.
    """
    import pandas as pd
    import torch

    from lmdynamics.sources.checkpoints import save_checkpoint

    schedule = set(checkpoint_schedule(final_step, log_until, interval))
    _check_nonnegative("warmup", warmup)
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: must be a positive number")
    corpus = load_corpus() if corpus is None else corpus
    out_dir, loss_csv = Path(out_dir), Path(loss_csv)
    with deterministic_torch(threads):
        config = model_config(spec, seq_len=seq_len, family=family)
        torch.manual_seed(seed)
        model = families.get(family).model_cls()(config).train()
        save_checkpoint(model, out_dir / "step0")
        start, report_every = time.perf_counter(), max(1, final_step // 10)

        def after_update(step: int, loss: float) -> None:
            if step in schedule:
                save_checkpoint(model, out_dir / f"step{step}")
            if step % report_every == 0 or step == final_step:
                log.info("tiny %s: step %d/%d loss %.4f (%.1f s)", size, step, final_step,
                         loss, time.perf_counter() - start)

        losses, _ = train_updates(model, corpus, final_step=final_step, batch_size=batch_size,
                                  seq_len=seq_len, lr=lr, warmup=warmup, seed=seed,
                                  after_update=after_update)
    from lmdynamics.store import write_text_atomic  # here: the rest imports without zarr

    frame = pd.DataFrame({"size": size, "step": np.arange(1, final_step + 1), "loss": losses})
    write_text_atomic(frame.to_csv(index=False), loss_csv)
    return frame

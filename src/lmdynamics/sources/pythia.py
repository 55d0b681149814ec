"""Facts about the Pythia suite, in one place (shared/notes/reference-facts.md; the Pythia
README and its training data on the hub). Pure constants: the Snakefile imports them on every
parse, through :mod:`lmdynamics.config`."""

from __future__ import annotations

#: Sizes published as ``EleutherAI/pythia-<size>-deduped`` on the hub.
SIZES: tuple[str, ...] = ("14m", "31m", "70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b",
                          "12b")
#: (layers, hidden, vocabulary) per size, MLP width 4 x hidden (14m, 31m, 1b, 6.9b, 12b from
#: the Pythia README, whose parameter counts ``plan.shape_parameters`` reproduces exactly).
ARCHITECTURES: dict[str, tuple[int, int, int]] = {
    "14m": (6, 128, 50304), "31m": (6, 256, 50304), "70m": (6, 512, 50304),
    "160m": (12, 768, 50304), "410m": (24, 1024, 50304), "1b": (16, 2048, 50304),
    "1.4b": (24, 2048, 50304), "2.8b": (32, 2560, 50304), "6.9b": (32, 4096, 50432),
    "12b": (36, 5120, 50688)}
#: Attention heads per size: 70m-2.8b from shared/notes/reference-facts.md; 14m, 31m, 1b, 6.9b
#: and 12b from ``num-attention-heads`` of the training configs in github.com/EleutherAI/pythia
#: (``models/14M/pythia-14m.yml``, ``models/31M/pythia-31m.yml``, ``models/1B/pythia-1b.yml``,
#: ``models/6.9B/pythia-6.9b.yml``, ``models/12B/pythia-12b.yml``).
HEADS: dict[str, int | None] = {
    "14m": 4, "31m": 8, "70m": 8, "160m": 12, "410m": 16, "1b": 8, "1.4b": 16,
    "2.8b": 32, "6.9b": 32, "12b": 40}
#: Sizes trained on the deduplicated Pile although their repo name has no ``-deduped``:
#: pythia-31m (its model card; ``train-data-paths`` ``pile_deduped`` in
#: ``models/31M/pythia-31m.yml``). The standard-Pile suite's last training batch is not its
#: data, so the ``pythia`` suite definition leaves it out.
DEDUPED_ONLY: tuple[str, ...] = ("31m",)
#: Tokens per training sequence in the data files (2048 context + 1 for the shifted labels).
SEQUENCE_TOKENS = 2049
#: Context: positions 0..2047 are inputs (the 2049th token is only a label).
CONTEXT = 2048
#: Sequences per training batch: 1024 x 2048 = 2,097,152 tokens per step.
BATCH_SEQUENCES = 1024
#: Checkpoints: step0, log-spaced step1 ... step512, then every 1000 steps to step143000
#: (154 revisions on the hub).
FINAL_STEP = 143_000
LOG_UNTIL = 512
INTERVAL = 1000

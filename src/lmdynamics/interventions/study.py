"""A study: the grid of runs (variant x size x seed) a config names, and its I/O edges.

Config section ``interventions`` (config/interventions.yaml documents every key):
``variants`` (name -> {kind, ...}), ``baseline``, ``sizes`` (label -> architecture),
``seeds``, ``training`` (final_step, batch_size, seq_len, lr, warmup), ``steps``,
``eval_tokens``, ``tokens`` (``tiny`` or a .npy file), ``vocab_size``, ``device``,
``outcomes`` (threshold, cka_estimator, bootstrap samples and level).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .inputs import check_device, check_tokens, input_errors
from .outcomes import effects, run_outcomes, summary_effects
from .run import RunSettings, train_run
from .variants import build_variant

__all__ = ["load_tokens", "run_one", "settings_from", "summarise"]

#: ``tokens: tiny`` trains on the embedded byte-level corpus (lmdynamics.sources.tiny.load_corpus).
TINY_TOKENS = "tiny"


def load_tokens(source: str | Path, settings: RunSettings | None = None) -> np.ndarray:
    """Training tokens: ``"tiny"`` (the tiny suite's bytes) or a .npy file of a 1-D integer
    array (token ids, e.g. a tokenised corpus; memory-mapped). Raises ValueError naming the
    file and what is wrong; with ``settings``, every id is checked against its vocabulary
    and the file against its batch (:func:`.inputs.check_tokens`)."""
    from lmdynamics.store import open_npy

    if str(source) == TINY_TOKENS:
        from lmdynamics.sources.tiny import load_corpus

        return load_corpus()
    path = Path(source)
    if path.suffix != ".npy":
        raise ValueError(f"interventions.tokens: {path}: expected 'tiny' or a .npy file of "
                         "a 1-D integer array of token ids")
    try:
        arr = open_npy(path)  # header checked first: no FIFO, no 10^12-value claim
    except (OSError, ValueError) as exc:
        raise ValueError(f"interventions.tokens: {path}: cannot be read as .npy ({exc}); "
                         "save it with numpy.save(path, tokens)") from exc
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"interventions.tokens: {path}: holds {arr.dtype} of shape "
                         f"{arr.shape}; expected a 1-D integer array of token ids")
    if arr.size == 0:
        raise ValueError(f"interventions.tokens: {path}: holds no tokens; give a non-empty "
                         "1-D array of token ids")
    if settings is not None:
        check_tokens(arr, path, vocab_size=settings.vocab_size, batch_size=settings.batch_size,
                     seq_len=settings.seq_len, final_step=settings.final_step)
    elif int(arr[: 1 << 20].min()) < 0:
        raise ValueError(f"interventions.tokens: {path}: negative token ids")
    return arr


def settings_from(section: Mapping[str, Any], *, device: str | None = None,
                  threads: int | None = None) -> RunSettings:
    """:class:`RunSettings` from the ``interventions`` config section."""
    t = section["training"]
    return RunSettings(final_step=int(t["final_step"]), steps=tuple(section["steps"]),
                       batch_size=int(t["batch_size"]), seq_len=int(t["seq_len"]),
                       lr=float(t["lr"]), warmup=int(t["warmup"]),
                       eval_tokens=int(section["eval_tokens"]),
                       vocab_size=int(section["vocab_size"]),
                       device=device or section.get("device", "cpu"), threads=threads)


def run_one(variant: str, variant_spec: Mapping[str, Any], size: str,
            spec: Mapping[str, int], seed: int, settings: RunSettings,
            tokens: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and analyse one run; both tables gain the keys variant, size, seed."""
    check_device(settings.device)
    result = train_run(build_variant(variant, variant_spec), spec, tokens, settings=settings,
                       seed=seed)
    keys = {"variant": variant, "size": size, "seed": seed}
    return (result.metrics.assign(**keys)[[*keys, *result.metrics.columns]],
            result.losses.assign(**keys)[[*keys, *result.losses.columns]])


def summarise(metrics: pd.DataFrame, losses: pd.DataFrame, *, baseline: str,
              threshold: float, estimator: str, samples: int, level: float,
              seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Outcomes of every run, effects per layer and pooled effects (see :mod:`.outcomes`).

    ``metrics``/``losses``: the runs' tables stacked (keys variant, size, seed).
    """
    frames = []
    for (variant, size, run_seed), m in metrics.groupby(["variant", "size", "seed"],
                                                        sort=True):
        lo = losses[(losses["variant"] == variant) & (losses["size"] == size)
                    & (losses["seed"] == run_seed)]
        if lo.empty:
            raise ValueError(f"run {variant}/{size}/seed{run_seed}: metrics without losses")
        out = run_outcomes(m, lo, threshold=threshold, estimator=estimator)
        frames.append(out.assign(variant=variant, size=size, seed=int(run_seed)))
    outcomes = pd.concat(frames, ignore_index=True)
    outcomes = outcomes[["variant", "size", "seed", *[c for c in outcomes.columns
                                                       if c not in ("variant", "size",
                                                                    "seed")]]]
    kw = {"baseline": baseline, "samples": samples, "level": level, "seed": seed}
    return outcomes, effects(outcomes, **kw), summary_effects(outcomes, **kw)


#: Keys of the section a run depends on: a run's job gets only these as params, so that
#: adding a variant, size or seed, or changing the outcome settings, reruns no run.
RUN_KEYS = ("tokens", "vocab_size", "device", "training", "steps", "eval_tokens")


def run_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the ``interventions`` section that a run's results depend on."""
    return {k: section[k] for k in RUN_KEYS if k in section}


def section_errors(section: Mapping[str, Any]) -> list[str]:
    """What the schema cannot say about an ``interventions`` section, one line per problem
    (each naming the key, what is wrong and what is allowed); empty when all is well."""
    errors = []
    variants = section["variants"]
    if section.get("baseline", "baseline") not in variants:
        errors.append(f"interventions.baseline: {section.get('baseline', 'baseline')!r} is "
                      f"not among interventions.variants ({', '.join(variants)}); effects are "
                      "differences to it")
    for name, spec in variants.items():
        try:
            build_variant(name, spec)
        except ValueError as exc:
            errors.append(str(exc))
    t = section["training"]
    try:
        RunSettings(final_step=t["final_step"], steps=tuple(section["steps"]),
                    batch_size=t["batch_size"], seq_len=t["seq_len"],
                    eval_tokens=section["eval_tokens"])
    except ValueError as exc:
        errors.append(f"interventions.steps / eval_tokens: {exc}")
    for label, arch in section["sizes"].items():
        if arch["hidden_size"] % arch["num_heads"]:
            errors.append(f"interventions.sizes.{label}: hidden_size {arch['hidden_size']} "
                          f"is not divisible by num_heads {arch['num_heads']}")
    if str(section["tokens"]) == TINY_TOKENS and section["vocab_size"] != 256:
        errors.append(f"interventions.vocab_size: {section['vocab_size']}; tokens 'tiny' are "
                      "bytes: use 256")
    return errors + input_errors(section)

"""A study: the runs a config names (each variant x size x its seeds), and its I/O edges.

Config section ``interventions`` (workflow/schemas/interventions.schema.yaml holds every key,
its default and what it means; config/interventions.yaml is the decisive CPU design):
``target`` (the one write matrix the variants act on), ``variants`` (name -> {kind, ...,
seeds}), ``seeds``, ``contrasts`` (name -> {treatment, control, positive_control}),
``primary`` (the contrast and measure the study answers with), ``sizes``, ``training``
(final_step, batch_size, seq_len, lr, warmup, schedule, decay_fraction), ``checkpoint_every``,
``gradient_every``, ``eval_tokens``, ``tokens`` (``tiny`` or a .npy file), ``vocab_size``,
``device``, ``reproducible_kernels``, ``outcomes`` (threshold, cka_estimator, alpha, power,
bootstrap).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .inputs import check_device, check_tokens, input_errors
from .outcomes import contrast_effects, run_contrasts, run_outcomes
from .run import RunSettings, train_run
from .variants import Target, build_variant

__all__ = ["RUN_KEYS", "TINY_TOKENS", "load_tokens", "resolve_section",
           "run_one", "run_section", "section_errors", "settings_from", "summarise",
           "variant_seeds"]

#: ``tokens: tiny`` trains on the embedded byte-level corpus (lmdynamics.sources.tiny.load_corpus).
TINY_TOKENS = "tiny"
@functools.cache
def _schema() -> dict[str, Any]:
    """The study's config schema (package data: lmdynamics/schemas/interventions.schema.yaml)."""
    from lmdynamics.options import schema

    return schema("interventions")


def resolve_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``interventions`` section of ``config`` checked against the schema and the rules
    the schema cannot state (:func:`section_errors`), with the schema's defaults filled in.
    Raises :class:`lmdynamics.validation.ConfigError` listing every problem, one line each."""
    from lmdynamics.options import with_defaults
    from lmdynamics.validation import ConfigError, schema_errors

    errors = schema_errors(config, _schema())
    if not errors:
        node = _schema()["properties"]["interventions"]
        section = with_defaults(node, config["interventions"])
        contrast_node = node["properties"]["contrasts"]["additionalProperties"]
        section["contrasts"] = {k: with_defaults(contrast_node, v)
                                for k, v in section["contrasts"].items()}
        errors = section_errors(section)
    if errors:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(errors))
    return section


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


def settings_from(section: Mapping[str, Any], *, device: str | None = None) -> RunSettings:
    """:class:`RunSettings` from a resolved ``interventions`` section."""
    t = section["training"]
    return RunSettings(final_step=t["final_step"], batch_size=t["batch_size"],
                       seq_len=t["seq_len"], lr=float(t["lr"]), warmup=t["warmup"],
                       schedule=t["schedule"], decay_fraction=float(t["decay_fraction"]),
                       checkpoint_every=section["checkpoint_every"],
                       gradient_every=section["gradient_every"],
                       eval_tokens=section["eval_tokens"], vocab_size=section["vocab_size"],
                       device=device or section["device"],
                       reproducible_kernels=section["reproducible_kernels"])


def target_from(section: Mapping[str, Any]) -> Target:
    """The study's :class:`~lmdynamics.interventions.variants.Target`."""
    return Target(section["target"]["component"], section["target"]["layer"])


def variant_seeds(section: Mapping[str, Any], variant: str) -> list[int]:
    """The seeds of ``variant``: its own ``seeds`` if it has them, else the study's."""
    return list(section["variants"][variant].get("seeds", section["seeds"]))


def run_one(variant: str, variant_spec: Mapping[str, Any], size: str,
            spec: Mapping[str, int], seed: int, settings: RunSettings,
            tokens: np.ndarray, target: Target) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train and analyse one run; both tables gain the keys variant, size, seed."""
    check_device(settings.device)
    result = train_run(build_variant(variant, variant_spec, target), spec, tokens,
                       settings=settings, seed=seed)
    keys = {"variant": variant, "size": size, "seed": seed}
    return (result.metrics.assign(**keys)[[*keys, *result.metrics.columns]],
            result.losses.assign(**keys)[[*keys, *result.losses.columns]])


def summarise(metrics: pd.DataFrame, losses: pd.DataFrame, section: Mapping[str, Any],
              ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Outcomes of every (run, layer), the within-run contrast of every run, and the effect
    of every contrast (see :mod:`.outcomes`), from the runs' tables stacked (keys variant,
    size, seed) and the resolved section."""
    o = section["outcomes"]
    target = section["target"]
    frames, runs = [], []
    for (variant, size, run_seed), m in metrics.groupby(["variant", "size", "seed"],
                                                        sort=True):
        lo = losses[(losses["variant"] == variant) & (losses["size"] == size)
                    & (losses["seed"] == run_seed)]
        if lo.empty:
            raise ValueError(f"run {variant}/{size}/seed{run_seed}: metrics without losses")
        out = run_outcomes(m, lo, threshold=o["threshold"], estimator=o["cka_estimator"])
        keys = {"variant": variant, "size": size, "seed": int(run_seed)}
        frames.append(out.assign(**keys))
        runs.append({**keys, **run_contrasts(out, component=target["component"],
                                             layer=target["layer"])})
    outcomes = pd.concat(frames, ignore_index=True)
    outcomes = outcomes[["variant", "size", "seed", *[c for c in outcomes.columns
                                                       if c not in ("variant", "size",
                                                                    "seed")]]]
    run_table = pd.DataFrame(runs)
    effects = contrast_effects(run_table, section["contrasts"], alpha=o["alpha"],
                               power=o["power"], samples=o["bootstrap"]["samples"],
                               level=o["bootstrap"]["level"])
    return outcomes, run_table, effects


#: Keys of the section a run depends on: a run's job gets only these (and its variant's
#: entry) as params, so that adding a variant, size, seed or contrast, or changing the
#: outcome settings, reruns no run.
RUN_KEYS = ("tokens", "vocab_size", "device", "reproducible_kernels", "target", "training",
            "checkpoint_every", "gradient_every", "eval_tokens")


def run_section(section: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the ``interventions`` section that a run's results depend on."""
    return {k: section[k] for k in RUN_KEYS if k in section}


def section_errors(section: Mapping[str, Any]) -> list[str]:
    """What the schema cannot say about a resolved ``interventions`` section, one line per
    problem (each naming the key, what is wrong and what is allowed); empty when all is
    well."""
    errors = []
    variants = section["variants"]
    try:
        target = target_from(section)
    except ValueError as exc:
        return [str(exc)]
    for name, spec in variants.items():
        try:
            build_variant(name, spec, target)
        except ValueError as exc:
            errors.append(str(exc))
    for name, c in section["contrasts"].items():
        for role in ("treatment", "control"):
            if c[role] not in variants:
                errors.append(f"interventions.contrasts.{name}.{role}: {c[role]!r} is not "
                              f"among interventions.variants ({', '.join(variants)})")
        if c["treatment"] == c["control"]:
            errors.append(f"interventions.contrasts.{name}: treatment and control are both "
                          f"{c['treatment']!r}; compare two different variants")
        elif c["treatment"] in variants and c["control"] in variants:
            common = set(variant_seeds(section, c["treatment"])) & set(
                variant_seeds(section, c["control"]))
            if len(common) < 2:
                errors.append(f"interventions.contrasts.{name}: {c['treatment']} and "
                              f"{c['control']} share {len(common)} seed(s); a paired "
                              "comparison needs at least 2 (set their seeds)")
    primary = section["primary"]["contrast"]
    if primary not in section["contrasts"]:
        errors.append(f"interventions.primary.contrast: {primary!r} is not among "
                      f"interventions.contrasts ({', '.join(section['contrasts'])})")
    try:
        settings_from(section)
    except ValueError as exc:
        errors.append(str(exc))
    for label, arch in section["sizes"].items():
        if arch["hidden_size"] % arch["num_heads"]:
            errors.append(f"interventions.sizes.{label}: hidden_size {arch['hidden_size']} "
                          f"is not divisible by num_heads {arch['num_heads']}")
        if target.layer >= arch["num_layers"]:
            errors.append(f"interventions.target.layer: {target.layer}; size {label} has "
                          f"layers 0..{arch['num_layers'] - 1}")
    if str(section["tokens"]) == TINY_TOKENS and section["vocab_size"] != 256:
        errors.append(f"interventions.vocab_size: {section['vocab_size']}; tokens 'tiny' are "
                      "bytes: use 256")
    return errors + input_errors(section)

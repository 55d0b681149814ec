"""``lmdynamics`` subcommands of the intervention study (registered on
:data:`lmdynamics.commands.COMMANDS`; workflow/rules/interventions.smk calls them)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmdynamics.commands import command


def _json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {text[:80]!r} ({exc})") from exc


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", required=True)
    p.add_argument("--variant-spec", type=_json, required=True, help="JSON {kind, ...}")
    p.add_argument("--size", required=True)
    p.add_argument("--architecture", type=_json, required=True,
                   help="JSON {hidden_size, num_layers, num_heads}")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--section", type=_json, required=True,
                   help="JSON of the config's interventions section (training settings)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-metrics", type=Path, required=True)
    p.add_argument("--out-losses", type=Path, required=True)


@command("intervention-run", _run_args)
def _run(a: argparse.Namespace) -> None:
    """Train and analyse one (variant, size, seed) run of an intervention study."""
    from lmdynamics.store import write_text_atomic

    from .study import load_tokens, run_one, settings_from

    settings = settings_from(a.section, threads=a.threads)
    metrics, losses = run_one(a.variant, a.variant_spec, a.size, a.architecture, a.seed,
                              settings, load_tokens(a.section["tokens"], settings))
    write_text_atomic(losses.to_csv(index=False), a.out_losses)
    write_text_atomic(metrics.to_csv(index=False), a.out_metrics)  # last: the job's marker


def _summarise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--losses", type=Path, nargs="+", required=True)
    p.add_argument("--baseline", required=True)
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--cka-estimator", required=True)
    p.add_argument("--bootstrap-samples", type=int, required=True)
    p.add_argument("--bootstrap-level", type=float, required=True)
    p.add_argument("--out-dir", type=Path, required=True)


@command("intervention-summarise", _summarise_args)
def _summarise(a: argparse.Namespace) -> None:
    """Outcome measures, effects against baseline and the effects table of a study."""
    import pandas as pd

    from lmdynamics.store import write_text_atomic

    from .report import effects_markdown
    from .study import summarise

    metrics = pd.concat([pd.read_csv(p) for p in a.metrics], ignore_index=True)
    losses = pd.concat([pd.read_csv(p) for p in a.losses], ignore_index=True)
    outcomes, eff, summary = summarise(
        metrics, losses, baseline=a.baseline, threshold=a.threshold,
        estimator=a.cka_estimator, samples=a.bootstrap_samples, level=a.bootstrap_level)
    out = a.out_dir
    write_text_atomic(metrics.to_csv(index=False), out / "runs.csv")
    write_text_atomic(outcomes.to_csv(index=False), out / "outcomes.csv")
    write_text_atomic(eff.to_csv(index=False), out / "effects.csv")
    write_text_atomic(summary.to_csv(index=False), out / "effects_summary.csv")
    write_text_atomic(effects_markdown(eff, summary, level=a.bootstrap_level,
                                       threshold=a.threshold, estimator=a.cka_estimator),
                      out / "effects.md")


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--effects", type=Path, required=True)
    p.add_argument("--threshold", type=float, required=True)
    p.add_argument("--cka-estimator", required=True)
    p.add_argument("--out-dir", type=Path, required=True)


@command("intervention-figures", _figures_args)
def _figures(a: argparse.Namespace) -> None:
    """The convergence curves and the effect scatter of a study."""
    import pandas as pd

    from .outcomes import CKA_COLUMNS
    from .report import convergence_figure, effect_scatter

    if a.cka_estimator not in CKA_COLUMNS:
        raise ValueError(f"cka estimator {a.cka_estimator!r}: allowed {', '.join(CKA_COLUMNS)}")
    runs = pd.read_csv(a.runs)
    convergence_figure(runs, a.out_dir / "convergence", threshold=a.threshold,
                       estimator_column=CKA_COLUMNS[a.cka_estimator])
    effect_scatter(pd.read_csv(a.effects), a.out_dir / "effect_scatter")

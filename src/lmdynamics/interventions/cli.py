"""``lmdynamics`` subcommands of the intervention study (registered on
:data:`lmdynamics.commands.COMMANDS`; workflow/rules/interventions.smk calls them).

Each takes the resolved ``interventions`` section (or the part of it a run depends on) as one
``--options`` JSON argument: an object inline or the path of a .json file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lmdynamics.commands import command


def _json(text: str):
    """A JSON object given inline, or the path of a file holding one."""
    source = text
    if not text.lstrip().startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise ValueError(f"--options {text[:80]!r}: neither a JSON object nor a file")
        text = path.read_text()
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source[:80]!r}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{source[:80]!r}: expected a JSON object")
    return value


def _pin_kernels_before_numpy(pin_kernels) -> None:
    """Pin the CPU kernels (:func:`lmdynamics.interventions.machine.pin_kernels`). They are
    read when numpy and torch load, and building the command line's parser already loads
    numpy (another subcommand's arguments), so a process started as ``intervention-run``
    whose environment does not pin them yet runs itself again with the pinned environment
    (one interpreter start); otherwise numpy's OpenBLAS would keep the kernels this
    environment chose (measured: the float64 spectra then differed in the 14th digit)."""
    from .machine import PINNED_KERNELS

    if all(os.environ.get(k) == v for k, v in PINNED_KERNELS.items()):
        return
    if sys.argv[1:2] == ["intervention-run"] and ("numpy" in sys.modules
                                                  or "torch" in sys.modules):
        os.execve(sys.executable, [sys.executable, "-m", "lmdynamics", *sys.argv[1:]],
                  {**os.environ, **PINNED_KERNELS})
    pin_kernels()


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", required=True)
    p.add_argument("--variant-spec", type=_json, required=True, help="JSON {kind, ...}")
    p.add_argument("--size", required=True)
    p.add_argument("--architecture", type=_json, required=True,
                   help="JSON {hidden_size, num_layers, num_heads}")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--options", type=_json, required=True,
                   help="JSON of the resolved interventions section (the keys a run reads: "
                        "lmdynamics.interventions.study.RUN_KEYS)")
    p.add_argument("--out-metrics", type=Path, required=True)
    p.add_argument("--out-losses", type=Path, required=True)
    p.add_argument("--out-machine", type=Path, required=True)


@command("intervention-run", _run_args)
def _run(a: argparse.Namespace) -> None:
    """Train and analyse one (variant, size, seed) run of an intervention study."""
    from .machine import pin_kernels

    if a.options.get("reproducible_kernels") and a.options.get("device") == "cpu":
        _pin_kernels_before_numpy(pin_kernels)
    from lmdynamics.threads import pin_threads

    pin_threads(1)  # the run's one thread (interventions.run.CPU_THREADS), idle pools asleep
    from lmdynamics.store import write_text_atomic

    from .machine import machine_facts
    from .study import load_tokens, run_one, settings_from, target_from

    settings = settings_from(a.options)
    metrics, losses = run_one(a.variant, a.variant_spec, a.size, a.architecture, a.seed,
                              settings, load_tokens(a.options["tokens"], settings),
                              target_from(a.options))
    facts = machine_facts(settings.device)
    write_text_atomic(json.dumps(facts, indent=1, sort_keys=True) + "\n", a.out_machine)
    write_text_atomic(losses.to_csv(index=False), a.out_losses)
    write_text_atomic(metrics.to_csv(index=False), a.out_metrics)  # last: the job's marker


def _summarise_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics", type=Path, nargs="+", required=True)
    p.add_argument("--losses", type=Path, nargs="+", required=True)
    p.add_argument("--machines", type=Path, nargs="+", required=True)
    p.add_argument("--options", type=_json, required=True,
                   help="JSON of the resolved interventions section")
    p.add_argument("--out-dir", type=Path, required=True)


@command("intervention-summarise", _summarise_args)
def _summarise(a: argparse.Namespace) -> None:
    """Outcome measures, within-run contrasts, effects and the effects table of a study."""
    from .report import write_summary

    write_summary(a.metrics, a.losses, a.machines, a.options, a.out_dir)


def _figures_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=Path, required=True)
    p.add_argument("--run-contrasts", type=Path, required=True)
    p.add_argument("--effects", type=Path, required=True)
    p.add_argument("--options", type=_json, required=True,
                   help="JSON of the resolved interventions section")
    p.add_argument("--out-dir", type=Path, required=True)


@command("intervention-figures", _figures_args)
def _figures(a: argparse.Namespace) -> None:
    """The convergence curves and the per-seed contrasts of a study."""
    import pandas as pd

    from .report import contrast_figure, convergence_figure

    section = a.options
    convergence_figure(pd.read_csv(a.runs), a.out_dir / "convergence", section)
    contrast_figure(pd.read_csv(a.run_contrasts), pd.read_csv(a.effects),
                    a.out_dir / "contrasts", section)

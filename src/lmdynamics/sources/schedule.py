"""Checkpoint schedules: which training steps a suite saves.

Pure and import-light (no torch): the Snakefile imports this module on every parse.
"""

from __future__ import annotations

from lmdynamics.sources.pythia import FINAL_STEP as PYTHIA_FINAL_STEP
from lmdynamics.sources.pythia import INTERVAL as PYTHIA_INTERVAL
from lmdynamics.sources.pythia import LOG_UNTIL as PYTHIA_LOG_UNTIL


def _powers_of_two_until(limit: int) -> list[int]:
    steps, s = [], 1
    while s <= limit:
        steps.append(s)
        s *= 2
    return steps


def checkpoint_schedule(final_step: int, log_until: int, interval: int) -> list[int]:
    """Pythia-like checkpoint steps: 0, powers of two up to ``log_until``, then every ``interval``.

    Parameters
    ----------
    final_step : int
        Last training step (number of optimizer updates); always included.
    log_until : int
        Largest log-spaced step; a power of two, at most ``final_step``.
    interval : int
        Spacing (in steps) of the evenly spaced checkpoints after ``log_until``.

    Returns
    -------
    list[int]
        Sorted, unique steps, e.g. ``(512, 64, 64)`` gives
        ``[0, 1, 2, 4, 8, 16, 32, 64, 128, 192, 256, 320, 384, 448, 512]``.
    """
    for name, value in (("final_step", final_step), ("log_until", log_until),
                        ("interval", interval)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r}: must be a positive integer")
    if log_until & (log_until - 1):
        raise ValueError(f"log_until={log_until}: must be a power of two (1, 2, 4, ...)")
    if log_until > final_step:
        raise ValueError(f"log_until={log_until}: must be at most final_step={final_step}")
    steps = [0, *_powers_of_two_until(log_until)]
    steps.extend(range(log_until + interval, final_step, interval))
    steps.append(final_step)
    return sorted(set(steps))


def pythia_schedule() -> list[int]:
    """The 154 step revisions Pythia publishes: 0, 1, 2, ..., 512, 1000, 2000, ..., 143000.

    Unlike :func:`checkpoint_schedule` the evenly spaced part starts at ``interval`` (1000),
    not at ``log_until + interval``.
    """
    steps = [0, *_powers_of_two_until(PYTHIA_LOG_UNTIL)]
    steps.extend(range(PYTHIA_INTERVAL, PYTHIA_FINAL_STEP + 1, PYTHIA_INTERVAL))
    return steps


def nearest_step(steps: list[int], target: float) -> int:
    """The step of ``steps`` closest to ``target``; ties go to the later step."""
    if not steps:
        raise ValueError("steps is empty")
    return min(steps, key=lambda s: (abs(s - target), -s))

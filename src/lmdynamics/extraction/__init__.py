"""Per-checkpoint extraction (torch): forward/backward passes, losses, the paper code's
gradient protocol and the Conjecture statistics, written to one store per (size, step).

Rule: ``workflow/rules/extract.smk``. Imports :mod:`lmdynamics.sources` and
:mod:`lmdynamics.estimators`; with :mod:`lmdynamics.sources.tiny` and
:mod:`lmdynamics.sources.checkpoints` the only torch users.
"""

"""Reductions of the per-checkpoint stores: per-size and cross-size metrics datasets
(CKA, PER, flags), the checkpoint audit and the Conjecture statistics.

Rules: ``workflow/rules/reduce.smk``, ``audit.smk``, ``conjecture.smk``. No torch.
"""

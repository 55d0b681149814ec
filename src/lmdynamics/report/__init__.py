"""What a reader sees: the plot style, the paper's figures, the CKA and Conjecture figures,
Table 1 and its sensitivity figure.

Rules: ``workflow/rules/figures.smk``, ``conjecture.smk``. No torch.
"""

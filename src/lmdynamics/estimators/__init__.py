"""Estimators: linear CKA (biased and debiased), effective rank and PER, bootstrap
intervals, power-law fits and the Matthews correlation.

Pure numpy, no I/O and no torch: every stage may import them.
"""

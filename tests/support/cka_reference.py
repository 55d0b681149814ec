"""Independent float64 references for the CKA tests, written from the published formulas.

Gram (n x n) forms only, for small n: they share no code with ``lmdynamics``.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


def hsic_unbiased_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Song et al. (2012), eq. 5: unbiased HSIC from Gram matrices with zeroed diagonals."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    k, lg = x @ x.T, y @ y.T
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(lg, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ lg) + (one @ k @ one) * (one @ lg @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ lg @ one)) / (n * (n - 3)))


def debiased_cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Debiased CKA: unbiased HSIC normalised by the unbiased self-HSICs."""
    return hsic_unbiased_gram(x, y) / math.sqrt(hsic_unbiased_gram(x, x)
                                                * hsic_unbiased_gram(y, y))


def biased_cka_gram(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019): HSIC with the centring matrix H, normalised."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, lg = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * lg) / math.sqrt(np.sum(k * k) * np.sum(lg * lg)))


def weighted_hsic_bruteforce(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """Weighted U-statistic of the HSIC kernel over ordered 4-tuples of distinct samples.

    Kernel ``k_ij l_ij + k_ij l_qr - 2 k_ij l_iq`` (Song et al. 2012); tuple weight
    ``w_i w_j w_q w_r``. With w = 1 it equals :func:`hsic_unbiased_gram`. O(n^4).
    """
    k, lg = x @ x.T, y @ y.T
    num = den = 0.0
    for i, j, q, r in itertools.permutations(range(x.shape[0]), 4):
        weight = w[i] * w[j] * w[q] * w[r]
        if weight:
            num += weight * (k[i, j] * lg[i, j] + k[i, j] * lg[q, r] - 2 * k[i, j] * lg[i, q])
            den += weight
    return num / den


def weighted_biased_hsic(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    """``||Xc' diag(w) Yc||_F^2`` with the data centred at the weighted mean."""
    total = w.sum()
    xc = x - (w @ x) / total
    yc = y - (w @ y) / total
    cross = xc.T @ (w[:, None] * yc)
    return float(np.sum(cross * cross))

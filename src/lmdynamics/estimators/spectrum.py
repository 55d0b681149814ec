"""Power-law fits of singular-value spectra (the Conjecture post's spectrum slopes).
Pure numpy: the extraction fits each checkpoint's spectra, the report draws the fits."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["fit_window", "power_law_fit", "power_law_slope"]


def fit_window(n: int, lo: float, hi: float) -> tuple[int, int]:
    """1-based ranks ``(max(1, ceil(lo n)), floor(hi n))`` of the power-law fit window."""
    return max(1, math.ceil(lo * n)), math.floor(hi * n)


def power_law_fit(singular_values: Any, lo: float = 0.0,
                  hi: float = 0.5) -> tuple[float, float]:
    """Fit ``sigma_k = c k^-alpha`` by least squares of log sigma_k on log k (k = 1-based
    rank) over the ranks of :func:`fit_window`; returns (alpha, log c).

    ``singular_values``: 1-D, descending. The default window is the largest half of the
    spectrum (the tail of the singular-value distribution). NaN with fewer than 3 positive
    values in the window. (For eigenvalues lambda = sigma^2 with density ~ lambda^-a this
    gives a = 1 + 1/(2 alpha).)
    """
    s = np.asarray(singular_values, dtype=np.float64)
    first, last = fit_window(s.size, lo, hi)
    ranks = np.arange(first, last + 1)
    vals = s[first - 1:last]
    keep = np.isfinite(vals) & (vals > 0)
    if keep.sum() < 3:
        return math.nan, math.nan
    slope, intercept = np.polyfit(np.log(ranks[keep]), np.log(vals[keep]), 1)
    return float(-slope), float(intercept)


def power_law_slope(singular_values: Any, lo: float = 0.0, hi: float = 0.5) -> float:
    """The exponent alpha of :func:`power_law_fit`."""
    return power_law_fit(singular_values, lo, hi)[0]

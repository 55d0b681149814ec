"""Sparsity of a matrix's elements: the Gini index and the Hoyer measure, from element
statistics. Pure numpy.

Both are measures of the sparsity of the magnitudes ``c = |x|`` of all N elements of a
matrix, compared by Hurley & Rickard (2009, "Comparing Measures of Sparsity", IEEE Trans.
Inf. Theory 55(10), 4723-4741), who find the Gini index the only one of fifteen measures with
all six of their sparsity properties (Robin Hood, scaling, rising tide, cloning, Bill Gates,
babies). With ``c_(1) <= ... <= c_(N)`` sorted ascending (their eq. for the Gini index and
Hoyer 2004, "Non-negative matrix factorization with sparseness constraints", JMLR 5):

- Gini: ``G = 1 - 2 sum_k (c_(k) / ||c||_1) (N - k + 1/2) / N
  = sum_k (2k - N - 1) c_(k) / (N ||c||_1)``, in [0, 1 - 1/N]: 0 when every magnitude is equal,
  ``1 - 1/N`` for one non-zero element (pico-analyze's ``gini`` metric computes the second
  form);
- Hoyer: ``H = (sqrt(N) - ||c||_1 / ||c||_2) / (sqrt(N) - 1)``, in [0, 1]: 0 when every magnitude
  is equal, 1 for one non-zero element (pico-analyze's ``hoyer``).

Element statistics. The extraction job reduces each matrix, on its device, to the few numbers
these need (:data:`ELEMENT_STATS`, :func:`lmdynamics.extraction.measure_data.
element_statistics`), so no matrix is stored: the count N, ``||c||_1``, ``||c||_2``, ``max |x|``
and the Gini sum ``sum_k (2k - N - 1) c_(k)`` of the sorted magnitudes. The sort is exact (it
permutes the matrix's own values) and the sums accumulate in float64, so G and H are exact up
to float64 rounding of those sums: an absolute error below ``log2(N) * 2.2e-16`` for G (each
term of the Gini sum is at most ``N c_(k)``, so its rounding error is at most that fraction of
``N ||c||_1``), which the reference tests bound at 1e-12. :func:`element_stats` computes the same
numbers in numpy (the reference the extraction's torch version is tested against).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_float64

__all__ = ["ELEMENT_STATS", "element_stats", "element_stats_sorted", "gini", "hoyer", "max_abs"]

#: Entries of the ``element_stat`` dimension of the per-pair stores' ``*_element_stats``.
ELEMENT_STATS: tuple[str, ...] = ("count", "l1", "l2", "max_abs", "gini_sum")


def element_stats(x: Any) -> dict[str, float]:
    """:data:`ELEMENT_STATS` of every element of ``x`` (any shape), float64.

    All NaN but ``count`` when an element is not finite (a diverged matrix has no
    sparsity).
    """
    c = np.sort(np.abs(as_float64(x).reshape(-1)))
    return dict(zip(ELEMENT_STATS, element_stats_sorted(c), strict=True))


def element_stats_sorted(c: np.ndarray) -> np.ndarray:
    """:data:`ELEMENT_STATS` (float64 array, that order) of ascending magnitudes ``c``
    (1-D float64); all but the count NaN when one is not finite."""
    n = c.size
    if n == 0 or not np.isfinite(c).all():
        return np.array([float(n), *[math.nan] * (len(ELEMENT_STATS) - 1)])
    weights = 2.0 * np.arange(1, n + 1, dtype=np.float64) - (n + 1)
    # pairwise summation (numpy's sum), for the error bound of the module docstring
    return np.array([float(n), float(c.sum()), float(np.sqrt(np.sum(c * c))), float(c[-1]),
                     float(np.sum(weights * c))])


def _stat(stats: Mapping[str, float], key: str) -> float:
    return float(stats[key])


def gini(stats: Mapping[str, float]) -> float:
    """Gini index of the magnitudes (module docstring) from :data:`ELEMENT_STATS` values.

    Dimensionless, in [0, 1 - 1/N]. NaN for an all-zero matrix (no magnitude to distribute),
    no elements or non-finite statistics.
    """
    n, l1 = _stat(stats, "count"), _stat(stats, "l1")
    if not (n > 0 and math.isfinite(l1) and l1 > 0):
        return math.nan
    return _stat(stats, "gini_sum") / (n * l1)


def hoyer(stats: Mapping[str, float]) -> float:
    """Hoyer sparsity of the elements (module docstring) from :data:`ELEMENT_STATS` values.

    Dimensionless, in [0, 1]. NaN for an all-zero matrix, fewer than 2 elements or
    non-finite statistics.
    """
    n, l1, l2 = _stat(stats, "count"), _stat(stats, "l1"), _stat(stats, "l2")
    if not (n >= 2 and math.isfinite(l1) and math.isfinite(l2) and l2 > 0):
        return math.nan
    root = math.sqrt(n)
    return (root - l1 / l2) / (root - 1)


def max_abs(stats: Mapping[str, float]) -> float:
    """The largest magnitude ``max |x|`` (the matrix's max norm; pico-analyze's ``norm`` with
    ``inf``). NaN for no elements or non-finite statistics."""
    value = _stat(stats, "max_abs")
    return value if _stat(stats, "count") > 0 and math.isfinite(value) else math.nan

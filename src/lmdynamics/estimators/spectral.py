"""Functions of a matrix's singular values: condition number and matrix norms. Pure numpy.

Every function takes a 1-D array of the singular values of one matrix (non-negative, any
order; numpy array or torch tensor, cast to float64) and returns a float. Undefined values
are NaN, never an exception or a warning (callers know the size, step and layer):
empty, all-zero or non-finite spectra, and condition numbers the spectrum cannot resolve.

- spectral norm ``||A||_2 = sigma_max``; nuclear norm ``||A||_* = sum sigma_i``; Frobenius
  norm ``||A||_F = sqrt(sum sigma_i^2)`` (Golub & Van Loan 2013, "Matrix Computations",
  4th ed., sections 2.3 and 2.4);
- condition number ``kappa_2(A) = sigma_max / sigma_min`` over the ``min(m, n)`` singular
  values of an m x n matrix (Golub & Van Loan 2013, 2.6.2), what pico-analyze's
  ``condition_number`` metric computes (``max(S) / min(S)`` of ``torch.svd``).

Resolution of the condition number. The workflow's stored spectra come from the eigenvalues
of the float64 Gram matrix of the smaller side (:func:`lmdynamics.extraction.spectra.
singular_values`): an eigenvalue errs by about ``eps * sigma_max^2`` (eps = 2.2e-16), so
``sigma_min`` errs relatively by about ``eps * kappa^2 / 2``: 1e-12 at kappa = 1e2, 1e-8 at 1e4,
1e-4 at 1e6 (measured on matrices of prescribed spectrum: 5e-13, 4e-9, 3e-5), and beyond
``1 / sqrt(eps)`` = 6.7e7 the smallest value is rounding noise. A condition number above
:data:`CONDITION_LIMIT` (1e6) is therefore NaN ("beyond the spectrum's resolution"), never a
number that only reflects rounding; an exactly singular matrix (``sigma_min = 0``) is NaN too.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_float64

__all__ = [
    "CONDITION_LIMIT",
    "condition_number",
    "frobenius_norm",
    "nuclear_norm",
    "spectral_norm",
]

#: Largest condition number reported: beyond it a Gram-route spectrum resolves sigma_min to
#: worse than ~1e-4 relative (module docstring); the value is then NaN.
CONDITION_LIMIT = 1e6


def _spectrum(singular_values: Any) -> np.ndarray | None:
    """The values as float64 1-D, or None when the norms are undefined (empty, non-finite,
    all zero). Raises ValueError for input that is not 1-D or has negative entries."""
    s = as_float64(singular_values)
    if s.ndim != 1:
        raise ValueError(f"singular_values must be 1-D; got shape {s.shape}")
    if s.size == 0 or not np.isfinite(s).all():
        return None
    if s.min() < 0:
        raise ValueError(f"singular values must be non-negative; the smallest is {s.min()!r}")
    return None if s.max() == 0.0 else s


def spectral_norm(singular_values: Any) -> float:
    """``||A||_2``: the largest singular value (same unit as the matrix's entries)."""
    s = _spectrum(singular_values)
    return math.nan if s is None else float(s.max())


def nuclear_norm(singular_values: Any) -> float:
    """``||A||_*``: the sum of the singular values (same unit as the matrix's entries)."""
    s = _spectrum(singular_values)
    return math.nan if s is None else float(s.sum())


def frobenius_norm(singular_values: Any) -> float:
    """``||A||_F = sqrt(sum sigma_i^2)``, scaled by the largest value so nothing overflows."""
    s = _spectrum(singular_values)
    if s is None:
        return math.nan
    top = s.max()
    return float(top * np.sqrt(np.sum((s / top) ** 2)))


def condition_number(singular_values: Any, limit: float = CONDITION_LIMIT) -> float:
    """``sigma_max / sigma_min`` (dimensionless, >= 1) over every given value.

    NaN when undefined (see :func:`spectral_norm`), when ``sigma_min`` is 0, or when the
    ratio exceeds ``limit`` (default :data:`CONDITION_LIMIT`: the resolution of a float64
    Gram-route spectrum; module docstring).
    """
    s = _spectrum(singular_values)
    if s is None:
        return math.nan
    low = s.min()
    if low == 0.0 or s.max() > limit * low:
        return math.nan
    return float(s.max() / low)

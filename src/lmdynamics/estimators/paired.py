"""Tests over paired replicates (seeds): the exact sign-flip test, and the paired t-test's
power and smallest detectable effect. Pure numpy and the standard library.

A paired design gives one difference ``d_s`` per seed (treatment minus control run of the
same seed). Under the null hypothesis that the treatment changes nothing, each ``d_s`` is as
likely to have either sign (the two runs of a seed are exchangeable), so every one of the
``2^n`` sign patterns ``(±d_1, ..., ±d_n)`` is equally likely. The **sign-flip test**'s
two-sided p-value is the fraction of patterns whose mean is at least as far from 0 as the
observed mean (Fisher 1935, "the randomisation test for paired comparisons"). It assumes
only the exchangeability; its smallest possible value is ``2 / 2^n`` (the observed pattern
and its mirror image), so ``n`` seeds can never give ``p < 2 / 2^n`` however large the
effect (3 seeds: 0.25; 8 seeds: 0.0078; 16 seeds: 3.1e-5).

The **smallest detectable effect** (:func:`minimum_detectable_effect`) is the true mean
difference a two-sided paired t-test at level ``alpha`` detects with probability ``power``
when the differences are normal with standard deviation ``sd``: the exact power of the
t-test (the non-central t distribution, integrated numerically here) solved for the effect.
For normal differences and ``n >= 8`` the sign-flip test's power is close to the t-test's
(tests/estimators/test_paired.py simulates it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EXACT_MAX_N", "SignFlipResult", "minimum_detectable_effect", "paired_t_power",
           "sign_flip_min_p", "sign_flip_test", "student_t_cdf", "student_t_quantile"]

#: Up to this many differences the sign-flip test enumerates every sign pattern (meet in the
#: middle: two halves of at most 2^20 partial sums each); beyond, it samples patterns.
EXACT_MAX_N = 40
#: Sign patterns drawn beyond :data:`EXACT_MAX_N` differences.
SAMPLED_PATTERNS = 200_000
#: Relative tolerance under which two pattern means count as equal (sums of the same
#: numbers in a different order differ by rounding only).
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class SignFlipResult:
    """``p_value``: two-sided; ``n``: differences used; ``mean``: their mean; ``patterns``:
    sign patterns counted (``2^n`` when ``exact``, else the number sampled); ``min_p``: the
    smallest p-value ``n`` differences can give (:func:`sign_flip_min_p`)."""

    p_value: float
    n: int
    mean: float
    patterns: int
    exact: bool
    min_p: float


def sign_flip_min_p(n: int) -> float:
    """The smallest two-sided p-value of the sign-flip test over ``n`` differences:
    ``2 / 2^n`` (1 for ``n <= 1``)."""
    return 1.0 if n <= 1 else min(1.0, 2.0 ** (1 - n))


def _all_sums(d: np.ndarray) -> np.ndarray:
    """Sums ``sum_i s_i d_i`` over all ``2^len(d)`` sign patterns ``s``."""
    sums = np.zeros(1)
    for value in d:
        sums = np.concatenate([sums + value, sums - value])
    return sums


def sign_flip_test(diffs: Any, *, seed: int = 0) -> SignFlipResult:
    """Two-sided sign-flip (paired randomisation) test of mean ``diffs`` = 0.

    Parameters
    ----------
    diffs : 1-D array of float
        One difference per replicate (e.g. treatment - control of one seed), finite.
    seed : int
        Seeds the pattern sample when there are more than :data:`EXACT_MAX_N` differences.

    The p-value is ``#{patterns s : |sum s_i d_i| >= |sum d_i|} / #patterns``, the observed
    pattern included (so ``p >= 2 / 2^n``); equal up to :data:`TIE_TOLERANCE` counts as
    "at least as far". Exact (all ``2^n`` patterns) for ``n <= EXACT_MAX_N``: the sums of the
    two halves' patterns are enumerated, one half sorted, and each sum of the other half
    counts its partners beyond the observed value by binary search. Beyond: ``SAMPLED_PATTERNS``
    random patterns, ``p = (1 + hits) / (1 + samples)``. Raises ValueError for a non-1-D or
    non-finite input; no differences give p = 1.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"diffs must be 1-D; got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("diffs must be finite (leave out replicates without a value)")
    n = d.size
    if n == 0:
        return SignFlipResult(1.0, 0, math.nan, 1, True, 1.0)
    observed = abs(float(d.sum()))
    tol = TIE_TOLERANCE * float(np.abs(d).sum())
    mean = float(d.mean())
    if observed <= tol:  # every pattern is at least as far from 0
        return SignFlipResult(1.0, n, mean, 2 ** n, n <= EXACT_MAX_N, sign_flip_min_p(n))
    bound = observed - tol
    if n <= EXACT_MAX_N:
        left, right = _all_sums(d[: n // 2]), np.sort(_all_sums(d[n // 2:]))
        # partners with left + right >= bound, plus those with left + right <= -bound
        high = right.size - np.searchsorted(right, bound - left, side="left")
        low = np.searchsorted(right, -bound - left, side="right")
        hits = int(high.sum() + low.sum())
        patterns = 2 ** n
        return SignFlipResult(hits / patterns, n, mean, patterns, True, sign_flip_min_p(n))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, SAMPLED_PATTERNS, 10_000):
        signs = rng.choice((-1.0, 1.0), size=(min(10_000, SAMPLED_PATTERNS - start), n))
        hits += int((np.abs(signs @ d) >= bound).sum())
    return SignFlipResult((1 + hits) / (1 + SAMPLED_PATTERNS), n, mean, SAMPLED_PATTERNS,
                          False, sign_flip_min_p(n))


def student_t_cdf(t: float, df: int) -> float:
    """``P(T <= t)`` for Student's t with integer ``df >= 1`` degrees of freedom.

    The closed forms for integer ``df`` (Abramowitz & Stegun 26.7.3 and 26.7.4): with
    ``theta = atan(t / sqrt(df))``, ``P(|T| <= t)`` is ``(2/pi)(theta + sin(theta) sum_k
    a_k cos^(2k+1)(theta))`` for odd ``df`` and ``sin(theta) sum_k b_k cos^(2k)(theta)`` for
    even ``df``, the sums running to ``cos^(df-2)``.
    """
    if not isinstance(df, int | np.integer) or df < 1:
        raise ValueError(f"df={df!r}: must be a positive integer")
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    theta = math.atan(abs(t) / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:
        term, total = math.cos(theta), 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos, (2/3) cos^3, (2*4)/(3*5) cos^5, ...
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        inner = (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    else:
        term, total = 1.0, 0.0
        for k in range(1, df // 2 + 1):  # 1, (1/2) cos^2, (1*3)/(2*4) cos^4, ...
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        inner = s * total
    return 0.5 + 0.5 * inner if t >= 0 else 0.5 - 0.5 * inner


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with integer ``df`` (bisection on
    :func:`student_t_cdf` to 1e-12 relative)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p={p!r}: must lie in (0, 1)")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while student_t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if student_t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)




def _phi(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise (``math.erfc``: numpy has no error function)."""
    scale = -1.0 / math.sqrt(2.0)
    return 0.5 * np.array([math.erfc(v * scale) for v in x.tolist()])


#: Points of the quadrature over the chi distribution in :func:`paired_t_power`.
QUADRATURE_POINTS = 4001


def paired_t_power(effect: float, sd: float, n: int, alpha: float) -> float:
    """Power of the two-sided paired (one-sample) t-test at level ``alpha`` over ``n``
    normal differences of mean ``effect`` and standard deviation ``sd``.

    ``T = (Z + lam) / W`` with ``Z`` standard normal, ``lam = effect sqrt(n) / sd`` and
    ``W = sqrt(V / df)``, ``V`` chi-square with ``df = n - 1``; the test rejects when
    ``|T| > c = t_(1 - alpha/2, df)``. So ``power = E_W[Phi(lam - c W) + Phi(-lam - c W)]``,
    integrated over ``u = sqrt(V)`` (density ``u^(df-1) exp(-u^2/2)`` up to a constant, finite
    at 0) with the trapezoid rule on :data:`QUADRATURE_POINTS` points.
    """
    if n < 2:
        raise ValueError(f"n={n}: the paired t-test needs at least 2 differences")
    if not sd > 0:
        raise ValueError(f"sd={sd!r}: must be positive")
    df = n - 1
    c = student_t_quantile(1.0 - alpha / 2.0, df)
    lam = effect * math.sqrt(n) / sd
    u = np.linspace(0.0, math.sqrt(df) + 12.0, QUADRATURE_POINTS)[1:]
    log_density = (df - 1) * np.log(u) - u * u / 2.0 - ((df / 2.0 - 1.0) * math.log(2.0)
                                                        + math.lgamma(df / 2.0))
    density = np.exp(log_density)
    w = u / math.sqrt(df)
    reject = _phi(lam - c * w) + _phi(-lam - c * w)
    at_zero = math.sqrt(2.0 / math.pi) if df == 1 else 0.0  # density at u = 0; Phi(lam)+Phi(-lam)=1
    return float(np.trapezoid(np.r_[at_zero, reject * density], np.r_[0.0, u]))


def minimum_detectable_effect(sd: float, n: int, *, alpha: float, power: float) -> float:
    """The smallest true mean difference the two-sided paired t-test at level ``alpha``
    detects with probability ``power`` (:func:`paired_t_power`, increasing in the effect,
    solved by regula falsi with the Illinois modification to 1e-9 of ``sd``); same unit as
    ``sd``. NaN for ``n < 2`` or ``sd`` not positive and finite."""
    if n < 2 or not (math.isfinite(sd) and sd > 0):
        return math.nan
    if not 0.0 < alpha < 1.0 or not alpha < power < 1.0:
        raise ValueError(f"alpha={alpha!r}, power={power!r}: need 0 < alpha < power < 1")
    def gap(effect: float) -> float:
        return paired_t_power(effect, sd, n, alpha) - power

    lo, hi = 0.0, sd
    f_lo, f_hi = gap(lo), gap(hi)
    while f_hi < 0:
        lo, f_lo, hi = hi, f_hi, hi * 2.0
        f_hi = gap(hi)
    side = 0
    for _ in range(200):
        mid = hi - f_hi * (hi - lo) / (f_hi - f_lo)
        f_mid = gap(mid)
        if f_mid < 0:
            lo, f_lo = mid, f_mid
            if side == -1:
                f_hi /= 2.0
            side = -1
        else:
            hi, f_hi = mid, f_mid
            if side == 1:
                f_lo /= 2.0
            side = 1
        if hi - lo <= 1e-9 * sd or f_mid == 0:
            break
    return mid

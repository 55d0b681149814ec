"""Matthews correlation of two boolean labelings, why it is undefined, and its exact null.

Undefined values (one-class labels) are NaN, never an exception or a warning.

The null (:func:`relabelling_test`): the items (layers) are relabelled at random, i.e. the
``a`` labels are permuted over the items with the ``b`` labels held fixed, every one of the
``C(n, n_a)`` distinct relabellings equally likely. With both margins fixed the MCC is an
increasing function of the number ``t`` of items in both classes (``MCC = (n t - n_a n_b) /
sqrt(n_a n_b (n - n_a)(n - n_b))``), and ``t`` is hypergeometric: the relabellings with
``t`` joint items number ``C(n_b, t) C(n - n_b, n_a - t)``. Counting them is the complete
enumeration of the relabellings (one-sided, this is Fisher's exact test), in exact integer
arithmetic for any number of items; nothing is sampled. Several independent labelings
(seed replicates) are combined by the exact stratified test of Agresti, *Categorical Data
Analysis* (3rd ed., section 6.7.5, "exact test of conditional independence for 2 x 2 x K
tables"): the statistic is the sum of the strata's ``t``, its null distribution the
convolution of their hypergeometric counts (each stratum relabelled independently).
Pure Python integers and numpy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

__all__ = ["ALTERNATIVES", "RelabellingTest", "joint_counts", "matthews_corrcoef",
           "mcc_undefined_reason", "relabelling_test"]

#: ``mcc.alternative``: ``greater`` = P(statistic >= observed) (a positive association);
#: ``two_sided`` = P(|statistic - its null mean| >= |observed - null mean|).
ALTERNATIVES: tuple[str, ...] = ("greater", "two_sided")


def _as_bool_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1); got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _bool_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool_1d(a, "a"), _as_bool_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length; got {a.size} and {b.size}")
    return a, b


def matthews_corrcoef(a: Any, b: Any) -> float:
    """Matthews correlation (phi coefficient) of two boolean 1-D arrays of equal length.

    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, the same as ``np.corrcoef`` of
    the booleans (the paper's code), in [-1, 1]. NaN when undefined: empty input or either
    variable constant (see :func:`mcc_undefined_reason`). Raises ValueError on a length
    mismatch or non-boolean values.
    """
    a, b = _bool_pair(a, b)
    tp, tn = int(np.sum(a & b)), int(np.sum(~a & ~b))
    fp, fn = int(np.sum(~a & b)), int(np.sum(a & ~b))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)  # exact integer arithmetic
    if denom == 0:
        return math.nan
    return float((tp * tn - fp * fn) / math.sqrt(denom))


def mcc_undefined_reason(a: Any, b: Any, *, a_name: str = "a", b_name: str = "b",
                         item: str = "layer") -> str | None:
    """Short reason why :func:`matthews_corrcoef` of ``a`` and ``b`` is undefined, else None.

    ``a_name``/``b_name`` name the properties the booleans mark and ``item`` what they are
    counted over: ``a_name="early convergence"``, ``b_name="large PER"`` give reasons such as
    "all 6 layers have early convergence" or "no layer has large PER".
    """
    a, b = _bool_pair(a, b)
    if a.size == 0:
        return f"no {item}s to compare"
    for name, x in ((a_name, a), (b_name, b)):
        if x.all():
            return f"all {x.size} {item}s have {name}" if x.size > 1 else f"the {item} has {name}"
        if not x.any():
            return f"no {item} has {name}"
    return None



@dataclass(frozen=True)
class RelabellingTest:
    """An exact relabelling test of one labeling pair or several (strata).

    ``p_value``: P(statistic at least as extreme as observed) over every relabelling;
    ``min_p_value``: the smallest p-value these margins can give (the most extreme outcome's);
    ``n_strata``: the pairs with a defined MCC (the others are left out: their statistic is
    the same under every relabelling); ``n_relabellings``: distinct relabellings counted, the
    product over strata of ``C(n, n_a)``. Without a defined stratum both p-values are NaN.
    """

    p_value: float
    min_p_value: float
    n_strata: int
    n_relabellings: int


def _null_counts(n: int, n_a: int, n_b: int) -> dict[int, int]:
    """Relabellings of ``n_a`` marks among ``n`` items with ``t`` marks on the ``n_b`` others'
    marked items: ``{t: C(n_b, t) C(n - n_b, n_a - t)}``; they sum to ``C(n, n_a)``."""
    low, high = max(0, n_a + n_b - n), min(n_a, n_b)
    return {t: math.comb(n_b, t) * math.comb(n - n_b, n_a - t) for t in range(low, high + 1)}


def _convolve(left: dict[int, int], right: dict[int, int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for s, c in left.items():
        for t, d in right.items():
            out[s + t] = out.get(s + t, 0) + c * d
    return out


def joint_counts(a: Any, b: Any) -> tuple[int, int, int, int]:
    """``(n, n_a, n_b, t)`` of two boolean 1-D arrays: items, items marked in ``a``, in ``b``,
    in both (the 2 x 2 table's margins and joint cell, what :func:`relabelling_test` reads)."""
    a, b = _bool_pair(a, b)
    return int(a.size), int(a.sum()), int(b.sum()), int(np.sum(a & b))


def relabelling_test(tables: Sequence[tuple[int, int, int, int]],
                     alternative: str) -> RelabellingTest:
    """Exact test of association under random relabelling, from 2 x 2 tables.

    ``tables``: one ``(n, n_a, n_b, t)`` per stratum (:func:`joint_counts`; one Table 1 cell
    per seed): items, marked in ``a``, marked in ``b``, marked in both. The statistic is the
    sum over strata of ``t``; for one stratum its tail is the MCC's (see the module
    docstring). ``alternative``: :data:`ALTERNATIVES`. Strata whose MCC is undefined (a
    one-class margin) are left out; p-values are exact rationals rounded once to float.
    Raises ValueError on counts no labeling has.

    >>> t = relabelling_test([joint_counts([1, 0, 0, 0], [1, 0, 0, 0])], "greater")
    >>> t.p_value, t.min_p_value, t.n_relabellings
    (0.25, 0.25, 4)
    """
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative={alternative!r}: allowed {', '.join(ALTERNATIVES)}")
    null: dict[int, int] = {0: 1}
    observed, mean, strata, total = 0, Fraction(0), 0, 1
    for n, n_a, n_b, t in tables:
        if not (0 <= n_a <= n and 0 <= n_b <= n and max(0, n_a + n_b - n) <= t <= min(n_a, n_b)):
            raise ValueError(f"no labeling of {n} items has {n_a} and {n_b} marks with {t} "
                             "in common")
        if n_a in (0, n) or n_b in (0, n):
            continue
        null = _convolve(null, _null_counts(n, n_a, n_b))
        observed += t
        mean += Fraction(n_a * n_b, n)
        strata += 1
        total *= math.comb(n, n_a)
    if strata == 0:
        return RelabellingTest(math.nan, math.nan, 0, 0)

    def tail(s: int) -> Fraction:
        if alternative == "greater":
            hits = sum(c for t, c in null.items() if t >= s)
        else:
            hits = sum(c for t, c in null.items() if abs(t - mean) >= abs(s - mean))
        return Fraction(hits, total)

    return RelabellingTest(float(tail(observed)), float(min(tail(s) for s in null)),
                           strata, total)

"""Matthews correlation of two boolean labelings, and why it is undefined. Pure numpy.

Undefined values (one-class labels) are NaN, never an exception or a warning.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["matthews_corrcoef", "mcc_undefined_reason"]


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


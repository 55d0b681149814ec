"""Array conversions shared by the estimators: float64 numpy views of numpy arrays or torch
tensors, and the "undefined input" test behind every NaN result. Pure numpy, no I/O."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

__all__ = ["as_2d", "as_float64", "undefined"]


def as_float64(x: Any) -> np.ndarray:
    """numpy float64 copy-or-view of a numpy array / torch tensor (any dtype or device).

    torch is not imported here: a tensor can only exist when its caller has imported torch,
    so the estimators stay importable (and fast to import) in jobs without it.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def as_2d(x: Any, name: str) -> np.ndarray:
    """``x`` as a float64 (n samples, d features) array; ValueError naming ``name`` if not 2-D."""
    arr = as_float64(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features); got shape {arr.shape}")
    return arr


def undefined(x: np.ndarray) -> bool:
    """True when ``x`` (n, d) has non-finite entries or zero variance (every row identical).

    Compared exactly, row against row: the centred copy of a constant column such as 0.1 need
    not be exactly zero, so testing the centred matrix for zeros would miss it.
    """
    if x.size == 0 or x.shape[0] < 2 or not np.isfinite(x).all():
        return True
    return bool((x == x[:1]).all())


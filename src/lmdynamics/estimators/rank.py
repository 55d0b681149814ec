"""Effective rank and proportional effective rank (PER) of singular-value spectra, and the
PER of random Gaussian matrices (the baseline of ``per_normalized``). Pure numpy.

Inputs are numpy arrays (or torch tensors, converted by
:func:`lmdynamics.estimators.arrays.as_float64`); every result is computed in float64.
Undefined values (non-finite input, all-zero spectra) are NaN, never an exception or a
warning: callers know the size, step and layer and add that context.
Sources for the choices below: ``shared/notes/reference-facts.md`` (what the paper's code and
pico-analyze do) and ``shared/notes/ecosystem-facts.md`` ("Numerics": what is fast and exact).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_float64

__all__ = [
    "DEFAULT_PER_DIVISOR",
    "PER_DIVISORS",
    "RandomPER",
    "effective_rank",
    "marchenko_pastur_per",
    "per_divisor",
    "proportional_effective_rank",
    "random_gaussian_per",
]

#: Allowed divisors of the proportional effective rank (see :func:`per_divisor`).
PER_DIVISORS: tuple[str, ...] = ("min_dim", "head_dim", "hidden")
#: pico-analyze's choice: divide by the number of singular values, min(m, n).
DEFAULT_PER_DIVISOR = "min_dim"


def effective_rank(singular_values: Any) -> float:
    """Effective rank (Roy & Vetterli 2007) of a 1-D array of non-negative singular values.

    ``p = s / sum(s)``, ``H = -sum(p log p)`` (natural log, 0 log 0 = 0), result ``exp(H)``,
    a real number between 1 and the number of non-zero values. Empty, all-zero or non-finite
    input gives NaN (an all-zero matrix has no defined rank, never 0 or 1). Raises
    ValueError for input that is not 1-D or has negative entries.
    """
    s = as_float64(singular_values)
    if s.ndim != 1:
        raise ValueError(f"singular_values must be 1-D; got shape {s.shape}")
    if s.size == 0 or not np.isfinite(s).all():
        return math.nan
    if s.min() < 0:
        raise ValueError(f"singular values must be non-negative; the smallest is {s.min()!r}")
    top = s.max()
    if top == 0.0:
        return math.nan
    p = s / top  # scale first: the sum of huge values must not overflow
    p /= p.sum()
    p = p[p > 0]  # after dividing: tiny (subnormal) values may underflow to 0
    return float(np.exp(-np.sum(p * np.log(p))))


def proportional_effective_rank(singular_values: Any, divisor: int, *,
                                truncate: bool = True) -> float:
    """Proportional effective rank (PER): effective rank of the top ``divisor`` values / divisor.

    ``singular_values``: 1-D, non-negative. With ``truncate`` (default), as in the paper's
    code (reference-facts, "What the paper's code measured"), the values are sorted
    descending and truncated to the first ``divisor`` before the effective rank, so PER lies
    in (0, 1]. The truncation only acts when ``divisor`` is smaller than the number of
    values: with the default divisor (``min_dim`` = number of singular values) it keeps
    every value; with ``head_dim`` it changes the result (Gaussian 512x2048: 0.966
    untruncated vs 0.999). ``truncate=False`` uses every value (PER may then exceed 1 when
    ``divisor`` is smaller than the effective rank). If ``divisor`` exceeds the number of
    values, all are kept (PER <= count / divisor). Raises ValueError unless ``divisor`` is a
    positive integer. NaN as in :func:`effective_rank`.
    """
    if (isinstance(divisor, bool) or not isinstance(divisor, int | np.integer)
            or divisor <= 0):
        raise ValueError(f"divisor must be a positive integer; got {divisor!r}")
    s = as_float64(singular_values)
    if truncate and s.ndim == 1 and s.size > divisor:
        s = np.sort(s)[::-1][:divisor]
    return effective_rank(s) / int(divisor)


def per_divisor(kind: str, *, n_singular_values: int, hidden_size: int,
                num_attention_heads: int) -> int:
    """The divisor (and truncation) of the proportional effective rank, by name.

    - ``"min_dim"`` (default, pico-analyze): ``n_singular_values`` = min(m, n) of the matrix;
    - ``"head_dim"`` (the paper's code, attention and MLP alike): hidden_size //
      num_attention_heads, e.g. 64 for pythia-70m, 80 for pythia-2.8b;
    - ``"hidden"``: ``hidden_size``.

    Raises ValueError for an unknown ``kind`` (naming the allowed ones, :data:`PER_DIVISORS`)
    or when the resulting divisor is not positive.
    """
    if kind not in PER_DIVISORS:
        raise ValueError(f"unknown PER divisor {kind!r}; allowed: {', '.join(PER_DIVISORS)}")
    if kind == "min_dim":
        value = n_singular_values
    elif kind == "hidden":
        value = hidden_size
    else:
        if num_attention_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive; got {num_attention_heads}")
        value = hidden_size // num_attention_heads
    if int(value) <= 0:
        raise ValueError(f"PER divisor {kind!r} is {value} (n_singular_values="
                         f"{n_singular_values}, hidden_size={hidden_size}, "
                         f"num_attention_heads={num_attention_heads}); it must be positive")
    return int(value)


#: Monte-Carlo draws of :func:`random_gaussian_per`: at least the first, at most the second,
#: else as many as fit in :data:`RANDOM_PER_ELEMENTS` matrix entries (big matrices barely
#: vary: 512 x 2048 has a standard deviation of 1.5e-4 between draws).
RANDOM_PER_SAMPLES: tuple[int, int] = (4, 64)
RANDOM_PER_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RandomPER:
    """PER of an i.i.d. Gaussian matrix: Monte-Carlo ``mean``, its standard error, draws."""

    mean: float
    stderr: float
    samples: int


@functools.cache
def random_gaussian_per(shape: tuple[int, int], divisor: int, *, truncate: bool = True,
                        samples: int | None = None, seed: int = 0) -> RandomPER:
    """Expected PER of an ``shape`` matrix of i.i.d. standard Gaussian entries (the baseline).

    The same definition as :func:`proportional_effective_rank` (``divisor``, ``truncate``),
    averaged over ``samples`` seeded draws (default: :data:`RANDOM_PER_SAMPLES` /
    :data:`RANDOM_PER_ELEMENTS`); singular values by LAPACK in float64. The draws depend only
    on ``(seed, shape)``, and results are cached per argument set, so every layer and step of
    one shape shares one baseline. PER is scale-free, so the entries' variance does not
    matter. Measured: square matrices 0.801 (32), 0.803 (64), 0.804 (512), the large-n limit
    0.805 (:func:`marchenko_pastur_per`); D x 4D 0.966. With ``divisor`` = head dim and
    truncation (the paper's code) a random matrix scores about 0.99.
    """
    m, n = (int(v) for v in shape)
    if m <= 0 or n <= 0:
        raise ValueError(f"shape must be positive; got {shape!r}")
    if samples is None:
        low, high = RANDOM_PER_SAMPLES
        samples = max(low, min(high, RANDOM_PER_ELEMENTS // (m * n)))
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate an error; got {samples}")
    rng = np.random.default_rng([int(seed), m, n])
    values = np.array([
        proportional_effective_rank(np.linalg.svd(rng.standard_normal((m, n)),
                                                  compute_uv=False), divisor,
                                    truncate=truncate)
        for _ in range(samples)])
    return RandomPER(mean=float(values.mean()),
                     stderr=float(values.std(ddof=1) / math.sqrt(samples)), samples=samples)


def marchenko_pastur_per(aspect: float, *, nodes: int = 400) -> float:
    """Large-n limit of the untruncated ``min_dim`` PER of a Gaussian matrix, ``aspect`` = m/n.

    With ``aspect`` = min(m, n) / max(m, n) = c in (0, 1], the squared singular values of
    ``X / sqrt(max)`` follow the Marchenko-Pastur law on [(1 - sqrt c)^2, (1 + sqrt c)^2],
    and PER = ER / min(m, n) -> exp(log E[s] - E[s log s] / E[s]) for singular values s.
    Integrated by Gauss-Legendre over the angle x = mid + half-width cos(t), which removes
    the square-root endpoints. c = 1: 0.8050; c = 1/4: 0.9662.
    """
    c = float(aspect)
    if not 0.0 < c <= 1.0:
        raise ValueError(f"aspect must be in (0, 1]; got {aspect!r}")
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    t, w = np.polynomial.legendre.leggauss(nodes)
    t = (t + 1) * (math.pi / 2)  # [-1, 1] -> [0, pi]
    w = w * (math.pi / 2)
    x = (a + b) / 2 + (b - a) / 2 * np.cos(t)
    density = ((b - a) / 2) ** 2 * np.sin(t) ** 2 / (2 * math.pi * c * x)  # f(x) dx/dt
    s = np.sqrt(x)
    mean_s = float(np.sum(w * density * s))
    mean_slogs = float(np.sum(w * density * s * np.log(s)))
    return math.exp(math.log(mean_s) - mean_slogs / mean_s)


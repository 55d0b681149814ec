"""Linear CKA, biased and debiased, per-dimension standardisation and step-by-step (pairwise) CKA.

The biased estimator (Kornblith et al. 2019) is :func:`linear_cka` and
:class:`CKAReference` (first section below). It is
inflated when the number of samples ``n`` is not much larger than the feature dimension: for
two *independent* representations it is about ``d_eff / (n + d_eff)``, ``d_eff`` the
participation ratio of the features (reference-facts, "Known estimator issues"). The debiased
estimator here replaces each HSIC by its unbiased estimator (Song et al. 2012, used for CKA by
Murphy et al. 2024), whose expectation is 0 for independent representations.

Feature-space form
------------------
With ``K = X X^T``, ``L = Y Y^T`` (n x n, never formed), ``K~``/``L~`` the same with the
diagonal zeroed, the unbiased HSIC is

``HSIC_u = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n (n-3))``.

It is invariant to shifting the features, so we centre first (``X'1 = 0``, ``Y'1 = 0``).
With ``a_i = ||x_i||^2`` and ``b_i = ||y_i||^2`` (row norms of the centred data):
``tr(K~L~) = ||X'Y||_F^2 - a'b``, ``1'K~1 = ||X'1||^2 - sum(a) = -sum(a)``, likewise
``1'L~1 = -sum(b)``, and ``1'K~L~1 = (X X'1 - a)'(Y Y'1 - b) = a'b``, hence

``HSIC_u = [||X'Y||_F^2 + sum(a) sum(b) / ((n-1)(n-2)) - n/(n-2) a'b] / (n (n-3))``,

O(n d1 d2) time and O(d1 d2) memory. Debiased CKA = ``HSIC_u(X, Y) / sqrt(HSIC_u(X, X)
HSIC_u(Y, Y))``. HSIC_u is an inner product of U-centred Gram matrices (Szekely & Rizzo 2014),
so ``HSIC_u(X, X) >= 0`` and the debiased CKA lies in [-1, 1]; it is 1 for ``X = Y``.

Every function computes in float64 and returns NaN (no warning) for undefined values: fewer
than 4 samples, zero variance, non-finite input, or a non-positive self-HSIC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_2d, undefined

__all__ = [
    "CKA_ESTIMATORS",
    "CKAReference",
    "centre",
    "linear_cka",
    "linear_cka_to_reference",
    "DebiasedCKAReference",
    "cka_variable",
    "debiased_cka_to_reference",
    "debiased_linear_cka",
    "gram_inner_products",
    "hsic_unbiased",
    "pairwise_cka",
    "standardize",
    "unbiased_hsic_from_terms",
]


# Biased estimator (Kornblith et al. 2019) ------------------------------------------

def centre(x: Any) -> np.ndarray:
    """Subtract column means: ``x - x.mean(axis=0)`` in float64.

    ``x``: numpy array or torch tensor of shape (n samples, d features), any float dtype.
    Returns a new float64 numpy array of shape (n, d) whose columns have mean zero.
    """
    arr = as_2d(x, "x")
    return arr - arr.mean(axis=0, keepdims=True)


@dataclass(frozen=True, eq=False)
class CKAReference:
    """Reference activations for many linear-CKA evaluations against the same matrix.

    Holds the centred reference ``centred`` (n, d2) float64 (read-only) and its self-product
    norm ``self_norm`` = ||Yc^T Yc||_F, computed once, so comparing every training step with
    the final step does not recentre and re-multiply the final step each time.
    ``defined`` is False when the reference has zero variance or non-finite values; every
    CKA against it is then NaN. Build with :meth:`from_activations`.
    """

    centred: np.ndarray
    self_norm: float
    defined: bool

    @classmethod
    def from_activations(cls, y: Any) -> CKAReference:
        """Centre ``y`` (n, d2) (numpy or torch, any float dtype) and compute ||Yc^T Yc||_F."""
        arr = as_2d(y, "y")
        defined = not undefined(arr)
        with np.errstate(all="ignore"):  # inf - inf when undefined: NaN, reported as NaN CKA
            yc = arr - arr.mean(axis=0, keepdims=True)
        norm = float(np.linalg.norm(yc.T @ yc)) if defined else math.nan
        yc.setflags(write=False)
        return cls(centred=yc, self_norm=norm, defined=defined and norm > 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (n samples, d2 features) of the reference activations."""
        return self.centred.shape  # type: ignore[return-value]


def linear_cka_to_reference(x: Any, ref: CKAReference) -> float:
    """Linear CKA of activations ``x`` (n, d1) against a precomputed :class:`CKAReference`.

    Same value as ``linear_cka(x, y)`` for ``ref = CKAReference.from_activations(y)`` (that
    function is this one). Raises ValueError if ``x`` is not 2-D or its n differs from the
    reference's; returns NaN when either side has zero variance or non-finite values.
    """
    arr = as_2d(x, "x")
    if arr.shape[0] != ref.shape[0]:
        raise ValueError(f"linear CKA needs the same number of samples (rows): x has shape "
                         f"{arr.shape}, y has shape {ref.shape}")
    if not ref.defined or undefined(arr):
        return math.nan
    xc = arr - arr.mean(axis=0, keepdims=True)
    x_norm = float(np.linalg.norm(xc.T @ xc))
    if x_norm == 0.0:
        return math.nan
    cross = ref.centred.T @ xc  # (d2, d1): feature-space form, memory O(d1 d2), never O(n^2)
    return float(np.vdot(cross, cross) / (x_norm * ref.self_norm))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA (Kornblith et al. 2019), biased HSIC estimator, in feature-space form.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` the
    column-centred inputs. ``x``: (n, d1), ``y``: (n, d2), numpy arrays or torch tensors of
    any float dtype (float16/bfloat16/float32/float64); everything is cast to float64 and
    centred before any product. Dimensionless, in [0, 1]. The biased estimator is inflated
    when n is not much larger than d (reference-facts: "Known estimator issues").

    Returns NaN (no warning) when either input has zero variance (all columns constant) or
    non-finite values; raises ValueError when the inputs are not 2-D or differ in n.
    """
    arr = as_2d(x, "x")
    other = as_2d(y, "y")
    if arr.shape[0] != other.shape[0]:
        raise ValueError(f"linear CKA needs the same number of samples (rows): x has shape "
                         f"{arr.shape}, y has shape {other.shape}")
    return linear_cka_to_reference(arr, CKAReference.from_activations(other))


# Debiased estimator -----------------------------------------------------------------

#: Estimators stored by the reductions; ``metrics.cka_estimator`` picks the one figures use.
CKA_ESTIMATORS: tuple[str, ...] = ("biased", "debiased")
#: The debiased estimator needs n >= 4 samples (its normalisation is n (n-3)).
MIN_SAMPLES_DEBIASED = 4


def cka_variable(estimator: str, *, standardized: bool = False) -> str:
    """Name of the metrics variable holding ``estimator``'s CKA vs the final step.

    ``"biased"`` -> ``cka``, ``"debiased"`` -> ``cka_debiased``; ``standardized`` appends
    ``_standardized``. Raises ValueError naming the allowed estimators.
    """
    if estimator not in CKA_ESTIMATORS:
        raise ValueError(f"unknown CKA estimator {estimator!r}; allowed: "
                         f"{', '.join(CKA_ESTIMATORS)}")
    name = "cka" if estimator == "biased" else "cka_debiased"
    return name + ("_standardized" if standardized else "")


def unbiased_hsic_from_terms(cross_sq: Any, sum_a: Any, sum_b: Any, a_dot_b: Any,
                             n: int) -> Any:
    """Unbiased HSIC of centred data from its feature-space terms (see the module docstring).

    ``cross_sq`` = ||X'Y||_F^2, ``sum_a`` = sum_i ||x_i||^2, ``sum_b`` = sum_i ||y_i||^2,
    ``a_dot_b`` = sum_i ||x_i||^2 ||y_i||^2, all of column-centred data; scalars or
    broadcastable float64 arrays. ``n`` >= 4 samples. Units: (feature units)^4, like HSIC.
    """
    if n < MIN_SAMPLES_DEBIASED:
        raise ValueError(f"the unbiased HSIC needs n >= {MIN_SAMPLES_DEBIASED} samples; got {n}")
    return (cross_sq + sum_a * sum_b / ((n - 1) * (n - 2)) - n / (n - 2) * a_dot_b) / (
        n * (n - 3))


def _centred(x: Any, name: str, overwrite: bool = False) -> tuple[np.ndarray, bool]:
    """Column-centred float64 copy of ``x`` (n, d) and whether it has finite variance.

    The flag is False for non-finite values, zero variance or a single sample (the
    biased CKA's conditions); the debiased estimator also needs n >= 4. ``overwrite``:
    centre a writeable float64 numpy ``x`` in place and return it (no copy).
    """
    arr = as_2d(x, name)
    defined = not undefined(arr)
    with np.errstate(all="ignore"):  # inf - inf when undefined: NaN, reported as NaN CKA
        mean = arr.mean(axis=0, keepdims=True)
        if overwrite and arr is x and arr.flags.writeable:
            arr -= mean
            return arr, defined
        return arr - mean, defined


def _same_n(x: np.ndarray, y: tuple[int, int] | np.ndarray) -> None:
    shape = y if isinstance(y, tuple) else y.shape
    if x.shape[0] != shape[0]:
        raise ValueError(f"CKA needs the same number of samples (rows): x has shape "
                         f"{x.shape}, y has shape {tuple(shape)}")


def hsic_unbiased(x: Any, y: Any) -> float:
    """Unbiased HSIC (Song et al. 2012) of ``x`` (n, d1) and ``y`` (n, d2), linear kernels.

    Feature-space form, float64, O(n d1 d2); never forms an n x n matrix. 0 for constant
    input; NaN for fewer than 4 samples or non-finite input; ValueError when n differs.
    """
    xc, _ = _centred(x, "x")
    yc, _ = _centred(y, "y")
    _same_n(xc, yc)
    n = xc.shape[0]
    if n < MIN_SAMPLES_DEBIASED or not (np.isfinite(xc).all() and np.isfinite(yc).all()):
        return math.nan
    a, b = np.einsum("ij,ij->i", xc, xc), np.einsum("ij,ij->i", yc, yc)
    cross = xc.T @ yc
    return float(unbiased_hsic_from_terms(np.vdot(cross, cross), a.sum(), b.sum(), a @ b, n))


@dataclass(frozen=True, eq=False)
class DebiasedCKAReference:
    """Reference activations for many debiased-CKA evaluations against the same matrix.

    Holds the centred reference ``centred`` (n, d2) float64 (read-only), its squared row
    norms ``row_sq`` (n,), their sum ``row_sq_sum`` and its unbiased self-HSIC
    ``self_hsic``, computed once. ``defined`` is False when the reference has zero
    variance, non-finite values, fewer than 4 samples or a non-positive self-HSIC; every
    CKA against it is then NaN. Build with :meth:`from_activations`.
    """

    centred: np.ndarray
    row_sq: np.ndarray
    row_sq_sum: float
    self_hsic: float
    defined: bool

    @classmethod
    def from_activations(cls, y: Any) -> DebiasedCKAReference:
        """Centre ``y`` (n, d2) (numpy or torch, any float dtype) and compute its terms."""
        yc, defined = _centred(y, "y")
        defined = defined and yc.shape[0] >= MIN_SAMPLES_DEBIASED
        if defined:
            b = np.einsum("ij,ij->i", yc, yc)
            gram = yc.T @ yc
            self_hsic = float(unbiased_hsic_from_terms(np.vdot(gram, gram), b.sum(), b.sum(),
                                                       b @ b, yc.shape[0]))
        else:
            b, self_hsic = np.full(yc.shape[0], math.nan), math.nan
        for arr in (yc, b):
            arr.setflags(write=False)
        return cls(centred=yc, row_sq=b, row_sq_sum=float(b.sum()), self_hsic=self_hsic,
                   defined=defined and self_hsic > 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (n samples, d2 features) of the reference activations."""
        return self.centred.shape  # type: ignore[return-value]


def debiased_cka_to_reference(x: Any, ref: DebiasedCKAReference) -> float:
    """Debiased linear CKA of ``x`` (n, d1) against a precomputed reference (see module doc).

    Same value as ``debiased_linear_cka(x, y)`` for ``ref =
    DebiasedCKAReference.from_activations(y)``. Dimensionless, in [-1, 1]; about 0 for
    independent representations. Raises ValueError if ``x`` is not 2-D or its n differs;
    NaN when undefined (zero variance, non-finite, n < 4, non-positive self-HSIC).
    """
    xc, defined = _centred(x, "x")
    _same_n(xc, ref.shape)
    if not (defined and ref.defined):  # ref.defined implies n >= 4
        return math.nan
    n = xc.shape[0]
    a = np.einsum("ij,ij->i", xc, xc)
    gram = xc.T @ xc
    self_x = unbiased_hsic_from_terms(np.vdot(gram, gram), a.sum(), a.sum(), a @ a, n)
    if not self_x > 0.0:
        return math.nan
    cross = ref.centred.T @ xc  # (d2, d1)
    hsic = unbiased_hsic_from_terms(np.vdot(cross, cross), a.sum(), ref.row_sq_sum,
                                    a @ ref.row_sq, n)
    return float(hsic / math.sqrt(self_x * ref.self_hsic))


def debiased_linear_cka(x: Any, y: Any) -> float:
    """Debiased linear CKA (unbiased HSIC; Song et al. 2012, Murphy et al. 2024).

    ``x``: (n, d1), ``y``: (n, d2), numpy arrays or torch tensors of any float dtype, cast to
    float64 and centred before any product; feature-space form, O(n d1 d2), no n x n matrix.
    Dimensionless, in [-1, 1], 1 for ``x = y``, about 0 (not ``d_eff / (n + d_eff)``) for
    independent inputs. NaN (no warning) when undefined; ValueError when n differs.
    """
    other = as_2d(y, "y")
    _same_n(as_2d(x, "x"), other)
    return debiased_cka_to_reference(x, DebiasedCKAReference.from_activations(other))


def standardize(x: Any) -> np.ndarray:
    """Per-dimension standardisation: centre each column and divide by its standard deviation.

    ``x``: (n, d), any float dtype; returns float64 (n, d) with column means 0 and standard
    deviations 1 (population, ddof=0). Columns with zero variance become 0 (they carry no
    signal for centred CKA). Non-finite input stays non-finite (the CKA is then NaN). Linear
    CKA is dominated by a few outlier dimensions in these models (Davari et al. 2022):
    standardising weighs every dimension equally.
    """
    arr = as_2d(x, "x")
    with np.errstate(all="ignore"):
        xc = arr - arr.mean(axis=0, keepdims=True)
        std = np.sqrt(np.mean(xc * xc, axis=0))
        return np.where(std > 0, xc / np.where(std > 0, std, 1.0), 0.0)


# ------------------------------------------------------------------ every step vs every step

#: Elements (float64) of the Gram route's buffer of S (n, block) slices of X X^T: 128 MiB.
_GRAM_BLOCK_ELEMENTS = 1 << 24


def gram_inner_products(xs: Sequence[np.ndarray]) -> np.ndarray:
    """(S, S) float64 matrix ``P[s, t] = ||X_s' X_t||_F^2 = <X_s X_s', X_t X_t'>_F``.

    ``xs``: S float64 arrays (n, d_s) with the same n (centre them first). Picks the
    cheaper route: feature space (``X_s' X_t`` per pair, ~n d^2 per pair) or Gram space
    (column blocks of the upper triangle of ``X_s X_s'``, ~n^2 d / 2 per step plus n^2 / 2
    per pair; the S slices of one block together hold at most :data:`_GRAM_BLOCK_ELEMENTS`
    elements, or one row of blocks when n x S exceeds it). Both give the same numbers.
    """
    xs = [np.asarray(x, dtype=np.float64) for x in xs]
    if not xs:
        return np.zeros((0, 0))
    n = xs[0].shape[0]
    for x in xs:
        _same_n(xs[0], x)
    s = len(xs)
    dims = np.array([x.shape[1] for x in xs], dtype=float)
    feature_cost = n * float(np.sum(np.outer(dims, dims))) / 2
    gram_cost = (n * n * float(dims.sum()) + n * n * s * (s + 1) / 2) / 2
    if feature_cost <= gram_cost:
        return _inner_products_feature(xs)
    return _inner_products_gram(xs)


def _inner_products_feature(xs: list[np.ndarray]) -> np.ndarray:
    s = len(xs)
    out = np.empty((s, s))
    for i in range(s):
        for j in range(i, s):
            cross = xs[i].T @ xs[j]
            out[i, j] = out[j, i] = np.vdot(cross, cross)
    return out


def _inner_products_gram(xs: list[np.ndarray]) -> np.ndarray:
    """Gram route over the upper triangle only: ``<K_s, K_t>`` sums the diagonal blocks of
    ``K = X X'`` once and the blocks off them twice (K is symmetric), so each block of
    columns multiplies against the rows from its own start on: half the ``n^2 d`` of full
    blocks.

    Per block the S slices ``X_s[start:] X_s[block]'`` (the taller operand first, which
    BLAS runs faster) are written into one buffer allocated once, and their inner products
    taken with one symmetric product ``V V'`` (BLAS syrk) of the whole slices, which counts
    the diagonal blocks (their first rows) once too many: ``2 V V' - D D'``."""
    n, s = xs[0].shape[0], len(xs)
    rows = min(n, max(1, _GRAM_BLOCK_ELEMENTS // max(1, n * s)))
    out = np.zeros((s, s))
    slices = np.empty(s * rows * n)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h, w = stop - start, n - start
        blocks = slices[:s * w * h].reshape(s, w, h)
        for x, block in zip(xs, blocks, strict=True):
            np.matmul(x[start:], x[start:stop].T, out=block)
        whole = blocks.reshape(s, w * h)
        diag = whole[:, :h * h]  # each slice's first h rows: its diagonal block
        out += 2.0 * (whole @ whole.T) - diag @ diag.T
    return out


def pairwise_cka(xs: Sequence[Any], *, overwrite: bool = False
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Biased and debiased linear CKA of every step against every step.

    ``xs``: S activation matrices (n, d_s) of the same n samples (e.g. one layer at every
    checkpoint), any float dtype; with ``overwrite``, float64 numpy ones are centred in
    place (a copy fewer per step; CKA is shift-invariant, so reusing them is safe).
    Returns two symmetric (S, S) float64 arrays, biased and
    debiased, with 1 on the diagonal; rows and columns of undefined inputs (zero variance,
    non-finite, n < 4 for the debiased one) are NaN. Entry ``[s, t]`` equals
    ``linear_cka(xs[s], xs[t])`` / ``debiased_linear_cka(xs[s], xs[t])``.
    """
    if not xs:
        return np.zeros((0, 0)), np.zeros((0, 0))
    centred, flags = zip(*(_centred(x, f"xs[{i}]", overwrite) for i, x in enumerate(xs)),
                         strict=True)
    ok = np.array(flags, dtype=bool)
    safe = [c if good else np.zeros_like(c) for c, good in zip(centred, ok, strict=True)]
    n = safe[0].shape[0]
    prods = gram_inner_products(safe)
    both_ok = ok[:, None] & ok[None, :]
    with np.errstate(all="ignore"):
        diag = np.diag(prods)
        biased = np.where(both_ok, prods / np.sqrt(np.outer(diag, diag)), np.nan)
        debiased = np.full_like(biased, np.nan)
        if n >= MIN_SAMPLES_DEBIASED:
            row_sq = np.stack([np.einsum("ij,ij->i", c, c) for c in safe])  # (S, n)
            sums = row_sq.sum(axis=1)
            hsic = unbiased_hsic_from_terms(prods, sums[:, None], sums[None, :],
                                            row_sq @ row_sq.T, n)
            self_h = np.where(ok & (np.diag(hsic) > 0), np.diag(hsic), np.nan)
            debiased = hsic / np.sqrt(np.outer(self_h, self_h))
    return biased, debiased

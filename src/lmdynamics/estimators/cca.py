"""Canonical correlations of two activation matrices: SVCCA and PWCCA. Pure numpy, float64.

Both compare two representations ``X`` (n, d1) and ``Y`` (n, d2) of the same n samples
(tokens), through canonical correlation analysis (CCA, Hotelling 1936): the canonical
correlations ``rho_1 >= rho_2 >= ...`` are the cosines of the principal angles between the
column spaces of the centred ``X`` and ``Y``, i.e. the singular values of ``U_x' U_y`` for
orthonormal bases ``U_x``, ``U_y`` of those spaces (Bjorck & Golub 1973). Everything below is
computed from one thin SVD per matrix and one product ``M = U_x' U_y`` per pair
(:class:`CenteredSVD`, :class:`ActivationPair`):

- **SVCCA** (Raghu et al. 2017, "SVCCA: Singular Vector Canonical Correlation Analysis for Deep
  Learning Dynamics and Interpretability", NeurIPS): keep the top singular directions of each
  centred matrix that explain ``variance`` (0.99 in the paper) of its variance (sum of squared
  singular values), then the mean canonical correlation of the two reduced representations.
  The reduced bases are the first ``k`` columns of ``U_x`` and ``U_y`` (singular vectors come
  in order), so their canonical correlations are the singular values of the block
  ``M[:k_x, :k_y]``; the mean is over its ``min(k_x, k_y)`` values. This is what
  google/svcca's tutorial computes (SVD, keep the top directions, then ``cca_core.
  get_cca_similarity`` and the mean of its coefficients).
- **PWCCA** (Morcos, Raghu & Bengio 2018, "Insights on representational similarity in neural
  networks with canonical correlation", NeurIPS, eq. 4 and Sec. 2.2): the mean of the
  canonical correlations weighted by how much of ``X`` each canonical direction accounts for:
  with ``h_i`` the canonical variates of ``X`` (n-vectors, ``h_i = U_x l_i``, ``l_i`` the left
  singular vectors of ``M``) and ``z_j`` the centred activations of ``X``'s unit j,
  ``alpha_i = sum_j |<h_i, z_j>|``, PWCCA = ``sum_i alpha_i rho_i / sum_i alpha_i`` over the
  ``min(r_x, r_y)`` correlations. Since ``X_c = U_x S_x V_x'``,
  ``<h_i, z_j> = (l_i' S_x V_x')_j``: an r x d product. PWCCA is not symmetric: the weights
  are ``X``'s (the first argument; the workflow's step, compared with a reference step, as
  pico-analyze's ``compute_pwcca(source, target)`` weights the source when neither side loses
  units). google/svcca's ``pwcca.py`` (which pico-analyze vendors) orthonormalises
  ``coef_x (X - mean) + mean`` without the whitening ``Sigma_xx^{-1/2}`` and projects the
  uncentred activations, which are not the paper's canonical variates; we follow the paper,
  as the ``repsim`` package does (its ``pwcca`` averages both directions;
  ``tests/estimators/test_cca.py`` checks against it).

Rank. A centred matrix's basis keeps the singular directions with ``sigma_i >
unit_roundoff * ||X||_F``: rounding every stored element to ``unit_roundoff`` (2^-24 for the
float32 activations of the stores) moves each singular value by at most
``unit_roundoff * ||X||_F`` (Weyl's inequality, ``||E||_2 <= ||E||_F``), so smaller ones are
not resolved by the data and would enter CCA as whitened noise. For float64 data the default
threshold is the float64 one.

Shared directions. Canonical correlations equal to 1 (:func:`unit_correlations`) are
directions the two column spaces share exactly. They arise by construction when ``r_x + r_y``
exceeds the number of *distinct* samples less one: too few tokens for the width, or a layer
whose output depends on the token alone (GPT-NeoX's first MLP, with the parallel residual,
reads only the token's embedding, so 96 tokens of 24 distinct bytes leave 23 dimensions for
two 16-wide representations: 9 correlations of 1). SVCCA then averages those 1s in; and
PWCCA's canonical directions within a repeated correlation are any orthonormal basis of its
subspace, and its L1 weights depend on which, so with two or more correlations of 1 PWCCA is
not unique (two correct implementations differ, by 1e-3 in the example). The reduction warns.

Undefined values (fewer than 2 samples, non-finite input, zero variance) are NaN, never an
exception or a warning: callers know the size, step and layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_2d

__all__ = [
    "ActivationPair",
    "CenteredSVD",
    "kept_directions",
    "pwcca",
    "unit_correlations",
    "svcca",
]

#: float64's unit roundoff, the default rank threshold's factor (module docstring, "Rank").
FLOAT64_ROUNDOFF = float(np.finfo(np.float64).eps) / 2


@dataclass(frozen=True, eq=False)
class CenteredSVD:
    """Thin SVD ``X - mean = U S V'`` of one activation matrix (n samples, d units), truncated
    to its resolved rank r (module docstring, "Rank").

    ``u`` (n, r) orthonormal columns, ``s`` (r,) descending, ``vt`` (r, d), all float64
    read-only; ``n`` samples; ``defined`` is False for non-finite input, fewer than 2 samples
    or zero variance (then r = 0). Build with :meth:`from_activations`.
    """

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    n: int
    defined: bool

    @classmethod
    def from_activations(cls, x: Any, unit_roundoff: float | None = None) -> CenteredSVD:
        """Centre ``x`` (n, d) (numpy or torch, any float dtype; cast to float64) and take
        its thin SVD, keeping the directions above ``unit_roundoff * ||x||_F``.
        ``unit_roundoff``: of the precision ``x`` was stored in (default: float32's 2^-24
        for float32 input, else float64's)."""
        if unit_roundoff is None:
            dtype = getattr(x, "dtype", None)
            unit_roundoff = (2.0 ** -24 if str(dtype).endswith("float32")
                             else FLOAT64_ROUNDOFF)
        arr = as_2d(x, "x")
        n, d = arr.shape
        empty = (np.zeros((n, 0)), np.zeros(0), np.zeros((0, d)))
        if n < 2 or d == 0 or not np.isfinite(arr).all():
            return cls(*_frozen(*empty), n=n, defined=False)
        scale = float(np.linalg.norm(arr))
        u, s, vt = np.linalg.svd(arr - arr.mean(axis=0, keepdims=True), full_matrices=False)
        r = int(np.count_nonzero(s > unit_roundoff * scale))
        if r == 0:
            return cls(*_frozen(*empty), n=n, defined=False)
        return cls(*_frozen(u[:, :r], s[:r], vt[:r]), n=n, defined=True)

    @property
    def rank(self) -> int:
        """Resolved rank r of the centred matrix."""
        return int(self.s.size)


def _frozen(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    out = tuple(np.ascontiguousarray(a, dtype=np.float64) for a in arrays)
    for a in out:
        a.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class ActivationPair:
    """Two :class:`CenteredSVD` of the same n samples and ``m = x.u' y.u`` (r_x, r_y): what
    every CCA measure of the pair needs. Build with :meth:`of`; :meth:`reversed` gives the
    pair the other way round (``m'``), sharing the SVD of ``m``."""

    x: CenteredSVD
    y: CenteredSVD
    m: np.ndarray
    _svd: list = field(default_factory=list, repr=False)  # [l, rho, r'] once computed
    _rho: list = field(default_factory=list, repr=False)  # [rho] without vectors

    @classmethod
    def of(cls, x: CenteredSVD, y: CenteredSVD) -> ActivationPair:
        """The pair (x, y); ValueError when they have different numbers of samples."""
        if x.n != y.n:
            raise ValueError(f"CCA needs the same samples: {x.n} and {y.n} rows")
        m = x.u.T @ y.u if x.defined and y.defined else np.zeros((x.rank, y.rank))
        return cls(x, y, m, [])

    @property
    def defined(self) -> bool:
        """Both sides are defined (finite, at least 2 samples, non-zero variance)."""
        return self.x.defined and self.y.defined

    def reversed(self) -> ActivationPair:
        """The pair (y, x); the SVD of ``m`` (if computed) is reused, transposed."""
        rev = ActivationPair(self.y, self.x, self.m.T, [])
        if self._svd:
            left, rho, rt = self._svd
            rev._svd.extend([rt.T, rho, left.T])
        return rev

    def correlations(self) -> np.ndarray:
        """The canonical correlations (descending, clipped to [0, 1]), from :meth:`svd` when
        it was computed, else from the singular values alone."""
        if self._svd:
            return self._svd[1]
        if not self._rho:
            self._rho.append(np.clip(np.linalg.svd(self.m, compute_uv=False), 0.0, 1.0))
        return self._rho[0]

    def svd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(l, rho, r'): the thin SVD of ``m``, the canonical correlations clipped to [0, 1]
        (they exceed 1 only by rounding), computed once."""
        if not self._svd:
            left, rho, rt = np.linalg.svd(self.m, full_matrices=False)
            self._svd.extend([left, np.clip(rho, 0.0, 1.0), rt])
        left, rho, rt = self._svd
        return left, rho, rt


def kept_directions(s: np.ndarray, variance: float) -> int:
    """Number of leading singular values (``s`` descending) whose squares sum to at least
    ``variance`` of the total (SVCCA's truncation; ``variance`` in (0, 1]; 1 keeps all)."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance={variance!r}: allowed a fraction in (0, 1]")
    if s.size == 0:
        return 0
    cum = np.cumsum(s.astype(np.float64) ** 2)
    # the slack keeps variance 1 from losing the last direction to rounding of the sum
    return int(min(s.size, np.searchsorted(cum / cum[-1], variance - 1e-12) + 1))


def svcca(pair: ActivationPair, variance: float = 0.99) -> float:
    """SVCCA similarity of the pair (module docstring): the mean canonical correlation of the
    top directions explaining ``variance`` of each side's variance. Dimensionless, in
    [0, 1], symmetric; NaN when either side is undefined."""
    if not pair.defined:
        return math.nan
    kx, ky = kept_directions(pair.x.s, variance), kept_directions(pair.y.s, variance)
    rho = np.linalg.svd(pair.m[:kx, :ky], compute_uv=False)
    return float(np.mean(np.clip(rho, 0.0, 1.0)))


def pwcca(pair: ActivationPair) -> float:
    """PWCCA of ``pair.x`` against ``pair.y`` (module docstring), weighted by ``x``'s
    projections. Dimensionless, in [0, 1]; NaN when either side is undefined (or every
    weight is 0)."""
    if not pair.defined:
        return math.nan
    left, rho, _ = pair.svd()
    r = rho.size  # min(r_x, r_y)
    coeffs = left[:, :r].T @ (pair.x.s[:, None] * pair.x.vt)  # (r, d): <h_i, z_j>
    alpha = np.abs(coeffs).sum(axis=1)
    total = float(alpha.sum())
    if not total > 0.0:
        return math.nan
    return float(alpha @ rho / total)


#: Canonical correlations within this of 1 count as 1 (:func:`unit_correlations`): shared
#: directions of float32 data come out within 1e-15, others well below 1 - 1e-9.
UNIT_TOLERANCE = 1e-9


def unit_correlations(pair: ActivationPair, tol: float = UNIT_TOLERANCE) -> int:
    """How many canonical correlations of the pair are 1 (within ``tol``): directions the two
    representations share exactly (module docstring, "Shared directions"); 0 when either
    side is undefined."""
    if not pair.defined:
        return 0
    return int(np.count_nonzero(pair.correlations() >= 1.0 - tol))

"""Bootstrap confidence intervals of linear CKA over sequences, from per-sequence partial sums.

Tokens of one sequence are correlated, so we resample *sequences* (groups of tokens) with
replacement, the same resamples for every step, layer and component (seeded). A resample
is a vector of multiplicities ``w_g`` (sum = number of sequences G); token ``i`` of sequence
``g`` gets weight ``w_i = w_g``. Nothing is recomputed from the activations per resample: with
``S_g = X_g' Y_g`` (the per-sequence cross-product), ``M[g, h] = <S_g, S_h>_F`` (G x G),
the per-sequence column sums ``s_g = X_g' 1``, the projections ``P[i, h] = x_i . s_h``
(n x G) and per-sequence sums of row norms, every term below is a weighted sum of these, so a
resample costs O(G^2 + n G) instead of O(n d1 d2).

Biased estimator on the resample (the plug-in, V-statistic: copies of a token are paired with
each other as the biased estimator pairs a token with itself):
``||Xc' W Yc||_F^2 = w'Mw - 2 sum_i w_i (x_i.s_w)(y_i.t_w) / n_w + ||s_w||^2 ||t_w||^2 / n_w^2``
(``t_w`` the same column sums for Y), centred at the resample's weighted mean
(``s_w = sum_g w_g s_g``, ``n_w = sum_i w_i``).

Debiased estimator on the resample: the unbiased HSIC is a U-statistic of order 4, the
average of a shift-invariant kernel ``h`` over ordered 4-tuples of *distinct* samples
(Song et al. 2012: ``h = k_ij l_ij + k_ij l_qr - 2 k_ij l_iq``, symmetrised). On a resample,
copies of one token must not form a tuple (a copy paired with itself is exactly the diagonal
term that makes the biased estimator biased), so we use the weighted U-statistic
``sum over distinct original tokens (i,j,q,r) of w_i w_j w_q w_r h / sum of the same weights``.
Its terms follow by inclusion-exclusion over coinciding indices (derivation in
:func:`_unbiased_numerator`); with all weights 1 it equals the unbiased HSIC exactly.

All sums are float64; the data are centred by their full-sample mean first (the formulas
recentre per resample, the first centring only keeps the numbers small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmdynamics.estimators.arrays import as_2d, undefined

__all__ = [
    "BootstrapReference",
    "GroupedActivations",
    "bootstrap_cka_to_reference",
    "bootstrap_weights",
    "group_products",
    "group_sums",
    "percentile_interval",
    "resampled_hsic",
]

#: Largest number of float64 elements a temporary block may hold (~128 MiB).
BLOCK_ELEMENTS = 1 << 24
#: Resamples evaluated at once.
RESAMPLE_CHUNK = 128


def bootstrap_weights(n_groups: int, samples: int, seed: int) -> np.ndarray:
    """Multiplicities of ``samples`` bootstrap resamples of ``n_groups`` sequences.

    Returns float64 (samples, n_groups): each row counts how often each sequence is drawn
    when ``n_groups`` sequences are drawn with replacement (a multinomial draw), from
    ``numpy.random.default_rng(seed)``: the same seed gives the same resamples.
    """
    if n_groups < 1 or samples < 0:
        raise ValueError(f"bootstrap needs n_groups >= 1 and samples >= 0; got n_groups="
                         f"{n_groups}, samples={samples}")
    rng = np.random.default_rng(seed)
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups),
                           size=samples).astype(np.float64)


def group_sums(a: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Sums over axis 0 of the contiguous row groups of ``a`` (n, ...) starting at ``starts``.

    Shape (G, ...) with G = len(starts); the same numbers as ``np.add.reduceat(a, starts,
    axis=0)`` up to summation order, at a sixteenth of its time on (4096, 512) float64 rows
    (reduceat strides across the rows; a slice's ``sum`` runs along them).
    """
    bounds = np.r_[starts, a.shape[0]]
    return np.stack([a[lo:hi].sum(axis=0) for lo, hi in zip(bounds[:-1], bounds[1:],
                                                              strict=True)])


def _group_layout(groups: Any, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stable order sorting tokens by group, group index per sorted token, group starts."""
    labels = np.asarray(groups)
    if labels.shape != (n,):
        raise ValueError(f"groups must have one label per sample: shape ({n},); got "
                         f"{labels.shape}")
    _, inverse = np.unique(labels, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    token_group = inverse[order]
    starts = np.flatnonzero(np.r_[True, token_group[1:] != token_group[:-1]])
    return order, token_group, starts


@dataclass(frozen=True, eq=False)
class GroupedActivations:
    """One activation matrix, centred, its tokens sorted by group, with per-group sums.

    ``x`` (n, d) float64, rows sorted by group; ``token_group`` (n,) group index of each
    row; ``starts`` (G,) first row of each group; ``counts`` (G,) tokens per group;
    ``row_sq`` (n,) squared row norms; ``row_sq_group`` (G,) their per-group sums;
    ``sums`` (G, d) per-group column sums; ``proj`` (n, G) = ``x @ sums.T``;
    ``sums_gram`` (G, G) = ``sums @ sums.T``; ``order`` (n,) the input row of each sorted
    row. ``defined`` is False for zero variance or non-finite values. Build with
    :meth:`build`, or :meth:`like` for another matrix of the same tokens.
    """

    x: np.ndarray
    order: np.ndarray
    token_group: np.ndarray
    starts: np.ndarray
    counts: np.ndarray
    row_sq: np.ndarray
    row_sq_group: np.ndarray
    sums: np.ndarray
    proj: np.ndarray
    sums_gram: np.ndarray
    defined: bool

    @classmethod
    def build(cls, x: Any, groups: Any) -> GroupedActivations:
        """``x`` (n, d) any float dtype; ``groups`` (n,) labels (e.g. the sequence index)."""
        arr = as_2d(x, "x")
        return cls._from_layout(arr, *_group_layout(groups, arr.shape[0]))

    @classmethod
    def like(cls, x: Any, other: GroupedActivations) -> GroupedActivations:
        """Group ``x`` (n, d) like ``other``: the same tokens in the same input order."""
        arr = as_2d(x, "x")
        if arr.shape[0] != other.x.shape[0]:
            raise ValueError(f"CKA needs the same number of samples (rows): x has shape "
                             f"{arr.shape}, the reference has {other.x.shape}")
        return cls._from_layout(arr, other.order, other.token_group, other.starts)

    @classmethod
    def _from_layout(cls, arr: np.ndarray, order: np.ndarray, token_group: np.ndarray,
                     starts: np.ndarray) -> GroupedActivations:
        defined = not undefined(arr)
        xc = arr - arr.mean(axis=0, keepdims=True) if defined else np.zeros_like(arr)
        if not np.array_equal(order, np.arange(order.size)):  # tokens not already grouped
            xc = xc[order]
        counts = np.diff(np.r_[starts, arr.shape[0]]).astype(np.float64)
        row_sq = np.einsum("ij,ij->i", xc, xc)
        sums = group_sums(xc, starts)
        return cls(x=xc, order=order, token_group=token_group, starts=starts, counts=counts,
                   row_sq=row_sq, row_sq_group=group_sums(row_sq, starts),
                   sums=sums, proj=xc @ sums.T, sums_gram=sums @ sums.T, defined=defined)

    @property
    def n_groups(self) -> int:
        """Number of groups (sequences) G."""
        return int(self.starts.size)


def group_products(x: GroupedActivations, y: GroupedActivations) -> np.ndarray:
    """``M[g, h] = <X_g' Y_g, X_h' Y_h>_F`` (G, G) float64 for two grouped matrices.

    Equivalently the sum of ``(x_i.x_j)(y_i.y_j)`` over tokens i of group g and j of group h.
    Picks the cheaper route: per-group cross-products (~n d1 d2 + G^2 d1 d2) or blocks of
    the Gram matrices (~n^2 (d1 + d2)); temporaries stay under :data:`BLOCK_ELEMENTS`.
    """
    if not np.array_equal(x.token_group, y.token_group):
        raise ValueError("x and y must be grouped alike (the same tokens and sequences)")
    n, d1, d2, g = x.x.shape[0], x.x.shape[1], y.x.shape[1], x.n_groups
    if n * d1 * d2 + g * g * d1 * d2 <= n * n * (d1 + d2 + 1):
        return _products_feature(x, y)
    return _products_gram(x, y)


def _products_feature(x: GroupedActivations, y: GroupedActivations) -> np.ndarray:
    g, d1, d2 = x.n_groups, x.x.shape[1], y.x.shape[1]
    cols = max(1, min(d1, BLOCK_ELEMENTS // max(1, g * d2)))
    bounds = np.r_[x.starts, x.x.shape[0]]
    out = np.zeros((g, g))
    for c0 in range(0, d1, cols):
        block = np.stack([(x.x[a:b, c0:c0 + cols].T @ y.x[a:b]).ravel()
                          for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
        out += block @ block.T
    return out


def _products_gram(x: GroupedActivations, y: GroupedActivations) -> np.ndarray:
    n, g = x.x.shape[0], x.n_groups
    bounds = np.r_[x.starts, n]
    out = np.zeros((g, g))
    g0 = 0
    while g0 < g:  # blocks of whole groups, at least one, under BLOCK_ELEMENTS rows x n
        g1 = g0 + 1
        while g1 < g and (bounds[g1 + 1] - bounds[g0]) * n <= BLOCK_ELEMENTS:
            g1 += 1
        rows = slice(bounds[g0], bounds[g1])
        prod = (x.x[rows] @ x.x.T) * (y.x[rows] @ y.x.T)  # (rows, n)
        by_col = np.add.reduceat(prod, x.starts, axis=1)  # (rows, G)
        out[g0:g1] = np.add.reduceat(by_col, bounds[g0:g1] - bounds[g0], axis=0)
        g0 = g1
    return out


def _wsum(m: np.ndarray, wa: np.ndarray, wb: np.ndarray) -> np.ndarray:
    """Row-wise ``wa[b] @ m @ wb[b]`` for weights (B, G) and m (G, G); shape (B,)."""
    return np.sum((wa @ m) * wb, axis=1)


#: The token-level sums S(p, q, r) = sum_i w_i^p P^q_i Q^r_i the estimators need.
_TOKEN_SUMS = ((1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2))


@dataclass(frozen=True, eq=False)
class _PairTerms:
    """Resample-independent terms of one pair (X, Y); G = number of groups.

    ``m`` (G, G) from :func:`group_products`; ``ab`` (G,) per-group sums of a_i b_i;
    ``a_y`` (G, G) = sum_{i in g} a_i (y_i . t_h); ``b_x`` (G, G) = sum_{i in g} b_i
    (x_i . s_h); ``tensor`` (G, G, G) = sum_{i in g} (x_i . s_h)(y_i . t_k), or None when
    the token-level route is cheaper (many groups of few tokens).
    """

    x: GroupedActivations
    y: GroupedActivations
    m: np.ndarray
    ab: np.ndarray
    a_y: np.ndarray
    b_x: np.ndarray
    tensor: np.ndarray | None

    @classmethod
    def build(cls, x: GroupedActivations, y: GroupedActivations,
              m: np.ndarray) -> _PairTerms:
        n, g = x.x.shape[0], x.n_groups
        tensor = None
        if g**3 <= n * (g + 8) and n * g * g <= BLOCK_ELEMENTS:
            tensor = group_sums(x.proj[:, :, None] * y.proj[:, None, :], x.starts)
        return cls(x=x, y=y, m=m, ab=group_sums(x.row_sq * y.row_sq, x.starts),
                   a_y=group_sums(x.row_sq[:, None] * y.proj, x.starts),
                   b_x=group_sums(y.row_sq[:, None] * x.proj, x.starts),
                   tensor=tensor)

    def token_sums(self, powers: dict[int, np.ndarray]) -> dict[tuple[int, int, int], np.ndarray]:
        """S(p, q, r) = sum_i w_i^p P^q_i Q^r_i (B,) for each (p, q, r) of :data:`_TOKEN_SUMS`.

        ``powers[k]`` = w^k (B, G). With P^q_i = sum_h w_h^q x_i.s_h: through ``tensor``
        (B G^3) or token by token (B n G).
        """
        if self.tensor is not None:
            g = self.tensor.shape[0]
            flat = self.tensor.reshape(g * g, g)  # [(g, h), k]
            by_r = {r: (powers[r] @ flat.T).reshape(-1, g, g) for r in (1, 2)}  # (B, g, h)
            return {(p, q, r): np.sum(np.matmul(powers[p][:, None, :], by_r[r])[:, 0]
                                      * powers[q], axis=1)
                    for p, q, r in _TOKEN_SUMS}
        grp = self.x.token_group
        proj_x, proj_y = {q: powers[q] @ self.x.proj.T for q in (1, 2)}, \
            {r: powers[r] @ self.y.proj.T for r in (1, 2)}
        return {(p, q, r): np.sum(powers[p][:, grp] * proj_x[q] * proj_y[r], axis=1)
                for p, q, r in _TOKEN_SUMS}


def _unbiased_numerator(w: dict[int, np.ndarray], t: _PairTerms,
                        sums: dict[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    """Weighted 4-tuple sum of the unbiased-HSIC kernel over distinct tokens; shape (B,).

    ``w[k]`` = group weights to the power k (B, G); ``t``: the pair's terms; ``sums``:
    :meth:`_PairTerms.token_sums`. With e_ij = k_ij l_ij, E_pq = sum_{i != j} w_i^p w_j^q
    e_ij, P^q_i = sum_j w_j^q k_ij, Q^r_i = sum_j w_j^r l_ij, n_p = sum_i w_i^p:

    - pairs term: sum_{i!=j} w_i w_j e_ij (sum over q != r outside {i, j} of w_q w_r)
      = (n_1^2 - n_2) E_11 - 4 n_1 E_21 + 4 E_31 + 2 E_22;
    - product term: sum over distinct (i, j, q, r) of w.. k_ij l_qr = kappa lambda
      - 4 sum_i w_i^2 (P^1_i - w_i a_i)(Q^1_i - w_i b_i) + 2 E_22 with
      kappa = sum_{i!=j} w_i w_j k_ij (lambda likewise);
    - triple term: sum over distinct (i, j, q) of w_i w_j w_q (n_1 - w_i - w_j - w_q) k_ij l_iq
      = n_1 C_111 - C_211 - C_121 - C_112, where C_pqr = sum_i w_i^p [P^q_i Q^r_i
      - w_i^q a_i Q^r_i - w_i^r b_i P^q_i] - sum_{g,h} w_g^p w_h^(q+r) M_gh
      + 2 sum_g w_g^(p+q+r) ab_g.

    Result: pairs + product - 2 triple. Sums over tokens of w_i^k a_i Q^r_i reduce to
    G x G forms (``a_y``, ``b_x``), so only the four S(p, q, r) are token-level.
    """
    x, y, m, ab = t.x, t.y, t.m, t.ab
    n1 = w[1] @ x.counts

    def e(p: int, q: int) -> np.ndarray:
        return _wsum(m, w[p], w[q]) - w[p + q] @ ab

    e11, e21, e31, e22 = e(1, 1), e(2, 1), e(3, 1), e(2, 2)
    pairs = (n1**2 - w[2] @ x.counts) * e11 - 4 * n1 * e21 + 4 * e31 + 2 * e22
    kappa = _wsum(x.sums_gram, w[1], w[1]) - w[2] @ x.row_sq_group
    lam = _wsum(y.sums_gram, w[1], w[1]) - w[2] @ y.row_sq_group
    shared = sums[2, 1, 1] - _wsum(t.a_y, w[3], w[1]) - _wsum(t.b_x, w[3], w[1]) + w[4] @ ab
    product = kappa * lam - 4 * shared + 2 * e22

    def c(p: int, q: int, r: int) -> np.ndarray:
        return (sums[p, q, r] - _wsum(t.a_y, w[p + q], w[r]) - _wsum(t.b_x, w[p + r], w[q])
                - _wsum(m, w[p], w[q + r]) + 2 * (w[p + q + r] @ ab))

    triple = n1 * c(1, 1, 1) - c(2, 1, 1) - c(1, 2, 1) - c(1, 1, 2)
    return pairs + product - 2 * triple


def resampled_hsic(x: GroupedActivations, y: GroupedActivations, m: np.ndarray,
                   weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Biased and unbiased HSIC numerators of every resample; two float64 arrays (B,).

    ``m`` = :func:`group_products` ``(x, y)``; ``weights`` (B, G) multiplicities (any
    non-negative numbers). Biased: ``||Xc' W Yc||_F^2`` centred at the weighted mean
    (normalise by ``n_w^2``; the normalisation cancels in CKA). Unbiased: the weighted
    U-statistic over distinct tokens, already normalised; NaN when fewer than 4 distinct
    tokens carry weight.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2 or w.shape[1] != x.n_groups or (w < 0).any():
        raise ValueError(f"weights must be non-negative with shape (B, {x.n_groups}); got "
                         f"shape {w.shape}")
    terms = _PairTerms.build(x, y, m)
    biased = np.empty(w.shape[0])
    unbiased = np.empty(w.shape[0])
    for lo in range(0, w.shape[0], RESAMPLE_CHUNK):
        chunk = w[lo:lo + RESAMPLE_CHUNK]
        powers = {k: chunk**k for k in range(1, 5)}
        n1, n2, n3, n4 = (powers[k] @ x.counts for k in range(1, 5))
        sums = terms.token_sums(powers)
        with np.errstate(all="ignore"):
            biased[lo:lo + len(chunk)] = (_wsum(m, chunk, chunk) - 2 * sums[1, 1, 1] / n1
                                          + _wsum(x.sums_gram, chunk, chunk)
                                          * _wsum(y.sums_gram, chunk, chunk) / n1**2)
            d4 = n1**4 - 6 * n1**2 * n2 + 3 * n2**2 + 8 * n1 * n3 - 6 * n4
            u = _unbiased_numerator(powers, terms, sums) / d4
        # d4 = 0 when fewer than 4 distinct tokens carry weight (exactly, for integer counts)
        unbiased[lo:lo + len(chunk)] = np.where(d4 > 1e-12 * n1**4, u, np.nan)
    return biased, unbiased


@dataclass(frozen=True, eq=False)
class BootstrapReference:
    """The reference (final-step) side of bootstrap CKA: grouped activations and self terms.

    ``side``: :class:`GroupedActivations`; ``weights`` (B, G); ``self_biased`` and
    ``self_unbiased`` (B,): the reference's HSIC with itself in every resample.
    """

    side: GroupedActivations
    weights: np.ndarray
    self_biased: np.ndarray
    self_unbiased: np.ndarray

    @classmethod
    def from_activations(cls, y: Any, groups: Any, weights: np.ndarray) -> BootstrapReference:
        """``y`` (n, d2), ``groups`` (n,) sequence labels, ``weights`` (B, G) multiplicities."""
        side = GroupedActivations.build(y, groups)
        biased, unbiased = resampled_hsic(side, side, group_products(side, side), weights)
        return cls(side=side, weights=np.asarray(weights, dtype=np.float64),
                   self_biased=biased, self_unbiased=unbiased)


def bootstrap_cka_to_reference(x: Any, ref: BootstrapReference) -> tuple[np.ndarray, np.ndarray]:
    """Biased and debiased CKA of ``x`` (n, d1) against ``ref`` in every resample.

    ``x`` holds the same tokens, in the same order, as the reference's activations. Returns
    two float64 arrays (B,); a resample where a self-HSIC is not positive (or either input
    has zero variance or non-finite values) gives NaN there.
    """
    side = GroupedActivations.like(x, ref.side)
    nan = np.full(ref.weights.shape[0], np.nan)
    if not (side.defined and ref.side.defined):
        return nan, nan.copy()
    self_b, self_u = resampled_hsic(side, side, group_products(side, side), ref.weights)
    cross_b, cross_u = resampled_hsic(side, ref.side, group_products(side, ref.side),
                                      ref.weights)
    with np.errstate(all="ignore"):
        good_b = (self_b > 0) & (ref.self_biased > 0)
        good_u = (self_u > 0) & (ref.self_unbiased > 0)
        biased = np.where(good_b, cross_b / np.sqrt(self_b * ref.self_biased), np.nan)
        debiased = np.where(good_u, cross_u / np.sqrt(self_u * ref.self_unbiased), np.nan)
    return biased, debiased


def percentile_interval(values: Any, level: float, *,
                        min_finite: float = 0.5) -> tuple[float, float]:
    """Percentile bootstrap interval ``(q[(1-level)/2], q[(1+level)/2])`` of ``values``.

    NaN resamples are ignored; when fewer than ``min_finite`` of them are finite the interval
    is (NaN, NaN). Raises ValueError unless 0 < level < 1.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"bootstrap level {level!r} is outside the allowed range (0, 1)")
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if v.size == 0 or finite.size < min_finite * v.size:
        return math.nan, math.nan
    lo, hi = np.quantile(finite, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)

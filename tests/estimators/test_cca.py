"""SVCCA and PWCCA (lmdynamics.estimators.cca) against peers nobody here wrote.

- ``repsim`` (PyPI, Kisung You; C++/Eigen): its ``pwcca`` is the paper's PWCCA (Morcos et al.
  2018: canonical variates ``U_x L``, weights ``sum_j |<h_i, z_j>|`` over the centred units),
  averaged over both directions; its ``cca(..., "pillai")`` is the mean canonical correlation
  (Pillai's trace over the smaller rank). Agreement: 1e-10 absolute.
- google/svcca's ``cca_core`` algorithm and its SVCCA (Raghu et al. 2017), re-derived from
  their published description in tests/measure_reference.py. Its ``epsilon`` = 1e-10 (added
  to the scaled covariances' diagonals) perturbs a correlation by about epsilon over the
  smallest scaled variance (here > 1e-3): agreement 1e-6 absolute.
"""

from __future__ import annotations

import numpy as np
import pytest
import repsim

from lmdynamics.estimators.cca import (
    ActivationPair,
    CenteredSVD,
    kept_directions,
    pwcca,
    svcca,
    unit_correlations,
)
from support.measure_reference import cca_core_coefficients, svcca_reference

REPSIM_TOL = 1e-10
CCA_CORE_TOL = 1e-6


def correlated(seed: int, n: int, d1: int, d2: int) -> tuple[np.ndarray, np.ndarray]:
    """Two representations of n samples with unequal scales, offsets and shared signal."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, size=d1) + rng.normal(size=d1) * 5
    y = 0.6 * x @ rng.normal(size=(d1, d2)) + rng.normal(size=(n, d2)) * 3 + 2.0
    return x, y


def pair(x: np.ndarray, y: np.ndarray) -> ActivationPair:
    return ActivationPair.of(CenteredSVD.from_activations(x), CenteredSVD.from_activations(y))


@pytest.mark.parametrize("shape", [(200, 10, 12), (500, 40, 30), (300, 20, 20), (64, 5, 40)])
def test_pwcca_matches_repsim_in_both_directions(shape):
    x, y = correlated(sum(shape), *shape)
    p = pair(x, y)
    ours = (pwcca(p) + pwcca(p.reversed())) / 2
    assert ours == pytest.approx(repsim.pwcca([x, y])[0, 1], abs=REPSIM_TOL)
    # reversed() reuses the SVD of M: the same as building the pair the other way round
    assert pwcca(p.reversed()) == pytest.approx(pwcca(pair(y, x)), abs=1e-12)


@pytest.mark.parametrize("shape", [(200, 10, 12), (500, 40, 30), (64, 5, 40)])
def test_untruncated_svcca_is_repsims_mean_canonical_correlation(shape):
    x, y = correlated(7 * sum(shape), *shape)
    assert svcca(pair(x, y), 1.0) == pytest.approx(repsim.cca([x, y], "pillai")[0, 1],
                                                   abs=REPSIM_TOL)


@pytest.mark.parametrize("shape", [(400, 12, 16), (800, 48, 32)])
def test_canonical_correlations_match_google_cca_core(shape):
    x, y = correlated(3 * sum(shape), *shape)
    p = pair(x, y)
    _, rho, _ = p.svd()
    expected = cca_core_coefficients(x.T, y.T, epsilon=1e-10)
    np.testing.assert_allclose(rho, expected[:rho.size], atol=CCA_CORE_TOL)


@pytest.mark.parametrize("shape", [(400, 12, 16), (800, 48, 32), (300, 30, 30)])
def test_svcca_matches_google_svcca(shape):
    x, y = correlated(5 * sum(shape), *shape)
    assert svcca(pair(x, y), 0.99) == pytest.approx(svcca_reference(x, y), abs=CCA_CORE_TOL)
    assert svcca(pair(x, y), 0.5) == pytest.approx(svcca_reference(x, y, 0.5),
                                                   abs=CCA_CORE_TOL)


def test_invariances_symmetry_and_identity():
    x, y = correlated(11, 300, 12, 9)
    rng = np.random.default_rng(0)
    rot, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    base = pair(x, y)
    # SVCCA: invariant to rotations, isotropic scaling and shifts of either side
    assert svcca(pair(3.5 * x @ rot + 7.0, y)) == pytest.approx(svcca(base), abs=1e-12)
    # PWCCA sums |projections| over units: invariant to permuting and flipping units,
    # scaling and shifting, not to rotations
    signs = rng.choice([-1.0, 1.0], size=12)
    moved = pair(3.5 * (x * signs)[:, rng.permutation(12)] + 7.0, y)
    assert pwcca(moved) == pytest.approx(pwcca(base), abs=1e-12)
    # SVCCA is symmetric; PWCCA weights its first argument's side
    assert svcca(pair(y, x)) == pytest.approx(svcca(base), abs=1e-12)
    assert pwcca(pair(x, x)) == pytest.approx(1.0, abs=1e-12)
    assert svcca(pair(x, x)) == pytest.approx(1.0, abs=1e-12)
    # CCA is invariant to any invertible linear map, not only orthogonal ones
    mix = rng.normal(size=(12, 12))
    assert svcca(pair(x @ mix, y), 1.0) == pytest.approx(svcca(base, 1.0), abs=1e-9)


def test_independent_data_is_far_from_one_and_shared_directions_are_counted():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4000, 8)), rng.normal(size=(4000, 8))
    p = pair(x, y)
    assert pwcca(p) < 0.1 and svcca(p) < 0.1
    assert unit_correlations(p) == 0
    # 20 samples, 15 + 15 dimensions in the 19-dimensional space of centred 20-vectors
    assert unit_correlations(pair(rng.normal(size=(20, 15)), rng.normal(size=(20, 15)))) == 11
    # outputs that depend on the token alone: 96 tokens of 24 distinct ids span 23 centred
    # dimensions, so two 16-wide representations share 16 + 16 - 23 = 9 directions
    ids = np.concatenate([np.arange(24), rng.integers(0, 24, size=72)])
    x, y = rng.normal(size=(24, 16))[ids], rng.normal(size=(24, 16))[ids]
    p = pair(x.astype(np.float32), y.astype(np.float32))
    assert unit_correlations(p) == 9
    # and then PWCCA is not unique: its weights depend on the basis of the shared subspace
    _, rho, _ = p.svd()
    assert rho[8] == pytest.approx(1.0, abs=1e-9) and rho[9] < 1 - 1e-3


def test_undefined_inputs_are_nan():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(50, 4))
    constant = np.ones((50, 4))
    bad = x.copy()
    bad[3, 1] = np.nan
    for other in (constant, bad, x[:1]):
        if other.shape[0] != x.shape[0]:
            with pytest.raises(ValueError, match="same samples"):
                pair(x, other)
            continue
        assert np.isnan(pwcca(pair(x, other))) and np.isnan(svcca(pair(other, x)))


def test_rank_threshold_drops_directions_below_the_stored_precision():
    """A float32 matrix whose last column repeats the first up to 1e-9: that difference is
    below float32's resolution of the data, so the basis has 3 directions, not 4."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(100, 4))
    x[:, 3] = x[:, 0] + 1e-9 * rng.normal(size=100)
    assert CenteredSVD.from_activations(x).rank == 4  # float64 resolves it
    assert CenteredSVD.from_activations(x.astype(np.float32)).rank == 3


def test_kept_directions():
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert kept_directions(s, 1.0) == 3  # the zero direction explains nothing
    assert kept_directions(s, 9 / 14) == 1 and kept_directions(s, 0.65) == 2
    with pytest.raises(ValueError):
        kept_directions(s, 0.0)

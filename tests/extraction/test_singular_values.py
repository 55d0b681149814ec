"""The Gram route of ``lmdynamics.extraction.spectra.singular_values`` against SVD in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdynamics.estimators.rank import effective_rank
from lmdynamics.extraction.spectra import singular_values


@pytest.mark.parametrize("shape", [(64, 256), (256, 64), (1, 7), (7, 1)])
def test_gram_route_matches_svd_within_1e_10(shape):
    g = np.random.default_rng(sum(shape)).normal(size=shape)
    expected = np.linalg.svd(g, compute_uv=False)
    got = singular_values(g)
    assert got.dtype == np.float64 and got.shape == (min(shape),)
    # a well-conditioned (1:4) Gaussian matrix: every value within 1e-10 relative to itself
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=0)
    np.testing.assert_allclose(got, torch.linalg.svdvals(torch.from_numpy(g)).numpy(),
                               rtol=1e-10, atol=0)


def test_square_gaussian_within_1e_10_of_the_largest_value():
    g = np.random.default_rng(3).normal(size=(96, 96))  # smallest values near 0
    expected = torch.linalg.svdvals(torch.from_numpy(g)).numpy()
    assert np.max(np.abs(singular_values(g) - expected)) <= 1e-10 * expected[0]


def test_ill_conditioned_matrix_loses_only_values_below_sqrt_eps():
    """Eigenvalue errors are ~eps * max^2, so a value s errs by ~eps * max^2 / (2 s): within
    1e-10 * max down to ~1e-6 * max, and never more than ~sqrt(eps) * max (1.5e-8) below."""
    rng = np.random.default_rng(1)
    u, _ = np.linalg.qr(rng.normal(size=(48, 48)))
    v, _ = np.linalg.qr(rng.normal(size=(160, 48)))
    s = np.logspace(0, -12, 48)
    got = singular_values((u * s) @ v.T)
    assert np.all(np.diff(got) <= 0)
    err = np.abs(got - s)
    assert np.max(err[s >= 1e-6]) <= 1e-10 * s[0]
    assert np.max(err) <= 1e-7 * s[0]
    # 12 decades: 15 values near 1e-8 instead of 1e-9..1e-12 move the effective rank 2.5e-7
    assert effective_rank(got) == pytest.approx(effective_rank(s), rel=1e-6)


def test_stack_is_the_same_as_one_by_one_and_nan_marks_only_the_bad_matrix():
    rng = np.random.default_rng(2)
    stack = torch.from_numpy(rng.normal(size=(3, 32, 128))).float()
    stack[1, 4, 5] = float("nan")
    got = singular_values(stack)
    assert got.shape == (3, 32)
    assert np.isnan(got[1]).all()
    for i in (0, 2):
        np.testing.assert_allclose(got[i], singular_values(stack[i]), rtol=1e-12)
        np.testing.assert_allclose(got[i], np.linalg.svd(stack[i].double().numpy(),
                                                         compute_uv=False), rtol=1e-10)


def test_inf_zero_and_bad_rank():
    assert np.isnan(singular_values(np.array([[1.0, np.inf], [0.0, 1.0]]))).all()
    np.testing.assert_array_equal(singular_values(np.zeros((3, 5))), np.zeros(3))
    assert singular_values(np.zeros((0, 4))).shape == (0,)
    with pytest.raises(ValueError, match="2-D"):
        singular_values(np.ones(4))

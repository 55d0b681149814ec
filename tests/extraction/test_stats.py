"""Tests of lmdynamics.extraction.stats against direct float64 numpy computations on small
inputs."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from lmdynamics.estimators.spectrum import fit_window, power_law_fit, power_law_slope
from lmdynamics.extraction import stats
from lmdynamics.extraction.stats import (
    Moments,
    better_fit,
    compare_to_reference,
    direction_closeness,
    distribution_summary,
    embedding_correlation,
    gaussian_fit,
    logistic_fit,
    logistic_loglik,
    max_abs,
    ov_left_singular_vectors,
    ppcc,
    sample_elements,
    sorted_quantiles,
    tail_ratio,
    top_left_singular_vectors,
)

FAST = settings(max_examples=30, deadline=None)
RNG = np.random.default_rng(0)


def excess_kurtosis_np(x: np.ndarray) -> float:
    d = x - x.mean()
    return float(np.mean(d**4) / np.mean(d**2) ** 2 - 3)


def logistic_logpdf_np(x: np.ndarray, mu: float, s: float) -> np.ndarray:
    z = (x - mu) / s
    return -z - np.log(s) - 2 * np.log1p(np.exp(-z))


# ------------------------------------------------------------------------------ moments
@FAST
@given(arrays(np.float64, st.integers(2, 300),
              elements=st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)))
def test_moments_match_numpy(x):
    m = Moments.of(x)
    assert m.n == x.size
    np.testing.assert_allclose(m.mean, x.mean(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(m.std, x.std(), rtol=1e-9, atol=1e-9)
    if x.std() > 1e-6 * max(1.0, np.abs(x).max()):
        np.testing.assert_allclose(m.excess_kurtosis, excess_kurtosis_np(x), rtol=1e-7,
                                   atol=1e-7)


def test_moments_merge_over_chunks_equals_one_pass(monkeypatch):
    x = RNG.standard_t(3, size=1001) * 5 + 100.0  # large mean: a naive power sum loses digits
    whole = Moments.of(x)
    monkeypatch.setattr(stats, "_CHUNK", 37)
    chunked = Moments.of(torch.from_numpy(x))
    for a, b in [(whole.mean, chunked.mean), (whole.std, chunked.std),
                 (whole.excess_kurtosis, chunked.excess_kurtosis)]:
        np.testing.assert_allclose(a, b, rtol=1e-10)
    np.testing.assert_allclose(chunked.excess_kurtosis, excess_kurtosis_np(x), rtol=1e-9)


def test_moments_of_constant_and_empty_are_nan():
    assert math.isnan(Moments.of(np.full(10, 0.3)).excess_kurtosis)
    assert Moments.of(np.full(10, 0.3)).std == 0.0
    assert math.isnan(Moments.of(np.array([])).std)


def test_max_abs_and_nan():
    assert max_abs(np.array([1.0, -3.5, 2.0])) == 3.5
    assert max_abs(torch.tensor([[0.5, -0.25]], dtype=torch.bfloat16)) == 0.5
    assert math.isnan(max_abs(np.array([1.0, np.nan])))


def test_sample_elements_is_seeded_and_complete_when_small():
    x = torch.arange(100.0)
    assert torch.equal(sample_elements(x, 100), x.double())
    a, b = sample_elements(x, 10, seed=3), sample_elements(x, 10, seed=3)
    assert a.shape == (10,) and torch.equal(a, b)
    assert not torch.equal(a, sample_elements(x, 10, seed=4))


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_sorted_quantiles_match_numpy(n):
    x = np.sort(RNG.normal(size=n))
    probs = stats.QUANTILES
    np.testing.assert_allclose(sorted_quantiles(torch.from_numpy(x), probs),
                               np.quantile(x, probs), rtol=1e-12)


# ------------------------------------------------------------------------------ fits
def test_gaussian_fit_is_the_mle_loglik():
    x = RNG.normal(2.0, 3.0, 500)
    mu, sigma, ll = gaussian_fit(torch.from_numpy(x))
    direct = np.mean(-0.5 * np.log(2 * np.pi * x.var()) - (x - x.mean()) ** 2 / (2 * x.var()))
    np.testing.assert_allclose([mu, sigma, ll], [x.mean(), x.std(), direct], rtol=1e-12)
    assert math.isnan(gaussian_fit(torch.zeros(5, dtype=torch.float64))[2])


def test_logistic_loglik_matches_density():
    x = RNG.normal(size=50)
    np.testing.assert_allclose(logistic_loglik(torch.from_numpy(x), 0.3, 1.7),
                               logistic_logpdf_np(x, 0.3, 1.7).mean(), rtol=1e-12)


@pytest.mark.parametrize("draw", ["logistic", "normal", "laplace"])
def test_logistic_fit_solves_the_score_equations(draw):
    x = getattr(RNG, draw)(0.5, 2.0, 2000)
    mu, s, ll = logistic_fit(torch.from_numpy(x))
    z = (x - mu) / s
    assert abs(np.mean(np.tanh(z / 2))) < 1e-9
    assert abs(np.mean(z * np.tanh(z / 2)) - 1) < 1e-9
    np.testing.assert_allclose(ll, logistic_logpdf_np(x, mu, s).mean(), rtol=1e-12)
    for dmu, ds in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:  # a maximum
        assert logistic_logpdf_np(x, mu + dmu, s * (1 + ds)).mean() < ll


def test_logistic_fit_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    x = RNG.logistic(-1.0, 0.3, 3000)
    mu, s, _ = logistic_fit(torch.from_numpy(x))
    np.testing.assert_allclose([mu, s], scipy_stats.logistic.fit(x), rtol=1e-6)


def test_logistic_fit_undefined_cases():
    assert all(math.isnan(v) for v in logistic_fit(torch.ones(20, dtype=torch.float64)))
    assert all(math.isnan(v) for v in logistic_fit(torch.tensor([1.0, math.nan]).double()))


@pytest.mark.parametrize(("draw", "expected"), [("normal", "gaussian"),
                                                ("logistic", "logistic")])
def test_classifier_picks_the_generating_distribution(draw, expected):
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = getattr(rng, draw)(rng.normal(), rng.uniform(0.01, 10), 4000)
        assert better_fit(distribution_summary(x)["loglik"]) == expected


def test_better_fit_undefined():
    assert better_fit([math.nan, 1.0]) == "undefined"


def test_ppcc_matches_direct_correlation():
    x = np.sort(RNG.logistic(size=200))
    p = (np.arange(1, 201) - 0.5) / 200
    normal_q = np.array([NormalDist().inv_cdf(v) for v in p])
    logistic_q = np.log(p / (1 - p))
    t = torch.from_numpy(x)
    np.testing.assert_allclose(ppcc(t, "gaussian"), np.corrcoef(x, normal_q)[0, 1], rtol=1e-10)
    np.testing.assert_allclose(ppcc(t, "logistic"), np.corrcoef(x, logistic_q)[0, 1],
                               rtol=1e-10)
    with pytest.raises(ValueError, match="unknown distribution 'cauchy'"):
        ppcc(t, "cauchy")


def test_tail_ratio_is_one_for_the_fitted_quantiles_and_above_for_heavy_tails():
    x = np.sort(RNG.normal(0, 2, 50_000))
    np.testing.assert_allclose(tail_ratio(torch.from_numpy(x), "gaussian", x.std()), 1.0,
                               atol=0.02)
    lo, hi = np.quantile(x, [0.01, 0.99])
    expected = (hi - lo) / (2 * 1.5 * NormalDist().inv_cdf(0.99))
    np.testing.assert_allclose(tail_ratio(torch.from_numpy(x), "gaussian", 1.5), expected,
                               rtol=1e-10)
    heavy = np.sort(RNG.laplace(0, 1, 50_000))  # quantile spread 1.19x the fitted Gaussian's
    np.testing.assert_allclose(tail_ratio(torch.from_numpy(heavy), "gaussian", heavy.std()),
                               math.log(50) / (2**0.5 * NormalDist().inv_cdf(0.99)), rtol=0.03)


def test_distribution_summary_matches_numpy():
    x = RNG.laplace(size=(30, 40)).astype(np.float32)
    out = distribution_summary(torch.from_numpy(x), max_elements=10_000)
    flat = x.astype(np.float64).ravel()
    np.testing.assert_allclose(out["std"], flat.std(), rtol=1e-10)
    np.testing.assert_allclose(out["kurtosis"], excess_kurtosis_np(flat), rtol=1e-9)
    np.testing.assert_allclose(out["max_abs"], np.abs(flat).max(), rtol=1e-7)
    np.testing.assert_allclose(out["quantile"], np.quantile(flat, stats.QUANTILES), rtol=1e-10)
    assert out["loglik"].shape == (2,) and out["ppcc"].shape == (2,)


def test_distribution_summary_of_a_constant_is_nan_not_an_error():
    out = distribution_summary(torch.ones(3, 4))
    assert math.isnan(out["kurtosis"]) and np.isnan(out["loglik"]).all()
    assert out["max_abs"] == 1.0 and out["std"] == 0.0


# ------------------------------------------------------------------------------ references
def test_compare_to_reference_matches_numpy():
    w, ref = RNG.normal(size=(5, 7)), RNG.normal(size=(5, 7))
    out = compare_to_reference(torch.from_numpy(w).float(), ref)
    w32 = w.astype(np.float32).astype(np.float64)
    dist = np.linalg.norm(w32 - ref)
    np.testing.assert_allclose(out["dist"], dist, rtol=1e-12)
    np.testing.assert_allclose(out["rel_dist"], dist / np.linalg.norm(ref), rtol=1e-12)
    np.testing.assert_allclose(
        out["cos"], np.vdot(w32, ref) / np.linalg.norm(w32) / np.linalg.norm(ref), rtol=1e-12)
    same = compare_to_reference(w, w)
    assert same["dist"] == 0.0 and same["rel_dist"] == 0.0
    np.testing.assert_allclose(same["cos"], 1.0, rtol=1e-14)
    zero = compare_to_reference(w, np.zeros_like(w))
    assert math.isnan(zero["rel_dist"]) and math.isnan(zero["cos"])
    with pytest.raises(ValueError, match="shapes differ"):
        compare_to_reference(w, w.T)


# ------------------------------------------------------------------------------ spectra
def test_power_law_fit_recovers_the_exponent_and_uses_the_window():
    k = np.arange(1, 101)
    s = 3.0 * k**-0.7
    alpha, log_c = power_law_fit(s)
    np.testing.assert_allclose([alpha, log_c], [0.7, math.log(3.0)], rtol=1e-10)
    bent = s.copy()
    bent[60:] *= 1e-3  # outside the default window (ranks 1-50): no effect
    np.testing.assert_allclose(power_law_slope(bent), 0.7, rtol=1e-10)
    assert power_law_slope(bent, 0.0, 1.0) > 1.0
    assert fit_window(100, 0.1, 0.5) == (10, 50)
    assert math.isnan(power_law_slope(np.array([1.0, 0.5, 0.2, 0.1])))  # 2 ranks in window
    assert math.isnan(power_law_slope(np.zeros(20)))


def test_embedding_correlation_matches_corrcoef():
    e = RNG.normal(size=(300, 12))
    np.testing.assert_allclose(embedding_correlation(torch.from_numpy(e).float(), 256),
                               np.corrcoef(e.astype(np.float32).astype(np.float64)[:256]),
                               atol=1e-12)
    assert embedding_correlation(e, 256).shape == (256, 256)
    assert embedding_correlation(e[:10], 256).shape == (10, 10)


@pytest.mark.parametrize("shape", [(6, 20), (20, 6)])
def test_top_left_singular_vectors_match_svd(shape):
    w = RNG.normal(size=shape)
    u_np = np.linalg.svd(w)[0][:, :4]
    u = top_left_singular_vectors(torch.from_numpy(w).float(), 4).numpy()
    assert u.shape == (shape[0], 4)
    np.testing.assert_allclose(np.abs(np.sum(u * u_np, axis=0)), 1.0, atol=1e-6)


def test_ov_left_singular_vectors_match_the_svd_of_the_product():
    w_out, w_value = RNG.normal(size=(16, 4)), RNG.normal(size=(4, 16))
    u_np, s_np, _ = np.linalg.svd(w_out @ w_value)
    u = ov_left_singular_vectors(torch.from_numpy(w_out), torch.from_numpy(w_value), 30)
    assert u.shape == (16, 4)  # the rank bound caps k
    np.testing.assert_allclose(np.abs(np.sum(u.numpy() * u_np[:, :4], axis=0)), 1.0,
                               atol=1e-10)


def test_direction_closeness():
    eye = torch.eye(5, dtype=torch.float64)
    assert direction_closeness(eye[:, :3], eye[:, :3]) == 1.0
    assert direction_closeness(-eye[:, :3], eye[:, [2, 0, 1]]) == 1.0  # sign and order
    assert direction_closeness(eye[:, 3:], eye[:, :3]) == 0.0
    mixed = torch.stack([eye[:, 0] + eye[:, 1], eye[:, 2]], dim=1) / torch.tensor([2**0.5, 1])
    # reference e0 and e2: best |cos| 1/sqrt(2) and 1
    np.testing.assert_allclose(direction_closeness(mixed, eye[:, [0, 2]]),
                               (2**-0.5 + 1) / 2, rtol=1e-12)

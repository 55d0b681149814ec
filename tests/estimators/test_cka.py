"""Debiased linear CKA, standardisation and pairwise CKA against Gram-form float64 references."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdynamics.estimators import cka
from lmdynamics.estimators.cka import (
    DebiasedCKAReference,
    cka_variable,
    debiased_cka_to_reference,
    debiased_linear_cka,
    gram_inner_products,
    hsic_unbiased,
    linear_cka,
    pairwise_cka,
    standardize,
)
from support.cka_reference import biased_cka_gram, debiased_cka_gram, hsic_unbiased_gram

FAST = settings(max_examples=40, deadline=None)
shapes = st.tuples(st.integers(0, 2**32 - 1), st.integers(5, 30), st.integers(1, 9),
                   st.integers(1, 9))


def random_pair(seed: int, n: int, d1: int, d2: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, size=d1) + rng.normal(size=d1) * 5
    y = 0.7 * x @ rng.normal(size=(d1, d2)) + rng.normal(size=(n, d2))
    return x, y


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# ---------------------------------------------------------------- against the Gram form
@FAST
@given(shapes)
def test_debiased_matches_gram_reference(args):
    """The estimator on raw (uncentred) features against the Gram-form reference on centred
    ones: unbiased HSIC is shift invariant (next test), and centring first keeps the float64
    reference exact; on raw features with mean >> spread (e.g. n=5, mean 8.8, sd 0.15) the
    Gram form cancels ~(|x|^2 / |x - mean|^2)^2 ~ 1e7 ulps and is the less accurate side."""
    x, y = random_pair(*args)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    assert hsic_unbiased(x, y) == pytest.approx(hsic_unbiased_gram(xc, yc), rel=1e-9,
                                                abs=1e-9)
    assert debiased_linear_cka(x, y) == pytest.approx(debiased_cka_gram(xc, yc), rel=1e-9,
                                                      abs=1e-11)


def test_unbiased_hsic_is_shift_invariant_so_centring_first_is_exact():
    x, y = random_pair(0, 12, 3, 4)
    shifted = hsic_unbiased_gram(x + 100.0, y - 7.0)
    assert hsic_unbiased_gram(x, y) == pytest.approx(shifted, rel=1e-8)
    assert hsic_unbiased(x + 100.0, y) == pytest.approx(hsic_unbiased_gram(x, y), rel=1e-10)


def test_independent_gaussians_debiased_near_zero_biased_at_its_floor():
    rng = np.random.default_rng(2024)
    n, d = 4096, 512
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    debiased = debiased_linear_cka(x, y)
    biased = linear_cka(x, y)
    assert abs(debiased) < 0.02
    # floor d_eff / (n + d_eff), d_eff the participation ratio of the population covariance:
    # isotropic features, d_eff = d
    assert biased == pytest.approx(d / (n + d), abs=0.005)
    assert biased > 0.08 > 4 * abs(debiased)


def test_identical_and_related_inputs():
    x, y = random_pair(3, 200, 6, 5)
    assert debiased_linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    # a noiseless linear map of full rank is recovered up to the estimator's sampling error
    assert debiased_linear_cka(x, x @ random_orthogonal(np.random.default_rng(0), 6)) == \
        pytest.approx(1.0, abs=1e-12)
    assert 0.3 < debiased_linear_cka(x, y) < 1.0


# ---------------------------------------------------------------- properties
@FAST
@given(shapes)
def test_debiased_properties(args):
    seed, n, d1, d2 = args
    x, y = random_pair(seed, n, d1, d2)
    rng = np.random.default_rng(seed + 1)
    value = debiased_linear_cka(x, y)
    assert -1 - 1e-9 <= value <= 1 + 1e-9
    assert hsic_unbiased(x, x) >= -1e-9 * abs(hsic_unbiased(x, x)) - 1e-12
    assert debiased_linear_cka(y, x) == pytest.approx(value, abs=1e-10)
    assert debiased_linear_cka(x @ random_orthogonal(rng, d1), y) == pytest.approx(value,
                                                                                    abs=1e-9)
    assert debiased_linear_cka(x, y @ random_orthogonal(rng, d2)) == pytest.approx(value,
                                                                                    abs=1e-9)
    assert debiased_linear_cka(x * 37.5, y) == pytest.approx(value, abs=1e-10)
    assert debiased_linear_cka(x, y * -0.01) == pytest.approx(value, abs=1e-10)
    assert debiased_linear_cka(x + rng.normal(size=d1) * 1e3, y) == pytest.approx(value,
                                                                                  abs=1e-8)


def test_debiased_is_not_invariant_to_anisotropic_scaling():
    x, y = random_pair(3, 40, 4, 4)
    scaled = x * np.array([1.0, 100.0, 1.0, 1.0])
    assert abs(debiased_linear_cka(scaled, y) - debiased_linear_cka(x, y)) > 1e-3


# ---------------------------------------------------------------- precision
def test_low_precision_inputs_are_cast_exactly_then_computed_in_float64():
    x, y = random_pair(7, 300, 16, 12)
    exact = debiased_linear_cka(x, y)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    cast = debiased_linear_cka(x32.astype(np.float64), y32.astype(np.float64))
    assert debiased_linear_cka(x32, y32) == cast
    assert debiased_linear_cka(torch.from_numpy(x32), torch.from_numpy(y32)) == cast
    assert cast == pytest.approx(exact, abs=1e-6)
    bf = torch.from_numpy(x32).to(torch.bfloat16)
    assert debiased_linear_cka(bf, y) == debiased_linear_cka(bf.double().numpy(), y)


def test_large_offset_float32_input_still_accurate():
    x, y = random_pair(11, 300, 8, 8)
    exact = debiased_linear_cka(x, y)
    assert debiased_linear_cka((x + 1e3).astype(np.float32),
                               (y - 1e3).astype(np.float32)) == pytest.approx(exact, abs=1e-5)


# ---------------------------------------------------------------- undefined input
@pytest.mark.parametrize("constant", [0.0, 0.1, -3.3])
def test_constant_input_is_nan_without_warning(constant):
    x, _ = random_pair(2, 10, 3, 3)
    c = np.full((10, 3), constant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(debiased_linear_cka(c, x))
        assert math.isnan(debiased_linear_cka(x, c))
        assert hsic_unbiased(c, x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_and_too_few_samples_are_nan(bad):
    x, y = random_pair(6, 12, 3, 2)
    x[4, 1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(debiased_linear_cka(x, y))
        assert math.isnan(debiased_linear_cka(y, x))
        assert math.isnan(hsic_unbiased(x, y))
        small = np.random.default_rng(0).normal(size=(3, 2))
        assert math.isnan(debiased_linear_cka(small, small))
        assert math.isnan(hsic_unbiased(small, small))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(6, 3\)"):
        debiased_linear_cka(np.ones((5, 3)), np.ones((6, 3)))
    with pytest.raises(ValueError, match="2-D"):
        debiased_linear_cka(np.ones(5), np.ones((5, 1)))
    with pytest.raises(ValueError, match="n >= 4"):
        cka.unbiased_hsic_from_terms(1.0, 1.0, 1.0, 1.0, 3)


def test_reference_path_equals_direct_and_is_immutable():
    x, y = random_pair(8, 40, 4, 5)
    ref = DebiasedCKAReference.from_activations(torch.from_numpy(y).float())
    assert ref.shape == (40, 5) and ref.defined
    assert ref.self_hsic == pytest.approx(hsic_unbiased_gram(ref.centred, ref.centred), rel=1e-10)
    for k in range(3):
        xk, _ = random_pair(8 + k, 40, 4, 5)
        assert debiased_cka_to_reference(xk, ref) == pytest.approx(
            debiased_linear_cka(xk, torch.from_numpy(y).float()), abs=1e-12)
    with pytest.raises(ValueError):
        ref.centred[0, 0] = 1.0
    assert not DebiasedCKAReference.from_activations(np.full((6, 2), 0.1)).defined
    assert math.isnan(debiased_cka_to_reference(x[:6, :2], DebiasedCKAReference
                                                .from_activations(np.full((6, 2), 0.1))))


# ---------------------------------------------------------------- standardisation
def test_standardize_columns_and_constant_columns():
    x, _ = random_pair(1, 50, 4, 1)
    x[:, 2] = 3.0
    z = standardize(x.astype(np.float32))
    assert z.dtype == np.float64
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z.std(axis=0), [1, 1, 0, 1], atol=1e-6)
    assert np.all(z[:, 2] == 0.0)


def test_standardized_cka_ignores_per_dimension_scale():
    x, y = random_pair(4, 60, 5, 4)
    scale = np.array([1e-3, 1.0, 50.0, 2.0, 1e3])
    assert debiased_linear_cka(standardize(x * scale), standardize(y)) == pytest.approx(
        debiased_linear_cka(standardize(x), standardize(y)), abs=1e-10)


# ---------------------------------------------------------------- pairwise
def test_pairwise_matches_pointwise_and_both_routes_agree():
    rng = np.random.default_rng(9)
    base = rng.normal(size=(40, 6))
    xs = [base * (k + 1) + rng.normal(size=(40, 6)) * (3 - k) for k in range(3)]
    xs.append(rng.normal(size=(40, 3)))  # another width
    biased, debiased = pairwise_cka(xs)
    for s in range(4):
        for t in range(4):
            assert biased[s, t] == pytest.approx(biased_cka_gram(xs[s], xs[t]), abs=1e-12)
            assert debiased[s, t] == pytest.approx(debiased_cka_gram(xs[s], xs[t]), abs=1e-12)
    np.testing.assert_allclose(np.diag(debiased), 1.0, atol=1e-12)
    centred = [x - x.mean(axis=0) for x in xs]
    np.testing.assert_allclose(cka._inner_products_gram(centred),
                               cka._inner_products_feature(centred), rtol=1e-12)
    np.testing.assert_allclose(gram_inner_products(centred), cka._inner_products_feature(centred),
                               rtol=1e-12)


def test_pairwise_gram_route_in_small_blocks(monkeypatch):
    monkeypatch.setattr(cka, "_GRAM_BLOCK_ELEMENTS", 50)
    xs = [np.random.default_rng(k).normal(size=(17, 30)) for k in range(3)]
    centred = [x - x.mean(axis=0) for x in xs]
    np.testing.assert_allclose(cka._inner_products_gram(centred),
                               cka._inner_products_feature(centred), rtol=1e-12)


def test_pairwise_undefined_rows_are_nan():
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(10, 3)), np.full((10, 3), 2.0), rng.normal(size=(10, 3))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        biased, debiased = pairwise_cka(xs)
    for m in (biased, debiased):
        assert np.isnan(m[1]).all() and np.isnan(m[:, 1]).all()
        assert np.isfinite(m[[0, 2]][:, [0, 2]]).all()
    b3, d3 = pairwise_cka([x[:3] for x in (xs[0], xs[2])])
    assert np.isfinite(b3).all() and np.isnan(d3).all()  # n = 3: only the biased one
    assert pairwise_cka([])[0].shape == (0, 0)


def test_cka_variable_names():
    assert cka_variable("biased") == "cka"
    assert cka_variable("debiased") == "cka_debiased"
    assert cka_variable("debiased", standardized=True) == "cka_debiased_standardized"
    with pytest.raises(ValueError, match="'unbiased'.*biased, debiased"):
        cka_variable("unbiased")

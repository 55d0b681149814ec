"""Bootstrap over sequences: weighted formulas against brute force, and what the intervals do."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdynamics.estimators import bootstrap
from lmdynamics.estimators.bootstrap import (
    BootstrapReference,
    GroupedActivations,
    bootstrap_cka_to_reference,
    bootstrap_weights,
    group_products,
    percentile_interval,
    resampled_hsic,
)
from lmdynamics.estimators.cka import debiased_linear_cka, hsic_unbiased, linear_cka
from support.cka_reference import weighted_biased_hsic, weighted_hsic_bruteforce


def data(seed: int, n: int = 9, d1: int = 3, d2: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) + 1.5
    y = x[:, :2] @ rng.normal(size=(2, d2)) + rng.normal(size=(n, d2)) - 2.0
    return x, y


GROUPS = np.array([2, 0, 1, 1, 0, 2, 3, 3, 1])  # unsorted labels, unequal group sizes


def grouped(x, y, groups=GROUPS):
    gx = GroupedActivations.build(x, groups)
    return gx, GroupedActivations.like(y, gx)


def token_weights(w: np.ndarray, groups=GROUPS) -> np.ndarray:
    return w[np.searchsorted(np.unique(groups), groups)]


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1),
       st.lists(st.integers(0, 3), min_size=4, max_size=4).filter(lambda w: sum(w) >= 2))
def test_resampled_hsic_matches_bruteforce(seed, counts):
    x, y = data(seed)
    w = np.array(counts, dtype=float)
    wt = token_weights(w)
    gx, gy = grouped(x, y)
    biased, unbiased = resampled_hsic(gx, gy, group_products(gx, gy), w[None, :])
    assert biased[0] == pytest.approx(weighted_biased_hsic(x, y, wt), rel=1e-9)
    if np.count_nonzero(wt) >= 4:
        assert unbiased[0] == pytest.approx(weighted_hsic_bruteforce(x, y, wt), rel=1e-8,
                                            abs=1e-9)
    else:
        assert math.isnan(unbiased[0])


def test_real_valued_weights_and_unit_weights():
    x, y = data(5)
    gx, gy = grouped(x, y)
    w = np.array([[1.5, 0.2, 2.0, 0.3], [1.0, 1.0, 1.0, 1.0]])
    biased, unbiased = resampled_hsic(gx, gy, group_products(gx, gy), w)
    assert unbiased[0] == pytest.approx(weighted_hsic_bruteforce(x, y, token_weights(w[0])),
                                        rel=1e-9)
    # all weights 1: the estimators on the original sample
    assert unbiased[1] == pytest.approx(hsic_unbiased(x, y), rel=1e-10)
    xc, yc = x - x.mean(axis=0), y - y.mean(axis=0)
    assert biased[1] == pytest.approx(np.sum((xc.T @ yc) ** 2), rel=1e-10)


def test_weighted_kernel_is_shift_invariant():
    # why the resampled unbiased HSIC may centre once, at the full-sample mean
    x, y = data(6, n=7)
    w = np.array([0.0, 2.0, 1.0, 3.0, 1.0, 0.0, 1.0])
    assert weighted_hsic_bruteforce(x + 4.0, y - 9.0, w) == pytest.approx(
        weighted_hsic_bruteforce(x, y, w), rel=1e-8)


def test_group_products_routes_agree(monkeypatch):
    x, y = data(1, n=40, d1=6, d2=5)
    groups = np.random.default_rng(0).integers(0, 7, size=40)
    gx, gy = grouped(x, y, groups)
    direct = np.zeros((gx.n_groups, gx.n_groups))
    labels = np.unique(groups)
    for a, ga in enumerate(labels):
        for b, gb in enumerate(labels):
            sa = x[groups == ga] - x.mean(0)
            sb = x[groups == gb] - x.mean(0)
            ta, tb = y[groups == ga] - y.mean(0), y[groups == gb] - y.mean(0)
            direct[a, b] = np.sum((sa.T @ ta) * (sb.T @ tb))
    np.testing.assert_allclose(bootstrap._products_feature(gx, gy), direct, rtol=1e-10)
    np.testing.assert_allclose(bootstrap._products_gram(gx, gy), direct, rtol=1e-10)
    monkeypatch.setattr(bootstrap, "BLOCK_ELEMENTS", 30)  # force many small blocks
    np.testing.assert_allclose(bootstrap._products_feature(gx, gy), direct, rtol=1e-10)
    np.testing.assert_allclose(bootstrap._products_gram(gx, gy), direct, rtol=1e-10)
    np.testing.assert_allclose(group_products(gx, gy), direct, rtol=1e-10)


def test_unit_weights_reproduce_the_point_estimates():
    x, y = data(2, n=60, d1=5, d2=4)
    groups = np.repeat(np.arange(12), 5)
    ref = BootstrapReference.from_activations(y, groups, np.ones((2, 12)))
    biased, debiased = bootstrap_cka_to_reference(x, ref)
    np.testing.assert_allclose(biased, linear_cka(x, y), rtol=1e-10)
    np.testing.assert_allclose(debiased, debiased_linear_cka(x, y), rtol=1e-10)
    same_b, same_d = bootstrap_cka_to_reference(y, ref)
    np.testing.assert_allclose([same_b, same_d], 1.0, rtol=1e-12)


def test_degenerate_inputs_give_nan():
    x, y = data(3, n=20)
    groups = np.repeat(np.arange(5), 4)
    ref = BootstrapReference.from_activations(y, groups, bootstrap_weights(5, 10, 0))
    b, d = bootstrap_cka_to_reference(np.full((20, 3), 0.5), ref)
    assert np.isnan(b).all() and np.isnan(d).all()
    one_group = np.zeros((1, 5))
    one_group[0, 2] = 5.0  # every token from one sequence of 4 tokens: only 4 distinct tokens
    ref1 = BootstrapReference.from_activations(y, groups, one_group)
    b1, d1 = bootstrap_cka_to_reference(x, ref1)
    assert np.isfinite(b1).all() and np.isfinite(d1).all()
    with pytest.raises(ValueError, match=r"shape \(B, 5\)"):
        BootstrapReference.from_activations(y, groups, np.ones((3, 4)))
    with pytest.raises(ValueError, match="same number of samples"):
        bootstrap_cka_to_reference(x[:10], ref)
    with pytest.raises(ValueError, match="one label per sample"):
        GroupedActivations.build(x, groups[:5])


def test_bootstrap_weights():
    w = bootstrap_weights(8, 100, seed=3)
    assert w.shape == (100, 8) and w.dtype == np.float64
    np.testing.assert_array_equal(w.sum(axis=1), 8)
    np.testing.assert_array_equal(w, bootstrap_weights(8, 100, seed=3))
    assert not np.array_equal(w, bootstrap_weights(8, 100, seed=4))
    assert bootstrap_weights(8, 0, seed=0).shape == (0, 8)
    with pytest.raises(ValueError, match="n_groups"):
        bootstrap_weights(0, 10, seed=0)


def test_percentile_interval():
    values = np.arange(101, dtype=float)
    assert percentile_interval(values, 0.9) == pytest.approx((5.0, 95.0))
    with_nan = np.r_[values, [np.nan] * 20]
    assert percentile_interval(with_nan, 0.9) == pytest.approx((5.0, 95.0))
    assert all(math.isnan(v) for v in percentile_interval(np.r_[1.0, [np.nan] * 5], 0.9))
    assert all(math.isnan(v) for v in percentile_interval([], 0.9))
    for level in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            percentile_interval(values, level)


def sequences_of(rng, n_seq: int, per_seq: int, d: int, shared: float) -> np.ndarray:
    """Tokens of ``n_seq`` sequences: a per-sequence vector (scale ``shared``) plus noise."""
    common = np.repeat(rng.normal(size=(n_seq, d)), per_seq, axis=0)
    return shared * common + rng.normal(size=(n_seq * per_seq, d))


def test_debiased_resamples_of_independent_data_centre_on_zero_unlike_naive_copies():
    rng = np.random.default_rng(11)
    n_seq, per_seq, d = 64, 8, 48
    x, y = sequences_of(rng, n_seq, per_seq, d, 0.0), sequences_of(rng, n_seq, per_seq, d, 0.0)
    groups = np.repeat(np.arange(n_seq), per_seq)
    weights = bootstrap_weights(n_seq, 60, seed=0)
    _, debiased = bootstrap_cka_to_reference(x, BootstrapReference.from_activations(
        y, groups, weights))
    assert abs(np.mean(debiased)) < 0.02
    # the debiased estimator on a resample whose copies are treated as distinct tokens
    counts = weights[0][groups].astype(int)
    naive = debiased_linear_cka(np.repeat(x, counts, axis=0), np.repeat(y, counts, axis=0))
    assert naive > np.mean(debiased) + 0.03


def test_intervals_cover_zero_for_independent_data():
    rng = np.random.default_rng(5)
    n_seq, per_seq, d = 24, 6, 4
    groups = np.repeat(np.arange(n_seq), per_seq)
    weights = bootstrap_weights(n_seq, 200, seed=1)
    covered = 0
    for _ in range(20):
        x, y = (sequences_of(rng, n_seq, per_seq, d, 0.0),
                sequences_of(rng, n_seq, per_seq, d, 0.0))
        _, debiased = bootstrap_cka_to_reference(
            x, BootstrapReference.from_activations(y, groups, weights))
        low, high = percentile_interval(debiased, 0.9)
        covered += low <= 0.0 <= high
    assert covered >= 15  # nominal 90%: 18 of 20


def test_resampling_sequences_widens_intervals_when_tokens_of_a_sequence_correlate():
    rng = np.random.default_rng(8)
    n_seq, per_seq, d = 32, 8, 6
    base = sequences_of(rng, n_seq, per_seq, d, 2.0)
    x = base + rng.normal(size=base.shape)
    y = base @ rng.normal(size=(d, d)) + rng.normal(size=base.shape)
    sequences = np.repeat(np.arange(n_seq), per_seq)
    tokens = np.arange(n_seq * per_seq)  # every token its own resampling unit
    widths = {}
    for name, groups in (("sequence", sequences), ("token", tokens)):
        weights = bootstrap_weights(np.unique(groups).size, 300, seed=2)
        _, debiased = bootstrap_cka_to_reference(
            x, BootstrapReference.from_activations(y, groups, weights))
        low, high = percentile_interval(debiased, 0.9)
        assert low <= debiased_linear_cka(x, y) <= high
        widths[name] = high - low
    assert widths["sequence"] > 1.5 * widths["token"]


def test_token_sums_tensor_and_token_routes_agree():
    import dataclasses

    x, y = data(4, n=30, d1=4, d2=3)
    groups = np.random.default_rng(1).integers(0, 5, size=30)
    gx, gy = grouped(x, y, groups)
    terms = bootstrap._PairTerms.build(gx, gy, group_products(gx, gy))
    assert terms.tensor is not None
    w = bootstrap_weights(gx.n_groups, 7, seed=0)
    powers = {k: w**k for k in range(1, 5)}
    by_tensor = terms.token_sums(powers)
    by_token = dataclasses.replace(terms, tensor=None).token_sums(powers)
    for key, value in by_tensor.items():
        np.testing.assert_allclose(value, by_token[key], rtol=1e-10, err_msg=str(key))
    many = GroupedActivations.build(x, np.arange(30))  # one token per group: token route
    assert bootstrap._PairTerms.build(many, many, group_products(many, many)).tensor is None


def test_group_sums_equal_reduceat_over_uneven_groups():
    rng = np.random.default_rng(4)
    starts = np.array([0, 1, 5, 6, 20])
    for shape in ((23,), (23, 7), (23, 3, 4)):
        a = rng.normal(size=shape)
        np.testing.assert_allclose(bootstrap.group_sums(a, starts),
                                   np.add.reduceat(a, starts, axis=0), rtol=1e-13, atol=1e-13)

"""The sign-flip test, Student's t and the paired t-test's power
(lmdynamics.estimators.paired), against hand computations, printed tables and scipy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from lmdynamics.estimators.paired import (
    EXACT_MAX_N,
    minimum_detectable_effect,
    paired_t_power,
    sign_flip_min_p,
    sign_flip_test,
    student_t_cdf,
    student_t_quantile,
)


def brute_force_p(d) -> float:
    """The definition, pattern by pattern (itertools), independent of the code under test."""
    d = list(map(float, d))
    obs = abs(sum(d))
    hits = sum(abs(sum(s * x for s, x in zip(signs, d, strict=True))) >= obs - 1e-9
               for signs in itertools.product((1, -1), repeat=len(d)))
    return hits / 2 ** len(d)


@pytest.mark.parametrize("diffs, hits, n_patterns", [
    # sums +-1+-2+-3: 6, 4, 2, 0, 0, -2, -4, -6; |sum| >= 6 for 2 of 8
    ([1, 2, 3], 2, 8),
    # sum = 10 - 2 * (flipped subset of {1,2,3,4}); |sum| >= 6 <=> flipped sum <= 2 or >= 8:
    # {}, {1}, {2}, {1,2,3,4}, {2,3,4}, {1,3,4}: 6 of 16
    ([1, -2, 3, 4], 6, 16),
    # four equal values: only all-plus and all-minus reach |sum| = 4
    ([1, 1, 1, 1], 2, 16),
    # one difference: both patterns have |sum| = 5
    ([5.0], 2, 2),
    # 2 - 1 = 1; patterns 3, 1, -1, -3: all four reach |sum| >= 1
    ([2, -1], 4, 4),
])
def test_sign_flip_against_hand_computation(diffs, hits, n_patterns):
    got = sign_flip_test(diffs)
    assert got.p_value == hits / n_patterns
    assert got.exact and got.patterns == n_patterns and got.n == len(diffs)
    assert got.mean == pytest.approx(np.mean(diffs))
    assert got.p_value == brute_force_p(diffs)


def test_sign_flip_matches_brute_force_on_random_data_and_is_sign_symmetric():
    rng = np.random.default_rng(0)
    for n in (2, 5, 9, 12):
        for shift in (0.0, 0.5, 2.0):
            d = rng.normal(shift, 1.0, n)
            assert sign_flip_test(d).p_value == pytest.approx(brute_force_p(d), abs=1e-15)
            assert sign_flip_test(-d).p_value == sign_flip_test(d).p_value


def test_sign_flip_floor_and_degenerate_inputs():
    # 16 seeds all of one sign: only the observed pattern and its mirror -> 2 / 2^16
    assert sign_flip_test(np.arange(1.0, 17.0)).p_value == 2 / 2 ** 16
    assert sign_flip_min_p(16) == 2 / 2 ** 16 and sign_flip_min_p(3) == 0.25
    assert sign_flip_min_p(1) == 1.0 and sign_flip_min_p(0) == 1.0
    assert sign_flip_test([0.0, 0.0, 0.0]).p_value == 1.0
    assert sign_flip_test([]).p_value == 1.0
    with pytest.raises(ValueError, match="finite"):
        sign_flip_test([1.0, np.nan])
    with pytest.raises(ValueError, match="1-D"):
        sign_flip_test([[1.0, 2.0]])


def test_sign_flip_beyond_enumeration_samples_patterns():
    rng = np.random.default_rng(1)
    d = rng.normal(0.3, 1.0, EXACT_MAX_N + 5)
    got = sign_flip_test(d)
    assert not got.exact
    # the randomisation distribution of the sum is close to normal with variance sum d^2
    z = abs(d.sum()) / math.sqrt(float((d ** 2).sum()))
    assert got.p_value == pytest.approx(math.erfc(z / math.sqrt(2)), abs=0.01)


@pytest.mark.parametrize("df, p, table", [
    (1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182), (7, 0.975, 2.365),
    (15, 0.975, 2.131), (15, 0.8, 0.866), (30, 0.975, 2.042), (4, 0.95, 2.132)])
def test_student_t_quantile_against_printed_table(df, p, table):
    """Three-decimal values of a printed t table (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)."""
    assert round(student_t_quantile(p, df), 3) == table


def test_student_t_closed_forms_for_one_and_two_degrees():
    for p in (0.6, 0.9, 0.975, 0.999):
        # df 1 is Cauchy: tan(pi (p - 1/2)); df 2: (2p - 1) / sqrt(2 p (1 - p))
        assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)),
                                                         rel=1e-9)
        assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(
            2 * p * (1 - p)), rel=1e-9)
    for df in (1, 2, 5, 6, 29):
        for t in (-3.0, -0.4, 0.0, 1.7):
            assert student_t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-13)


@pytest.mark.parametrize("n", [3, 4, 8, 16, 40])
@pytest.mark.parametrize("effect", [0.0, 0.4, 1.0, 2.5])
def test_paired_t_power_against_scipy_noncentral_t(n, effect):
    sd, alpha = 1.7, 0.05
    c = stats.t.ppf(1 - alpha / 2, n - 1)
    lam = effect * math.sqrt(n) / sd
    expected = stats.nct.sf(c, n - 1, lam) + stats.nct.cdf(-c, n - 1, lam)
    assert paired_t_power(effect, sd, n, alpha) == pytest.approx(expected, abs=1e-6)


def test_minimum_detectable_effect():
    # n = 16, alpha 0.05, power 0.8: the t approximation (t_.975 + t_.8) sd / sqrt(n) =
    # (2.131 + 0.866) / 4 = 0.749 sd; the normal one (1.960 + 0.842) / 4 = 0.700 sd is smaller
    mde = minimum_detectable_effect(2.0, 16, alpha=0.05, power=0.8)
    assert mde / 2.0 == pytest.approx(0.749, abs=0.002)
    assert paired_t_power(mde, 2.0, 16, 0.05) == pytest.approx(0.8, abs=1e-7)
    assert minimum_detectable_effect(1.0, 16, alpha=0.01, power=0.8) > mde / 2.0
    assert minimum_detectable_effect(1.0, 64, alpha=0.05, power=0.8) == pytest.approx(
        (1.960 + 0.842) / 8, rel=0.02)
    assert math.isnan(minimum_detectable_effect(0.0, 16, alpha=0.05, power=0.8))
    assert math.isnan(minimum_detectable_effect(1.0, 1, alpha=0.05, power=0.8))


def test_sign_flip_power_at_the_mde_is_close_to_the_stated_power():
    """What effects.md claims: for normal differences over 16 seeds the exact sign-flip test
    detects an effect of the size of the t-test's MDE about as often as stated (0.8)."""
    rng = np.random.default_rng(2)
    n, sd, alpha = 16, 1.0, 0.05
    mde = minimum_detectable_effect(sd, n, alpha=alpha, power=0.8)
    hits = [sign_flip_test(rng.normal(mde, sd, n)).p_value < alpha for _ in range(600)]
    assert 0.73 <= np.mean(hits) <= 0.85, np.mean(hits)

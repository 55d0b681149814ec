"""The exact null of the Matthews correlation under random relabelling (Table 1's p-values),
checked against brute-force enumeration of permutations, on planted associations and on
random labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from lmdynamics.estimators.mcc import (
    ALTERNATIVES,
    joint_counts,
    matthews_corrcoef,
    relabelling_test,
)


def brute_force(pairs: list[tuple[np.ndarray, np.ndarray]], alternative: str
                ) -> tuple[float, float, int]:
    """(p, min p, permutations) by applying every permutation of each stratum's ``a`` labels
    (all n! of them, repeats included) and summing the strata's MCC-defining joint counts;
    for one stratum the statistic is the MCC itself, compared with a float tolerance."""
    pairs = [(np.asarray(a, bool), np.asarray(b, bool)) for a, b in pairs]
    single = len(pairs) == 1

    def statistic(labelings: tuple[np.ndarray, ...]) -> float:
        if single:
            return matthews_corrcoef(labelings[0], pairs[0][1])
        return float(sum(np.sum(a & b) for a, (_, b) in zip(labelings, pairs, strict=True)))

    null_mean = 0.0 if single else sum(a.sum() * b.sum() / a.size for a, b in pairs)

    def tail(stats: np.ndarray, obs: float) -> float:
        if alternative == "greater":
            return float(np.mean(stats >= obs - 1e-9))
        return float(np.mean(np.abs(stats - null_mean) >= abs(obs - null_mean) - 1e-9))

    per_stratum = [[a[list(p)] for p in itertools.permutations(range(a.size))]
                   for a, _ in pairs]
    stats = np.array([statistic(combo) for combo in itertools.product(*per_stratum)])
    observed = statistic(tuple(a for a, _ in pairs))
    return tail(stats, observed), min(tail(stats, s) for s in set(stats)), stats.size


def test_the_issue_cells_by_hand():
    # 497k θ_att on the tiny suite: 4 layers, 1 early, 1 large, the same layer: 1 of the 4
    # relabellings puts the early label on the large layer
    test = relabelling_test([(4, 1, 1, 1)], "greater")
    assert (test.p_value, test.min_p_value, test.n_relabellings) == (0.25, 0.25, 4)
    # 183k: 3 layers, 1 early, 2 large, the early one large (MCC 0.5): 2 of 3 relabellings
    # give it too, and no outcome is more extreme
    test = relabelling_test([(3, 1, 2, 1)], "greater")
    assert test.p_value == pytest.approx(2 / 3) and test.min_p_value == pytest.approx(2 / 3)
    assert matthews_corrcoef([1, 0, 0], [1, 1, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_exact_test_equals_brute_force_enumeration(alternative):
    rng = np.random.default_rng(0)
    checked = 0
    for n in range(2, 7):
        for _ in range(12):
            a, b = rng.random(n) < 0.5, rng.random(n) < 0.5
            if a.all() or not a.any() or b.all() or not b.any():
                continue
            p, p_min, n_perm = brute_force([(a, b)], alternative)
            test = relabelling_test([joint_counts(a, b)], alternative)
            assert test.p_value == pytest.approx(p, abs=1e-12), (a, b)
            assert test.min_p_value == pytest.approx(p_min, abs=1e-12), (a, b)
            # n! permutations, each distinct relabelling n_a! (n - n_a)! times
            assert n_perm == test.n_relabellings * math.factorial(a.sum()) * \
                math.factorial(n - a.sum())
            checked += 1
    assert checked > 30


@pytest.mark.parametrize("alternative", ALTERNATIVES)
def test_stratified_test_equals_brute_force_over_strata(alternative):
    pairs = [
        (np.array([1, 1, 0, 0], bool), np.array([1, 0, 1, 0], bool)),
        (np.array([1, 0, 0], bool), np.array([1, 1, 0], bool)),
        (np.array([1, 1, 0, 0, 1], bool), np.array([1, 1, 0, 1, 0], bool)),
    ]
    p, p_min, _ = brute_force(pairs, alternative)
    test = relabelling_test([joint_counts(a, b) for a, b in pairs], alternative)
    assert test.p_value == pytest.approx(p, abs=1e-12)
    assert test.min_p_value == pytest.approx(p_min, abs=1e-12)
    assert test.n_strata == 3 and test.n_relabellings == 6 * 3 * 10


def test_one_stratum_tail_is_the_mcc_tail():
    # with both margins fixed the MCC increases with the joint count: the sum-of-counts test
    # of one stratum is the MCC's, whatever the counts
    for n, n_a, n_b in itertools.product(range(2, 9), repeat=3):
        if not (0 < n_a < n and 0 < n_b < n):
            continue
        low, high = max(0, n_a + n_b - n), min(n_a, n_b)
        mccs = [(n * t - n_a * n_b) / math.sqrt(n_a * n_b * (n - n_a) * (n - n_b))
                for t in range(low, high + 1)]
        assert np.all(np.diff(mccs) > 0)


def test_same_margins_in_every_seed_make_it_the_mean_mcc_test():
    # equal margins: the sum of joint counts orders outcomes as the mean MCC does
    a, b = np.array([1, 1, 0, 0, 0, 0], bool), np.array([1, 0, 1, 0, 0, 0], bool)
    counts = joint_counts(a, b)
    test = relabelling_test([counts, (6, 2, 2, 2), (6, 2, 2, 0)], "greater")
    # by hand: per seed, t = 0, 1, 2 in 6, 8, 1 of C(6, 2) = 15 relabellings; observed
    # sum 1 + 2 + 0 = 3; P(sum >= 3) = 1 - P(sum <= 2)
    pmf = {0: 6, 1: 8, 2: 1}
    at_most_2 = sum(pmf[x] * pmf[y] * pmf[z] for x, y, z in itertools.product(pmf, repeat=3)
                    if x + y + z <= 2)
    assert test.p_value == pytest.approx(1 - at_most_2 / 15**3)
    assert test.min_p_value == pytest.approx((1 / 15) ** 3)


def test_planted_association_is_detected():
    rng = np.random.default_rng(1)
    # one size of 24 layers (Pythia 410m): large PER on 12 layers, early convergence on the
    # same layers but for two swapped
    large = np.zeros(24, bool)
    large[rng.choice(24, 12, replace=False)] = True
    early = large.copy()
    early[np.flatnonzero(large)[0]], early[np.flatnonzero(~large)[0]] = False, True
    test = relabelling_test([joint_counts(early, large)], "greater")
    assert matthews_corrcoef(early, large) == pytest.approx((24 * 11 - 12 * 12) / 12**2)
    assert test.p_value < 1e-3
    # ten seeds of a 6-layer size (Pythia 70m), each agreeing on 5 of 6 layers: no seed
    # alone reaches p < 0.05, the ten together do by far
    per_seed, counts = [], []
    for _ in range(10):
        large = np.zeros(6, bool)
        large[rng.choice(6, 3, replace=False)] = True
        early = large.copy()
        early[rng.integers(6)] ^= True
        counts.append(joint_counts(early, large))
        per_seed.append(relabelling_test([counts[-1]], "greater").p_value)
    assert min(per_seed) > 0.05
    assert relabelling_test(counts, "greater").p_value < 1e-4


def test_random_labels_are_not_detected():
    """Independent labels: p-values are super-uniform (P(p <= alpha) <= alpha), exactly for
    every margin of up to 10 layers (both alternatives), and empirically over random
    labelings."""
    for n in range(2, 11):
        for n_a, n_b in itertools.product(range(1, n), repeat=2):
            low, high = max(0, n_a + n_b - n), min(n_a, n_b)
            support = range(low, high + 1)
            prob = {t: math.comb(n_b, t) * math.comb(n - n_b, n_a - t) / math.comb(n, n_a)
                    for t in support}
            for alternative in ALTERNATIVES:
                p_of = {t: relabelling_test([(n, n_a, n_b, t)], alternative).p_value
                        for t in support}
                for alpha in (0.01, 0.05, 0.1, 0.25, 0.5):
                    assert sum(prob[t] for t in support if p_of[t] <= alpha) <= alpha + 1e-12
    rng = np.random.default_rng(2)
    p_values = []
    for _ in range(2000):
        a, b = rng.random(12) < 0.5, rng.random(12) < 0.5
        p_values.append(relabelling_test([joint_counts(a, b)], "greater").p_value)
    p_values = np.array(p_values)
    p_values = p_values[np.isfinite(p_values)]
    assert p_values.size > 1900
    for alpha in (0.05, 0.1, 0.25, 0.5):
        assert np.mean(p_values <= alpha) <= alpha + 3 * math.sqrt(alpha / p_values.size)
    assert np.mean(p_values <= 0.5) > 0.3  # not stuck at 1: the test can fire
    # ten random seeds combined: rejections at the nominal rate or below
    combined = [relabelling_test([joint_counts(rng.random(6) < 0.5, rng.random(6) < 0.5)
                                  for _ in range(10)], "greater").p_value for _ in range(500)]
    assert np.mean(np.array(combined) <= 0.05) <= 0.05 + 3 * math.sqrt(0.05 / 500)


def test_undefined_strata_ties_and_errors():
    # a one-class label: the statistic cannot move, so the stratum carries no test
    test = relabelling_test([(4, 4, 2, 2)], "greater")
    assert math.isnan(test.p_value) and math.isnan(test.min_p_value)
    assert (test.n_strata, test.n_relabellings) == (0, 0)
    assert relabelling_test([], "greater").n_strata == 0
    # undefined strata are left out of a combination
    both = relabelling_test([(4, 1, 1, 1), (4, 0, 2, 0), (3, 3, 1, 1)], "greater")
    assert (both.p_value, both.n_strata) == (0.25, 1)
    # ties count as at least as extreme: MCC 0 of 2 early / 2 large among 4 (t = 1) is
    # reached or exceeded by 5 of the 6 relabellings
    assert relabelling_test([(4, 2, 2, 1)], "greater").p_value == pytest.approx(5 / 6)
    # two-sided: |t - 1| >= 0 always; t = 2 or 0 is as extreme as t = 0 or 2 (1 + 1 of 6)
    assert relabelling_test([(4, 2, 2, 1)], "two_sided").p_value == pytest.approx(1.0)
    assert relabelling_test([(4, 2, 2, 0)], "two_sided").p_value == pytest.approx(2 / 6)
    assert relabelling_test([(4, 2, 2, 0)], "greater").p_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no labeling of 4 items has 1 and 1 marks with 2"):
        relabelling_test([(4, 1, 1, 2)], "greater")
    with pytest.raises(ValueError, match="alternative='less': allowed greater, two_sided"):
        relabelling_test([(4, 1, 1, 1)], "less")
    assert joint_counts([1, 0, 1], [1, 1, 0]) == (3, 2, 2, 1)

"""Gini, Hoyer, the max norm (lmdynamics.estimators.sparsity) and the condition number and
matrix norms (lmdynamics.estimators.spectral) against float64 formulas from their papers.

References written from the publications, not from our code (tests/measure_reference.py):

- Hurley & Rickard 2009's Gini index and Gini's mean absolute difference, which equals it;
  their sparsity properties D1 (Robin Hood), D2 (scaling), P1 (Bill Gates), P2 (babies),
  P3 (cloning);
- Hoyer 2004's sparsity;
- the condition number and the norms: ``numpy.linalg.cond`` / ``norm`` (LAPACK's SVD) of the
  matrix itself, against ours from the Gram-route spectrum the extraction stores.

Tolerances: Gini, Hoyer, max norm: 1e-12 absolute (sums in float64); norms: 1e-10 relative;
condition numbers: 1e-6 relative up to 1e5 (the Gram route's sigma_min errs by about
``eps kappa^2 / 2``), NaN beyond 1e6.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmdynamics.estimators.sparsity import element_stats, gini, hoyer, max_abs
from lmdynamics.estimators.spectral import (
    CONDITION_LIMIT,
    condition_number,
    frobenius_norm,
    nuclear_norm,
    spectral_norm,
)
from lmdynamics.extraction.spectra import singular_values
from support.measure_reference import gini_hurley_rickard, gini_mean_difference, hoyer_reference


def g(x) -> float:
    return gini(element_stats(x))


def h(x) -> float:
    return hoyer(element_stats(x))


MATRICES = {
    "gaussian": np.random.default_rng(0).normal(size=(48, 96)),
    "laplace": np.random.default_rng(1).laplace(size=(64, 64)) * 0.02,
    "sparse": np.random.default_rng(2).normal(size=(40, 30))
    * (np.random.default_rng(3).random((40, 30)) < 0.1),
    "float32": np.random.default_rng(4).normal(size=(33, 17)).astype(np.float32),
}


@pytest.mark.parametrize("name", list(MATRICES))
def test_gini_hoyer_and_max_norm_match_the_papers_formulas(name):
    x = MATRICES[name]
    assert g(x) == pytest.approx(gini_hurley_rickard(x), abs=1e-12)
    assert g(x) == pytest.approx(gini_mean_difference(x), abs=1e-12)
    assert h(x) == pytest.approx(hoyer_reference(x), abs=1e-12)
    assert max_abs(element_stats(x)) == float(np.abs(x).max())


def test_gini_and_hoyer_at_their_extremes():
    n = 100
    flat, one = np.full(n, 0.3), np.zeros(n)
    one[17] = -2.0
    assert g(flat) == pytest.approx(0.0, abs=1e-15) and h(flat) == pytest.approx(0.0, abs=1e-12)
    assert g(one) == pytest.approx(1 - 1 / n, abs=1e-15) and h(one) == pytest.approx(1.0)


def test_hurley_rickard_sparsity_properties_of_gini():
    rng = np.random.default_rng(5)
    c = np.abs(rng.normal(size=50)) + 0.01
    base = g(c)
    # D1 Robin Hood: taking from the richest to give to the poorest lowers sparsity
    robin = c.copy()
    rich, poor = int(np.argmax(c)), int(np.argmin(c))
    robin[rich] -= 0.1 * (c[rich] - c[poor])
    robin[poor] += 0.1 * (c[rich] - c[poor])
    assert g(robin) < base
    # D2 scaling, P3 cloning: unchanged
    assert g(7.0 * c) == pytest.approx(base, abs=1e-14)
    assert g(np.concatenate([c, c, c])) == pytest.approx(base, abs=1e-14)
    # P1 Bill Gates: one element growing without bound makes it sparser
    gates = c.copy()
    gates[0] = 1e6
    assert g(gates) > base
    # P2 babies: adding zeros makes it sparser
    assert g(np.concatenate([c, np.zeros(20)])) > base


def test_undefined_sparsity_is_nan():
    zeros = np.zeros((4, 4))
    bad = np.ones((4, 4))
    bad[1, 1] = np.inf
    for x in (zeros, bad, np.zeros(0)):
        assert math.isnan(g(x)) and math.isnan(h(x))
    assert math.isnan(max_abs(element_stats(bad)))
    assert math.isnan(h(np.ones(1)))  # one element: Hoyer's denominator is 0


def prescribed(m: int, n: int, kappa: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(m, min(m, n))))
    v, _ = np.linalg.qr(rng.normal(size=(n, min(m, n))))
    return (u * np.logspace(0, -math.log10(kappa), min(m, n))) @ v.T


@pytest.mark.parametrize("kappa", [10.0, 1e3, 1e5])
@pytest.mark.parametrize("shape", [(64, 64), (48, 192), (192, 48)])
def test_condition_number_and_norms_match_lapack(shape, kappa):
    a = prescribed(*shape, kappa, seed=int(kappa) % 97 + shape[1])
    s = singular_values(a)  # what the extraction stores (the Gram route)
    assert condition_number(s) == pytest.approx(np.linalg.cond(a, 2), rel=1e-6)
    assert spectral_norm(s) == pytest.approx(np.linalg.norm(a, 2), rel=1e-10)
    assert nuclear_norm(s) == pytest.approx(np.linalg.norm(a, "nuc"), rel=1e-10)
    assert frobenius_norm(s) == pytest.approx(np.linalg.norm(a, "fro"), rel=1e-10)


def test_condition_numbers_beyond_the_resolution_and_singular_matrices_are_nan():
    assert math.isnan(condition_number(singular_values(prescribed(64, 64, 1e8, 1))))
    singular = prescribed(32, 32, 10.0, 2)
    singular[:, 0] = singular[:, 1]
    assert math.isnan(condition_number(singular_values(singular)))
    assert math.isnan(condition_number(np.array([1.0, 0.0])))
    assert condition_number(np.array([CONDITION_LIMIT, 1.0])) == CONDITION_LIMIT
    for f in (condition_number, spectral_norm, nuclear_norm, frobenius_norm):
        assert math.isnan(f(np.zeros(3))) and math.isnan(f(np.array([1.0, np.nan])))
        with pytest.raises(ValueError):
            f(np.array([1.0, -1.0]))


def test_frobenius_norm_does_not_overflow():
    assert frobenius_norm(np.array([3e200, 4e200])) == pytest.approx(5e200)

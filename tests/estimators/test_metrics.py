"""Tests of lmdynamics.estimators (biased CKA, effective rank and PER, MCC) against
independent float64 references written from the formulas."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmdynamics.estimators.cka import CKAReference, centre, linear_cka, linear_cka_to_reference
from lmdynamics.estimators.mcc import matthews_corrcoef, mcc_undefined_reason
from lmdynamics.estimators.rank import (
    DEFAULT_PER_DIVISOR,
    PER_DIVISORS,
    effective_rank,
    per_divisor,
    proportional_effective_rank,
)
from lmdynamics.extraction.spectra import singular_values

FAST = settings(max_examples=40, deadline=None)


# ---------------------------------------------------------------- independent references
def cka_gram_reference(x: np.ndarray, y: np.ndarray) -> float:
    """Biased-HSIC CKA in Gram form with the explicit centring matrix H (small n only)."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, lg = x @ x.T, y @ y.T

    def hsic(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.trace(a @ h @ b @ h)) / (n - 1) ** 2

    return hsic(k, lg) / math.sqrt(hsic(k, k) * hsic(lg, lg))


def effective_rank_reference(s: list[float]) -> float:
    """Roy & Vetterli effective rank with plain Python math, skipping zeros."""
    total = sum(s)
    entropy = 0.0
    for v in s:
        p = v / total
        if p > 0:
            entropy -= p * math.log(p)
    return math.exp(entropy)


def random_pair(seed: int, n: int, d1: int, d2: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d1)) * rng.uniform(0.1, 10, size=d1) + rng.normal(size=d1) * 5
    mix = rng.normal(size=(d1, d2))
    y = 0.7 * x @ mix + rng.normal(size=(n, d2))  # correlated with x, not trivially
    return x, y


def random_orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


shapes = st.tuples(st.integers(0, 2**32 - 1), st.integers(3, 24), st.integers(1, 9),
                   st.integers(1, 9))


# ---------------------------------------------------------------- centre
def test_centre_subtracts_column_means_in_float64():
    x = np.array([[1.0, 10.0], [3.0, 20.0], [5.0, 60.0]], dtype=np.float32)
    out = centre(x)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, [[-2.0, -20.0], [0.0, -10.0], [2.0, 30.0]])
    np.testing.assert_array_equal(centre(torch.from_numpy(x)), out)
    assert x[0, 0] == 1.0  # input untouched


def test_centre_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        centre(np.arange(4.0))


# ---------------------------------------------------------------- linear CKA
@FAST
@given(shapes)
def test_cka_matches_gram_form_reference(args):
    x, y = random_pair(*args)
    assert linear_cka(x, y) == pytest.approx(cka_gram_reference(x, y), rel=1e-10, abs=1e-12)


def test_cka_single_feature_is_squared_correlation():
    rng = np.random.default_rng(1)
    x = rng.normal(size=50)
    y = 2 * x + rng.normal(size=50)
    r = np.corrcoef(x, y)[0, 1]
    assert linear_cka(x[:, None], y[:, None]) == pytest.approx(r**2, rel=1e-12)


@FAST
@given(shapes)
def test_cka_properties(args):
    seed, n, d1, d2 = args
    x, y = random_pair(seed, n, d1, d2)
    rng = np.random.default_rng(seed + 1)
    value = linear_cka(x, y)
    assert -1e-12 <= value <= 1 + 1e-12
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(y, x) == pytest.approx(value, abs=1e-12)
    q1, q2 = random_orthogonal(rng, d1), random_orthogonal(rng, d2)
    assert linear_cka(x @ q1, y) == pytest.approx(value, abs=1e-10)
    assert linear_cka(x, y @ q2) == pytest.approx(value, abs=1e-10)
    assert linear_cka(x * 37.5, y) == pytest.approx(value, abs=1e-12)
    assert linear_cka(x, y * -0.01) == pytest.approx(value, abs=1e-12)
    shift = rng.normal(size=d1) * 1e3
    assert linear_cka(x + shift, y) == pytest.approx(value, abs=1e-9)


def test_cka_is_not_invariant_to_anisotropic_scaling():
    # guards against a metric that would pass the invariance tests trivially (e.g. constant)
    x, y = random_pair(3, 40, 4, 4)
    x2 = x * np.array([1.0, 100.0, 1.0, 1.0])
    assert abs(linear_cka(x2, y) - linear_cka(x, y)) > 1e-3
    assert linear_cka(x, np.random.default_rng(0).normal(size=(40, 4))) < 0.5


def test_cka_independent_inputs_much_smaller_than_related():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2000, 8))
    assert linear_cka(x, rng.normal(size=(2000, 8))) < 0.05


def test_cka_low_precision_inputs():
    x, y = random_pair(7, 200, 16, 12)
    exact = linear_cka(x, y)
    assert linear_cka(x.astype(np.float32), y.astype(np.float32)) == pytest.approx(exact, abs=1e-6)
    tx, ty = torch.from_numpy(x).float(), torch.from_numpy(y).float()
    assert linear_cka(tx, ty) == pytest.approx(exact, abs=1e-6)
    for dtype in (torch.float16, torch.bfloat16):
        lx, ly = tx.to(dtype), ty.to(dtype)
        # the cast to float64 is exact, so the low-precision path must equal the float64 one
        expected = linear_cka(lx.double().numpy(), ly.double().numpy())
        assert linear_cka(lx, ly) == expected
        assert linear_cka(lx, ly) == pytest.approx(exact, abs=5e-2)


def test_cka_large_offset_float32_input_still_accurate():
    # centring happens in float64 after the cast: a large common offset must not hurt
    x, y = random_pair(11, 300, 8, 8)
    exact = linear_cka(x, y)
    x32, y32 = (x + 1e3).astype(np.float32), (y - 1e3).astype(np.float32)
    assert linear_cka(x32, y32) == pytest.approx(exact, abs=1e-5)


@pytest.mark.parametrize("constant", [0.0, 0.1, 1e6, -3.3])
def test_cka_constant_input_is_nan_without_warning(constant):
    x, _ = random_pair(2, 10, 3, 3)
    c = np.full((10, 3), constant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(linear_cka(c, x))
        assert math.isnan(linear_cka(x, c))
        assert math.isnan(linear_cka(c, c))
        assert math.isnan(linear_cka(x[:1], x[:1]))  # one sample: no variance


def test_cka_one_constant_column_is_still_defined():
    x, y = random_pair(4, 30, 3, 3)
    x[:, 1] = 0.1
    assert linear_cka(x, y) == pytest.approx(cka_gram_reference(x, y), rel=1e-10)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_cka_non_finite_input_is_nan_without_warning(bad):
    x, y = random_pair(6, 12, 3, 2)
    x[4, 1] = bad
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(linear_cka(x, y))
        assert math.isnan(linear_cka(y, x))


def test_cka_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(6, 3\)"):
        linear_cka(np.ones((5, 3)), np.ones((6, 3)))
    with pytest.raises(ValueError, match="2-D"):
        linear_cka(np.ones(5), np.ones((5, 1)))


# ---------------------------------------------------------------- CKAReference
@FAST
@given(shapes)
def test_reference_path_equals_linear_cka(args):
    seed, n, d1, d2 = args
    _, y = random_pair(seed, n, d1, d2)
    ref = CKAReference.from_activations(y)
    for k in range(3):
        x, _ = random_pair(seed + k, n, d1, d2)
        np.testing.assert_allclose(linear_cka_to_reference(x, ref), linear_cka(x, y),
                                   rtol=1e-12, atol=1e-12)


def test_reference_is_centred_once_and_immutable():
    x, y = random_pair(8, 20, 4, 5)
    ref = CKAReference.from_activations(torch.from_numpy(y).float())
    assert ref.shape == (20, 5)
    np.testing.assert_allclose(ref.centred.mean(axis=0), 0.0, atol=1e-12)
    yc = ref.centred
    assert ref.self_norm == pytest.approx(np.linalg.norm(yc.T @ yc, "fro"), rel=1e-14)
    with pytest.raises(ValueError):
        ref.centred[0, 0] = 1.0
    before = ref.centred.copy()
    linear_cka_to_reference(x, ref)
    np.testing.assert_array_equal(ref.centred, before)


def test_reference_undefined_and_mismatch():
    ref = CKAReference.from_activations(np.full((6, 2), 0.1))
    assert not ref.defined
    assert math.isnan(linear_cka_to_reference(np.random.default_rng(0).normal(size=(6, 2)), ref))
    good = CKAReference.from_activations(np.random.default_rng(0).normal(size=(6, 2)))
    with pytest.raises(ValueError, match=r"\(7, 2\).*\(6, 2\)"):
        linear_cka_to_reference(np.ones((7, 2)), good)


# ---------------------------------------------------------------- effective rank
@FAST
@given(st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=30))
def test_effective_rank_matches_reference(values):
    if sum(values) == 0:
        assert math.isnan(effective_rank(np.array(values)))
        return
    er = effective_rank(np.array(values))
    assert er == pytest.approx(effective_rank_reference(values), rel=1e-9)
    assert 1 - 1e-9 <= er <= sum(v > 0 for v in values) + 1e-9


def test_effective_rank_known_values():
    assert effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-15)
    assert effective_rank(np.array([1.0, 1.0, 0.0, 0.0])) == pytest.approx(2.0, rel=1e-14)
    assert effective_rank(np.ones(7) * 3.2) == pytest.approx(7.0, rel=1e-14)
    # p = (3/4, 1/4): H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert effective_rank([3.0, 1.0]) == pytest.approx(math.exp(h), rel=1e-14)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert effective_rank(np.array([4.0, 2.0])) == effective_rank(np.array([2.0, 4.0]))
    assert effective_rank([2.0, 5e-324]) == pytest.approx(1.0)  # underflowing p: 0 log 0
    assert effective_rank([1e308, 1e308, 1e308]) == pytest.approx(3.0)  # sum would overflow


def test_effective_rank_of_matrices():
    assert effective_rank(singular_values(np.eye(9))) == pytest.approx(9.0, rel=1e-12)
    rank1 = np.outer(np.arange(1.0, 6.0), np.arange(1.0, 9.0))
    assert effective_rank(singular_values(rank1)) == pytest.approx(1.0, abs=1e-6)
    assert math.isnan(effective_rank(singular_values(np.zeros((4, 6)))))


@pytest.mark.parametrize("values", [[], [0.0, 0.0], [1.0, np.nan], [np.inf, 1.0]])
def test_effective_rank_undefined_is_nan(values):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(effective_rank(np.array(values, dtype=np.float64)))


def test_effective_rank_errors():
    with pytest.raises(ValueError, match="-0.5"):
        effective_rank(np.array([1.0, -0.5, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        effective_rank(np.ones((2, 2)))


# ---------------------------------------------------------------- PER and divisors
def test_per_is_effective_rank_over_divisor():
    s = np.array([4.0, 3.0, 2.0, 1.0])
    assert proportional_effective_rank(s, 4) == pytest.approx(effective_rank_reference(
        [4, 3, 2, 1]) / 4, rel=1e-14)
    assert proportional_effective_rank(np.ones(5), 5) == pytest.approx(1.0)
    assert proportional_effective_rank(s, np.int64(4)) == proportional_effective_rank(s, 4)
    # larger divisor than values: nothing to truncate
    assert proportional_effective_rank(s, 8) == pytest.approx(effective_rank(s) / 8, rel=1e-14)


def test_per_truncates_to_top_divisor_values_like_the_paper():
    s = np.array([1.0, 4.0, 2.0, 3.0])  # unsorted on purpose
    expected = effective_rank_reference([4.0, 3.0]) / 2
    assert proportional_effective_rank(s, 2) == pytest.approx(expected, rel=1e-14)
    # Gaussian 512 x 2048 (reference-facts): ~0.966 untruncated, ~0.999 with the top 64
    g = np.random.default_rng(0).normal(size=(512, 2048))
    sv = singular_values(g)
    assert proportional_effective_rank(sv, 512) == pytest.approx(0.966, abs=0.005)
    assert proportional_effective_rank(sv, 64) == pytest.approx(0.999, abs=0.002)


@pytest.mark.parametrize("divisor", [0, -3, 2.0, True, "4", None])
def test_per_rejects_bad_divisor(divisor):
    with pytest.raises(ValueError, match="positive integer"):
        proportional_effective_rank(np.ones(4), divisor)


def test_per_divisor_values():
    kw = {"n_singular_values": 512, "hidden_size": 2560, "num_attention_heads": 32}
    assert per_divisor("min_dim", **kw) == 512
    assert per_divisor("head_dim", **kw) == 80
    assert per_divisor("hidden", **kw) == 2560
    assert per_divisor("head_dim", n_singular_values=512, hidden_size=512,
                       num_attention_heads=8) == 64
    assert set(PER_DIVISORS) == {"min_dim", "head_dim", "hidden"}
    assert DEFAULT_PER_DIVISOR == "min_dim"


def test_per_divisor_errors_name_value_and_allowed():
    with pytest.raises(ValueError) as err:
        per_divisor("heads", n_singular_values=4, hidden_size=8, num_attention_heads=2)
    msg = str(err.value)
    assert "'heads'" in msg and all(k in msg for k in PER_DIVISORS)
    with pytest.raises(ValueError, match="positive"):
        per_divisor("head_dim", n_singular_values=4, hidden_size=8, num_attention_heads=0)
    with pytest.raises(ValueError, match="positive"):
        per_divisor("min_dim", n_singular_values=0, hidden_size=8, num_attention_heads=2)


# ---------------------------------------------------------------- Matthews correlation
def test_mcc_hand_computed_table():
    # TP=3, FN=1, FP=1, TN=3: (9 - 1) / sqrt(4 * 4 * 4 * 4) = 0.5
    a = np.array([1, 1, 1, 1, 0, 0, 0, 0], dtype=bool)
    b = np.array([1, 1, 1, 0, 1, 0, 0, 0], dtype=bool)
    assert matthews_corrcoef(a, b) == pytest.approx(0.5, abs=1e-15)
    # TP=2, FN=1, FP=0, TN=1: (2 - 0) / sqrt(2 * 3 * 1 * 2) = 2 / sqrt(12)
    a2, b2 = [True, True, True, False], [True, True, False, False]
    assert matthews_corrcoef(a2, b2) == pytest.approx(2 / math.sqrt(12), rel=1e-14)
    assert matthews_corrcoef(a, a) == 1.0
    assert matthews_corrcoef(a, ~a) == -1.0
    assert matthews_corrcoef([1, 0, 1], [1, 0, 0]) == pytest.approx(0.5)


@FAST
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=0, max_size=40))
def test_mcc_matches_corrcoef_and_reason(pairs):
    a = np.array([p[0] for p in pairs], dtype=bool)
    b = np.array([p[1] for p in pairs], dtype=bool)
    mcc = matthews_corrcoef(a, b)
    reason = mcc_undefined_reason(a, b)
    defined = a.size > 0 and 0 < a.sum() < a.size and 0 < b.sum() < b.size
    assert (reason is None) == defined
    if defined:
        expected = np.corrcoef(a.astype(float), b.astype(float))[0, 1]
        assert mcc == pytest.approx(expected, abs=1e-12)
    else:
        assert math.isnan(mcc)


def test_mcc_undefined_reasons_use_names():
    early = np.ones(6, dtype=bool)
    mixed = np.array([1, 0, 1, 0, 1, 0], dtype=bool)
    names = {"a_name": "early convergence", "b_name": "large PER"}
    assert mcc_undefined_reason(early, mixed, **names) == "all 6 layers have early convergence"
    assert mcc_undefined_reason(mixed, ~early, **names) == "no layer has large PER"
    assert mcc_undefined_reason([], [], **names) == "no layers to compare"
    assert mcc_undefined_reason(mixed, ~mixed, **names) is None
    assert math.isnan(matthews_corrcoef(early, mixed))
    assert math.isnan(matthews_corrcoef([], []))


def test_mcc_errors():
    with pytest.raises(ValueError, match="same length"):
        matthews_corrcoef([True, False], [True])
    with pytest.raises(ValueError, match="boolean"):
        matthews_corrcoef([0.5, 1.0], [1, 0])


# ---------------------------------------------------------------- singular values
@FAST
@given(st.integers(0, 2**32 - 1), st.integers(1, 30), st.integers(1, 30))
def test_singular_values_match_numpy_svd(seed, m, n):
    a = np.random.default_rng(seed).normal(size=(m, n)) * 3.0
    sv = singular_values(a)
    ref = np.linalg.svd(a, compute_uv=False)
    assert sv.dtype == np.float64 and sv.shape == (min(m, n),)
    assert np.all(np.diff(sv) <= 0) and np.all(sv >= 0)
    np.testing.assert_allclose(sv, ref, rtol=1e-9, atol=1e-7 * ref[0])


def test_singular_values_torch_inputs_and_rank_deficiency():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(16, 64))  # D x 4D
    ref = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(singular_values(torch.from_numpy(a)), ref, rtol=1e-10)
    t32 = torch.from_numpy(a).float()
    np.testing.assert_allclose(singular_values(t32),
                               np.linalg.svd(t32.double().numpy(), compute_uv=False), rtol=1e-10)
    bf = torch.from_numpy(a).to(torch.bfloat16)
    assert singular_values(bf).dtype == np.float64
    low = rng.normal(size=(20, 3)) @ rng.normal(size=(3, 12))  # rank 3
    sv = singular_values(low)
    assert np.all(np.isfinite(sv)) and np.all(sv >= 0)
    assert np.all(sv[3:] < 1e-6 * sv[0]) and np.all(sv[:3] > 1e-2)
    ro = a.copy()
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(singular_values(ro), ref, rtol=1e-10)


def test_singular_values_non_finite_and_shapes():
    a = np.ones((3, 5))
    a[1, 2] = np.nan
    out = singular_values(a)
    assert out.shape == (3,) and np.all(np.isnan(out))
    assert np.all(np.isnan(singular_values(torch.full((6, 2), float("inf")))))
    assert singular_values(np.zeros((0, 4))).shape == (0,)
    np.testing.assert_array_equal(singular_values(np.zeros((3, 4))), np.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        singular_values(np.ones(3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_singular_values_on_cuda():
    a = np.random.default_rng(0).normal(size=(64, 256))
    out = singular_values(torch.from_numpy(a).cuda().float())
    np.testing.assert_allclose(out, np.linalg.svd(a.astype(np.float32).astype(np.float64),
                                                  compute_uv=False), rtol=1e-9)


# ------------------------------------------------------------- random-matrix PER baseline


def _mc_per(shape, divisor, truncate, draws, seed):
    """An independent Monte-Carlo estimate: numpy's SVD and the formula written out."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        s = np.linalg.svd(rng.standard_normal(shape), compute_uv=False)
        s = np.sort(s)[::-1][:divisor] if truncate else s
        p = s / s.sum()
        values.append(np.exp(-np.sum(p * np.log(p))) / divisor)
    return np.mean(values), np.std(values, ddof=1) / np.sqrt(draws)


@pytest.mark.parametrize(("shape", "divisor", "truncate"),
                         [((32, 32), 32, True), ((48, 192), 48, True), ((64, 256), 16, True),
                          ((40, 40), 20, False)])
def test_random_gaussian_per_agrees_with_an_independent_monte_carlo(shape, divisor, truncate):
    from lmdynamics.estimators.rank import random_gaussian_per

    base = random_gaussian_per(shape, divisor, truncate=truncate)
    mean, se = _mc_per(shape, divisor, truncate, 200, seed=99)
    assert base.samples >= 4 and base.stderr > 0
    assert abs(base.mean - mean) < 4 * math.hypot(se, base.stderr), (base, mean, se)
    again = random_gaussian_per(shape, divisor, truncate=truncate)
    assert again is base  # cached per shape
    other = random_gaussian_per(shape, divisor, truncate=truncate, seed=1)
    assert other.mean != base.mean  # a different seed draws different matrices


def test_random_gaussian_per_reaches_the_marchenko_pastur_limit():
    from lmdynamics.estimators.rank import marchenko_pastur_per, random_gaussian_per

    assert marchenko_pastur_per(1.0) == pytest.approx(0.8050, abs=1e-4)
    assert marchenko_pastur_per(0.25) == pytest.approx(0.9662, abs=1e-4)
    square = random_gaussian_per((400, 400), 400, samples=4)
    assert square.mean == pytest.approx(marchenko_pastur_per(1.0), abs=3e-3)
    wide = random_gaussian_per((200, 800), 200, samples=4)
    assert wide.mean == pytest.approx(marchenko_pastur_per(0.25), abs=2e-3)
    # smaller matrices sit below the limit, approaching it as n grows (finite-size effect)
    small = random_gaussian_per((16, 16), 16, samples=64).mean
    assert small < square.mean < marchenko_pastur_per(1.0) + 1e-3
    with pytest.raises(ValueError, match="aspect"):
        marchenko_pastur_per(1.5)


def test_marchenko_pastur_per_against_scipy_quadrature():
    integrate = pytest.importorskip("scipy.integrate")
    from lmdynamics.estimators.rank import marchenko_pastur_per

    for c in (1.0, 0.5, 0.25, 0.1):
        a, b = (1 - np.sqrt(c)) ** 2, (1 + np.sqrt(c)) ** 2

        def moment(g, a=a, b=b, c=c):
            f = lambda x: np.sqrt((b - x) * (x - a)) / (2 * np.pi * c * x) * g(x)  # noqa: E731
            return integrate.quad(f, a, b, limit=200)[0]

        m1 = moment(np.sqrt)
        m2 = moment(lambda x: np.sqrt(x) * 0.5 * np.log(x))
        assert marchenko_pastur_per(c) == pytest.approx(np.exp(np.log(m1) - m2 / m1), abs=1e-6)

"""Pure metric functions: linear CKA, effective rank, PER, singular values, Matthews correlation.

Inputs are numpy arrays or torch tensors (any float dtype, any device) where stated; every
result is computed in float64 and returned as a Python ``float`` or a numpy ``float64`` array.
Undefined values (zero variance, non-finite input, all-zero spectra, one-class labels) are NaN,
never an exception or a warning: callers know the size, step and layer and add that context.
Sources for the choices below: ``shared/notes/reference-facts.md`` (what the paper's code and
pico-analyze do) and ``shared/notes/ecosystem-facts.md`` ("Numerics": what is fast and exact).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = [
    "DEFAULT_PER_DIVISOR",
    "PER_DIVISORS",
    "CKAReference",
    "RandomPER",
    "centre",
    "effective_rank",
    "linear_cka",
    "linear_cka_to_reference",
    "marchenko_pastur_per",
    "matthews_corrcoef",
    "mcc_undefined_reason",
    "per_divisor",
    "proportional_effective_rank",
    "random_gaussian_per",
    "singular_values",
]

#: Allowed divisors of the proportional effective rank (see :func:`per_divisor`).
PER_DIVISORS: tuple[str, ...] = ("min_dim", "head_dim", "hidden")
#: pico-analyze's choice: divide by the number of singular values, min(m, n).
DEFAULT_PER_DIVISOR = "min_dim"


def _to_float64(x: Any) -> np.ndarray:
    """numpy float64 copy-or-view of a numpy array / torch tensor (any dtype or device)."""
    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _as_2d(x: Any, name: str) -> np.ndarray:
    arr = _to_float64(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, features); got shape {arr.shape}")
    return arr


def _undefined(x: np.ndarray) -> bool:
    """True when ``x`` (n, d) has non-finite entries or zero variance (every row identical).

    Compared exactly, row against row: the centred copy of a constant column such as 0.1 need
    not be exactly zero, so testing the centred matrix for zeros would miss it.
    """
    if x.size == 0 or x.shape[0] < 2 or not np.isfinite(x).all():
        return True
    return bool((x == x[:1]).all())


def centre(x: Any) -> np.ndarray:
    """Subtract column means: ``x - x.mean(axis=0)`` in float64.

    ``x``: numpy array or torch tensor of shape (n samples, d features), any float dtype.
    Returns a new float64 numpy array of shape (n, d) whose columns have mean zero.
    """
    arr = _as_2d(x, "x")
    return arr - arr.mean(axis=0, keepdims=True)


@dataclass(frozen=True, eq=False)
class CKAReference:
    """Reference activations for many linear-CKA evaluations against the same matrix.

    Holds the centred reference ``centred`` (n, d2) float64 (read-only) and its self-product
    norm ``self_norm`` = ||Yc^T Yc||_F, computed once, so comparing every training step with
    the final step does not recentre and re-multiply the final step each time.
    ``defined`` is False when the reference has zero variance or non-finite values; every
    CKA against it is then NaN. Build with :meth:`from_activations`.
    """

    centred: np.ndarray
    self_norm: float
    defined: bool

    @classmethod
    def from_activations(cls, y: Any) -> CKAReference:
        """Centre ``y`` (n, d2) (numpy or torch, any float dtype) and compute ||Yc^T Yc||_F."""
        arr = _as_2d(y, "y")
        defined = not _undefined(arr)
        with np.errstate(all="ignore"):  # inf - inf when undefined: NaN, reported as NaN CKA
            yc = arr - arr.mean(axis=0, keepdims=True)
        norm = float(np.linalg.norm(yc.T @ yc)) if defined else math.nan
        yc.setflags(write=False)
        return cls(centred=yc, self_norm=norm, defined=defined and norm > 0.0)

    @property
    def shape(self) -> tuple[int, int]:
        """Shape (n samples, d2 features) of the reference activations."""
        return self.centred.shape  # type: ignore[return-value]


def linear_cka_to_reference(x: Any, ref: CKAReference) -> float:
    """Linear CKA of activations ``x`` (n, d1) against a precomputed :class:`CKAReference`.

    Same value as ``linear_cka(x, y)`` for ``ref = CKAReference.from_activations(y)`` (that
    function is this one). Raises ValueError if ``x`` is not 2-D or its n differs from the
    reference's; returns NaN when either side has zero variance or non-finite values.
    """
    arr = _as_2d(x, "x")
    if arr.shape[0] != ref.shape[0]:
        raise ValueError(f"linear CKA needs the same number of samples (rows): x has shape "
                         f"{arr.shape}, y has shape {ref.shape}")
    if not ref.defined or _undefined(arr):
        return math.nan
    xc = arr - arr.mean(axis=0, keepdims=True)
    x_norm = float(np.linalg.norm(xc.T @ xc))
    if x_norm == 0.0:
        return math.nan
    cross = ref.centred.T @ xc  # (d2, d1): feature-space form, memory O(d1 d2), never O(n^2)
    return float(np.vdot(cross, cross) / (x_norm * ref.self_norm))


def linear_cka(x: Any, y: Any) -> float:
    """Linear CKA (Kornblith et al. 2019), biased HSIC estimator, in feature-space form.

    ``CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F)`` with ``Xc``, ``Yc`` the
    column-centred inputs. ``x``: (n, d1), ``y``: (n, d2), numpy arrays or torch tensors of
    any float dtype (float16/bfloat16/float32/float64); everything is cast to float64 and
    centred before any product. Dimensionless, in [0, 1]. The biased estimator is inflated
    when n is not much larger than d (reference-facts: "Known estimator issues").

    Returns NaN (no warning) when either input has zero variance (all columns constant) or
    non-finite values; raises ValueError when the inputs are not 2-D or differ in n.
    """
    arr = _as_2d(x, "x")
    other = _as_2d(y, "y")
    if arr.shape[0] != other.shape[0]:
        raise ValueError(f"linear CKA needs the same number of samples (rows): x has shape "
                         f"{arr.shape}, y has shape {other.shape}")
    return linear_cka_to_reference(arr, CKAReference.from_activations(other))


def effective_rank(singular_values: Any) -> float:
    """Effective rank (Roy & Vetterli 2007) of a 1-D array of non-negative singular values.

    ``p = s / sum(s)``, ``H = -sum(p log p)`` (natural log, 0 log 0 = 0), result ``exp(H)``,
    a real number between 1 and the number of non-zero values. Empty, all-zero or non-finite
    input gives NaN (an all-zero matrix has no defined rank, never 0 or 1). Raises
    ValueError for input that is not 1-D or has negative entries.
    """
    s = _to_float64(singular_values)
    if s.ndim != 1:
        raise ValueError(f"singular_values must be 1-D; got shape {s.shape}")
    if s.size == 0 or not np.isfinite(s).all():
        return math.nan
    if s.min() < 0:
        raise ValueError(f"singular values must be non-negative; the smallest is {s.min()!r}")
    top = s.max()
    if top == 0.0:
        return math.nan
    p = s / top  # scale first: the sum of huge values must not overflow
    p /= p.sum()
    p = p[p > 0]  # after dividing: tiny (subnormal) values may underflow to 0
    return float(np.exp(-np.sum(p * np.log(p))))


def proportional_effective_rank(singular_values: Any, divisor: int, *,
                                truncate: bool = True) -> float:
    """Proportional effective rank (PER): effective rank of the top ``divisor`` values / divisor.

    ``singular_values``: 1-D, non-negative. With ``truncate`` (default), as in the paper's
    code (reference-facts, "What the paper's code measured"), the values are sorted
    descending and truncated to the first ``divisor`` before the effective rank, so PER lies
    in (0, 1]. The truncation only acts when ``divisor`` is smaller than the number of
    values: with the default divisor (``min_dim`` = number of singular values) it keeps
    every value; with ``head_dim`` it changes the result (Gaussian 512x2048: 0.966
    untruncated vs 0.999). ``truncate=False`` uses every value (PER may then exceed 1 when
    ``divisor`` is smaller than the effective rank). If ``divisor`` exceeds the number of
    values, all are kept (PER <= count / divisor). Raises ValueError unless ``divisor`` is a
    positive integer. NaN as in :func:`effective_rank`.
    """
    if (isinstance(divisor, bool) or not isinstance(divisor, int | np.integer)
            or divisor <= 0):
        raise ValueError(f"divisor must be a positive integer; got {divisor!r}")
    s = _to_float64(singular_values)
    if truncate and s.ndim == 1 and s.size > divisor:
        s = np.sort(s)[::-1][:divisor]
    return effective_rank(s) / int(divisor)


def per_divisor(kind: str, *, n_singular_values: int, hidden_size: int,
                num_attention_heads: int) -> int:
    """The divisor (and truncation) of the proportional effective rank, by name.

    - ``"min_dim"`` (default, pico-analyze): ``n_singular_values`` = min(m, n) of the matrix;
    - ``"head_dim"`` (the paper's code, attention and MLP alike): hidden_size //
      num_attention_heads, e.g. 64 for pythia-70m, 80 for pythia-2.8b;
    - ``"hidden"``: ``hidden_size``.

    Raises ValueError for an unknown ``kind`` (naming the allowed ones, :data:`PER_DIVISORS`)
    or when the resulting divisor is not positive.
    """
    if kind not in PER_DIVISORS:
        raise ValueError(f"unknown PER divisor {kind!r}; allowed: {', '.join(PER_DIVISORS)}")
    if kind == "min_dim":
        value = n_singular_values
    elif kind == "hidden":
        value = hidden_size
    else:
        if num_attention_heads <= 0:
            raise ValueError(f"num_attention_heads must be positive; got {num_attention_heads}")
        value = hidden_size // num_attention_heads
    if int(value) <= 0:
        raise ValueError(f"PER divisor {kind!r} is {value} (n_singular_values="
                         f"{n_singular_values}, hidden_size={hidden_size}, "
                         f"num_attention_heads={num_attention_heads}); it must be positive")
    return int(value)


#: Monte-Carlo draws of :func:`random_gaussian_per`: at least the first, at most the second,
#: else as many as fit in :data:`RANDOM_PER_ELEMENTS` matrix entries (big matrices barely
#: vary: 512 x 2048 has a standard deviation of 1.5e-4 between draws).
RANDOM_PER_SAMPLES: tuple[int, int] = (4, 64)
RANDOM_PER_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class RandomPER:
    """PER of an i.i.d. Gaussian matrix: Monte-Carlo ``mean``, its standard error, draws."""

    mean: float
    stderr: float
    samples: int


@functools.cache
def random_gaussian_per(shape: tuple[int, int], divisor: int, *, truncate: bool = True,
                        samples: int | None = None, seed: int = 0) -> RandomPER:
    """Expected PER of an ``shape`` matrix of i.i.d. standard Gaussian entries (the baseline).

    The same definition as :func:`proportional_effective_rank` (``divisor``, ``truncate``),
    averaged over ``samples`` seeded draws (default: :data:`RANDOM_PER_SAMPLES` /
    :data:`RANDOM_PER_ELEMENTS`); singular values by LAPACK in float64. The draws depend only
    on ``(seed, shape)``, and results are cached per argument set, so every layer and step of
    one shape shares one baseline. PER is scale-free, so the entries' variance does not
    matter. Measured: square matrices 0.801 (32), 0.803 (64), 0.804 (512), the large-n limit
    0.805 (:func:`marchenko_pastur_per`); D x 4D 0.966. With ``divisor`` = head dim and
    truncation (the paper's code) a random matrix scores about 0.99.
    """
    m, n = (int(v) for v in shape)
    if m <= 0 or n <= 0:
        raise ValueError(f"shape must be positive; got {shape!r}")
    if samples is None:
        low, high = RANDOM_PER_SAMPLES
        samples = max(low, min(high, RANDOM_PER_ELEMENTS // (m * n)))
    if samples < 2:
        raise ValueError(f"samples must be >= 2 to estimate an error; got {samples}")
    rng = np.random.default_rng([int(seed), m, n])
    values = np.array([
        proportional_effective_rank(np.linalg.svd(rng.standard_normal((m, n)),
                                                  compute_uv=False), divisor,
                                    truncate=truncate)
        for _ in range(samples)])
    return RandomPER(mean=float(values.mean()),
                     stderr=float(values.std(ddof=1) / math.sqrt(samples)), samples=samples)


def marchenko_pastur_per(aspect: float, *, nodes: int = 400) -> float:
    """Large-n limit of the untruncated ``min_dim`` PER of a Gaussian matrix, ``aspect`` = m/n.

    With ``aspect`` = min(m, n) / max(m, n) = c in (0, 1], the squared singular values of
    ``X / sqrt(max)`` follow the Marchenko-Pastur law on [(1 - sqrt c)^2, (1 + sqrt c)^2],
    and PER = ER / min(m, n) -> exp(log E[s] - E[s log s] / E[s]) for singular values s.
    Integrated by Gauss-Legendre over the angle x = mid + half-width cos(t), which removes
    the square-root endpoints. c = 1: 0.8050; c = 1/4: 0.9662.
    """
    c = float(aspect)
    if not 0.0 < c <= 1.0:
        raise ValueError(f"aspect must be in (0, 1]; got {aspect!r}")
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    t, w = np.polynomial.legendre.leggauss(nodes)
    t = (t + 1) * (math.pi / 2)  # [-1, 1] -> [0, pi]
    w = w * (math.pi / 2)
    x = (a + b) / 2 + (b - a) / 2 * np.cos(t)
    density = ((b - a) / 2) ** 2 * np.sin(t) ** 2 / (2 * math.pi * c * x)  # f(x) dx/dt
    s = np.sqrt(x)
    mean_s = float(np.sum(w * density * s))
    mean_slogs = float(np.sum(w * density * s * np.log(s)))
    return math.exp(math.log(mean_s) - mean_slogs / mean_s)


def _as_bool_1d(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D; got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1); got dtype {arr.dtype}")
        arr = arr.astype(bool)
    return arr


def _bool_pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_bool_1d(a, "a"), _as_bool_1d(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same length; got {a.size} and {b.size}")
    return a, b


def matthews_corrcoef(a: Any, b: Any) -> float:
    """Matthews correlation (phi coefficient) of two boolean 1-D arrays of equal length.

    ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``, the same as ``np.corrcoef`` of
    the booleans (the paper's code), in [-1, 1]. NaN when undefined: empty input or either
    variable constant (see :func:`mcc_undefined_reason`). Raises ValueError on a length
    mismatch or non-boolean values.
    """
    a, b = _bool_pair(a, b)
    tp, tn = int(np.sum(a & b)), int(np.sum(~a & ~b))
    fp, fn = int(np.sum(~a & b)), int(np.sum(a & ~b))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)  # exact integer arithmetic
    if denom == 0:
        return math.nan
    return float((tp * tn - fp * fn) / math.sqrt(denom))


def mcc_undefined_reason(a: Any, b: Any, *, a_name: str = "a", b_name: str = "b",
                         item: str = "layer") -> str | None:
    """Short reason why :func:`matthews_corrcoef` of ``a`` and ``b`` is undefined, else None.

    ``a_name``/``b_name`` name the properties the booleans mark and ``item`` what they are
    counted over: ``a_name="early convergence"``, ``b_name="large PER"`` give reasons such as
    "all 6 layers have early convergence" or "no layer has large PER".
    """
    a, b = _bool_pair(a, b)
    if a.size == 0:
        return f"no {item}s to compare"
    for name, x in ((a_name, a), (b_name, b)):
        if x.all():
            return f"all {x.size} {item}s have {name}" if x.size > 1 else f"the {item} has {name}"
        if not x.any():
            return f"no {item} has {name}"
    return None


def singular_values(matrix: Any) -> np.ndarray:
    """Singular values, descending, float64, of a matrix (m, n) or a stack of them (..., m, n).

    ``matrix``: numpy array or torch tensor, any float dtype and device. Computed as the
    square roots of the eigenvalues of the Gram matrix of the smaller side, formed in float64
    on the tensor's own device; tiny negative eigenvalues from rounding are clipped to 0.
    A stack (e.g. one component's write matrices over layers) is one batched call. Within
    ~1e-13 of ``svdvals`` relative to the largest value for well-conditioned matrices, and
    4-16x faster for D x 4D (ecosystem-facts, "Numerics"); values far below
    ``sqrt(eps) * max`` lose relative accuracy, which effective ranks do not feel.
    On the CPU the eigenvalues come from numpy's LAPACK (``np.linalg.eigvalsh``): torch's
    CPU ``eigvalsh`` (MKL) took 820 ms for one 512 x 512 Gram matrix on the AMD EPYC we
    benchmark on, numpy 10 ms (benchmarks/RESULTS.md); on a GPU it stays on the device.
    Returns shape (..., min(m, n)); all NaN for a matrix with a non-finite entry.
    """
    if isinstance(matrix, torch.Tensor):
        t = matrix.detach()
    else:  # a copy: torch warns on read-only arrays (e.g. loaded from zarr)
        t = torch.from_numpy(np.array(matrix, dtype=np.float64))
    if t.ndim < 2:
        raise ValueError(f"matrix must be 2-D (or a stack of 2-D); got shape {tuple(t.shape)}")
    t = t.to(torch.float64)
    m, n = t.shape[-2:]
    k = min(m, n)
    if k == 0 or t.numel() == 0:
        return np.empty((*t.shape[:-2], k), dtype=np.float64)
    finite = torch.isfinite(t).flatten(-2).all(-1)  # (...,)
    gram = t @ t.mT if m <= n else t.mT @ t
    gram = torch.where(finite[..., None, None], gram, 0.0)  # eigvalsh refuses NaN
    if gram.device.type == "cpu":
        eig = np.linalg.eigvalsh(gram.numpy())
    else:
        eig = torch.linalg.eigvalsh(gram).cpu().numpy()
    out = np.sqrt(np.clip(eig[..., ::-1], 0.0, None))
    out[~finite.cpu().numpy()] = np.nan
    return np.ascontiguousarray(out)

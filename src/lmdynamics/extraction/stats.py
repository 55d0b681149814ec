"""Pure statistics of weights, gradients and activations (the Conjecture post's analyses).

Every function takes torch tensors or numpy arrays (any float dtype, any device) and computes
in float64 on the input's device; results are Python floats or float64 numpy arrays.
Undefined values (zero variance, non-finite input, too few values) are NaN, never an
exception: callers know the size, step and parameter and add that context.

- moments: :class:`Moments` (mean, population std, excess kurtosis), merged over chunks so
  large tensors never need one float64 copy;
- distribution shape: :func:`distribution_summary` (std, excess kurtosis, max |x|, quantiles,
  Gaussian and logistic maximum-likelihood fits, Q-Q summaries against both);
- weights against a reference: :func:`compare_to_reference` (distance, relative distance,
  cosine);
- spectra: :func:`power_law_slope` of singular values on log-log axes;
- embeddings: :func:`embedding_correlation`;
- singular directions: :func:`top_left_singular_vectors`, :func:`ov_left_singular_vectors`,
  :func:`direction_closeness`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from lmdynamics.families import Family

#: Quantile probabilities stored for every distribution (0-1).
QUANTILES: tuple[float, ...] = (0.001, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 0.999)
#: The two candidate distributions of the Gaussian-vs-logistic comparison.
DISTRIBUTIONS: tuple[str, ...] = ("gaussian", "logistic")
#: Tail probability of :func:`tail_ratio` (the 1st and 99th percentiles).
TAIL_PROBABILITY = 0.01
_CHUNK = 1 << 24  # elements per float64 chunk when reducing large tensors


def as_float64(x: Any) -> torch.Tensor:
    """Flattened float64 torch tensor of ``x`` (numpy array or tensor), on ``x``'s device."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.float64))
    return t.reshape(-1).to(torch.float64)


@dataclass(frozen=True)
class Moments:
    """Count, mean and sums of 2nd-4th powers of deviations from the mean (float64).

    Merged with :meth:`merge` (Pebay 2008 pairwise update), so a tensor can be reduced
    chunk by chunk with the accuracy of a two-pass computation.
    """

    n: int
    mean: float
    m2: float
    m3: float
    m4: float

    @classmethod
    def of(cls, x: Any) -> Moments:
        """Moments of all elements of ``x`` (any shape), in float64 chunks of 2^24 elements."""
        flat = x.detach().reshape(-1) if isinstance(x, torch.Tensor) else as_float64(x)
        total = cls(0, 0.0, 0.0, 0.0, 0.0)
        for start in range(0, flat.numel(), _CHUNK):
            c = flat[start:start + _CHUNK].to(torch.float64)
            mean = c.mean()
            d = c - mean
            d2 = d * d
            part = cls(c.numel(), float(mean), float(d2.sum()), float((d2 * d).sum()),
                       float((d2 * d2).sum()))
            total = total.merge(part)
        return total

    def merge(self, other: Moments) -> Moments:
        """Moments of the union of two disjoint sets of values."""
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        na, nb = self.n, other.n
        mean = self.mean + delta * nb / n
        m2 = self.m2 + other.m2 + delta**2 * na * nb / n
        m3 = (self.m3 + other.m3 + delta**3 * na * nb * (na - nb) / n**2
              + 3 * delta * (na * other.m2 - nb * self.m2) / n)
        m4 = (self.m4 + other.m4
              + delta**4 * na * nb * (na * na - na * nb + nb * nb) / n**3
              + 6 * delta**2 * (na * na * other.m2 + nb * nb * self.m2) / n**2
              + 4 * delta * (na * other.m3 - nb * self.m3) / n)
        return Moments(n, mean, m2, m3, m4)

    @property
    def std(self) -> float:
        """Population standard deviation (ddof 0); NaN for no values or non-finite input."""
        if self.n == 0 or not math.isfinite(self.m2):
            return math.nan
        return math.sqrt(max(self.m2, 0.0) / self.n)

    @property
    def excess_kurtosis(self) -> float:
        """``n m4 / m2^2 - 3`` (population, = scipy.stats.kurtosis(bias=True)); 0 for a
        Gaussian, 1.2 for a logistic; NaN for constant or non-finite input."""
        if self.n == 0 or not (self.m2 > 0.0) or not math.isfinite(self.m4):
            return math.nan
        return self.n * self.m4 / self.m2**2 - 3.0


def max_abs(x: Any) -> float:
    """Largest absolute value of ``x`` (NaN if ``x`` is empty or holds a NaN)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    if t.numel() == 0 or bool(torch.isnan(t).any()):
        return math.nan
    return float(t.abs().max().to(torch.float64))


def sample_elements(x: Any, max_elements: int, seed: int = 0) -> torch.Tensor:
    """All elements of ``x`` as float64 (1-D) when there are at most ``max_elements``, else a
    seeded uniform sample of ``max_elements`` of them (with replacement), on ``x``'s device."""
    flat = x.detach().reshape(-1) if isinstance(x, torch.Tensor) else as_float64(x)
    n = flat.numel()
    if n <= max_elements:
        return flat.to(torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (max_elements,), generator=gen).to(flat.device)
    return flat[idx].to(torch.float64)


def sorted_quantiles(sorted_x: torch.Tensor, probs: Sequence[float]) -> np.ndarray:
    """Quantiles of an ascending 1-D tensor by linear interpolation (numpy's default method).

    Returns float64 (len(probs),); NaN if the tensor is empty.
    """
    n = sorted_x.numel()
    if n == 0:
        return np.full(len(probs), np.nan)
    pos = torch.tensor(probs, dtype=torch.float64, device=sorted_x.device) * (n - 1)
    lo = pos.floor().long()
    hi = torch.clamp(lo + 1, max=n - 1)
    frac = pos - lo
    q = sorted_x[lo] * (1 - frac) + sorted_x[hi] * frac
    return q.cpu().numpy()


def standard_quantiles(probs: torch.Tensor, dist: str) -> torch.Tensor:
    """Quantile function of the standard ``dist`` (gaussian: N(0,1); logistic: scale 1)."""
    if dist == "gaussian":
        return torch.special.ndtri(probs)
    if dist == "logistic":
        return torch.log(probs) - torch.log1p(-probs)
    raise ValueError(f"unknown distribution {dist!r}; allowed: {', '.join(DISTRIBUTIONS)}")


def gaussian_fit(x: torch.Tensor) -> tuple[float, float, float]:
    """Maximum-likelihood Gaussian of the 1-D float64 sample ``x``: (mean, sigma, mean
    log-likelihood per element in nats) = (mean, population std, -log(2 pi sigma^2)/2 - 1/2).
    NaN when sigma is 0 or the sample is empty or non-finite."""
    if x.numel() == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    sigma = float(torch.sqrt(((x - mean) ** 2).mean()))
    if not (sigma > 0.0 and math.isfinite(sigma)):
        return mean, sigma, math.nan
    return mean, sigma, -0.5 * math.log(2 * math.pi * sigma**2) - 0.5


def logistic_loglik(x: torch.Tensor, mu: float, s: float) -> float:
    """Mean log-density per element of the logistic(mu, s) at the 1-D sample ``x`` (nats)."""
    z = ((x - mu) / s).abs()
    return float((-z - 2 * torch.log1p(torch.exp(-z))).mean()) - math.log(s)


def logistic_fit(x: torch.Tensor, *, tol: float = 1e-10,
                 max_iter: int = 100) -> tuple[float, float, float]:
    """Maximum-likelihood logistic distribution of the 1-D float64 sample ``x``.

    Newton's method on (mu, log s) with backtracking, started from the median and the
    moment estimate ``s = sigma sqrt(3) / pi``; stops when both score equations
    ``mean(tanh(z/2)) = 0`` and ``mean(z tanh(z/2)) = 1`` (z = (x - mu) / s) hold to ``tol``.
    Returns (mu, s, mean log-likelihood per element in nats); NaN when the sample is
    constant, empty or non-finite, or the iteration does not converge.
    """
    nan = (math.nan, math.nan, math.nan)
    if x.numel() < 2 or not bool(torch.isfinite(x).all()):
        return nan
    sigma = float(x.std(correction=0))
    if not sigma > 0.0:
        return nan
    mu, eta = float(x.median()), math.log(sigma * math.sqrt(3) / math.pi)
    ll = logistic_loglik(x, mu, math.exp(eta))
    for _ in range(max_iter):
        s = math.exp(eta)
        z = (x - mu) / s
        t = torch.tanh(z / 2)
        u = (1 - t * t) / 2
        g = np.array([float(t.mean()) / s, float((z * t).mean()) - 1.0])
        if abs(g[0]) * s < tol and abs(g[1]) < tol:
            return float(mu), s, ll
        h = np.array([[-float(u.mean()) / s**2, -float((u * z).mean() + t.mean()) / s],
                      [0.0, -float((z * t + z * z * u).mean())]])
        h[1, 0] = h[0, 1]
        if np.all(np.linalg.eigvalsh(h) < 0):
            step = -np.linalg.solve(h, g)
        else:  # far from the optimum: a gradient step scaled to the parameters
            step = np.array([g[0] * s * s, g[1]]) / 2
        for _ in range(60):  # backtrack until the likelihood does not decrease
            new_mu, new_eta = mu + step[0], eta + step[1]
            new_ll = logistic_loglik(x, new_mu, math.exp(new_eta))
            if new_ll >= ll - 1e-15 * abs(ll):
                break
            step = step / 2
        mu, eta, ll = float(new_mu), float(new_eta), new_ll
    return nan


def ppcc(sorted_x: torch.Tensor, dist: str) -> float:
    """Probability-plot correlation coefficient: Pearson correlation of the ascending sample
    with the standard ``dist`` quantiles at plotting positions (i - 0.5) / n. 1 = a straight
    Q-Q plot (location and scale do not matter); NaN for fewer than 3 values or a constant
    sample."""
    n = sorted_x.numel()
    if n < 3:
        return math.nan
    p = (torch.arange(1, n + 1, dtype=torch.float64, device=sorted_x.device) - 0.5) / n
    q = standard_quantiles(p, dist)
    a, b = sorted_x - sorted_x.mean(), q - q.mean()
    denom = float(torch.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else math.nan


def tail_ratio(sorted_x: torch.Tensor, dist: str, scale: float,
               p: float = TAIL_PROBABILITY) -> float:
    """Empirical over fitted spread between the ``p`` and ``1 - p`` quantiles.

    ``scale`` is the fitted sigma (gaussian) or s (logistic). Above 1: the sample's tails
    are heavier than the fitted distribution's (the Q-Q plot bends away at both ends).
    """
    if not (scale > 0.0 and math.isfinite(scale)):
        return math.nan
    lo, hi = sorted_quantiles(sorted_x, (p, 1 - p))
    std_q = standard_quantiles(torch.tensor([1 - p], dtype=torch.float64), dist)
    return float((hi - lo) / (2 * scale * float(std_q[0])))


def distribution_summary(x: Any, *, max_elements: int = 1 << 16, seed: int = 0,
                         probs: Sequence[float] = QUANTILES) -> dict[str, Any]:
    """Shape of the distribution of all elements of ``x`` (any shape).

    Exact over all elements: ``mean``, ``std`` (population), ``kurtosis`` (excess),
    ``max_abs``. On :func:`sample_elements` (all elements up to ``max_elements``):
    ``quantile`` (len(probs),), and per distribution in :data:`DISTRIBUTIONS` (arrays of
    length 2, that order): ``loglik`` (mean log-likelihood per element of the
    maximum-likelihood fit, nats; comparable between the two), ``ppcc`` (:func:`ppcc`) and
    ``tail_ratio`` (:func:`tail_ratio`); ``logistic_scale`` (fitted s).
    """
    moments = Moments.of(x)
    sample = sample_elements(x, max_elements, seed)
    sorted_x = torch.sort(sample).values
    _, sigma, ll_g = gaussian_fit(sample)
    _, s, ll_l = logistic_fit(sample)
    scales = {"gaussian": sigma, "logistic": s}
    return {
        "mean": moments.mean if moments.n else math.nan,
        "std": moments.std,
        "kurtosis": moments.excess_kurtosis,
        "max_abs": max_abs(x),
        "quantile": sorted_quantiles(sorted_x, probs),
        "loglik": np.array([ll_g, ll_l]),
        "ppcc": np.array([ppcc(sorted_x, d) for d in DISTRIBUTIONS]),
        "tail_ratio": np.array([tail_ratio(sorted_x, d, scales[d]) for d in DISTRIBUTIONS]),
        "logistic_scale": s,
    }


def better_fit(loglik: Sequence[float]) -> str:
    """Name of the distribution (of :data:`DISTRIBUTIONS`) with the larger log-likelihood,
    or ``"undefined"`` when either is NaN."""
    if not all(math.isfinite(v) for v in loglik):
        return "undefined"
    return DISTRIBUTIONS[int(np.argmax(loglik))]


def compare_to_reference(w: Any, ref: Any) -> dict[str, float]:
    """``dist`` = ||w - ref||_F, ``rel_dist`` = dist / ||ref||_F and ``cos`` = <w, ref> /
    (||w|| ||ref||), in float64 over all elements (shapes must match). Relative distance
    and cosine are NaN when a norm is 0 (e.g. a bias initialised to zero)."""
    if tuple(np.shape(w)) != tuple(np.shape(ref)):
        raise ValueError(f"shapes differ: {tuple(np.shape(w))} vs reference "
                         f"{tuple(np.shape(ref))}")
    a = as_float64(w)
    b = as_float64(ref).to(a.device)
    dist = float(torch.linalg.vector_norm(a - b))
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    rel = dist / nb if nb > 0 else math.nan
    cos = float(torch.dot(a, b)) / (na * nb) if na > 0 and nb > 0 else math.nan
    return {"dist": dist, "rel_dist": rel, "cos": cos}


def embedding_correlation(embedding: Any, n_tokens: int = 256) -> np.ndarray:
    """Pearson correlation between the first ``n_tokens`` token embeddings (rows), float64
    (n, n) with n = min(n_tokens, rows); rows of zero variance give NaN rows/columns."""
    t = embedding.detach() if isinstance(embedding, torch.Tensor) else torch.from_numpy(
        np.asarray(embedding))
    e = t[:n_tokens].to(torch.float64)
    e = e - e.mean(dim=1, keepdim=True)
    norms = torch.linalg.vector_norm(e, dim=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (e @ e.T).cpu().numpy() / np.outer(norms.cpu().numpy(), norms.cpu().numpy())
    return np.clip(corr, -1.0, 1.0)


def top_left_singular_vectors(w: Any, k: int) -> torch.Tensor:
    """Left singular vectors of the top ``min(k, rank bound)`` singular values of ``w``
    (m, n), as float64 columns (m, k'), via the eigenvectors of ``w w^T``."""
    t = w.detach() if isinstance(w, torch.Tensor) else torch.from_numpy(np.asarray(w))
    t = t.to(torch.float64)
    k = min(k, *t.shape)
    if t.shape[0] <= t.shape[1]:
        _, vecs = torch.linalg.eigh(t @ t.T)
        return vecs[:, -k:].flip(1)
    u, _, _ = torch.linalg.svd(t, full_matrices=False)
    return u[:, :k]


def ov_left_singular_vectors(w_out: Any, w_value: Any, k: int) -> torch.Tensor:
    """Top-``k`` left singular vectors (d, k') of one head's OV matrix ``w_out @ w_value``.

    ``w_out`` (d, h): the head's columns of ``attention.dense.weight``; ``w_value`` (h, d):
    its value rows of ``query_key_value.weight``. Via a QR of ``w_out``, so the d x d
    product is never formed: O(d h^2).
    """
    o = torch.as_tensor(w_out).detach().to(torch.float64)
    v = torch.as_tensor(w_value).detach().to(torch.float64)
    q, r = torch.linalg.qr(o)
    u, _, _ = torch.linalg.svd(r @ v, full_matrices=False)
    k = min(k, u.shape[1])
    return q @ u[:, :k]


def direction_closeness(u: torch.Tensor, u_ref: torch.Tensor) -> float:
    """Mean over the reference's columns of the best |cosine| with any column of ``u``.

    ``u`` (d, k1), ``u_ref`` (d, k2): orthonormal columns (singular vectors; their sign is
    arbitrary, hence |cosine|). 1 when every reference direction is present in ``u``.
    """
    a = u.to(torch.float64)
    b = u_ref.to(device=a.device, dtype=torch.float64)
    a = a / torch.linalg.vector_norm(a, dim=0, keepdim=True)
    b = b / torch.linalg.vector_norm(b, dim=0, keepdim=True)
    return float((a.T @ b).abs().max(dim=0).values.mean())


def circuit_directions(weights: Callable[[str], torch.Tensor], layer: int, n_heads: int,
                       k: int, family: Family) -> dict[str, list[torch.Tensor]]:
    """Top-k left singular vectors (residual-stream directions) of one layer's MLP write
    matrix (out, in) and of each head's OV (the family's ``ov_weights``). The final
    checkpoint's are computed once per size, into the reference store."""
    mlp_out = family.write_matrix(weights(family.param_name(layer, family.mlp_write)))
    mlp = [top_left_singular_vectors(mlp_out, k)]
    stored, values = family.ov_weights(weights, layer, n_heads)
    out = family.write_matrix(stored)
    head = out.shape[1] // n_heads
    ov = [ov_left_singular_vectors(out[:, h * head:(h + 1) * head], values[h], k)
          for h in range(n_heads)]
    return {"mlp": mlp, "ov": ov}

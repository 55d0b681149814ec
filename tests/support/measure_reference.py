"""Independent float64 references for the measures' tests, written from the publications.

They share no code with ``lmdynamics``:

- Hurley & Rickard 2009 ("Comparing Measures of Sparsity", IEEE Trans. Inf. Theory 55(10)),
  Gini index ``G(c) = 1 - 2 sum_k (c_(k) / ||c||_1) ((N - k + 1/2) / N)`` over the ascending
  magnitudes, and Gini's mean absolute difference ``sum_i sum_j |c_i - c_j| / (2 N^2
  mean(c))``, which equals it;
- Hoyer 2004 (JMLR 5, eq. 1): ``(sqrt(N) - ||c||_1 / ||c||_2) / (sqrt(N) - 1)``;
- google/svcca's ``cca_core`` algorithm (Raghu et al. 2017; github.com/google/svcca, which
  pico-analyze vendors), re-derived from its published description (not copied): covariances
  with ``np.cov``, each block scaled by the largest |entry| of its own covariance, units of
  variance below ``epsilon`` dropped, ``epsilon`` added to both diagonals, the inverse square
  roots from the pseudo-inverse's eigendecomposition, and the canonical correlations as the
  singular values of ``Sxx^-1/2 Sxy Syy^-1/2``; SVCCA as google/svcca's tutorial runs it: each
  side's top singular directions (``variance`` of the centred activations' variance), then
  the mean of those coefficients;
- an attention head's OV circuit ``W_O^h W_V^h`` (Elhage et al. 2021) formed as a d x d
  float64 product from a checkpoint's tensors, sliced by the architectures' documented
  layouts: GPT-NeoX's fused ``query_key_value`` (3d, d) is (heads, [q, k, v], head_dim, d);
  Llama's ``v_proj`` (KV hd, d) is shared by ``H / KV`` consecutive query heads; GPT-2's
  ``c_attn`` is a ``Conv1D`` (d, 3d) whose columns 2d..3d are the values, ``c_proj`` (d, d)
  stores (in, out);
- Roy & Vetterli's effective rank, ``exp`` of the entropy of the L1-normalised spectrum.
"""

from __future__ import annotations

import math

import numpy as np


def gini_hurley_rickard(x) -> float:
    c = np.sort(np.abs(np.asarray(x, dtype=np.float64).ravel()))
    n = c.size
    k = np.arange(1, n + 1)
    return float(1.0 - 2.0 * np.sum(c / c.sum() * (n - k + 0.5) / n))


def gini_mean_difference(x) -> float:
    c = np.abs(np.asarray(x, dtype=np.float64).ravel())
    return float(np.abs(c[:, None] - c[None, :]).sum() / (2 * c.size**2 * c.mean()))


def hoyer_reference(x) -> float:
    c = np.abs(np.asarray(x, dtype=np.float64).ravel())
    n = c.size
    return float((math.sqrt(n) - c.sum() / math.sqrt(np.sum(c**2))) / (math.sqrt(n) - 1))


def effective_rank_reference(s) -> float:
    p = np.asarray(s, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(math.exp(-np.sum(p * np.log(p))))


def cca_core_coefficients(acts1: np.ndarray, acts2: np.ndarray, epsilon: float) -> np.ndarray:
    """Canonical correlations of (units, datapoints) activations the way cca_core derives
    them (module docstring)."""
    n1 = acts1.shape[0]
    cov = np.cov(acts1, acts2)
    sxx, sxy, syy = cov[:n1, :n1], cov[:n1, n1:], cov[n1:, n1:]
    xmax, ymax = np.max(np.abs(sxx)), np.max(np.abs(syy))
    sxx, syy, sxy = sxx / xmax, syy / ymax, sxy / np.sqrt(xmax * ymax)
    keep_x, keep_y = np.abs(np.diag(sxx)) >= epsilon, np.abs(np.diag(syy)) >= epsilon
    sxx = sxx[np.ix_(keep_x, keep_x)] + epsilon * np.eye(keep_x.sum())
    syy = syy[np.ix_(keep_y, keep_y)] + epsilon * np.eye(keep_y.sum())
    sxy = sxy[np.ix_(keep_x, keep_y)]

    def inverse_sqrt(a: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(np.linalg.pinv(a))
        return (v * np.sqrt(w)) @ v.T

    return np.abs(np.linalg.svd(inverse_sqrt(sxx) @ sxy @ inverse_sqrt(syy),
                                compute_uv=False))


def svcca_reference(x: np.ndarray, y: np.ndarray, variance: float = 0.99,
                    epsilon: float = 1e-10) -> float:
    """SVCCA of (samples, units) inputs as google/svcca's tutorial computes it."""
    reduced = []
    for acts in (x.T, y.T):  # (units, datapoints)
        centred = acts - acts.mean(axis=1, keepdims=True)
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        share = np.cumsum(s**2) / np.sum(s**2)
        k = int(np.argmax(share >= variance)) + 1
        reduced.append(s[:k, None] * vt[:k])
    return float(np.mean(cca_core_coefficients(*reduced, epsilon=epsilon)))


def ov_heads(kind: str, state: dict, layer: int, heads: int) -> list[np.ndarray]:
    """Every head's d x d OV matrix, float64, from a checkpoint's tensors (module docstring);
    ``kind``: gpt_neox, llama or gpt2 (released layout, keys without ``transformer.``)."""
    t = {k: np.asarray(v.double().numpy() if hasattr(v, "double") else v, dtype=np.float64)
         for k, v in state.items()}
    if kind == "gpt_neox":
        p = f"gpt_neox.layers.{layer}.attention."
        out, qkv = t[p + "dense.weight"], t[p + "query_key_value.weight"]
        hd = out.shape[0] // heads
        return [out[:, h * hd:(h + 1) * hd] @ qkv[h * 3 * hd + 2 * hd:(h + 1) * 3 * hd]
                for h in range(heads)]
    if kind == "gpt2":
        p = f"h.{layer}.attn."
        out, qkv = t[p + "c_proj.weight"].T, t[p + "c_attn.weight"]
        d = out.shape[0]
        hd = d // heads
        return [out[:, h * hd:(h + 1) * hd] @ qkv[:, 2 * d + h * hd:2 * d + (h + 1) * hd].T
                for h in range(heads)]
    p = f"model.layers.{layer}.self_attn."
    out, value = t[p + "o_proj.weight"], t[p + "v_proj.weight"]
    hd = out.shape[1] // heads
    group = heads // (value.shape[0] // hd)
    return [out[:, h * hd:(h + 1) * hd] @ value[(h // group) * hd:(h // group + 1) * hd]
            for h in range(heads)]

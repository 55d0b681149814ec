"""Singular values of weight and gradient matrices on the model's device (torch)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["factored_singular_values", "singular_values"]


def singular_values(matrix: Any) -> np.ndarray:
    """Singular values, descending, float64, of a matrix (m, n) or a stack of them (..., m, n).

    ``matrix``: numpy array or torch tensor, any float dtype and device. Computed as the
    square roots of the eigenvalues of the Gram matrix of the smaller side, formed in float64
    on the tensor's own device; tiny negative eigenvalues from rounding are clipped to 0.
    A stack (e.g. one component's write matrices over layers) is one batched call. Within
    ~1e-13 of ``svdvals`` relative to the largest value for well-conditioned matrices, and
    4-16x faster for D x 4D (ecosystem-facts, "Numerics"); values far below
    ``sqrt(eps) * max`` lose relative accuracy, which effective ranks do not feel.
    On the CPU the eigenvalues come from numpy's LAPACK (``np.linalg.eigvalsh``), which is
    far faster there than torch's CPU ``eigvalsh`` (docs/benchmarks/2026-11-23.md); on a GPU
    it stays on the device.
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


def factored_singular_values(left: torch.Tensor, right: torch.Tensor) -> np.ndarray:
    """Singular values, descending, float64, of ``left @ right`` without forming the product.

    ``left`` (..., m, k) and ``right`` (..., k, n) with k <= m, n (e.g. an attention head's
    ``W_O^h`` (d, head_dim) and ``W_V^h`` (head_dim, d), stacked over heads), any float dtype
    and device. With ``left = Q_l R_l`` and ``right' = Q_r R_r`` (Householder QR), ``left @ right
    = Q_l (R_l R_r') Q_r'``, so the values are those of the k x k core ``R_l R_r'``
    (Golub & Van Loan 2013, 6.4: the SVD of a product from its factors): O((m + n) k^2) work
    against O(m n k) to form the m x n product and O(m n min(m, n)) for its SVD, and backward
    stable (no Gram matrix: small values keep their relative accuracy down to ~eps times the
    largest). Returns shape (..., k); all NaN for a pair with a non-finite entry.
    """
    a = left.detach().to(torch.float64)
    b = right.detach().to(device=a.device, dtype=torch.float64)
    if a.shape[-1] != b.shape[-2] or a.shape[-1] > min(a.shape[-2], b.shape[-1]):
        raise ValueError(f"factors must be (..., m, k) and (..., k, n) with k <= m, n; got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    finite = (torch.isfinite(a).flatten(-2).all(-1) & torch.isfinite(b).flatten(-2).all(-1))
    a = torch.where(finite[..., None, None], a, 0.0)
    b = torch.where(finite[..., None, None], b, 0.0)
    r_left = torch.linalg.qr(a, mode="r").R
    r_right = torch.linalg.qr(b.mT, mode="r").R
    out = torch.linalg.svdvals(r_left @ r_right.mT).cpu().numpy()
    out[~finite.cpu().numpy()] = np.nan
    return np.ascontiguousarray(out)

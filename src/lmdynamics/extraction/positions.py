"""Which token positions of the eval batch are sampled (numpy only: the intervention study's
GPU script imports it on machines without zarr)."""

from __future__ import annotations

import numpy as np

__all__ = ["sample_token_positions"]


def sample_token_positions(n_sequences: int, seq_len: int, n_tokens: int,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subsample of ``n_tokens`` distinct (sequence, position) pairs of the eval batch.

    Depends only on the batch shape and the seed, so every step and size gets the same
    positions. Returns two int64 arrays of length ``n_tokens`` in row-major order.
    """
    total = n_sequences * seq_len
    if not 1 <= n_tokens <= total:
        raise ValueError(f"tokens={n_tokens}: allowed 1..{total} (the eval batch holds "
                         f"{n_sequences} sequences x {seq_len} positions)")
    flat = np.sort(np.random.default_rng(seed).choice(total, size=n_tokens, replace=False))
    return (flat // seq_len).astype(np.int64), (flat % seq_len).astype(np.int64)

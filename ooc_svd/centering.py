"""Implicit centering: products with A - 1 mu^T without ever forming an m x n temporary.

Every pass subtracts a shift vector s from each widened sub-block (a cheap, cache-resident
operation) and accumulates the column sums c of A - 1 s^T. With the column mean computed on
the fly, s is a guess (the first block's mean) in the first pass and d = c / m is the small
remaining offset; then

    (A - 1 mu^T)^T (A - 1 mu^T) X = A_s^T A_s X - m d (d^T X),   mu = s + d,

and ||A - 1 mu^T||_F^2 = ||A_s||_F^2 - m ||d||^2. Shifting by a close guess first keeps the
corrections small, so a large mean does not cancel away the variance in float64.

Sparse blocks are shifted by zero until the mean is known (a shift would densify them), so
the first pass of a sparse PCA, and its Frobenius norm, carry a relative rounding error of
about eps ||A||_F^2 / ||A - 1 mu^T||_F^2: negligible unless the mean dwarfs the spread.
"""

from __future__ import annotations

import numpy as np

from .kernels.cpu import BlockStats, check_total_finite
from .sources.csr import is_sparse_block


class Centering:
    """No centering (``mode='none'``), a given mean (``'given'``), or the column mean
    computed in the first pass (``'mean'``)."""

    def __init__(self, n: int, mode: str, mean: np.ndarray | None = None):
        self.n = n
        self.mode = mode
        self.mean = None if mean is None else np.asarray(mean, dtype=np.float64).ravel()

    def fingerprint(self) -> str | None:
        """A digest of a given mean, so a checkpoint is not resumed with another one."""
        if self.mode != "given":
            return None
        import hashlib

        return hashlib.sha256(self.mean.tobytes()).hexdigest()

    @property
    def mean_known(self) -> bool:
        return self.mode != "mean" or self.mean is not None

    def shift_for(self, first_block: np.ndarray) -> np.ndarray:
        """The shift of a pass, given the first block it reads."""
        if self.mode == "none":
            return np.zeros(self.n)
        if self.mean is not None:
            return self.mean
        if is_sparse_block(first_block):
            # Sparse: the shift is applied algebraically, so a guess buys no accuracy;
            # shifting by zero keeps every product exactly sparse.
            return np.zeros(self.n)
        return first_block.mean(axis=0, dtype=np.float64)

    def offset(self, shift: np.ndarray, stats: BlockStats) -> np.ndarray | None:
        """d = (column mean) - shift after a pass, or None when the shift was exact by design."""
        if self.mode != "mean":
            return None
        return stats.colsum / stats.rows

    def finish_pass(self, shift: np.ndarray, stats: BlockStats) -> None:
        """Once a full pass has seen every row: check its totals (``check_total_finite``)
        and record the column mean."""
        check_total_finite(stats)
        if self.mode == "mean" and self.mean is None:
            self.mean = shift + stats.colsum / stats.rows

    def correct_gram(
        self, Z: np.ndarray, X: np.ndarray | None, shift: np.ndarray, stats: BlockStats
    ):
        """Turn Z = A_s^T A_s X into (A - 1 mu^T)^T (A - 1 mu^T) X in place; X=None stands
        for the identity (Z is the Gram matrix itself)."""
        d = self.offset(shift, stats)
        if d is not None:
            Z -= stats.rows * np.outer(d, d if X is None else d @ X)

    def frobenius_squared(self, shift: np.ndarray, stats: BlockStats) -> float:
        """||A - 1 mu^T||_F^2 (or ||A||_F^2, or ||A - 1 M^T||_F^2) from a pass's totals."""
        d = self.offset(shift, stats)
        if d is None:
            return stats.sumsq
        return max(stats.sumsq - stats.rows * float(d @ d), 0.0)

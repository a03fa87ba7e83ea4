"""Kernels for B = A_s - c 1^T: a sparse A less a column c (torch's ``M`` of shape (m, 1)),
without densifying a block.

The inner backend's kernels compute the products of A_s (A with its column shift s, as
always); the rank-one terms of c are applied in float64 on the host, c_i read for each
block from ``column``. With x = X^T 1 (the column sums of X) and u = A_s^T c:

    B X     = A_s X - c x^T
    B^T Y   = A_s^T Y - 1 (c^T Y)
    B^T B X = A_s^T A_s X - u x^T - 1 (u^T X) + ||c||^2 1 x^T

and the totals of B from those of A_s: colsum(B) = colsum(A_s) - (sum c) 1, and
||B||_F^2 = ||A_s||_F^2 - 2 c^T A_s 1 + n ||c||^2. u and c^T A_s 1 cost a sparse product
with a vector per block (O(nnz)), against the l-wide products of the kernels.

The final pass runs as on the CPU (``HostFinalSweep``: each block's Y_i = B_i X, its
Householder QR on the host, and B_i^T Q_i), whichever backend the inner kernels are: a
GPU's final sweep forms Y_i on the device, where c does not reach.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import NonFiniteError
from .backend import HostFinalSweep, Kernels, SpillBlock
from .cpu import BlockStats, subtract_outer


class RowShiftKernels:
    """``Kernels`` of B = A_s - c 1^T from ``inner``'s of A_s; ``column`` reads c's rows
    (a source of shape (m, 1), as ``sources.dense.open_dense_source`` makes)."""

    def __init__(self, inner: Kernels, column: Any):
        self.inner, self.column = inner, column
        self.name = inner.name

    def column_part(self, first_row: int, rows: int) -> np.ndarray:
        """c_i: c's rows [first_row, first_row + rows), float64; NonFiniteError for a NaN
        or Inf, which the kernels, looking at A's values only, would not see."""
        part = self.column.read(first_row, first_row + rows)
        c = np.asarray(part, dtype=np.float64).reshape(rows)
        if not np.isfinite(c).all():
            raise NonFiniteError(f"M holds NaN or Inf in rows [{first_row}, "
                                 f"{first_row + rows})")
        return c

    def power_sweep(self, X: np.ndarray, stats: BlockStats) -> _RowShiftedPowerSweep:
        return _RowShiftedPowerSweep(self, X, stats)

    def final_sweep(self, X: np.ndarray, stats: BlockStats, append_ones: bool,
                    spill: SpillBlock) -> HostFinalSweep:
        return HostFinalSweep(self, X, stats, append_ones, spill)

    def times(self, block, first_row, X, shift, stats, out=None):
        """Y = B_i X = A_s,i X - c_i x^T, (b, l) float64 F-order."""
        c = self.column_part(first_row, block.shape[0])
        Y = self.inner.times(block, first_row, X, shift, stats, out)
        if stats is not None:
            _add_row_shift_totals(stats, block, c, shift)
        subtract_outer(Y, c, X.sum(axis=0))
        return Y

    def transposed_times(self, block, first_row, Q, shift, stats):
        """C^T = B_i^T Q = A_s,i^T Q - 1 (c_i^T Q), (n, l)."""
        c = self.column_part(first_row, block.shape[0])
        CT = self.inner.transposed_times(block, first_row, Q, shift, stats)
        _add_row_shift_totals(stats, block, c, shift)
        CT -= (c @ Q)[None, :]
        return CT

    def keep(self, block: Any) -> Any:
        return self.inner.keep(block)

    def close(self) -> None:
        self.inner.close()


class _RowShiftedPowerSweep:
    """Z = B^T B X: the inner sweep's A_s^T A_s X, corrected at the end with u = A_s^T c,
    summed over the blocks as they are added."""

    def __init__(self, kernels: RowShiftKernels, X: np.ndarray, stats: BlockStats):
        self.kernels, self.X, self.stats = kernels, X, stats
        self.inner = kernels.inner.power_sweep(X, stats)
        self.totals = BlockStats.zeros(X.shape[0])  # B's totals less A_s's
        self.u = np.zeros(X.shape[0])
        self.c_squared = 0.0

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        self.inner.add(block, first_row, shift)
        c = self.kernels.column_part(first_row, block.shape[0])
        self.u += _transposed_product(block, c, shift)
        self.c_squared += float(c @ c)
        _add_row_shift_totals(self.totals, block, c, shift)

    def result(self) -> np.ndarray:
        Z = self.inner.result()  # A_s^T A_s X; the inner sweep adds A_s's totals
        x = self.X.sum(axis=0)
        subtract_outer(Z, self.u, x)
        Z -= (self.u @ self.X - self.c_squared * x)[None, :]
        self.stats.colsum += self.totals.colsum
        self.stats.sumsq += self.totals.sumsq
        return Z


def _transposed_product(block, c: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A_s,i^T c = A_i^T c - s (1^T c), (n,) float64."""
    product = np.asarray(block.to_scipy().T @ c, dtype=np.float64)
    return product - np.asarray(shift, dtype=np.float64) * c.sum()


def _add_row_shift_totals(stats: BlockStats, block, c: np.ndarray, shift: np.ndarray) -> None:
    """Add what c changes in the block's totals: colsum -= (sum c) 1, and sumsq +=
    n ||c||^2 - 2 c^T A_s,i 1 (rows are A's to count, not c's)."""
    n = block.shape[1]
    row_sums = block.to_scipy() @ np.ones(n) - float(np.sum(shift))
    stats.colsum -= c.sum()
    stats.sumsq += n * float(c @ c) - 2.0 * float(c @ row_sums)


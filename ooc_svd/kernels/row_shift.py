"""Kernels for B = A_s - c 1^T: a sparse A less a column c (torch's ``M`` of shape (m, 1)),
without densifying a block.

The inner backend's kernels compute the products of A_s (A with its column shift s, as
always); the rank-one terms of c are applied in float64 on the host, c_i read for each
block from ``column``. With x = X^T 1 (the column sums of X) and u = A_s^T c:

    B X     = A_s X - c x^T
    B^T Y   = A_s^T Y - 1 (c^T Y)
    B^T B X = A_s^T A_s X - u x^T - 1 (u^T X) + ||c||^2 1 x^T

and the totals of B from those of A_s: colsum(B) = colsum(A_s) - (sum c) 1, and
||B||_F^2 = ||A_s||_F^2 - 2 c^T A_s 1 + n ||c||^2. u and c^T A_s 1 cost one sweep over a
block's non-zeros (``csr_column_terms``), against the l-wide products of the kernels.

The final pass runs as ``HostFinalSweep``: each block's Y_i = B_i X and B_i^T Q_i by the
inner kernels' ``times`` and ``transposed_times`` (on the GPU for the cuda backend, one
block at a time), and Y_i's Householder QR on the host. A GPU's own final sweep forms and
factors Y_i on the device, where c does not reach.

Sums that overflow float64 (a huge c) raise NonFiniteError, as they do in the kernels.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from ..errors import NonFiniteError
from .backend import HostFinalSweep, Kernels, SpillBlock
from .cpu import BlockStats, subtract_outer


def _overflow_checked():
    """The corrections' sums may overflow for a huge c: numpy's warnings are silenced where
    the results are checked afterwards, and NonFiniteError names the rows."""
    return np.errstate(over="ignore", invalid="ignore")


class RowShiftKernels:
    """``Kernels`` of B = A_s - c 1^T from ``inner``'s of A_s; ``column`` reads c's rows
    (a source of shape (m, 1), as ``sources.dense.open_dense_source`` makes)."""

    def __init__(self, inner: Kernels, column: Any):
        self.inner, self.column = inner, column
        self.name = inner.name
        # The last c_i read: the final pass reads each block's twice in a row (times, then
        # transposed_times).
        self.last_part: tuple[int, int, np.ndarray] | None = None

    def column_part(self, first_row: int, rows: int) -> np.ndarray:
        """c_i: c's rows [first_row, first_row + rows), float64; NonFiniteError for a NaN
        or Inf, which the kernels, looking at A's values only, would not see."""
        if self.last_part is not None and self.last_part[:2] == (first_row, rows):
            return self.last_part[2]
        part = self.column.read(first_row, first_row + rows)
        c = np.asarray(part, dtype=np.float64).reshape(rows)
        if not np.isfinite(c).all():
            raise NonFiniteError(f"M holds NaN or Inf in rows [{first_row}, "
                                 f"{first_row + rows})")
        self.last_part = (first_row, rows, c)
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
        with _overflow_checked():
            if stats is not None:
                _add_row_shift_totals(stats, block, c, shift, first_row)
            subtract_outer(Y, c, X.sum(axis=0))
        _check_finite(Y, "the products of", first_row, block.shape[0])
        return Y

    def transposed_times(self, block, first_row, Q, shift, stats):
        """C^T = B_i^T Q = A_s,i^T Q - 1 (c_i^T Q), (n, l)."""
        c = self.column_part(first_row, block.shape[0])
        CT = self.inner.transposed_times(block, first_row, Q, shift, stats)
        with _overflow_checked():
            _add_row_shift_totals(stats, block, c, shift, first_row)
            CT -= (c @ Q)[None, :]
        _check_finite(CT, "the products of", first_row, block.shape[0])
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
        self.u = np.zeros(X.shape[0])  # A_s^T c
        self.c_squared = 0.0
        self.rows = 0

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        self.inner.add(block, first_row, shift)
        c = self.kernels.column_part(first_row, block.shape[0])
        with _overflow_checked():
            _add_row_shift_totals(self.totals, block, c, shift, first_row, self.u)
            self.c_squared += float(c @ c)
        self.rows += block.shape[0]

    def result(self) -> np.ndarray:
        Z = self.inner.result()  # A_s^T A_s X; the inner sweep adds A_s's totals
        x = self.X.sum(axis=0)
        with _overflow_checked():
            subtract_outer(Z, self.u, x)
            Z -= (self.u @ self.X - self.c_squared * x)[None, :]
        _check_finite(Z, "the products of", 0, self.rows)
        self.stats.colsum += self.totals.colsum
        self.stats.sumsq += self.totals.sumsq
        return Z


def _add_row_shift_totals(stats: BlockStats, block, c: np.ndarray, shift: np.ndarray,
                          first_row: int, u: np.ndarray | None = None) -> None:
    """Add what c changes in the block's totals: colsum -= (sum c) 1, and sumsq +=
    n ||c||^2 - 2 c^T A_s,i 1 (rows are A's to count, not c's); and u += A_s,i^T c."""
    n = block.shape[1]
    weighted_row_sums = csr_column_terms(block.data, block.indices, block.indptr, c,
                                         np.zeros(0) if u is None else u)
    shift_total = float(np.sum(shift))
    if u is not None:
        u -= np.asarray(shift, dtype=np.float64) * c.sum()
    stats.colsum -= c.sum()
    stats.sumsq += n * float(c @ c) - 2.0 * (weighted_row_sums - shift_total * c.sum())
    if not np.isfinite(stats.sumsq):
        raise NonFiniteError(f"the squared Frobenius norm of rows [{first_row}, "
                             f"{first_row + block.shape[0]}) of A - M overflows float64; "
                             "rescale the matrix")


@numba.njit(nogil=True, cache=True)
def csr_column_terms(data, indices, indptr, c, u):
    """The sum of c_i times row i's sum, and u += A^T c unless u is empty, A's rows being
    the CSR arrays: one sweep over the non-zeros, in float64 (no float64 copy of a float32
    block, as scipy's product with a float64 vector makes)."""
    scatter = u.size > 0
    weighted = 0.0
    for i in range(indptr.size - 1):
        row = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            value = np.float64(data[p])
            row += value
            if scatter:
                u[indices[p]] += value * c[i]
        weighted += c[i] * row
    return weighted


def _check_finite(array: np.ndarray, what: str, first_row: int, rows: int) -> None:
    if not np.isfinite(array).all():
        raise NonFiniteError(f"{what} rows [{first_row}, {first_row + rows}) of A - M "
                             "overflow float64; rescale the matrix")


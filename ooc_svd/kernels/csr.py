"""CPU kernels for CSR row blocks (numba, parallel over rows, float64 accumulation).

The fused power kernel makes one sweep over a row's non-zeros to form y = A_i X (a gather
of X's rows) and a second over the same, cache-hot non-zeros to scatter Z += A_i^T y.
Rows are split between threads by non-zeros, and each thread scatters into a private copy of
Z, kept for the whole pass and summed once at its end, so there are no races and no atomics;
the plan counts those copies in the memory limit (and caps them). The final pass's
C^T = A_i^T Q_i, needed per block, would have to zero and sum such copies for every block;
instead each thread owns a range of columns (rows of C^T) and skips the others' non-zeros.

Each non-zero reads a row of X (or adds into a row of Z) at a random place in memory; the
kernels prefetch the rows ``ahead`` non-zeros in advance (``prefetch.prefetch_row``), so
that those waits on main memory overlap (``PREFETCH_AHEAD``).

The centering shift s is applied algebraically, never by densifying:
A_s X = A X - 1 (s^T X), A_s^T Y = A^T Y - s (1^T Y), the column sums of A_s are those of A
less b s, and ||A_s||_F^2 = ||A||_F^2 - 2 s . colsum(A) + b ||s||^2.
"""

from __future__ import annotations

import numba
import numpy as np

from ..errors import NonFiniteError
from .cpu import SUM_FASTMATH, BlockStats, subtract_outer
from .prefetch import prefetch_row

# Non-zeros ahead whose rows of X and Z the power and times kernels prefetch, where X is
# larger than PREFETCH_MIN_BYTES (a core's L2 cache). Measured on two cores
# (benchmarks/bench_csr_kernels.py, l = 30; see benchmarks/RESULTS.md): with uniform columns
# the power kernel ran 1.2-1.8x faster at n = 2e4 and 1.4-1.9x at 6e4 to 2e5, Y = A X
# 1.1-1.5x; with columns ~ 1 / (j + 1) at 2e5, whose popular rows stay in cache anyway, the
# power kernel 1.1-1.2x and Y = A X 1.05-1.3x. Distances of 8 to 32 gain about as much. At
# n = 2e3, X in cache, nothing changed: the threshold keeps the prefetches to the X that
# gain. A large X whose used rows all stay in cache (every column among the first 256) loses
# 0.82-0.88x; the threshold does not see that case.
PREFETCH_AHEAD = 16
PREFETCH_MIN_BYTES = 1 << 20


def prefetch_distance(X: np.ndarray) -> int:
    """How far ahead the kernels prefetch the rows of X (n x l) and Z: 0 when X fits in
    a core's cache."""
    return PREFETCH_AHEAD if X.nbytes > PREFETCH_MIN_BYTES else 0


@numba.njit(inline="always")
def row_times(data, indices, start, end, X, sTX, y, ahead):
    """y = A_row X - sTX for the row whose non-zeros are data[start:end] in the columns
    indices[start:end]: the gather of X's rows that the power and times kernels share,
    prefetching the row of X that the non-zero ``ahead`` on will read."""
    for c in range(y.size):
        y[c] = -sTX[c]
    for p in range(start, end):
        if ahead and p + ahead < indices.size:
            prefetch_row(X, indices[p + ahead])
        value = np.float64(data[p])
        j = indices[p]
        for c in range(y.size):
            y[c] += value * X[j, c]


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=SUM_FASTMATH)
def csr_power_kernel(data, indices, indptr, bounds, X, sTX, Z_parts, colsum_parts, ysum_parts,
                     ahead):
    """Z_parts[t] += A^T (A X - 1 sTX) over thread t's rows [bounds[t], bounds[t + 1]).

    Also adds column sums of A to colsum_parts[t] and the column sums of Y = A X - 1 sTX to
    ysum_parts[t]. Returns the sum of squares of the block's values (NaN/Inf propagate).
    X : (n, l) float64 C-order; Z_parts : (T, n, l); colsum_parts : (T, n); ysum_parts : (T, l).
    ``ahead``: how far ahead the rows of X and Z are prefetched (0: not at all).
    """
    threads = Z_parts.shape[0]
    l = X.shape[1]
    sumsq = np.zeros(threads)
    for t in numba.prange(threads):
        y = np.empty(l)
        Z, colsum, ysum = Z_parts[t], colsum_parts[t], ysum_parts[t]
        total = 0.0
        for i in range(bounds[t], bounds[t + 1]):
            row_times(data, indices, indptr[i], indptr[i + 1], X, sTX, y, ahead)
            for c in range(l):
                ysum[c] += y[c]
            for p in range(indptr[i], indptr[i + 1]):
                if ahead and p + ahead < indices.size:
                    prefetch_row(Z, indices[p + ahead])
                value = np.float64(data[p])
                j = indices[p]
                colsum[j] += value
                total += value * value
                for c in range(l):
                    Z[j, c] += value * y[c]
        sumsq[t] = total
    return sumsq.sum()


@numba.njit(parallel=True, nogil=True, cache=True)
def csr_times_kernel(data, indices, indptr, bounds, X, sTX, Y, ahead):
    """Y = A X - 1 sTX over thread t's rows [bounds[t], bounds[t + 1]).

    X : (n, l) float64 C-order; Y : (b, l) float64, written. A row is summed in a
    contiguous buffer and stored once: Y is Fortran-ordered for the QR that follows, and
    summing in place strides by b on every non-zero (measured on two cores: 1.7x slower
    at l = 30, 3.9x at l = 150).
    """
    l = X.shape[1]
    for t in numba.prange(bounds.size - 1):
        y = np.empty(l)
        for i in range(bounds[t], bounds[t + 1]):
            row_times(data, indices, indptr[i], indptr[i + 1], X, sTX, y, ahead)
            for c in range(l):
                Y[i, c] = y[c]


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=SUM_FASTMATH)
def csr_column_range_kernel(data, indices, indptr, column_bounds, Q, CT, colsum):
    """CT += A^T Q and colsum += column sums of A; returns the sum of squares of A.

    Thread t owns the columns [column_bounds[t], column_bounds[t + 1]) of A, i.e. those rows
    of CT, and sweeps every non-zero, skipping the columns of other threads: no two threads
    write the same row, so there are no private copies to allocate, zero and sum. Q : (b, l)
    float64 (l may be 0: totals only); CT : (n, l); colsum : (n,). No prefetching: every
    thread reads every non-zero, and the test of whose column is ahead cost more than the
    prefetch saved (0.75-0.85x at n = 2e3 to 6e4, 1.0-1.3x at n = 2e5).
    """
    threads = column_bounds.size - 1
    l = Q.shape[1]
    sumsq = np.zeros(threads)
    for t in numba.prange(threads):
        first, last = column_bounds[t], column_bounds[t + 1]
        total = 0.0
        for i in range(indptr.size - 1):
            for p in range(indptr[i], indptr[i + 1]):
                j = indices[p]
                if first <= j < last:
                    value = np.float64(data[p])
                    colsum[j] += value
                    total += value * value
                    for c in range(l):
                        CT[j, c] += value * Q[i, c]
        sumsq[t] = total
    return sumsq.sum()


@numba.njit(parallel=True, nogil=True, cache=True, fastmath=SUM_FASTMATH)
def csr_gram_kernel(data, indices, indptr, column_bounds, G, colsum):
    """Upper triangle of G += A^T A and colsum += column sums of A; returns the sum of
    squares of A. Each row's columns must increase (blocks are read so).

    A row adds v_p v_q to G[j_p, j_q] for each pair of its non-zeros p <= q: about
    nnz_row^2 / 2 products, where densifying the row costs n^2. Thread t owns the columns
    [column_bounds[t], column_bounds[t + 1]) of G and adds only the pairs whose later
    non-zero falls there (found by bisection in the row), so no two threads write the same
    entry. G : (n, n) float64 F-order (a column is contiguous); colsum : (n,).
    """
    threads = column_bounds.size - 1
    sumsq = np.zeros(threads)
    for t in numba.prange(threads):
        first, last = column_bounds[t], column_bounds[t + 1]
        total = 0.0
        for i in range(indptr.size - 1):
            start, end = indptr[i], indptr[i + 1]
            q = start + np.searchsorted(indices[start:end], first)
            while q < end and indices[q] < last:
                j = indices[q]
                value = np.float64(data[q])
                colsum[j] += value
                total += value * value
                for p in range(start, q + 1):
                    G[indices[p], j] += np.float64(data[p]) * value
                q += 1
        sumsq[t] = total
    return sumsq.sum()


@numba.njit(nogil=True, cache=True)
def csr_gram_pairs(indices, indptr, n):
    """The pairs ``csr_gram_kernel`` adds into each column of G: a non-zero pairs with
    itself and those before it in its row."""
    pairs = np.zeros(n)
    for i in range(indptr.size - 1):
        start = indptr[i]
        for p in range(start, indptr[i + 1]):
            pairs[indices[p]] += p - start + 1
    return pairs


@numba.njit(nogil=True, cache=True)
def csr_densify_kernel(data, indices, indptr, shift, out):
    """out = dense(A) - 1 shift^T for a few rows (cache-sized sub-blocks of small n)."""
    for i in range(indptr.size - 1):
        for j in range(out.shape[1]):
            out[i, j] = -shift[j]
        for p in range(indptr[i], indptr[i + 1]):
            out[i, indices[p]] += np.float64(data[p])


def scatter_threads() -> int:
    """Threads (and private copies of the n x l accumulator) the CSR kernels use."""
    return numba.get_num_threads()


def column_bounds(indices: np.ndarray, n: int, threads: int,
                  work: np.ndarray | None = None) -> np.ndarray:
    """Column boundaries that give each thread about the same number of non-zeros (or the
    same sum of the columns' ``work``)."""
    counts = np.cumsum(np.bincount(indices, minlength=n) if work is None else work)
    targets = np.linspace(0, counts[-1] if n else 0, threads + 1)[1:-1]
    inner = np.searchsorted(counts, targets, side="left") + 1
    return np.concatenate([[0], np.minimum(inner, n), [n]]).astype(np.int64)


def thread_bounds(indptr: np.ndarray, threads: int) -> np.ndarray:
    """Row boundaries that give each thread about the same number of non-zeros."""
    targets = np.linspace(0, indptr[-1], threads + 1)
    bounds = np.searchsorted(indptr, targets, side="left").astype(np.int64)
    bounds[0], bounds[-1] = 0, indptr.size - 1
    return np.maximum.accumulate(bounds)


class CSRPowerSweep:
    """A pass's Z = A_s^T A_s X over CSR blocks, with private per-thread accumulators."""

    def __init__(self, X: np.ndarray, stats: BlockStats, copies: int | None = None):
        n, l = X.shape
        threads = min(copies or scatter_threads(), scatter_threads())
        self.X = np.ascontiguousarray(X)
        self.stats = stats
        self.Z_parts = np.zeros((threads, n, l))
        self.colsum_parts = np.zeros((threads, n))
        self.ysum_parts = np.zeros((threads, l))
        self.sumsq = 0.0
        self.rows = 0
        self.shift: np.ndarray | None = None

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        if self.shift is None:
            self.shift, self.sTX = shift, shift @ self.X
        elif shift is not self.shift and not np.array_equal(shift, self.shift):
            raise ValueError("a pass keeps one centering shift for all its blocks")
        bounds = thread_bounds(block.indptr, self.Z_parts.shape[0])
        sumsq = csr_power_kernel(block.data, block.indices, block.indptr, bounds, self.X,
                                 self.sTX, self.Z_parts, self.colsum_parts, self.ysum_parts,
                                 prefetch_distance(self.X))
        if not np.isfinite(sumsq):
            check_finite(block, first_row)
        self.sumsq += sumsq
        self.rows += block.shape[0]

    def result(self) -> np.ndarray:
        Z = np.asfortranarray(self.Z_parts.sum(axis=0))
        if self.shift is None:
            return Z
        # A shift too large for float64 overflows here; the pass's total sum of squares,
        # checked when it ends (cpu.check_total_finite), names that as a NonFiniteError.
        with np.errstate(over="ignore", invalid="ignore"):
            Z -= np.outer(self.shift, self.ysum_parts.sum(axis=0))
        _add_shifted_totals(self.stats, self.colsum_parts.sum(axis=0), self.sumsq, self.rows,
                            self.shift)
        return Z


def csr_times(block, first_row: int, X: np.ndarray, shift: np.ndarray, stats: BlockStats | None,
              out: np.ndarray | None = None) -> np.ndarray:
    """Y = A_s X for a CSR block, (b, l) float64 F-order, gathering the block's totals
    unless ``stats`` is None (they cost a sweep of their own)."""
    Y = np.empty((block.shape[0], X.shape[1]), order="F") if out is None else out
    bounds = thread_bounds(block.indptr, scatter_threads())
    csr_times_kernel(block.data, block.indices, block.indptr, bounds, np.ascontiguousarray(X),
                     shift @ X, Y, prefetch_distance(X))
    if stats is not None:
        add_block_totals(block, first_row, shift, stats)
    return Y


def csr_transposed_times(block, first_row: int, Q: np.ndarray, shift: np.ndarray,
                         stats: BlockStats) -> np.ndarray:
    """C^T = A_s^T Q for a CSR block, (n, l) float64 C-order, gathering the block's totals.

    C-order as the kernel writes it: converting to F-order, and the shift's correction as a
    separate n x l temporary, each cost a quarter of the kernel's time at n = 2e5, l = 31.
    """
    n, l = block.shape[1], Q.shape[1]
    CT = np.zeros((n, l))
    sumsq, colsum = _column_range_sweep(block, first_row, np.ascontiguousarray(Q, np.float64),
                                        CT)
    if shift.any():  # CT -= shift (1^T Q), in place: CT.T is F-ordered
        subtract_outer(CT.T, Q.sum(axis=0), shift)
    _add_shifted_totals(stats, colsum, sumsq, block.shape[0], shift)
    return CT


def add_block_totals(block, first_row: int, shift: np.ndarray, stats: BlockStats) -> None:
    """Add the column sums and sum of squares of A_s for one block to ``stats``."""
    n = block.shape[1]
    sumsq, colsum = _column_range_sweep(block, first_row, np.zeros((block.shape[0], 0)),
                                        np.zeros((n, 0)))
    _add_shifted_totals(stats, colsum, sumsq, block.shape[0], shift)


def gram_into(block, first_row: int, shift: np.ndarray, G: np.ndarray,
              stats: BlockStats) -> None:
    """Upper triangle of G += A_s^T A_s for one block, A_s = A - 1 s^T, from the pairs of
    each row's non-zeros (``csr_gram_kernel``): A_s^T A_s = A^T A - s c^T - c s^T + b s s^T
    with c the column sums of A, the shift applied algebraically as in the other kernels.
    G : (n, n) float64 F-order."""
    n = block.shape[1]
    bounds = column_bounds(block.indices, n, scatter_threads(),
                           work=csr_gram_pairs(block.indices, block.indptr, n))
    colsum = np.zeros(n)
    sumsq = csr_gram_kernel(block.data, block.indices, block.indptr, bounds, G, colsum)
    if not np.isfinite(sumsq):
        check_finite(block, first_row)
    rows = block.shape[0]
    if shift.any():
        subtract_outer(G, shift, colsum - 0.5 * rows * shift)
        subtract_outer(G, colsum - 0.5 * rows * shift, shift)
        with np.errstate(over="ignore"):  # an overflow: the pass's end names it
            stats.shifted_after += rows * float(shift @ shift)
    _add_shifted_totals(stats, colsum, sumsq, rows, shift)


def _column_range_sweep(block, first_row, Q, CT) -> tuple[float, np.ndarray]:
    n = block.shape[1]
    colsum = np.zeros(n)
    bounds = column_bounds(block.indices, n, scatter_threads())
    sumsq = csr_column_range_kernel(block.data, block.indices, block.indptr, bounds, Q, CT,
                                    colsum)
    if not np.isfinite(sumsq):
        check_finite(block, first_row)
    return sumsq, colsum


def _add_shifted_totals(stats: BlockStats, colsum: np.ndarray, sumsq: float, rows: int,
                        shift: np.ndarray) -> None:
    """Add the totals of A_s = A - 1 s^T, from those of A, to ``stats``."""
    colsum, sumsq = shifted_totals(colsum, sumsq, rows, shift)
    stats.colsum += colsum
    stats.sumsq += sumsq
    stats.rows += rows


def shifted_totals(colsum: np.ndarray, sumsq: float, rows: int, shift: np.ndarray
                   ) -> tuple[np.ndarray, float]:
    """Column sums and sum of squares of A_s = A - 1 s^T from those of A (``rows`` rows;
    see the module docstring); infinite for a shift too large for float64, which the
    pass's end names (``cpu.check_total_finite``)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return (colsum - rows * shift,
                sumsq - 2.0 * float(shift @ colsum) + rows * float(shift @ shift))


def densify_into(block, first_row: int, shift: np.ndarray, out: np.ndarray,
                 stats: BlockStats) -> None:
    """out = dense(block) - shift for a few rows, gathering their totals (small n only)."""
    csr_densify_kernel(block.data, block.indices, block.indptr, shift, out)
    add_block_totals(block, first_row, shift, stats)


def first_non_finite_row(block) -> int | None:
    """The index of the first row of a CSR block holding a NaN or Inf, or None."""
    bad = np.flatnonzero(~np.isfinite(block.data))
    if bad.size == 0:
        return None
    return int(np.searchsorted(block.indptr, bad[0], side="right") - 1)


def check_finite(block, first_row: int) -> None:
    """Raise NonFiniteError naming the first row of a CSR block holding a NaN or Inf."""
    bad = first_non_finite_row(block)
    first, last = first_row, first_row + block.shape[0]
    if bad is not None:
        raise NonFiniteError(f"the matrix holds NaN or Inf, first at row {first_row + bad}")
    raise NonFiniteError(
        f"the squared Frobenius norm of rows [{first}, {last}) overflows float64; "
        "rescale the matrix"
    )

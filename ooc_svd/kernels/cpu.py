"""CPU kernels for dense row blocks.

Products go to BLAS (scipy's dgemm, which releases the GIL and accumulates in place). numba
does what BLAS cannot do in the same sweep: widening to float64, subtracting the centering
shift, and accumulating column sums and the squared Frobenius norm.

A row block is processed in sub-blocks whose float64 copy fits in cache, so widening float32
data costs no extra trip to main memory. Every product is accumulated in float64, also for
float32 data: Z = A^T A X squares the spectrum, and float32 accumulation would lose the
directions below sqrt(eps32) ~ 3e-4 of sigma_1.

Accumulators are kept transposed and Fortran-ordered (n x l), so that ``dgemm`` with
``beta=1`` adds into them without temporaries or copies.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
from scipy.linalg.blas import dgemm, dsyrk, get_blas_funcs

from ..errors import NonFiniteError
from ..sources.csr import is_sparse_block

# Bytes of one float64 sub-block: small enough to stay in L2/L3 between the widening sweep
# and the two products that reuse it.
SUB_BLOCK_BYTES = 1 << 20
# Rows of a sub-block however wide A is: Z += sub^T (sub X) reads and writes all n x l of Z
# for each sub-block, which for a sub-block of fewer rows than about l costs more than
# reading the rows. Measured on one core (n = 1e5 to 1e6, l = 21): 0.1 GB/s of A with
# sub-blocks of one row (what 1 MB gave), 0.9-1.2 GB/s from 32 rows on.
MIN_SUB_BLOCK_ROWS = 32


# Reassociation lets LLVM vectorize the sums; no 'nnan'/'ninf', so NaN and Inf still
# propagate into the returned sum, which is how non-finite input is detected.
SUM_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@numba.njit(nogil=True, cache=True, fastmath=SUM_FASTMATH)
def widen_shift_rows(src, shift, out, colsum):
    """out = float64(src) - shift; colsum += column sums of out; return sum of squares of out.

    src : (b, n) real array, any layout; shift : (n,) float64;
    out : (b, n) float64, written; colsum : (n,) float64, accumulated.
    A NaN or Inf in src makes the returned sum non-finite.
    """
    rows, cols = src.shape
    sumsq = 0.0
    for i in range(rows):
        for j in range(cols):
            value = np.float64(src[i, j]) - shift[j]
            out[i, j] = value
            colsum[j] += value
            sumsq += value * value
    return sumsq


@contextmanager
def blas_threads(reader_threads: int, sparse: bool = False):
    """Leave one core per reader thread that decompresses, and give BLAS the rest; beside
    the kernels of sparse blocks (``sparse``), one thread.

    On two cores, two BLAS threads beside two decoding threads oversubscribe the CPU:
    measured, a fused pass took 1.7x longer than with one BLAS thread. Sparse blocks go
    through numba's kernels, parallel over every core, between BLAS's small products (the
    final pass's local QR and merge); OpenBLAS's threads spin for a while after each
    product, on the cores numba's threads then need.
    """
    if reader_threads == 0 and not sparse:
        yield
        return
    from threadpoolctl import threadpool_limits

    threads = 1 if sparse else max(1, (os.cpu_count() or 1) - reader_threads)
    with threadpool_limits(threads, user_api="blas"):
        yield


@dataclass
class BlockStats:
    """Totals a pass gathers for free while it reads A (of the shifted matrix A - 1 shift^T)."""

    colsum: np.ndarray  # (n,) float64
    sumsq: float = 0.0
    rows: int = 0
    # The sum of rows * ||shift||^2 over the blocks whose shift was taken off G after the
    # products were summed (the CSR pairs kernel, ``csr.gram_into``), whose rounding G
    # keeps: gram's accuracy check counts it.
    shifted_after: float = 0.0

    @classmethod
    def zeros(cls, n: int) -> BlockStats:
        return cls(np.zeros(n))


def sub_block_rows(n: int) -> int:
    """Rows of a ``SubBlocks`` sub-block: SUB_BLOCK_BYTES of float64, or MIN_SUB_BLOCK_ROWS
    of a wide A."""
    return max(MIN_SUB_BLOCK_ROWS, SUB_BLOCK_BYTES // (8 * max(n, 1)))


def sub_block_bytes(n: int) -> int:
    """Bytes of the ``SubBlocks`` buffer for rows of n values."""
    return 8 * n * sub_block_rows(n)


def stacked_rows(n: int) -> int:
    """Rows of A stacked under the exact method's running R at a time: at least 4n keep the
    refactoring's cost within 25% of one Householder QR of A."""
    return max(4 * n, sub_block_rows(n))


class SubBlocks:
    """Iterates a row block as widened, shifted float64 sub-blocks held in one reused buffer."""

    def __init__(self, n: int, width: int | None = None):
        self.rows = sub_block_rows(n)
        self.buffer = np.empty((self.rows, width or n))

    def sweep(self, block: np.ndarray, first_row: int, shift: np.ndarray, stats: BlockStats):
        """Yield ``(r0, r1, sub)``: sub = float64(block[r0:r1]) - shift, shape (r1-r0, n).

        Column sums and the sum of squares are added to ``stats``; a NaN or Inf raises
        ``NonFiniteError`` naming the first offending row of the matrix.
        """
        n = block.shape[1]
        for r0 in range(0, block.shape[0], self.rows):
            r1 = min(r0 + self.rows, block.shape[0])
            sub = self.buffer[: r1 - r0, :n]
            widen_into(block[r0:r1], first_row + r0, shift, sub, stats)
            yield r0, r1, sub


def widen_into(
    rows: np.ndarray, first_row: int, shift: np.ndarray, out: np.ndarray, stats: BlockStats
) -> None:
    """out = float64(rows) - shift, adding the column sums and sum of squares to ``stats``;
    a NaN or Inf raises NonFiniteError naming the first offending row of the matrix.

    ``rows`` may be a CSR block: its few rows are densified into ``out`` (the exact and gram
    methods on sparse data of small n)."""
    if is_sparse_block(rows):
        from .csr import densify_into

        densify_into(rows, first_row, shift, out, stats)
        return
    sumsq = widen_shift_rows(rows, shift, out, stats.colsum)
    if not np.isfinite(sumsq):
        check_finite(rows, first_row)
    stats.sumsq += sumsq
    stats.rows += rows.shape[0]


def first_non_finite_row(rows: np.ndarray) -> int | None:
    """The index of the first of ``rows`` holding a NaN or Inf, or None."""
    bad = np.flatnonzero(~np.isfinite(rows).all(axis=1))
    return int(bad[0]) if bad.size else None


def check_finite(rows: np.ndarray, first_row: int) -> None:
    """Raise NonFiniteError naming the first row of ``rows`` holding a NaN or Inf."""
    bad = first_non_finite_row(rows)
    if bad is not None:
        raise NonFiniteError(f"the matrix holds NaN or Inf, first at row {first_row + bad}")
    raise NonFiniteError(
        f"the squared Frobenius norm of rows [{first_row}, {first_row + rows.shape[0]}) "
        "overflows float64; rescale the matrix"
    )


def check_total_finite(stats: BlockStats) -> None:
    """Raise NonFiniteError when a pass's sum of squares overflowed float64 only as its
    blocks were added up (each block's own sum is checked as it is read): entries of 3e151
    pass that check and make an infinite ||A||_F^2, a NaN residual, and, in A^T A X, an
    infinite Z."""
    if not np.isfinite(stats.sumsq):
        raise NonFiniteError(
            "the squared Frobenius norm of the matrix overflows float64 (||A||_F, or when "
            "centered that of A less an estimate of its mean, is above about 1.3e154); "
            "rescale the matrix"
        )


def sub_times(sub: np.ndarray, X: np.ndarray) -> np.ndarray:
    """sub @ X as a Fortran-ordered (rows, l) float64 array.

    sub : (rows, n) C-order; X : (n, l) F-order.
    """
    return dgemm(1.0, sub.T, X, trans_a=1)


def accumulate_transposed_product(sub: np.ndarray, Y: np.ndarray, acc: np.ndarray) -> None:
    """acc += sub^T @ Y in place.  sub: (rows, n) C-order; Y: (rows, l); acc: (n, l) F-order."""
    result = dgemm(1.0, sub.T, Y, beta=1.0, c=acc, overwrite_c=1)
    if result is not acc:  # dgemm copies only if acc is not Fortran-ordered float64
        acc[...] = result


def power_block(
    block: np.ndarray,
    first_row: int,
    X: np.ndarray,
    shift: np.ndarray,
    Z: np.ndarray,
    stats: BlockStats,
    subs: SubBlocks,
) -> None:
    """Z += A_s^T (A_s X) for one row block, A_s = block - 1 shift^T, in one sweep.

    block : (b, n) any real dtype; X : (n, l) float64 F-order; Z : (n, l) float64 F-order.
    """
    for _, _, sub in subs.sweep(block, first_row, shift, stats):
        accumulate_transposed_product(sub, sub_times(sub, X), Z)


def gram_block(
    block: np.ndarray,
    first_row: int,
    shift: np.ndarray,
    G: np.ndarray,
    stats: BlockStats,
    subs: SubBlocks,
) -> None:
    """Upper triangle of G += A_s^T A_s for one row block (dsyrk, in place; a CSR block by
    the pairs of each row's non-zeros where that beats densifying it: ``sparse_gram_pays``).

    G : (n, n) float64 F-order; only its upper triangle is meaningful.
    """
    if is_sparse_block(block):
        from ..plan import sparse_gram_pays
        from ..sources.csr import row_pairs
        from .csr import gram_into

        if sparse_gram_pays(block.shape[0], block.shape[1], row_pairs(block.indptr)):
            gram_into(block, first_row, shift, G, stats)
            return
    densified_gram_block(block, first_row, shift, G, stats, subs)


def densified_gram_block(
    block: np.ndarray,
    first_row: int,
    shift: np.ndarray,
    G: np.ndarray,
    stats: BlockStats,
    subs: SubBlocks,
) -> None:
    """``gram_block`` by dsyrk on widened (or, for a CSR block, densified) sub-blocks."""
    for _, _, sub in subs.sweep(block, first_row, shift, stats):
        result = dsyrk(1.0, sub.T, beta=1.0, c=G, overwrite_c=1)
        if result is not G:  # dsyrk copies only if G is not Fortran-ordered float64
            G[...] = result


def block_times(
    block: np.ndarray,
    first_row: int,
    X: np.ndarray,
    shift: np.ndarray,
    stats: BlockStats,
    subs: SubBlocks,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Y = A_s X for one row block, as a Fortran-ordered (b, l) float64 array."""
    Y = np.empty((block.shape[0], X.shape[1]), order="F") if out is None else out
    for r0, r1, sub in subs.sweep(block, first_row, shift, stats):
        Y[r0:r1] = sub_times(sub, X)
    return Y


def transposed_block_times(
    block: np.ndarray,
    first_row: int,
    Q: np.ndarray,
    shift: np.ndarray,
    stats: BlockStats,
    subs: SubBlocks,
) -> np.ndarray:
    """C^T = A_s^T Q for one row block, an (n, l) float64 F-order array.  Q : (b, l)."""
    CT = np.zeros((block.shape[1], Q.shape[1]), order="F")
    for r0, r1, sub in subs.sweep(block, first_row, shift, stats):
        accumulate_transposed_product(sub, Q[r0:r1], CT)
    return CT


def subtract_outer(Z: np.ndarray, x: np.ndarray, y: np.ndarray) -> None:
    """Z -= x y^T in place, for an F-ordered float64 Z (n x r), by BLAS's rank-one update
    (another Z is updated through a copy): numpy's outer product makes an n x r temporary
    (53 ms against BLAS's 1 ms for n = 1e5, r = 30, on 2 cores), as long as a GPU's power
    sweep over 2 GB. Nothing to do for x = 0 (no shift)."""
    if Z.size == 0 or not x.any():
        return
    ger = get_blas_funcs("ger", (Z,))
    updated = ger(-1.0, x, y, a=Z, overwrite_a=True)
    if updated is not Z:  # BLAS worked on a copy (Z not F-ordered float64)
        Z[...] = updated

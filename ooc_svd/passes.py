"""The passes over A. Each reads every row block once through the prefetching reader.

- ``fused_power_pass``: Z = A^T (A X) in one read (Y_i = A_i X, Z += A_i^T Y_i).
- ``tsqr_final_pass``: streaming TSQR of Y = A X with B = Q^T A, spilling the Q_i.
- ``tsqr_r_pass``: R of A itself (exact mode).
- ``gram_pass``: G = A^T A (gram mode).
- ``residual_power_pass``: Z = R^T R X for the residual R = A - U S V^T (error estimates).
- ``left_vectors_sweep``: U = Q W by the backward sweep over the final pass's spill.

All products are of the shifted matrix A - 1 shift^T (see ``centering``). With
``PassContext.cluster`` set, each function hands its work to the cluster (``distributed``),
which returns the same values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from .centering import Centering
from .checkpoint import Checkpoint
from .errors import NonFiniteError
from .interrupts import raise_if_lost
from .kernels.backend import Kernels, aborted_on_error
from .kernels.cpu import (
    BlockStats,
    SubBlocks,
    blas_threads,
    first_non_finite_row,
    gram_block,
    stacked_rows,
    widen_into,
)
from .kernels.csr import first_non_finite_row as first_non_finite_csr_row
from .plan import qr_outweighs_products
from .sources import CSRSource, DenseSource, prefetch_blocks
from .sources.dense import chunk_edges
from .store import QSpill
from .tsqr import MergeFactors, StreamingTSQR, assemble_left_vectors, householder_r
from .units import format_bytes

log = logging.getLogger(__name__)


class ProgressBar(Protocol):
    """What a pass needs of a progress bar (tqdm's interface)."""

    def update(self, nbytes: int) -> object: ...

    def close(self) -> None: ...


ProgressFactory = Callable[[str, int], ProgressBar]  # (pass name, bytes of A) -> bar


@dataclass
class PassRecord:
    """What one pass over A cost."""

    name: str
    seconds: float
    bytes_read: int


def record_pass(records: list[PassRecord], name: str, seconds: float, bytes_read: int
                ) -> None:
    """Add a finished pass's record, and say so (logging, INFO: ``ooc-svd run`` shows it on
    stderr, so that a job's log follows the run)."""
    records.append(PassRecord(name, seconds, bytes_read))
    log.info("%s took %.3g s and read %s", name, seconds, format_bytes(bytes_read))


@dataclass
class PassContext:
    """Everything a pass needs besides its own operands."""

    source: DenseSource | CSRSource
    kernels: Kernels
    blocks: tuple[tuple[int, int], ...]
    prefetch_depth: int
    centering: Centering
    progress: ProgressFactory
    records: list[PassRecord]
    checkpoint: Checkpoint
    cached_blocks: int = 0  # leading blocks kept in memory after their first read
    cache: dict[int, np.ndarray] = field(default_factory=dict)
    # A ``distributed.ClusterPasses``: when set, every pass runs on its dask cluster.
    cluster: Any = None

    def resumable(self, name: str, run_passes: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The state after step ``name`` (one or more passes): from the checkpoint if that step
        completed before, else by running it (``run_passes`` returns its state) and saving
        the state with the step's pass records."""
        saved = self.checkpoint.load(name)
        if saved is not None:
            if "mean" in saved:
                self.centering.mean = saved["mean"]
            for seconds, nbytes in zip(saved["seconds"], saved["bytes_read"], strict=True):
                self.records.append(PassRecord(f"{name} (resumed)", float(seconds), int(nbytes)))
            return saved
        first = len(self.records)
        state = run_passes()
        done = self.records[first:]
        extra = {
            "seconds": np.array([record.seconds for record in done]),
            "bytes_read": np.array([record.bytes_read for record in done], dtype=np.int64),
        }
        if self.centering.mode == "mean":
            extra["mean"] = self.centering.mean
        self.checkpoint.save(name, state | extra)
        return state

    @contextmanager
    def naming_the_row(self):
        """A NaN or Inf that the kernels place in a range of rows only (a GPU's, which
        flags a block and says so after the pass) is named by its first row, as the CPU's
        kernels name it: the range is read again, a storage chunk at a time."""
        try:
            yield
        except NonFiniteError as error:
            if error.rows is None:
                raise
            row = first_non_finite_row_in(self.source, *error.rows)
            if row is None:  # (not there on a second read: the range it is)
                raise
            raise NonFiniteError(f"the matrix holds NaN or Inf, first at row {row}") from error

    def read(self, name: str, by_blas: bool = False):
        """Yield (index, start, block, shift) over all blocks in order, timing the pass and
        showing progress. The shift is the pass's centering shift, fixed by its first block.
        ``by_blas``: the pass's work is mostly LAPACK's and BLAS's (the exact and gram
        passes, a final pass of a wide basis: ``plan.qr_outweighs_products``), which then
        keep BLAS's threads whatever the blocks.

        The first ``cached_blocks`` blocks are kept after their first read (DESIGN.md section
        6, block cache), so later passes read only the rest.
        """
        bar = self.progress(name, self.source.nbytes)
        began = time.perf_counter()
        shift = None
        bytes_read = 0
        uncached = [block for i, block in enumerate(self.blocks) if i not in self.cache]
        # BLAS leaves a core to each decompressing reader; a pass served from the cache
        # (or from memory) gives BLAS every core, unless numba's kernels take the sparse
        # blocks.
        readers = self.prefetch_depth if uncached and self.source.decodes else 0
        sparse_kernels = isinstance(self.source, CSRSource) and not by_blas
        with blas_threads(readers, sparse=sparse_kernels), closing(bar):
            stream = prefetch_blocks(self.source, uncached, self.prefetch_depth)
            try:
                for index, (start, _) in enumerate(self.blocks):
                    block = self.cache.get(index)
                    if block is None:
                        _, _, block = next(stream)
                        bytes_read += block.nbytes
                        if index < self.cached_blocks:
                            block = self.cache[index] = self.kernels.keep(block)
                    if shift is None:
                        shift = self.centering.shift_for(block)
                    yield index, start, block, shift
                    bar.update(block.nbytes)
                    raise_if_lost()
            finally:
                stream.close()
        # The blocks' bytes, counted as read (A - M: A's and M's)
        read = round(bytes_read * self.source.read_factor)
        record_pass(self.records, name, time.perf_counter() - began, read)


def first_non_finite_row_in(source: DenseSource | CSRSource, start: int, stop: int
                            ) -> int | None:
    """The first of rows [start, stop) of ``source`` holding a NaN or Inf, read a storage
    chunk at a time (within the memory the block took); None if none does."""
    edges = chunk_edges(source.chunk_rows, start, stop)
    for first, last in zip(edges[:-1], edges[1:], strict=True):
        rows = source.read(first, last)
        bad = first_non_finite_row(rows) if isinstance(rows, np.ndarray) else \
            first_non_finite_csr_row(rows)
        if bad is not None:
            return first + bad
    return None


def fused_power_pass(
    context: PassContext, X: np.ndarray
) -> tuple[np.ndarray, BlockStats, np.ndarray]:
    """Z = (A - 1 mu^T)^T (A - 1 mu^T) X, (n, l) float64 F-order, in one read of A.

    Also returns the pass's totals and shift, from which ||A - 1 mu^T||_F follows.
    """
    if context.cluster is not None:
        return context.cluster.fused_power_pass(context, X)
    stats = BlockStats.zeros(X.shape[0])
    sweep = context.kernels.power_sweep(X, stats)
    shift = None
    with context.naming_the_row():
        for _, start, block, shift in context.read("power pass"):
            sweep.add(block, start, shift)
        Z = sweep.result()
    context.centering.correct_gram(Z, X, shift, stats)
    context.centering.finish_pass(shift, stats)
    return Z, stats, shift


@dataclass
class FinalPassResult:
    tsqr: StreamingTSQR
    BT: np.ndarray  # (n, r) B^T with B = Q^T (A - 1 mu^T)
    stats: BlockStats
    shift: np.ndarray
    cluster_spill: Any = None  # on a cluster: where its groups spilled their factors


def tsqr_final_pass(context: PassContext, X: np.ndarray, spill: QSpill | None
                    ) -> FinalPassResult:
    """Streaming TSQR of Y = A X accumulating B = Q^T A; the Q_i go to ``spill`` (None on
    a cluster, whose workers spill their own).

    When the column mean is still unknown (no power pass ran), Y gets a column of ones:
    Q then spans 1 as well, Q^T 1 is R's last column, and B is corrected afterwards to
    Q^T (A - 1 mu^T) = Q^T A_s - (Q^T 1) d^T without another pass.
    """
    if context.cluster is not None:
        return context.cluster.tsqr_final_pass(context, X)
    l = X.shape[1]
    append_ones = not context.centering.mean_known
    stats = BlockStats.zeros(X.shape[0])
    shift = None
    # An error between blocks (one that cannot be read) stops the sweep before the caller
    # closes the spill: a GPU's sweep hands blocks to the spill from a thread of its own.
    with context.naming_the_row(), \
            aborted_on_error(context.kernels.final_sweep(X, stats, append_ones,
                                                         spill.write_block)) as sweep:
        nnz = getattr(context.source, "nnz", None)
        # LAPACK's QRs outweighing numba's sparse products keep BLAS's threads
        by_blas = nnz is not None and qr_outweighs_products(context.source.shape[0], nnz,
                                                            l + append_ones)
        for _, start, block, shift in context.read("final pass", by_blas=by_blas):
            sweep.add(block, start, shift)
        tsqr = sweep.result()
    BT = tsqr.BT
    d = context.centering.offset(shift, stats)
    if append_ones:
        BT = BT - np.outer(d, tsqr.R[:, l])
    context.centering.finish_pass(shift, stats)
    return FinalPassResult(tsqr, BT, stats, shift)


def left_vectors_sweep(
    context: PassContext, final: FinalPassResult, spill: QSpill | None, W: np.ndarray,
    store_rows: Callable[[int, np.ndarray], None],
) -> None:
    """U = Q W (Q of the final pass, W (r, k)) by one backward sweep over the spilled Q_i
    and merge factors; each U_i goes to ``store_rows(start, U_i)``."""
    if context.cluster is not None:
        context.cluster.left_vectors_sweep(context, final, W, store_rows)
        return
    assemble_left_vectors(
        final.tsqr.blocks,
        W,
        lambda i: spill.load("Q", i),
        lambda i: MergeFactors(spill.load("T", i), spill.load("S", i)) if i else None,
        lambda i, rows: store_rows(context.blocks[i][0], rows),
    )


def tsqr_r_pass(context: PassContext) -> tuple[np.ndarray, BlockStats, np.ndarray]:
    """R (n x n) of A - 1 mu^T = Q R by TSQR over row blocks, never forming Q (exact mode).

    Sub-blocks are stacked under the running R and refactored; at least 4n rows at a time
    keep the refactoring's cost within 25% of one Householder QR of A. With the mean unknown,
    a column of ones is appended and R is corrected afterwards as in ``tsqr_final_pass``.
    """
    if context.cluster is not None:
        return context.cluster.tsqr_r_pass(context)
    n = context.source.shape[1]
    append_ones = not context.centering.mean_known
    rows_per_stack = stacked_rows(n)
    stats = BlockStats.zeros(n)
    R = np.zeros((0, n + append_ones))
    for _, start, block, shift in context.read("exact TSQR pass", by_blas=True):
        R = add_rows_to_r(R, block, start, shift, rows_per_stack, stats, append_ones)
    d = context.centering.offset(shift, stats)
    if append_ones:
        R = R[:, :n] - np.outer(R[:, n], d)
    context.centering.finish_pass(shift, stats)
    return R, stats, shift


def add_rows_to_r(R, block, start, shift, rows_per_stack, stats, append_ones) -> np.ndarray:
    """R of [R; A_s,i] (and a column of ones), ``rows_per_stack`` of ``block``'s rows at a
    time."""
    for r0 in range(0, block.shape[0], rows_per_stack):
        r1 = min(r0 + rows_per_stack, block.shape[0])
        R = _stack_and_factor(block[r0:r1], start + r0, shift, R, stats, append_ones)
    return R


def _stack_and_factor(rows, first_row, shift, R, stats, append_ones) -> np.ndarray:
    """R of [R; rows], factored in place: the stack is Fortran-ordered and exactly its
    size, so LAPACK's QR takes it without a copy, and R is a new array of width x width at
    most (the stack is freed on return)."""
    n = rows.shape[1]
    r_acc, count = R.shape[0], rows.shape[0]
    stack = np.empty((r_acc + count, n + append_ones), order="F")
    stack[:r_acc] = R
    widen_into(rows, first_row, shift, stack[r_acc:, :n], stats)
    if append_ones:
        stack[r_acc:, n] = 1.0
    return householder_r(stack)


def gram_pass(context: PassContext) -> tuple[np.ndarray, BlockStats, np.ndarray]:
    """G = (A - 1 mu^T)^T (A - 1 mu^T), (n, n) float64, symmetric, in one read of A."""
    if context.cluster is not None:
        return context.cluster.gram_pass(context)
    n = context.source.shape[1]
    G = np.zeros((n, n), order="F")
    stats = BlockStats.zeros(n)
    subs = SubBlocks(n)
    for _, start, block, shift in context.read("gram pass", by_blas=True):
        gram_block(block, start, shift, G, stats, subs)
    G = np.triu(G) + np.triu(G, 1).T
    context.centering.correct_gram(G, None, shift, stats)
    context.centering.finish_pass(shift, stats)
    return G, stats, shift


def residual_power_pass(
    context: PassContext,
    X: np.ndarray,
    U: Any,
    S: np.ndarray,
    V: np.ndarray,
) -> np.ndarray:
    """Z = R^T R X for R = (A - 1 mu^T) - U diag(S) V^T, in one read of A and of U.

    X : (n, l) float64; U : (m, k), a numpy or zarr array, read a block's rows at a time;
    S : (k,); V : (n, k).
    """
    if context.cluster is not None:
        return context.cluster.residual_power_pass(context, X, U, S, V)
    n, l = X.shape
    Z = np.zeros((n, l), order="F")
    kernels = context.kernels
    stats = BlockStats.zeros(n)
    SVtX = S[:, None] * (V.T @ X)
    with context.naming_the_row():
        for _, start, block, shift in context.read("residual pass"):
            U_i = np.asarray(U[start : start + block.shape[0]], dtype=np.float64)
            Y = kernels.times(block, start, X, shift, stats) - U_i @ SVtX
            Z += kernels.transposed_times(block, start, Y, shift, stats)
            Z -= V @ (S[:, None] * (U_i.T @ Y))
    return Z

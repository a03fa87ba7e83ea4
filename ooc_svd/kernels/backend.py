"""The products a pass needs from one row block, behind one interface per backend.

A block is a dense ndarray (b, n) of any real dtype, or a ``CSRBlock``. Every product is of
the shifted block A_s = block - 1 shift^T, accumulated in float64, and gathers the block's
totals into a ``BlockStats`` (column sums and sum of squares of A_s, rows) on the way; a NaN
or Inf raises ``NonFiniteError`` naming rows of the matrix.

- ``power_sweep(X, stats)``: a pass's Z = sum_i A_s,i^T (A_s,i X). ``add`` takes the blocks
  in order (a backend may still be computing when it returns), ``result`` gives Z.
- ``times``: Y = A_s X for one block, (b, l).
- ``final_sweep(X, stats, append_ones, spill)``: the final pass's streaming TSQR of
  Y = A_s X (with a column of ones if ``append_ones``) and B^T = A_s^T Q. ``add`` takes the
  blocks in order; each block's Q_i and merge factors go to ``spill(index, Q_i, merge)``
  as soon as they are known (in block order, possibly a block later); ``result`` gives the
  ``StreamingTSQR`` with R and B^T. A backend may keep B^T in its own memory until then.
- ``times``: Y = A_s X for one block, (b, l). ``stats=None`` skips the block's totals where
  that saves a sweep (the final pass gathers them in ``transposed_times``).
- ``transposed_times``: C^T = A_s^T Q for one block, (n, l), in either memory order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from typing import Any, Protocol

import numpy as np

from ..sources.csr import is_sparse_block
from ..tsqr import MergeFactors, StreamingTSQR, local_qr
from . import cpu
from .cpu import BlockStats, SubBlocks

SpillBlock = Callable[[int, np.ndarray, MergeFactors | None], None]  # (index, Q_i, merge)


class PowerSweep(Protocol):
    def add(self, block: Any, first_row: int, shift: np.ndarray) -> None: ...

    def result(self) -> np.ndarray:
        """Z (n, l) float64 F-order; the sweep's stats are complete once this returns."""


class FinalSweep(Protocol):
    def add(self, block: Any, first_row: int, shift: np.ndarray) -> None: ...

    def result(self) -> StreamingTSQR:
        """R and B^T (n, r) float64 F-order of all blocks, every block spilled, the
        sweep's stats complete."""

    def abort(self) -> None:
        """Stop after an error of the caller's (a block it could not read): no spill call
        comes after this returns, so the caller may close the spill."""


@contextmanager
def aborted_on_error(sweep: FinalSweep) -> Iterator[FinalSweep]:
    """The final sweep, aborted (``FinalSweep.abort``) if the caller's work with it raises,
    before the error leaves the block."""
    try:
        yield sweep
    except BaseException:
        sweep.abort()
        raise


class Kernels(Protocol):
    name: str

    def power_sweep(self, X: np.ndarray, stats: BlockStats) -> PowerSweep: ...

    def final_sweep(self, X: np.ndarray, stats: BlockStats, append_ones: bool,
                    spill: SpillBlock) -> FinalSweep: ...

    def times(self, block: Any, first_row: int, X: np.ndarray, shift: np.ndarray,
              stats: BlockStats | None, out: np.ndarray | None = None) -> np.ndarray: ...

    def transposed_times(self, block: Any, first_row: int, Q: np.ndarray, shift: np.ndarray,
                         stats: BlockStats) -> np.ndarray: ...

    def keep(self, block: Any) -> Any:
        """The block as the block cache should hold it: in the host memory this backend
        reads fastest (page-locked for a GPU)."""

    def close(self) -> None:
        """Release what the kernels hold between passes (a GPU's buffers and streams)."""


class CPUKernels:
    """numba and BLAS on the host: dense blocks by cache-sized float64 sub-blocks and dgemm,
    CSR blocks by numba kernels parallel over rows."""

    name = "cpu"

    def __init__(self, n: int, scatter_copies: int | None = None):
        self.n = n
        self.scatter_copies = scatter_copies  # the CSR power kernel's threads; all if None

    @cached_property
    def subs(self) -> SubBlocks:
        """The sub-block buffer, allocated on first use: passes that bring their own
        (exact's TSQR, gram) do not hold it."""
        return SubBlocks(self.n)

    def power_sweep(self, X: np.ndarray, stats: BlockStats) -> PowerSweep:
        return _CPUPowerSweep(self, X, stats)

    def final_sweep(self, X, stats, append_ones, spill) -> FinalSweep:
        return HostFinalSweep(self, X, stats, append_ones, spill)

    def keep(self, block: Any) -> Any:
        return block

    def close(self) -> None:
        """Nothing to release: buffers are ordinary memory."""

    def times(self, block, first_row, X, shift, stats, out=None):
        if is_sparse_block(block):
            from . import csr

            return csr.csr_times(block, first_row, X, shift, stats, out)
        # Dense totals come with the widening sweep at no extra cost; None discards them.
        stats = BlockStats.zeros(self.n) if stats is None else stats
        return cpu.block_times(block, first_row, X, shift, stats, self.subs, out)

    def transposed_times(self, block, first_row, Q, shift, stats):
        if is_sparse_block(block):
            from . import csr

            return csr.csr_transposed_times(block, first_row, Q, shift, stats)
        return cpu.transposed_block_times(block, first_row, Q, shift, stats, self.subs)


class _CPUPowerSweep:
    def __init__(self, kernels: CPUKernels, X: np.ndarray, stats: BlockStats):
        self.kernels, self.X, self.stats = kernels, X, stats
        self.Z = np.zeros(X.shape, order="F")
        self.sparse_sweep = None

    def add(self, block, first_row, shift):
        if is_sparse_block(block):
            if self.sparse_sweep is None:
                from . import csr

                self.sparse_sweep = csr.CSRPowerSweep(self.X, self.stats,
                                                      self.kernels.scatter_copies)
            self.sparse_sweep.add(block, first_row, shift)
        else:
            cpu.power_block(block, first_row, self.X, shift, self.Z, self.stats,
                            self.kernels.subs)

    def result(self) -> np.ndarray:
        if self.sparse_sweep is not None:
            self.Z += self.sparse_sweep.result()
        return self.Z


class HostFinalSweep:
    """The final pass's streaming TSQR from a backend's ``times`` and ``transposed_times``,
    one block at a time: Y_i = A_s,i X, Y_i = Q_i R_i (LAPACK), C_i^T = A_s,i^T Q_i, and
    the merge of (R_i, C_i^T) into R and B^T on the host (``StreamingTSQR.add_local_qr``,
    which may ask for A_s,i^T (Q_i S_i) instead).

    The block's totals come from ``transposed_times``, which runs after the QR: a block
    holding NaN or Inf is reported there, before its factors reach R or the spill.
    """

    def __init__(self, kernels: Kernels, X: np.ndarray, stats: BlockStats,
                 append_ones: bool, spill: SpillBlock):
        self.kernels, self.X, self.stats = kernels, X, stats
        self.append_ones, self.spill = append_ones, spill
        self.tsqr = StreamingTSQR()

    def add(self, block, first_row: int, shift: np.ndarray) -> None:
        l = self.X.shape[1]
        Y = np.empty((block.shape[0], l + self.append_ones), order="F")
        self.kernels.times(block, first_row, self.X, shift, None, out=Y[:, :l])
        if self.append_ones:
            Y[:, l] = 1.0
        Q_i, R_i = local_qr(Y)
        merge = self.tsqr.add_local_qr(
            Q_i, R_i,
            lambda W: self.kernels.transposed_times(block, first_row, W, shift, self.stats))
        self.spill(self.tsqr.blocks - 1, Q_i, merge)

    def result(self) -> StreamingTSQR:
        if self.tsqr.BT is not None:  # C^T of a single block may be C-ordered
            self.tsqr.BT = np.asfortranarray(self.tsqr.BT)
        return self.tsqr

    def abort(self) -> None:
        """Nothing to wait for: each block is spilled within its ``add``."""

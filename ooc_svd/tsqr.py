"""Streaming tall-skinny QR that accumulates B = Q^T A without forming Q.

Blocks arrive top to bottom. Block i has a local Householder QR Y_i = Q_i R_i, whose Q_i is
spilled, and C_i = Q_i^T A_i. The running R is merged with R_i by a QR of the stacked pair

    [R_acc; R_i] = [T_i; S_i] R_new,    B <- T_i^T B + S_i^T C_i,

which keeps B = Q^T A exactly for the Q of all blocks so far, with Householder stability.
U = Q W is then assembled by one backward sweep over the spill:

    P <- W;  for i from last to first: U_i = Q_i (S_i P);  P <- T_i P.

B is kept transposed (n x l) so products accumulate in place with BLAS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

# Householder vectors per block reflector (dgeqrt, in ``local_qr`` and ``householder_r``):
# LAPACK's usual panel width.
REFLECTOR_BLOCK = 32


def local_qr(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Economic Householder QR of a (b, l) float64 block: Q (b, r) F-order, R (r, l),
    r = min(b, l). Y is overwritten when it is Fortran-ordered.

    LAPACK's compact-WY routines (dgeqrt, then dgemqrt to form Q) rather than dgeqrf and
    dorgqr, which work column by column inside a panel as wide as a tall block's l and so
    stream the block from memory once per column: the same reflectors, measured 2x faster
    on two cores for 100000 x 91 and x 151 (Krylov's widths) and as fast at l = 31.
    """
    b, l = Y.shape
    r = min(b, l)
    if r == 0:
        return np.zeros((b, 0), order="F"), np.zeros((0, l))
    V, T = _reflectors(Y)
    Q, info = scipy.linalg.lapack.dgemqrt(V[:, :r], T, np.eye(b, r, order="F"),
                                          overwrite_c=1)
    _check_lapack("dgemqrt", info)
    return Q, np.triu(V[:r])


def householder_r(Y: np.ndarray) -> np.ndarray:
    """R (r x l, r = min(b, l)) of the economic Householder QR of a (b, l) float64 block,
    by dgeqrt as in ``local_qr``; Y is overwritten when it is Fortran-ordered.

    The exact method's TSQR pass factors such stacks: over 200000 x 256 float32 in memory
    it took 1.9-2.5 s with dgeqrt against 5.2-5.3 s with the dgeqrf behind
    scipy.linalg.qr (two cores, two runs each, alternating), 15 against 6 GFLOP/s per
    thread (benchmarks/bench_kernels.py).
    """
    b, l = Y.shape
    if min(b, l) == 0:
        return np.zeros((0, l))
    return np.triu(_reflectors(Y)[0][: min(b, l)])


def _reflectors(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """dgeqrt's Householder vectors (below R's diagonal, R on and above it) and its
    block reflectors' T factors; Y is overwritten when it is Fortran-ordered."""
    V, T, info = scipy.linalg.lapack.dgeqrt(min(REFLECTOR_BLOCK, *Y.shape), Y, overwrite_a=1)
    _check_lapack("dgeqrt", info)
    return V, T


def _check_lapack(name: str, info: int) -> None:
    if info != 0:  # only for an invalid argument, which would be a bug here
        raise RuntimeError(f"LAPACK {name} failed with info={info}")


@dataclass
class MergeFactors:
    """The small factors of one merge: Q_stack = [T; S] (T: r_acc x r_new, S: r_i x r_new)."""

    T: np.ndarray
    S: np.ndarray


@dataclass
class StreamingTSQR:
    """Accumulates R and B^T over row blocks."""

    R: np.ndarray | None = None
    BT: np.ndarray | None = None  # (n, r) float64 F-order, B = Q^T A transposed
    blocks: int = 0

    def add_block(self, R_i: np.ndarray, CT_i: np.ndarray) -> MergeFactors | None:
        """Merge block i's R_i (r_i x l) and C_i^T = A_i^T Q_i (n x r_i).

        Returns the merge factors the U sweep needs (None for the first block, whose Q_i
        enters Q unchanged); the caller spills them, so memory does not grow with m.
        """
        factors = self.add_r(R_i)
        self.BT = merged_bt(self.BT, CT_i, factors)
        return factors

    def add_local_qr(self, Q_i: np.ndarray, R_i: np.ndarray,
                     transposed_times: Callable[[np.ndarray], np.ndarray]
                     ) -> MergeFactors | None:
        """Merge block i given its local QR Y_i = Q_i R_i and ``transposed_times(W)`` =
        A_i^T W (n x w, either memory order), which is called once.

        S^T C_i = (Q_i S)^T A_i: for a block of fewer rows than A has columns, S is applied
        to Q_i (b r^2 flops) rather than to C_i^T (n r^2), and B^T T is added into the
        block's product, so the merge is one n x r x r product instead of two. R and B^T
        change only once ``transposed_times`` has returned (it raises for a block holding
        NaN or Inf). Returns the merge factors, as ``add_block``.
        """
        factors, R = self._merged_r(R_i)
        if factors is None:
            BT = transposed_times(Q_i)
        elif Q_i.shape[0] < self.BT.shape[0]:
            BT = _product(self.BT, factors.T, add_to=transposed_times(_product(Q_i, factors.S)))
        else:
            BT = merged_bt(self.BT, transposed_times(Q_i), factors)
        self.R, self.BT = R, BT
        self.blocks += 1
        return factors

    def add_r(self, R_i: np.ndarray) -> MergeFactors | None:
        """Merge R_i into R only, for a caller that keeps B^T elsewhere (on a GPU) and
        updates it with the returned factors as ``merged_bt`` does."""
        factors, self.R = self._merged_r(R_i)
        self.blocks += 1
        return factors

    def _merged_r(self, R_i: np.ndarray) -> tuple[MergeFactors | None, np.ndarray]:
        """The factors and R of merging R_i into R (None and R_i for the first block),
        leaving R as it is."""
        if self.R is None:
            return None, R_i
        r_acc = self.R.shape[0]
        Q_stack, R = scipy.linalg.qr(
            np.vstack([self.R, R_i]), mode="economic", check_finite=False
        )
        return MergeFactors(Q_stack[:r_acc], Q_stack[r_acc:]), R


def merged_bt(BT: np.ndarray | None, CT_i: np.ndarray, factors: MergeFactors | None
              ) -> np.ndarray:
    """B^T after a merge: T^T B + S^T C_i, transposed (C_i^T itself for the first block).

    Two BLAS products, the second added into the first's F-ordered result, each reading
    its n x r operand in the order it lies in: numpy's ``BT @ T + CT_i @ S`` made two
    n x r temporaries and an F-order copy of their sum, a third of a CSR block's final
    pass on two cores at n = 2e5.
    """
    if factors is None:
        return CT_i
    merged = _product(BT, factors.T)
    return _product(CT_i, factors.S, add_to=merged)


def _product(A: np.ndarray, B: np.ndarray, add_to: np.ndarray | None = None) -> np.ndarray:
    """A @ B, F-ordered, or add_to + A @ B in add_to's own memory order (overwriting a
    contiguous float64 add_to; BLAS copies another), by dgemm on A as it lies: a C-ordered
    A is an F-ordered A^T, transposed back by BLAS. A C-ordered add_to is an F-ordered
    add_to^T, to which B^T A^T is added."""
    if add_to is None:
        add_to, beta = np.empty((A.shape[0], B.shape[1]), order="F"), 0.0
    else:
        beta = 1.0
    if A.size == 0 or add_to.size == 0:  # nothing to add; BLAS rejects zero leading sizes
        return add_to if beta else np.zeros_like(add_to, order="F")
    A_fortran, transposed = (A, False) if A.flags.f_contiguous else (A.T, True)
    B = np.asfortranarray(B)
    if not add_to.flags.f_contiguous:
        return scipy.linalg.blas.dgemm(1.0, B, A_fortran, beta=beta, c=add_to.T,
                                       trans_a=True, trans_b=not transposed,
                                       overwrite_c=True).T
    return scipy.linalg.blas.dgemm(1.0, A_fortran, B, beta=beta, c=add_to,
                                   trans_a=transposed, overwrite_c=True)


def assemble_left_vectors(
    blocks: int,
    W: np.ndarray,
    load_q: Callable[[int], np.ndarray],
    load_merge: Callable[[int], MergeFactors | None],
    store_u: Callable[[int, np.ndarray], None],
) -> None:
    """U = Q W by one backward sweep over the spilled Q_i and merge factors."""
    P = W
    for i in range(blocks - 1, -1, -1):
        factors = load_merge(i)
        if factors is None:
            store_u(i, load_q(i) @ P)
            continue
        store_u(i, load_q(i) @ (factors.S @ P))
        P = factors.T @ P

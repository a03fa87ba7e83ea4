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


def local_qr(Y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Economic Householder QR of a (b, l) block: Q (b, r), R (r, l), r = min(b, l)."""
    Q, R = scipy.linalg.qr(Y, mode="economic", overwrite_a=True, check_finite=False)
    return np.asfortranarray(Q), R


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

    def add_r(self, R_i: np.ndarray) -> MergeFactors | None:
        """Merge R_i into R only, for a caller that keeps B^T elsewhere (on a GPU) and
        updates it with the returned factors as ``merged_bt`` does."""
        self.blocks += 1
        if self.R is None:
            self.R = R_i
            return None
        r_acc = self.R.shape[0]
        Q_stack, self.R = scipy.linalg.qr(
            np.vstack([self.R, R_i]), mode="economic", check_finite=False
        )
        return MergeFactors(Q_stack[:r_acc], Q_stack[r_acc:])


def merged_bt(BT: np.ndarray | None, CT_i: np.ndarray, factors: MergeFactors | None
              ) -> np.ndarray:
    """B^T after a merge: T^T B + S^T C_i, transposed (C_i^T itself for the first block)."""
    if factors is None:
        return CT_i
    return np.asfortranarray(BT @ factors.T + CT_i @ factors.S)


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

"""The two methods as sequences of passes plus the small dense algebra between them.

randomized (Halko, Martinsson & Tropp 2011, Alg. 5.1 with subspace iteration), q + 1 reads:
    X <- Omega;  q times: X <- orth(A^T A X)           (fused power passes)
    streaming TSQR of A X with B = Q^T A              (final pass)
    B = W Sigma V^T;  U = Q W_k                       (backward sweep over the Q spill)

exact, two reads:
    A = Q R by TSQR (R only);  R = W Sigma V^T;  U = A V_k Sigma_k^-1
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .passes import PassContext, fused_power_pass, product_pass, tsqr_final_pass, tsqr_r_pass
from .plan import Plan
from .sketch import gaussian_test_matrix
from .store import QSpill
from .tsqr import MergeFactors, assemble_left_vectors

RowSink = Callable[[int, np.ndarray], None]


@dataclass
class Factors:
    """S, V and the Frobenius norms of a run; U went to the row sink."""

    S: np.ndarray
    V: np.ndarray
    frobenius_squared: float
    numerical_rank: int


def randomized_svd(
    context: PassContext, plan: Plan, seed: int, store_u: RowSink, scratch_dir: str | None
) -> Factors:
    """Top-k SVD of A - 1 mu^T by randomized subspace iteration in plan.niter + 1 passes."""
    n = context.source.shape[1]
    X = gaussian_test_matrix(n, plan.basis_size, seed)
    for _ in range(plan.niter):
        Z, _ = fused_power_pass(context, X)
        X = orthonormal_columns(Z)
    with QSpill(scratch_dir) as spill:
        final = tsqr_final_pass(context, X, spill)
        V_all, S_all, Wt_all = scipy.linalg.svd(final.BT, full_matrices=False)
        V, W = normalize_signs(V_all[:, : plan.k], Wt_all[: plan.k].T)
        assemble_left_vectors(
            final.tsqr.blocks,
            W,
            lambda i: spill.load("Q", i),
            lambda i: MergeFactors(spill.load("T", i), spill.load("S", i)) if i else None,
            lambda i, rows: store_u(plan.blocks[i][0], rows),
        )
    fro2 = context.centering.frobenius_squared(final.shift, final.stats)
    return Factors(S_all[: plan.k], V, fro2, numerical_rank(S_all[: plan.k], context.source.shape))


def exact_svd(context: PassContext, plan: Plan, store_u: RowSink) -> Factors:
    """Exact top-k SVD of A - 1 mu^T: TSQR for R, the SVD of R, then U = A V S^-1.

    U is exact to about eps * sigma_1 / sigma_j in column j; columns of singular values
    below the numerical-rank tolerance (matrix_rank's) are set to zero, since A V S^-1 is
    undefined there.
    """
    R, stats, shift = tsqr_r_pass(context)
    _, S_all, Vt = scipy.linalg.svd(R, full_matrices=False)
    V, _ = normalize_signs(Vt[: plan.k].T, np.zeros((0, plan.k)))
    S = S_all[: plan.k]
    rank = numerical_rank(S, context.source.shape)
    inverse = np.zeros_like(S)
    inverse[:rank] = 1.0 / S[:rank]
    product_pass(context, np.asfortranarray(V * inverse), store_u)
    fro2 = context.centering.frobenius_squared(shift, stats)
    return Factors(S, V, fro2, rank)


def orthonormal_columns(Z: np.ndarray) -> np.ndarray:
    """Q of the economic Householder QR of Z (n x l), Fortran-ordered."""
    Q, _ = scipy.linalg.qr(Z, mode="economic", overwrite_a=True, check_finite=False)
    return np.asfortranarray(Q)


def normalize_signs(V: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip singular pairs so the largest-magnitude entry of each column of V is positive.

    Applied the same way on every backend, so results compare without sign juggling.
    """
    rows = np.argmax(np.abs(V), axis=0)
    signs = np.sign(V[rows, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs, W * signs


def numerical_rank(S: np.ndarray, shape: tuple[int, int]) -> int:
    """Count of singular values above numpy.linalg.matrix_rank's tolerance."""
    if S.size == 0 or S[0] == 0:
        return 0
    tolerance = S[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(S > tolerance))

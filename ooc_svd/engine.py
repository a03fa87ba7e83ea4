"""The two methods as sequences of passes plus the small dense algebra between them.

randomized (Halko, Martinsson & Tropp 2011, Alg. 5.1 with subspace iteration), q + 1 reads:
    X <- Omega;  q times: X <- orth(A^T A X)           (fused power passes)
    streaming TSQR of A X with B = Q^T A              (final pass)
    B = W Sigma V^T;  U = Q W_k                       (backward sweep over the Q spill)

exact, two reads:
    A = Q R by TSQR (R only);  R = W Sigma V^T;  U = A V_k Sigma_k^-1

gram, two reads:
    G = A^T A;  G = V Sigma^2 V^T;  U = A V_k Sigma_k^-1
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .kernels.cpu import BlockStats
from .passes import (
    PassContext,
    fused_power_pass,
    gram_pass,
    product_pass,
    tsqr_final_pass,
    tsqr_r_pass,
)
from .plan import Plan
from .sketch import gaussian_test_matrix
from .store import QSpill
from .tsqr import MergeFactors, assemble_left_vectors

RowSink = Callable[[int, np.ndarray], None]


# The gram method's relative error on sigma_k, about eps * (sigma_1 / sigma_k)^2, is
# accepted up to this bound or the data's own rounding error, whichever is larger.
GRAM_TOLERANCE = 1e-8


@dataclass
class Factors:
    """S, V and the Frobenius norms of a run; U went to the row sink."""

    S: np.ndarray
    V: np.ndarray
    frobenius_squared: float
    numerical_rank: int
    method: str
    note: str = ""


def randomized_svd(
    context: PassContext, plan: Plan, seed: int, store_u: RowSink, scratch_dir: str | None
) -> Factors:
    """Top-k SVD of A - 1 mu^T by randomized subspace iteration in plan.niter + 1 passes."""
    n = context.source.shape[1]
    X = gaussian_test_matrix(n, plan.basis_size, seed)
    for j in range(plan.niter):
        state = context.resumable(
            f"power{j}", lambda X=X: {"X": orthonormal_columns(fused_power_pass(context, X)[0])}
        )
        X = np.asfortranarray(state["X"])
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
    rank = numerical_rank(S_all[: plan.k], context.source.shape)
    return Factors(S_all[: plan.k], V, fro2, rank, "randomized")


def exact_svd(context: PassContext, plan: Plan, store_u: RowSink) -> Factors:
    """Exact top-k SVD of A - 1 mu^T: TSQR for R, the SVD of R, then U = A V S^-1.

    Singular values are accurate to about eps * sigma_1 (Householder stability); U is
    orthonormal to about eps * sigma_1 / sigma_j in column j.
    """
    state = context.resumable("tsqr", lambda: _factor_state(*tsqr_r_pass(context)))
    stats, shift = _stats_of(state)
    _, S_all, Vt = scipy.linalg.svd(state["factor"], full_matrices=False)
    rank = numerical_rank(S_all[: plan.k], context.source.shape)
    return _left_vectors_by_product(
        context, plan, S_all, Vt.T, rank, stats, shift, store_u, "exact"
    )


def gram_svd(
    context: PassContext, plan: Plan, store_u: RowSink, fallback_eps: float | None = None
) -> Factors:
    """Top-k SVD of A - 1 mu^T from the eigendecomposition of G = A^T A, then U = A V S^-1.

    G is accumulated in float64 by dsyrk, the fastest of the products, so this is the
    cheapest method for small n. Forming G squares the condition number: sigma_j is
    accurate to about eps * sigma_1^2 / sigma_j, i.e. to eps relative for sigma_j near
    sigma_1, and to sqrt(eps) * sigma_1 at worst. For float32 data that is far below the
    data's own rounding for any sigma_j > 1e-8 sigma_1; for ill-conditioned float64 data
    the exact method (TSQR) keeps eps * sigma_1.

    With ``fallback_eps`` (the data's own rounding unit, 0 for integers), a spectrum too
    ill-conditioned for G (see ``gram_is_accurate``) switches to the exact method, at the
    cost of one more pass, and says so in ``Factors.note``.
    """
    state = context.resumable("gram", lambda: _factor_state(*gram_pass(context)))
    stats, shift = _stats_of(state)
    eigenvalues, eigenvectors = scipy.linalg.eigh(state["factor"], check_finite=False)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # descending
    if fallback_eps is not None and not gram_is_accurate(eigenvalues, plan.k, fallback_eps):
        ratio = np.sqrt(max(eigenvalues[plan.k - 1], 0.0) / eigenvalues[0])
        factors = exact_svd(context, plan, store_u)
        factors.note = (
            f"sigma_k / sigma_1 ~ {ratio:.1e} is too small for the gram method's accuracy; "
            "switched to the exact method after its pass"
        )
        return factors
    S_all = np.sqrt(np.maximum(eigenvalues, 0.0))
    # Eigenvalues below rank tolerance * lambda_1 are rounding noise of G.
    rank = numerical_rank(eigenvalues[: plan.k], context.source.shape)
    return _left_vectors_by_product(
        context, plan, S_all, eigenvectors, rank, stats, shift, store_u, "gram"
    )


def _factor_state(factor: np.ndarray, stats: BlockStats, shift: np.ndarray) -> dict:
    """What a factoring pass leaves for the rest of the run, as arrays to checkpoint."""
    return {"factor": factor, "colsum": stats.colsum, "sumsq": stats.sumsq,
            "rows": stats.rows, "shift": shift}


def _stats_of(state: dict) -> tuple[BlockStats, np.ndarray]:
    stats = BlockStats(state["colsum"], float(state["sumsq"]), int(state["rows"]))
    return stats, state["shift"]


def gram_is_accurate(eigenvalues: np.ndarray, k: int, data_eps: float) -> bool:
    """Whether eps * (sigma_1 / sigma_k)^2, the gram method's relative error on sigma_k,
    stays below GRAM_TOLERANCE or the data's own rounding error data_eps * sigma_1 / sigma_k.
    """
    if eigenvalues[0] <= 0:
        return True  # A = 0: every method returns zeros
    if eigenvalues[k - 1] <= 0:
        return False
    ratio = np.sqrt(eigenvalues[0] / eigenvalues[k - 1])
    error = np.finfo(np.float64).eps * ratio**2
    return error <= max(GRAM_TOLERANCE, data_eps * ratio)


def _left_vectors_by_product(
    context, plan, S_all, V_all, rank, stats, shift, store_u, method
) -> Factors:
    """Finish a two-pass method: U = (A - 1 mu^T) V_k S_k^-1 in a second read of A.

    Columns beyond the numerical rank are set to zero, since A V S^-1 is undefined there.
    """
    V, _ = normalize_signs(V_all[:, : plan.k], np.zeros((0, plan.k)))
    S = S_all[: plan.k]
    inverse = np.zeros_like(S)
    inverse[:rank] = 1.0 / S[:rank]
    product_pass(context, np.asfortranarray(V * inverse), store_u)
    fro2 = context.centering.frobenius_squared(shift, stats)
    return Factors(S, V, fro2, rank, method)


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
    """Count of values above numpy.linalg.matrix_rank's tolerance relative to the first
    (singular values, or eigenvalues of A^T A in the gram method)."""
    if S.size == 0 or S[0] == 0:
        return 0
    tolerance = S[0] * max(shape) * np.finfo(np.float64).eps
    return int(np.count_nonzero(S > tolerance))

"""The methods as sequences of passes plus the small dense algebra between them.

randomized (Halko, Martinsson & Tropp 2011, Alg. 5.1 with subspace iteration), q + 1 reads
(krylov: the same passes, keeping every iterate; the final pass factors A [X_0 ... X_q]):
    X <- Omega;  q times: X <- orth(A^T A X)           (fused power passes)
    streaming TSQR of A X with B = Q^T A              (final pass)
    B = W Sigma V^T;  U = Q W_k                       (backward sweep over the Q spill)

adaptive randomized (fixed accuracy), (q + 1) reads per block of basis, plus one:
    grow X block by block, each block iterated against the deflated operator, until
    ||A||_F^2 - ||A X||_F^2 <= tol^2 ||A||_F^2;  then the final pass as above

exact, two reads:
    A = Q R by TSQR (R only);  R = W Sigma V^T;  the final pass above with X = V_k

gram, two reads:
    G = A^T A;  G = V Sigma^2 V^T;  the final pass above with X = V_k

The final pass of exact and gram projects A onto the left subspace span(A V_k) of the
exact right one (Q = orth(A V_k), B = Q^T A, the SVD of B): U comes out of a Householder
TSQR, orthonormal to working precision in every column, where A V_k Sigma_k^-1 would lose
orthogonality as eps * sigma_1 / sigma_j and be undefined past the rank of A.

The rank returned is decided by a rank rule once the singular values and ||A||_F are known
(a fixed k, a tolerance, or numpy.linalg.matrix_rank's threshold), and only then is U
allocated, so U is never larger than the rank returned.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from .errors import NonFiniteError
from .kernels.cpu import BlockStats
from .passes import (
    PassContext,
    fused_power_pass,
    gram_pass,
    left_vectors_sweep,
    tsqr_final_pass,
    tsqr_r_pass,
)
from .plan import DIFFERENCE_ROUNDING, EPS64, GROWTH_BLOCK, RESIDUAL_ROUNDING, Plan
from .sketch import gaussian_test_matrix
from .store import QSpill

RowSink = Callable[[int, np.ndarray], None]
AllocateU = Callable[[int], RowSink]  # rank -> where U's rows go
# (singular values, ||A||_F^2, rounding) -> rank; ``rounding`` is how far ||A||_F^2 - sum
# S^2 may be off, or None when S holds all of A's singular values (exact, gram).
RankRule = Callable[[np.ndarray, float, float | None], int]

# The gram method's relative error on sigma_k, about eps * (sigma_1 / sigma_k)^2, is
# accepted up to this bound or the data's rounding unit, whichever is larger.
GRAM_TOLERANCE = 1e-8
# What the note of a gram result beyond that bound says (``verify`` reads it).
GRAM_SHORTFALL = "too small for the gram method's accuracy"
# A Krylov block's column whose norm falls below this once projected off the basis (of unit
# columns) adds no direction the basis lacks, beyond rounding: sqrt(eps64) ~ 1.5e-8.
DEPENDENT_NORM = 1e-7


@dataclass
class Factors:
    """S, V and the Frobenius norms of a run; U went to the row sink."""

    S: np.ndarray
    V: np.ndarray
    frobenius_squared: float
    numerical_rank: int
    method: str
    note: str = ""
    # The sum of the squared singular values past the rank, where the method computed them
    # all (exact: each to eps * sigma_1; gram: each square to eps * sigma_1^2, so their sum
    # to about n eps sigma_1^2): a residual without fro2 - sum(S^2)'s cancellation, and
    # the one the rank rule saw.
    trailing_energy: float | None = None
    # How far the squared residual (in ||A||_F^2's units) may be off by rounding; every
    # method sets it (that of ||A||_F^2 - sum S^2, or of the trailing energy).
    residual_rounding: float | None = None
    # ||A||_F^2 - ||Q^T A||_F^2 (with its rounding) for the final pass's basis Q: the energy
    # the basis missed, of which a_i V - U_i S holds part (``verify.rows_agree``); at most
    # the residual's, less where the basis is wider than the rank.
    basis_missed_energy: float | None = None
    # gram: a shift was taken off G after its sums (a mean found in the pass, or a sparse
    # block's shift summed by pairs of non-zeros), so that S, U and V carry the rounding
    # of the uncentered A's (``result._cancellation_note``).
    shifted_after_sums: bool = False


# ---- rank rules ---------------------------------------------------------------------------


def fixed_rank(k: int) -> RankRule:
    return lambda S, fro2, rounding: min(k, S.size)


def rank_for_tolerance(tol: float, max_rank: int) -> RankRule:
    """The smallest rank r whose Frobenius residual sqrt(||A||^2 - sum_{j<=r} S_j^2) is at
    most tol * ||A||_F, capped by max_rank.

    Given the whole spectrum (exact, gram), the residual is the sum of the squares past r
    instead. Otherwise ||A||^2 - sum_{j<=r} S_j^2 is known to its rounding only
    (``meets_tol``): a tol within that takes the cap, max_rank or all of S.
    """

    def rule(S: np.ndarray, fro2: float, rounding: float | None) -> int:
        energy = S.astype(np.float64) ** 2
        if rounding is None:
            reached = np.append(np.cumsum(energy[::-1])[::-1][1:], 0.0) <= tol**2 * fro2
        else:
            reached = meets_tol(fro2 - np.cumsum(energy), fro2, rounding, tol)
        reached = np.flatnonzero(reached)
        rank = int(reached[0]) + 1 if reached.size else S.size
        return max(1, min(rank, max_rank, S.size))

    return rule


def meets_tol(residual2, fro2: float, rounding: float, tol: float):
    """Whether a squared residual computed as ||A||_F^2 less the captured energy (``fro2``
    less a sum of squares) is at most tol^2 ||A||_F^2 with its ``rounding``
    (``difference_rounding``) to spare. A tol whose square is within four roundings is
    never met (``plan.smallest_tol``), however far below zero the difference drifts: that
    drift is rounding too."""
    target = tol**2 * fro2
    return (4 * rounding <= target) & (residual2 + rounding <= target)


def difference_rounding(stats: BlockStats, shift: np.ndarray, sparse: bool) -> float:
    """How far ||A_c||_F^2 less a captured energy may be off: DIFFERENCE_ROUNDING units of
    the energy of the rows the pass read, and for sparse blocks, centered algebraically
    (sums of A, less those of 1 shift^T), of the uncentered rows, m ||shift||^2 more."""
    energy = stats.sumsq + (stats.rows * float(shift @ shift) if sparse else 0.0)
    return DIFFERENCE_ROUNDING * EPS64 * energy


def rank_above_rounding(eps: float, shape: tuple[int, int]) -> RankRule:
    """Singular values above ``rank_tolerance`` of uncentered data whose rounding unit is
    ``eps`` (at least 1)."""

    def rule(S: np.ndarray, fro2: float, rounding: float | None) -> int:
        return max(1, numerical_rank(S, shape, eps, float(np.sqrt(fro2))))

    return rule


def rank_above(rtol: float, max_rank: int | None = None) -> RankRule:
    """numpy.linalg.matrix_rank's rule: singular values above rtol * S_max (at least 1)."""

    def rule(S: np.ndarray, fro2: float, rounding: float | None) -> int:
        rank = int(np.count_nonzero(rtol * S[0] < S)) if S.size and S[0] > 0 else 0
        return max(1, min(rank, max_rank or S.size))

    return rule


# ---- methods ------------------------------------------------------------------------------


def randomized_svd(
    context: PassContext, plan: Plan, seed: int, allocate_u: AllocateU,
    scratch_dir: str | None, rank_rule: RankRule,
) -> Factors:
    """Top-k SVD of A - 1 mu^T by randomized subspace iteration in plan.niter + 1 passes."""
    *_, X = power_iterates(context, plan, seed)
    return _final_pass(context, plan, X, allocate_u, scratch_dir, rank_rule, "randomized")


def power_iterates(context: PassContext, plan: Plan, seed: int):
    """Yield Omega, then X_j = orth(A^T A X_{j-1}) for j = 1..niter, one fused pass each.

    Each pass is checkpointed, so a resumed run takes its completed iterates from disk.
    """
    X = gaussian_test_matrix(context.source.shape[1], plan.basis_size, seed)
    # Unit columns: A^T A X is then at most ||A||_2^2 <= ||A||_F^2, finite wherever the
    # pass's sum of squares is (Gaussian columns, of norm about sqrt(n), overflowed it for
    # ||A||_F near 1e154). The span, hence the method, is the same.
    X /= np.linalg.norm(X, axis=0)
    yield X
    for j in range(plan.niter):
        state = context.resumable(
            f"power{j}", lambda X=X: {"X": orthonormal_columns(fused_power_pass(context, X)[0])}
        )
        X = np.asfortranarray(state["X"])
        yield X


def krylov_svd(
    context: PassContext, plan: Plan, seed: int, allocate_u: AllocateU,
    scratch_dir: str | None, rank_rule: RankRule,
) -> Factors:
    """Top-k SVD by block Krylov iteration (Musco & Musco 2015) in plan.niter + 1 passes.

    The fused power passes are those of subspace iteration, X_j = orth(A^T A X_{j-1}), but
    every iterate is kept: the final pass factors A K with K an orthonormal basis of
    [X_0, X_1, ..., X_q] (up to (q + 1) l columns). K spans the block Krylov space of
    A^T A, which captures flat spectra far better than the last iterate alone.
    """
    iterates = power_iterates(context, plan, seed)
    # extend_basis needs an orthonormal basis to project against: Omega's span, as a copy
    # (the first power pass multiplies Omega itself).
    basis = orthonormal_columns(np.array(next(iterates), order="F"))
    for X in iterates:
        basis = extend_basis(basis, X)
    # At most min(m, n) columns, as planned: beyond m, A K has no more directions to give.
    basis = basis[:, : plan.krylov_width]
    return _final_pass(context, plan, basis, allocate_u, scratch_dir, rank_rule, "krylov")


def extend_basis(basis: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Append to an orthonormal basis the directions of ``block`` it does not span yet.

    Block Gram-Schmidt twice (``_project_out``), then a pivoted QR of the remainder:
    columns whose remaining norm is below DEPENDENT_NORM of the block's (orthonormal, so
    unit) columns are numerically in the span already and are dropped rather than
    normalized into noise.
    """
    Q, R, _ = scipy.linalg.qr(
        _project_out(block, basis), mode="economic", pivoting=True, check_finite=False
    )
    keep = int(np.count_nonzero(np.abs(np.diag(R)) > DEPENDENT_NORM))
    return np.asfortranarray(np.hstack([basis, Q[:, :keep]]))


def adaptive_randomized_svd(
    context: PassContext, plan: Plan, seed: int, allocate_u: AllocateU,
    scratch_dir: str | None, tol: float, max_rank: int,
) -> Factors:
    """Fixed-accuracy randomized SVD: grow the basis until the residual is below tol.

    In the spirit of randQB_EI (Yu, Gu & Li 2018): each block of GROWTH_BLOCK columns starts
    from a fresh Gaussian block, is iterated q times with A^T A deflated against the basis
    so far, and its energy ||A X_t||_F^2 = trace(X_t^T A^T A X_t) comes from one more fused
    pass, so the residual ||A||^2 - ||A X||^2 of the projection is known exactly after each
    block (to its rounding, ``meets_tol``: a tol below about 1.5e-5 grows the basis to the
    cap). Blocks stop at the tolerance or at max_rank columns; then the final pass factors
    A X and the rank is the smallest that meets the tolerance.

    The basis grows up to the plan's l = max_rank + oversample columns (at most min(m, n)),
    so that a rank capped at max_rank is as accurate as k = max_rank would be.
    """
    n = context.source.shape[1]
    state = {"basis": np.zeros((n, 0), order="F"), "captured": 0.0}
    for block in range(plan.growth_blocks):
        width = min(GROWTH_BLOCK, plan.basis_size - state["basis"].shape[1])
        if width <= 0:
            break
        state = context.resumable(
            f"grow{block}",
            lambda state=state, block=block, width=width: _grow_basis(
                context, plan, seed, state["basis"], float(state["captured"]), block, width
            ),
        )
        fro2, captured = float(state["fro2"]), float(state["captured"])
        if meets_tol(fro2 - captured, fro2, float(state["rounding"]), tol):
            break
    basis = np.asfortranarray(state["basis"])
    rule = rank_for_tolerance(tol, max_rank)
    return _final_pass(context, plan, basis, allocate_u, scratch_dir, rule, "randomized")


def _grow_basis(context, plan, seed, basis, captured, block, width) -> dict:
    """One block of the fixed-accuracy method: niter + 1 passes, the block's energy exact."""
    n = basis.shape[0]
    X = _deflated_basis(gaussian_test_matrix(n, width, seed, stream=block + 1), basis)
    for _ in range(plan.niter):
        X = _deflated_basis(fused_power_pass(context, X)[0], basis)
    Z, stats, shift = fused_power_pass(context, X)
    return {
        "basis": np.asfortranarray(np.hstack([basis, X])),
        "captured": captured + float(np.sum(X * Z)),
        "fro2": context.centering.frobenius_squared(shift, stats),
        "rounding": difference_rounding(stats, shift, plan.sparse),
    }


def exact_svd(
    context: PassContext, plan: Plan, allocate_u: AllocateU, scratch_dir: str | None,
    rank_rule: RankRule,
) -> Factors:
    """Exact top-k SVD of A - 1 mu^T: TSQR for R and the SVD of R, which give the rank and
    V_k; then the final pass over A V_k for U, S and V.

    Singular values are accurate to about eps * sigma_1 (Householder stability), and U
    and V are orthonormal to working precision.
    """
    state = context.resumable("tsqr", lambda: _factor_state(*tsqr_r_pass(context)))
    stats, shift = _stats_of(state)
    # R and its n x n factors are let go before the final pass, which the plan lets have
    # the memory they took (only V_k is kept).
    S_all, Vt = scipy.linalg.svd(state.pop("factor"), full_matrices=False, overwrite_a=True,
                                 check_finite=False)[1:]
    fro2 = _representable(context.centering.frobenius_squared(shift, stats), S_all, stats)
    rank = rank_rule(S_all, fro2, None)
    V = np.asfortranarray(Vt[:rank].T)
    del Vt
    # Each sigma_j to a few eps sigma_1 (Householder), so its square to that times 2 sigma_j.
    error, tail = RESIDUAL_ROUNDING * EPS64 * float(S_all[0]), S_all[rank:]
    tail_rounding = 2 * error * float(np.sum(tail)) + tail.size * error**2
    return _final_pass_over_v(context, plan, V, S_all, allocate_u, scratch_dir, "exact",
                              tail_rounding)


def gram_svd(
    context: PassContext, plan: Plan, allocate_u: AllocateU, scratch_dir: str | None,
    rank_rule: RankRule, data_eps: float, *, fallback: bool,
) -> Factors:
    """Top-k SVD of A - 1 mu^T from the eigendecomposition of G = A^T A, which gives the
    rank and V_k; then the final pass over A V_k for U, S and V.

    G is accumulated in float64 by dsyrk, the fastest of the products, so this is the
    cheapest method for small n. Forming G squares the condition number: its eigenvalues
    give sigma_j to about eps * sigma_1^2 / sigma_j (sqrt(eps) * sigma_1 at worst), and
    its eigenvectors span V_k to about eps * sigma_1^2 / (sigma_k^2 - sigma_k+1^2). The
    final pass recomputes S from the projection of A onto span(A V_k), as accurately as
    that span allows. For ill-conditioned data the exact method (TSQR) keeps
    eps * sigma_1.

    A spectrum too ill-conditioned for G (``gram_is_accurate``, against ``data_eps``, the
    data's own rounding unit, 0 for integers) switches to the exact method with
    ``fallback``, at the cost of one more pass; either way ``Factors.note`` says so.
    """
    state = context.resumable("gram", lambda: _factor_state(*gram_pass(context)))
    stats, shift = _stats_of(state)
    if plan.sparse and "shifted_after" not in state:  # resumed from an older checkpoint:
        stats.shifted_after = stats.rows * float(shift @ shift)  # all of it, as it counted
    # As in exact_svd, G and its eigenvectors are let go before any further pass.
    eigenvalues, eigenvectors = scipy.linalg.eigh(state.pop("factor"), overwrite_a=True,
                                                  check_finite=False)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]  # descending
    # A has at most min(m, n) singular values: G's eigenvalues past m are rounding, left
    # out; a negative one is rounding of its size, counted so (not as zero) in the
    # residual, so that a tol below the method's accuracy is not taken as met.
    S_all = np.sqrt(np.abs(eigenvalues[: min(stats.rows, eigenvalues.size)]))
    fro2 = _representable(context.centering.frobenius_squared(shift, stats), S_all, stats)
    rank = rank_rule(S_all, fro2, None)
    V = np.asfortranarray(eigenvectors[:, :rank])
    del eigenvectors
    # A mean found in the pass is subtracted from G afterwards (sparse blocks are shifted by
    # zero): G's rounding then scales with the uncentered ||A||^2, m ||d||^2 more; so does
    # the shift of sparse blocks summed by pairs of non-zeros (not of densified ones).
    d = context.centering.offset(shift, stats)
    subtracted = (0.0 if d is None else stats.rows * float(d @ d)) + stats.shifted_after
    accurate = gram_is_accurate(eigenvalues, rank, data_eps, subtracted)
    if not accurate and fallback:
        factors = exact_svd(context, plan, allocate_u, scratch_dir, rank_rule)
        factors.note = (f"{_gram_shortfall(eigenvalues, rank, subtracted)}; switched to the "
                        "exact method after its pass")
        return factors
    # Each eigenvalue of G to a few eps ||G||_2, the subtracted mean's share included.
    error = RESIDUAL_ROUNDING * EPS64 * (max(float(eigenvalues[0]), 0.0) + subtracted)
    factors = _final_pass_over_v(context, plan, V, S_all, allocate_u, scratch_dir, "gram",
                                 (S_all.size - rank) * error)
    factors.shifted_after_sums = subtracted > 0
    if not accurate:
        factors.note = (f"{_gram_shortfall(eigenvalues, rank, subtracted)}: the trailing "
                        "singular values and vectors may be far off; method='exact' keeps "
                        "eps sigma_1")
    return factors


def _gram_shortfall(eigenvalues: np.ndarray, rank: int, subtracted: float) -> str:
    """Why G cannot resolve sigma_k: how small it is next to ||A||_2."""
    if eigenvalues[rank - 1] > 0:
        ratio = np.sqrt(eigenvalues[rank - 1] / (eigenvalues[0] + subtracted))
        before = " (before centering)" if subtracted > 0 else ""
        size = f"sigma_k / ||A||_2 ~ {ratio:.1e}{before} is"
    else:  # lost in G's rounding altogether
        size = "sigma_k is"
    return f"{size} {GRAM_SHORTFALL}"


# ---- shared steps -------------------------------------------------------------------------


def _final_pass(context, plan, X, allocate_u, scratch_dir, rank_rule, method) -> Factors:
    """Streaming TSQR of A X with B = Q^T A, the SVD of B, and U = Q W by the backward sweep."""
    with _local_spill(context, plan, scratch_dir) as spill:
        final = tsqr_final_pass(context, X, spill)
        V_all, S_all, Wt_all = scipy.linalg.svd(final.BT, full_matrices=False)
        fro2 = _representable(context.centering.frobenius_squared(final.shift, final.stats),
                              S_all, final.stats)
        rounding = difference_rounding(final.stats, final.shift, plan.sparse)
        rank = rank_rule(S_all, fro2, rounding)
        V, W = normalize_signs(V_all[:, :rank], Wt_all[:rank].T)
        left_vectors_sweep(context, final, spill, W, allocate_u(rank))
    numerical = numerical_rank(S_all[:rank], context.source.shape,
                               rounding_unit(context.source.dtype),
                               unshifted_norm(final.stats, final.shift))
    factors = Factors(S_all[:rank], V, fro2, numerical, method, residual_rounding=rounding,
                      basis_missed_energy=max(fro2 - float(np.sum(S_all**2)), 0.0) + rounding)
    if rank == min(context.source.shape):
        # All of A's singular values: the residual is zero to the factorization's rounding,
        # where ||A||^2 - sum S^2 would leave its own.
        factors.trailing_energy = 0.0
        factors.residual_rounding = (RESIDUAL_ROUNDING * EPS64) ** 2 * fro2
    return factors


@contextlib.contextmanager
def _local_spill(context, plan, scratch_dir):
    """The Q spill of a final pass run here; None on a cluster, whose workers spill into a
    directory of their own (one the client may not reach)."""
    if context.cluster is not None:
        yield None
        return
    with QSpill(scratch_dir, in_memory=plan.spill_in_memory) as spill:
        context.checkpoint.scratch(spill.directory)  # for a run after a kill to remove
        yield spill


def _final_pass_over_v(context, plan, V, S_all, allocate_u, scratch_dir, method,
                       tail_rounding: float) -> Factors:
    """The final pass over A V_k for a method that found the whole spectrum ``S_all`` (exact,
    gram), V_k its k = V.shape[1] leading right singular vectors; the residual is the tail
    of ``S_all``, as the rank rule saw it, whose sum of squares is known to
    ``tail_rounding``."""
    rank = V.shape[1]
    factors = _final_pass(context, plan, V, allocate_u, scratch_dir, fixed_rank(rank), method)
    factors.trailing_energy = float(np.sum(S_all[rank:] ** 2))
    factors.residual_rounding = tail_rounding
    return factors


def _representable(fro2: float, S: np.ndarray, stats: BlockStats) -> float:
    """fro2, the squared Frobenius norm; NonFiniteError for a matrix so small (entries
    below about 1.5e-154) that its squares underflow float64: the norm, hence the residual,
    the explained variance and the ranks chosen by tolerance, would be wrong, and the gram
    method would see a zero matrix. Told by sigma_1, or, where the squares vanished
    altogether, by column sums that are not zero but as small. (A centered matrix whose
    norm cancels to about zero has larger column sums and passes.)"""
    tiny = np.finfo(np.float64).tiny
    largest_sum = float(np.max(np.abs(stats.colsum), initial=0.0))
    vanished = fro2 < tiny and 0 < largest_sum < np.sqrt(tiny) * max(stats.rows, 1)
    if (S.size and 0 < S[0] < np.sqrt(tiny)) or vanished:
        raise NonFiniteError(
            "the matrix is too small for float64: the squares of its entries underflow; "
            "rescale the matrix"
        )
    return fro2


def _deflated_basis(X: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """orth(X - basis basis^T X): new orthonormal columns orthogonal to the basis."""
    return orthonormal_columns(_project_out(X, basis))


def _project_out(X: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """X - basis basis^T X, projected twice so the result is orthogonal to the basis to
    working precision (classical Gram-Schmidt twice is enough)."""
    for _ in range(2):
        X = X - basis @ (basis.T @ X)
    return X


def _factor_state(factor: np.ndarray, stats: BlockStats, shift: np.ndarray) -> dict:
    """What a factoring pass leaves for the rest of the run, as arrays to checkpoint."""
    return {"factor": factor, "colsum": stats.colsum, "sumsq": stats.sumsq,
            "rows": stats.rows, "shifted_after": stats.shifted_after, "shift": shift}


def _stats_of(state: dict) -> tuple[BlockStats, np.ndarray]:
    # (a checkpoint written before shifted_after was recorded lacks it: see gram_svd)
    stats = BlockStats(state["colsum"], float(state["sumsq"]), int(state["rows"]),
                       float(state.get("shifted_after", 0.0)))
    return stats, state["shift"]


def gram_is_accurate(eigenvalues: np.ndarray, k: int, data_eps: float,
                     subtracted: float = 0.0) -> bool:
    """Whether eps * (sigma_1 / sigma_k)^2, the gram method's relative error on sigma_k,
    stays below GRAM_TOLERANCE or the data's rounding unit ``data_eps``, whichever is larger.
    ``subtracted``: what was taken off G's norm after it was summed (m ||d||^2 of a mean
    found in the pass), whose rounding G keeps.

    Not the data's rounding relative to ||A||_2 (data_eps sigma_1 / sigma_k): each value is
    rounded relative to itself, so on columns of very different scales the exact method
    finds sigma_k to about data_eps even where data_eps sigma_1 exceeds it, and G does not.
    """
    if eigenvalues[0] <= 0:
        return True  # A = 0: every method returns zeros
    if eigenvalues[k - 1] <= 0:
        return False
    error = EPS64 * (eigenvalues[0] + subtracted) / eigenvalues[k - 1]
    return error <= max(GRAM_TOLERANCE, data_eps)


def orthonormal_columns(Z: np.ndarray) -> np.ndarray:
    """Q of the economic Householder QR of Z (n x l), Fortran-ordered."""
    Q, _ = scipy.linalg.qr(Z, mode="economic", overwrite_a=True, check_finite=False)
    return np.asfortranarray(Q)


# Entries of a column of V within this fraction of its largest magnitude count as its
# largest: far above the rounding that differs between block layouts, backends and methods
# (about 1e-12), far below any real difference between entries.
SIGN_TIE = 1e-6


def normalize_signs(V: np.ndarray, W: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip singular pairs so that in each column of V the first entry of the largest
    magnitude is positive.

    Applied the same way on every backend, so results compare without sign juggling.
    Entries within SIGN_TIE of the largest magnitude count as largest: the pairs of equal
    magnitude and opposite signs that centering makes (a one-hot feature's two columns)
    would otherwise take their sign from the last bit of rounding.
    """
    magnitudes = np.abs(V)
    largest = magnitudes >= (1 - SIGN_TIE) * magnitudes.max(axis=0, initial=0.0)
    rows = np.argmax(largest, axis=0)  # the first True
    signs = np.sign(V[rows, np.arange(V.shape[1])])
    signs[signs == 0] = 1.0
    return V * signs, W * signs


def rounding_unit(dtype: np.dtype) -> float:
    """The rounding unit of data of ``dtype``, as numpy's matrix_rank takes it: a float
    type's own eps, float64's for integers (held exactly, and computed in float64)."""
    dtype = np.dtype(dtype)
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else EPS64


def numerical_rank(S: np.ndarray, shape: tuple[int, int], eps: float, data_norm: float
                   ) -> int:
    """Count of singular values above ``rank_tolerance`` (``eps``: the data's rounding
    unit, ``rounding_unit``; ``data_norm``: the Frobenius norm of the values as stored,
    before any centering)."""
    if S.size == 0 or S[0] == 0:
        return 0
    return int(np.count_nonzero(rank_tolerance(float(S[0]), data_norm, shape, eps) < S))


def rank_tolerance(S_max: float, data_norm: float, shape: tuple[int, int], eps: float
                   ) -> float:
    """Below it a singular value is rounding (S_max: the largest singular value of the
    matrix factored, centered or not; ``data_norm``: ||A||_F of the values as stored).

    numpy.linalg.matrix_rank takes max(m, n) eps S_max with the data's eps, which for
    float32 data of more than 1/eps (8.4 million) rows exceeds S_max itself; but values each
    rounded by a relative eps/2 move no singular value by more than eps/2 ||A||_F, so the
    smaller of the two bounds the data's rounding. The float64 computation's, max(m, n)
    eps64 S_max, is the floor: for float64 data this is numpy's rule.

    Centered data's S_max can be far below ||A||_F (a mean of 1e6 and a spread of 1), and
    the rounding of the stored values is not centered away: it is relative to the values.
    Two more floors, which never exceed the ones above on uncentered data, keep it out of
    the count. Errors of at most eps/2 of each value, of standard deviation at most
    eps/sqrt(12) of it, make an m x n matrix of norm about eps/sqrt(12) rms (sqrt(m) +
    sqrt(n)), rms = ||A||_F / sqrt(m n): eps/2 rms (sqrt(m) + sqrt(n)) with room, and at
    most the bound eps/2 ||A||_F. And the centering, in float64, rounds each value and the
    mean by eps64/2 of them: eps64 ||A||_F."""
    m, n = shape
    data = min(eps / 2 * data_norm, max(shape) * eps * S_max)
    rms = data_norm / np.sqrt(m * n) if m * n else 0.0
    stored_rounding = min(eps / 2 * rms * (np.sqrt(m) + np.sqrt(n)), eps / 2 * data_norm)
    return float(max(data, stored_rounding, EPS64 * data_norm, max(shape) * EPS64 * S_max))


def unshifted_norm(stats: BlockStats, shift: np.ndarray) -> float:
    """||A||_F from a pass's totals of A_s = A - 1 shift^T: ||A_s||^2 + 2 shift^T colsum +
    m ||shift||^2, summed in units of the shift's largest entry, as m ||shift||^2 may
    overflow where ||A||_F does not (a mean of 1e153 over 2000 rows)."""
    scale = max(float(np.max(np.abs(shift), initial=0.0)), 1.0)
    unit_shift = shift / scale
    energy = stats.sumsq / scale / scale + 2.0 * float(unit_shift @ (stats.colsum / scale)) + \
        stats.rows * float(unit_shift @ unit_shift)
    return scale * float(np.sqrt(max(energy, 0.0)))

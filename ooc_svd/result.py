"""The result of a run: the factors, their diagnostics, and the provenance written with them."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import __version__
from .centering import Centering
from .engine import Factors
from .errors import InputError
from .passes import PassRecord
from .plan import EPS64, MAX_EXACT_COLUMNS, Plan, smallest_tol
from .sources import CSRSource, DenseSource
from .units import format_bytes


@dataclass
class SVDResult:
    """A truncated SVD A - 1 mu^T ~= U diag(S) V^T with the diagnostics of its run.

    Attributes
    ----------
    U : ndarray or zarr.Array of shape (m, k)
        Left singular vectors; a zarr array inside ``store`` when ``out`` was given.
        Orthonormal to working precision in every column, also beyond ``numerical_rank``
        (where S is zero to rounding and the columns complete the basis).
    S : ndarray of shape (k,)
        Singular values, descending.
    V : ndarray of shape (n, k)
        Right singular vectors (not transposed, as in torch). The largest-magnitude entry of
        each column is positive (the first, of entries within 1e-6 of the largest).
    mean : ndarray of shape (n,) or None
        The subtracted mean, when centered: float64 whatever the data's dtype, as it was
        subtracted (a float32 copy of a mean of 1e6 is off by about 0.03, which changes a
        residual measured with it).
    residual : float
        ||A - 1 mu^T - U diag(S) V^T||_F / ||A - 1 mu^T||_F, exact and obtained without an
        extra pass from ||A||_F^2 - sum(S**2), which cancels to the rounding of the sums of
        squares below about 1e-7 (up to about 1e-5 on data of many repeated values). The
        'exact' and 'gram' methods, which find the whole spectrum, sum the
        squares of the singular values past the rank instead: accurate to about eps with
        'exact', and to about sqrt(n eps) sigma_1 / ||A||_F with 'gram' (G's rounding).
    frobenius_norm : float
        ||A - 1 mu^T||_F.
    passes : int
        Reads of A.
    bytes_read : int
        Decoded bytes read from A over all passes (for ``svd_lowrank``'s A - M with an M
        that is not a row: from A and M).
    seconds_per_pass : list of float
    numerical_rank : int
        Singular values above what rounding can make, among those computed:
        numpy.linalg.matrix_rank's max(m, n) eps S[0] with the data's eps (float32's for
        float32 data), or eps/2 ||A||_F (before centering) where that is less, and at
        least max(m, n) eps64 S[0] (``engine.rank_tolerance``). Centered, also at least
        what rounding the stored values made, which centering does not remove:
        eps/2 rms (sqrt(m) + sqrt(n)) for the rms of A's values, and eps64 ||A||_F (a
        rank-10 float64 matrix plus 1e6 counts 10, where numpy's rule on A - 1 mu^T
        counts every column).
    method : str
        The method that ran: 'randomized', 'krylov', 'exact' or 'gram' (``note`` says why,
        if it is not the planned one).
    backend : str
        Where the block products ran: 'cpu' or 'cuda'; on a cluster, where the workers'
        ran (with 'auto', each worker uses its GPU when it has one: 'cpu and cuda' on a
        mixed cluster).
    note : str
    plan : Plan
        The method, blocks and memory chosen, with the reason (``plan.describe()``).
    store : zarr.Group or None
        The output group when ``out`` was given.
    spectral_error : float or None
        Estimate of ||A - 1 mu^T - U diag(S) V^T||_2 from below (power iterations), when
        ``spectral_iters`` was given.
    basis_residual : float or None
        ||A_c - Q Q^T A_c||_F / ||A_c||_F (A_c = A - 1 mu^T) for the orthonormal basis Q of
        the final pass, whose span holds U: the part of A_c that the basis missed, with the
        rounding of that difference; at most ``residual``, and less where the basis was
        wider than the rank. a_i V - U_i S lies in what Q missed, so ``ooc-svd check``
        bounds it by this over the rows it samples.
    """

    U: Any
    S: np.ndarray
    V: np.ndarray
    mean: np.ndarray | None
    residual: float
    frobenius_norm: float
    passes: int
    bytes_read: int
    seconds_per_pass: list[float]
    numerical_rank: int
    method: str
    note: str
    plan: Plan
    seed: int
    store: Any = None
    spectral_error: float | None = None
    backend: str = "cpu"
    basis_residual: float | None = None
    records: list[PassRecord] = field(default_factory=list, repr=False)

    def __iter__(self):
        """Unpack as ``U, S, V = result``."""
        return iter((self.U, self.S, self.V))

    @property
    def rank(self) -> int:
        """Number of triplets returned (k, or the rank reached in fixed-accuracy mode)."""
        return int(self.S.size)

    @property
    def explained_variance(self) -> np.ndarray:
        """S**2 / (m - 1): the variance along each principal direction (for PCA results)."""
        return self.S.astype(np.float64) ** 2 / max(self.plan.shape[0] - 1, 1)

    @property
    def explained_variance_ratio(self) -> np.ndarray:
        """Fraction of ||A - 1 mu^T||_F^2 (the total variance, for PCA) along each direction.

        The total is exact, from the pass over A, not from the k values computed.
        """
        total = self.frobenius_norm**2
        return self.S.astype(np.float64) ** 2 / total if total > 0 else np.zeros(self.rank)

    def rank_for_energy(self, fraction: float) -> int:
        """The smallest rank r whose triplets hold ``fraction`` of ||A - 1 mu^T||_F^2.

        Raises InputError when the computed triplets hold less; compute with
        ``tol=sqrt(1 - fraction)`` to get that rank directly.
        """
        return rank_for_energy(self.S, self.frobenius_norm**2, fraction)


def rank_for_energy(S: Any, total_energy: float, fraction: float) -> int:
    """Smallest r with sum(S[:r]**2) >= fraction * total_energy.

    Parameters
    ----------
    S : array_like of shape (k,)
        Singular values, descending.
    total_energy : float
        ||A||_F^2 (the sum of all squared singular values, not only the k given).
    fraction : float
        Energy to keep, 0 < fraction <= 1 (e.g. 0.99).
    """
    if not 0 < fraction <= 1:
        raise InputError(f"fraction must be in (0, 1], not {fraction!r}")
    S = np.asarray(S)
    energy = np.cumsum(S.astype(np.float64) ** 2)
    # A relative slack of a few ulps (of S as stored: a float32 S's squares are each off by
    # up to eps32), so fraction=1 is reached by a complete spectrum.
    stored_eps = float(np.finfo(S.dtype).eps) if S.dtype.kind == "f" else 0.0
    slack = max(1e-12, 4 * stored_eps)
    reached = np.flatnonzero(energy >= fraction * total_energy * (1 - slack))
    if reached.size == 0:
        held = energy[-1] / total_energy if total_energy > 0 and energy.size else 0.0
        raise InputError(
            f"the {energy.size} singular values hold {held:.4%} of the energy, less than "
            f"{fraction:.4%}; {_tol_for(fraction)}"
        )
    return int(reached[0]) + 1


# Above this estimated relative error in ||A - 1 mu^T||_F^2, a sparse run's note says so.
CANCELLATION_NOTE_ERROR = 1e-8


def _tol_for(fraction: float) -> str:
    """Advice for a spectrum that holds less than ``fraction`` of the energy: the tol whose
    residual keeps that fraction, rounded down (a rounded-up tol would keep less)."""
    tol = np.sqrt(1 - fraction)
    if tol == 0:
        return "recompute with the full rank, k = min(m, n)"
    digits = 3 - int(np.floor(np.log10(tol))) - 1
    return f"recompute with tol={np.floor(tol * 10**digits) / 10**digits:.3g} to find the rank"


def _cancellation_note(centering: Centering, plan: Plan, factors: Factors, fro2: float) -> str:
    """Sparse blocks are centered algebraically (sums of A, then minus those of 1 mu^T), so
    the squared norm, hence the residual and explained variance, carry a relative rounding
    error of up to about eps sqrt(nnz) ||1 mu^T||_F^2 / ||A - 1 mu^T||_F^2: the rounding of
    a sum of nnz squares of the mean's order grows as its square root where the roundings
    are independent (measured: 15 to 60 times below that bound on float64 values), and
    faster where they drift together, on many repeated values (1.6 times above it on 1e6
    float32 values near 3e4, which repeat at their spacing of 2e-3). Said when it is not
    small.
    S, U and V keep their accuracy (each product is corrected before any sum of squares),
    except from gram where it corrected G after its sums (``Factors.shifted_after_sums``:
    the mean found in its pass, or one given and taken off by the pairs kernel), where
    method='auto' switches to exact (engine.gram_svd)."""
    if not plan.sparse or centering.mean is None or not np.any(centering.mean):
        return ""
    lost = "the Frobenius norm, residual and explained variance"
    if factors.shifted_after_sums:
        lost = "the singular values and vectors, " + lost
    if fro2 <= 0:
        if not factors.S.size or factors.S[0] <= 0:
            return ""  # every row read as the mean, which api._zero_note says
        return ("the centered matrix's squared norm rounds to zero next to the mean's rows, "
                f"and sparse blocks are centered algebraically: {lost} are lost")
    energy = plan.shape[0] * float(centering.mean @ centering.mean)
    ratio = energy / fro2
    error = float(np.finfo(np.float64).eps) * np.sqrt(plan.nnz) * ratio
    if error <= CANCELLATION_NOTE_ERROR:
        return ""
    return (f"the mean's rows hold {ratio:.1e} times the energy of the centered matrix, and "
            f"sparse blocks are centered algebraically: {lost} carry a relative error of up "
            f"to about {error:.0e} (more where many values repeat)")


# Below this fraction of sigma_1 a power pass's product A^T (A X), in float64, rounds a
# direction away: its square falls below the rounding of sigma_1^2 (sqrt(eps) ~ 1.5e-8).
POWER_FLOOR = 1e-7


def _power_floor_note(values: np.ndarray, plan: Plan, method: str) -> str:
    """The randomized and Krylov power passes sharpen the directions of singular values
    above about POWER_FLOOR sigma_1 only: said when the result has some below (``values``:
    those above the data's rounding), which have the accuracy of niter=0."""
    if method not in ("randomized", "krylov") or plan.niter == 0 or not values.size or \
            values[0] <= 0:
        return ""
    below = np.flatnonzero(values < POWER_FLOOR * values[0])
    if not below.size:
        return ""
    remedy = " (method='exact' resolves them)" if plan.shape[1] <= MAX_EXACT_COLUMNS else ""
    return (f"sigma_{int(below[0]) + 1} and those after it lie below {POWER_FLOOR:g} sigma_1, "
            "where the power passes' products A^T A X round their directions away: they "
            f"have the accuracy of niter=0{remedy}")


def _fallback_note(plan: Plan, method: str, rank: int) -> str:
    """Where 'auto' took another method than it preferred for lack of memory: a run with
    a larger limit, or another chunking or block size, may take the preferred one, and
    give another result (of another accuracy), so that runs compare only at a fixed
    method. Not said where the basis spans all of A's rows or columns (its ``rank``
    triplets, or the basis of l columns): every method then gives the exact SVD."""
    if plan.preferred is None or max(rank, plan.basis_size) >= min(plan.shape):
        return ""
    preferred, needed = plan.preferred
    return (f"method 'auto' preferred {preferred}, which would need "
            f"{format_bytes(needed, round_up=True)} (memory_limit is "
            f"{format_bytes(plan.memory_limit)}), and ran {method}: a run with more memory "
            "may run it and give another result; fix method= to compare runs")


def _residual_floor_note(residual: float, rounding: float, applies: bool,
                         difference: bool) -> str:
    """A residual below its rounding, found as ||A||^2 - sum S^2 (``difference``) or as
    the sum of the squares of the singular values past the rank (exact, gram): 0.0 is no
    exact factorization, nor is gram's 2e-8 on a matrix of rank k. ``applies`` in
    fixed-rank mode (fixed-accuracy mode's note says it otherwise) when every singular
    value found is above the data's rounding (else the factors hold all of A that is not
    rounding, and the residual is that small)."""
    if not applies or residual >= rounding:
        return ""
    found = "||A||_F^2 - sum S^2" if difference else \
        "the squares of the singular values past the rank"
    return (f"the residual {residual:.2g} lies within the rounding of {found} (about "
            f"{rounding:.1g} of ||A||_F): it is at most about that")


def _tolerance_note(tol: float | None, residual: float, rank: int, rounding: float,
                    method: str, cap: int, n: int) -> str:
    """Say when fixed-accuracy mode stopped at its rank cap short of the tolerance, or
    when the residual is within the method's rounding of it (``rounding``: how far the
    relative residual may be off), so that meeting it is not confirmed. (The few eps of
    slack: the rank rule summed the same squares in another order, to a few eps of what
    they sum to: the trailing singular values' squares for the exact and gram methods, to
    a few eps of tol^2; ||A||^2 - sum S^2 for the others, to a few eps of ||A||^2, 1 in
    these relative units.)"""
    if tol is None:
        return ""
    tail_summed = method in ("exact", "gram")
    summed = tol**2 if tail_summed else 1.0
    # The others' rank rule never takes a tol within twice their rounding
    # (``engine.meets_tol``): they stopped at the cap, whatever their residual.
    unresolved = not tail_summed and tol < 2 * rounding
    if not unresolved and residual**2 + rounding**2 <= tol**2 + 4 * EPS64 * summed:
        return ""
    at_cap = rank >= cap
    at = f"at rank {rank}, the cap" if at_cap else f"at rank {rank}"
    if residual > tol and residual > rounding:  # the rank rules stop short only at the cap
        return (f"the residual {residual:.3g} exceeds tol={tol:g} {at}: raise max_rank for a "
                "smaller residual")
    remedies = []
    if method != "exact":
        remedies.append("the exact method resolves smaller residuals" if n <= MAX_EXACT_COLUMNS
                        else f"a tol above about {smallest_tol(method, n):.1g} can be")
    if at_cap:
        remedies.append("a larger max_rank may be needed too")
    remedy = f": {'; '.join(remedies)}" if remedies else ""
    return (f"the residual {residual:.3g} {at}{',' if at_cap else ''} is within the {method} "
            f"method's rounding (about {rounding:.1g}), so tol={tol:g} cannot be "
            f"confirmed{remedy}")


def _singular_values_in(S: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, str]:
    """S in U's dtype, and '' as its note; float64 where that dtype cannot hold them
    (float32 beyond 3.4e38, which A's entries of 1e37 reach), with a note saying so."""
    if dtype.kind == "f" and float(np.max(S, initial=0.0)) > float(np.finfo(dtype).max):
        return S.astype(np.float64), (f"S is float64, as U and V are {dtype.name}: its "
                                      f"values exceed {dtype.name}'s range")
    return S.astype(dtype), ""


def assemble_result(U, factors: Factors, centering: Centering, plan: Plan, seed: int,
                    records: list[PassRecord], tol: float | None = None) -> SVDResult:
    """The result in U's dtype, with the exact Frobenius residual ||A||^2 - sum S^2 (or the
    trailing singular values' energy, where the method knows it), and a note gathering what
    the run has to say about it (``tol``: fixed-accuracy mode's)."""
    dtype = U.dtype
    fro2 = factors.frobenius_squared
    residual2 = factors.trailing_energy
    difference = residual2 is None  # ||A||^2 - sum S^2, with its rounding
    if residual2 is None:
        residual2 = max(fro2 - float(np.sum(factors.S**2)), 0.0)
    residual = float(np.sqrt(residual2 / fro2)) if fro2 > 0 else 0.0
    rounding = factors.residual_rounding or 0.0
    rounding = float(np.sqrt(rounding / fro2)) if fro2 > 0 else 0.0
    S, S_note = _singular_values_in(factors.S, dtype)
    return SVDResult(
        U=U,
        S=S,
        V=factors.V.astype(dtype),
        mean=None if centering.mode == "none" else centering.mean.astype(np.float64),
        residual=residual,
        frobenius_norm=float(np.sqrt(fro2)),
        passes=len(records),
        bytes_read=sum(record.bytes_read for record in records),
        seconds_per_pass=[record.seconds for record in records],
        numerical_rank=factors.numerical_rank,
        method=factors.method,
        note="; ".join(filter(None, [
            factors.note, S_note, _cancellation_note(centering, plan, factors, fro2),
            _tolerance_note(tol, residual, factors.S.size, rounding, factors.method,
                            plan.k, plan.shape[1]),
            _power_floor_note(factors.S[:factors.numerical_rank], plan, factors.method),
            _fallback_note(plan, factors.method, factors.S.size),
            _residual_floor_note(residual, rounding, tol is None
                                 and factors.numerical_rank == factors.S.size, difference)])),
        plan=plan,
        seed=seed,
        records=records,
        basis_residual=None if factors.basis_missed_energy is None or fro2 <= 0 else
        min(float(np.sqrt(factors.basis_missed_energy / fro2)), 1.0),
    )


def provenance(
    result: SVDResult, source: DenseSource | CSRSource, seconds: float
) -> dict[str, Any]:
    import dask
    import numba
    import scipy
    import zarr

    plan = result.plan
    # The exact and gram methods take no basis and no power iterations: their values were
    # given (or defaulted) but not used.
    iterative = plan.method in ("randomized", "krylov")
    return {
        "ooc_svd": {
            "input": source.description,
            "shape": list(plan.shape),
            # In fixed-accuracy mode the plan's k is the rank cap, and ``rank`` the outcome.
            "k": plan.k if plan.tol is None else None,
            "tol": plan.tol,
            "max_rank": plan.k if plan.tol is not None else None,
            "basis_size": plan.basis_size if iterative else None,
            "krylov_width": plan.krylov_width if plan.method == "krylov" else None,
            "niter": plan.niter if iterative else None,
            "spectral_iters": plan.spectral_iters,
            "method": result.method,
            "backend": result.backend,
            "reason": plan.reason,
            "note": result.note,
            "centered": result.mean is not None,
            "seed": result.seed,
            "passes": result.passes,
            "bytes_read": result.bytes_read,
            "seconds_per_pass": result.seconds_per_pass,
            "seconds": seconds,
            "residual": result.residual,
            "frobenius_norm": result.frobenius_norm,
            "numerical_rank": result.numerical_rank,
            "rank": result.rank,
            "spectral_error": result.spectral_error,
            "basis_residual": result.basis_residual,
            "memory_limit": plan.memory_limit,
            "versions": {
                "ooc_svd": __version__,
                "numpy": np.__version__,
                "scipy": scipy.__version__,
                "numba": numba.__version__,
                "zarr": zarr.__version__,
                "dask": dask.__version__,
                "python": sys.version.split()[0],
            },
        }
    }

"""Checks of a result store: orthonormality of U and V, and a sampled residual."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .api import open_matrix
from .engine import GRAM_SHORTFALL
from .errors import InputError, ReadError, StoreNotFoundError, check_int
from .sources import CSRSource
from .store import UNFINISHED


def verify_result(result_path: str, input_path: str | None = None, samples: int = 8,
                  seed: int = 0) -> dict[str, Any]:
    """Measure how orthonormal U and V are; with the input, estimate the residual on
    ``samples`` randomly chosen storage chunks of rows, or more for a result whose basis
    need not span A_c V (randomized, Krylov, a GPU's, or a gram result beyond its
    accuracy) until they hold TELLING_FACTOR times its residual's energy. Where no sample
    can (a residual above about 0.58), ``rows_conclusive`` is False: the rows sampled
    could not tell another input; samples of every chunk can, by the exact residual.

    U is read chunk by chunk, so a U larger than memory is fine. ``ok`` is False when
    ||U^T U - I||_max or ||V^T V - I||_max (every column) exceeds
    ``orthonormality_tolerance``: the rounding of the float64 sums and of U's values as
    stored (4 eps of U's dtype; a float32 U moved by 4e-4 in a few rows fails). When the
    samples cover every row, the residual they give is exact, and ``ok`` is also False when
    the function ``residual_agrees`` finds it is not the stored one (reported under that
    name): the result does not belong to this input, or one of them changed; and when
    U^T A_c V, which every method leaves diag(S), is not so to ``projection_slack``
    (``projection_agrees``, with ``projection_error`` relative to ||A_c||_F). Sampled or
    not, a result of the exact or gram method that leaves these rows a relative residual
    above ``PLAUSIBLE_RESIDUAL`` is no SVD of them (reported as ``residual_plausible``),
    and ``ok`` is False; so is a result whose rows a_i V - U_i S exceed, on the rows
    sampled, the rounding (exact and gram) or the residual of the final pass's basis (the
    others: the stored ``basis_residual``, else the stored residual) that they may reach
    (``rows_agree``, with ``rows_error`` relative to ||A_c||_F; see ROWS_SLACK).

    Arrays that do not fit together (U (m, k), S (k,), V (n, k), the mean (n,)) are an
    InputError. Without the input, ``ok`` is also False for S not descending or negative
    (``singular_values_ordered``), for factors B and A that are not U diag(S) and V^T
    (``factors_agree``), for a store that is not a finished run's
    (``complete``: its attributes are there, the mark of an unfinished write is not, and a
    centered result has its mean), for attributes that do not describe these arrays
    (``attributes_agree``: the shape and rank, a known method, a residual and norm that
    are numbers) and for singular values whose energy is not the one the
    run measured (``singular_values_agree``: sum S^2 = ||A_c||^2 (1 - residual^2), which
    a lost or damaged chunk of S breaks).
    """
    check_int("samples", samples, minimum=1)
    group = _open_result(result_path)
    U = group["U"]
    S, V = (_read_result(group[name], name, result_path).astype(np.float64)
            for name in ("S", "V"))
    attributes = group.attrs.get("ooc_svd", {})
    attributes = dict(attributes) if isinstance(attributes, dict) else {}  # else incomplete
    has_mean = _has_array(group, "mean", result_path)
    complete = all(name in attributes for name in RESULT_ATTRIBUTES) and \
        UNFINISHED not in group.attrs and has_mean == bool(attributes.get("centered"))
    m, k = U.shape
    mean = _read_result(group["mean"], "mean", result_path).astype(np.float64) \
        if has_mean else None
    _check_shapes(result_path, U.shape, S, V, mean)
    chunk_rows = U.chunks[0]
    B = group["B"] if _has_array(group, "B", result_path) else None
    gram = np.zeros((k, k))
    factor_error = 0.0  # of B = U diag(S), relative to S[0]
    for start in range(0, m, chunk_rows):
        rows = slice(start, start + chunk_rows)
        block = _read_result(U, "U", result_path, rows).astype(np.float64)
        gram += block.T @ block
        if B is not None:
            scaled = _read_result(B, "B", result_path, rows).astype(np.float64)
            factor_error = max(factor_error, _largest(scaled - block * S))
    tolerance = orthonormality_tolerance(m, U.dtype)
    u_error = float(np.max(np.abs(gram - np.eye(k)), initial=0.0))
    v_error = float(np.max(np.abs(V.T @ V - np.eye(k)), initial=0.0))
    report: dict[str, Any] = {
        "result": result_path,
        "shape": [m, V.shape[0]],
        "k": k,
        "method": attributes.get("method"),
        "stored_residual": attributes.get("residual"),
        "basis_residual": attributes.get("basis_residual"),
        "u_orthonormality_error": u_error,
        "v_orthonormality_error": v_error,
        "tolerance": tolerance,
        "complete": complete,
        "attributes_agree": _attributes_agree(attributes, (m, V.shape[0]), k),
    }
    report["ok"] = bool(u_error <= tolerance and v_error <= tolerance and complete and
                        report["attributes_agree"])
    # S as every method leaves it: descending, none negative
    report["singular_values_ordered"] = bool(np.all(np.isfinite(S)) and np.all(S >= 0) and
                                             np.all(np.diff(S) <= 0))
    report["ok"] = report["ok"] and report["singular_values_ordered"]
    if B is not None or _has_array(group, "A", result_path):
        report["factors_agree"] = _factors_agree(group, result_path, U.dtype, S, V,
                                                 factor_error, B is not None)
        report["ok"] = report["ok"] and report["factors_agree"]
    energy = _energy_agrees(S, group["S"].dtype, attributes, (m, V.shape[0]), mean)
    if energy is not None:
        report["singular_values_agree"] = energy
        report["ok"] = report["ok"] and energy
    if input_path is None:
        return report
    stored, norm = report["stored_residual"], attributes.get("frobenius_norm")
    spans = _spans_a_v(report["method"], attributes)
    missed = _missed(attributes, stored)
    enough = None  # the captured energy that the sampled rows must hold, if any
    if norm and missed is not None and not spans:
        enough = TELLING_FACTOR * (missed * norm) ** 2
    # All rows hold (1 - residual^2) ||A_c||^2 of it: past a residual of about 0.58 no
    # sample holds enough, and only all of them (the exact residual) can tell.
    reachable = enough is not None and enough < (1.0 - stored**2) * norm**2
    sums = _sampled_sums(input_path, result_path, U, S, V, mean, samples, seed,
                         enough if reachable else None)
    report["sampled_rows"] = sums.rows
    report["input_chunks"] = sums.chunks
    report["sampled_residual"] = float(np.sqrt(sums.relative2))
    if report["method"] in ("exact", "gram"):
        report["residual_plausible"] = bool(sums.relative2 <= PLAUSIBLE_RESIDUAL**2)
        report["ok"] = report["ok"] and report["residual_plausible"]
    if norm and stored is not None:
        report["rows_error"] = float(np.sqrt(sums.projection2)) / norm
        allowed = rows_slack(U.dtype, k, norm, attributes.get("backend"))
        if not spans:
            allowed = float(np.hypot(allowed, missed * norm))
        report["rows_agree"] = bool(sums.projection2 <= allowed**2)
        report["ok"] = report["ok"] and report["rows_agree"]
        # Whether another input would have failed the rows sampled (or the residual of all)
        report["rows_conclusive"] = bool(spans or sums.rows == m or
                                         sums.captured2 >= (enough or 0.0))
    if sums.rows == m and stored is not None:
        agrees = residual_agrees(stored, sums, m, mean,
                                 residual_slack(U.dtype, attributes.get("backend")))
        report["residual_agrees"] = agrees
        report["ok"] = report["ok"] and agrees
    if sums.rows == m:
        # Every method's last pass makes U^T A_c V = diag(S) (U S W^T of A_c V, or
        # U_B S V^T of Q^T A_c): a wrong mean, S, V's columns or a row of U break it
        scale = float(np.sqrt(sums.norm2))
        error = float(np.max(np.abs(sums.projected - np.diag(S)), initial=0.0))
        report["projection_error"] = error / scale if scale > 0 else error
        report["projection_agrees"] = bool(
            error <= projection_slack(U.dtype, k, attributes.get("backend")) * scale)
        report["ok"] = report["ok"] and report["projection_agrees"]
    return report


# What every finished run writes, and the checks read: without one of them a check would be
# skipped or loosened (the residual's, the energy's), so its store counts as incomplete.
RESULT_ATTRIBUTES = ("shape", "rank", "method", "centered", "residual", "frobenius_norm")


def _attributes_agree(attributes: dict, shape: tuple[int, int], k: int) -> bool:
    """Whether the attributes that the checks read describe these arrays: the shape and
    rank of U, S and V, a known method, and a residual and norm that are numbers (a missing
    one is ``complete``'s concern)."""
    from .plan import METHODS

    def number(name: str) -> bool:
        value = attributes.get(name, 0.0)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and \
            0.0 <= value < np.inf

    return bool(attributes.get("shape", list(shape)) == list(shape) and
                attributes.get("rank", k) == k and
                attributes.get("method", "exact") in METHODS and
                number("residual") and number("frobenius_norm"))


def _largest(values: np.ndarray) -> float:
    return float(np.max(np.abs(values), initial=0.0))


def _factors_agree(group: Any, path: str, dtype: np.dtype, S: np.ndarray, V: np.ndarray,
                   factor_error: float, has_b: bool) -> bool:
    """Whether the factors that ``write_factors`` adds are B = U diag(S) (``factor_error``,
    found as U was read) and A = V^T, to the rounding of their stored values; False when
    only one of them is there."""
    if not (has_b and _has_array(group, "A", path)):
        return False
    A = _read_result(group["A"], "A", path).astype(np.float64)
    rounding = 4 * float(np.finfo(dtype).eps)
    scale = float(S[0]) if S.size else 0.0
    return bool(A.shape == V.T.shape and _largest(A - V.T) <= rounding and
                factor_error <= rounding * scale)


def _check_shapes(path: str, U_shape: tuple[int, int], S: np.ndarray, V: np.ndarray,
                  mean: np.ndarray | None) -> None:
    """Refuse a result whose arrays do not fit together: U (m, k), S (k,), V (n, k), and
    the mean (n,)."""
    m, k = U_shape
    n = V.shape[0] if V.ndim == 2 else None
    if S.shape != (k,) or V.ndim != 2 or V.shape[1] != k or \
            (mean is not None and mean.shape != (n,)):
        shapes = f"U {tuple(U_shape)}, S {S.shape}, V {V.shape}" + \
            ("" if mean is None else f", mean {mean.shape}")
        raise InputError(f"{path!r} is no complete ooc_svd result: its arrays do not fit "
                         f"together ({shapes}; expected U (m, k), S (k,), V (n, k), mean "
                         "(n,))")


def projection_slack(dtype: np.dtype, k: int, backend: str | None) -> float:
    """How far U^T A_c V may be from diag(S), relative to ||A_c||_F: the rounding of U and V
    as stored and of the sums (100 sqrt(k) eps of U's dtype, and ROWS_SLACK), and for a
    GPU's run, products that may have accumulated in float32."""
    slack = ROWS_SLACK + 100 * np.sqrt(k) * float(np.finfo(dtype).eps)
    return slack + (GPU_PROJECTION_SLACK if _ran_on_gpu(backend) else 0.0)


# A GPU may accumulate the products in float32 (its float32 option): about 1e-7 of
# ||A_c|| for each of a sum's terms at most, with room.
GPU_PROJECTION_SLACK = 1e-3


# Row i of U S V^T is (a_i - e_i) V V^T, with e_i = ((I - Q Q^T) A_c)_i the part of the row
# that the basis Q misses, so its residual has |r_i|^2 = |a_i|^2 - |a_i V|^2 + |e_i V|^2.
# The exact and gram methods have e_i V = 0 (their Q spans A_c V, to rounding): no set of
# rows exceeds a relative residual of 1. The randomized and Krylov methods' e_i V can
# outweigh a_i V on rows of widely varying norms (measured 1.27 on sampled rows with
# niter=0), so they are not held to it. Sampled rows of a gram result checked against
# another matrix of its shape measured 1.36.
PLAUSIBLE_RESIDUAL = 1.1


def orthonormality_tolerance(rows: int, dtype: np.dtype) -> float:
    """How far from I the Gram matrix of unit columns of ``rows`` values may be: the
    rounding of the float64 sums (10 sqrt(rows) eps64 + 100 eps64, with room for the
    factorization's), and of the stored values, a relative eps each (at most 2 eps on a
    Gram entry of unit columns: 4 eps for room)."""
    eps64 = float(np.finfo(np.float64).eps)
    return float(10 * np.sqrt(rows) * eps64 + 100 * eps64 + 4 * np.finfo(dtype).eps)


# Over the rows sampled, a_i V - U_i S may reach the basis residual (below; the stored
# residual for a result that does not record it); another input, whose rows a_i V are
# unrelated to U_i S, leaves about |U_i S|^2 there, which that allowance hides unless those
# rows hold more of the result's energy: the check samples chunks until their sum
# |U_i S|^2 is this many times basis_residual^2 ||A_c||^2, or it has all of them.
TELLING_FACTOR = 2.0


# Row i of U S is q_i Q^T A_c V for the basis Q of the final pass (U = Q W, and B = Q^T A_c =
# W S V^T), so a_i V - U_i S = e_i V with e_i the part of a_i that Q misses: over all rows,
# sum |e_i|^2 = ||A_c||^2 - ||Q^T A_c||^2, the run's basis_residual^2 ||A_c||^2 (at most
# residual^2 ||A_c||^2, less where Q is wider than the rank). The exact and gram
# methods' Q spans A_c V, e_i V = 0 to rounding: ROWS_SLACK of ||A_c|| (the gram method's
# error, up to engine.GRAM_TOLERANCE on sigma_k, with room) and the rounding of the stored
# U and V. A row of U that lost its sign, rows swapped, V's columns swapped, another mean
# or another input all break it on the rows sampled.
ROWS_SLACK = 1e-6


def _spans_a_v(method: str | None, attributes: dict) -> bool:
    """Whether a result's basis spans A_c V to rounding: the exact and gram methods', but
    for a gram result that says its spectrum was beyond it, and for runs on a GPU (whose
    products may accumulate in float32)."""
    return method in ("exact", "gram") and \
        GRAM_SHORTFALL not in str(attributes.get("note", "")) and \
        not _ran_on_gpu(attributes.get("backend"))


def _ran_on_gpu(backend: str | None) -> bool:
    """Whether a result's recorded backend ('cuda', 'cpu and cuda', ...) includes a GPU."""
    return "cuda" in str(backend or "")


def rows_slack(dtype: np.dtype, k: int, norm: float, backend: str | None = None) -> float:
    """What sqrt(sum |a_i V - U_i S|^2) over the sampled rows of an exact or gram result
    may reach: ROWS_SLACK ||A_c||, and the rounding of U S and of V stored as ``dtype``
    (sqrt(k) eps ||A_c|| at most), 100 times; for a GPU's run, the products' float32
    accumulation (GPU_PROJECTION_SLACK) too."""
    gpu = GPU_PROJECTION_SLACK if _ran_on_gpu(backend) else 0.0
    return (ROWS_SLACK + 100 * np.sqrt(k) * float(np.finfo(dtype).eps) + gpu) * norm


def _missed(attributes: dict, stored: float | None) -> float | None:
    """The relative residual of the final pass's basis (``basis_residual``: a_i V - U_i S
    lies in what it missed), or the stored residual, which bounds it, for a result written
    before runs recorded it."""
    basis = attributes.get("basis_residual")
    return float(basis) if isinstance(basis, (int, float)) and basis >= 0 else stored


# The slack of ``residual_agrees`` on squared relative residuals: a share of the stored
# one, and an absolute part. For a GPU's run, the float32 accumulation it may use, with a
# wide margin; for a float32 U, the rounding of its stored values (about 2 eps32 of the
# squared residual; measured 1e-12 to 3e-9 on CPU runs), 100 times over; for float64
# results, the rounding of the run's sums of squares, which the kernels add up one value at
# a time per thread or sub-block (measured up to 2e5 eps, 4e-11, on sparse rows of repeated
# values), 250 times over: an input changed by 1e-3 passed a float64 result's check when a
# looser slack applied to it.
RESIDUAL_SLACK = {"gpu": (0.02, 100 * float(np.finfo(np.float32).eps)),
                  "float32": (1e-4, 100 * float(np.finfo(np.float32).eps)),
                  "float64": (1e-6, 1e-8)}


def residual_slack(dtype: np.dtype, backend: str | None) -> tuple[float, float]:
    """(share of the squared stored residual, absolute slack) of ``residual_agrees`` for a
    result of ``dtype`` computed on ``backend``."""
    if _ran_on_gpu(backend):
        return RESIDUAL_SLACK["gpu"]
    return RESIDUAL_SLACK["float32" if np.dtype(dtype) == np.float32 else "float64"]


def residual_agrees(stored: float, sums: _Sums, m: int, mean: np.ndarray | None,
                    slack: tuple[float, float]) -> bool:
    """Whether the exact relative residual (``sums`` over all m rows) is the stored one.

    Compared squared, as both come from squared norms: the stored one is
    (||A_c||^2 - sum S^2) / ||A_c||^2, or for the exact and gram methods the squares of the
    singular values past the rank over ||A_c||^2. Sparse blocks are centered algebraically,
    in the run and here, which loses the precision of ||A_c||^2 in proportion to
    m ||mu||^2 / ||A_c||^2 (the run's note says when that matters): the slack grows by that
    ratio.
    """
    cancellation = 0.0
    if sums.sparse and mean is not None and sums.norm2 > 0:
        cancellation = m * float(mean @ mean) / sums.norm2
    share, absolute = slack
    allowed = share * stored**2 + absolute * (1.0 + cancellation)
    return bool(abs(sums.relative2 - stored**2) <= allowed)


def _energy_agrees(S: np.ndarray, dtype: np.dtype, attributes: dict,
                   shape: tuple[int, int], mean: np.ndarray | None) -> bool | None:
    """Whether sum S^2 is ||A_c||_F^2 (1 - residual^2), as every method leaves it (S holds
    the energy the residual leaves out), to the rounding of the run's sums of squares and of
    S (``residual_slack``), of a tail of n of gram's eigenvalues (each to 16 eps ||A||^2),
    and of a centering done algebraically: those sums' rounding, of m ||mu||^2 (as in
    ``residual_agrees``; measured 4.5e-4 of ||A_c||^2 for float32 rows of mean 3e4 times
    their spread); None without those attributes."""
    norm, residual = attributes.get("frobenius_norm"), attributes.get("residual")
    if norm is None or residual is None:
        return None
    norm2 = float(norm) ** 2
    expected = norm2 * (1.0 - float(residual) ** 2)
    eps64 = float(np.finfo(np.float64).eps)
    sums = residual_slack(dtype, attributes.get("backend"))[1]
    slack = (sums + 16 * (shape[1] + 64) * eps64) * norm2
    if mean is not None:
        slack += sums * shape[0] * float(mean @ mean)
    return bool(abs(float(S @ S) - expected) <= slack)


def _open_result(path: str) -> Any:
    """The result group at ``path``, or an error saying what is there instead."""
    import zarr

    try:
        group = zarr.open_group(path, mode="r")
    except FileNotFoundError:
        raise StoreNotFoundError(f"no ooc_svd result store at {path!r}") from None
    except zarr.errors.ContainsArrayError:
        raise InputError(f"{path!r} is a zarr array, not an ooc_svd result store (the group "
                         "that run --out writes)") from None
    except Exception as error:  # noqa: BLE001 - zarr raises several types for damaged stores
        raise ReadError(f"cannot open the result store {path!r}: {type(error).__name__}: "
                        f"{error}") from None
    missing = [name for name in ("U", "S", "V") if not _has_array(group, name, path)]
    if missing:
        raise InputError(f"{path!r} is not an ooc_svd result store: it has no "
                         f"{', '.join(missing)}")
    return group


def _has_array(group: Any, name: str, path: str) -> bool:
    """Whether the result group holds ``name``; its metadata, unreadable, is named."""
    try:
        group[name]
    except KeyError:
        return False
    except Exception as error:  # noqa: BLE001 - as above
        raise ReadError(f"cannot open {name} of the result store {path!r}: "
                        f"{type(error).__name__}: {error}") from None
    return True


def _read_result(array: Any, name: str, path: str, rows: slice = slice(None)) -> np.ndarray:
    """Rows of one of a result's arrays; a chunk that cannot be read is named."""
    try:
        return np.asarray(array[rows])
    except Exception as error:  # noqa: BLE001 - re-raised with what failed
        raise ReadError(f"cannot read {name}[{rows.start or 0}:{rows.stop or len(array)}] "
                        f"of the result {path!r}: {type(error).__name__}: {error}") from None


@dataclass
class _Sums:
    """Sums over the sampled rows: ||A_c - U S V^T||_F^2 and ||A_c||_F^2, A_c = A - 1 mu^T."""

    residual2: float = 0.0
    norm2: float = 0.0
    rows: int = 0
    chunks: int = 0  # the input's storage chunks of rows (sampled or not)
    sparse: bool = False
    projection2: float = 0.0  # sum over the rows of |a_i V - U_i S|^2 (a_i of A_c)
    captured2: float = 0.0  # sum over the rows of |U_i S|^2
    projected: Any = 0.0  # sum over the rows of U_i^T a_i V, (k, k)

    @property
    def relative2(self) -> float:
        return self.residual2 / self.norm2 if self.norm2 > 0 else 0.0


def _sampled_sums(input_path, result_path, U, S, V, mean, samples, seed,
                  enough: float | None = None) -> _Sums:
    """The residual's sums over ``samples`` randomly chosen storage chunks of rows, and
    more, in the same random order, until their sum |U_i S|^2 reaches ``enough``."""
    source, _, _ = open_matrix(input_path)
    if source.shape != (U.shape[0], V.shape[0]):
        raise InputError(
            f"input shape {source.shape} does not match the result's {(U.shape[0], V.shape[0])}"
        )
    boundaries = source.chunk_rows
    order = np.random.default_rng(seed).permutation(len(boundaries) - 1)
    sums = _Sums(sparse=isinstance(source, CSRSource), chunks=len(boundaries) - 1)
    SVt = S[:, None] * V.T
    for count, index in enumerate(order):
        if count >= samples and (enough is None or sums.captured2 >= enough):
            break
        start, stop = int(boundaries[index]), int(boundaries[index + 1])
        block = source.read(start, stop)
        U_i = _read_result(U, "U", result_path, slice(start, stop)).astype(np.float64)
        sums.captured2 += float(np.sum((U_i * S) ** 2))
        if isinstance(block, np.ndarray):
            rows_v = _add_dense_sums(sums, block, U_i, SVt, V, mean)
        else:
            block = block.to_scipy()
            block_residual2, block_norm2 = _sparse_residual(block, U_i * S, V, mean)
            sums.residual2 += block_residual2
            sums.norm2 += block_norm2
            rows_v = block @ V - (0.0 if mean is None else mean @ V)
        sums.projected = sums.projected + U_i.T @ rows_v
        projected = rows_v - U_i * S
        sums.projection2 += float(np.sum(projected * projected))
        sums.rows += stop - start
    return sums


# Rows of a dense chunk widened to float64 at a time: the check's temporaries (the widened
# rows and their difference from U S V^T) stay within a few of these, whatever the chunk.
SUB_BLOCK_BYTES = 16 << 20


def _add_dense_sums(sums: _Sums, block: np.ndarray, U_i: np.ndarray, SVt: np.ndarray,
                    V: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Add a dense chunk's ||A_c - U S V^T||^2 and ||A_c||^2 to ``sums``, a sub-block of
    rows at a time; return its rows A_c V."""
    step = max(1, SUB_BLOCK_BYTES // (8 * max(block.shape[1], 1)))
    rows_v = np.empty((block.shape[0], V.shape[1]))
    for r0 in range(0, block.shape[0], step):
        part = block[r0 : r0 + step].astype(np.float64)
        if mean is not None:
            part -= mean
        difference = part - U_i[r0 : r0 + step] @ SVt
        sums.residual2 += float(np.sum(difference * difference))
        sums.norm2 += float(np.sum(part * part))
        rows_v[r0 : r0 + step] = part @ V
    return rows_v


def _sparse_residual(A, US, V, mean) -> tuple[float, float]:
    """(||A_c - US V^T||_F^2, ||A_c||_F^2) for A_c = A - 1 mean^T, without densifying A:
    ||A_c||^2 - 2 <A_c, US V^T> + ||US||^2, as V has orthonormal columns."""
    A = A.astype(np.float64, copy=False)  # a float32 A's sums would be float32's
    data = A.data
    colsum = np.asarray(A.sum(axis=0)).ravel()
    norm2 = float(data @ data)
    cross = float(np.sum((A @ V) * US))
    if mean is not None:
        norm2 += -2.0 * float(mean @ colsum) + A.shape[0] * float(mean @ mean)
        cross -= float(US.sum(axis=0) @ (V.T @ mean))
    return max(norm2 - 2.0 * cross + float(np.sum(US * US)), 0.0), norm2

"""Synthetic test matrices written block by block, reproducible from a seed.

Dense: A = G diag(s) V^T with V (n x r) orthonormal, r <= min(m, n). Each group of
DENSE_GROUP_ROWS rows of G is drawn standard normal from its own Philox stream keyed by
(seed, group), so the store is reproducible, and the same whatever its chunks. When G
(m x r float64) takes at most EXACT_LEFT_BYTES, it is drawn whole and orthonormalized, and
the singular values of A are exactly s; beyond, each row is scaled by 1/sqrt(m), so
G^T G ~ I and the singular values are s to within about sqrt(r / m) relative, and a store
of any height is written with memory for one chunk and one group of G's rows (and V).

Sparse (``write_sparse_matrix``): count-like CSR matrices, with rows of varied lengths and
Zipf-like column frequencies, like the cell x gene matrices of single-cell sequencing.
"""

from __future__ import annotations

import os
from typing import Any

import numba
import numpy as np

from .errors import InputError, check_number, check_seed
from .interrupts import raise_if_lost
from .sketch import philox_generator
from .threaded import map_in_order

# The largest left factor drawn whole and orthonormalized, for an exact spectrum.
EXACT_LEFT_BYTES = 1 << 27
# Rows of the left factor drawn from one Philox stream: the matrix does not depend on the
# chunks it is written in.
DENSE_GROUP_ROWS = 4096


def spectrum(n: int, rank: int | None = None, decay: float = 0.1) -> np.ndarray:
    """s_j = exp(-decay * j) for j < rank (default n), the designed singular values."""
    rank = n if rank is None else min(rank, n)
    return np.exp(-decay * np.arange(rank))


def _left_factor(m: int, r: int, seed: int):
    """(rows, exact): ``rows(start, stop)`` gives those rows of the m x r left factor,
    orthonormal when ``exact``, else Gaussian scaled by 1/sqrt(m) (see the module's
    docstring)."""

    # A group that a chunk holds only part of is kept for the next chunk, which starts in
    # it: consecutive chunks draw each group once.
    partial: dict[int, np.ndarray] = {}

    def part_of(group: int) -> np.ndarray:
        if group not in partial:
            partial.clear()
            partial[group] = philox_generator(seed, group).standard_normal(
                (min(DENSE_GROUP_ROWS, m - group * DENSE_GROUP_ROWS), r))
        return partial[group]

    def gaussian(start: int, stop: int) -> np.ndarray:
        rows = np.empty((stop - start, r))
        for group in range(start // DENSE_GROUP_ROWS, -(-stop // DENSE_GROUP_ROWS)):
            first = group * DENSE_GROUP_ROWS
            last = min(first + DENSE_GROUP_ROWS, m)
            a, b = max(start, first), min(stop, last)
            if (a, b) == (first, last):  # a whole group: drawn straight into place
                philox_generator(seed, group).standard_normal(out=rows[a - start : b - start])
            else:
                rows[a - start : b - start] = part_of(group)[a - first : b - first]
        return rows

    if m * r * 8 > EXACT_LEFT_BYTES:
        return (lambda start, stop: gaussian(start, stop) / np.sqrt(m)), False
    Q = np.linalg.qr(gaussian(0, m))[0]
    return (lambda start, stop: Q[start:stop]), True


def write_dense_matrix(
    path: str | os.PathLike,
    shape: tuple[int, int],
    *,
    rank: int | None = None,
    decay: float = 0.1,
    dtype: str = "float32",
    chunk_rows: int = 50_000,
    seed: int = 0,
    compression_level: int = 3,
    overwrite: bool = False,
):
    """Write A = G diag(s) V^T to a zarr v3 array at ``path`` (zstd), chunked by rows, of
    rank ``rank`` (default min(m, n)).

    The designed spectrum is recorded in the array's attributes under ``ooc_svd_synthetic``,
    with whether A has it exactly (see the module's docstring). Memory: V (n x rank float64),
    and G when it is drawn whole, or a chunk of it and a group of DENSE_GROUP_ROWS rows.
    The array is written under ``PATH.partial`` and renamed when complete. Returns the zarr
    array, opened read-only.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    from .store import StagedOutput, check_output_path

    m, n = shape
    if rank is not None and not 1 <= rank <= min(m, n):
        raise InputError(f"rank={rank} must be between 1 and min(m, n) = {min(m, n)}")
    decay = check_number("decay", decay)  # >= 0: the singular values decrease
    seed = check_seed(seed)
    path = check_output_path(path, overwrite, replaces="synthetic")
    s = spectrum(min(m, n), rank, decay)
    r = s.size
    V, _ = np.linalg.qr(philox_generator(seed, 2**63).standard_normal((n, r)))
    scaled_vt = s[:, None] * V.T
    left_rows, exact = _left_factor(m, r, seed)
    output = StagedOutput(path, overwrite, "synthetic")
    try:
        with output.writing():
            array = zarr.create_array(
                output.partial,
                shape=(m, n),
                chunks=(min(chunk_rows, m), n),
                dtype=dtype,
                compressors=ZstdCodec(level=compression_level),
                attributes=output.mark,
            )
        for start in range(0, m, chunk_rows):
            stop = min(start + chunk_rows, m)
            rows = (left_rows(start, stop) @ scaled_vt).astype(dtype)
            with output.writing():
                array[start:stop] = rows
            raise_if_lost()
        output.commit(array, {"ooc_svd_synthetic": {
            "kind": "dense",
            "singular_values": s.tolist(),
            "exact": exact,
            "rank": r,
            "decay": decay,
            "seed": seed,
        }})
    except BaseException:
        output.abort()  # keeps an output whose rename was refused
        raise
    return zarr.open_array(path, mode="r")


# Rows drawn from one Philox stream, keyed by (seed, group): the matrix does not depend on how
# many rows are generated at a time.
SPARSE_GROUP_ROWS = 4096
# Key of the stream that shares the non-zeros out among the groups.
_TOTALS_STREAM = 2**63 + 1
# Success probability of the geometric values: counts 1, 2, 3, ... with mean 2.5.
VALUE_P = 0.4
# Standard deviation of the log of the rows' relative lengths ("library sizes").
ROW_LENGTH_SIGMA = 0.5


def write_sparse_matrix(
    path: str | os.PathLike,
    shape: tuple[int, int],
    *,
    nnz: int | None = None,
    density: float | None = None,
    dtype: str = "float32",
    seed: int = 0,
    column_exponent: float = 1.0,
    chunk_rows: int = 65536,
    chunk_nnz: int | None = None,
    overwrite: bool = False,
    threads: int = 2,
) -> Any:
    """Write a random sparse count matrix in the CSR layout on zarr, block by block.

    Parameters
    ----------
    path : where the zarr group is written (under ``PATH.partial``, then renamed).
    shape : (m, n)
    nnz, density : exactly one of them: the number of non-zeros, or nnz = round(density m n).
        The matrix has exactly that many.
    dtype : {'float32', 'float64'}, default='float32'
    seed : int, default=0
    column_exponent : float, default=1.0
        Column j is drawn with probability proportional to (j + 1) ** -column_exponent
        (Zipf-like; 0 gives uniform columns), without repeats within a row.
    chunk_rows : int, default=65536
        Rows generated per step (memory: about 40 bytes per non-zero of ``threads + 1``
        steps). The matrix does not depend on it: rows come in groups of 4096, each group
        from its own Philox stream keyed by (seed, group).
    chunk_nnz : int, optional
        Non-zeros per storage chunk (default ``CSRWriter``'s).
    overwrite : bool, default=False
    threads : int, default=2
        Steps generated at once (the sampling kernel releases the GIL).

    Returns
    -------
    zarr.Group, opened read-only, with attribute ``ooc_svd_synthetic`` describing the draw.

    Notes
    -----
    Row lengths are multinomial with lognormal weights (sigma 0.5), capped at n; values are
    geometric counts 1, 2, 3, ... (p = 0.4). A row's columns are drawn from an alias table
    (Walker, 1977) with repeats rejected, which samples without replacement proportionally
    to the weights; rows where rejection would be slow (long rows under a steep power law)
    use the equivalent exponential-keys method (Efraimidis and Spirakis, 2006) in O(n).
    """
    from .sources.csr import DEFAULT_CHUNK_NNZ, CSRWriter

    m, n = (int(s) for s in shape)
    total = _sparse_nnz(m, n, nnz, density)
    column_exponent = check_number("column_exponent", column_exponent)  # 0: uniform columns
    seed = check_seed(seed)
    if chunk_rows < 1 or threads < 1:
        raise InputError(f"chunk_rows ({chunk_rows}) and threads ({threads}) must be >= 1")
    table, weights = _column_distribution(n, column_exponent)
    group_totals = _group_totals(m, n, total, seed)
    groups_per_step = -(-chunk_rows // SPARSE_GROUP_ROWS)
    steps = [range(g, min(g + groups_per_step, group_totals.size))
             for g in range(0, group_totals.size, groups_per_step)]

    def generate(step: range) -> list:
        return [_sparse_group(seed, g, m, n, int(group_totals[g]), table, weights) for g in step]

    writer = CSRWriter(path, n, dtype, chunk_nnz=chunk_nnz or DEFAULT_CHUNK_NNZ,
                       overwrite=overwrite, replaces="synthetic")
    with writer:
        for rows in map_in_order(generate, steps, threads):
            for indptr, cols, values in rows:
                writer.append_arrays(indptr, cols, values)
        writer.group.attrs["ooc_svd_synthetic"] = {
            "kind": "sparse", "nnz": total, "density": total / max(m * n, 1),
            "column_exponent": column_exponent, "seed": seed,
            "values": f"geometric counts, p={VALUE_P}",
            "row_length_sigma": ROW_LENGTH_SIGMA,
        }
        return writer.close()


def _sparse_nnz(m: int, n: int, nnz: int | None, density: float | None) -> int:
    if min(m, n) < 1:
        raise InputError(f"shape ({m}, {n}) must be at least 1 x 1")
    if (nnz is None) == (density is None):
        raise InputError("give exactly one of nnz and density")
    if density is not None:
        if not 0 <= density <= 1:
            raise InputError(f"density must lie in [0, 1], not {density}")
        nnz = round(density * m * n)
    if not 0 <= nnz <= m * n:
        raise InputError(f"nnz must lie in [0, m n = {m * n}], not {nnz}")
    return int(nnz)


def _column_distribution(n: int, exponent: float) -> tuple[tuple, np.ndarray]:
    """Walker's alias table of the column weights (j + 1) ** -exponent, and the weights."""
    weights = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    return _alias_table(weights), weights


@numba.njit(cache=True)
def _alias_table(weights):
    """(threshold, alias): column j = floor(u n) is kept if frac(u n) < threshold[j], else
    alias[j] is taken, so one uniform draws a column in O(1) (Vose's construction)."""
    n = weights.size
    scaled = weights * (n / weights.sum())
    threshold = np.ones(n)
    alias = np.arange(n)
    small, large = np.empty(n, np.int64), np.empty(n, np.int64)
    n_small, n_large = 0, 0
    for j in range(n):
        if scaled[j] < 1.0:
            small[n_small] = j
            n_small += 1
        else:
            large[n_large] = j
            n_large += 1
    while n_small and n_large:
        n_small -= 1
        n_large -= 1
        low, high = small[n_small], large[n_large]
        threshold[low], alias[low] = scaled[low], high
        scaled[high] += scaled[low] - 1.0
        if scaled[high] < 1.0:
            small[n_small] = high
            n_small += 1
        else:
            large[n_large] = high
            n_large += 1
    return threshold, alias


def _group_totals(m: int, n: int, nnz: int, seed: int) -> np.ndarray:
    """Non-zeros of each group of rows: multinomial in the rows, none above rows * n."""
    sizes = np.full(-(-m // SPARSE_GROUP_ROWS), SPARSE_GROUP_ROWS, dtype=np.int64)
    sizes[-1] = m - SPARSE_GROUP_ROWS * (sizes.size - 1)
    totals = philox_generator(seed, _TOTALS_STREAM).multinomial(nnz, sizes / m)
    return _cap_and_refill(totals, sizes * n)


def _cap_and_refill(counts: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """counts capped at caps, the excess handed in order to entries with room (the total is
    kept when it fits under the caps)."""
    excess = int(np.maximum(counts - caps, 0).sum())
    counts = np.minimum(counts, caps)
    if excess:
        room = caps - counts
        counts = counts + np.minimum(room, np.maximum(excess - (np.cumsum(room) - room), 0))
    return counts


def _sparse_group(seed: int, group: int, m: int, n: int, total: int, table: tuple,
                  weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, sorted columns, values) of the rows of one group, from its own stream."""
    rng = philox_generator(seed, group)
    rows = min(SPARSE_GROUP_ROWS, m - group * SPARSE_GROUP_ROWS)
    row_weights = rng.lognormal(0.0, ROW_LENGTH_SIGMA, rows)
    lengths = _cap_and_refill(rng.multinomial(total, row_weights / row_weights.sum()),
                              np.full(rows, n))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    cols = np.empty(total, dtype=np.int64)
    slow = _draw_columns(rng, lengths, indptr, table, cols)
    for row in np.flatnonzero(slow).tolist():
        keys = rng.standard_exponential(n) / weights
        chosen = np.argpartition(keys, lengths[row] - 1)[: lengths[row]]
        cols[indptr[row] : indptr[row + 1]] = np.sort(chosen)
    values = rng.geometric(VALUE_P, size=total).astype(np.float64)
    return indptr, cols, values


def _draw_columns(rng: np.random.Generator, lengths: np.ndarray, indptr: np.ndarray,
                  table: tuple, cols: np.ndarray) -> np.ndarray:
    """Fill each row's columns by rejection; returns the rows left to the slow method.

    Uniforms come in pools whose sizes depend only on the rows left, so the draw is
    reproducible."""
    seen = np.zeros(table[0].size, dtype=np.bool_)
    slow = np.zeros(lengths.size, dtype=np.bool_)
    row = 0
    while row < lengths.size:
        need = 2 * int(lengths[row:].sum()) + 64 * (lengths.size - row)
        pool = rng.random(int(min(max(need, 4 * lengths[row] + 64), 1 << 22)))
        row = _reject_repeats(lengths, indptr, *table, pool, row, cols, seen, slow)
    return slow


@numba.njit(nogil=True, cache=True)
def _reject_repeats(lengths, indptr, threshold, alias, pool, row, cols, seen, slow):
    """Draw distinct columns for rows ``row``, ``row + 1``, ... from the uniforms of ``pool``
    with the alias table, rejecting repeats; a row that needs more than 4 k + 64 draws for k
    columns is flagged in ``slow``. Stops at the first row the rest of the pool may not cover;
    returns that row. ``seen`` (n bools, all False) is restored before returning.
    """
    position = 0
    n = threshold.size
    while row < lengths.size:
        k = lengths[row]
        budget = 4 * k + 64
        if budget > pool.size and position == 0:
            # Longer than any pool: a fresh pool would not cover it either.
            slow[row] = True
            row += 1
            continue
        if pool.size - position < budget:
            return row
        first = indptr[row]
        got, draws = 0, 0
        while got < k and draws < budget:
            scaled = pool[position] * n
            j = min(int(scaled), n - 1)
            if scaled - j >= threshold[j]:
                j = alias[j]
            position += 1
            draws += 1
            if not seen[j]:
                seen[j] = True
                cols[first + got] = j
                got += 1
        for t in range(got):
            seen[cols[first + t]] = False
        if got < k:
            slow[row] = True
        else:
            cols[first : first + k].sort()
        row += 1
    return row

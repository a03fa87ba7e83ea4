"""A - M for torch's ``svd_lowrank(A, q, niter, M)``, where M is broadcast to A's shape.

A row M (shapes (), (n,), (1, n), or an m x n view that repeats one row, as torch's
``expand`` and numpy's ``broadcast_to`` make) is a column mean: the run subtracts it
implicitly, as in PCA, and A stays as it is (sparse stays sparse). So is a column M (m, 1),
or an m x n view that repeats one column, of a sparse A (``sparse_column``): the kernels
subtract it by rank-one corrections (``kernels.row_shift``). Any other M, a full m x n
array or a column of a dense A, is subtracted from each block of A as it is read
(``Difference``): the difference is dense, and never formed whole; a view that repeats one
column is read as that column.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import InputError, NonFiniteError
from ..kernels.cpu import first_non_finite_row
from .csr import CSRSource, is_sparse_block
from .dense import (
    DenseSource,
    in_memory_boundaries,
    is_torch_tensor,
    open_dense_source,
    refuse_masked,
)
from .open import is_torch_sparse


def subtract(source: DenseSource | CSRSource, M: Any) -> tuple[DenseSource | CSRSource,
                                                               np.ndarray | None]:
    """(the source of A - M, None), or (A's source, M's row) when M repeats one row."""
    m, n = source.shape
    M, _ = _checked(M, (m, n))
    row = _repeated_row(M, n)
    if row is not None:
        return source, row
    subtrahend = open_dense_source(_repeated_column(M))
    difference = Difference(source, subtrahend)
    return DenseSource(difference, _boundaries(difference), f"{source.description} - M",
                       decodes=source.decodes or subtrahend.decodes), None


def check_subtrahend(M: Any, shape: tuple[int, int]) -> None:
    """Refuse an M that does not broadcast to A's ``shape`` or holds no real numbers, as
    ``subtract`` does: for an A whose factors need no run (an empty one)."""
    _checked(M, shape)


def sparse_column(source: DenseSource | CSRSource, M: Any) -> DenseSource | None:
    """M's source when A is sparse and M a column of shape (m, 1), m > 1, or an m x n view
    that repeats one, whose A - M the kernels form by rank-one corrections
    (``kernels.row_shift.RowShiftKernels``) instead of densifying A's blocks; None for any
    other A or M, which ``subtract`` takes."""
    m, n = source.shape
    if not isinstance(source, CSRSource) or m == 1:
        return None
    try:
        own = tuple(int(s) for s in M.shape)
    except (AttributeError, TypeError, ValueError):  # a sequence; or a shape not known yet
        return None
    # Decided before any conversion: an m x n torch M would be copied home
    if own != (m, 1) and not (own == (m, n) and _repeated_column(M) is not M):
        return None
    M, _ = _checked(M, (m, n))
    return open_dense_source(_repeated_column(M))


def transposed(M: Any, shape: tuple[int, int]) -> np.ndarray | None:
    """(M broadcast to ``shape``)^T as a numpy view, for an M held in memory (numpy, torch,
    a number or a sequence): what A^T - M^T subtracts. None for M in a store or a dask
    array, a masked array, or one that is not a finite real array broadcasting to ``shape``
    (which the run on A itself then refuses by name, and names the rows of a NaN)."""
    in_memory = isinstance(M, (np.ndarray, int, float, np.number, list, tuple)) or \
        (is_torch_tensor(M) and not is_torch_sparse(M))
    if not in_memory or isinstance(M, np.ma.MaskedArray):
        return None
    try:
        array = np.asarray(_as_array(M) if hasattr(M, "shape") else M)
        if array.dtype.kind not in "biuf" or not np.isfinite(array).all():
            return None
        return np.broadcast_to(array, shape).T
    except (ValueError, TypeError):
        return None


def _checked(M: Any, shape: tuple[int, int]) -> tuple[Any, tuple[int, ...]]:
    """M as an array (``_as_array``) and its shape as given, once checked to hold real
    numbers and, before a view is narrowed to the row or column it repeats, to broadcast to
    A's ``shape``."""
    _refuse_non_arrays(M)
    if not hasattr(M, "shape") or not hasattr(M, "dtype"):  # a sequence or a number
        M = np.asarray(M)
    try:
        own = tuple(int(s) for s in M.shape)
    except (TypeError, ValueError):  # a dask array of unknown chunk sizes
        raise InputError(f"M's shape {M.shape} is not known; for a dask array, call "
                         "compute_chunk_sizes() first") from None
    if len(own) > 2:
        raise InputError(f"M must have at most 2 dimensions (A's), not shape {own}")
    try:
        broadcast = np.broadcast_shapes(own, shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise InputError(f"M of shape {own} does not broadcast to A's shape {shape}")
    M = _as_array(M)
    if np.dtype(M.dtype).kind not in "biuf":
        raise InputError(f"M must hold real numbers, not {M.dtype}")
    return M, own


def _boundaries(difference: Difference) -> np.ndarray:
    """Row boundaries the blocks of A - M are made of: whole chunks of A, and of M where
    M has storage chunks to decode. A sparse A's units are cut further, into nominal dense
    chunks: a unit of sparse rows can take far more room dense, and CSR rows can be read
    from any row on (``read_overhead_bytes`` counts the partly decoded chunks)."""
    minuend, subtrahend = difference.minuend, difference.subtrahend
    boundaries = minuend.chunk_rows
    if isinstance(minuend, CSRSource):
        dense = in_memory_boundaries(difference.shape, difference.dtype.itemsize)
        boundaries = np.union1d(boundaries, dense)
    if subtrahend.decodes:
        boundaries = np.union1d(boundaries, subtrahend.chunk_rows)
    return boundaries


class Difference:
    """Rows of A - M (M of A's shape, or m x 1), sliceable as ``[start:stop]``."""

    def __init__(self, minuend: DenseSource | CSRSource, subtrahend: DenseSource):
        self.minuend = minuend
        self.subtrahend = subtrahend
        self.shape = minuend.shape
        # A's precision, as with a row M (whose results follow A's dtype); differences of
        # integers need a sign and may not fit their type.
        dtype = minuend.block_dtype
        self.dtype = dtype if dtype.kind == "f" else np.dtype(np.float64)
        self.kind = f"{minuend.kind} - M"

    @property
    def read_factor(self) -> float:
        """Bytes of A and M read per byte of their difference (A's raw bytes if sparse)."""
        m, n = self.shape
        difference = m * n * self.dtype.itemsize
        return (self.minuend.nbytes + self.subtrahend.nbytes) / max(difference, 1)

    @property
    def read_overhead_bytes(self) -> int:
        """Bytes a read may decode beyond its rows: a sparse A's partly read chunks."""
        return self.minuend.read_overhead_bytes

    @property
    def read_row_overhead(self) -> int:
        """Bytes per row a read holds beyond the block it returns (and the decoding that
        any block's read is planned for): A's block, densified if sparse, with its CSR form
        and decoding; and M's block, with its decoding where M is a store; and what their
        own reads hold beyond that (a dask array's copy)."""
        m, n = self.shape
        minuend = n * self.minuend.block_dtype.itemsize + self.minuend.read_row_overhead
        if isinstance(self.minuend, CSRSource):
            minuend += 3 * -(-self.minuend.nbytes // m)
        columns = self.subtrahend.shape[1]
        reads = 3 if self.subtrahend.decodes else 1
        subtrahend = reads * columns * self.subtrahend.block_dtype.itemsize
        return minuend + subtrahend + self.subtrahend.read_row_overhead

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("the rows of A - M are read in contiguous ranges only")
        block = self.minuend.read(start, stop)
        if is_sparse_block(block):
            block = block.to_scipy().toarray()
        subtrahend = self.subtrahend.read(start, stop)
        # A NaN or Inf of M's, which the kernels would blame on A, makes its sum non-finite
        # (so may a sum that overflows): only then are its rows looked at.
        if not np.isfinite(np.sum(subtrahend, dtype=np.float64)):
            bad = first_non_finite_row(subtrahend)
            if bad is not None:
                raise NonFiniteError(f"M holds NaN or Inf in rows [{start}, {stop}), first at "
                                     f"row {start + bad}")
        # Subtracted in float64 and rounded once to the result's dtype, a buffer at a time:
        # no float64 copy of the block.
        difference = np.empty((stop - start, self.shape[1]), dtype=self.dtype)
        np.subtract(block, subtrahend, out=difference, dtype=np.float64, casting="unsafe")
        return difference


def _as_array(M: Any) -> Any:
    """M (an array with a shape and a dtype) as something that ``open_dense_source`` reads:
    torch tensors become numpy arrays, an expanded row or column narrowed to it first (a
    move to the host or another dtype would copy all m x n values); numpy, zarr and dask
    arrays stay as they are."""
    if is_torch_tensor(M):
        from .dense import _torch_array

        if len(M.shape) == 2 and M.shape[0] > 1 and M.stride(0) == 0:
            M = M[:1]  # an expanded row
        M = _torch_array(_repeated_column(M))
    return M


def _refuse_non_arrays(M: Any) -> None:
    """Refuse a sparse M, a masked one, and a path (which numpy would take for an array of
    one string)."""
    import scipy.sparse

    refuse_masked(M, "M")
    if scipy.sparse.issparse(M) or is_torch_sparse(M):
        raise InputError("M must be dense: a mean, broadcast to A's shape")
    if isinstance(M, (str, bytes, os.PathLike)):
        raise InputError(f"M must be an array or a number, not the path {M!r}: open a store "
                         "first (e.g. zarr.open_array)")


def _repeated_column(M: Any) -> Any:
    """M[:, :1] when M is an in-memory m x n view (numpy or torch, not yet converted) whose
    columns share memory, as ``expand`` and ``broadcast_to`` make of a column: read as that
    column, not as m x n values. Any other M as it is; a view that repeats one row
    (``_repeated_row``) too, and so does one that repeats a single value."""
    if len(getattr(M, "shape", ())) != 2 or M.shape[0] < 2 or M.shape[1] < 2:
        return M
    if isinstance(M, np.ndarray):
        strides = M.strides
    elif is_torch_tensor(M):
        strides = (M.stride(0), M.stride(1))
    else:
        return M
    return M[:, :1] if strides[1] == 0 and strides[0] != 0 else M


def _repeated_row(M: Any, n: int) -> np.ndarray | None:
    """M's row when M, broadcast to (m, n), repeats one: a shape of (), (n,), (1, n) or
    (1, 1), or an in-memory array whose rows share memory (stride 0). Else None."""
    shape = tuple(M.shape)
    if len(shape) < 2 or shape[0] == 1:
        row = np.asarray(M).reshape(-1)
    elif isinstance(M, np.ndarray) and M.strides[0] == 0:
        row = M[0]
    else:
        return None
    if not np.all(np.isfinite(row)):
        raise InputError("M holds NaN or Inf")
    return np.broadcast_to(row, (n,)).astype(np.float64)

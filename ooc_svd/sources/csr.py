"""Sparse row-block sources: the CSR layout on zarr, and scipy.sparse matrices in memory.

The CSR layout on zarr is a group holding three 1-D arrays and three attributes:

- ``indptr``: int64, m + 1 entries, row i's non-zeros are ``indptr[i]:indptr[i + 1]``;
- ``indices``: int32 (int64 when n > 2**31 - 1), the column of each non-zero;
- ``data``: float32 or float64, the value of each non-zero;
- attributes ``encoding-type = "csr_matrix"``, ``encoding-version = "0.1.0"`` and
  ``shape = [m, n]`` (and ``ooc_svd_csr`` on the stores written here, which ``overwrite``
  may replace).

These are AnnData's names, so the ``X`` group of an AnnData zarr store is read as is and the
stores written here open in anndata. A row block [r0, r1) is the ``indptr`` slice and the
matching ranges of ``indices`` and ``data``; nothing ever builds a dense m x n array.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numba
import numpy as np

from ..errors import InputError, ReadError
from ..interrupts import raise_if_lost
from .dtypes import Narrowing, block_dtype

ENCODING = {"encoding-type": "csr_matrix", "encoding-version": "0.1.0"}
# Non-zeros per storage chunk of ``indices`` and ``data`` written by ``CSRWriter``.
DEFAULT_CHUNK_NNZ = 1 << 20
# Blocks are built from units of about this many raw bytes (the planner's "chunks"), and
# of at most this many rows: a block also carries float64 matrices of its rows by the basis
# width, which short rows would otherwise make the bulk of a unit's memory.
UNIT_BYTES = 4 << 20
UNIT_ROWS = 1 << 13


@dataclass
class CSRBlock:
    """Rows of a CSR matrix: ``indptr`` starts at 0 (int64), so the block stands alone."""

    data: np.ndarray
    indices: np.ndarray
    indptr: np.ndarray
    n_cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.indptr.size - 1, self.n_cols)

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    @property
    def nbytes(self) -> int:
        """Bytes of the rows as the matrix holds them: values, indices and an indptr entry
        per row (the block's indptr has one more, its leading 0, not read from the matrix),
        so that the blocks of a pass add up to ``CSRSource.nbytes``."""
        return self.data.nbytes + self.indices.nbytes + self.indptr.itemsize * self.shape[0]

    def __getitem__(self, rows: slice) -> CSRBlock:
        """The rows ``rows`` (a step-1 slice) as a block of their own."""
        start, stop, step = rows.indices(self.shape[0])
        if step != 1:
            raise IndexError("CSR blocks are sliced by contiguous row ranges only")
        first, last = int(self.indptr[start]), int(self.indptr[stop])
        return CSRBlock(self.data[first:last], self.indices[first:last],
                        self.indptr[start : stop + 1] - first, self.n_cols)

    @classmethod
    def from_scipy(cls, matrix: Any) -> CSRBlock:
        matrix = matrix.tocsr()
        return cls(matrix.data, matrix.indices, matrix.indptr.astype(np.int64, copy=False),
                   matrix.shape[1])

    def to_scipy(self):
        import scipy.sparse

        return scipy.sparse.csr_matrix((self.data, self.indices, self.indptr), shape=self.shape)


def is_sparse_block(block: Any) -> bool:
    return isinstance(block, CSRBlock)


class LatestChunks:
    """The storage chunk of each array of a CSR store decoded last, kept for the next read.

    A compressed chunk is decoded whole, and blocks are often smaller than the chunks of
    ``indices`` and ``data`` (2**20 non-zeros as written here): each block decoded the
    chunks it touched again, 11 times each per pass for 31 blocks over 3 chunks. Blocks are
    read in order, so the next one mostly starts in the chunk the last one ended in. Only
    chunks a read covers in part go through here; those it covers whole are read in one
    slice, which zarr fetches and decodes concurrently.

    Shared by the reader threads: a chunk is decoded outside the lock, and two readers may
    decode the same one at once, at most one per reader. Not pickled: a worker starts
    empty.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, tuple[int, np.ndarray]] = {}

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def read(self, name: str, array: Any, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """``array[start:stop]`` as ``dtype``: the chunks it covers in part through the
        one kept, those it covers whole in one read."""
        size, length = int(array.chunks[0]), int(array.shape[0])
        out = np.empty(stop - start, dtype)
        position = start
        while position < stop:
            index = position // size
            chunk_start, chunk_stop = index * size, min((index + 1) * size, length)
            if position == chunk_start and stop >= chunk_stop:  # whole chunks from here
                whole_stop = stop if stop % size == 0 or stop == length else stop // size * size
                out[position - start : whole_stop - start] = array[position:whole_stop]
                position = whole_stop
                continue
            chunk = self._chunk(name, array, index, chunk_start, size)
            high = min(stop, chunk_stop)
            out[position - start : high - start] = chunk[position - chunk_start :
                                                         high - chunk_start]
            position = high
        return out

    def _chunk(self, name: str, array: Any, index: int, chunk_start: int, size: int
               ) -> np.ndarray:
        with self._lock:
            latest = self._latest.get(name)
        if latest is not None and latest[0] == index:
            return latest[1]
        chunk = np.asarray(array[chunk_start : chunk_start + size])
        with self._lock:
            self._latest[name] = (index, chunk)
        return chunk


@dataclass
class CSRSource:
    """A sparse m x n matrix readable in row ranges, from zarr arrays or numpy arrays.

    ``chunk_rows`` are row boundaries that cut the non-zeros into units of about
    ``UNIT_BYTES``, and ``chunk_bytes`` the raw bytes of each unit, so the planner builds
    blocks of bounded bytes however skewed the rows are.
    """

    indptr: Any
    indices: Any
    data: Any
    shape: tuple[int, int]
    description: str
    chunk_rows: np.ndarray
    chunk_bytes: np.ndarray
    nnz: int
    stored_bytes: int | None = None
    decodes: bool = True
    loaded_bytes: int = 0  # a file loaded whole (a scipy .npz): see DenseSource
    format_kind: str = "csr"
    canonical: bool = False  # every row's columns known to increase: ``read`` checks none
    row_pairs: float = 0.0  # pairs of non-zeros in a row, summed over the rows
    # Of zarr arrays; each copy (``dataclasses.replace``) has its own.
    latest_chunks: LatestChunks = field(default_factory=LatestChunks, init=False, repr=False,
                                        compare=False)

    @property
    def kind(self) -> str:
        return self.format_kind

    @property
    def cache_pays(self) -> bool:
        """Whether keeping blocks in memory saves later passes work (decoding chunks)."""
        return self.decodes

    @property
    def chunks(self) -> None:
        return None

    @property
    def dtype(self) -> np.dtype:
        """The values' dtype as stored."""
        return np.dtype(self.data.dtype)

    @property
    def block_dtype(self) -> np.dtype:
        """The dtype of the values of the blocks ``read`` returns (``dtypes.block_dtype``)."""
        return block_dtype(self.dtype)

    @property
    def sparse(self) -> bool:
        return True

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks of one pass: values, indices and an indptr entry per row."""
        return int(self.nnz * _entry_bytes(self.data, self.indices) + self.shape[0] * 8)

    @property
    def read_overhead_bytes(self) -> int:
        """Bytes a read may decode beyond its block: a block's ends rarely fall on chunk
        boundaries, so up to two chunks of each array are decoded in part for nothing. (With
        ``LatestChunks``, a read holds one chunk at a time, and the chunks kept for the next
        read, one of each array, are shared: within this count for one read or more.)"""
        arrays = (self.indptr, self.indices, self.data)
        chunks = [getattr(array, "chunks", None) for array in arrays]
        if None in chunks:
            return 0
        return 2 * sum(
            min(int(chunk[0]), array.shape[0]) * np.dtype(array.dtype).itemsize
            for chunk, array in zip(chunks, arrays, strict=True)
        )

    @property
    def read_row_overhead(self) -> int:
        """Bytes per row a read holds beyond its block and the decoding above: none."""
        return 0

    @property
    def read_factor(self) -> float:
        """Bytes read per byte of block: the block is what is read."""
        return 1.0

    def read(self, start: int, stop: int) -> CSRBlock:
        """Rows [start, stop) as a CSRBlock, each row's columns in increasing order.

        A row with unsorted or repeated columns is made canonical in a copy, repeats
        summed: the products do not care, but the sum of squares (the norm, the residual
        and the ranks chosen by tolerance) counts each stored entry.
        """
        try:
            pointers = self._slice("indptr", start, stop + 1, np.dtype(np.int64))
            first, last = int(pointers[0]), int(pointers[-1])
            indices = self._slice("indices", first, last, block_dtype(self.indices.dtype))
            data = self._slice("data", first, last, self.block_dtype)
        except Exception as exc:  # noqa: BLE001 - re-raised with the rows that failed
            raise ReadError(
                f"cannot read rows [{start}, {stop}) of {self.description}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        _check_block(pointers, indices, self.shape[1], start, stop, self.description)
        pointers = pointers - first
        if not self.canonical:
            data, indices, pointers = canonical_rows(pointers, indices, data, self.shape[1])
        return CSRBlock(data, indices, pointers, self.shape[1])


    def _slice(self, name: str, start: int, stop: int, dtype: np.dtype) -> np.ndarray:
        """One of the arrays' [start, stop) as ``dtype``: through ``latest_chunks`` for a
        chunked store, as a view where it can be for arrays in memory."""
        array = getattr(self, name)
        if getattr(array, "chunks", None) is None:  # numpy's arrays have no chunks
            return np.asarray(array[start:stop], dtype=dtype)
        return self.latest_chunks.read(name, array, start, stop, dtype)


def canonical_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int,
                   sum_dtype: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data, indices, indptr) of the rows with each row's columns increasing and repeated
    columns summed (in ``sum_dtype``, default data's own): the arrays given when they are so
    already, else new ones; the arrays given are never modified."""
    import scipy.sparse

    if _columns_increase(indptr, indices):
        return data, indices, indptr
    shape = (indptr.size - 1, n_cols)
    values = data if sum_dtype is None else data.astype(sum_dtype)
    block = scipy.sparse.csr_matrix((values, indices, indptr), shape=shape, copy=True)
    block.sum_duplicates()
    return block.data, block.indices, block.indptr.astype(np.int64, copy=False)


@numba.njit(nogil=True, cache=True)
def _columns_increase(indptr, indices) -> bool:
    """Whether every row's columns strictly increase. scipy's has_canonical_format would
    first cast the indices to a common index dtype: a copy of them, for every block."""
    for row in range(indptr.size - 1):
        for p in range(indptr[row] + 1, indptr[row + 1]):
            if indices[p] <= indices[p - 1]:
                return False
    return True


def _entry_bytes(data: Any, indices: Any) -> int:
    """Bytes a non-zero takes in a block read from these arrays: its value and its index."""
    return block_dtype(data.dtype).itemsize + np.dtype(indices.dtype).itemsize


def _check_block(pointers, indices, n: int, start: int, stop: int, description: str) -> None:
    """Refuse a block whose indptr decreases or whose column indices fall outside [0, n):
    the kernels index with them unchecked, so a corrupt store must stop here."""
    bad_pointers = pointers.size > 1 and bool(np.any(pointers[1:] < pointers[:-1]))
    bad_indices = indices.size > 0 and (int(indices.min()) < 0 or int(indices.max()) >= n)
    if bad_pointers or bad_indices:
        what = "indptr decreases" if bad_pointers else f"a column index lies outside [0, {n})"
        raise ReadError(f"rows [{start}, {stop}) of {description} are corrupt: {what}")


def stored_shape(shape: Any, description: str) -> tuple[int, int]:
    """A CSR group's ``shape`` attribute as (m, n); refused unless two integers >= 0."""
    if not (isinstance(shape, (list, tuple)) and len(shape) == 2 and
            all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 0
                for s in shape)):
        raise InputError(f"{description}: the shape attribute must be two integers [m, n], "
                         f"not {shape!r}")
    return int(shape[0]), int(shape[1])


def is_csr_group(node: Any) -> bool:
    """Whether a zarr node is a group in the CSR layout."""
    import zarr

    return isinstance(node, zarr.Group) and node.attrs.get("encoding-type") == "csr_matrix"


def open_csr_group(group: Any, description: str) -> CSRSource:
    """A ``CSRSource`` over a zarr group in the CSR layout (see the module docstring)."""
    missing = [name for name in ("indptr", "indices", "data") if name not in group]
    if missing or "shape" not in group.attrs:
        raise InputError(
            f"{description} is not a complete CSR group: it lacks "
            f"{missing + ([] if 'shape' in group.attrs else ['the shape attribute'])}"
        )
    m, n = stored_shape(group.attrs["shape"], description)
    indptr, indices, data = group["indptr"], group["indices"], group["data"]
    if indptr.dtype.kind not in "iu" or indices.dtype.kind not in "iu":
        raise InputError(f"{description}: indptr and indices must be integers, not "
                         f"{indptr.dtype} and {indices.dtype}")
    if data.dtype.kind not in "biuf":
        raise InputError(f"{description}: data has dtype {data.dtype}; a real dtype is needed")
    if indptr.shape != (m + 1,) or indices.shape != data.shape:
        raise InputError(
            f"{description}: inconsistent CSR arrays (indptr {indptr.shape} for {m} rows, "
            f"indices {indices.shape}, data {data.shape})"
        )
    boundaries, pointers, row_pairs = _stream_unit_boundaries(indptr,
                                                              _entry_bytes(data, indices))
    stored = None
    with contextlib.suppress(Exception):  # optional information, not every store can tell
        stored = sum(int(a.nbytes_stored()) for a in (indptr, indices, data))
    nnz = int(pointers[-1])
    if nnz != data.shape[0]:
        raise InputError(f"{description}: indptr ends at {nnz} but data holds {data.shape[0]}")
    return CSRSource(
        indptr, indices, data, (m, n), description, boundaries,
        _unit_bytes(boundaries, pointers, _entry_bytes(data, indices)),
        nnz, stored, format_kind=f"csr (zarr v{group.metadata.zarr_format})",
        row_pairs=row_pairs,
    )


def csr_source_from_scipy(matrix: Any, description: str | None = None) -> CSRSource:
    """A ``CSRSource`` over a scipy.sparse matrix (csr used as is; csc, coo, ... converted
    to CSR, which holds the non-zeros once more but never densifies)."""
    kind = type(matrix).__name__
    csr = matrix.tocsr() if matrix.format != "csr" else matrix
    values, indices = block_dtype(csr.data.dtype), block_dtype(csr.indices.dtype)
    if csr.data.dtype != values or csr.indices.dtype != indices:
        # Values or indices numba cannot take (big-endian, float16), converted once
        csr = type(csr)((csr.data.astype(values), csr.indices.astype(indices), csr.indptr),
                        shape=csr.shape)
    # scipy does not check the arrays of a matrix built from them, and canonicalizing
    # fails on a decreasing indptr with a C++ message (checked once, with m-long
    # temporaries while it runs)
    _check_block(csr.indptr, csr.indices, csr.shape[1], 0, csr.shape[0],
                 description or f"scipy.sparse {kind}")
    if not csr.has_canonical_format:
        # Sorted, with repeated entries summed, once, in a copy: the caller's matrix is not
        # modified, and ``read`` need not check a block
        csr = csr.copy()
        csr.sum_duplicates()
    entry = _entry_bytes(csr.data, csr.indices)
    # indptr in pieces, as from a store: no m-long arrays beside the matrix (reads widen
    # each block's pointers to int64).
    boundaries, pointers, row_pairs = _stream_unit_boundaries(csr.indptr, entry)
    return CSRSource(
        csr.indptr, csr.indices, csr.data, csr.shape, description or f"scipy.sparse {kind}",
        boundaries, _unit_bytes(boundaries, pointers, entry), int(csr.nnz),
        decodes=False, format_kind="scipy.sparse", canonical=True, row_pairs=row_pairs,
    )


def _unit_bytes(boundaries: np.ndarray, pointers: np.ndarray, entry_bytes: int) -> np.ndarray:
    """Raw bytes of each unit: its non-zeros and its indptr entries."""
    return np.diff(pointers) * entry_bytes + np.diff(boundaries) * 8


def _unit_cuts(pointers: np.ndarray, first_row: int, entry_bytes: int) -> np.ndarray:
    """Positions in ``pointers`` (indptr values of rows first_row, first_row + 1, ...) that
    cut the rows into units of about UNIT_BYTES and at most UNIT_ROWS rows (cut at the
    multiples of UNIT_ROWS, so wherever the pieces start), including the first and the last
    position. A unit exceeds UNIT_BYTES by less than its last row."""
    rows = first_row + np.arange(pointers.size, dtype=np.int64)
    cost = pointers * entry_bytes + rows * 8
    targets = np.arange(
        (int(cost[0]) // UNIT_BYTES + 1) * UNIT_BYTES, int(cost[-1]) + 1, UNIT_BYTES
    )
    cuts = np.searchsorted(cost, targets, side="left")
    row_cuts = np.arange(-first_row % UNIT_ROWS, pointers.size, UNIT_ROWS)
    return np.unique(np.concatenate([[0], cuts[cuts < pointers.size], row_cuts,
                                     [pointers.size - 1]]))


def _stream_unit_boundaries(indptr: Any, entry_bytes: int
                            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Unit boundaries and indptr at them, reading indptr a piece at a time (whole storage
    chunks, when it has them), so planning holds O(number of units) values, not m; and the
    pairs of non-zeros that share a row, sum r (r + 1) / 2 over the rows' lengths r (what
    the Gram matrix costs, ``kernels.csr.csr_gram_kernel``)."""
    m = indptr.shape[0] - 1
    chunks = getattr(indptr, "chunks", None)
    step = 1 << 16 if chunks is None else min(max(int(chunks[0]), 1 << 16), 1 << 20)
    boundaries, pointers, pairs = [], [], 0.0
    # Pieces overlap by one entry, so a piece's last row boundary is the next one's first.
    for start in range(0, max(m, 1), step):
        piece = np.asarray(indptr[start : min(start + step, m) + 1], dtype=np.int64)
        cuts = _unit_cuts(piece, start, entry_bytes)
        boundaries.append(start + cuts)
        pointers.append(piece[cuts])
        pairs += row_pairs(piece)
    boundaries, first = np.unique(np.concatenate(boundaries), return_index=True)
    pointers = np.concatenate(pointers)[first]
    if boundaries[-1] != m or pointers[0] != 0 or np.any(np.diff(pointers) < 0):
        raise InputError("indptr must start at 0 and never decrease")
    return boundaries, pointers, pairs


def row_pairs(indptr: np.ndarray) -> float:
    """The pairs of non-zeros that share a row: sum r (r + 1) / 2 over the rows' lengths r
    (of the rows that ``indptr`` bounds)."""
    lengths = np.diff(indptr).astype(np.float64)
    return float(lengths @ (lengths + 1.0)) / 2


class CSRWriter:
    """Writes a CSR matrix to the zarr layout row block by row block, with bounded memory.

    Appended rows are buffered and written in whole storage chunks. The group is written
    under ``PATH.partial`` and renamed to ``PATH`` by ``close()``, so a failed conversion
    never leaves a half matrix under the requested name. ``progress``: a callable that
    makes a progress bar (tqdm's ``update`` and ``close``) when the first rows arrive,
    updated with the rows appended and closed with the writer. ``integers``: the values
    are integers (a Matrix Market integer file's, parsed as float64, exact up to 2**53), and
    a warning names the first that the store's dtype rounds, as for an integer dtype.
    """

    def __init__(self, path: str | os.PathLike, n_cols: int, dtype: Any = "float32", *,
                 chunk_nnz: int = DEFAULT_CHUNK_NNZ, overwrite: bool = False,
                 compression_level: int = 3, replaces: str = "converted",
                 progress: Callable[[], Any] | None = None, integers: bool = False,
                 row_label: str = "row {}"):
        import zarr
        from zarr.codecs import ZstdCodec

        from ..store import StagedOutput, check_output_path

        # What overwrite may replace (``store.REPLACEABLE``): a generator replaces only
        # what it generated
        self.path = check_output_path(path, overwrite, replaces=replaces)
        self.row_label = row_label  # how messages name a row (of A^T: a column of A)
        self.n_cols = int(n_cols)
        self.dtype = np.dtype(dtype)
        if self.dtype.kind != "f":
            raise InputError(f"CSR stores hold float32 or float64 values, not {self.dtype}")
        index_dtype = np.int32 if self.n_cols <= np.iinfo(np.int32).max else np.int64
        self.output = StagedOutput(self.path, overwrite, replaces)

        def create(name, array_dtype, chunk):
            # Every chunk stored, zeros too (zarr leaves those out by default): a chunk
            # absent from a store written here is one lost (``api._absent_chunks_note``)
            return self.group.create_array(name, shape=(0,), chunks=(chunk,),
                                           dtype=array_dtype, compressors=compressor,
                                           config={"write_empty_chunks": True})

        try:
            compressor = ZstdCodec(level=compression_level)
            with self.output.writing():
                self.group = zarr.open_group(self.output.partial, mode="w",
                                             attributes=self.output.mark)
                self.columns = {
                    "indptr": _ChunkedColumn(create("indptr", np.int64, 1 << 16)),
                    "indices": _ChunkedColumn(create("indices", index_dtype, chunk_nnz)),
                    "data": _ChunkedColumn(create("data", self.dtype, chunk_nnz)),
                }
                self.columns["indptr"].append(np.zeros(1, dtype=np.int64))
        except BaseException:
            self.output.abort()
            raise
        self.rows = 0
        self.nnz = 0
        self.make_bar, self.bar = progress, None
        self.narrowing = Narrowing(self.dtype, " (convert --dtype float64)", integers,
                                   note_non_finite=True)

    def append(self, block: Any) -> None:
        """Append rows: a ``CSRBlock`` or a scipy.sparse matrix with n_cols columns."""
        if not isinstance(block, CSRBlock):
            block = CSRBlock.from_scipy(block)
        if block.shape[1] != self.n_cols:
            raise InputError(f"rows have {block.shape[1]} columns; the matrix has {self.n_cols}")
        self.append_arrays(block.indptr, block.indices, block.data)

    def append_arrays(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray) -> None:
        """Append rows given as a local indptr (starting at 0) and their indices and data."""
        indptr = np.asarray(indptr, dtype=np.int64)
        count = int(indptr[-1] - indptr[0])
        if indices.size != count or data.size != count:
            raise InputError("indptr does not match the number of indices and values")
        if count and (indices.min() < 0 or indices.max() >= self.n_cols):
            raise InputError(f"a column index lies outside [0, {self.n_cols})")
        values = self._narrowed(np.asarray(data), indptr)
        with self.output.writing():
            self.columns["indptr"].append(indptr[1:] - indptr[0] + self.nnz)
            self.columns["indices"].append(indices)
            self.columns["data"].append(values)
        self.rows += indptr.size - 1
        self.nnz += count
        if self.make_bar is not None:
            self.bar = self.bar or self.make_bar()
            self.bar.update(indptr.size - 1)
        raise_if_lost()

    def _narrowed(self, data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
        """``data`` as the store's dtype, its losses said naming the row
        (``dtypes.Narrowing``)."""
        return self.narrowing.of(
            data, lambda position: self.row_label.format(self._row_of(position, indptr)))

    def _row_of(self, position: int, indptr: np.ndarray) -> int:
        """The row of the store that the appended value at ``position`` lies in."""
        return self.rows + int(np.searchsorted(indptr - indptr[0], position, side="right")) - 1

    def close(self) -> Any:
        """Flush, write the attributes, rename into place; return the group opened read-only."""
        import zarr

        from .. import __version__

        with self.output.writing():
            for column in self.columns.values():
                column.flush()
        self.output.commit(self.group, {**ENCODING, "shape": [self.rows, self.n_cols],
                                        "ooc_svd_csr": {"version": __version__}})
        self._close_bar()
        return zarr.open_group(self.path, mode="r")

    def abort(self) -> None:
        self._close_bar()
        self.output.abort()

    def _close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> CSRWriter:
        return self

    def __exit__(self, kind, *rest) -> None:
        if kind is not None:
            self.abort()


class _ChunkedColumn:
    """A growing 1-D zarr array written in whole chunks from an in-memory tail."""

    def __init__(self, array: Any):
        self.array = array
        self.chunk = int(array.chunks[0])
        self.size = 0  # elements written to the array
        self.tail: list[np.ndarray] = []
        self.tail_size = 0

    def append(self, values: np.ndarray) -> None:
        self.tail.append(np.asarray(values, dtype=self.array.dtype))
        self.tail_size += values.size
        if self.tail_size >= self.chunk:
            self._write(self.tail_size // self.chunk * self.chunk)

    def flush(self) -> None:
        self._write(self.tail_size)

    def _write(self, count: int) -> None:
        if count == 0:
            return
        pending = np.concatenate(self.tail)
        self.array.resize((self.size + count,))
        self.array[self.size : self.size + count] = pending[:count]
        self.size += count
        rest = pending[count:]
        self.tail = [rest] if rest.size else []
        self.tail_size = rest.size

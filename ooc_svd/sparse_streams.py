"""Sequential reads of the arrays of a stored sparse matrix (CSR, CSC or COO), a piece at a time.

The arrays may be numpy arrays, HDF5 datasets (anything sliceable) or ``.npy`` members of a
zip archive (a scipy ``.npz``), which can only be read front to back, so every reader here
only moves forward. CSR rows go to a ``CSRWriter`` block by block; CSC and COO entries come
out as coordinate chunks for ``ooc_svd.coordinates``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np

from .coordinates import EntryChunk
from .errors import InputError
from .sources.csr import CSRWriter, canonical_rows
from .sources.dtypes import Narrowing

# indptr values read at a time: 512 KiB of int64.
POINTER_PIECE = 1 << 16


class SlicedReader:
    """Reads a 1-D array (numpy, h5py, zarr: anything sliceable) front to back."""

    def __init__(self, array: Any, name: str):
        shape, dtype = getattr(array, "shape", None), getattr(array, "dtype", None)
        if shape is None or dtype is None or len(shape) != 1 or \
                np.dtype(dtype).kind not in "biuf":
            raise InputError(f"{name} is not a 1-D array of numbers (shape {shape}, dtype "
                             f"{dtype})")
        self.array, self.name = array, name
        self.size = int(shape[0])
        self.dtype = np.dtype(dtype)
        self.position = 0

    def take(self, count: int) -> np.ndarray:
        stop = self.position + count
        if stop > self.size:
            raise InputError(f"{self.name} holds {self.size} values; the matrix needs {stop}")
        values = np.asarray(self.array[self.position : stop])
        self.position = stop
        return native_order(values)


class NpyMemberReader:
    """Reads a 1-D array stored as a ``.npy`` member of a zip archive, decompressing as it
    goes, so a compressed ``.npz`` is never held whole. A context manager: the archive's
    file stays open while any of its members is (a ``ZipFile`` closed before them leaves
    it to the garbage collector)."""

    def __init__(self, archive: zipfile.ZipFile, name: str, description: str):
        self.file = archive.open(f"{name}.npy")
        try:
            self._read_header(name, description)
        except BaseException:
            self.file.close()
            raise

    def __enter__(self) -> NpyMemberReader:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.file.close()

    def _read_header(self, name: str, description: str) -> None:
        version = np.lib.format.read_magic(self.file)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(version)
        if read_header is None:
            raise InputError(f"{description}: {name}.npy has .npy version {version}, not 1 or 2")
        shape, _, dtype = read_header(self.file)
        if len(shape) != 1 or dtype.hasobject:
            raise InputError(f"{description}: {name} is not a 1-D numeric array "
                             f"(shape {shape}, dtype {dtype})")
        self.name = f"{name} in {description}"
        self.size, self.dtype, self.position = int(shape[0]), dtype, 0

    def take(self, count: int) -> np.ndarray:
        raw = self.file.read(count * self.dtype.itemsize)
        if len(raw) != count * self.dtype.itemsize:
            raise InputError(f"{self.name} ends before its {self.size} values (truncated file?)")
        self.position += count
        return native_order(np.frombuffer(raw, dtype=self.dtype))


def native_order(values: np.ndarray) -> np.ndarray:
    """``values`` in the machine's byte order, which numba compiles for (big-endian data,
    as zarr v2 stores and .npy files may hold, is swapped)."""
    return values.astype(values.dtype.newbyteorder("="), copy=False)


Reader = SlicedReader | NpyMemberReader


class Float64Values:
    """The values of ``data`` taken as float64, in which repeated entries are summed, for
    a store of ``stored`` values. Of integers, a warning, once, names the first that the
    store rounds (beyond 2**24 in float32, 2**53 in float64), as given and as stored: the
    writer, given float64 values, would name what float64 made of it. (A sum of repeated
    entries is not checked.)"""

    def __init__(self, data: Reader, stored: np.dtype):
        self.data = data
        self.rounding = Narrowing(np.dtype(stored), " (convert --dtype float64)")

    def take(self, count: int) -> np.ndarray:
        first = self.data.position
        raw = self.data.take(count)
        values = raw.astype(np.float64)
        if raw.dtype.kind in "iu" and not self.rounding.warned_of_rounding:
            self.rounding.warn_of_rounding(
                raw, values.astype(self.rounding.dtype, copy=False),
                lambda position: f"value {first + position} of {self.data.name}")
        return values


def _pointer_pieces(indptr: Reader, count: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first index, pointers) covering ``count`` rows (or columns), each piece starting with
    the last pointer of the previous one; checks that pointers start at 0 and never fall."""
    if indptr.size != count + 1:
        raise InputError(f"{indptr.name} holds {indptr.size} values, not {count + 1}")
    previous = indptr.take(1).astype(np.int64)
    if previous[0] != 0:
        raise InputError(f"{indptr.name} starts at {previous[0]}, not 0")
    for first in range(0, count, POINTER_PIECE):
        piece = indptr.take(min(POINTER_PIECE, count - first)).astype(np.int64)
        pointers = np.concatenate([previous, piece])
        falls = np.flatnonzero(pointers[1:] < pointers[:-1])
        if falls.size:  # pointers[i] is indptr[first + i]
            position = first + int(falls[0])
            raise InputError(f"{indptr.name} decreases between positions {position} and "
                             f"{position + 1}")
        yield first, pointers
        previous = pointers[-1:]


def row_windows(pointers: np.ndarray, entries: int) -> Iterator[tuple[int, int]]:
    """Windows [a, b) of rows, each holding at most ``entries`` non-zeros or a single row."""
    a, last = 0, pointers.size - 1
    while a < last:
        b = int(np.searchsorted(pointers, pointers[a] + entries, side="right")) - 1
        b = min(max(b, a + 1), last)
        yield a, b
        a = b


def write_csr_stream(indptr: Reader, indices: Reader, data: Reader,
                     shape: tuple[int, int], writer: CSRWriter, block_entries: int) -> None:
    """Append CSR rows read front to back, about ``block_entries`` non-zeros at a time.

    Blocks whose columns are unsorted or repeated within a row are made canonical (a copy:
    the input is never modified); canonical ones are appended as read.
    """
    _check_lengths(indices, data)
    # Integers as float64 (what their repeated columns are summed in), warned of where the
    # store rounds them (``Float64Values``).
    values = Float64Values(data, writer.dtype) if data.dtype.kind in "iu" else data
    for _, pointers in _pointer_pieces(indptr, shape[0]):
        for a, b in row_windows(pointers, block_entries):
            count = int(pointers[b] - pointers[a])
            local = pointers[a : b + 1] - pointers[a]
            writer.append_arrays(*_canonical_csr(local, indices.take(count),
                                                 values.take(count), shape[1]))
    _check_all_read(indices)


def _canonical_csr(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int):
    """Rows with their columns in order, repeated ones summed in float64, as the other
    layouts' entries are (and not in the input's dtype, where int8 or float16 would wrap
    or round, or a bool saturate)."""
    if indices.size and (indices.min() < 0 or indices.max() >= n_cols):
        raise InputError(f"a column index lies outside [0, {n_cols})")
    data, indices, indptr = canonical_rows(indptr, indices, data, n_cols, np.float64)
    return indptr, indices, data


def coo_entry_chunks(rows: Reader, cols: Reader, data: Reader, shape: tuple[int, int],
                     chunk_entries: int, stored: np.dtype) -> Iterator[EntryChunk]:
    """COO entries in chunks, values as float64 (duplicates are summed in float64; integers
    that a store of ``stored`` values rounds are warned of)."""
    if not rows.size == cols.size == data.size:
        raise InputError(f"COO arrays of different lengths: {rows.name} {rows.size}, "
                         f"{cols.name} {cols.size}, {data.name} {data.size}")
    values = Float64Values(data, stored)
    for start in range(0, rows.size, chunk_entries):
        count = min(chunk_entries, rows.size - start)
        chunk = EntryChunk(rows.take(count).astype(np.int64), cols.take(count).astype(np.int64),
                           values.take(count))
        check_entries(chunk, shape)
        yield chunk


def csc_entry_chunks(indptr: Reader, indices: Reader, data: Reader, shape: tuple[int, int],
                     chunk_entries: int, stored: np.dtype) -> Iterator[EntryChunk]:
    """The entries of a CSC matrix column after column, in chunks of ``chunk_entries``
    (a long column spans several chunks), values as ``coo_entry_chunks`` gives them."""
    _check_lengths(indices, data)
    values = Float64Values(data, stored)
    for first, pointers in _pointer_pieces(indptr, shape[1]):
        for start in range(int(pointers[0]), int(pointers[-1]), chunk_entries):
            stop = min(start + chunk_entries, int(pointers[-1]))
            positions = np.arange(start, stop, dtype=np.int64)
            cols = first + np.searchsorted(pointers, positions, side="right") - 1
            chunk = EntryChunk(indices.take(stop - start).astype(np.int64), cols,
                               values.take(stop - start))
            check_entries(chunk, shape)
            yield chunk
    _check_all_read(indices)


def _check_lengths(indices: Reader, data: Reader) -> None:
    if indices.size != data.size:
        raise InputError(f"{indices.name} holds {indices.size} values but {data.name} "
                         f"{data.size}")


def _check_all_read(indices: Reader) -> None:
    if indices.position != indices.size:
        raise InputError(f"indptr ends at {indices.position}, but {indices.name} holds "
                         f"{indices.size} values")


def check_entries(chunk: EntryChunk, shape: tuple[int, int]) -> None:
    for name, index, bound in (("row", chunk.rows, shape[0]), ("column", chunk.cols, shape[1])):
        if index.size and (index.min() < 0 or index.max() >= bound):
            raise InputError(f"a {name} index lies outside [0, {bound}) "
                             f"(shape {shape[0]} x {shape[1]})")

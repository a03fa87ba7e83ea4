"""A^T of a dense matrix on disk, written as a zarr array with bounded memory.

A wide dense A (m << n) holds n x l arrays in every pass; its transpose, factored instead,
holds m x l, and its U and V are A's V and U. Reading A^T by rows means reading A by
columns, which a store chunked by rows cannot do, so A^T is written once, as a zarr v3
array (zstd) chunked in two dimensions:

- ``chunk_rows`` rows of A^T per chunk (columns of A): a row block of A^T spans all m of
  its columns, so about BLOCK_TARGET_BYTES of it, the least a run reads at a time, or a
  BLOCK_SHARE of the memory limit where that is less (a run under the same limit holds a
  few blocks at once);
- ``band_rows`` columns of A^T per chunk (rows of A), a whole number of A's row chunks:
  A is read in bands of that many rows, each band once, and each band gives one column of
  A^T's chunks, every chunk written whole, once.

A band is read in strips as wide as the memory limit allows, made of units: of a zarr
array, its column chunks (all n where it has none, as a zarr chunk is decoded whole); of an
.npy, or a stored .npz member, as few columns as make whole chunks of A^T, and for a file in
row order at least RUN_TARGET_BYTES of each row (each row's part of a strip is a read; of a
file in column order, each column's). A band can then be as tall as the limit holds a strip
of one unit, which keeps A^T's chunks large at small limits (a band of whole rows, as short
as the limit made it, gave chunks that shrank with the square of the limit). A is read
once, A^T written once.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, ReadError
from .interrupts import raise_if_lost
from .plan import DEFAULT_MEMORY_LIMIT
from .progress import progress_bars
from .sources.dense import (
    LOADED_HINT,
    DenseSource,
    block_from_file,
    fortran_file,
    not_a_matrix,
    open_dense_source,
    read_from_file,
)
from .sources.dtypes import Narrowing
from .store import StagedOutput, check_output_path
from .units import format_bytes, parse_bytes

# A row block of A^T, all of its columns: about what a run reads at a time from it
BLOCK_TARGET_BYTES = 64 << 20
# The most of the memory limit a row block of A^T takes
BLOCK_SHARE = 1 / 16
# A storage chunk of A^T
CHUNK_TARGET_BYTES = 8 << 20
# The least of a row of a C-ordered file read at a time, where a strip is narrower than A:
# each run is a read
RUN_TARGET_BYTES = 4 << 10
# zstd's level for A^T, as ooc-svd generate writes
COMPRESSION_LEVEL = 3


@dataclass(frozen=True)
class Layout:
    """How A (m x n) is read and A^T (n x m) chunked."""

    chunk_rows: int  # rows of A^T per storage chunk: columns of A
    band_rows: int  # rows of A read at a time: columns of A^T per storage chunk
    strip_columns: int  # columns of A read at a time (a multiple of chunk_rows, or all n)
    peak_bytes: int  # the working set predicted: a strip, and the chunks in flight


def transpose_dense(path: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
                    memory_limit: int | str = DEFAULT_MEMORY_LIMIT, overwrite: bool = False,
                    progress: bool | None = None) -> Any:
    """Write A^T of the dense matrix at ``path`` (a zarr array, an .npy, or a one-array
    .npz) to a zarr array at ``out``, reading A once, with about ``memory_limit`` of memory.

    Parameters
    ----------
    dtype : {None, 'float32', 'float64'}
        The values stored; by default the input's (integers stay integers: the run reads
        them exactly).
    memory_limit : bytes or str such as '2GB'
        The working set: a strip of A's rows read at a time, and zarr's chunks in flight.
        The least it can be is the bytes of one of A's storage chunks, a few times over (a
        band of an .npy file's rows: one row).
    overwrite : bool
        Replace an ``out`` that ooc_svd wrote (never another directory or file).
    progress : bool or None
        A bar of the bytes of A read, on stderr (None: where stderr is a terminal).

    Returns
    -------
    zarr.Array of A^T, opened read-only. Its attribute ``ooc_svd_source`` records the input
    and its format, with ``transposed: True``.

    The run on A^T gives A's left singular vectors as its V, and A's right ones as its U.
    Centering A^T subtracts A's row means, not its column means (see ``svd_lowrank``'s M for
    A's PCA from A^T).
    """
    limit = parse_bytes(memory_limit)
    source = _dense_input(path, limit)
    m, n = source.shape
    stored = _stored_dtype(source.dtype, dtype)
    path = os.fspath(path)
    out = check_output_path(out, overwrite, replaces="converted", inputs=(path,))
    layout = plan_layout(source, stored, limit)
    output = StagedOutput(out, overwrite, "converted")
    try:
        transposed = _create(output, (n, m), layout, stored)
        _write_bands(source, transposed, output, layout, progress)
        output.commit(transposed, {"ooc_svd_source": {
            "input": path, "format": source.kind, "transposed": True}})
    except BaseException:
        output.abort()  # keeps an output whose rename was refused
        raise
    import zarr

    return zarr.open_array(out, mode="r")


def _dense_input(path: str | os.PathLike, load_limit: int) -> DenseSource:
    """The dense matrix at ``path``, which must be a file or store read by rows (or a
    compressed .npz, loaded whole where that alone fits ``load_limit``)."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"transpose_dense takes the path of a zarr array, an .npy or an .npz, "
                         f"not {type(path).__name__} (in memory, A.T is free)")
    source = open_dense_source(path, load_limit)
    if source.array.ndim != 2:
        raise not_a_matrix(repr(os.fspath(path)), source.array.ndim)
    if min(source.shape) == 0:
        raise InputError(f"{os.fspath(path)!r} is empty: shape {source.shape}")
    return source


def _stored_dtype(source: np.dtype, requested: Any) -> np.dtype:
    """The dtype A^T is stored in: ``requested`` (float32 or float64), else A's own in
    native byte order (extended precision as float64, which zarr stores)."""
    from .convert import output_dtype

    chosen = output_dtype(source, requested)  # refuses complex and non-numeric values
    if requested is not None:
        return chosen
    if source.kind == "f" and source.itemsize > 8:
        return np.dtype(np.float64)
    return source.newbyteorder("=")


def plan_layout(source: DenseSource, stored: np.dtype, memory_limit: int) -> Layout:
    """The chunks of A^T (of ``stored`` values) and the strips of A read, within
    ``memory_limit`` (InputError where one chunk of A, the least that can be read, does
    not fit)."""
    m, n = source.shape
    itemsize = np.dtype(stored).itemsize
    row_chunk, column_chunk = _input_chunks(source)
    block = min(BLOCK_TARGET_BYTES, int(memory_limit * BLOCK_SHARE))
    chunk_rows = _aligned(max(1, block // (m * itemsize)), column_chunk, n)
    band_rows = _band_rows(CHUNK_TARGET_BYTES // (chunk_rows * itemsize), row_chunk, m)
    unit = _strip_unit(source, chunk_rows, column_chunk)
    while True:
        layout = _widest_strip(source, stored, memory_limit, chunk_rows, band_rows, unit)
        if layout is not None:
            return layout
        if band_rows > row_chunk:  # fewer rows at a time, each strip narrower in memory
            band_rows = _band_rows(band_rows // 2, row_chunk, m)
        elif unit > column_chunk:  # chunks of A^T as tall as A's column chunks are wide
            chunk_rows = unit = column_chunk
        else:
            break
    least = _strip_bytes(source, stored, chunk_rows, band_rows, unit)
    loaded, way_out = "", "raise memory_limit"
    if source.loaded_bytes:  # a compressed .npz
        loaded = f", and the input, loaded whole ({format_bytes(source.loaded_bytes)})"
        way_out += f"; or {LOADED_HINT['dense']}"
    what = f"{band_rows} row{'s' if band_rows > 1 else ''} x {unit} columns" + \
        (" (a storage chunk)" if source.chunks is not None else "")
    raise InputError(
        f"memory_limit {format_bytes(memory_limit)} cannot hold the least of "
        f"{source.description} read at a time, {what}, with zarr's chunks in flight{loaded} "
        "(needs "
        f"{format_bytes(least + source.loaded_bytes, round_up=True)}): {way_out}")


def _input_chunks(source: DenseSource) -> tuple[int, int]:
    """(rows, columns) of A's storage chunks: an .npy file's rows can be read any number at
    a time, but only whole."""
    m, n = source.shape
    if source.chunks is None:
        return 1, n
    return min(source.chunks[0], m), min(source.chunks[1], n)


def _strip_unit(source: DenseSource, chunk_rows: int, column_chunk: int) -> int:
    """The columns of A a strip is a whole number of: of a zarr array, its column chunks
    (all n where it has none: a chunk is decoded whole, however little of it is read); of
    a file or a matrix in memory, as few as make whole chunks of A^T, so that its chunks
    are as tall as the limit allows whatever n, and of a C-ordered file, enough that each
    row's run read is at least RUN_TARGET_BYTES."""
    n = source.shape[1]
    if _in_file(source.array) or isinstance(source.array, np.ndarray):
        least = 1
        if read_from_file(source.array):
            least = math.ceil(RUN_TARGET_BYTES / source.dtype.itemsize)
        return min(n, math.ceil(least / chunk_rows) * chunk_rows)
    return n if column_chunk >= n else max(column_chunk, chunk_rows)


def _aligned(target: int, column_chunk: int, n: int) -> int:
    """About ``target`` rows of A^T per chunk, at most n, and where A has column chunks,
    a multiple or a divisor of their width: a strip of whole column chunks of A is then
    whole chunks of A^T, each written once."""
    target = min(target, n)
    if column_chunk >= n:
        return target
    if target >= column_chunk:
        return target // column_chunk * column_chunk
    return max(d for d in _divisors(column_chunk) if d <= target)


def _divisors(value: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(value) + 1) if value % d == 0]
    return small + [value // d for d in small]


def _band_rows(target: int, row_chunk: int, m: int) -> int:
    """About ``target`` rows, a whole number of A's row chunks, at least one, at most all
    of A's rows."""
    return min(max(1, target // row_chunk) * row_chunk, m)


def _strip_bytes(source: DenseSource, stored: np.dtype, chunk_rows: int, band_rows: int,
                 columns: int) -> int:
    """The working set of a strip of ``band_rows`` x ``columns`` of A: the strip read, its
    values as stored in A^T where the dtype (or byte order) changes, zarr's copy of what it
    writes, and the chunks in flight (zarr decodes and encodes up to its
    ``async.concurrency`` at once, each held raw and compressed)."""
    import zarr

    in_flight = int(zarr.config.get("async.concurrency") or 10)
    itemsize = np.dtype(stored).itemsize
    strip = band_rows * columns * source.dtype.itemsize
    # zarr copies the transposed strip it writes (measured: a strip more than predicted)
    strip += band_rows * columns * itemsize
    if np.dtype(stored) != source.dtype:  # another type, or byte order: a copy
        strip += band_rows * columns * itemsize
    row_chunk, column_chunk = _input_chunks(source)
    read = 0
    if source.chunks is not None:
        chunks_read = math.ceil(band_rows / row_chunk) * math.ceil(columns / column_chunk)
        read = min(in_flight, chunks_read) * 2 * row_chunk * column_chunk * \
            source.dtype.itemsize
    written = min(in_flight, math.ceil(columns / chunk_rows)) * 2 * chunk_rows * band_rows * \
        itemsize
    return strip + read + written


def _widest_strip(source: DenseSource, stored: np.dtype, memory_limit: int, chunk_rows: int,
                  band_rows: int, unit: int) -> Layout | None:
    """The layout that reads the widest strips of ``unit`` columns that fit, or None."""
    n = source.shape[1]
    available = memory_limit - source.loaded_bytes  # a compressed .npz is held whole
    if _strip_bytes(source, stored, chunk_rows, band_rows, unit) > available:
        return None
    units, top = 1, math.ceil(n / unit)
    while units < top:  # the most units that fit, by bisection
        middle = (units + top + 1) // 2
        if _strip_bytes(source, stored, chunk_rows, band_rows, middle * unit) <= available:
            units = middle
        else:
            top = middle - 1
    columns = min(units * unit, n)
    return Layout(chunk_rows, band_rows, columns,
                  source.loaded_bytes + _strip_bytes(source, stored, chunk_rows, band_rows,
                                                     columns))


def _create(output: StagedOutput, shape: tuple[int, int], layout: Layout,
            dtype: np.dtype) -> Any:
    import zarr
    from zarr.codecs import ZstdCodec

    with output.writing():
        return zarr.create_array(output.partial, shape=shape,
                                 chunks=(layout.chunk_rows, layout.band_rows), dtype=dtype,
                                 compressors=ZstdCodec(level=COMPRESSION_LEVEL),
                                 attributes=output.mark)


def _write_bands(source: DenseSource, transposed: Any, output: StagedOutput, layout: Layout,
                 progress: bool | None) -> None:
    """A^T[j0:j1, r0:r1] = A[r0:r1, j0:j1]^T for every strip of every band, in order."""
    m, n = source.shape
    # Values cast to A^T's dtype: a float beyond its range is refused, and a warning, once
    # each, says that integers are rounded or values too small are stored as zero
    narrowing = Narrowing(np.dtype(transposed.dtype))
    with progress_bars(progress)("A read", m * n * source.dtype.itemsize) as bar:
        for start in range(0, m, layout.band_rows):
            stop = min(start + layout.band_rows, m)
            for first in range(0, n, layout.strip_columns):
                last = min(first + layout.strip_columns, n)
                strip = _read_strip(source, start, stop, first, last)
                values = narrowing.of(strip, _place_in(strip.shape, start, first))
                with output.writing():
                    transposed[first:last, start:stop] = values.T
                bar.update(strip.nbytes)
                strip = values = None  # let go before the next strip is read
                raise_if_lost()


def _place_in(shape: tuple[int, int], start: int, first: int):
    """How messages name the value at a flat index of a strip of ``shape``, A[start:,
    first:]: by its place in A."""
    def place(position: int) -> str:
        row, column = np.unravel_index(position, shape)
        return f"A[{start + row}, {first + column}]"

    return place


def _in_file(array: Any) -> bool:
    """Whether ``array`` is an .npy's (or a stored .npz member's) values, read from the
    file by offsets, in either order."""
    return read_from_file(array) or fortran_file(array)


def _read_strip(source: DenseSource, start: int, stop: int, first: int,
                last: int) -> np.ndarray:
    """A[start:stop, first:last] as stored."""
    try:
        if _in_file(source.array):
            return block_from_file(source.array, start, stop, first, last)
        return np.asarray(source.array[start:stop, first:last])
    except Exception as exc:  # noqa: BLE001 - re-raised naming what failed
        raise ReadError(f"cannot read rows [{start}, {stop}), columns [{first}, {last}) of "
                        f"{source.description}: {type(exc).__name__}: {exc}") from exc


def describe(out: str, array: Any, seconds: float) -> str:
    """One line: the shape, dtype, chunks and stored bytes of A^T just written."""
    m, n = array.shape
    return (f"wrote {out}: {m} x {n} {array.dtype} dense, chunks {tuple(array.chunks)}, "
            f"{format_bytes(int(array.nbytes_stored()))} stored, {seconds:.1f} s")

"""Converters from common sparse formats to the CSR layout on zarr, with bounded memory.

Every converter writes through ``ooc_svd.sources.csr.CSRWriter`` (under ``OUT.partial``,
renamed when complete), refuses an existing ``out`` unless ``overwrite``, and returns the
written group opened read-only. The group's attribute ``ooc_svd_source`` records the input,
its format, and how it was converted (``row_sorted``: in one pass; ``buckets``: the number
of row ranges sorted one at a time).

Memory, for an input of m rows and nnz non-zeros:

- ``from_scipy``: CSR in blocks of rows, nothing copied but a block (a block with unsorted
  or repeated columns is copied to be sorted); other formats are first converted to CSR in
  memory by scipy (the non-zeros once more);
- ``from_npz``: CSR members are streamed from the zip archive, decompressed as read; COO and
  CSC go through ``ooc_svd.coordinates``; BSR and DIA are loaded by scipy;
- ``from_mtx``: text read and parsed a block at a time; entries in row order are written in
  one pass, others are bucketed by rows into scratch files, and each bucket sorted alone;
- ``from_h5ad``: an HDF5 CSR group is read a block of rows at a time; a CSC group goes
  through buckets like an unsorted Matrix Market file;
- ``from_zarr``: a zarr CSR or CSC group, as ``from_h5ad`` (to rechunk a CSR store).

``memory_limit`` bounds the working set, about: the writer's few storage chunks of
``chunk_nnz`` values, then blocks of text or arrays and the entries sorted at once share the
rest. A single row must fit in it.

Value dtype: float64 input stays float64; float32 (and float16), integer, boolean and
pattern input becomes float32, exact for integers up to 2**24 (counts); pass
``dtype="float64"`` to keep larger integers exact (up to 2**53: integers are read, and their
duplicates summed, in float64). A warning names the first integer value that the store
rounds, as given and as stored (not a sum of repeated entries).
"""

from __future__ import annotations

import functools
import gzip
import inspect
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, suppress
from dataclasses import dataclass
from typing import Any

import numpy as np

from .coordinates import (
    SORT_BYTES_PER_ENTRY,
    EntryChunk,
    NotRowSorted,
    write_bucketed,
    write_row_sorted,
)
from .errors import InputError, MissingDependencyError, PlanError, StoreNotFoundError
from .interrupts import raise_if_lost
from .matrix_market import open_binary, read_entry_chunks, read_header
from .plan import DEFAULT_MEMORY_LIMIT
from .progress import progress_bars
from .sources.csr import DEFAULT_CHUNK_NNZ, CSRWriter, stored_shape
from .sources.dense import is_torch_tensor, refuse_load
from .sources.open import load_npz, npz_format, sparse_npz_member_bytes
from .sparse_streams import (
    NpyMemberReader,
    SlicedReader,
    coo_entry_chunks,
    csc_entry_chunks,
    write_csr_stream,
)
from .store import check_apart_from_inputs, check_output_path, check_scratch_dir
from .units import format_bytes, parse_bytes

# The writer holds about this many storage chunks of indices and data at once: the tail being
# filled, its concatenation, and the chunk being compressed.
WRITER_CHUNKS = 5


@dataclass(frozen=True)
class _Target:
    """Where and how the CSR store is written, and the memory the conversion may use."""

    out: str
    shape: tuple[int, int]
    dtype: np.dtype
    chunk_nnz: int
    overwrite: bool
    memory_limit: int  # what the conversion may use besides the writer's chunks
    scratch_dir: str | None = None
    progress: bool | None = None  # bars on stderr; None: when it is a terminal
    # The values are integers parsed as floats (a Matrix Market integer file's), which the
    # writer checks for rounding. (Integer arrays come as float64 with their own check,
    # sparse_streams.Float64Values, or are checked by the writer as integers.)
    integers: bool = False
    transposed: bool = False  # A^T is written: its rows are the input's columns

    def writer(self) -> CSRWriter:
        bars = progress_bars(self.progress)
        return CSRWriter(self.out, self.shape[1], self.dtype, chunk_nnz=self.chunk_nnz,
                         overwrite=self.overwrite, integers=self.integers,
                         progress=lambda: bars("rows", self.shape[0], unit=" rows"),
                         row_label="column {} of the input" if self.transposed else "row {}")

    def counted(self, chunks: Iterator[EntryChunk], expected: int) -> Iterator[EntryChunk]:
        """``chunks``, with a bar of the entries that went by (``expected`` of them)."""
        with progress_bars(self.progress)("entries into buckets", expected,
                                          unit=" entries") as bar:
            for chunk in chunks:
                yield chunk
                bar.update(chunk.rows.size)
                raise_if_lost()
            bar.total = bar.n  # ``expected`` counts a symmetric file's diagonal twice
            bar.refresh()

    @property
    def text_bytes(self) -> int:
        """Matrix Market text per block: up to five blocks are held (read ahead, parsed,
        consumed), each with arrays of up to four times its size (short lines), eight with
        mirrored entries; the consumer's copies come on top."""
        return int(np.clip(self.memory_limit // 96, 64 << 10, 16 << 20))

    @property
    def chunk_entries(self) -> int:
        """Entries per block read from binary arrays (indices, values and copies of them)."""
        return int(np.clip(self.memory_limit // 256, 4096, 1 << 22))

    @property
    def sort_entries(self) -> int:
        """Entries of a bucket sorted at once, in half the limit."""
        return max(self.memory_limit // 2 // SORT_BYTES_PER_ENTRY, 1024)


def _target(out: str | os.PathLike, shape: tuple[int, int], source_dtype: Any, *, dtype: Any,
            chunk_nnz: int, overwrite: bool, memory_limit: int | str,
            scratch_dir: str | os.PathLike | None = None, source_path: str | None = None,
            progress: bool | None = None, transposed: bool = False,
            integers: bool = False) -> _Target:
    """Validate the options before any long work (``source_path``: the input's file or
    store, which ``out`` may not touch; ``transposed``: ``shape`` is A^T's, written;
    ``integers``: the values are integers parsed as floats)."""
    inputs = () if source_path is None else (source_path,)
    path = check_output_path(out, overwrite, replaces="converted", inputs=inputs)
    if chunk_nnz < 1:
        raise InputError(f"chunk_nnz must be >= 1, not {chunk_nnz}")
    if scratch_dir is not None:
        check_scratch_dir(scratch_dir)
        # its buckets go into a directory of their own there, removed at the end
        check_apart_from_inputs("scratch_dir", scratch_dir, inputs, around=False)
    m, n = (int(s) for s in shape)
    value_dtype = output_dtype(source_dtype, dtype)
    index_bytes = 4 if n <= np.iinfo(np.int32).max else 8
    writer_bytes = WRITER_CHUNKS * chunk_nnz * (value_dtype.itemsize + index_bytes)
    limit = parse_bytes(memory_limit)
    if limit - writer_bytes < 1_000_000:
        raise InputError(
            f"memory_limit {memory_limit!r} leaves less than 1 MB besides the writer's "
            f"{format_bytes(writer_bytes)} ({WRITER_CHUNKS} storage chunks of chunk_nnz="
            f"{chunk_nnz}): raise the limit or lower chunk_nnz"
        )
    return _Target(path, (m, n), value_dtype, int(chunk_nnz), overwrite, limit - writer_bytes,
                   None if scratch_dir is None else os.fspath(scratch_dir), progress, integers,
                   transposed)


def output_dtype(source: np.dtype | None, requested: Any = None) -> np.dtype:
    """The stored value dtype: ``requested`` if given (float32 or float64), else float64 for
    float64 input and float32 for everything else (``source`` None: a pattern matrix).
    Complex or non-numeric values are refused, whatever is requested: a cast would drop
    their imaginary parts."""
    if source is not None:
        source = np.dtype(source)
        if source.kind == "c":
            raise InputError(f"complex values ({source}) are not supported: ooc_svd computes "
                             "real SVDs")
        if source.kind not in "fiub":
            raise InputError(f"values of dtype {source} are not numbers")
    if requested is not None:
        try:
            chosen = np.dtype(requested)
        except TypeError:
            raise InputError(f"dtype must be float32 or float64, not {requested!r}") from None
        if chosen not in (np.float32, np.float64):
            raise InputError(f"dtype must be float32 or float64, not {chosen}")
        return chosen
    if source is None:
        return np.dtype(np.float32)
    return np.dtype(np.float64 if source.kind == "f" and source.itemsize >= 8 else np.float32)


def _finish(writer: CSRWriter, target: _Target, provenance: dict[str, Any]) -> Any:
    if writer.rows != target.shape[0]:
        raise InputError(f"wrote {writer.rows} rows of the {target.shape[0]} announced")
    writer.group.attrs["ooc_svd_source"] = provenance
    return writer.close()


def _write_csr(target: _Target, readers: tuple, provenance: dict[str, Any]) -> Any:
    with target.writer() as writer:
        write_csr_stream(*readers, target.shape, writer, target.chunk_entries)
        return _finish(writer, target, {**provenance, "row_sorted": True})


def _write_coordinates(target: _Target, entries: Callable[[], Iterator[EntryChunk]],
                       expected: int, has_values: bool, provenance: dict[str, Any],
                       try_row_sorted: bool = True) -> Any:
    """Write coordinate entries: in one pass if they turn out to be in row order, else
    (reading them again from the start) through buckets of rows.

    ``entries`` opens a fresh iterator over all entries; ``expected`` estimates their count.
    """
    if try_row_sorted:
        with target.writer() as writer:
            try:
                with closing(entries()) as chunks:
                    write_row_sorted(chunks, writer, target.shape[0])
            except NotRowSorted:
                writer.abort()
            else:
                return _finish(writer, target, {**provenance, "row_sorted": True})
    with target.writer() as writer, closing(entries()) as chunks:
        buckets = write_bucketed(target.counted(chunks, expected), writer, target.shape[0],
                                 expected,
                                 target.sort_entries, has_values, target.scratch_dir)
        return _finish(writer, target, {**provenance, "row_sorted": False, "buckets": buckets})


def from_scipy(matrix: Any, out: str | os.PathLike, *, dtype: Any = None,
               chunk_nnz: int = DEFAULT_CHUNK_NNZ, memory_limit: int | str = DEFAULT_MEMORY_LIMIT,
               overwrite: bool = False, progress: bool | None = None,
               transpose: bool = False) -> Any:
    """Write a scipy.sparse matrix or array to the CSR layout at ``out``.

    Parameters
    ----------
    matrix : scipy.sparse matrix or array of shape (m, n)
        CSR is written in blocks of rows as it is; other formats are converted to CSR first
        (scipy holds the non-zeros once more). Never densified, never modified.
    out : path of the zarr group to write.
    dtype : {None, 'float32', 'float64'}, default=None
        None: float64 for float64 input, float32 otherwise.
    chunk_nnz : int, default=2**20
        Non-zeros per storage chunk of ``indices`` and ``data``.
    memory_limit : int or str, default='1GB'
        Bounds the rows copied per block.
    overwrite : bool, default=False
        Replace an existing ``out`` (else ``OutputExistsError``).
    progress : bool, optional
        A progress bar of the rows written, on stderr; default: when stderr is a terminal.
    transpose : bool, default=False
        Write A^T (n x m) instead: a wide A's SVD is read from a tall A^T, whose U and V
        are A's V and U.

    Returns
    -------
    zarr.Group, opened read-only.
    """
    kind = type(matrix).__name__
    return _from_scipy(matrix, out, {"input": f"scipy.sparse {kind}", "format": kind},
                       dtype=dtype, chunk_nnz=chunk_nnz, overwrite=overwrite,
                       memory_limit=memory_limit, progress=progress, transpose=transpose)


def _from_scipy(matrix: Any, out: str | os.PathLike, provenance: dict[str, Any],
                source_path: str | None = None, transpose: bool = False, **options) -> Any:
    """``from_scipy``, of a matrix read from the file ``source_path`` (if any), which
    ``out`` may not touch."""
    import scipy.sparse

    if not scipy.sparse.issparse(matrix) or matrix.ndim != 2:
        raise InputError(f"expected a 2-D scipy.sparse matrix, not {type(matrix).__name__}")
    if transpose:  # (of CSR, CSC of the same arrays: converted below as any CSC)
        matrix, provenance = matrix.T, {**provenance, "transposed": True}
    target = _target(out, matrix.shape, matrix.dtype, source_path=source_path,
                     transposed=transpose, **options)
    csr = matrix if matrix.format == "csr" else matrix.tocsr()
    readers = (SlicedReader(csr.indptr, "indptr"), SlicedReader(csr.indices, "indices"),
               SlicedReader(csr.data, "data"))
    return _write_csr(target, readers, provenance)


# What a damaged input file raises as it is read: a gzip or zip stream cut short or
# corrupt (a truncated .mtx.gz, an .npz with a bad CRC).
DAMAGED_FILE_ERRORS = (EOFError, gzip.BadGzipFile, zipfile.BadZipFile, zlib.error)


def _names_damaged_files(converter: Callable[..., Any]) -> Callable[..., Any]:
    """A converter whose input, damaged, is an InputError naming the file, not a traceback
    from the decompressor (the partial output is removed as for any error)."""

    @functools.wraps(converter)
    def converting(path, out, **options):
        try:
            return converter(path, out, **options)
        except DAMAGED_FILE_ERRORS as error:
            raise InputError(f"cannot read {os.fspath(path)!r}: {type(error).__name__}: "
                             f"{error}") from error

    return converting


@_names_damaged_files
def from_npz(path: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
             chunk_nnz: int = DEFAULT_CHUNK_NNZ, memory_limit: int | str = DEFAULT_MEMORY_LIMIT,
             scratch_dir: str | os.PathLike | None = None, overwrite: bool = False,
             progress: bool | None = None, transpose: bool = False) -> Any:
    """Write a scipy.sparse ``.npz`` (``scipy.sparse.save_npz``) to the CSR layout at ``out``.

    CSR arrays are read from the archive front to back, decompressed as they are read; COO
    and CSC entries go through buckets of rows (``scratch_dir``, default the system's temp
    directory) unless they are in row order; BSR and DIA are loaded whole by scipy. Other
    parameters as ``from_mtx``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreNotFoundError(f"no such file: {path!r}")
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path!r} is not an .npz archive") from None
    with archive, ExitStack() as members:
        if any(info.flag_bits & 0x1 for info in archive.infolist()):
            raise InputError(f"{path!r} holds encrypted members, which cannot be read")
        names = {name[:-4] for name in archive.namelist() if name.endswith(".npy")}
        if not {"format", "shape", "data"} <= names:
            raise InputError(f"{path!r} is not a scipy.sparse .npz (it holds {sorted(names)}, "
                             "not format, shape and data)")
        layout = npz_format(_small_array(archive, "format"), path)
        stored = _small_array(archive, "shape").reshape(-1)
        if stored.size != 2:
            raise InputError(f"{path!r} holds a sparse matrix of shape {tuple(stored.tolist())}, "
                             "not 2-D")
        shape = stored_shape(stored.tolist(), repr(path))
        options = dict(dtype=dtype, chunk_nnz=chunk_nnz, overwrite=overwrite,
                       memory_limit=memory_limit, progress=progress)
        provenance = {"input": path, "format": f"scipy.sparse npz ({layout})"}
        if layout not in ("csr", "csc") and not (layout == "coo" and {"row", "col"} <= names):
            # (BSR, DIA, COO of coords: loaded whole by scipy)
            refuse_load(path, f"a scipy.sparse .npz of the {layout} layout",
                        sparse_npz_member_bytes(path), parse_bytes(memory_limit),
                        "save it as CSR, CSC or COO (scipy.sparse's tocsr() or tocoo(), then "
                        "save_npz), which convert reads a piece at a time")
            return _from_scipy(load_npz(path), out, provenance, source_path=path,
                               transpose=transpose, **options)
        if layout in ("csr", "csc") and not {"indptr", "indices"} <= names:
            raise InputError(f"{path!r} is a {layout} .npz without indptr and indices (it "
                             f"holds {sorted(names)})")
        coordinates = ("col", "row") if transpose else ("row", "col")
        layout, shape, provenance = _oriented(layout, shape, provenance, transpose)
        data = members.enter_context(NpyMemberReader(archive, "data", path))
        target = _target(out, shape, data.dtype, scratch_dir=scratch_dir, source_path=path,
                         transposed=transpose, **options)
        if layout == "csr":
            readers = (members.enter_context(NpyMemberReader(archive, "indptr", path)),
                       members.enter_context(NpyMemberReader(archive, "indices", path)), data)
            return _write_csr(target, readers, provenance)
        return _write_coordinates(target, _npz_entries(path, layout, coordinates, shape, target),
                                  data.size, True, provenance)


# A's compressed layout read as A^T's: the same arrays, rows and columns exchanged
TRANSPOSED_LAYOUT = {"csr": "csc", "csc": "csr"}


def _small_array(archive: zipfile.ZipFile, name: str) -> np.ndarray:
    with archive.open(f"{name}.npy") as file:
        try:
            return np.lib.format.read_array(file, allow_pickle=False)
        except ValueError as error:  # an object array, which only unpickling would read
            raise InputError(f"the member {name!r} of {archive.filename!r} cannot be read "
                             f"without unpickling ({error}); save the matrix with "
                             "scipy.sparse.save_npz") from None



def _npz_entries(path: str, layout: str, coordinates: tuple[str, str], shape: tuple[int, int],
                 target: _Target) -> Callable[[], Iterator[EntryChunk]]:
    """Opens the archive afresh on each call, so the entries can be read a second time;
    ``coordinates``: the members of a COO's rows and columns, in that order."""

    def entries() -> Iterator[EntryChunk]:
        with zipfile.ZipFile(path) as archive, ExitStack() as members:
            first, second = ("indptr", "indices") if layout == "csc" else coordinates
            readers = [members.enter_context(NpyMemberReader(archive, name, path))
                       for name in (first, second, "data")]
            chunks = csc_entry_chunks if layout == "csc" else coo_entry_chunks
            yield from chunks(*readers, shape, target.chunk_entries, target.dtype)

    return entries


@_names_damaged_files
def from_mtx(path: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
             chunk_nnz: int = DEFAULT_CHUNK_NNZ, memory_limit: int | str = DEFAULT_MEMORY_LIMIT,
             scratch_dir: str | os.PathLike | None = None, overwrite: bool = False,
             progress: bool | None = None, transpose: bool = False) -> Any:
    """Write a Matrix Market coordinate file (``.mtx``, or gzipped ``.mtx.gz``) to the CSR
    layout at ``out``.

    Parameters
    ----------
    path : a coordinate file with real, integer or pattern values, and general, symmetric or
        skew-symmetric symmetry (the mirrored entries are written out). Complex values and
        the dense ``array`` format are refused, and so is a value with a fraction (or NaN,
        or Inf) in an integer file; one beyond 2**53 there, which float64 may round, is
        warned of.
    out : path of the zarr group to write.
    dtype : {None, 'float32', 'float64'}, default=None
        None: float64 for real files, float32 for integer and pattern files.
    chunk_nnz : int, default=2**20
        Non-zeros per storage chunk of ``indices`` and ``data``.
    memory_limit : int or str, default='1GB'
        Bounds the text parsed at once and the entries sorted at once.
    scratch_dir : str, optional
        Where entries not in row order are bucketed (about 24 bytes per entry); default the
        system's temp directory.
    overwrite : bool, default=False
        Replace an existing ``out`` (else ``OutputExistsError``).
    progress : bool, optional
        Progress bars on stderr, of the rows written and of the entries put into buckets;
        default: when stderr is a terminal.
    transpose : bool, default=False
        Write A^T (n x m) instead: a wide A's SVD is read from a tall A^T, whose U and V
        are A's V and U. A file in column order then takes the one pass.

    Returns
    -------
    zarr.Group, opened read-only.

    Notes
    -----
    Entries in row order (any column order within a row) are written in one pass; the order
    is checked while reading, and the first entry out of order starts a second pass that
    buckets the entries by rows. Symmetric files always take the second way (the mirrored
    entries are out of order). Repeated entries are summed, as ``scipy.io.mmread(path)
    .tocsr()`` does; values are parsed to the nearest float64 as Python's ``float`` does.
    """
    path = os.fspath(path)
    with open_binary(path) as file:
        header = read_header(file, path)
    source = {"real": np.float64, "integer": np.int64}.get(header.field)
    _, shape, provenance = _oriented("coo", header.shape,
                                     {"input": path, "format": header.describe()}, transpose)
    target = _target(out, shape, source, dtype=dtype, chunk_nnz=chunk_nnz,
                     overwrite=overwrite, memory_limit=memory_limit, scratch_dir=scratch_dir,
                     source_path=path, progress=progress, transposed=transpose,
                     integers=header.field == "integer")

    def entries() -> Iterator[EntryChunk]:
        chunks = read_entry_chunks(path, target.text_bytes)
        return _transposed(chunks) if transpose else chunks

    return _write_coordinates(target, entries, header.expanded_entries, header.has_values,
                              provenance, try_row_sorted=header.symmetry == "general")


def _transposed(chunks: Iterator[EntryChunk]) -> Iterator[EntryChunk]:
    """The entries of A^T: each one's row and column exchanged (in an order unknown)."""
    with closing(chunks):
        for chunk in chunks:
            yield EntryChunk(chunk.cols, chunk.rows, chunk.values)


@_names_damaged_files
def from_h5ad(path: str | os.PathLike, out: str | os.PathLike, *, group: str = "X",
              dtype: Any = None, chunk_nnz: int = DEFAULT_CHUNK_NNZ,
              memory_limit: int | str = DEFAULT_MEMORY_LIMIT,
              scratch_dir: str | os.PathLike | None = None, overwrite: bool = False,
              progress: bool | None = None, transpose: bool = False) -> Any:
    """Write a sparse matrix stored in an HDF5 file (AnnData ``.h5ad``) to the CSR layout.

    ``group`` names an HDF5 group in AnnData's sparse layout: datasets ``data``, ``indices``,
    ``indptr`` and attributes ``encoding-type`` (``csr_matrix`` or ``csc_matrix``) and
    ``shape``, or the older ``h5sparse_format`` and ``h5sparse_shape``. CSR is read a block
    of rows at a time; CSC goes through buckets of rows (``scratch_dir``), and with
    ``transpose`` the other way round. Needs h5py (the ``hdf5`` extra). Other parameters as
    ``from_mtx``.
    """
    h5py = _import_h5py()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise StoreNotFoundError(f"no such file: {path!r}")
    try:
        file = h5py.File(path, "r")
    except OSError as error:  # not HDF5, or truncated
        raise InputError(f"cannot open {path!r} as an HDF5 file: {error}") from None
    with file:
        layout, shape = _h5_sparse_group(file, group, path, h5py)
        readers = _sparse_group_readers(file[group], f"{path}:{group}")
        provenance = {"input": path, "format": f"hdf5 {layout} group {group!r}"}
        layout, shape, provenance = _oriented(layout, shape, provenance, transpose)
        target = _target(out, shape, readers[2].dtype, dtype=dtype, chunk_nnz=chunk_nnz,
                         overwrite=overwrite, memory_limit=memory_limit, scratch_dir=scratch_dir,
                         source_path=path, progress=progress, transposed=transpose)
        return _write_sparse_group(readers, layout, shape, target, provenance)


def _oriented(layout: str, shape: tuple[int, int], provenance: dict[str, Any],
              transpose: bool) -> tuple[str, tuple[int, int], dict[str, Any]]:
    """The layout and shape to read a sparse matrix's arrays as, for A or (``transpose``)
    A^T: A's CSR arrays are A^T's CSC, and the other way round (a COO's rows and columns
    are exchanged by its reader)."""
    if not transpose:
        return layout, shape, provenance
    return (TRANSPOSED_LAYOUT.get(layout, layout), shape[::-1],
            {**provenance, "transposed": True})


def from_zarr(path: str | os.PathLike, out: str | os.PathLike, *, dtype: Any = None,
              chunk_nnz: int = DEFAULT_CHUNK_NNZ, memory_limit: int | str = DEFAULT_MEMORY_LIMIT,
              scratch_dir: str | os.PathLike | None = None, overwrite: bool = False,
              progress: bool | None = None, transpose: bool = False) -> Any:
    """Rewrite a sparse zarr group (AnnData's layout, ``csr_matrix`` or ``csc_matrix``,
    zarr format 2 or 3) in the CSR layout: to rechunk a CSR store (``chunk_nnz``: smaller
    storage chunks make smaller blocks, for a lower memory limit), to change its value dtype,
    to put its rows in canonical order once, to turn CSC into CSR, or (``transpose``) to
    write A^T, for the SVD of a wide A. Other parameters as ``from_mtx``; ``out`` may not be
    ``path``, nor inside or around it."""
    from .sources.dense import members_of, open_zarr_node, refuse_unfinished

    path = os.fspath(path)
    group = open_zarr_node(path)
    refuse_unfinished(group, path)
    if not hasattr(group, "array_keys"):
        raise InputError(f"{path!r} is a zarr array, not a sparse group; a dense array is "
                         "read as it is (ooc_svd.svd takes it directly), and its transpose "
                         "written by ooc_svd.dense_transpose.transpose_dense")
    encoding = group.attrs.get("encoding-type")
    layout = {"csr_matrix": "csr", "csc_matrix": "csc"}.get(encoding)
    missing = [name for name in ("data", "indices", "indptr") if name not in group]
    if layout is None or "shape" not in group.attrs or missing:
        wanted = "the sparse group or the dense array in it" if transpose else \
            "the sparse group in it, or (with transpose=True, --transpose) the dense array"
        raise InputError(f"{path!r} is not a sparse matrix group (encoding-type {encoding!r},"
                         f" shape {group.attrs.get('shape')}, missing arrays {missing}) "
                         f"{members_of(group, path, wanted)}")
    shape = stored_shape(group.attrs["shape"], repr(path))
    readers = _sparse_group_readers(group, path)
    provenance = {"input": path, "format": f"zarr v{group.metadata.zarr_format} {layout}"}
    layout, shape, provenance = _oriented(layout, shape, provenance, transpose)
    target = _target(out, shape, readers[2].dtype, dtype=dtype, chunk_nnz=chunk_nnz,
                     overwrite=overwrite, memory_limit=memory_limit, scratch_dir=scratch_dir,
                     source_path=path, progress=progress, transposed=transpose)
    return _write_sparse_group(readers, layout, shape, target, provenance)


def _sparse_group_readers(node: Any, name: str) -> tuple[SlicedReader, ...]:
    """Readers of the ``indptr``, ``indices`` and ``data`` arrays of an AnnData-style sparse
    group (HDF5 or zarr), each refused unless it is a 1-D numeric array."""
    return tuple(SlicedReader(node[array], f"{name}/{array}")
                 for array in ("indptr", "indices", "data"))


def _write_sparse_group(readers: tuple[SlicedReader, ...], layout: str,
                        shape: tuple[int, int], target: _Target,
                        provenance: dict[str, Any]) -> Any:
    """Write an AnnData-style sparse group (``_sparse_group_readers``) to ``target``: CSR a
    block of rows at a time, CSC through buckets of rows."""
    if layout == "csr":
        return _write_csr(target, readers, provenance)

    def entries() -> Iterator[EntryChunk]:
        fresh = [SlicedReader(r.array, r.name) for r in readers]
        return csc_entry_chunks(*fresh, shape, target.chunk_entries, target.dtype)

    return _write_coordinates(target, entries, readers[2].size, True, provenance,
                              try_row_sorted=shape[1] <= 1)


def _import_h5py():
    try:
        import h5py
    except ImportError:
        raise MissingDependencyError(
            "reading HDF5 files needs h5py: pip install 'ooc_svd[hdf5]'"
        ) from None
    return h5py


def _h5_sparse_group(file: Any, group: str, path: str, h5py: Any) -> tuple[str, tuple]:
    """(layout 'csr' or 'csc', shape) of an AnnData-style sparse group."""
    if group not in file:
        raise InputError(f"{path!r} has no {group!r}; its top level holds {sorted(file.keys())}")
    node = file[group]
    if isinstance(node, h5py.Dataset):
        raise InputError(f"{path!r}: {group!r} is a dense dataset {node.shape}; convert reads "
                         "sparse groups (store a dense matrix as zarr or .npy)")
    attributes = node.attrs
    encoding = _text(attributes.get("encoding-type", attributes.get("h5sparse_format", "")))
    layout = {"csr_matrix": "csr", "csc_matrix": "csc", "csr": "csr", "csc": "csc"}.get(encoding)
    shape = attributes.get("shape", attributes.get("h5sparse_shape"))
    if layout is None or shape is None:
        raise InputError(f"{path!r}: {group!r} is not a sparse matrix group (encoding-type "
                         f"{encoding!r}, shape {shape}); expected csr_matrix or csc_matrix")
    missing = [name for name in ("data", "indices", "indptr") if name not in node]
    if missing:
        raise InputError(f"{path!r}: the sparse group {group!r} lacks {missing}")
    listed = np.asarray(shape)  # h5py reads an attribute as a numpy array or scalar
    return layout, stored_shape(listed.tolist() if listed.ndim == 1 else shape,
                                f"{path!r}: {group!r}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_BY_SUFFIX: tuple[tuple[str, Callable[..., Any]], ...] = (
    (".npz", from_npz), (".mtx", from_mtx), (".mtx.gz", from_mtx),
    (".h5ad", from_h5ad), (".h5", from_h5ad), (".hdf5", from_h5ad), (".zarr", from_zarr),
)


def convert(input: Any, out: str | os.PathLike, **options: Any) -> Any:
    """Write ``input`` to the CSR layout at ``out``: a scipy.sparse matrix, a file whose
    name ends in .npz, .mtx, .mtx.gz, .h5ad, .h5 or .hdf5, or a sparse zarr group (a
    directory, whatever its name, or a path ending in .zarr). ``options`` go to the
    converter (``from_scipy``, ``from_npz``, ``from_mtx``, ``from_h5ad``, ``from_zarr``);
    one it does not take is an error. A dense matrix on disk (a zarr array, an .npy, a
    dense .npz) is written only transposed (``transpose=True``), as a dense zarr array
    (``dense_transpose.transpose_dense``). Returns the written group or array, opened
    read-only."""
    import scipy.sparse

    if _is_dense_on_disk(input):
        return _dense_transposed(input, out, **options)
    if scipy.sparse.issparse(input):
        converter = from_scipy
    elif not isinstance(input, (str, os.PathLike)):
        dense = isinstance(input, np.ndarray) or is_torch_tensor(input)
        raise InputError(f"convert takes a scipy.sparse matrix or a file or store path, not "
                         f"{type(input).__name__}" + (" (a dense array needs no conversion: svd "
                                                      "reads numpy and torch arrays)"
                                                      if dense else ""))
    elif os.path.isdir(input):
        converter = from_zarr
    else:
        name = os.fspath(input).lower().rstrip("/")
        converter = next((f for suffix, f in _BY_SUFFIX if name.endswith(suffix)), None)
        if converter is None:
            raise InputError(f"cannot tell the format of {os.fspath(input)!r} from its name: "
                             f"use {', '.join(suffix for suffix, _ in _BY_SUFFIX)}")
    _check_options(converter, options)
    return converter(input, out, **options)


def _check_options(converter: Callable[..., Any], options: dict[str, Any]) -> None:
    taken = inspect.signature(converter).parameters
    unknown = sorted(set(options) - set(taken))
    if unknown:
        raise InputError(f"option {', '.join(unknown)} does not apply to this input "
                         f"({converter.__name__} reads it)")


def _is_dense_on_disk(input: Any) -> bool:
    """Whether ``input`` names a dense matrix on disk: a zarr array, an .npy, or an .npz
    that is not scipy.sparse's."""
    from .sources.dense import open_zarr_node
    from .sources.open import _is_sparse_npz

    if not isinstance(input, (str, os.PathLike)):
        return False
    path = os.fspath(input)
    name = path.lower().rstrip("/")
    if name.endswith(".npy"):
        return True
    if name.endswith(".npz"):
        return os.path.isfile(path) and not _is_sparse_npz(path)
    if "://" in path:  # a store by URL, a zarr array there
        try:
            return not hasattr(open_zarr_node(path), "array_keys")
        except StoreNotFoundError:
            return False
    return os.path.isdir(path) and not hasattr(open_zarr_node(path), "array_keys")


def _dense_transposed(input: str | os.PathLike, out: str | os.PathLike, *,
                      transpose: bool = False, **options: Any) -> Any:
    """A^T of a dense matrix on disk (``transpose_dense``), refused without ``transpose``:
    ooc_svd reads a dense matrix as it is stored."""
    from .dense_transpose import transpose_dense
    from .sources.dense import open_dense_source

    if not transpose:
        # A file that only has the name is refused as what it is. A compressed .npz is
        # known to be dense from its header: a load limit of 0 stops it before its load
        # (but for an empty array, whose load costs nothing).
        with suppress(PlanError):
            open_dense_source(input, load_limit=0)
        raise InputError(f"{os.fspath(input)!r} is a dense matrix, which svd reads as it is; "
                         "convert writes a dense matrix only transposed (--transpose, "
                         "transpose=True), for the SVD of a wide A through A^T")
    _check_options(transpose_dense, options)
    return transpose_dense(input, out, **options)

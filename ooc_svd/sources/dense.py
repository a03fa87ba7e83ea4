"""Dense row-block sources: zarr stores, numpy arrays and .npy files, dask arrays.

A source knows its shape, dtype and the row boundaries of its storage chunks, and reads a row
range spanning all columns. Blocks are always made of whole chunks so no chunk is decoded twice.
Sources never write to their input: zarr stores and .npy files are opened read-only.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError, NonFiniteError, PlanError, ReadError, StoreNotFoundError
from ..store import file_kind
from ..units import format_bytes
from .dtypes import block_dtype


@dataclass
class DenseSource:
    """A dense m x n matrix readable in row ranges.

    Attributes
    ----------
    array : object
        Anything sliceable as ``array[start:stop]`` into an ndarray-like of shape (rows, n).
    chunk_rows : ndarray of int64
        Row offsets of the storage chunk boundaries, from 0 to m inclusive.
    description : str
        What the source is, for messages (a path, "numpy array", ...).
    stored_bytes : int or None
        Bytes on storage (compressed), when known.
    loaded_bytes : int
        Memory that opening the input took: a file loaded whole (a compressed .npz), which
        the run holds beside its working set; 0 for everything read by blocks, and for an
        array the caller holds.
    reads_file : bool
        The array is a memmap of an .npy (or uncompressed .npz) that ooc_svd opened from
        its path, whose rows are read from the file (``rows_from_file``). Not for a memmap
        the caller passes, which may be copy-on-write and edited, or of a removed file.
    """

    array: Any
    chunk_rows: np.ndarray
    description: str
    stored_bytes: int | None = None
    compute_slice: bool = False  # dask: a slice is lazy and must be computed
    decodes: bool = True  # reading costs CPU (decompression), competing with the kernels
    loaded_bytes: int = 0
    reads_file: bool = False

    @property
    def cache_pays(self) -> bool:
        """Whether keeping blocks in memory saves later passes work: decoding a store's
        chunks, or copying an .npy file's rows from the page cache (``rows_from_file``)."""
        return self.decodes or self.reads_file

    @property
    def kind(self) -> str:
        """The input's format, for reports: 'zarr v3', 'zarr v2', 'npy', 'npz', 'numpy', 'dask', or
        what an array made by ooc_svd says it is (``difference.Difference``)."""
        if isinstance(getattr(self.array, "kind", None), str):
            return self.array.kind
        if self.compute_slice:
            return "dask"
        if self.description.lower().endswith(".npz"):
            return "npz"
        if isinstance(self.array, np.memmap) or self.description.lower().endswith(".npy"):
            return "npy"
        if isinstance(self.array, np.ndarray):
            return "numpy"
        return f"zarr v{self.array.metadata.zarr_format}"

    @property
    def chunks(self) -> tuple[int, ...] | None:
        """Storage chunk shape, when the input has one."""
        chunks = getattr(self.array, "chunks", None)
        if chunks is None or self.compute_slice:
            return None
        return tuple(int(c) for c in chunks)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """The dtype as stored."""
        return np.dtype(self.array.dtype)

    @property
    def block_dtype(self) -> np.dtype:
        """The dtype of the blocks ``read`` returns (``dtypes.block_dtype``)."""
        return block_dtype(self.dtype)

    @property
    def read_overhead_bytes(self) -> int:
        """Bytes a read may decode beyond its block of whole chunks: none, except where the
        array says otherwise (``difference.Difference`` of a sparse A)."""
        return int(getattr(self.array, "read_overhead_bytes", 0))

    @property
    def read_row_overhead(self) -> int:
        """Bytes per row a read holds beyond its block and the block's decoding: for a
        dask array, one more copy of the block (its getter copies every chunk it reads);
        else none, except where the array says otherwise (``difference.Difference``)."""
        if self.compute_slice:
            return self.shape[1] * self.block_dtype.itemsize
        return int(getattr(self.array, "read_row_overhead", 0))

    @property
    def read_factor(self) -> float:
        """Bytes read per byte of block: one, except where the array says otherwise
        (``difference.Difference``, whose blocks are read from A and M)."""
        return float(getattr(self.array, "read_factor", 1.0))

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks of one pass."""
        m, n = self.shape
        return m * n * self.block_dtype.itemsize

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as a C-contiguous ndarray of ``block_dtype``."""
        try:
            return np.ascontiguousarray(self._slice(start, stop), dtype=self.block_dtype)
        except (NonFiniteError, ReadError):  # A - M's: they name the rows and the operand
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the rows that failed
            first, last, cause = self._failing_chunk(start, stop, exc)
            raise ReadError(
                f"cannot read the chunk of rows [{first}, {last}) of {self.description}: "
                f"{type(cause).__name__}: {cause}"
            ) from exc

    def _slice(self, start: int, stop: int) -> Any:
        if self.reads_file:
            return rows_from_file(self.array, start, stop)
        block = self.array[start:stop]
        if self.compute_slice:
            # A local run needs no scheduler: each slice is a small graph of whole chunks,
            # computed in the reader thread that asked for it.
            block = block.compute(scheduler="synchronous")
        return block

    def _failing_chunk(self, start: int, stop: int, error: Exception):
        """Narrow a failed block read down to its first unreadable chunk, for the message."""
        edges = chunk_edges(self.chunk_rows, start, stop)
        if len(edges) > 2 and len(edges) <= 1025:
            for first, last in zip(edges[:-1], edges[1:], strict=True):
                try:
                    self._slice(first, last)
                except Exception as exc:  # noqa: BLE001, PERF203 - error path: the one we report
                    return first, last, exc
        return start, stop, error


def chunk_edges(chunk_rows: np.ndarray, start: int, stop: int) -> list[int]:
    """start, the chunk boundaries strictly between start and stop, and stop: the rows
    [start, stop) cut into (parts of) storage chunks."""
    inside = chunk_rows[(chunk_rows > start) & (chunk_rows < stop)]
    return [start, *inside.tolist(), stop]


def regular_boundaries(m: int, rows_per_chunk: int) -> np.ndarray:
    """Chunk boundaries 0, c, 2c, ..., m for a regular row chunking."""
    rows_per_chunk = max(int(rows_per_chunk), 1)
    return np.unique(np.append(np.arange(0, m, rows_per_chunk, dtype=np.int64), m))


def in_memory_boundaries(shape: tuple[int, ...], itemsize: int) -> np.ndarray:
    """Nominal 1 MB chunks for arrays without storage chunks, so blocks can be any size
    without a boundary per row."""
    if not shape:  # refused here, as the rows it would cut do not exist
        raise not_a_matrix("A of shape ()", 0)
    row_bytes = max(int(np.prod(shape[1:])) * itemsize, 1)
    return regular_boundaries(shape[0], max(1, (1 << 20) // row_bytes))


def refuse_masked(value: Any, name: str) -> None:
    """Refuse a numpy masked array: numpy's own conversions read its masked entries as the
    values stored under the mask, silently."""
    if isinstance(value, np.ma.MaskedArray):
        raise InputError(f"{name} is a masked array: its masked entries would be read as the "
                         f"values stored under the mask; fill them first "
                         f"({name}.filled(value)), or pass {name}.data where those values "
                         "are meant")


def open_dense_source(A: Any, load_limit: int | None = None) -> DenseSource:
    """Wrap a supported dense input as a ``DenseSource``.

    Accepts numpy arrays and memmaps, paths of ``.npy`` files, zarr arrays, paths or URLs of
    zarr stores (formats 2 and 3), and dask arrays. ``load_limit``: the run's memory limit,
    which a file loaded whole (a compressed .npz) may not exceed (``refuse_load``).
    """
    if isinstance(A, (str, os.PathLike)):
        return _open_path(os.fspath(A), load_limit)
    refuse_masked(A, "A")
    if isinstance(A, np.ndarray):
        description = "memmap" if isinstance(A, np.memmap) else "numpy array"
        return DenseSource(
            A, in_memory_boundaries(A.shape, A.itemsize), description, decodes=False
        )
    module = type(A).__module__
    if module.startswith("zarr"):
        return zarr_array_source(A, getattr(A, "store_path", "zarr array"))
    if module.startswith("dask"):
        return _dask_source(A)
    if hasattr(A, "__array__") and hasattr(A, "shape"):
        array = _torch_array(A) if is_torch_tensor(A) else np.asarray(A)
        return DenseSource(
            array, in_memory_boundaries(array.shape, array.itemsize), type(A).__name__,
            decodes=False,
        )
    raise InputError(
        f"unsupported input of type {type(A).__name__}; expected a numpy array, a .npy path, "
        "a zarr array or store path/URL, or a dask array"
    )


def is_torch_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor, of a subclass too. A tensor's module is loaded
    already, so torch is never imported here."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _torch_array(tensor: Any) -> np.ndarray:
    """A torch tensor's values as numpy: without its autograd graph (numpy() refuses a
    tensor that requires grad), in host memory, with its lazy negation or conjugation
    applied (numpy() refuses those too), bfloat16 (which numpy lacks) as float32."""
    tensor = tensor.detach().cpu().resolve_conj().resolve_neg()
    if str(tensor.dtype) == "torch.bfloat16":
        tensor = tensor.float()
    try:
        return tensor.numpy()
    except TypeError as exc:  # a dtype numpy lacks: float8, complex32, ...
        remedy = "pass real data" if tensor.is_complex() else \
            "convert it first (e.g. tensor.float())"
        raise InputError(f"a torch tensor of {tensor.dtype} has no numpy dtype to be read "
                         f"as; {remedy}") from exc


def _has_npy_header(path: str) -> bool:
    """Whether the file starts as every .npy file does (numpy reads anything else as a
    pickle, and then reports pickled data)."""
    try:
        with open(path, "rb") as file:
            return file.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
    except OSError:
        return False


def _unreadable_file(path: str) -> str:
    """Why a file that is no .npy or .npz is not read, and what to do with it: those
    ``ooc-svd convert`` (``ooc_svd.convert``) writes as CSR stores are named."""
    kind = file_kind(path)
    if kind is not None:
        return (f"{path!r} is {kind}, which is read through a CSR store: convert it first "
                f"(ooc-svd convert {path} OUT.zarr, or ooc_svd.convert)")
    return (f"{path!r} is a file that is neither .npy nor .npz: A is a zarr store (a "
            "directory), a .npy or .npz file, or an array in memory; ooc-svd convert writes "
            "Matrix Market and HDF5 sparse matrices as CSR stores")


def _open_path(path: str, load_limit: int | None) -> DenseSource:
    is_url = "://" in path
    if not is_url and not os.path.exists(path):
        raise StoreNotFoundError(f"no such file or store: {path!r}")
    if path.lower().endswith(".npz"):
        return _open_npz(path, load_limit)
    if path.lower().endswith(".npy"):
        if not _has_npy_header(path):
            raise StoreNotFoundError(f"{path!r} is not a .npy file (it lacks the NumPy header)")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise StoreNotFoundError(f"cannot open {path!r} as a .npy file: {exc}") from exc
        return DenseSource(array, in_memory_boundaries(array.shape, array.itemsize), path,
                           stored_bytes=os.path.getsize(path), decodes=False,
                           reads_file=read_from_file(array))
    if not is_url and os.path.isfile(path):  # zarr stores are directories
        raise StoreNotFoundError(_unreadable_file(path))
    import zarr

    node = open_zarr_node(path)
    if not isinstance(node, zarr.Array):
        raise InputError(f"{path!r} is a zarr group, not an array "
                         f"{members_of(node, path, 'the array')}")
    return zarr_array_source(node, path)


def members_of(group: Any, path: str, wanted: str) -> str:
    """The end of a refusal of the zarr group at ``path``, which names what it holds and
    asks for the path of ``wanted`` in it: for example a 2-D array's, or a group's that
    holds an indptr (a sparse matrix), else the first member's."""
    arrays, groups = sorted(group.array_keys()), sorted(group.group_keys())
    matrices = [name for name in arrays if len(group[name].shape) == 2] + \
        [name for name in groups if "indptr" in group[name]]
    first = (matrices or arrays + groups)[:1]
    example = f"{path.rstrip('/')}/{first[0]}" if first else "store.zarr/X"
    return (f"(its arrays: {arrays}; its groups: {groups}); pass the path of {wanted}, "
            f"e.g. {example}")


def read_from_file(array: Any) -> bool:
    """Whether ``rows_from_file`` can read ``array``'s rows from its file: a read-only,
    C-ordered 2-D memmap that maps the file itself (not a view of another memmap)."""
    return isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and \
        array.mode == "r" and array.flags.c_contiguous and array.ndim == 2 and \
        array.filename is not None


def fortran_file(array: Any) -> bool:
    """Whether ``block_from_file`` can read ``array``'s values from its file: a read-only,
    Fortran-ordered (and not also C-ordered) 2-D memmap that maps the file itself."""
    return isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and \
        array.mode == "r" and array.flags.f_contiguous and not array.flags.c_contiguous and \
        array.ndim == 2 and array.filename is not None


def block_from_file(array: np.memmap, start: int, stop: int, first: int,
                    last: int) -> np.ndarray:
    """A[start:stop, first:last] of a memmap that ``read_from_file`` or ``fortran_file``
    accepts, read from its file into a new array of the file's order: one read where the
    block is one run of the file (whole rows of a C-ordered file, whole columns of a
    Fortran-ordered one), else one read per row (per column).

    A slice of the memmap would be read through the mapping, whose pages stay mapped, so
    the process's RSS grew to the whole file (2.1 GB for a 2 GB .npy at a 300 MB limit):
    clean pages that the kernel may take back, but that RSS limits count. Read this way,
    the file's pages stay in the page cache, outside the process."""
    fortran = fortran_file(array)
    values = np.empty((stop - start, last - first), dtype=array.dtype,
                      order="F" if fortran else "C")
    # The block in the file's order: runs (its rows, or columns) of values side by side
    runs = values.T if fortran else values
    (run_first, run_last), (within, whole) = ((first, last), (start, array.shape[0])) \
        if fortran else ((start, stop), (first, array.shape[1]))
    run_bytes = array.strides[1] if fortran else array.strides[0]
    offset = array.offset + within * array.itemsize
    with open(array.filename, "rb", buffering=0) as file:
        if runs.shape[1] == whole:
            _read_into(file, offset + run_first * run_bytes, runs.reshape(-1), array.filename)
        else:
            for run in range(run_first, run_last):
                _read_into(file, offset + run * run_bytes, runs[run - run_first],
                           array.filename)
    return values


def _read_into(file: Any, offset: int, values: np.ndarray, name: str) -> None:
    """Fill the contiguous 1-D ``values`` with the file's bytes from ``offset`` on."""
    view = memoryview(values.view(np.uint8))
    file.seek(offset)
    done = 0
    while done < view.nbytes:
        read = file.readinto(view[done:])
        if not read:
            raise OSError(f"{name!r} ended before the matrix did")
        done += read


def rows_from_file(array: np.memmap, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a memmap that ``read_from_file`` accepts, read from its file
    (not through its mapping: see ``block_from_file``)."""
    return block_from_file(array, start, stop, 0, array.shape[1])


def open_zarr_node(path: str) -> Any:
    """The zarr array or group at a path or URL, read-only; StoreNotFoundError otherwise."""
    import zarr

    try:
        return zarr.open(store=path, mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises several types for unreadable stores
        raise StoreNotFoundError(
            f"cannot open {path!r} as a zarr store: {type(exc).__name__}: {exc}"
        ) from exc


def _open_npz(path: str, load_limit: int | None) -> DenseSource:
    """A .npz holding one dense array: mapped where ``np.savez`` stored it uncompressed
    (and read by rows, as an .npy), loaded into memory where ``np.savez_compressed``
    compressed it, unless its header says it exceeds ``load_limit``. (scipy.sparse .npz
    files are opened by ``open_source``.)"""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StoreNotFoundError(f"cannot open {path!r} as a .npz file: {exc}") from exc
    with archive:
        names = list(archive.files)
        if len(names) != 1:
            raise InputError(f"{path!r} holds {len(names)} arrays ({names}); one is needed")
        array = _stored_member(path, archive.zip, names[0])
        loaded = 0
        if array is None:
            refuse_load(path, "a compressed .npz", [npz_member_bytes(archive.zip, names[0])],
                        load_limit, LOADED_HINT["dense"])
            array = _loaded_member(archive, names[0], path)
            loaded = array.nbytes
    return DenseSource(array, in_memory_boundaries(array.shape, array.itemsize), path,
                       stored_bytes=os.path.getsize(path), decodes=False, loaded_bytes=loaded,
                       reads_file=read_from_file(array))


# How an input file that a run loads whole would be read by blocks instead
LOADED_HINT = {
    "dense": "save the array uncompressed (np.save, or np.savez), which is read by blocks",
    "sparse": "convert the .npz to a CSR store (ooc-svd convert), which is read by blocks",
}


def refuse_load(path: str, what: str, member_bytes: list[int | None], load_limit: int | None,
                hint: str) -> None:
    """PlanError where the arrays of a file that would be loaded whole (their sizes from
    their headers, None where unknown) exceed ``load_limit`` by themselves: refused before
    they are loaded, where the plan, which counts them beside the working set, would refuse
    them only after."""
    known = [size for size in member_bytes if size is not None]
    if load_limit is None or not known or sum(known) <= load_limit:
        return
    total = sum(known)
    taken, limit = format_bytes(total, round_up=True), format_bytes(load_limit)
    if taken == limit:  # too close to tell apart in three digits
        taken, limit = f"{total:,} bytes", f"{load_limit:,} bytes"
    raise PlanError(f"{path!r} is {what}, which is loaded whole, and its arrays alone take "
                    f"{taken}, more than memory_limit {limit}: {hint}", total)


def npz_member_bytes(archive: Any, name: str) -> int | None:
    """The bytes of the array ``name`` of an .npz (a ``zipfile.ZipFile``), from its .npy
    header, which is all that is decompressed; None if the header cannot be read (loading
    the member then says what is wrong)."""
    header = npz_member_header(archive, name, sizes_only=True)
    if header is None:
        return None
    shape, dtype = header
    return math.prod(shape) * dtype.itemsize


def npz_member_header(archive: Any, name: str, sizes_only: bool = False
                      ) -> tuple[tuple[int, ...], np.dtype] | None:
    """(shape, dtype) of the array ``name`` of an .npz (a ``zipfile.ZipFile``) from its
    .npy header alone (``_npy_header``); None where the header cannot be read."""
    try:
        with archive.open(_member(archive, name)) as member:
            header = _npy_header(member, sizes_only)
    except Exception:  # noqa: BLE001 - reported by the load that would follow
        return None
    if header is None:
        return None
    shape, _, dtype = header
    return shape, dtype


def compressed_npz_summary(path: str) -> dict | None:
    """The format, shape, dtype and bytes (raw, as ``DenseSource.nbytes``, and stored) of
    the one array of an .npz that opening would load whole (compressed or encrypted:
    ``_open_npz``), from its header; None for one that opening maps, or that its header
    does not describe as a usable matrix (opening says why)."""
    with np.load(path, allow_pickle=False) as archive:
        names = list(archive.files)
        if len(names) != 1 or _stored_member(path, archive.zip, names[0]) is not None:
            return None
        header = npz_member_header(archive.zip, names[0])
    # Not a real numeric matrix with rows and columns: opening says why
    if header is None or len(header[0]) != 2 or header[1].kind not in "biuf" or \
            0 in header[0]:
        return None
    shape, dtype = header
    return {"format": "npz", "shape": list(shape), "dtype": str(dtype), "chunks": None,
            "nnz": None, "bytes_raw": math.prod(shape) * block_dtype(dtype).itemsize,
            "bytes_stored": os.path.getsize(path)}


def _member(archive: Any, name: str) -> str:
    """The zip member of the array ``name`` of an .npz: ``name.npy``, or ``name`` as numpy
    also reads it."""
    return f"{name}.npy" if f"{name}.npy" in archive.namelist() else name


def _npy_header(file: Any, sizes_only: bool = False
                ) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    """(shape, fortran_order, dtype) of the .npy that ``file`` is at the start of; None for
    a format version without a public reader (3.0, of utf-8 field names), unless only the
    sizes are wanted: 3.0's header is 2.0's in utf-8, which read as 2.0's latin-1 can change
    a field's name, never its size."""
    version = np.lib.format.read_magic(file)
    if version == (3, 0) and sizes_only:
        version = (2, 0)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    return None if read_header is None else read_header(file)


def _loaded_member(archive: Any, name: str, path: str) -> np.ndarray:
    """The array ``name`` of an .npz (numpy's ``NpzFile``), read whole; InputError naming
    the file where numpy cannot read it (an object array, a damaged or encrypted member,
    data shorter than its header says)."""
    try:
        return archive[name]
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - zlib, zipfile, numpy's parsers: many types
        raise InputError(f"cannot read the array {name!r} of {path!r}: "
                         f"{type(exc).__name__}: {exc}") from exc


def _stored_member(path: str, archive: Any, name: str) -> np.memmap | None:
    """The array ``name`` of an .npz (``_member``), mapped, where it is stored uncompressed
    and unencrypted; else None (it is then read whole)."""
    import zipfile

    info = archive.getinfo(_member(archive, name))
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    try:
        return _mapped_member(path, info)
    except ValueError:  # not what numpy writes: read whole, numpy says what is wrong
        return None


def _mapped_member(path: str, info: Any) -> np.memmap | None:
    """The stored member ``info`` of the zip file ``path`` (an .npy's bytes), mapped."""
    with open(path, "rb") as file:
        # The member's data follows its local header: 30 bytes, its name and extra field.
        file.seek(info.header_offset + 26)
        name_length, extra_length = np.frombuffer(file.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(name_length) + int(extra_length)
        file.seek(start)
        header = _npy_header(file)
        if header is None:
            return None
        shape, fortran_order, dtype = header
        if dtype.hasobject:
            return None
        offset = file.tell()
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape,
                     order="F" if fortran_order else "C")


def not_a_matrix(what: str, ndim: int) -> InputError:
    """The refusal of an input of ``ndim`` != 2 dimensions; beyond two, it says where
    stacks of matrices are taken."""
    hint = (" (svd_lowrank and pca_lowrank, as torch's, factor each matrix of a stack held "
            "as a numpy, torch or dask array; dask.array.from_zarr reads a zarr stack lazily)"
            if ndim > 2 else "")
    return InputError(f"{what} has {ndim} dimensions; a matrix needs 2{hint}")


# The command that writes each kind of output that ooc_svd marks unfinished while it does
WRITTEN_BY = {"converted": "ooc-svd convert", "synthetic": "ooc-svd generate",
              "result": "ooc-svd run"}


def refuse_unfinished(node: Any, description: str) -> None:
    """Refuse a zarr array or group that an ooc_svd command was writing when it stopped (a
    ``PATH.partial`` it marked unfinished): the chunks it had not written read as zeros."""
    from ..store import UNFINISHED

    if UNFINISHED in node.attrs:
        command = WRITTEN_BY.get(node.attrs[UNFINISHED], "the ooc_svd command")
        raise InputError(f"{description} is unfinished: {command} stopped while it wrote it, "
                         "and the chunks it had not written would read as zeros; run "
                         f"{command} again (it replaces what is left)")


def zarr_array_source(array: Any, description: str) -> DenseSource:
    refuse_unfinished(array, str(description))
    if array.ndim != 2:
        raise not_a_matrix(description, array.ndim)
    try:
        stored = int(array.nbytes_stored())
    except Exception:  # noqa: BLE001 - optional information, not every store can tell
        stored = None
    boundaries = regular_boundaries(array.shape[0], array.chunks[0])
    return DenseSource(array, boundaries, str(description), stored_bytes=stored)


def _dask_source(array: Any) -> DenseSource:
    if any(np.isnan(c) for c in array.chunks[0]):  # also a stack's: first
        raise InputError("dask array has unknown chunk sizes; call compute_chunk_sizes() first")
    if array.ndim != 2:
        raise not_a_matrix("dask array", array.ndim)
    meta = getattr(array, "_meta", None)  # the type of its chunks
    if meta is not None and not isinstance(meta, np.ndarray):
        raise InputError(
            f"a dask array of {type(meta).__module__}.{type(meta).__name__} chunks is not "
            "supported (a dask array's blocks are read as numpy arrays); pass a "
            "scipy.sparse matrix itself, or convert the matrix to a CSR store (ooc-svd "
            "convert) for out-of-core runs"
        )
    boundaries = np.concatenate([[0], np.cumsum(array.chunks[0])]).astype(np.int64)
    return DenseSource(array, boundaries, "dask array", compute_slice=True)

"""Open any supported input as a row-block source: dense or sparse, on disk or in memory."""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Any

import numpy as np

from ..errors import NPZ_READ_ERRORS, InputError, StoreNotFoundError
from .csr import CSRSource, csr_source_from_scipy, is_csr_group, open_csr_group
from .dense import (
    LOADED_HINT,
    DenseSource,
    _torch_array,
    compressed_npz_summary,
    is_torch_tensor,
    members_of,
    npz_member_bytes,
    npz_member_header,
    open_dense_source,
    open_zarr_node,
    refuse_load,
    refuse_unfinished,
    zarr_array_source,
)
from .dtypes import block_dtype


def open_source(A: Any, load_limit: int | None = None) -> DenseSource | CSRSource:
    """A source for A: scipy.sparse matrices, torch sparse tensors and CSR zarr groups
    (paths, URLs or opened groups) and scipy.sparse .npz files give a ``CSRSource``;
    everything else is dense. ``load_limit``: the run's memory limit, which a file loaded
    whole (an .npz that is sparse or compressed) may not exceed by itself (``refuse_load``).
    """
    import scipy.sparse

    if isinstance(A, (DenseSource, CSRSource)):  # opened already
        return A
    if is_torch_sparse(A):
        return csr_source_from_scipy(torch_sparse_to_scipy(A), "torch sparse tensor")
    if scipy.sparse.issparse(A):
        if A.ndim != 2:
            raise InputError(f"A must be 2-dimensional, got shape {A.shape}")
        return csr_source_from_scipy(A)
    if type(A).__module__.startswith("zarr") and hasattr(A, "array_keys"):
        return _open_group(A, getattr(A, "store_path", "zarr group"))
    if isinstance(A, (str, os.PathLike)):
        path = os.fspath(A)
        if "://" not in path and not os.path.isabs(path):
            # What the workers of a cluster can name. Not normalized: 'link/..' is where
            # the link's target lies, as the filesystem resolves it
            path = A = os.path.join(os.getcwd(), path)
        if path.lower().endswith(".npz") and os.path.exists(path) and _is_sparse_npz(path):
            # An .npz member cannot be read in row ranges: the matrix is loaded once.
            # ``ooc-svd convert`` writes it as a CSR store for out-of-core runs.
            refuse_load(path, "a scipy.sparse .npz", sparse_npz_member_bytes(path), load_limit,
                        LOADED_HINT["sparse"])
            source = csr_source_from_scipy(load_npz(path), path)
            loaded = sum(part.nbytes for part in (source.data, source.indices, source.indptr))
            return replace(source, loaded_bytes=loaded, stored_bytes=os.path.getsize(path))
        node = _zarr_node_at(path)
        if node is not None:
            return _open_group(node, path) if hasattr(node, "array_keys") else \
                zarr_array_source(node, path)
    return open_dense_source(A, load_limit)


def is_torch_sparse(A: Any) -> bool:
    """Whether A is a torch tensor of a sparse layout (COO, CSR, CSC, ...)."""
    return is_torch_tensor(A) and \
        str(getattr(A, "layout", "torch.strided")) != "torch.strided"


def torch_sparse_to_scipy(tensor: Any) -> Any:
    """A 2-D torch sparse tensor (COO, CSR or CSC) as a scipy.sparse CSR matrix in host
    memory, its values as ``_torch_array`` gives them (bfloat16 as float32)."""
    import scipy.sparse

    layout, shape = str(tensor.layout), tuple(int(s) for s in tensor.shape)
    if len(shape) != 2:
        raise InputError(f"A must be 2-dimensional, got a sparse tensor of shape {shape}")
    tensor = tensor.detach().cpu()
    if layout == "torch.sparse_coo":
        tensor = tensor.coalesce()
        values = _sparse_values(tensor)  # first: a hybrid tensor has one row of indices
        rows, columns = _torch_array(tensor.indices())
        return scipy.sparse.csr_matrix((values, (rows, columns)), shape=shape)
    if layout == "torch.sparse_csr":
        return scipy.sparse.csr_matrix((_sparse_values(tensor), _torch_array(tensor.col_indices()),
                                        _torch_array(tensor.crow_indices())), shape=shape)
    if layout == "torch.sparse_csc":
        return scipy.sparse.csc_matrix((_sparse_values(tensor), _torch_array(tensor.row_indices()),
                                        _torch_array(tensor.ccol_indices())), shape=shape).tocsr()
    raise InputError(f"torch sparse tensors of layout {layout} are not supported: "
                     "convert to CSR first (tensor.to_sparse_csr())")


def _sparse_values(tensor: Any) -> np.ndarray:
    """A torch sparse tensor's values, float16 as float32 (which scipy.sparse needs)."""
    values = _torch_array(tensor.values())
    if values.ndim != 1:
        raise InputError("a hybrid torch sparse tensor (values with dense dimensions) is "
                         "not a matrix of numbers")
    return values.astype(np.float32) if values.dtype == np.float16 else values


def _open_group(group: Any, description: str) -> CSRSource:
    refuse_unfinished(group, str(description))
    if is_csr_group(group):
        return open_csr_group(group, description)
    encoding = group.attrs.get("encoding-type")
    if encoding == "csc_matrix":
        raise InputError(
            f"{description} is a CSC matrix; ooc_svd streams rows: write it as CSR "
            "(ooc-svd convert), or pass its transpose stored as CSR and swap U and V"
        )
    if "ooc_svd" in group.attrs:
        raise InputError(f"{description} is an ooc_svd result, not a matrix to factor "
                         "(ooc-svd info without --k describes it)")
    raise InputError(f"{description} is a zarr group, not an array or a CSR matrix "
                     f"{members_of(group, str(description), 'the array or CSR group')}")


def _zarr_node_at(path: str) -> Any:
    """The zarr array or group at a directory or URL (opened once), or None for other paths
    (files such as .npy, which the dense opener handles)."""
    if "://" not in path and not os.path.isdir(path):
        return None
    return open_zarr_node(path)


def sparse_npz_member_bytes(path: str) -> list[int | None]:
    """The bytes of the arrays of a scipy.sparse .npz (its values and indices), from their
    headers (``refuse_load``'s ``member_bytes``)."""
    with np.load(path, allow_pickle=False) as archive:
        return [npz_member_bytes(archive.zip, name) for name in archive.files
                if name not in ("format", "shape")]


def loaded_npz_summary(path: str) -> dict | None:
    """What ``ooc-svd info`` reports of an input file that opening loads whole (a
    scipy.sparse .npz, a compressed dense one), from the headers of its arrays, so that
    describing it loads nothing: its format, shape, dtype, chunks (None), nnz (the stored
    entries) and bytes, raw (as a run holds them) and stored. The headers are checked, not
    the data (as info reads no chunk of a zarr store). None for any other input, for a
    sparse format other than CSR, CSC and COO, and for a file whose headers do not describe
    a usable matrix (opening it says what is wrong)."""
    if not path.lower().endswith(".npz") or not os.path.isfile(path):
        return None
    try:
        if _is_sparse_npz(path):
            return _sparse_npz_summary(path)
        return compressed_npz_summary(path)
    except (*NPZ_READ_ERRORS, InputError, StoreNotFoundError, KeyError):
        return None


# The index arrays of each format a summary is made for, and the length of the pointers
# (indptr) it has, from the shape (m, n): None for COO, whose rows and columns are as long
# as its values
SUMMARIZED_FORMATS = {
    "csr": (("indices", "indptr"), lambda m, n: m + 1),
    "csc": (("indices", "indptr"), lambda m, n: n + 1),
    "coo": (("row", "col"), None),
}


def _sparse_npz_summary(path: str) -> dict | None:
    """``loaded_npz_summary`` of a scipy.sparse .npz of CSR, CSC or COO whose headers agree
    with its shape: its values' header gives the dtype and the stored entries; the bytes
    are those of the CSR matrix a run holds of them (values, indices and an indptr entry
    per row, as ``CSRSource.nbytes``; scipy loads indices as int32 where they fit)."""
    with np.load(path, allow_pickle=False) as archive:
        layout = npz_format(archive["format"], path)
        if layout not in SUMMARIZED_FORMATS:
            return None
        shape = tuple(int(size) for size in np.ravel(archive["shape"]))
        names, pointers = SUMMARIZED_FORMATS[layout]
        data = npz_member_header(archive.zip, "data")
        indices = [npz_member_header(archive.zip, name) for name in names]
    if data is None or None in indices or len(shape) != 2 or min(shape) < 0 or \
            len(data[0]) != 1:
        return None
    entries = data[0][0]
    lengths = [header[0] for header in indices]
    expected = [(entries,), (entries,)] if pointers is None else \
        [(entries,), (pointers(*shape),)]
    if lengths != expected:  # a damaged file: loading it says what is wrong
        return None
    values = block_dtype(data[1])
    if values.kind not in "biuf" or 0 in shape:  # refused by the opening that follows
        return None
    index_bytes = 4 if max(*shape, entries) < 2**31 else 8
    return {"format": "scipy.sparse", "shape": list(shape), "dtype": str(values),
            "chunks": None, "nnz": entries,
            "bytes_raw": entries * (values.itemsize + index_bytes) + 8 * shape[0],
            "bytes_stored": os.path.getsize(path)}


def _is_sparse_npz(path: str) -> bool:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {"format", "shape", "data"} <= set(archive.files)
    except NPZ_READ_ERRORS as exc:
        raise StoreNotFoundError(f"cannot open {path!r} as a .npz file: "
                                 f"{exc or type(exc).__name__}") from exc


# The formats scipy.sparse.save_npz writes (and load_npz reads)
NPZ_FORMATS = ("csr", "csc", "coo", "bsr", "dia")


def npz_format(stored: np.ndarray, path: str) -> str:
    """The ``format`` member of a scipy.sparse .npz: one of NPZ_FORMATS, else InputError."""
    layout = stored.item() if stored.size == 1 and stored.dtype.kind in "SU" else None
    layout = layout.decode("ascii", "replace") if isinstance(layout, bytes) else layout
    if layout not in NPZ_FORMATS:
        raise InputError(f"{path!r} is not a scipy.sparse .npz: its format member "
                         f"{stored.tolist()!r} is not one of {', '.join(NPZ_FORMATS)}")
    return layout


def load_npz(path: str) -> Any:
    """scipy.sparse.load_npz, with a malformed archive's error naming the file."""
    import scipy.sparse

    try:
        with np.load(path, allow_pickle=False) as archive:  # scipy fails on a format it
            npz_format(archive["format"], path)             # does not write
        matrix = scipy.sparse.load_npz(path)
    except InputError:
        raise
    except (*NPZ_READ_ERRORS, KeyError) as exc:
        raise InputError(f"cannot read {path!r} as a scipy.sparse .npz: "
                         f"{exc or type(exc).__name__}") from exc
    if matrix.ndim != 2:
        raise InputError(f"{path!r} holds a sparse matrix of shape {matrix.shape}, not 2-D")
    return matrix

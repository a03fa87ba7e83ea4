"""The local files a source reads, and a digest of their state.

A run's output may not touch its inputs (``local_paths``); a checkpoint records the state of
the files it was made from (``files_state``), so that resuming after the input changed is
refused rather than mixing passes over two matrices; a cluster checks that its workers see
those files as the client does (``path_marker``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np

from ..store import local_path
from .csr import CSRSource
from .dense import DenseSource
from .difference import Difference


def local_paths(source: DenseSource | CSRSource) -> tuple[str, ...]:
    """The local paths a run reads, where its inputs were given by path (A's, and M's of
    A - M); () for data in memory or on a remote store."""
    array = getattr(source, "array", None)
    if isinstance(array, Difference):
        return local_paths(array.minuend) + local_paths(array.subtrahend)
    path = local_path(source.description) if isinstance(source.description, str) else None
    if path is not None and os.path.exists(path):
        return (path,)
    if isinstance(source, CSRSource):  # a CSR group's arrays lie inside it: the group
        path = _zarr_array_path(source.data)
        return () if path is None else (os.path.dirname(path),)
    # A zarr array opened by the caller, or those a dask array reads (da.from_zarr)
    nodes = _zarr_arrays_in_graph(array) if source.compute_slice else [array]
    return tuple(filter(None, map(_zarr_array_path, nodes)))


def reads_remote_store(source: DenseSource | CSRSource) -> bool:
    """Whether the source reads a zarr store that is not a local directory (a URL, or a
    store object), which a cluster's workers open where it lies: ``local_paths`` cannot
    check that they see it. A dask array's graph is its own: not looked into."""
    array = getattr(source, "array", None)
    if isinstance(array, Difference):
        return reads_remote_store(array.minuend) or reads_remote_store(array.subtrahend)
    if isinstance(source, CSRSource):
        array = source.data
    elif source.compute_slice:
        return False
    return type(array).__module__.startswith("zarr") and _zarr_array_path(array) is None


def files_state(paths: tuple[str, ...]) -> dict[str, str]:
    """For each path (a file, or a directory such as a zarr store), its absolute path and a
    digest of the names, sizes and modification times of its files: rewriting any chunk,
    even with data of the same shape, changes it."""
    return {os.path.realpath(path): _digest(path) for path in paths}


def path_marker(path: str) -> str | None:
    """What tells the files at ``path`` from others of that name, cheaply (a cluster's
    workers compare it with the client's): the size and modification time of a file, or of
    each file directly in a directory (a zarr store's metadata), with the directory's entry
    names and the number of files under it, listed but not opened or stat'ed: a copy that
    lacks chunk files (an interrupted rsync, a network filesystem's stale listing) would read
    them as zeros. None when nothing is there."""
    if not os.path.exists(path):
        return None
    if not os.path.isdir(path):
        return _digest(path)
    names = sorted(os.listdir(path))
    digest = hashlib.sha256("\0".join(names).encode(errors="surrogateescape"))
    for name in names:
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(_digest(full).encode())
    files = sum(len(files) for _, _, files in os.walk(path))
    digest.update(f"\0{files} files".encode())
    return digest.hexdigest()


def _digest(path: str) -> str:
    digest = hashlib.sha256()
    for name, size, mtime in _files(path):
        digest.update(f"{name}\0{size}\0{mtime}\n".encode(errors="surrogateescape"))
    return digest.hexdigest()


def _files(path: str):
    """(name relative to path, size, mtime in ns) of path itself if a file, else of every
    file under it, in a fixed order; (name, -1, -1) for an entry that cannot be stat'ed (a
    dangling link, a file removed meanwhile)."""
    if not os.path.isdir(path):
        yield ("", *_size_and_time(path))
        return
    for root, directories, files in os.walk(path):
        directories.sort()
        for name in sorted(files):
            full = os.path.join(root, name)
            yield (os.path.relpath(full, path), *_size_and_time(full))


def _size_and_time(path: str) -> tuple[int, int]:
    try:
        status = os.stat(path)
    except OSError:
        return -1, -1
    return status.st_size, status.st_mtime_ns


# The metadata documents of zarr formats 2 and 3: every other file in an array's directory
# holds a chunk.
ZARR_METADATA_FILES = {"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"}


def stored_chunk_files(array: Any) -> int | None:
    """How many chunk files (a sharded array's: shard files) a zarr array on a local store
    holds (its directory's files but the metadata), or None for another store. Counted by
    name, as os.walk lists them: zarr's nchunks_initialized asks the store for each chunk
    in turn (70 s for 100,000 chunks on a local disk)."""
    path = _zarr_array_path(array)
    if path is None or not os.path.isdir(path):
        return None
    return sum(sum(name not in ZARR_METADATA_FILES for name in files)
               for _, _, files in os.walk(path))


def _zarr_array_path(node: Any) -> str | None:
    """The local path of a zarr array, None if it is not one or not on a local store."""
    root = _local_store_root(getattr(node, "store", None))
    if root is None:
        return None
    return os.path.normpath(os.path.join(root, getattr(node, "path", "")))


def _zarr_arrays_in_graph(array: Any) -> list[Any]:
    """The zarr arrays a dask array reads, wherever its graph holds them: as a graph value
    (``from_zarr``, ``from_array``) or as an argument of its tasks (``inline_array=True``,
    ``dask.optimize``). The graph is expanded: one walk over its tasks."""
    found, seen = [], set()
    pending = list(dict(array.__dask_graph__()).values())
    while pending:
        item = pending.pop()
        if id(item) in seen or isinstance(item, (str, bytes, np.ndarray)):
            continue
        seen.add(id(item))
        if hasattr(item, "store") and hasattr(item, "path"):  # a zarr array
            found.append(item)
        elif isinstance(item, (tuple, list)):
            pending.extend(item)
        elif isinstance(item, dict):
            pending.extend(item.values())
        else:  # a task's arguments, or the value of a data node
            pending.extend(getattr(item, name) for name in ("args", "kwargs", "value")
                           if hasattr(item, name))
    return found


def _local_store_root(store: Any) -> str | None:
    """The directory of a zarr store on the local filesystem (a LocalStore, or an
    FsspecStore over the local filesystem, as a ``file://`` URL opens), else None."""
    root = getattr(store, "root", None)
    if root is not None:
        return os.fspath(root)
    protocol = getattr(getattr(store, "fs", None), "protocol", ())
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if "file" in protocols or "local" in protocols:
        return os.fspath(store.path)
    return None

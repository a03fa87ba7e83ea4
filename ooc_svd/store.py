"""Storage for a run: the scratch spill of the Q factors and the output zarr group.

The output group is written under a temporary name beside the requested one and renamed when
complete, so a failed run never leaves a half result under the requested name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np

from .errors import InputError, OutputExistsError


class QSpill:
    """Per-block TSQR factors written to scratch files and read back once by the U sweep:
    Q_i (b_i x l) and the merge factors T_i, S_i (l x l), so memory does not grow with m.

    Plain file I/O, not a memory map, so spilled pages are not counted in the process's RSS.
    With ``in_memory`` (the plan found room for all of it under the memory limit) the factors
    stay in memory instead, sparing a write and a read of m x l float64.
    """

    def __init__(self, scratch_dir: str | None = None, in_memory: bool = False):
        self.kept: dict[tuple[str, int], np.ndarray] | None = {} if in_memory else None
        self.directory = None if in_memory else tempfile.mkdtemp(
            prefix="ooc-svd-spill-", dir=scratch_dir
        )

    def _path(self, name: str, index: int) -> str:
        return os.path.join(self.directory, f"{name}{index:08d}.npy")

    def write(self, name: str, index: int, array: np.ndarray) -> None:
        if self.kept is not None:
            self.kept[name, index] = array
        else:
            np.save(self._path(name, index), array, allow_pickle=False)

    def write_block(self, index: int, Q_i: np.ndarray, merge: Any) -> None:
        """Block ``index`` of the final pass: Q_i and its merge factors (a
        ``tsqr.MergeFactors``; None for the first block, which has none)."""
        self.write("Q", index, Q_i)
        if merge is not None:
            self.write("T", index, merge.T)
            self.write("S", index, merge.S)

    def load(self, name: str, index: int) -> np.ndarray:
        if self.kept is not None:
            return self.kept.pop((name, index))
        return np.load(self._path(name, index), allow_pickle=False)

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
        self.kept = None

    def __enter__(self) -> QSpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# What an existing output may be for ``overwrite`` to replace it: what ooc_svd writes there.
REPLACEABLE = {
    "result": ("an ooc_svd result", lambda attributes: "ooc_svd" in attributes),
    "csr": ("a CSR store", lambda attributes: attributes.get("encoding-type") == "csr_matrix"),
    "synthetic": ("a matrix ooc_svd generated",
                  lambda attributes: "ooc_svd_synthetic" in attributes),
}


def check_output_path(out: str | os.PathLike, overwrite: bool, replaces: str = "result",
                      inputs: tuple[str, ...] = ()) -> str:
    """Validate ``out`` before any long work and return it without a trailing separator.

    It must be a local path, apart from every path in ``inputs`` (neither one of them nor
    inside or around one: inputs are never modified), and absent unless ``overwrite``; even
    then, only an empty directory or what ooc_svd writes there (``REPLACEABLE[replaces]``)
    is replaced, never an unrelated file or directory.
    """
    path = os.fspath(out)
    if "://" in path:
        raise InputError(f"out must be a local path (an atomic rename needs one), not {path!r}")
    path = os.path.normpath(path)  # 'result.zarr/' names result.zarr
    for source in inputs:
        if _overlap(path, source):
            raise InputError(f"output {path!r} overlaps the input {source!r}, which is never "
                             "modified: choose another output path")
    if os.path.lexists(path):
        if not overwrite:
            raise OutputExistsError(
                f"output {path!r} exists; pass overwrite=True (--overwrite) to replace it"
            )
        what, is_replaceable = REPLACEABLE[replaces]
        if not _replaceable(path, is_replaceable):
            raise OutputExistsError(
                f"output {path!r} exists and is not {what}: overwrite replaces only that or "
                "an empty directory; remove it yourself or choose another path"
            )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"the directory of the output {path!r} does not exist")
    return path


def _overlap(path: str, other: str) -> bool:
    """Whether two local paths are the same, or one lies inside the other."""
    a, b = os.path.realpath(path), os.path.realpath(other)
    return os.path.commonpath([a, b]) in (a, b)


def _replaceable(path: str, is_replaceable) -> bool:
    """An empty directory, or a zarr array or group whose attributes say ooc_svd wrote it."""
    if os.path.islink(path) or not os.path.isdir(path):
        return False
    if not os.listdir(path):
        return True
    import zarr

    try:
        attributes = zarr.open(path, mode="r").attrs.asdict()
    except Exception:  # noqa: BLE001 - anything that is not a readable zarr node
        return False
    return bool(is_replaceable(attributes))


def move_into_place(partial_path: str, final_path: str) -> None:
    """Rename a complete store to its final name. An existing one (overwrite) is moved aside
    first and removed last, so a crash leaves the old store or the new one under the name."""
    old = None
    if os.path.exists(final_path):
        old = f"{final_path}.old-{uuid.uuid4().hex[:8]}"
        os.rename(final_path, old)
    os.rename(partial_path, final_path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class ResultWriter:
    """Writes U block by block, then S, V, the mean and attributes, into a zarr group."""

    def __init__(self, out: str):
        import zarr

        self.final_path = out
        # A fixed name: a run killed before its rename leaves it, and the next run replaces it.
        self.partial_path = f"{out}.partial"
        shutil.rmtree(self.partial_path, ignore_errors=True)
        self.group = zarr.open_group(self.partial_path, mode="w")

    def create_rows_array(self, name: str, shape: tuple[int, int], dtype: np.dtype,
                          rows_per_chunk: int) -> Any:
        """An (m, k) array written block by block, chunked like the input's blocks."""
        rows = max(min(rows_per_chunk, shape[0]), 1)
        return self.group.create_array(name, shape=shape, chunks=(rows, max(shape[1], 1)),
                                       dtype=dtype)

    def write_scaled_rows(self, name: str, U: Any, S: np.ndarray) -> None:
        """name = U diag(S), written chunk by chunk (U may be larger than memory)."""
        target = self.create_rows_array(name, U.shape, U.dtype, U.chunks[0])
        for start in range(0, U.shape[0], U.chunks[0]):
            target[start : start + U.chunks[0]] = U[start : start + U.chunks[0]] * S

    def finish(self, arrays: dict[str, np.ndarray], attributes: dict[str, Any]) -> Any:
        """Write the small arrays and attributes, rename into place, return the opened group."""
        import zarr

        for name, values in arrays.items():
            self.group.create_array(name, data=np.asarray(values))
        self.group.attrs.update(attributes)
        move_into_place(self.partial_path, self.final_path)
        return zarr.open_group(self.final_path, mode="r")

    def abort(self) -> None:
        shutil.rmtree(self.partial_path, ignore_errors=True)


U_CHUNK_BYTES = 16 << 20


class LeftVectors:
    """U, in memory or as an array of the output group, allocated once its rank is known."""

    def __init__(self, writer: ResultWriter | None, m: int, dtype: np.dtype, rows_per_chunk: int):
        self.writer, self.m, self.dtype, self.rows_per_chunk = writer, m, dtype, rows_per_chunk
        self.array: Any = None

    def allocate(self, k: int):
        """Create U (m x k) and return the function that stores its rows."""
        shape = (self.m, k)
        if self.writer is None:
            self.array = np.empty(shape, dtype=self.dtype)
        else:
            # Chunks of the blocks' rows, but at most U_CHUNK_BYTES: a sparse block can hold
            # millions of rows, and a block's rows are written with whole chunks.
            rows = min(self.rows_per_chunk, max(1, U_CHUNK_BYTES // (self.dtype.itemsize * k)))
            self.array = self.writer.create_rows_array("U", shape, self.dtype, rows)
        return self.store

    def store(self, start: int, rows: np.ndarray) -> None:
        self.array[start : start + rows.shape[0]] = rows

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
    """Per-block Q_i factors (b_i x l float64) written to scratch files and read back once.

    Plain file I/O, not a memory map, so spilled pages are not counted in the process's RSS.
    """

    def __init__(self, scratch_dir: str | None = None):
        self.directory = tempfile.mkdtemp(prefix="ooc-svd-spill-", dir=scratch_dir)
        self.shapes: dict[int, tuple[int, int]] = {}

    def _path(self, index: int) -> str:
        return os.path.join(self.directory, f"q{index:08d}.bin")

    def write(self, index: int, Q: np.ndarray) -> None:
        self.shapes[index] = Q.shape
        with open(self._path(index), "wb") as file:
            file.write(np.asfortranarray(Q, dtype=np.float64).tobytes(order="F"))

    def load(self, index: int) -> np.ndarray:
        rows, cols = self.shapes[index]
        data = np.fromfile(self._path(index), dtype=np.float64, count=rows * cols)
        return data.reshape((rows, cols), order="F")

    def close(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> QSpill:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def check_output_path(out: str | os.PathLike, overwrite: bool) -> str:
    """Validate ``out`` before any long work: a local path, absent unless ``overwrite``."""
    path = os.fspath(out)
    if "://" in path:
        raise InputError(f"out must be a local path (an atomic rename needs one), not {path!r}")
    if os.path.exists(path) and not overwrite:
        raise OutputExistsError(f"output {path!r} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"the directory of the output {path!r} does not exist")
    return path


class ResultWriter:
    """Writes U block by block, then S, V, the mean and attributes, into a zarr group."""

    def __init__(self, out: str, m: int, k: int, n: int, dtype: np.dtype, rows_per_chunk: int):
        import zarr

        self.final_path = out
        self.partial_path = f"{out}.partial-{uuid.uuid4().hex[:8]}"
        self.group = zarr.open_group(self.partial_path, mode="w")
        self.U = self.group.create_array(
            "U", shape=(m, k), chunks=(max(min(rows_per_chunk, m), 1), k), dtype=dtype
        )
        self.n = n

    def write_rows(self, start: int, rows: np.ndarray) -> None:
        self.U[start : start + rows.shape[0]] = rows

    def finish(self, arrays: dict[str, np.ndarray], attributes: dict[str, Any]) -> Any:
        """Write the small arrays and attributes, rename into place, return the opened group."""
        import zarr

        for name, values in arrays.items():
            self.group.create_array(name, data=np.asarray(values))
        self.group.attrs.update(attributes)
        old = None
        if os.path.exists(self.final_path):
            old = f"{self.final_path}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.final_path, old)
        os.rename(self.partial_path, self.final_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return zarr.open_group(self.final_path, mode="r")

    def abort(self) -> None:
        shutil.rmtree(self.partial_path, ignore_errors=True)

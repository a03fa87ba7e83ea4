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
    """

    def __init__(self, scratch_dir: str | None = None):
        self.directory = tempfile.mkdtemp(prefix="ooc-svd-spill-", dir=scratch_dir)

    def _path(self, name: str, index: int) -> str:
        return os.path.join(self.directory, f"{name}{index:08d}.npy")

    def write(self, name: str, index: int, array: np.ndarray) -> None:
        np.save(self._path(name, index), array, allow_pickle=False)

    def load(self, name: str, index: int) -> np.ndarray:
        return np.load(self._path(name, index), allow_pickle=False)

    def exists(self, name: str, index: int) -> bool:
        return os.path.exists(self._path(name, index))

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
        raise OutputExistsError(
            f"output {path!r} exists; pass overwrite=True (--overwrite) to replace it"
        )
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise InputError(f"the directory of the output {path!r} does not exist")
    return path


class ResultWriter:
    """Writes U block by block, then S, V, the mean and attributes, into a zarr group."""

    def __init__(self, out: str, m: int, k: int, n: int, dtype: np.dtype, rows_per_chunk: int):
        import zarr

        self.final_path = out
        # A fixed name: a run killed before its rename leaves it, and the next run replaces it.
        self.partial_path = f"{out}.partial"
        shutil.rmtree(self.partial_path, ignore_errors=True)
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

import numpy as np
import pytest
from naive import matrix_with_spectrum


@pytest.fixture
def zarr_matrix(tmp_path):
    """Write a matrix to a zarr v3 store with the given row chunks; returns the path."""
    import zarr

    def write(A, chunk_rows=100, zarr_format=3, name="A.zarr"):
        path = str(tmp_path / name)
        array = zarr.create_array(
            path, shape=A.shape, chunks=(chunk_rows, A.shape[1]), dtype=A.dtype,
            zarr_format=zarr_format,
        )
        array[:] = A
        return path

    return write


@pytest.fixture
def fast_decay():
    return matrix_with_spectrum(600, 80, np.logspace(0, -8, 40), seed=1)


@pytest.fixture
def block_rows(monkeypatch):
    """Cap the rows per block (rounded down to whole chunks, at least one chunk)."""
    import ooc_svd.plan

    def cap(rows, n, itemsize=8):
        monkeypatch.setattr(ooc_svd.plan, "MAX_BLOCK_BYTES", rows * n * itemsize)

    return cap

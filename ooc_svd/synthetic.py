"""Synthetic dense test matrices with a known spectrum, written block by block.

A = G diag(s) V^T with V (n x r) orthonormal and G (m x r) standard normal scaled by
1/sqrt(m), so G^T G ~ I and the singular values of A are s to within about sqrt(r / m)
relative. Each chunk of rows comes from its own Philox stream keyed by (seed, chunk), so a
store of any size is written with memory for one chunk and is reproducible.
"""

from __future__ import annotations

import os

import numpy as np

from .sketch import philox_generator


def spectrum(n: int, rank: int | None = None, decay: float = 0.1) -> np.ndarray:
    """s_j = exp(-decay * j) for j < rank, the designed singular values."""
    rank = n if rank is None else min(rank, n)
    return np.exp(-decay * np.arange(rank))


def write_dense_matrix(
    path: str | os.PathLike,
    shape: tuple[int, int],
    *,
    rank: int | None = None,
    decay: float = 0.1,
    dtype: str = "float32",
    chunk_rows: int = 50_000,
    seed: int = 0,
    compression_level: int = 3,
    overwrite: bool = False,
):
    """Write A = G diag(s) V^T to a zarr v3 array at ``path`` (zstd), chunked by rows.

    The designed spectrum is recorded in the array's attributes under ``ooc_svd_synthetic``.
    Returns the zarr array, opened read-only.
    """
    import zarr
    from zarr.codecs import ZstdCodec

    m, n = shape
    s = spectrum(n, rank, decay)
    r = s.size
    V, _ = np.linalg.qr(philox_generator(seed, 2**63).standard_normal((n, r)))
    scaled_vt = (s[:, None] * V.T) / np.sqrt(m)
    array = zarr.create_array(
        os.fspath(path),
        shape=(m, n),
        chunks=(min(chunk_rows, m), n),
        dtype=dtype,
        compressors=ZstdCodec(level=compression_level),
        overwrite=overwrite,
    )
    for index, start in enumerate(range(0, m, chunk_rows)):
        stop = min(start + chunk_rows, m)
        G = philox_generator(seed, index).standard_normal((stop - start, r))
        array[start:stop] = (G @ scaled_vt).astype(dtype)
    array.attrs["ooc_svd_synthetic"] = {
        "kind": "dense",
        "singular_values": s.tolist(),
        "rank": r,
        "decay": decay,
        "seed": seed,
    }
    return zarr.open_array(os.fspath(path), mode="r")

"""Random test matrices that depend only on (seed, shape), never on chunking or backend.

Omega (n x l) is generated in fixed blocks of its rows, each from numpy's counter-based Philox
generator keyed by (seed, block index). The same seed therefore gives the same Omega for any
block size, block order, worker count or backend, and any block can be made independently.
"""

from __future__ import annotations

import numpy as np

OMEGA_ROWS_PER_KEY = 4096


def philox_generator(seed: int, block_index: int) -> np.random.Generator:
    """A generator keyed by (seed, block_index): independent streams, reproducible anywhere."""
    key = np.array([seed, block_index], dtype=np.uint64)
    return np.random.Generator(np.random.Philox(key=key))


def gaussian_test_matrix(n: int, l: int, seed: int, stream: int = 0) -> np.ndarray:
    """Standard normal Omega of shape (n, l), float64, Fortran-ordered.

    ``stream`` selects an independent family of keys (stream << 32 | block), for methods that
    draw several test matrices from one seed.
    """
    omega = np.empty((n, l), order="F")
    for index, start in enumerate(range(0, n, OMEGA_ROWS_PER_KEY)):
        stop = min(start + OMEGA_ROWS_PER_KEY, n)
        generator = philox_generator(seed, (stream << 32) | index)
        omega[start:stop] = generator.standard_normal((stop - start, l))
    return omega

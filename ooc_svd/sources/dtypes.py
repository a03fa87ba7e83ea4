"""The dtypes of the blocks sources hand to the kernels."""

from __future__ import annotations

from typing import Any

import numpy as np


def block_dtype(stored: Any) -> np.dtype:
    """The dtype of the blocks (values or, for CSR, indices) read from data stored as
    ``stored``.

    numba compiles for native byte order only, and has neither float16 nor extended
    precision: big-endian data (zarr v2 stores with '>f8', say) is byte-swapped as it is
    read, float16 widened to float32, and longdouble narrowed to float64, the precision the
    products are summed in. Other dtypes are read as stored.
    """
    dtype = np.dtype(stored)
    if dtype.kind == "f" and dtype.itemsize < 4:
        return np.dtype(np.float32)
    if dtype.kind == "f" and dtype.itemsize > 8:
        return np.dtype(np.float64)
    return dtype.newbyteorder("=")

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


def narrows_floats(source: np.dtype, target: np.dtype) -> bool:
    """Whether a cast of ``source`` values to ``target`` may overflow to Inf or underflow to
    zero: floats cast to narrower floats (integers of up to 64 bits fit float32's range)."""
    return source.kind == "f" and source.itemsize > target.itemsize


def first_overflowed(data: np.ndarray, values: np.ndarray,
                     finite: np.ndarray | None = None) -> int | None:
    """The flat index of the first finite value of ``data`` that ``values`` (``data``
    narrowed) holds as Inf, or None (``finite``: ``np.isfinite(values)``, where known)."""
    finite = np.isfinite(values) if finite is None else finite
    overflowed = np.flatnonzero(~finite & np.isfinite(data))
    return int(overflowed[0]) if overflowed.size else None


def first_rounded_integer(data: np.ndarray, values: np.ndarray) -> int | None:
    """The flat index of the first integer of ``data`` (integers, or floats holding them)
    that ``values`` (``data`` cast to floats) does not hold exactly, or None: beyond 2**24
    in float32, 2**53 in float64. NaN and Inf are not integers."""
    if not data.size:
        return None
    exact = exact_integer_bound(values.dtype)
    if -exact <= data.min() and data.max() <= exact:  # numpy's comparisons: ints and Inf
        return None
    with np.errstate(invalid="ignore"):  # a uint64 near 2**64, rounded up beyond it
        changed = np.flatnonzero((values.astype(data.dtype) != data) & np.isfinite(data))
    return int(changed[0]) if changed.size else None


def rounded_integers(given: Any, place: str, stored: Any, dtype: np.dtype,
                     hint: str = "") -> str:
    """The warning that integers are rounded in ``dtype``: the first, ``given`` at
    ``place``, ``stored`` as it is; for float32, store float64 values (``hint``: how)."""
    bits = exact_integer_bound(dtype).bit_length() - 1
    fix = f": store float64 values{hint}" if np.dtype(dtype) == np.float32 else ""
    return (f"integer values beyond 2**{bits} are rounded in {dtype} (the first, {given} of "
            f"{place}, is stored as {stored:.17g}){fix}")


def exact_integer_bound(dtype: np.dtype) -> int:
    """The largest power of two up to which floats of ``dtype`` hold every integer."""
    return 1 << (np.finfo(dtype).nmant + 1)


def beyond_range(value: Any, place: str, dtype: np.dtype, hint: str = "") -> str:
    """Why a value cannot be stored in ``dtype``, and what to do: store float64 values
    (``hint`` says how), or, for float64 itself, rescale. The value as str gives it
    (extended precision's 1e4000 would be formatted as a float64, inf)."""
    fix = f"store float64 values{hint}" if np.dtype(dtype) != np.float64 else \
        "rescale the matrix"
    return f"the value {value!s} of {place} lies beyond the range of {dtype}: {fix}"


def stored_as_zero(value: Any, place: str, dtype: np.dtype, hint: str = "") -> str:
    """The warning that values too small for ``dtype`` are stored as zero: the first,
    ``value`` at ``place``; store float64 values (``hint``: how)."""
    return (f"values too small for {dtype} are stored as zero (the first, {float(value)} of "
            f"{place}): store float64 values{hint}")


def first_underflowed(data: np.ndarray, values: np.ndarray) -> int | None:
    """The flat index of the first non-zero value of ``data`` that ``values`` (``data``
    narrowed) holds as zero, or None."""
    lost = np.flatnonzero((values == 0) & (data != 0))
    return int(lost[0]) if lost.size else None

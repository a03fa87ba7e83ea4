"""The dtypes of the blocks sources hand to the kernels."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError


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


@dataclass
class Narrowing:
    """Values cast to a store's ``dtype``, with what the cast loses said: a finite float
    beyond its range (float32's 3.4e38, which would be stored as Inf) is refused; a warning,
    once each, says that integers it cannot hold exactly are rounded (``integers``: the
    values are integers whatever their dtype, as a Matrix Market integer file's, read as
    floats), that values too small for it are stored as zero, and (``note_non_finite``)
    that a NaN or Inf is stored as it is. ``hint``: how to store float64 values instead.
    Each message names its value's place as the caller's ``place(flat index)`` says it."""

    dtype: np.dtype
    hint: str = ""
    integers: bool = False
    note_non_finite: bool = False
    warned_of_rounding: bool = False
    warned_of_underflow: bool = False
    warned_of_non_finite: bool = False

    def of(self, data: np.ndarray, place: Callable[[int], str]) -> np.ndarray:
        """``data`` in ``dtype``."""
        with np.errstate(over="ignore"):
            values = data.astype(self.dtype, copy=False)
        # Integers of up to 64 bits fit float32's range: only a float can overflow.
        narrowed = narrows_floats(data.dtype, values.dtype)
        # One pass over the values; where all are finite, none overflowed either.
        finite = np.isfinite(values) if narrowed or self.note_non_finite else None
        all_finite = finite is None or bool(finite.all())
        if narrowed and not all_finite:
            position = first_overflowed(data, values, finite)
            if position is not None:
                raise InputError(beyond_range(data.flat[position], place(position),
                                              self.dtype, self.hint))
        if self.dtype.kind == "f" and (data.dtype.kind in "iu" or self.integers):
            self.warn_of_rounding(data, values, place)
        if narrowed:
            self._warn_of_underflow(data, values, place)
        if not all_finite and self.note_non_finite:
            self._warn_of_non_finite(values, finite, place)
        return values

    def warn_of_rounding(self, data: np.ndarray, values: np.ndarray,
                         place: Callable[[int], str]) -> None:
        """Warn, once, of the first integer of ``data`` that ``values`` (``data`` in
        ``dtype``) does not hold exactly (beyond 2**24 in float32, 2**53 in float64)."""
        if self.warned_of_rounding:
            return
        position = first_rounded_integer(data, values)
        if position is None:
            return
        self.warned_of_rounding = True
        given = data.flat[position]
        given = int(given) if data.dtype.kind in "iu" else f"{given:.17g}"
        warnings.warn(rounded_integers(given, place(position), values.flat[position],
                                       self.dtype, self.hint),
                      RuntimeWarning, stacklevel=3)

    def _warn_of_underflow(self, data: np.ndarray, values: np.ndarray,
                           place: Callable[[int], str]) -> None:
        """Warn, once, of the first non-zero value that ``dtype`` holds as zero (below
        float32's 1.4e-45)."""
        if self.warned_of_underflow:
            return
        position = first_underflowed(data, values)
        if position is None:
            return
        self.warned_of_underflow = True
        warnings.warn(stored_as_zero(data.flat[position], place(position), self.dtype,
                                     self.hint),
                      RuntimeWarning, stacklevel=3)

    def _warn_of_non_finite(self, values: np.ndarray, finite: np.ndarray,
                            place: Callable[[int], str]) -> None:
        """Warn, once, of a NaN or Inf stored (as the input holds it): a run refuses it."""
        if self.warned_of_non_finite:
            return
        self.warned_of_non_finite = True
        position = int(np.flatnonzero(~finite)[0])
        warnings.warn(f"the input holds NaN or Inf, stored as it is (the first, "
                      f"{values.flat[position]} in {place(position)}): a run on the store "
                      "refuses it", RuntimeWarning, stacklevel=3)

"""Correctly rounded decimal-to-float64 conversion in numba, for parsing text matrices.

numpy's text parsers (``np.loadtxt``, ``np.fromstring``) convert about 1.5 million numbers a
second; Matrix Market files hold hundreds of millions. Here a number is read as a 64-bit
decimal significand w and a power of ten q, and w * 10**q is rounded to the nearest float64:

- Clinger's fast path when w <= 2**53 and |q| <= 22: w and 10**|q| are exact doubles, so one
  IEEE multiplication or division rounds correctly;
- otherwise the Eisel-Lemire algorithm: w times a 128-bit approximation of 5**q, whose top
  bits decide the rounding (D. Lemire, "Number parsing at a gigabyte per second", Software:
  Practice and Experience 51(8), 2021; N. Mushtak and D. Lemire, "Fast number parsing without
  fallback", 2023).

A number with more than 19 significant digits is reported as not converted, and the caller
falls back to Python's ``float`` for it, as it does for ``inf``, ``nan`` and malformed tokens.
"""

from __future__ import annotations

import math

import numba
import numpy as np

SMALLEST_POWER = -342  # below it, w * 10**q rounds to zero for any 19-digit w
LARGEST_POWER = 308  # above it, w * 10**q overflows to infinity


def _powers_of_five() -> tuple[np.ndarray, np.ndarray]:
    """High and low 64-bit words of 128-bit approximations of 5**q, q in [-342, 308].

    Normalized so bit 127 is set; 5**q is truncated for q >= 0, and 2**b / 5**-q rounded up
    for q < 0 (an overestimate, so a product that looks exact never hides a remainder).
    """
    values = []
    for q in range(SMALLEST_POWER, 0):
        power = 5 ** -q
        bits = power.bit_length()
        if q >= -27:
            value = (1 << (bits + 127)) // power + 1
        else:
            value = (1 << (2 * bits + 128)) // power + 1
            value >>= max(value.bit_length() - 128, 0)
        values.append(value)
    for q in range(0, LARGEST_POWER + 1):
        power = 5**q
        shift = 128 - power.bit_length()
        values.append(power << shift if shift >= 0 else power >> -shift)
    high = np.array([v >> 64 for v in values], dtype=np.uint64)
    low = np.array([v & ((1 << 64) - 1) for v in values], dtype=np.uint64)
    return high, low


POWER5_HIGH, POWER5_LOW = _powers_of_five()
EXACT_POWERS_OF_TEN = np.array([10.0**i for i in range(23)])

_U32 = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_LOW9 = np.uint64(0x1FF)  # the product bits below a 55-bit significand
_ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_ONE = np.uint64(1)
_ZERO = np.uint64(0)


@numba.njit(nogil=True, cache=True)
def multiply_128(a, b):
    """(high, low) words of the 128-bit product of two uint64."""
    a_lo, a_hi = a & _LOW32, a >> _U32
    b_lo, b_hi = b & _LOW32, b >> _U32
    lo_lo, lo_hi, hi_lo, hi_hi = a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi
    middle = (lo_lo >> _U32) + (lo_hi & _LOW32) + (hi_lo & _LOW32)
    low = (lo_lo & _LOW32) | (middle << _U32)
    high = hi_hi + (lo_hi >> _U32) + (hi_lo >> _U32) + (middle >> _U32)
    return high, low


@numba.njit(nogil=True, cache=True)
def leading_zeros(w):
    """Leading zero bits of a non-zero uint64."""
    count = 0
    for width in (32, 16, 8, 4, 2, 1):
        if w >> np.uint64(64 - width) == _ZERO:
            count += width
            w = w << np.uint64(width)
    return count


@numba.njit(nogil=True, cache=True)
def eisel_lemire(w, q):
    """w * 10**q rounded to float64, for uint64 w > 0 and q in [-342, 308].

    Returns (value, ok); ok is False in the cases the algorithm leaves to a slower method.
    """
    shift_in = leading_zeros(w)
    w = w << np.uint64(shift_in)
    row = q - SMALLEST_POWER
    high, low = multiply_128(w, POWER5_HIGH[row])
    if high & _LOW9 == _LOW9:
        # The truncated product may be short of a carry into the kept bits: add the next word.
        second_high, _ = multiply_128(w, POWER5_LOW[row])
        low = low + second_high
        if second_high > low:
            high = high + _ONE
        if low == _ALL_ONES and (q < -27 or q > 55):
            return 0.0, False
    upper = np.int64(high >> np.uint64(63))
    shift = np.uint64(upper + 9)
    significand = high >> shift
    # floor(log2(10**q)) + 63, then the bias of the float64 exponent.
    exponent = ((217706 * q) >> 16) + 63 + upper - shift_in + 1023
    if exponent <= 0:
        if 1 - exponent >= 64:
            return 0.0, True
        significand = significand >> np.uint64(1 - exponent)
        significand = (significand + (significand & _ONE)) >> _ONE
        return math.ldexp(float(significand), -1074), True
    if (low <= _ONE and -4 <= q <= 23 and significand & np.uint64(3) == _ONE
            and significand << shift == high):
        # Exactly half way between two floats: round to even, which is down here.
        significand = significand ^ _ONE
    significand = (significand + (significand & _ONE)) >> _ONE
    if significand >= np.uint64(1 << 53):
        significand = np.uint64(1 << 52)
        exponent += 1
    if exponent >= 2047:
        return math.inf, True
    return math.ldexp(float(significand), exponent - 1075), True


@numba.njit(nogil=True, cache=True)
def decimal_to_float(w, q):
    """w * 10**q rounded to the nearest float64 (ties to even); returns (value, ok)."""
    if w == _ZERO or q < SMALLEST_POWER:
        return 0.0, True
    if q > LARGEST_POWER:
        return math.inf, True
    if w <= np.uint64(1 << 53) and -22 <= q <= 22:
        if q >= 0:
            return float(w) * EXACT_POWERS_OF_TEN[q], True
        return float(w) / EXACT_POWERS_OF_TEN[-q], True
    return eisel_lemire(w, q)


@numba.njit(nogil=True, cache=True)
def is_blank(c):
    return c == 32 or c == 9 or c == 13  # space, tab, carriage return


@numba.njit(nogil=True, cache=True)
def token_end(buffer, position):
    """The position after the token starting at ``position`` (up to a blank or newline)."""
    while position < buffer.size and not is_blank(buffer[position]) and buffer[position] != 10:
        position += 1
    return position


@numba.njit(nogil=True, cache=True)
def is_separator(c):
    return c == 32 or c == 10 or c == 9 or c == 13  # space, newline, tab, carriage return


@numba.njit(nogil=True, cache=True)
def is_exponent_mark(byte):
    """e or E, and Fortran's d or D (1.5D+03), which Matrix Market files written by
    Fortran programs hold."""
    return byte == 101 or byte == 69 or byte == 100 or byte == 68


# Beyond this written exponent (1e17) a number is 0 or Inf whatever its digits: a file
# holds fewer than 1e17 of them.
EXPONENT_CAP = 10**17


@numba.njit(nogil=True, cache=True)
def parse_float(buffer, position):
    """Parse the decimal number at ``position`` of a uint8 buffer.

    Returns (value, end, ok): ok is False when the token is not a plain decimal number
    (``inf``, ``nan``, more than 19 significant digits, garbage), and the caller converts
    ``buffer[position:end]`` another way.
    """
    start, size = position, buffer.size
    negative = False
    if position < size and (buffer[position] == 45 or buffer[position] == 43):  # - or +
        negative = buffer[position] == 45
        position += 1
    w, digits, exponent, truncated = _ZERO, 0, 0, False
    first_digit = position
    while position < size and 48 <= buffer[position] <= 57:
        d = np.uint64(buffer[position] - 48)
        if digits < 19:
            w = w * np.uint64(10) + d
            digits += w != _ZERO  # leading zeros are not significant
        else:
            exponent += 1
            truncated |= d != _ZERO
        position += 1
    seen_digit = position > first_digit
    if position < size and buffer[position] == 46:  # .
        position += 1
        first_digit = position
        while position < size and 48 <= buffer[position] <= 57:
            d = np.uint64(buffer[position] - 48)
            if digits < 19:
                w = w * np.uint64(10) + d
                digits += w != _ZERO
                exponent -= 1
            else:
                truncated |= d != _ZERO
            position += 1
        seen_digit |= position > first_digit
    if position < size and is_exponent_mark(buffer[position]):
        position += 1
        exponent_negative = False
        if position < size and (buffer[position] == 45 or buffer[position] == 43):
            exponent_negative = buffer[position] == 45
            position += 1
        first_digit, written = position, 0
        while position < size and 48 <= buffer[position] <= 57:
            # Capped where no digit count can bring the number back into float64's range,
            # and far below int64's: a million digits shift the exponent by a million.
            if written < EXPONENT_CAP:
                written = written * 10 + (buffer[position] - 48)
            position += 1
        seen_digit &= position > first_digit
        exponent += -written if exponent_negative else written
    if not seen_digit or truncated or (position < size and not is_separator(buffer[position])):
        return 0.0, token_end(buffer, start), False
    value, ok = decimal_to_float(w, exponent)
    return (-value if negative else value), position, ok

"""Byte counts read from and written for people: memory limits and sizes in messages."""

from __future__ import annotations

import math
import numbers
import re

from .errors import InputError


def parse_bytes(value: int | float | str) -> int:
    """Bytes from an int or a string such as '512MB', '4GB', '2GiB', '1e9'."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy's too
        count = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?)(i?)B?\s*", str(value),
                             re.IGNORECASE)
        try:
            number, unit, binary = match.groups()
            count = float(number)
        except (AttributeError, ValueError):  # no match, or no number ('1e', '..')
            raise InputError(f"cannot read a memory size from {value!r}; use e.g. '512MB' "
                             "or '4GB'") from None
        count *= (1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1 if unit else 0)
    if not 1 <= count < float("inf"):
        raise InputError(f"a memory size must be a positive number of bytes, not {value!r}")
    return round(count)  # '16.4MB' is 16,400,000 bytes, not 16,399,999


def format_bytes(count: float, round_up: bool = False) -> str:
    """'512 kB', '6.9 MB', '1.07 GB': three digits in the decimal units that memory limits
    are read in; with ``round_up`` (a memory need), rounded up, so that a limit of what is
    shown is enough."""
    for unit in ("B", "kB", "MB", "GB"):
        shown = _three_digits(count, round_up)
        if shown < 1000:
            return f"{shown:.3g} {unit}"
        count /= 1000
    return f"{_three_digits(count, round_up):.3g} TB"


def _three_digits(count: float, round_up: bool) -> float:
    shown = float(f"{count:.3g}")
    if round_up and shown < count:
        step = 10.0 ** (math.floor(math.log10(count)) - 2)  # the third digit's
        shown = float(f"{shown + step:.3g}")
    return shown

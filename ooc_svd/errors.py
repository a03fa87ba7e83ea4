"""Exceptions raised by ooc_svd, and the argument checks shared by its entry points.

Every error a user can cause derives from ``OOCSVDError`` and from the builtin exception a
caller would expect (``ValueError`` for bad arguments, ``FileNotFoundError`` for a missing
store), so ``except ValueError`` keeps working.
"""

import tokenize
import zipfile
import zlib
from typing import Any

# What np.load raises for an .npz it cannot read: EOFError for an empty file, BadZipFile
# for a truncated archive, ValueError for a member that is no array (or shorter than its
# header says), zlib.error for damaged compressed data, TokenError for a damaged header,
# RuntimeError for an encrypted member, OSError for the rest.
NPZ_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
                   tokenize.TokenError, RuntimeError)


class OOCSVDError(Exception):
    """Base class of the errors ooc_svd raises on purpose."""


class InputError(OOCSVDError, ValueError):
    """The input matrix or an argument is unusable; the message names the problem."""


class CheckpointError(InputError):
    """A run cannot resume from its checkpoint (other parameters or input, or a file that
    cannot be read); the message says how to start over."""


class NonFiniteError(InputError):
    """The matrix holds NaN or Inf; the message names the first offending row. ``rows``:
    the range of rows it lies in, where only that is known (a GPU's block)."""

    def __init__(self, message: str, rows: tuple[int, int] | None = None):
        super().__init__(message)
        self.rows = rows


class StoreNotFoundError(OOCSVDError, FileNotFoundError):
    """A store path or URL does not exist or cannot be opened."""


class ReadError(OOCSVDError, OSError):
    """Reading a block failed (a corrupt or missing chunk); the message names the rows."""


class PlanError(InputError):
    """The run cannot fit the memory limit; the message gives the numbers, and
    ``needed_bytes`` (when known) the least memory_limit the refused plan would need."""

    def __init__(self, message: str, needed_bytes: int | None = None):
        super().__init__(message)
        self.needed_bytes = needed_bytes


class OutputExistsError(OOCSVDError, FileExistsError):
    """The output store exists and ``overwrite`` was not given."""


class ClusterError(OOCSVDError, RuntimeError):
    """A dask cluster could not finish the run: no worker left, a task whose workers all
    died running it (out of memory, most often), or the scheduler lost."""


class MissingDependencyError(OOCSVDError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """``value`` as an int if it is an integer (not a bool) in [minimum, maximum]; otherwise
    an InputError naming the argument."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer, not {value!r}")
    if value < minimum:
        raise InputError(f"{name}={value} must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise InputError(f"{name}={value} must be <= {maximum}")
    return int(value)


def check_number(name: str, value: Any, minimum: float = 0.0) -> float:
    """``value`` as a float if it is a real, finite number (not a bool) >= minimum;
    otherwise an InputError naming the argument."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                     np.floating)):
        raise InputError(f"{name} must be a number, not {value!r}")
    if not minimum <= value < np.inf:
        raise InputError(f"{name}={value} must be a finite number >= {minimum:g}")
    return float(value)


def check_seed(seed: Any) -> int:
    """A seed as an int: the key of a Philox generator, in [0, 2**64)."""
    return check_int("seed", seed, minimum=0, maximum=2**64 - 1)

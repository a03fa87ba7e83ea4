"""Reading Matrix Market coordinate files in chunks of entries, with bounded memory.

The header says the shape, the number of entries, the field (real, integer, pattern) and the
symmetry (general, symmetric, skew-symmetric; hermitian, of real values, is symmetric).
Entries are read in blocks of whole lines and parsed by a numba kernel in threads: 15 to 30
million numbers a second per core (17-digit reals to small integers), against about 1.5
million for numpy's ``loadtxt`` and ``fromstring``. Values round exactly as Python's
``float`` rounds them (``ooc_svd.float_parse``); Fortran's exponent mark (1.5D+03) is read
as e.
"""

from __future__ import annotations

import gzip
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numba
import numpy as np

from .coordinates import EntryChunk
from .errors import InputError, StoreNotFoundError
from .float_parse import is_blank, is_separator, parse_float
from .threaded import map_in_order, read_ahead

FIELDS = ("real", "double", "integer", "pattern")
# Integers up to this magnitude are exact in float64, as which all values are read.
FLOAT64_EXACT_INTEGERS = 2**53
SYMMETRIES = ("general", "symmetric", "skew-symmetric")


@dataclass(frozen=True)
class MatrixMarketHeader:
    """What the banner and the size line of a coordinate file say."""

    shape: tuple[int, int]
    entries: int  # entries in the file; symmetric files hold one of each mirrored pair
    field: str  # real, integer or pattern
    symmetry: str  # general, symmetric or skew-symmetric
    lines: int  # lines before the first entry

    @property
    def has_values(self) -> bool:
        return self.field != "pattern"

    @property
    def expanded_entries(self) -> int:
        """An upper bound on the entries once mirrored pairs are written out."""
        return self.entries * (1 if self.symmetry == "general" else 2)

    def describe(self) -> str:
        return f"matrix market coordinate {self.field} {self.symmetry}"


def open_binary(path: str):
    """The file, decompressed on the fly when it ends in .gz."""
    if not os.path.isfile(path):
        raise StoreNotFoundError(f"no such file: {path!r}")
    gzipped = path.lower().endswith(".gz")
    return gzip.open(path, "rb") if gzipped else open(path, "rb")  # noqa: SIM115


def read_header(file, path: str) -> MatrixMarketHeader:
    """Parse the banner, comments and size line, leaving ``file`` at the first entry."""
    banner = file.readline().decode("latin-1").split()
    if len(banner) != 5 or banner[0].lower() != "%%matrixmarket" or banner[1].lower() != "matrix":
        raise InputError(f"{path!r} is not a Matrix Market file (its first line is not "
                         "'%%MatrixMarket matrix coordinate FIELD SYMMETRY')")
    layout, field, symmetry = (word.lower() for word in banner[2:])
    if layout == "array":
        raise InputError(f"{path!r} is a dense Matrix Market array; convert handles the "
                         "coordinate (sparse) format only: store a dense matrix as zarr or .npy")
    if layout != "coordinate":
        raise InputError(f"{path!r}: unknown Matrix Market layout {layout!r}")
    if field not in FIELDS:
        raise InputError(f"{path!r}: {field} Matrix Market values are not supported "
                         "(real, integer or pattern only; ooc_svd computes real SVDs)")
    if symmetry == "hermitian":  # of real values (complex is refused above): symmetric
        symmetry = "symmetric"
    if symmetry not in SYMMETRIES:
        raise InputError(f"{path!r}: {symmetry} Matrix Market symmetry is not supported "
                         f"(one of {', '.join(SYMMETRIES)})")
    if field == "pattern" and symmetry == "skew-symmetric":  # an entry's mirror is its negative
        raise InputError(f"{path!r}: a pattern matrix cannot be skew-symmetric (the Matrix "
                         "Market format does not allow it: a pattern holds no signs)")
    lines = 1
    while True:
        line = file.readline()
        lines += 1
        if not line:
            raise InputError(f"{path!r} ends before its size line")
        if line.strip() and not line.lstrip().startswith(b"%"):
            break
    text = line.decode("latin-1").strip()
    words = text.split()
    # Digits only: Python's int() also takes '+3', '1_000' and other scripts' digits
    if len(words) != 3 or not all(word.isascii() and word.isdigit() for word in words):
        raise InputError(f"{path!r}: the size line {text!r} is not 'ROWS COLUMNS "
                         "ENTRIES' (three integers >= 0)")
    m, n, entries = (int(word) for word in words)
    if max(m, n, entries) > np.iinfo(np.int64).max:  # an index array could not hold it
        raise InputError(f"{path!r}: the size line {text!r} exceeds 2**63 - 1")
    if symmetry != "general" and m != n:
        raise InputError(f"{path!r}: a {symmetry} matrix must be square, not {m} x {n}")
    return MatrixMarketHeader((m, n), entries, "real" if field == "double" else field,
                              symmetry, lines)


@numba.njit(nogil=True, cache=True)
def _parse_index(buffer, position):
    """A decimal integer of at most 18 digits at ``position``: (value, end, ok)."""
    value, start, size = 0, position, buffer.size
    while position < size and 48 <= buffer[position] <= 57 and position - start < 18:
        value = value * 10 + (buffer[position] - 48)
        position += 1
    ok = position > start and (position == size or is_separator(buffer[position]))
    return value, position, ok


@numba.njit(nogil=True, cache=True)
def _skip_blanks(buffer, position):
    while position < buffer.size and is_blank(buffer[position]):
        position += 1
    return position


@numba.njit(nogil=True, cache=True)
def _end_of_line(buffer, position):
    """Whether only blanks follow ``position`` up to the end of its line; and where that is."""
    position = _skip_blanks(buffer, position)
    return position >= buffer.size or buffer[position] == 10, position


# Slots of the ``stats`` array that ``parse_entry_lines`` fills.
(ENTRIES, SLOW, FAILED_AT, LINES, ROW_MIN, ROW_MAX, COL_MIN, COL_MAX, ROW_SORTED,
 CANONICAL) = range(10)


@numba.njit(nogil=True, cache=True)
def parse_entry_lines(buffer, has_values, rows, cols, values, slow, stats):
    """Parse lines 'ROW COL [VALUE]' of a uint8 buffer of whole lines.

    Stores 0-based rows and columns (the file's are 1-based) and the values; skips blank and
    '%' lines. A value the fast parser leaves alone (``inf``, ``nan``, > 19 digits) gets a
    row of ``slow``: its entry and its token's byte range. Fills ``stats`` (int64, slots
    above): entries, slow values, the position of the first malformed line (-1 if none), the
    newlines seen, the range of the (1-based) indices, whether rows never decrease and
    whether (row, column) always increases (canonical CSR order), so the caller checks a
    chunk without another sweep over it.
    """
    position, count, slow_count, lines = 0, 0, 0, 0
    size = buffer.size
    row_min, row_max, col_min, col_max = 1 << 62, -1, 1 << 62, -1
    sorted_rows, canonical, previous_row, previous_col = True, True, -1, -1
    stats[FAILED_AT] = -1
    while position < size:
        position = _skip_blanks(buffer, position)
        if position < size and buffer[position] == 37:  # a % comment line
            while position < size and buffer[position] != 10:
                position += 1
        if position >= size:
            break
        if buffer[position] == 10:
            position += 1
            lines += 1
            continue
        line = position
        row, position, ok = _parse_index(buffer, position)
        if ok:
            col, position, ok = _parse_index(buffer, _skip_blanks(buffer, position))
        if ok and has_values:
            start = _skip_blanks(buffer, position)
            value, position, fast = parse_float(buffer, start)
            ok = position > start
            if ok and not fast:
                slow[slow_count, 0] = count
                slow[slow_count, 1] = start
                slow[slow_count, 2] = position
                slow_count += 1
            values[count] = value
        if ok:
            ok, position = _end_of_line(buffer, position)
        if not ok:
            stats[FAILED_AT] = line
            break
        rows[count] = row - 1
        cols[count] = col - 1
        count += 1
        row_min, row_max = min(row_min, row), max(row_max, row)
        col_min, col_max = min(col_min, col), max(col_max, col)
        sorted_rows &= row >= previous_row
        canonical &= row > previous_row or (row == previous_row and col > previous_col)
        previous_row, previous_col = row, col
    stats[ENTRIES], stats[SLOW], stats[LINES] = count, slow_count, lines
    stats[ROW_MIN], stats[ROW_MAX], stats[COL_MIN], stats[COL_MAX] = (
        row_min, row_max, col_min, col_max)
    stats[ROW_SORTED], stats[CANONICAL] = sorted_rows, canonical


@dataclass
class _Parsed:
    """One parsed block of text, with the kernel's statistics (``parse_entry_lines``)."""

    text: memoryview
    chunk: EntryChunk
    stats: np.ndarray


@dataclass
class _Progress:
    lines: int  # lines of the file before the next block
    entries: int = 0
    warned: bool = False  # of integers beyond float64's exact range


def read_entry_chunks(path: str, chunk_bytes: int, threads: int = 2) -> Iterator[EntryChunk]:
    """The entries of a coordinate file, about ``chunk_bytes`` of text at a time.

    Blocks of text are read (and gunzipped) by a thread of their own and parsed by
    ``threads`` threads (the kernel releases the GIL) while the caller consumes earlier ones,
    in order; at most ``threads + 3`` blocks are held. Symmetric
    files yield the mirrored entries too. Checks the indices against the shape and the number
    of entries against the header.
    """
    with open_binary(path) as file:
        header = read_header(file, path)
        progress = _Progress(header.lines)
        blocks = read_ahead(_text_blocks(file, chunk_bytes))
        parse = partial(_parse_text, has_values=header.has_values)
        for parsed in map_in_order(parse, blocks, threads):
            yield _checked(parsed, header, path, progress)
    if progress.entries != header.entries:
        raise InputError(f"{path!r}: the header announces {header.entries} entries but the "
                         f"file holds {progress.entries}")


def _text_blocks(file, chunk_bytes: int) -> Iterator[memoryview]:
    """Blocks of about ``chunk_bytes`` that end with whole lines, read without copying: the
    partial line at the end of one block is moved to the front of the next buffer."""
    tail = b""
    while True:
        buffer = bytearray(len(tail) + chunk_bytes)
        buffer[: len(tail)] = tail
        size = len(tail) + file.readinto(memoryview(buffer)[len(tail) :])
        if size == len(tail):
            if tail:
                yield memoryview(buffer)[:size]
            return
        cut = buffer.rfind(b"\n", 0, size) + 1
        if cut == 0:  # no newline yet: a line longer than the block, or the file's last
            tail = bytes(buffer[:size])
            continue
        tail = bytes(buffer[cut:size])
        yield memoryview(buffer)[:cut]


def _parse_text(text: memoryview, has_values: bool) -> _Parsed:
    """Run the kernel on a block; arrays are sized for the shortest possible lines."""
    buffer = np.frombuffer(text, dtype=np.uint8)
    capacity = len(text) // (6 if has_values else 4) + 1  # '1 1 1\n' or '1 1\n'
    rows = np.empty(capacity, dtype=np.int64)
    cols = np.empty(capacity, dtype=np.int64)
    values = np.empty(capacity if has_values else 0)
    slow = np.empty((capacity if has_values else 0, 3), dtype=np.int64)
    stats = np.zeros(10, dtype=np.int64)
    parse_entry_lines(buffer, has_values, rows, cols, values, slow, stats)
    count = int(stats[ENTRIES])
    for entry, start, end in slow[: stats[SLOW]].tolist():
        value = _python_float(bytes(text[start:end]))
        if value is None:
            stats[FAILED_AT] = bytes(text[:start]).rfind(b"\n") + 1
            break
        values[entry] = value
    # Views of the oversized arrays: their untouched pages were never allocated.
    chunk = EntryChunk(rows[:count], cols[:count], values[:count] if has_values else None,
                       bool(stats[ROW_SORTED]), bool(stats[CANONICAL]))
    return _Parsed(text, chunk, stats)


def _python_float(token: bytes) -> float | None:
    """Python's float of a token the fast parser leaves alone (inf, nan, > 19 digits), or
    None if it is not a number (Python's digit grouping, 1_000, is none in the format)."""
    if b"_" in token:
        return None
    try:
        return float(token.replace(b"d", b"e").replace(b"D", b"e"))  # Fortran's exponent
    except ValueError:
        return None


def _checked(parsed: _Parsed, header: MatrixMarketHeader, path: str,
             progress: _Progress) -> EntryChunk:
    """The block's entries, once its lines, indices and count are found valid."""
    stats, text = parsed.stats, parsed.text
    if stats[FAILED_AT] >= 0:
        number, line = _line_at(text, int(stats[FAILED_AT]), progress)
        raise InputError(f"{path!r}, line {number}: {line!r} is not 'ROW COLUMN"
                         f"{' VALUE' if header.has_values else ''}'")
    if header.field == "integer":
        _check_integers(parsed, path, progress)
    progress.lines += int(stats[LINES])
    progress.entries += parsed.chunk.rows.size
    if progress.entries > header.entries:
        raise InputError(f"{path!r} holds more entries than the {header.entries} its header "
                         "announces")
    m, n = header.shape
    for name, low, high, bound in (("row", stats[ROW_MIN], stats[ROW_MAX], m),
                                   ("column", stats[COL_MIN], stats[COL_MAX], n)):
        if parsed.chunk.rows.size and (low < 1 or high > bound):
            raise InputError(f"{path!r}: a {name} index ({low if low < 1 else high}) lies "
                             f"outside 1..{bound} (shape {m} x {n})")
    return _with_mirrors(parsed.chunk, header.symmetry)


def _check_integers(parsed: _Parsed, path: str, progress: _Progress) -> None:
    """Refuse a value of an integer file's block that is not an integer, naming its line;
    warn, once a file, of one beyond float64's exact integers, as which it was read."""
    values = parsed.chunk.values

    def first_line(entries: np.ndarray) -> tuple[int, str]:
        return _line_at(parsed.text, _entry_offset(parsed.text, int(entries[0])), progress)

    fractional = np.flatnonzero(~np.isfinite(values) | (values != np.trunc(values)))
    if fractional.size:
        number, line = first_line(fractional)
        raise InputError(f"{path!r}, line {number}: {line!r} holds a value that is not an "
                         "integer, in a file whose header says 'integer'")
    # 2**53 + 1 reads as 2**53: a value of that magnitude may have been rounded.
    beyond = np.flatnonzero(np.abs(values) >= FLOAT64_EXACT_INTEGERS)
    if beyond.size and not progress.warned:
        progress.warned = True
        number, line = first_line(beyond)
        warnings.warn(f"{path!r}, line {number}: {line!r} holds an integer beyond 2**53, "
                      "read to the nearest float64, which may round it (as it may others of "
                      "the file)", RuntimeWarning, stacklevel=3)


def _line_at(text: memoryview, offset: int, progress: _Progress) -> tuple[int, str]:
    """(number in the file, text) of the line of ``text`` that starts at byte ``offset``."""
    line = bytes(text[offset:]).split(b"\n", 1)[0].decode("latin-1").strip()
    return progress.lines + bytes(text[:offset]).count(b"\n") + 1, line


def _entry_offset(text: memoryview, entry: int) -> int:
    """Where the line of the ``entry``-th entry of ``text`` starts, past blank and comment
    lines as ``parse_entry_lines`` skips them (only for an error message: it is slow)."""
    offset, seen = 0, -1
    for line in bytes(text).split(b"\n"):
        if line.strip() and not line.lstrip().startswith(b"%"):
            seen += 1
            if seen == entry:
                return offset
        offset += len(line) + 1
    raise ValueError(f"no entry {entry} in the block")


def _with_mirrors(chunk: EntryChunk, symmetry: str) -> EntryChunk:
    """Add (j, i) for each off-diagonal (i, j) of a symmetric or skew-symmetric file."""
    if symmetry == "general":
        return chunk
    off = chunk.rows != chunk.cols
    rows = np.concatenate([chunk.rows, chunk.cols[off]])
    cols = np.concatenate([chunk.cols, chunk.rows[off]])
    values = chunk.values
    if values is not None:
        mirrored = -values[off] if symmetry == "skew-symmetric" else values[off]
        values = np.concatenate([values, mirrored])
    return EntryChunk(rows, cols, values)

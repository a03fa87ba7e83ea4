"""Coordinate entries (row, column, value) to CSR rows, with memory bounded by a budget.

Two ways, for entries that arrive in chunks:

- ``write_row_sorted``: when rows never decrease (a row-major file), each chunk's complete
  rows are appended to the writer at once: one pass, memory for one chunk. The first entry
  out of order raises ``NotRowSorted`` so that the caller can start again the other way.
- ``write_bucketed``: otherwise entries are spilled to scratch files, one per range of rows
  (a bucket), then each bucket is read back alone, sorted and appended; a bucket larger than
  the budget is split again. Two passes over the entries, memory for one bucket.

Both give canonical CSR: columns sorted within rows and duplicates summed, as
``scipy.sparse.coo_matrix(...).tocsr()`` does (which is how Matrix Market files are read by
``scipy.io.mmread(...).tocsr()``). Values are summed in float64.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .errors import InputError
from .sources.csr import CSRWriter
from .store import SCRATCH_PREFIX, naming_write_failures

# Rows per appended block: bounds the indptr of a block however few entries the rows hold.
MAX_BLOCK_ROWS = 1 << 20
# Working bytes per entry while a bucket is sorted: its record (24), the split columns (24),
# and scipy's COO -> CSR with duplicate summing (about 40 more).
SORT_BYTES_PER_ENTRY = 96


@dataclass
class EntryChunk:
    """Entries of a coordinate matrix: 0-based rows and columns (int64) and float64 values
    (None for a pattern matrix, whose values are all one). ``rows_sorted`` says whether the
    rows never decrease within the chunk, when that is known; ``canonical`` that (row,
    column) always increases, so the entries are CSR as they are."""

    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray | None
    rows_sorted: bool | None = None
    canonical: bool = False

    def __getitem__(self, entries: slice) -> EntryChunk:
        values = None if self.values is None else self.values[entries]
        return EntryChunk(self.rows[entries], self.cols[entries], values, self.rows_sorted,
                          self.canonical)


class NotRowSorted(Exception):
    """The entries are not in row order (raised by ``write_row_sorted``)."""


def canonical_rows(rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None,
                   first_row: int, n_rows: int, n_cols: int):
    """(indptr, indices, data) of the entries, rows in [first_row, first_row + n_rows):
    columns sorted within rows and duplicates summed."""
    import scipy.sparse

    data = np.ones(rows.size) if values is None else values
    matrix = scipy.sparse.coo_matrix((data, (rows - first_row, cols)), shape=(n_rows, n_cols))
    csr = matrix.tocsr()  # sums duplicates and sorts the columns of each row
    return csr.indptr, csr.indices, csr.data


def append_row_range(writer: CSRWriter, start: int, stop: int, entries: EntryChunk) -> None:
    """Append rows [start, stop) holding ``entries``, whose rows are sorted and within."""
    for first in range(start, stop, MAX_BLOCK_ROWS):
        last = min(first + MAX_BLOCK_ROWS, stop)
        lo, hi = np.searchsorted(entries.rows, [first, last])
        part = entries[lo:hi]
        if part.canonical:
            counts = np.bincount(part.rows - first, minlength=last - first)
            indptr = np.concatenate([[0], np.cumsum(counts)])
            values = np.ones(part.rows.size) if part.values is None else part.values
            writer.append_arrays(indptr, part.cols, values)
        else:
            writer.append_arrays(*canonical_rows(part.rows, part.cols, part.values, first,
                                                 last - first, writer.n_cols))


def write_row_sorted(chunks: Iterable[EntryChunk], writer: CSRWriter, n_rows: int) -> None:
    """Append the rows of entries that arrive in row order; raise ``NotRowSorted`` if not.

    The entries of a chunk's last row are held back (the carry) until a later row shows
    that the row is complete.
    """
    done = 0  # rows appended; the carry's entries are in row ``done``
    carry = EntryChunk(np.empty(0, np.int64), np.empty(0, np.int64), None)
    for chunk in chunks:
        if chunk.rows.size == 0:
            continue
        in_order = chunk.rows_sorted
        if in_order is None:
            in_order = bool(np.all(chunk.rows[1:] >= chunk.rows[:-1]))
        if not in_order or chunk.rows[0] < done:
            raise NotRowSorted
        if carry.rows.size:
            same_row = int(np.searchsorted(chunk.rows, done, side="right"))
            carry = _concatenate(carry, chunk[:same_row])
            if same_row == chunk.rows.size:
                continue
            append_row_range(writer, done, done + 1, carry)
            chunk, done = chunk[same_row:], done + 1
        last = int(chunk.rows[-1])
        cut = int(np.searchsorted(chunk.rows, last))
        append_row_range(writer, done, last, chunk[:cut])
        done, carry = last, chunk[cut:]
    append_row_range(writer, done, n_rows, carry)


def _concatenate(first: EntryChunk, second: EntryChunk) -> EntryChunk:
    """Entries of both, in order; canonical only if checked again (here: never)."""
    if second.rows.size == 0:
        return first
    values = None
    if second.values is not None:
        held = np.ones(first.rows.size) if first.values is None else first.values
        values = np.concatenate([held, second.values])
    return EntryChunk(np.concatenate([first.rows, second.rows]),
                      np.concatenate([first.cols, second.cols]), values, True)


@dataclass
class _Bucket:
    """Entries of rows [start, stop), in a scratch file of records."""

    start: int
    stop: int
    path: str
    entries: int = 0


class _RowBuckets:
    """Scratch files of entries, one per equal range of rows [start, stop)."""

    def __init__(self, directory: str, start: int, stop: int, count: int, has_values: bool):
        count = max(1, min(count, stop - start))
        self.span = -(-(stop - start) // count)  # rows per bucket
        self.start = start
        self.directory = directory
        self.has_values = has_values
        self.record = np.dtype([("row", "<i8"), ("col", "<i8")]
                               + ([("value", "<f8")] if has_values else []))
        self.buckets = [
            _Bucket(s, min(s + self.span, stop),
                    os.path.join(directory, f"rows-{s}-{min(s + self.span, stop)}.bin"))
            for s in range(start, stop, self.span)
        ]

    def add(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray | None) -> None:
        """Append entries to the files of their buckets."""
        ids = (rows - self.start) // self.span
        if len(self.buckets) <= np.iinfo(np.uint16).max:
            ids = ids.astype(np.uint16)  # a stable sort of 16-bit keys is a radix sort
        order = np.argsort(ids, kind="stable")
        records = np.empty(rows.size, dtype=self.record)
        records["row"], records["col"] = rows[order], cols[order]
        if values is not None:
            records["value"] = values[order]
        counts = np.bincount(ids, minlength=len(self.buckets))
        bounds = np.concatenate([[0], np.cumsum(counts)])
        with naming_write_failures(f"the entries sorted into {self.directory} (scratch_dir, "
                                   "--scratch-dir)"):
            for index in np.flatnonzero(counts).tolist():
                bucket = self.buckets[index]
                with open(bucket.path, "ab") as file:
                    records[bounds[index] : bounds[index + 1]].tofile(file)
                bucket.entries += int(counts[index])

    def read(self, bucket: _Bucket, offset: int = 0, count: int = -1) -> np.ndarray:
        if bucket.entries == 0:
            return np.empty(0, dtype=self.record)
        return np.fromfile(bucket.path, dtype=self.record, count=count,
                           offset=offset * self.record.itemsize)


def bucket_count(entries: int, n_rows: int, budget_entries: int) -> int:
    """Buckets for ``entries`` spread over ``n_rows``: twice as many as the budget needs if
    spread evenly (headroom for uneven rows), and enough to keep a block's rows bounded."""
    return max(1, -(-2 * entries // budget_entries), -(-n_rows // MAX_BLOCK_ROWS))


def write_bucketed(chunks: Iterable[EntryChunk], writer: CSRWriter, n_rows: int,
                   expected_entries: int, budget_entries: int, has_values: bool,
                   scratch_dir: str | None = None) -> int:
    """Append entries that arrive in any order; returns the number of buckets used.

    ``budget_entries`` bounds the entries sorted at once; ``expected_entries`` (an estimate)
    sets the first split into buckets.
    """
    directory = tempfile.mkdtemp(prefix=SCRATCH_PREFIX + "buckets-", dir=scratch_dir)
    try:
        writer.output.record_scratch(directory)  # for the next writer, should this be killed
        buckets = _RowBuckets(directory, 0, n_rows,
                              bucket_count(expected_entries, n_rows, budget_entries), has_values)
        for chunk in chunks:
            _check_rows(chunk.rows, n_rows)
            buckets.add(chunk.rows, chunk.cols, chunk.values)
        return sum(_write_bucket(buckets, bucket, writer, budget_entries, directory)
                   for bucket in buckets.buckets)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
        writer.output.forget_scratch()


def _write_bucket(buckets: _RowBuckets, bucket: _Bucket, writer: CSRWriter,
                  budget_entries: int, directory: str) -> int:
    """Sort and append one bucket, or split it again if it exceeds the budget (a single row
    is never split: its entries must fit). Returns the buckets used."""
    if bucket.entries > budget_entries and bucket.stop - bucket.start > 1:
        finer = _RowBuckets(directory, bucket.start, bucket.stop,
                            bucket_count(bucket.entries, 0, budget_entries), buckets.has_values)
        for offset in range(0, bucket.entries, budget_entries):
            records = buckets.read(bucket, offset, budget_entries)
            finer.add(records["row"], records["col"], _values(records))
        os.remove(bucket.path)
        return sum(_write_bucket(finer, part, writer, budget_entries, directory)
                   for part in finer.buckets)
    records = buckets.read(bucket)
    writer.append_arrays(*canonical_rows(records["row"], records["col"], _values(records),
                                         bucket.start, bucket.stop - bucket.start,
                                         writer.n_cols))
    if bucket.entries:
        os.remove(bucket.path)
    return 1


def _values(records: np.ndarray) -> np.ndarray | None:
    return records["value"] if "value" in records.dtype.names else None


def _check_rows(rows: np.ndarray, n_rows: int) -> None:
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise InputError(f"a row index lies outside [0, {n_rows})")

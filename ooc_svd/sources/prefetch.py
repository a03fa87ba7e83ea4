"""A prefetching block iterator: reading (decompression) runs in threads while kernels compute.

At most ``depth`` blocks are requested ahead of the one being computed, so the memory held by
the reader is bounded by ``depth + 1`` blocks whatever the matrix size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice

import numpy as np

from .dense import DenseSource


class prefetch_blocks:  # noqa: N801 - used as a function that returns an iterator
    """Iterate ``(start, stop, rows)`` over ``blocks``, reading up to ``depth`` blocks ahead.

    The first reads start at once, before the first block is asked for, so a caller busy
    with other work (blocks from a cache) already overlaps them. The reader threads release
    the GIL in the decompressors, so on two cores decoding block i + 1 overlaps the products
    of block i. A read error is raised when its block is reached. ``close()`` cancels what
    is still queued; the iterator closes itself when exhausted.
    """

    def __init__(self, source: DenseSource, blocks: Sequence[tuple[int, int]], depth: int = 2):
        self.source = source
        self.pool = ThreadPoolExecutor(max_workers=max(int(depth), 1),
                                       thread_name_prefix="ooc-svd-read")
        self.todo = iter(blocks)
        self.pending: deque[tuple[int, int, Future]] = deque()
        try:
            for start, stop in islice(self.todo, max(int(depth), 1)):
                self._submit(start, stop)
        except BaseException:
            # A Ctrl-C while a reader thread starts leaves that thread running but unknown
            # to the interpreter's exit hook, which would then wait for it forever; the
            # shutdown's wake-up ends it.
            self.close()
            raise

    def _submit(self, start: int, stop: int) -> None:
        self.pending.append((start, stop, self.pool.submit(self.source.read, start, stop)))

    def __iter__(self) -> prefetch_blocks:
        return self

    def __next__(self) -> tuple[int, int, np.ndarray]:
        if not self.pending:
            self.close()
            raise StopIteration
        start, stop, future = self.pending.popleft()
        try:
            rows = future.result()
        except BaseException:
            self.close()
            raise
        for next_start, next_stop in islice(self.todo, 1):
            self._submit(next_start, next_stop)
        return start, stop, rows

    def close(self) -> None:
        for _, _, future in self.pending:
            future.cancel()
        self.pending.clear()
        self.pool.shutdown(wait=True)

"""A prefetching block iterator: reading (decompression) runs in threads while kernels compute.

At most ``depth`` blocks are requested ahead of the one being computed, so the memory held by
the reader is bounded by ``depth + 1`` blocks whatever the matrix size.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .dense import DenseSource


def prefetch_blocks(
    source: DenseSource, blocks: Sequence[tuple[int, int]], depth: int = 2
) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield ``(start, stop, rows)`` for each block, reading up to ``depth`` blocks ahead.

    The reader threads release the GIL in the decompressors, so on two cores decoding block
    i + 1 overlaps the products of block i. A read error is raised when its block is reached.
    """
    depth = max(int(depth), 1)
    pending: deque[tuple[int, int, Future]] = deque()
    todo = iter(blocks)
    with ThreadPoolExecutor(max_workers=depth, thread_name_prefix="ooc-svd-read") as pool:
        try:
            for start, stop in todo:
                pending.append((start, stop, pool.submit(source.read, start, stop)))
                if len(pending) >= depth:
                    break
            while pending:
                start, stop, future = pending.popleft()
                rows = future.result()
                for next_start, next_stop in todo:
                    pending.append(
                        (next_start, next_stop, pool.submit(source.read, next_start, next_stop))
                    )
                    break
                yield start, stop, rows
                del rows  # let the block go before the next one is awaited
        finally:
            for _, _, future in pending:
                future.cancel()

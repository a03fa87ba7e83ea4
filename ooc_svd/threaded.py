"""Work on a stream of items in threads, results in order, with a bounded number in flight."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from queue import Full, Queue
from typing import Any, TypeVar

Result = TypeVar("Result")


def map_in_order(function: Callable[[Any], Result], items: Iterable[Any],
                 threads: int = 2) -> Iterator[Result]:
    """``function(item)`` for each item, computed by ``threads`` threads, yielded in order.

    Items are taken from ``items`` only as results are consumed, so at most ``threads + 1``
    items and results are held: memory stays bounded however long the stream. Useful when
    ``function`` releases the GIL (numba ``nogil`` kernels, numpy, decompression).
    """
    with ThreadPoolExecutor(max(int(threads), 1)) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) > threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def read_ahead(items: Iterator[Result], depth: int = 1) -> Iterator[Result]:
    """The items of ``items``, produced by a thread of their own up to ``depth`` ahead.

    For a sequential producer that releases the GIL (file reads, gunzip): it runs beside the
    consumer instead of in turn with it. Errors are raised where the item would have come;
    closing the generator stops the producer at its next item.

    Closing never touches the queue: Ctrl-C raised in the consumer while it held the
    queue's lock (between the lock's acquire and the ``with`` that releases it) can leave
    that lock held for good, and a close that waited on the queue would then hang. The
    producer looks at ``stop`` between timed puts instead, and one stuck on the lock is
    left behind after PRODUCER_STOP_S (a daemon thread: it does not keep Python alive).
    """
    queue: Queue = Queue(maxsize=max(int(depth), 1))
    stop = threading.Event()
    done = object()

    def hand_over(entry: tuple[Any, BaseException | None]) -> bool:
        """Put ``entry`` in the queue once there is room; False if the consumer stopped."""
        while not stop.is_set():
            with contextlib.suppress(Full):
                queue.put(entry, timeout=0.05)
                return True
        return False

    def produce() -> None:
        try:
            for item in items:
                if not hand_over((item, None)):
                    return
            hand_over((done, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            hand_over((done, error))

    producer = threading.Thread(target=produce, name="ooc-svd-read-ahead", daemon=True)
    producer.start()
    try:
        while True:
            item, error = queue.get()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        stop.set()
        producer.join(PRODUCER_STOP_S)


# How long closing ``read_ahead`` waits for its producer to end: the item it is reading,
# then at most one timed put.
PRODUCER_STOP_S = 10.0

"""Progress bars on stderr (tqdm): of the bytes of A that a pass reads, and of the rows and
entries that a conversion writes."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def progress_bars(progress: bool | None) -> Callable[..., Any]:
    """A factory ``bar(name, total, unit='B')`` of tqdm bars: shown when ``progress`` is
    True, or when it is None and stderr is a terminal; otherwise disabled (they count
    nothing and print nothing)."""
    from tqdm import tqdm

    enabled = sys.stderr.isatty() if progress is None else bool(progress)

    def bar(name: str, total: int, unit: str = "B") -> Any:
        # Bytes in powers of 1000, so a pass shows GB/s and its ETA. A terminal's bar goes
        # when its work ends; a log keeps each bar's last state, at 100%, with its time.
        return tqdm(total=total, desc=name, unit=unit, unit_scale=True, unit_divisor=1000,
                    leave=not sys.stderr.isatty(), disable=not enabled, file=sys.stderr)

    return bar

"""Row-block readers for the matrices ooc_svd streams."""

from .dense import DenseSource, open_dense_source
from .prefetch import prefetch_blocks

__all__ = ["DenseSource", "open_dense_source", "prefetch_blocks"]

"""Row-block readers for the matrices ooc_svd streams."""

from .csr import CSRBlock, CSRSource, CSRWriter, csr_source_from_scipy, is_sparse_block
from .dense import DenseSource, open_dense_source
from .open import open_source
from .prefetch import prefetch_blocks

__all__ = [
    "CSRBlock",
    "CSRSource",
    "CSRWriter",
    "DenseSource",
    "csr_source_from_scipy",
    "is_sparse_block",
    "open_dense_source",
    "open_source",
    "prefetch_blocks",
]

"""ooc_svd: truncated SVD and PCA of matrices too large for memory, in q + 1 passes.

    >>> import ooc_svd
    >>> result = ooc_svd.svd("matrix.zarr", k=20)
    >>> U, S, V = result
"""

__version__ = "0.1.0"

from .api import SVDResult, pca_lowrank, svd, svd_lowrank, svd_plan  # noqa: E402
from .errors import (  # noqa: E402
    InputError,
    NonFiniteError,
    OOCSVDError,
    OutputExistsError,
    PlanError,
    ReadError,
    StoreNotFoundError,
)

__all__ = [
    "InputError",
    "NonFiniteError",
    "OOCSVDError",
    "OutputExistsError",
    "PlanError",
    "ReadError",
    "SVDResult",
    "StoreNotFoundError",
    "__version__",
    "pca_lowrank",
    "svd",
    "svd_lowrank",
    "svd_plan",
]

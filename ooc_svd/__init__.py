"""ooc_svd: truncated SVD and PCA of matrices too large for memory, in q + 1 passes.

    >>> import ooc_svd
    >>> result = ooc_svd.svd("matrix.zarr", k=20)
    >>> U, S, V = result
"""

__version__ = "0.1.0"

from . import convert  # noqa: E402 - the module: ooc_svd.convert.convert(...), from_mtx, ...
from .accuracy import LowRankFactors  # noqa: E402
from .api import low_rank_factors, pca_lowrank, svd, svd_lowrank, svd_plan  # noqa: E402
from .errors import (  # noqa: E402
    CheckpointError,
    ClusterError,
    InputError,
    MissingDependencyError,
    NonFiniteError,
    OOCSVDError,
    OutputExistsError,
    PlanError,
    ReadError,
    StoreNotFoundError,
)
from .result import SVDResult, rank_for_energy  # noqa: E402

__all__ = [
    "CheckpointError",
    "ClusterError",
    "InputError",
    "LowRankFactors",
    "MissingDependencyError",
    "NonFiniteError",
    "OOCSVDError",
    "OutputExistsError",
    "PlanError",
    "ReadError",
    "SVDResult",
    "StoreNotFoundError",
    "__version__",
    "convert",
    "low_rank_factors",
    "pca_lowrank",
    "rank_for_energy",
    "svd",
    "svd_lowrank",
    "svd_plan",
]

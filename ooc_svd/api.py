"""Public functions: ``svd``, ``svd_lowrank`` and ``pca_lowrank``.

They validate their arguments, plan the run, and hand trusted arguments to the engine.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from . import __version__
from .accuracy import LowRankFactors, spectral_residual_estimate
from .centering import Centering
from .checkpoint import Checkpoint, holds_a_pass
from .engine import (
    Factors,
    RankRule,
    adaptive_randomized_svd,
    exact_svd,
    fixed_rank,
    gram_svd,
    krylov_svd,
    randomized_svd,
    rank_above,
    rank_above_rounding,
    rank_for_tolerance,
    rounding_unit,
)
from .errors import (
    CheckpointError,
    InputError,
    NonFiniteError,
    OutputExistsError,
    PlanError,
    check_int,
    check_number,
    check_seed,
)
from .kernels.backend import CPUKernels
from .kernels.cpu import first_non_finite_row
from .kernels.csr import first_non_finite_row as first_non_finite_sparse_row
from .kernels.csr import scatter_threads
from .kernels.cuda_backend import (
    STREAMS,
    CUDAKernels,
    DeviceNeed,
    check_cuda_options,
    cuda_available,
    gpu_choice,
    out_of_memory_named,
    require_cuda,
)
from .kernels.row_shift import RowShiftKernels
from .passes import PassContext
from .plan import DEFAULT_MEMORY_LIMIT, MAX_EXACT_COLUMNS, Plan, make_plan
from .progress import progress_bars
from .result import SVDResult, assemble_result, provenance
from .sources import CSRSource, DenseSource, is_sparse_block, open_source
from .sources.dense import is_torch_tensor, not_a_matrix, refuse_masked
from .sources.difference import check_subtrahend, sparse_column, subtract, transposed
from .sources.open import is_torch_sparse
from .sources.paths import files_state, local_paths, stored_chunk_files
from .store import (
    LeftVectors,
    OutputLock,
    ResultWriter,
    check_apart_from_inputs,
    check_output_path,
    check_scratch_dir,
    paths_overlap,
)
from .units import parse_bytes

log = logging.getLogger(__name__)


def svd(
    A: Any,
    k: int | None = None,
    *,
    tol: float | None = None,
    max_rank: int | None = None,
    oversample: int = 10,
    niter: int = 2,
    center: bool = False,
    mean: Any = None,
    method: str = "auto",
    seed: int = 0,
    memory_limit: int | str | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    scratch_dir: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    spectral_iters: int = 0,
    write_factors: bool = False,
    client: Any = None,
    backend: str = "auto",
    cuda_options: dict | None = None,
) -> SVDResult:
    """Top-k singular value decomposition of a matrix too large for memory.

    Reads A in row blocks (of whole storage chunks for dense stores, of about equal bytes
    for sparse ones): ``niter + 1`` reads for the randomized and block Krylov methods
    (Halko, Martinsson & Tropp 2011, with subspace iteration fused so each power iteration
    costs one read, not two), two for the exact one. Memory is bounded by
    ``memory_limit`` whatever the number of rows.

    Parameters
    ----------
    A : {ndarray, memmap, scipy.sparse matrix, str, os.PathLike, zarr.Array, zarr.Group, \
dask.array.Array} of shape (m, n)
        The matrix: in memory, a ``.npy`` path, a zarr array or the path/URL of a zarr array
        (formats 2 and 3), or a dask array (its blocks are read one slice at a time, no
        scheduler needed). Sparse: a zarr group in the CSR layout (path, URL or group; see
        ``ooc_svd.sources.csr``), any scipy.sparse matrix or array, or a scipy.sparse
        ``.npz`` path; never densified, PCA centering included. It is opened read-only and
        never modified.
    k : int, optional
        Number of singular triplets, 1 <= k <= min(m, n). Give k or ``tol``.
    tol : float, optional
        Fixed-accuracy mode: return the smallest rank whose relative Frobenius residual
        ||A - U S V^T||_F / ||A||_F is at most tol (0 < tol < 1). The exact and gram methods
        find it from the full spectrum in their two reads; the randomized method grows its
        basis by blocks of 32 columns, each costing niter + 1 reads, until the (exact, free)
        residual of the basis is below tol or the basis holds max_rank + oversample
        columns, then makes one final read. Each method resolves residuals down to its
        rounding only (``ooc_svd.plan.smallest_tol``): about 1.5e-5 for randomized, which
        grows its basis to the cap for a smaller tol, and twice 4 sqrt(n eps) for gram;
        'auto' prefers the methods that resolve tol (exact resolves any), and
        ``result.note`` says when a tol is not confirmed.
    max_rank : int, optional
        Cap on the rank in fixed-accuracy mode; min(m, n) by default, and at most (a larger
        cap is taken as min(m, n), as ``svd_lowrank`` takes q). A rank capped here is
        as accurate as the same k would give: the randomized basis is oversampled beyond it.
    oversample : int, default=10
        Extra basis vectors: the basis has l = k + oversample columns.
    niter : int, default=2
        Power (subspace) iterations q; each costs one read of A.
    center : bool, default=False
        Subtract the column mean (PCA), implicitly: no m x n temporary is formed, and the
        mean is computed in the first pass.
    mean : array_like of shape (n,) or (1, n), optional
        A row to subtract implicitly instead of the computed mean (torch's ``M`` when it
        is a row; :func:`svd_lowrank` also takes a column or a full m x n ``M``).
    method : {'auto', 'randomized', 'krylov', 'exact', 'gram'}, default='auto'
        'randomized': niter + 1 reads, sampling error as in Halko et al.
        'krylov': block Krylov, the same niter + 1 reads keeping every iterate; a final
        basis (niter + 1) l wide; far more accurate on flat spectra (Musco & Musco 2015).
        'exact': TSQR of A (an n x n R, n <= 4096), then the final pass over A V_k for U, S
        and V; singular values accurate to eps * sigma_1.
        'gram': G = A^T A by dsyrk, its eigendecomposition, and the same final pass; the
        fastest for small n, with V_k's span accurate to about
        eps * sigma_1^2 / (sigma_k^2 - sigma_k+1^2), where the exact method's is
        eps * sigma_1 / (sigma_k - sigma_k+1): squared conditioning.
        'auto' picks the cheapest by a cost model and says why in ``result.plan.reason``;
        when it picks 'gram' and the spectrum is too ill-conditioned for it (sigma_k
        known to less than 1e-8 relative, or the data's rounding unit if larger), it
        finishes with 'exact' (one more read) and says so in ``result.note``.
    seed : int, default=0
        Seed of the counter-based generator of the test matrix, in [0, 2**64); the same
        seed gives the same result for any chunking, block size or thread count, to
        rounding (sums taken in another order) and within ``numerical_rank`` (past it the
        columns of U and V complete the basis, and any completion is one).
    memory_limit : int or str, default='1GB'
        Bound on the working set (blocks in flight, n x l factors). An in-memory U (m x k)
        comes on top: give ``out`` when U itself is too large for memory.
    out : str or os.PathLike, optional
        A local zarr group to write U, S, V (and the mean) into, with provenance attributes.
        Written under a temporary name and renamed when complete.
    overwrite : bool, default=False
        Replace an existing ``out``.
    progress : bool, optional
        Show a progress bar per pass on stderr; by default only when stderr is a terminal.
    scratch_dir : str, optional
        Directory for the final pass's spilled Q factors (m x (l + 1) float64, l = k for
        the exact and gram methods, and an l x l pair per block); the system's temporary
        directory by default; a local run leaves it unused when they fit under
        memory_limit.
    checkpoint : str or os.PathLike, optional
        Directory for the state after each complete pass (n x l or n x n arrays). By default
        ``OUT.checkpoint`` when ``out`` is given, none otherwise. Removed on success.
    resume : bool, default=False
        Continue from the checkpoint of a killed run with the same input and parameters,
        skipping its completed passes; the result equals an uninterrupted run's.
    spectral_iters : int, default=0
        Estimate ||A - U S V^T||_2 by this many power iterations on the residual, each one
        more read of A and of U; ``result.spectral_error``, a lower bound (5 iterations were
        1.2% low on a decaying spectrum, 7.6% on a random sparse matrix's flat one).
    write_factors : bool, default=False
        With ``out``, also write the low-rank factors B = U diag(S) (m x k) and A = V^T.
    client : {distributed.Client, str}, optional
        Run every pass on a dask.distributed cluster: a Client, a scheduler address
        (``'tcp://HOST:PORT'``), or ``'local:N'`` for a LocalCluster of N worker processes
        made for this run and closed at its end. Each pass maps a task over groups of row
        blocks and reduces their results in a tree; the workers read their own blocks (A
        never passes through the client or the scheduler: stores are opened by the workers,
        in-memory arrays are scattered to them once), a lost worker's tasks are recomputed
        with the same result. ``scratch_dir`` must then be a directory every worker reaches
        (a shared filesystem on several nodes); U (m x k) is written by the workers into
        ``out`` when they reach it, else returned here. See ``ooc_svd.distributed``.
    backend : {'auto', 'cpu', 'cuda'}, default='auto'
        Where the products of the randomized and Krylov passes (and the final pass of the
        exact and gram methods) run: 'cuda'
        streams the blocks through an NVIDIA GPU (numba-cuda, the ``cuda`` extra), copying
        block i + 1 while block i computes; 'auto' uses it when a usable GPU is present
        with the run's device memory free, and says so in ``result.backend``. With 'cuda',
        too little free device memory is a PlanError. The gram and exact methods factor A
        on the CPU, and 'auto' leaves them wholly there in a local run (a cluster's
        workers with a GPU take their final pass).
    cuda_options : dict, optional
        Settings of the cuda backend, used wherever it runs (here or on the workers):
        ``accumulate`` ('float64', the default, or 'float32': in-tile sums in float32, for
        GPUs with a small float64 rate; it loses the directions below about 3e-4 sigma_1),
        ``csr_transposed`` ('scatter', the default, or 'columns': CSR blocks' A^T Y formed
        from a copy reordered by columns on the device, without a float64 atomic per
        non-zero, at the cost of that copy) and ``streams`` (2 by default). An error with
        backend='cpu'.

    Returns
    -------
    SVDResult
        U, S, V, the mean, the relative Frobenius residual and the run's diagnostics.
        Unpacks as ``U, S, V``.

    Raises
    ------
    InputError
        Bad arguments, a non-numeric dtype, k out of range, a mean of the wrong shape.
    NonFiniteError
        NaN or Inf in A; the message names the first offending row.
    StoreNotFoundError, ReadError
        A missing or unreadable store, or a chunk that cannot be read. A failed run keeps
        its checkpoint once it holds a pass, for ``resume``.
    PlanError
        The run cannot fit ``memory_limit``; the message gives the numbers.
    CheckpointError
        ``resume`` with a checkpoint of other parameters or input, or one that cannot be
        read (it is kept).

    References
    ----------
    N. Halko, P.-G. Martinsson, J. A. Tropp, "Finding structure with randomness",
    SIAM Review 53(2), 2011.
    """
    source, m, n = open_matrix(A, load_limit=limit_bytes(memory_limit))
    k, rule, tol = _rank_request(k, tol, max_rank, m, n)
    request = _Request(
        k, rule, tol, oversample, niter, center, mean, method, seed, memory_limit, out,
        overwrite, progress, scratch_dir, checkpoint, resume,
        check_int("spectral_iters", spectral_iters, minimum=0), bool(write_factors),
        client=client, backend=backend, cuda_options=cuda_options,
    )
    return _run(source, request)


def svd_plan(
    A: Any,
    k: int | None = None,
    *,
    tol: float | None = None,
    max_rank: int | None = None,
    oversample: int = 10,
    niter: int = 2,
    method: str = "auto",
    memory_limit: int | str | None = None,
    spectral_iters: int = 0,
    backend: str = "auto",
    cuda_options: dict | None = None,
    client: Any = None,
) -> Plan:
    """The plan :func:`svd` would follow, without reading any data.

    Same arguments as :func:`svd`; raises the same errors for them (a memory limit too
    small, k out of range, backend='cuda' without a usable GPU, ...).
    ``plan.describe()`` says what the run would do and why, and ``plan.backend`` where its
    kernels would run. With ``client``, the plan of a run on that cluster, which is not
    contacted: its workers keep no block cache and choose their own kernels.
    """
    source, m, n = open_matrix(A, load_limit=limit_bytes(memory_limit))
    k, rule, tol = _rank_request(k, tol, max_rank, m, n)
    request = _Request(k, rule, tol, oversample, niter, method=method,
                       memory_limit=memory_limit,
                       spectral_iters=check_int("spectral_iters", spectral_iters, minimum=0),
                       client=client, backend=_check_backend(backend))
    return _plan_run(source, request, _check_cuda_options(backend, cuda_options))


def _plan_run(source: DenseSource | CSRSource, request: _Request, cuda_options: dict) -> Plan:
    """The run's plan, with where its kernels run (``Plan.backend``): a GPU's pinned host
    buffers count against the memory limit, and its device memory decides 'auto'."""
    # On a cluster the workers choose their own kernels (distributed.worker_kernels).
    on_cluster = request.client is not None
    gpu = not on_cluster and _wants_gpu(request.backend)

    def plan_for(gpu_streams: int) -> Plan:
        # Workers read every block for every pass: only a local run keeps a block cache.
        return _plan(source, request.k, request.oversample, request.niter, request.method,
                     request.memory_limit, request.tol, gpu_streams,
                     request.spectral_iters, cache_blocks=not on_cluster)

    if gpu:
        streams = cuda_options.get("streams", STREAMS)
        try:
            plan = plan_for(streams)
        except PlanError as error:
            plan = _without_staging(error, plan_for, request.backend, streams)
            return replace(plan, backend="cpu", backend_reason="the cuda backend's pinned "
                           "staging buffers do not fit memory_limit")
    else:
        plan = plan_for(0)
    if on_cluster:
        reason = "each worker chooses its kernels" if request.backend == "auto" else ""
        return replace(plan, backend=f"{request.backend} on the workers",
                       backend_reason=reason)
    name, reason = _kernel_choice(request.backend, gpu, plan, cuda_options)
    if gpu and name == "cpu":
        plan = plan_for(0)  # no pinned staging buffers after all: room for larger blocks
    if name == "cpu" and cuda_options:
        reason += "; the cuda_options are unused"
    return replace(plan, backend=name, backend_reason=reason)


def _without_staging(error: PlanError, plan_for, backend: str, streams: int) -> Plan:
    """The plan without a GPU's pinned staging buffers, where only they kept a plan with
    them from the memory limit: 'auto' then runs on the CPU; 'cuda' is refused, saying so.
    Otherwise ``error``, the plan's own refusal."""
    try:
        plan = plan_for(0)
    except PlanError:
        raise error from None
    if backend == "cuda":
        raise PlanError(f"{error}; the cpu backend's plan fits: the cuda backend's pinned "
                        f"staging buffers ({streams} streams) are what does not; raise "
                        "memory_limit, or lower cuda_options['streams']",
                        error.needed_bytes) from None
    return plan


def _plan(source: DenseSource | CSRSource, k, oversample, niter, method, memory_limit,
          tol: float | None = None, gpu_streams: int = 0, spectral_iters: int = 0,
          cache_blocks: bool = True) -> Plan:
    """The run's plan; ``gpu_streams``: the CUDA streams whose pinned host buffers the
    memory limit must hold too (0 without a GPU); ``cache_blocks``: whether the passes
    keep leading blocks for the later passes, where reading them costs decoding."""
    oversample = check_int("oversample", oversample, minimum=0)
    niter = check_int("niter", niter, minimum=0)
    limit = limit_bytes(memory_limit)
    sparse = isinstance(source, CSRSource)
    return make_plan(source.shape, source.block_dtype.itemsize, source.chunk_rows, k,
                     oversample, niter, method, limit, spectral_iters=spectral_iters,
                     tol=tol, cacheable=cache_blocks and source.cache_pays,
                     chunk_bytes=source.chunk_bytes if sparse else None,
                     nnz=source.nnz if sparse else None,
                     row_pairs=source.row_pairs if sparse else 0.0,
                     scatter_copies=scatter_threads(),
                     read_overhead_bytes=source.read_overhead_bytes,
                     read_row_overhead=source.read_row_overhead,
                     read_factor=source.read_factor,
                     # (sources that decode read a store's chunks; the others have none)
                     storage_chunks=source.decodes,
                     loaded_bytes=source.loaded_bytes,
                     transposed_by=_transposed_by(source),
                     # Host copies of a block beside the plan's: a pinned staging buffer
                     # per stream, and a block being moved into the page-locked cache;
                     # per stream, pinned copies of the final pass's Y_i and Q_i.
                     staging_blocks=gpu_streams + 1 if gpu_streams else 0,
                     staging_matrices=2 * gpu_streams)


def limit_bytes(memory_limit: Any) -> int:
    """The memory limit in bytes: ``memory_limit`` parsed, DEFAULT_MEMORY_LIMIT for None."""
    return parse_bytes(DEFAULT_MEMORY_LIMIT if memory_limit is None else memory_limit)


def _transposed_by(source: DenseSource | CSRSource) -> str | None:
    """How A^T can be had (``make_plan``'s ``transposed_by``): 'memory' for a matrix held in
    memory, 'convert' for a store or file that ooc-svd convert --transpose reads (a sparse
    one loaded whole too), else None (a dask array, A - M)."""
    if isinstance(source, CSRSource):
        held = isinstance(source.data, np.ndarray) and not source.loaded_bytes
        return "memory" if held else "convert"
    if source.kind == "numpy":
        return "memory"
    return "convert" if source.kind.startswith("zarr") or source.kind in ("npy", "npz") \
        else None


def svd_lowrank(A: Any, q: int | None = 6, niter: int | None = 2, M: Any = None, *,
                method: str = "auto", seed: int = 0, memory_limit: int | str | None = None,
                client: Any = None):
    """torch.svd_lowrank's semantics out of core: ``U, S, V`` of A - M, q triplets.

    Parameters
    ----------
    A : as in :func:`svd`, of shape (m, n); or, as torch takes, a stack of matrices of shape
        (*, m, n) held as a numpy, torch (dense) or dask array, factored one matrix at a
        time (each with the same seed)
    q : int, default=6
        Size of the subspace and number of triplets returned: min(q, m, n), as torch's.
        q=0 and an empty A (m or n zero) give empty factors, as torch's, without a pass.
    niter : int, default=2
        Subspace iterations, at least 0 (torch runs none for a negative niter; it is
        refused here), of the randomized and Krylov methods; None is 2, as in torch.
    method : str, default='auto'
        Keyword only, beyond torch's signature: as in :func:`svd`. 'auto' may take the
        exact or gram method (for at most 4096 columns, where it costs at most twice the
        cheapest approximate one), which needs no niter, or block Krylov; 'randomized' is
        torch's method.
    seed, memory_limit : optional
        Keyword only, as in :func:`svd`: the same seed gives the same result (torch draws
        from its global generator instead; ``torch.manual_seed`` has no effect here).
    M : array_like, optional
        What to subtract, broadcast to A's shape as torch does (for a stack, M's leading
        dimensions broadcast to A's, and each matrix takes its own): a row ((n,), (1, n), a
        scalar, or an m x n array whose rows share memory, as ``expand`` and
        ``np.broadcast_to`` make) is subtracted implicitly, A left as it is; so is a
        column ((m, 1), or such a view that repeats one column) from a sparse A of more
        than 4096 columns, by rank-one corrections in float64, with the method chosen as
        for A alone (on a GPU the final pass then factors each block on the host; on a
        cluster the blocks are densified instead). Any other M (numpy, torch, zarr or
        dask), m x n, or a column with a dense A or one of at most 4096 columns (whose
        exact methods need the difference itself), is subtracted from each block as it is
        read, which makes the blocks dense (a view that repeats a column is read as that
        column).
    client : {distributed.Client, str}, optional
        Run on a dask.distributed cluster, as in :func:`svd`.

    Returns
    -------
    U : ndarray of shape (*, m, q)
    S : ndarray of shape (*, q)
    V : ndarray of shape (*, n, q)
        torch tensors on A's device when A is a torch tensor, as torch returns them (not
        attached to autograd); float32 for float32 and half-precision data (S too: a
        singular value beyond float32's range is inf, with a warning).

    Notes
    -----
    A wide A held in memory (m < n: a numpy, torch or scipy.sparse matrix, not a dask array,
    a .npy file or a store, whose A^T would read every chunk for each block) is factored as
    A^T, as torch does, so that the n x q arrays are the short side's, and the random
    sketch is A^T's: a randomized or Krylov result differs from that of the same values in
    a store. So is A - M for an M held in memory, but for a sparse A whose M^T would not be
    a row of A^T where A^T has at most 4096 columns (or on a cluster): A^T - M^T would be
    densified, where A - M keeps A's sparsity. A sparse A^T is made CSR, a copy of A that
    ``memory_limit`` does not count.
    """
    niter, options = _torch_keywords(q, niter, method, seed, memory_limit, client)
    return _like_input(A, _per_matrix(
        A, M, _unless_empty(q, client),
        lambda A_i, M_i, client: _svd_lowrank(
            open_matrix(A_i, allow_empty=True, load_limit=limit_bytes(memory_limit))[0],
            q, niter, M_i, replace(options, client=client)),
        lambda m, n: min(6 if q is None else q, m, n)))


@dataclass(frozen=True)
class _TorchOptions:
    """The torch functions' keywords beyond torch's signature, for each matrix's run."""

    method: str
    seed: int
    memory_limit: int | str | None
    client: Any

    def request(self, q: int, niter: int, **fields: Any) -> _Request:
        return _Request(q, fixed_rank(q), oversample=0, niter=niter, method=self.method,
                        seed=self.seed, memory_limit=self.memory_limit, client=self.client,
                        **fields)


def _outside_the_package() -> int:
    """The stacklevel of a warning issued by the caller that points at the first frame
    outside ooc_svd: the user's call, however deep the package's own calls go."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1  # the warning's issuer, level 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _svd_lowrank(source: DenseSource | CSRSource, q: int | None, niter: int, M: Any,
                 options: _TorchOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """svd_lowrank of one matrix, as numpy arrays."""
    m, n = source.shape
    # As torch's: q beyond min(m, n) gives min(m, n) triplets (its QR of A's sketch is
    # no wider).
    q = min(check_int("q", 6 if q is None else q, minimum=0), m, n)
    if q == 0:
        if M is not None:  # torch's A - M refuses it too
            check_subtrahend(M, (m, n))
        return _empty_factors(source)
    flipped = _wide_as_tall(source, M, options.client)
    if flipped is not None:
        A_T, M_T = flipped
        try:
            U, S, V = _svd_lowrank(open_matrix(A_T)[0], q, niter, M_T, options)
        except InputError as error:
            raise _said_of_a(error, source) from None
        return V, S, U
    client = options.client
    mean = column = None
    if M is not None:
        # Beyond MAX_EXACT_COLUMNS the exact and gram methods, which need the blocks of
        # A - M themselves, are out of reach; the randomized and Krylov kernels take a
        # column of M from a sparse A as it is (the method then follows the sparse cost
        # model, as for A alone).
        if client is None and n > MAX_EXACT_COLUMNS:
            column = sparse_column(source, M)
        if column is None:
            source, mean = subtract(source, M)
    return _torch_factors(_run(source, options.request(q, niter, mean=mean,
                                                      row_shift=column)))


def _torch_factors(result: SVDResult) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """U, S, V of a run, S in U's dtype as torch returns it. A float32 run's S beyond
    float32's range, which svd keeps as float64 with a note, is inf, with a warning."""
    S = result.S
    if S.dtype != result.U.dtype:
        warnings.warn(f"S holds values beyond {result.U.dtype.name}'s range (the largest "
                      f"{float(S.max()):.4g}), returned as inf in the dtype of U and V, as "
                      "torch's functions return S; pass A as float64 to have them",
                      RuntimeWarning, stacklevel=_outside_the_package())
        with np.errstate(over="ignore"):
            S = S.astype(result.U.dtype)
    return result.U, S, result.V


def _wide_as_tall(source: DenseSource | CSRSource, M: Any, client: Any) -> tuple | None:
    """(A^T, M^T) for a wide A (m < n) to factor as torch does, its transpose: a tall
    matrix, whose n x q arrays are the short side's (a 1000 x 10^6 A needed gigabytes of
    them). None for an A or an M not held in memory (the transpose of a store or a .npy
    file would be read by columns, and a cluster's workers could no longer read A from its
    path), and for a sparse A^T of at most MAX_EXACT_COLUMNS columns whose M^T is not a row
    (or on a cluster, whatever its columns): A^T - M^T would be densified, where A - M keeps
    A's sparsity. The sparse A^T is converted to CSR by the run, a copy of A."""
    m, n = source.shape
    on_disk = isinstance(source, DenseSource) and isinstance(source.array, np.memmap)
    if m >= n or on_disk:
        return None
    M_T = None
    if M is not None:
        M_T = transposed(M, (m, n))
        if M_T is None:
            return None
        keeps_sparsity = M_T.strides[0] == 0 or (m > MAX_EXACT_COLUMNS and client is None)
        if isinstance(source, CSRSource) and not keeps_sparsity:
            return None
    A_T = _in_memory_transpose(source)
    return None if A_T is None else (A_T, M_T)


def _said_of_a(error: InputError, source: DenseSource | CSRSource) -> InputError:
    """An error of the run on A^T (``_wide_as_tall``) as said of A, held in memory: a NaN
    or Inf by its row of A (A^T's rows are A's columns); anything else (a memory limit, a
    shape) noted as of A^T."""
    if isinstance(error, NonFiniteError):
        named = _non_finite_row_error(source)
        if named is not None:
            return named
    error.args = (f"{error} (of A^T: a wide A held in memory is factored through its "
                  "transpose, as torch factors it)",)
    return error


def _non_finite_row_error(source: DenseSource | CSRSource) -> NonFiniteError | None:
    """The NonFiniteError naming the first row of A, held in memory, that holds a NaN or
    Inf; None if none does. (A pass over A: only on the way to an error.)"""
    block = source.read(0, source.shape[0])  # the matrix itself
    bad = (first_non_finite_sparse_row if is_sparse_block(block) else
           first_non_finite_row)(block)
    return None if bad is None else \
        NonFiniteError(f"the matrix holds NaN or Inf, first at row {bad}")


def _empty_factors(source: DenseSource | CSRSource) -> tuple[np.ndarray, ...]:
    """U (m, 0), S (0,), V (n, 0), as torch gives them for an empty A or q=0."""
    m, n = source.shape
    dtype = _result_dtype(source.dtype)
    return np.zeros((m, 0), dtype), np.zeros(0, dtype), np.zeros((n, 0), dtype)


def pca_lowrank(A: Any, q: int | None = None, center: bool = True, niter: int | None = 2, *,
                method: str = "auto", seed: int = 0, memory_limit: int | str | None = None,
                client: Any = None):
    """torch.pca_lowrank's semantics out of core: ``U, S, V`` of the column-centered A.

    q defaults to min(6, m, n); q=0 and an empty A give empty factors, as torch's. Centering
    is implicit: huge inputs are never densified or copied. The principal directions are the
    columns of V, and the explained variances are S**2 / (m - 1). ``method``, ``seed`` and
    ``memory_limit`` (keyword only, beyond torch's signature) are as in :func:`svd`;
    'krylov' is the accurate choice for flat spectra at the same reads. ``client`` runs it
    on a dask.distributed cluster, as in :func:`svd`. U, S, V are torch tensors on A's
    device when A is a torch tensor, as in :func:`svd_lowrank`, which also says how a stack
    of matrices (*, m, n) is taken (each is centered by its own mean), how a wide A is
    factored (centered A^T less the column of means), and what niter=None means.
    """
    def factor(A_i: Any, _: None, client: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        source, m, n = open_matrix(A_i, allow_empty=True,
                                   load_limit=limit_bytes(memory_limit))
        if q is None and min(m, n) == 0:
            return _empty_factors(source)
        rank = _check_q(min(6, m, n) if q is None else q, m, n)
        if rank == 0:
            return _empty_factors(source)
        run = replace(options, client=client)
        # A wide A in memory is factored as A^T less the column of A's means, as torch
        # factors it; whether it is, a row stands in for the means to tell, before they are
        # computed (from memory: no pass over a store).
        if m < n and _checked_center(center) and \
                _wide_as_tall(source, np.zeros(n), client) is not None:
            return _svd_lowrank(source, rank, niter, _column_means(source), run)
        if m < n and not center:
            return _svd_lowrank(source, rank, niter, None, run)  # flipped where it can be
        return _torch_factors(_run(source, run.request(rank, niter, center=center)))

    niter, options = _torch_keywords(q, niter, method, seed, memory_limit, client)
    return _like_input(A, _per_matrix(
        A, None, _unless_empty(q, client), factor,
        lambda m, n: min(6, m, n) if q is None else _check_q(q, m, n)))


def _column_means(source: DenseSource | CSRSource) -> np.ndarray:
    """Column means in float64 of an A held in memory (``_wide_as_tall`` took it); a NaN or
    Inf among them is A's, named by its row."""
    means = np.asarray(_in_memory(source).mean(axis=0, dtype=np.float64)).reshape(-1)
    if not np.isfinite(means).all():
        raise _non_finite_row_error(source) or NonFiniteError(
            "the column means of the matrix overflow float64; rescale the matrix")
    return means


def _unless_empty(q: int | None, client: Any) -> Any:
    """The client for the runs of the torch functions: none for q=0, whose factors are
    empty (a stack's runs would connect to it, or start a local cluster, for nothing)."""
    return None if q == 0 else client


def _torch_keywords(q: Any, niter: Any, method: str, seed: int, memory_limit: Any,
                    client: Any) -> tuple[int, _TorchOptions]:
    """The torch functions' niter (None is 2, as torch reads it) and their runs' options,
    q and niter checked before a stack's cluster is started (each matrix's run checks q
    against its shape)."""
    niter = 2 if niter is None else niter
    if q is not None:
        check_int("q", q, minimum=0)
    check_int("niter", niter, minimum=0)
    return niter, _TorchOptions(method, seed, memory_limit, client)


@contextlib.contextmanager
def _one_client(client: Any):
    """``client``, or for a client given as a string, one Client that the runs of every
    matrix of a stack share: ``local:N`` started a LocalCluster for each."""
    if not isinstance(client, str):
        yield client
        return
    from .distributed import client_from, close_opened

    made, opened = client_from(client)
    try:
        yield made
    finally:
        close_opened(opened)


def _stack_of_matrices(A: Any) -> tuple[int, ...]:
    """The leading dimensions of A when it is a stack of matrices (*, m, n) that the torch
    functions take one matrix at a time: a numpy, dense torch or dask array, whose A[i] is a
    view or stays lazy. () for anything else, which the opener takes as one matrix (and
    refuses if it is not one)."""
    shape = getattr(A, "shape", ())
    stackable = isinstance(A, np.ndarray) or type(A).__module__.startswith("dask") or \
        (is_torch_tensor(A) and not is_torch_sparse(A))
    if len(shape) <= 2 or not stackable:
        return ()
    try:
        return tuple(int(size) for size in shape[:-2])
    except (TypeError, ValueError):  # a dask array of unknown chunk sizes: the opener says so
        return ()


def _per_matrix(A: Any, M: Any, client: Any, factor, width) -> tuple[np.ndarray, ...]:
    """``factor(A, M, client)``, or for a stack of matrices (``_stack_of_matrices``)
    ``factor(A[i], M[i], client)`` for every matrix i, on one client (``_one_client``), its
    results stacked as torch stacks them (U of shape stack + (m, q), ...). M's leading
    dimensions broadcast to the stack's; an M of at most 2 dimensions goes to every matrix
    as it is. A stack of no matrix gives empty factors of ``width(m, n)`` columns each, as
    torch gives them."""
    stack = _stack_of_matrices(A)
    if not stack:
        return factor(A, M, client)
    if isinstance(M, (list, tuple)):
        M = np.asarray(M)
    lead = tuple(getattr(M, "shape", ()))[:-2]
    if len(lead) > len(stack) or any(size not in (1, own) for size, own in
                                      zip(lead[::-1], stack[::-1], strict=False)):
        raise InputError(f"M of shape {tuple(M.shape)} does not broadcast to A's shape "
                         f"{tuple(A.shape)}")
    if 0 in stack:
        return _empty_stack_factors(A, stack, width)
    parts = []
    with _one_client(client) as client:
        for index in np.ndindex(*stack):
            own = index[len(index) - len(lead):] if lead else ()
            M_i = M[tuple(0 if size == 1 else i for size, i in zip(lead, own, strict=True))] \
                if lead else M
            try:
                parts.append(factor(A[index], M_i, client))
            except InputError as error:  # which matrix: the message speaks of A[index]
                error.args = (f"A[{', '.join(map(str, index))}] of the stack: {error}",
                              *error.args[1:])
                raise
    return tuple(np.stack(arrays).reshape(stack + arrays[0].shape) for arrays in zip(*parts,
                                                                                    strict=True))


def _empty_stack_factors(A: Any, stack: tuple[int, ...], width) -> tuple[np.ndarray, ...]:
    """U (stack, m, q), S (stack, q), V (stack, n, q) with q = ``width(m, n)``, of a stack
    of no matrix, in the dtype its matrices' factors would have."""
    m, n = (int(size) for size in A.shape[-2:])
    q = width(m, n)
    # A matrix of none of A's rows, made anew: dask cannot reshape some empty stacks
    no_rows = A.new_empty((0, n)) if is_torch_tensor(A) else np.empty((0, n), A.dtype)
    dtype = _result_dtype(open_matrix(no_rows, allow_empty=True)[0].dtype)
    return (np.zeros(stack + (m, q), dtype), np.zeros(stack + (q,), dtype),
            np.zeros(stack + (n, q), dtype))


def _like_input(A: Any, arrays: tuple[np.ndarray, ...]) -> tuple:
    """``arrays`` as torch returns them for a torch tensor A (tensors on A's device), else
    as they are. A tensor's module is loaded already, so torch is never imported here."""
    if not is_torch_tensor(A):
        return arrays
    torch = sys.modules["torch"]
    return tuple(torch.from_numpy(array).to(A.device) for array in arrays)


@dataclass
class _Request:
    """A validated-later description of a run, shared by the public entry points."""

    k: int  # the rank to plan for: k, or max_rank in fixed-accuracy mode
    rank_rule: RankRule
    tol: float | None = None
    oversample: int = 10
    niter: int = 2
    center: bool = False
    mean: Any = None
    method: str = "auto"
    seed: int = 0
    memory_limit: int | str | None = None
    out: str | os.PathLike | None = None
    overwrite: bool = False
    progress: bool | None = None
    scratch_dir: str | None = None
    checkpoint: str | os.PathLike | None = None
    resume: bool = False
    spectral_iters: int = 0
    write_factors: bool = False
    client: Any = None  # a distributed.Client or scheduler address: run on a cluster
    backend: str = "auto"  # 'auto', 'cpu' or 'cuda': where the block products run
    cuda_options: dict | None = None  # CUDAKernels keywords (checked by _run)
    # A column c (a source of shape (m, 1)) taken from every column of a sparse A by the
    # kernels (``kernels.row_shift``): the run's matrix is A - c 1^T.
    row_shift: Any = None


def low_rank_factors(
    W: Any,
    rank: int | None = None,
    rtol: float | None = None,
    *,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    memory_limit: int | str | None = None,
) -> LowRankFactors:
    """Factor W (m x n) as B @ A with B = U_r diag(S_r) (m x r) and A = V_r^T (r x n).

    The rank, when not given, counts the singular values above what rounding can make
    (``engine.rank_tolerance``): numpy.linalg.matrix_rank's max(m, n) eps S_max with W's
    eps, or eps/2 ||W||_F where that is less (a relative rounding of each value moves no
    singular value further; numpy's reaches S_max itself past 1/eps rows), and at least
    max(m, n) eps64 S_max for the float64 computation. For float64 data that is numpy's
    rule. The SVD is exact (TSQR, two reads of W), so the rank is that of
    the matrix to working precision: a 10 x 10 matrix of rank 2 becomes 10 x 2 and 2 x 10
    factors, 100 parameters 40.

    Parameters
    ----------
    W : as A in :func:`svd`, of shape (m, n); min(m, n) <= 4096 for W in memory (numpy,
        torch, scipy.sparse), n <= 4096 for a store, a dask array, or with ``out``
    rank : int, optional
        The rank to keep, 1 <= rank <= min(m, n).
    rtol : float, optional
        Relative threshold on the singular values; not with ``rank``. The rank kept is at
        least 1: a zero W gives factors of one zero column and row (where
        ``numpy.linalg.matrix_rank`` says 0).
    out : str or os.PathLike, optional
        A zarr group for a W too large for memory: U, S, V and the factors B and A are
        written there, and B is returned as the zarr array.
    overwrite, memory_limit
        As in :func:`svd`.

    Returns
    -------
    LowRankFactors
        B, A, the rank, the parameter counts before (m n) and after (r (m + n)), and the
        relative Frobenius error ||W - B A||_F / ||W||_F. Unpacks as ``B, A``.
    """
    source, m, n = open_matrix(W, load_limit=limit_bytes(memory_limit))
    if n > MAX_EXACT_COLUMNS:
        # In memory the transpose is free: W^T = B' A' gives W = A'^T B'^T.
        transposed = _in_memory_transpose(source) if m <= MAX_EXACT_COLUMNS else None
        if transposed is None or out is not None:
            raise InputError(
                f"low_rank_factors factors W ({m} x {n}) exactly through an n x n factor, so "
                f"n may not exceed {MAX_EXACT_COLUMNS}"
                + ("; for W held in memory and without out, W^T is factored instead"
                   if m <= MAX_EXACT_COLUMNS else "; svd() with a rank k has no such limit"))
        factors = low_rank_factors(transposed, rank, rtol, memory_limit=memory_limit)
        return LowRankFactors(np.ascontiguousarray(factors.A.T), np.ascontiguousarray(factors.B.T),
                              factors.rank, factors.parameters_before, factors.parameters_after,
                              factors.relative_error)
    if rank is not None and rtol is not None:
        raise InputError("give rank or rtol, not both")
    if rank is not None:
        rank = check_int("rank", rank, minimum=1)
        if rank > min(m, n):
            raise InputError(f"rank={rank} exceeds min(m, n) = {min(m, n)}")
        rule = fixed_rank(rank)
    elif rtol is None:
        rule = rank_above_rounding(rounding_unit(source.dtype), (m, n))
    else:
        rule = rank_above(check_number("rtol", rtol))
    request = _Request(min(m, n), rule, oversample=0, method="exact", memory_limit=memory_limit,
                       out=out, overwrite=overwrite, write_factors=out is not None)
    result = _run(source, request)
    r = result.rank
    B = result.store["B"] if out is not None else np.asarray(result.U) * result.S
    return LowRankFactors(B, np.ascontiguousarray(result.V.T), r, m * n, r * (m + n),
                          result.residual)


def _in_memory_transpose(source: DenseSource | CSRSource) -> Any:
    """The transpose of a matrix held in memory (numpy, torch, scipy.sparse), else None:
    a store's or a dask array's transpose would be read by columns."""
    matrix = _in_memory(source)
    return None if matrix is None else matrix.T


def _in_memory(source: DenseSource | CSRSource) -> Any:
    """The matrix itself, a numpy array or scipy.sparse CSR matrix, where it is held in
    memory (numpy, torch, scipy.sparse), else None."""
    if isinstance(source, DenseSource) and not source.decodes:
        return np.asarray(source.array)
    if isinstance(source, CSRSource) and isinstance(source.data, np.ndarray):
        return source.read(0, source.shape[0]).to_scipy()
    return None


def _run(source: DenseSource | CSRSource, request: _Request) -> SVDResult:
    m, n = source.shape
    if request.scratch_dir is not None:
        # Absolute, as out is: a cluster's workers make theirs in the client's directory
        # whatever their working directory, and the checkpoint names the same one.
        request = replace(request, scratch_dir=os.path.abspath(os.fspath(request.scratch_dir)))
    seed = check_seed(request.seed)
    centering = _make_centering(n, request.center, request.mean)
    _check_outputs(request)
    _check_backend(request.backend)
    cuda_options = _check_cuda_options(request.backend, request.cuda_options)
    plan = _plan_run(source, request, cuda_options)
    if request.row_shift is not None:
        _check_row_shift(request, plan)
    log.info("%s", plan.describe())  # before the first pass: what a job's log says it does
    # The local paths A is read from, kept apart from the paths the run writes, and
    # fingerprinted by its checkpoint: looked for (a walk of a dask graph) only where the
    # run writes to a path.
    writes = (request.out, request.checkpoint, request.scratch_dir) != (None, None, None)
    inputs = local_paths(source) if writes else ()
    # Absolute: what the workers of a cluster write U into, whatever their working directory
    out_path = None if request.out is None else os.path.abspath(_checked_output(request,
                                                                                inputs))
    checkpoint = request.checkpoint
    if checkpoint is None and out_path is not None:
        checkpoint = f"{out_path}.checkpoint"
    if checkpoint is not None:  # removed whole when the run ends
        check_apart_from_inputs("checkpoint", checkpoint, inputs)
    if request.scratch_dir is not None:  # the spill goes into a directory of its own there
        check_apart_from_inputs("scratch_dir", request.scratch_dir, inputs, around=False)
    with _run_locks(out_path, checkpoint):
        if out_path is not None:  # again, locked: a run that held the lock may have written it
            check_output_path(out_path, request.overwrite, inputs=inputs)
        # Kernels and cluster before anything is written, so a missing GPU or an unreachable
        # scheduler leaves no partial output or checkpoint behind.
        kernels = CUDAKernels(n, **cuda_options) if plan.backend == "cuda" else \
            CPUKernels(n, plan.scatter_copies)
        if request.row_shift is not None:
            kernels = RowShiftKernels(kernels, request.row_shift)
        cluster = None
        try:
            cluster = _connect_cluster(request, source, plan, cuda_options)
            with _gpu_memory_named(kernels, plan, cuda_options):
                return _run_passes(source, request, plan, centering, seed, out_path,
                                   checkpoint, inputs, kernels, cluster)
        finally:
            if cluster is not None:
                cluster.close()
            kernels.close()


def _gpu_memory_named(kernels: Any, plan: Plan, cuda_options: dict) -> Any:
    """For local kernels on the GPU, its out-of-memory error during the passes as a
    PlanError that says what to change (a cluster's tasks name their own)."""
    if kernels.name != "cuda":
        return contextlib.nullcontext()
    return out_of_memory_named(DeviceNeed.of_plan(plan.shape[1], plan, cuda_options))


def _check_row_shift(request: _Request, plan: Plan) -> None:
    """A column taken by the kernels (``kernels.row_shift``) reaches the local kernels of the
    randomized and Krylov passes only: the exact and gram methods' kernels do not take it, a
    cluster's workers have kernels of their own, and a checkpoint does not record c."""
    if plan.method not in ("randomized", "krylov"):
        raise InputError(f"a column of M taken from a sparse A needs the randomized or "
                         f"Krylov method, not {plan.method!r}")
    if request.client is not None or request.checkpoint is not None or request.out is not None:
        raise InputError("a column of M taken from a sparse A runs locally, without a "
                         "checkpoint or an output store")


@contextlib.contextmanager
def _run_locks(out_path: str | None, checkpoint: Any):
    """Hold the locks (``store.OutputLock``) of the run's output and checkpoint until it
    ends, so that a second run on either is refused; a checkpoint's directory is made first,
    as the checkpoint would make it, and removed again if the run fails before making the
    checkpoint."""
    made: list[str] = []
    try:
        with contextlib.ExitStack() as locks:
            if out_path is not None:
                locks.enter_context(OutputLock(out_path))
            if checkpoint is not None:
                checkpoint = os.path.abspath(checkpoint)
                made = _make_directories(os.path.dirname(checkpoint))
                locks.enter_context(OutputLock(checkpoint, "checkpoint"))
            yield
    except BaseException:
        if made and not os.path.lexists(checkpoint):
            _remove_empty_directories(made)
        raise


def _zero_note(result: SVDResult, centering: Centering) -> str:
    """What a matrix whose values read as zero (or as their mean) says: every singular
    value is zero."""
    if result.frobenius_norm > 0 or (result.S.size and result.S[0] > 0):
        return ""  # (a norm of sparse rows centered algebraically may round to zero)
    if centering.mode == "none":  # (a store's absent chunks, if any, have their own note)
        return "every value of A read as zero"
    subtracted = "the mean" if centering.mode == "mean" else "the row subtracted"
    return f"every row of A read as {subtracted}: A - 1 mu^T is zero"


# Listing a store's chunks costs up to 8 s per 100,000 on a local disk (one directory per
# row of chunks): stores of more chunks are not counted.
MAX_CHUNKS_COUNTED = 100_000


def _absent_chunks_note(source: DenseSource | CSRSource) -> str:
    """For a zarr array (or a CSR group's indices and data), how many of its storage chunks
    are absent, which zarr reads as its fill value: chunks of the fill value alone are left
    out on purpose, but so are those of a store written in part."""
    if isinstance(source, CSRSource):
        # (indptr's lost chunks read as zeros, which a later chunk's pointers then
        # contradict: a read refuses the block)
        counts = {name: _absent_chunks(getattr(source, name)) for name in ("indices", "data")}
        where = ", ".join(f"{absent} of the {total} {unit} of {name}"
                          for name, (absent, total, unit) in counts.items() if absent)
        if not where:
            return ""
        return (f"chunks of {source.description} are absent ({where}), read as "
                "their arrays' fill value: zarr leaves out chunks of the fill value alone "
                "unless asked to keep them (ooc_svd's stores keep them; elsewhere, indices "
                "all in column 0 and data of explicit zeros), and a store written in part "
                "lacks the rest")
    absent, total, unit = _absent_chunks(source.array)
    if not absent:
        return ""
    return (f"{absent} of the {total} {unit} of {source.description} are absent, "
            f"read as the fill value {source.array.fill_value} (zarr leaves out chunks of the "
            "fill value alone, and a store written in part lacks the rest)")


def _absent_chunks(array: Any) -> tuple[int, int, str]:
    """(absent, total, what they are) of the files of a zarr array's chunks on a local
    store, up to MAX_CHUNKS_COUNTED of them: storage chunks, or for a sharded array its
    shards (the chunks absent inside a shard are told by its index, not counted here);
    nothing counted, (0, 0, ''), for anything else."""
    if not type(array).__module__.startswith("zarr"):
        return 0, 0, ""
    shards = getattr(array, "shards", None)
    if shards:
        total = math.prod(-(-size // shard)
                          for size, shard in zip(array.shape, shards, strict=True))
        unit = "shards (files of storage chunks)"
    else:
        total, unit = int(array.nchunks), "storage chunks"
    present = stored_chunk_files(array) if total <= MAX_CHUNKS_COUNTED else None
    if present is None:
        return 0, 0, ""
    return max(total - present, 0), total, unit


def _make_directories(path: str) -> list[str]:
    """os.makedirs(path), returning the directories it made, innermost first."""
    missing = []
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    os.makedirs(missing[0] if missing else path, exist_ok=True)
    return missing


def _remove_empty_directories(directories: list[str]) -> None:
    """Remove ``directories`` in order while they are empty (innermost first)."""
    with contextlib.suppress(OSError):  # one not empty: it and its parents stay
        for directory in directories:
            os.rmdir(directory)


def _run_passes(source, request: _Request, plan: Plan, centering: Centering, seed: int,
                out_path: str | None, checkpoint: Any, inputs: tuple[str, ...], kernels,
                cluster) -> SVDResult:
    """The passes of a planned run, with its checkpoint and output store (both locked);
    ``inputs``: the local paths A is read from (``local_paths``)."""
    m, n = source.shape
    fingerprint = {
        "input": source.description, "shape": [m, n], "dtype": str(source.dtype),
        "k": request.k, "tol": request.tol, "basis_size": plan.basis_size,
        "niter": plan.niter, "method": request.method, "seed": seed,
        "centering": centering.mode, "mean": centering.fingerprint(), "version": __version__,
    }
    if checkpoint is not None:  # resuming on a rewritten input would mix two matrices' passes
        fingerprint["input files"] = files_state(inputs)
        if fingerprint["input files"]:  # the files themselves, however the path is spelled
            fingerprint["input"] = sorted(fingerprint["input files"])
    saved = Checkpoint(
        None if checkpoint is None else os.fspath(checkpoint), fingerprint, request.resume
    )
    writer = None if out_path is None else ResultWriter(out_path, request.overwrite, locked=True)
    left = LeftVectors(writer, m, _result_dtype(source.dtype), plan.block_rows)
    context = PassContext(
        source, kernels, plan.blocks, plan.prefetch_depth, centering,
        progress_bars(request.progress), [], saved, plan.cached_blocks,
    )
    context.cluster = cluster
    if cluster is not None:
        saved.scratch(cluster.scratch)
    began = time.perf_counter()
    try:
        factors = _compute(context, plan, request, seed, left.allocate)
        spectral = None
        if request.spectral_iters:
            spectral = spectral_residual_estimate(
                context, left.array, factors.S, factors.V, request.spectral_iters, seed
            )
        result = assemble_result(left.array, factors, centering, plan, seed, context.records,
                                 request.tol)
        result.note = "; ".join(filter(None, [result.note, _zero_note(result, centering),
                                              _absent_chunks_note(source)]))
        # On a cluster, what the workers' kernels ran on ('cpu and cuda' on a mixed one); a
        # run resumed after its last reducing pass saw none of them, and says what it asked
        # for
        result.backend = kernels.name if cluster is None else (
            " and ".join(sorted(cluster.backends)) or f"{request.backend} on the workers")
        result.spectral_error = spectral
        if writer:
            _write_result(writer, result, left.array, request.write_factors,
                          provenance(result, source, time.perf_counter() - began))
    except BaseException as error:
        # A checkpoint that holds a pass stays: a chunk that could not be read, a full
        # disk, a worker that cannot see the input or a busy GPU may be fixed, and its
        # passes are resumed then. The error says so (``kept_checkpoint``), unless it is
        # the checkpoint's own. Not for values that cannot be used (a NaN, values too small
        # or too large for float64): resumed on the same input, they fail the same way, and
        # a changed input is not resumed. An output not yet renamed into place is removed
        # (``abort``).
        if writer:
            writer.abort()
        if saved.directory is not None and (isinstance(error, NonFiniteError) or
                                            not holds_a_pass(saved.directory)):
            saved.remove()
        elif saved.directory is not None and isinstance(error, Exception) and \
                not isinstance(error, CheckpointError):
            with contextlib.suppress(AttributeError):  # an exception type without a __dict__
                error.kept_checkpoint = saved.directory
        raise
    saved.remove()
    return result


def _write_result(writer: ResultWriter, result: SVDResult, U: Any, write_factors: bool,
                  attributes: dict) -> None:
    """S, V, the mean (and with ``write_factors``, B = U diag(S) and A = V^T) beside U in
    the output, which is then renamed into place; ``result`` then reads U from there."""
    arrays = {"S": result.S, "V": result.V}
    if result.mean is not None:
        arrays["mean"] = result.mean
    if write_factors:
        writer.write_scaled_rows("B", U, result.S)
        arrays["A"] = np.ascontiguousarray(result.V.T)
    result.store = writer.finish(arrays, attributes)
    result.U = result.store["U"]


def _checked_output(request: _Request, inputs: tuple[str, ...]) -> str:
    """``check_output_path`` of ``out``; with ``resume``, an existing output is said to be
    a finished run's (a run writes its output last)."""
    try:
        return check_output_path(request.out, request.overwrite, inputs=inputs)
    except OutputExistsError as error:
        if not request.resume:
            raise
        raise OutputExistsError(f"{error}; resume continues a run that did not finish, and a "
                                "run's output is written last: this one finished") from None


def _check_outputs(request: _Request) -> None:
    """Refuse options that would silently do nothing, and a scratch directory that the
    final pass could not use, before any pass."""
    if request.write_factors and request.out is None:
        raise InputError("write_factors writes the factors into out: give out too")
    if request.resume and request.out is None and request.checkpoint is None:
        raise InputError("resume continues from a checkpoint: give out (its checkpoint is "
                         "OUT.checkpoint) or checkpoint")
    if request.scratch_dir is not None and request.client is None:  # a cluster's workers
        check_scratch_dir(request.scratch_dir)                           # check their own
    out, checkpoint = request.out, request.checkpoint
    # A URL out is refused by check_output_path, with its own message.
    if out is not None and checkpoint is not None and "://" not in os.fspath(out) and \
            paths_overlap(out, checkpoint):
        raise InputError(f"checkpoint {os.fspath(checkpoint)!r} and out {os.fspath(out)!r} "
                         "must be apart: the checkpoint is removed when the result is written")


def _check_backend(backend: Any) -> str:
    if backend not in ("auto", "cpu", "cuda"):
        raise InputError(f"backend must be 'auto', 'cpu' or 'cuda', not {backend!r}")
    return backend


def _wants_gpu(backend: str) -> bool:
    """Whether the run's kernels go to a GPU: 'cuda', after ``CUDAUnavailableError`` where
    none is usable (before planning, whose limits would name other causes), or 'auto' when
    numba-cuda finds a usable one. ``backend`` is checked already."""
    if backend == "cuda":
        require_cuda()
        return True
    return backend == "auto" and cuda_available(allow_simulator=False)[0]


def _check_cuda_options(backend: str, options: Any) -> dict:
    """The cuda backend's keywords (``cuda_options``); refused with backend='cpu', where
    they could only be a mistake."""
    checked = check_cuda_options(options)
    if checked and backend == "cpu":
        raise InputError("cuda_options apply to the cuda backend, not backend='cpu'")
    return checked


def _kernel_choice(backend: str, gpu: bool, plan: Plan, cuda_options: dict) -> tuple[str, str]:
    """Where a local run's kernels run, 'cuda' or 'cpu', and why: the GPU when ``gpu``,
    except that 'auto' leaves the exact and gram methods (which factor on the CPU) wholly
    on the CPU, and a run whose blocks the GPU's free memory cannot hold. 'cuda' raises
    where it cannot run. Nothing is allocated on the GPU."""
    if backend == "cpu":
        return "cpu", "backend='cpu' was requested"
    if not gpu:
        return "cpu", cuda_available(allow_simulator=False)[1]
    if backend == "auto" and plan.method not in ("randomized", "krylov"):
        return "cpu", f"the {plan.method} method factors on the CPU"
    # Device memory is bounded like host memory; the pinned host buffers of the streams
    # are counted by the plan (staging_blocks, staging_matrices).
    on_gpu, reason = gpu_choice(backend, DeviceNeed.of_plan(plan.shape[1], plan, cuda_options))
    return ("cuda" if on_gpu else "cpu"), reason


def _connect_cluster(request: _Request, source: DenseSource | CSRSource, plan: Plan,
                     cuda_options: dict):
    """The cluster the passes run on (``distributed.ClusterPasses``), or None to run here."""
    if request.client is None:
        return None
    from .distributed import connect

    return connect(request.client, source, plan, request.scratch_dir, request.backend,
                   cuda_options)


def _compute(context: PassContext, plan: Plan, request: _Request, seed: int,
             allocate_u) -> Factors:
    """Run the planned method."""
    rule = request.rank_rule
    if plan.method == "exact":
        return exact_svd(context, plan, allocate_u, request.scratch_dir, rule)
    if plan.method == "gram":
        # Only a method chosen by "auto" may fall back to exact on an ill-conditioned
        # spectrum; a requested one does what was asked, and says what it could not resolve.
        return gram_svd(context, plan, allocate_u, request.scratch_dir, rule,
                        _data_eps(context.source.dtype), fallback=request.method == "auto")
    if plan.method == "krylov":
        return krylov_svd(context, plan, seed, allocate_u, request.scratch_dir, rule)
    if request.tol is not None:
        return adaptive_randomized_svd(
            context, plan, seed, allocate_u, request.scratch_dir, request.tol, request.k
        )
    return randomized_svd(context, plan, seed, allocate_u, request.scratch_dir, rule)


def _rank_request(k, tol, max_rank, m: int, n: int) -> tuple[int, RankRule, float | None]:
    """(rank to plan for, rank rule, tol as a float) from svd's k / tol / max_rank,
    validated."""
    if k is not None and tol is not None:
        raise InputError("give k (a rank) or tol (a relative Frobenius residual), not both")
    if k is None and tol is None:
        raise InputError("give either k (a rank) or tol (a relative Frobenius residual)")
    if k is not None:
        if max_rank is not None:
            raise InputError("max_rank applies to the fixed-accuracy mode (tol), not to k")
        k = check_int("k", k, minimum=1)
        if k > min(m, n):
            raise InputError(f"k={k} must be at most min(m, n) = {min(m, n)} for shape {(m, n)}")
        return k, fixed_rank(k), None
    real = (int, float, np.integer, np.floating)
    if not isinstance(tol, (bool, np.bool_)) and isinstance(tol, real) and not 0 < tol < 1:
        raise InputError(f"tol={tol!r} must be a relative residual between 0 and 1 "
                         "(exclusive)")
    check_number("tol", tol)
    # A cap beyond min(m, n) caps nothing: the rank cannot exceed min(m, n) anyway.
    max_rank = min(m, n) if max_rank is None else \
        min(check_int("max_rank", max_rank, minimum=1), m, n)
    return max_rank, rank_for_tolerance(float(tol), max_rank), float(tol)


def open_matrix(A: Any, allow_empty: bool = False, load_limit: int | None = None
                ) -> tuple[DenseSource | CSRSource, int, int]:
    """The source of A and its shape, after checking that it is a usable matrix (and not
    empty, unless ``allow_empty``). ``load_limit``: a run's memory limit in bytes, which a
    file loaded whole may not exceed by itself."""
    source = open_source(A, load_limit)
    m, n = _check_matrix(source, allow_empty)
    return source, m, n


def _check_q(q: Any, m: int, n: int) -> int:
    """torch's q: the subspace size, 0 <= q <= min(m, n)."""
    q = check_int("q", q, minimum=0)
    if q > min(m, n):
        raise InputError(f"q={q} must be at most min(m, n) = {min(m, n)} for shape {(m, n)}")
    return q


def _check_matrix(source: DenseSource | CSRSource, allow_empty: bool = False
                  ) -> tuple[int, int]:
    if isinstance(source, DenseSource) and len(source.array.shape) != 2:
        shape = tuple(source.array.shape)
        raise not_a_matrix(f"A of shape {shape}", len(shape))
    kind = source.dtype.kind
    if kind == "c":
        raise InputError(f"complex dtype {source.dtype} is not supported; pass real data")
    if kind not in "biuf":
        raise InputError(f"A has non-numeric dtype {source.dtype}; a real numeric dtype is needed")
    m, n = source.shape
    if (m == 0 or n == 0) and not allow_empty:
        raise InputError(f"A is empty: shape {(m, n)}")
    return m, n


def _checked_center(center: Any) -> bool:
    if not isinstance(center, (bool, np.bool_)):  # center='no' would center
        raise InputError(f"center must be True or False, not {center!r}")
    return bool(center)


def _make_centering(n: int, center: bool, mean: Any) -> Centering:
    center = _checked_center(center)
    if mean is None:
        return Centering(n, "mean" if center else "none")
    if center:
        raise InputError("give center=True (subtract the computed column mean) or mean (a "
                         "given one), not both")
    refuse_masked(mean, "mean")
    mean = np.asarray(mean)
    if mean.shape not in ((n,), (1, n)):
        raise InputError(
            f"mean must have shape ({n},) or (1, {n}) to match A's {n} columns, not {mean.shape}"
        )
    if mean.dtype.kind not in "biuf" or not np.all(np.isfinite(mean)):
        raise InputError("mean must be real and finite")
    return Centering(n, "given", mean)


def _data_eps(dtype: np.dtype) -> float:
    """The rounding unit of the data: its own precision limits any method's accuracy."""
    return float(np.finfo(dtype).eps) if dtype.kind == "f" else 0.0


def _result_dtype(dtype: np.dtype) -> np.dtype:
    """float32 results for float32 (or narrower float) data, float64 otherwise, like torch."""
    if dtype.kind == "f" and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


